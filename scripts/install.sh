#!/usr/bin/env bash
# Install aligna (editable, with test tools) into .venv, or into the active virtualenv.
# torch is pinned to 2.13.0 first: on this project's machines that is the CPU wheel on local
# disk (pip's configured wheel folder); elsewhere pip takes PyPI's default build of it (on Linux,
# CUDA's). The package itself only asks for torch>=2.1, so a GPU machine can keep its CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
if ! python -c "import torch" 2>/dev/null; then
  pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
pip install --quiet --disable-pip-version-check -e ".[dev]"
python -c "import aligna, torch; print(f'aligna {aligna.__version__} installed with torch {torch.__version__} in {__import__(\"sys\").prefix}')"
