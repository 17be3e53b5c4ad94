#!/usr/bin/env bash
# Makes the peers' virtual environments under benchmarks/.peers/ (git-ignored). Safe to rerun.
# torch==2.13.0 (the CPU build) goes in first in each, as in rex's own install: an unpinned
# torch would pull a multi-GB CUDA build. Peers' code is installed from PyPI, never changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
export PIP_DISABLE_PIP_VERSION_CHECK=1
PEERS=benchmarks/.peers

check_torch() {
  "$1/bin/python" -c 'import torch; assert torch.__version__.startswith("2.13.0"), torch.__version__'
}

# RecBole 1.2.1, the latest release. Workarounds, none in RecBole's code:
# - numpy<2: RecBole uses np.bool8, an alias numpy 2 removed (RecBole issue #2162);
# - pandas<2.3: RecBole fills missing feature values with chained in-place fillna, which
#   pandas 3's copy-on-write turns into a no-op;
# - setuptools<81: ray, which RecBole's quick_start imports, imports pkg_resources.
if [ ! -x "$PEERS/recbole/bin/python" ] || ! "$PEERS/recbole/bin/python" -c 'import recbole' 2>/dev/null; then
  "$PYTHON" -m venv "$PEERS/recbole"
  "$PEERS/recbole/bin/pip" install -q torch==2.13.0
  "$PEERS/recbole/bin/pip" install -q recbole==1.2.1 "numpy<2" "pandas<2.3" "setuptools<81"
fi
check_torch "$PEERS/recbole"
echo "RecBole: $PEERS/recbole ($("$PEERS/recbole/bin/python" -c 'import recbole; print(recbole.__version__)'))"
bash benchmarks/peers/install_ctr_peer.sh
