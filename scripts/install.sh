#!/usr/bin/env bash
# Installs nanotulu's dependencies into the current Python. An existing torch (a CUDA build on a GPU node) is
# kept; where there is none, torch==2.13.0 is installed: the development machines' pip finds its CPU wheel on disk,
# where an unpinned `torch` would pull a multi-GB CUDA build. (On plain PyPI the Linux torch wheel is a CUDA build:
# install the torch you want first, e.g. from https://download.pytorch.org/whl/cpu, and it is kept.)
#   scripts/install.sh         runtime dependencies
#   scripts/install.sh --dev   plus pytest and transformers (tests, bench)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
# An existing torch must be recent enough: FSDP2's fully_shard, SDPA's enable_gqa and torch.compiler.set_stance.
"$PY" -c "
import sys, torch
if tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]) < (2, 6):
    sys.exit(f'nanotulu needs torch >= 2.6, found {torch.__version__}: upgrade it (pip install torch==2.13.0, from your CUDA version\'s index on a GPU node)')
"
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
"$PY" -m pip install -q -r "$req"
"$PY" -c "import torch, triton; print(f'nanotulu: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
