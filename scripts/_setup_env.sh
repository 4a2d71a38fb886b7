# Sourced by scripts/demo.sh and scripts/test.sh: create .venv if missing, install the project into it and
# activate it. Safe to run again: pip only re-checks what is already there.
#
# torch goes in first, pinned: the bare `torch` requirement in pyproject.toml would otherwise let pip pull
# the default CUDA build and gigabytes of nvidia-* packages. With torch==2.13.0 already installed, the
# project install keeps it. (On machines whose pip has a local wheel directory, that is the CPU wheel.)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $(python3 --version)"
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
