#!/usr/bin/env bash
# The GPU measurements the issues still owe (see bench/RESULTS.md), as one command for a GPU lent for minutes:
#
#     bash bench/gpu_checks.sh LOG_DIR [STEP ...]      # every step, or only the named ones (e.g. kernels model360)
#
# Each step runs under its own time limit, so one slow or hung step cannot take the others' time. Its whole output
# goes to LOG_DIR/STEP.log; this prints each log's tail and, last, every step's exit status and seconds
# (124: it hit its limit), and exits 1 when any step failed. Liger Kernel is raced where it imports: on a machine that
# cannot install it, carry its wheel (pip download --no-deps liger-kernel; .whl/ is git-ignored, so name it in the
# device's carry) and install it there with `pip install --no-deps --no-index .whl/liger_kernel-*.whl` (the wheel
# itself on PYTHONPATH is not enough: its liger_kernel.ops.experimental cannot be imported from inside a zip).
set -u
LOG=${1:?usage: bash bench/gpu_checks.sh LOG_DIR [STEP ...]}
shift
mkdir -p "$LOG" && LOG=$(cd "$LOG" && pwd)  # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# name, seconds, command: in the order of RESULTS.md, the kernels first since every later number relies on them
STEPS=(
  "kernels|150|env NANOTULU_TEST_DEVICE=cuda python3 -m pytest -q tests/test_kernels.py"
  "fused_losses|150|python3 bench/fused_losses.py"
  "model360|120|python3 bench/model.py --device cuda --preset smollm2-360m --dtype bf16 --compile"
  "model1.7b|150|python3 bench/model.py --device cuda --preset smollm2-1.7b --dtype bf16 --compile --batch_size 4"
  "sft|150|python3 bench/sft.py --device=cuda --compile"
  "dpo|120|python3 bench/dpo.py --device=cuda"
  "rlvr|150|python3 bench/rlvr.py --device cuda --preset smollm2-1.7b --dtype bf16 --prompts 64 --samples 1 --prompt_len 128 --new_tokens 512 --batch_size 8"
)

SELECTED=("$@")
NAMES=$(printf '%s\n' "${STEPS[@]}" | cut -d'|' -f1)
for w in "${SELECTED[@]}"; do  # a misspelt step is an error, not a step silently skipped
  grep -qxF -- "$w" <<< "$NAMES" || { echo "unknown step '$w'; the steps: $(echo $NAMES)" >&2; exit 2; }
done

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  python3 -c "import liger_kernel.transformers; print('liger-kernel imports')" 2>&1
  date -u; } | tee "$LOG/device.log"

: > "$LOG/summary.txt"
failed=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$entry"
  [ ${#SELECTED[@]} -eq 0 ] || printf '%s\n' "${SELECTED[@]}" | grep -qxF -- "$name" || continue
  echo "== $name (limit $limit s): $cmd"
  start=$SECONDS
  timeout "$limit" $cmd > "$LOG/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  tail -n 20 "$LOG/$name.log"
  echo "$name: exit $rc, $((SECONDS - start)) s" >> "$LOG/summary.txt"
done
echo "== summary"
cat "$LOG/summary.txt"
exit $failed
