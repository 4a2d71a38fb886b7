#!/usr/bin/env bash
# The tests: set up .venv on a fresh machine if needed, then run the whole test suite. Without a GPU the
# fused kernels run in the Triton CPU interpreter (tests/conftest.py switches it on).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
python -m pytest -q tests "$@"
