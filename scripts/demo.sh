#!/usr/bin/env bash
# The main job: set up .venv on a fresh machine if needed, then run the EMIM demo (python -m emim_triton.demo).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
python -m emim_triton.demo "$@"
