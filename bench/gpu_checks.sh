#!/usr/bin/env bash
# The GPU measurements the issues still owe (see bench/RESULTS.md), as one command for a GPU lent for minutes:
#
#     bash bench/gpu_checks.sh LOG_DIR [--budget SECONDS] [STEP ...]   # every step, or only the named ones
#
# Steps run in the order below, most needed first, each under its own time limit, so that one slow or hung step
# cannot take the others' time. With --budget, a step starts only when its whole limit fits in what is left of the
# budget, and is reported as skipped otherwise: the command then ends inside a device call's limit with every log
# written. Each step's whole output goes to LOG_DIR/STEP.log (with device.log and summary.txt, at most 2 + the number
# of steps files); this prints each log's tail and, last, every step's exit status and seconds (124: it hit its
# limit; 137: it was killed 10 s later), and exits 1 when any step failed, else 3 when any was skipped.
# Liger Kernel is raced where it imports. A device machine cannot download it: carry its wheel in .whl/ (pip download
# --no-deps liger-kernel; .whl/ is git-ignored, so name it in the device call's carry), and where liger does not
# import yet this installs it into /tmp/site, put on PYTHONPATH.
set -u
SECONDS=0  # the budget's clock (bash would start it from an exported SECONDS)
LOG=${1:?usage: bash bench/gpu_checks.sh LOG_DIR [--budget SECONDS] [STEP ...]}
shift
BUDGET=0
if [ "${1:-}" = "--budget" ]; then
  BUDGET=${2:-}
  [[ $BUDGET =~ ^[1-9][0-9]*$ ]] || { echo "--budget needs a number of seconds, got '$BUDGET'" >&2; exit 2; }
  shift 2
fi

# name, seconds, command. The kernels first, since every later number relies on them; then the model's step, MFU
# and generation at the SmolLM2 sizes (issue 2), then the losses and the trainers against their peers.
STEPS=(
  "kernels|150|env NANOTULU_TEST_DEVICE=cuda python3 -m pytest -q tests/test_kernels.py tests/test_common.py::test_a_bf16_frozen_copy_stores_the_matmul_weights_autocast_would_cast_and_computes_the_same_bits tests/test_model.py::test_grouped_decode_attention_equals_grouped_query_attention"
  "model360|150|python3 bench/model.py --device cuda --preset smollm2-360m --dtype bf16 --compile"
  "model1.7b|180|python3 bench/model.py --device cuda --preset smollm2-1.7b --dtype bf16 --compile --batch_size 2"
  "fused_losses|150|python3 bench/fused_losses.py --tasks dpo,ce --tokens 8192,32768 --hidden 2048"
  "dpo|120|python3 bench/dpo.py --device=cuda"
  "sft|240|python3 bench/sft.py --device=cuda --compile"
  "rlvr|150|python3 bench/rlvr.py --device cuda --preset smollm2-1.7b --dtype bf16 --prompts 64 --samples 1 --prompt_len 128 --new_tokens 512 --batch_size 8"
)

SELECTED=("$@")
NAMES=$(printf '%s\n' "${STEPS[@]}" | cut -d'|' -f1)
for w in "${SELECTED[@]}"; do  # a misspelt step is an error, not a step silently skipped
  grep -qxF -- "$w" <<< "$NAMES" || { echo "unknown step '$w'; the steps: $(echo $NAMES)" >&2; exit 2; }
done
mkdir -p "$LOG" && LOG=$(cd "$LOG" && pwd)  # absolute: the steps run from the repository root
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if ! python3 -c "import liger_kernel.transformers" 2>/dev/null; then
  for wheel in .whl/liger_kernel-*.whl; do
    [ -e "$wheel" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --root-user-action=ignore \
      --target /tmp/site "$wheel" \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  done
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1
  python3 -c "import liger_kernel.transformers; print('liger-kernel imports')" 2>&1
  date -u; } | tee "$LOG/device.log"

: > "$LOG/summary.txt"
failed=0
skipped=0
for entry in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$entry"
  [ ${#SELECTED[@]} -eq 0 ] || printf '%s\n' "${SELECTED[@]}" | grep -qxF -- "$name" || continue
  if [ "$BUDGET" -gt 0 ] && [ $((SECONDS + limit + 10)) -gt "$BUDGET" ]; then  # + the 10 s that -k may add
    echo "$name: skipped, its $limit s limit (+ 10 s) does not fit the $((BUDGET - SECONDS)) s left of --budget" \
      "$BUDGET" | tee -a "$LOG/summary.txt"
    skipped=1
    continue
  fi
  echo "== $name (limit $limit s): $cmd"
  start=$SECONDS
  # SIGINT: Python unwinds (finally blocks run, pytest prints its summary); -k: killed 10 s later if it has not ended
  timeout -s INT -k 10 "$limit" $cmd > "$LOG/$name.log" 2>&1
  rc=$?
  [ $rc -eq 0 ] || failed=1
  tail -n 20 "$LOG/$name.log"
  echo "$name: exit $rc, $((SECONDS - start)) s" >> "$LOG/summary.txt"
done
echo "== summary"
cat "$LOG/summary.txt"
[ $failed -eq 0 ] || exit 1
[ $skipped -eq 0 ] || exit 3
