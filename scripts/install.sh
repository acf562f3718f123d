#!/usr/bin/env bash
# Installs nanotulu's dependencies into the current Python. An existing torch (a CUDA build on a GPU node) is
# kept; where there is none, torch==2.13.0 is installed, which resolves to the CPU wheel on CPU machines instead of
# the multi-GB CUDA build an unpinned `torch` would pull.
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
    sys.exit(f'nanotulu needs torch >= 2.6, found {torch.__version__}: upgrade it (pip install -U torch)')
"
req=requirements.txt
[ "${1:-}" = "--dev" ] && req=requirements-dev.txt
"$PY" -m pip install -q -r "$req"
"$PY" -c "import torch, triton; print(f'nanotulu: torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}')"
