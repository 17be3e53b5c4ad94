#!/usr/bin/env bash
# Creates .venv and installs rex with pinned dependencies. Safe to run again.
# torch goes in first, from the CPU build: a range that admits newer releases would pull a
# multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt -e '.[dev,s3]'
.venv/bin/python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0"), f"pip replaced torch: {torch.__version__}"
PY
.venv/bin/dvc config --global core.analytics false >/dev/null 2>&1 || true
echo "rex installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
