#!/usr/bin/env bash
# The main job: set up .venv on a fresh machine if needed, then EMIM vs its no-EMIM twin on the generated
# motion dataset (python -m emim_triton.train.emim_vs_twin): generate the videos (cached in data/motion), train
# emim_uniformer_xt and uniformer_xt with the same recipe, budget and seed, print and plot the comparison
# (runs/motion_compare/). Extra arguments go to the compare script, e.g. `bash scripts/demo.sh --sequential`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_setup_env.sh"
python -m emim_triton.train.emim_vs_twin "$@"
