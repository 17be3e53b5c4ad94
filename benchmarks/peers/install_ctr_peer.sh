#!/usr/bin/env bash
# Creates the CTR peer's venv, benchmarks/.peers/rechub (git-ignored), for the DeepFM-on-Frappe
# comparison. Safe to run again: pinned installs that are already there are quick no-ops.
#
# The peer is torch-rechub, not FuxiCTR: fuxictr==2.3.10 from PyPI installs and imports here
# (torch stays 2.13.0), but its package ships only the framework (BaseModel, layers, data
# loaders); DeepFM and every other model live in the GitHub repository's model_zoo/, which is
# not part of the PyPI package. Assembling DeepFM from FuxiCTR's layers would be our model,
# not the peer's. torch-rechub ships torch_rechub.models.ranking.DeepFM and a CTRTrainer.
#
# torch goes in first, pinned to rex's CPU build: torch-rechub asks only for torch>=1.10, and
# an unpinned resolve could pull a multi-GB CUDA build. No numpy or pandas pin was needed
# (torch-rechub 0.9.0 runs with numpy 2.4 and pandas 3.1).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=benchmarks/.peers/rechub
mkdir -p benchmarks/.peers
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VENV/bin/python" -m pip install -q torch==2.13.0
"$VENV/bin/python" -m pip install -q torch-rechub==0.9.0
"$VENV/bin/python" - <<'PY'
import torch
from importlib.metadata import version
from torch_rechub.models.ranking import DeepFM  # noqa: F401  (the model the benchmark runs)

assert torch.__version__.startswith("2.13.0"), f"pip replaced torch: {torch.__version__}"
print(f"torch-rechub {version('torch-rechub')} installed in benchmarks/.peers/rechub (torch {torch.__version__})")
PY
