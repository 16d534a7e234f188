#!/usr/bin/env bash
# Tensor-parallel GPU run (issue 8), sized for one ~9-minute device call on 2 or 4 GPUs:
#   1. correctness: TP=N vs TP=1 greedy tokens and prompt logits on a LLaMA-2-13B-shape random-weight
#      model (2 layers, fp32, CUDA graphs with the NCCL all-reduces inside),
#   2. `bench decode --tensor-parallel-size 1,2(,4)` on LLaMA-2-13B (a layer subset: LAYERS, default 8
#      of 40), dense vs sparse, trimmed grid.
#   OUT=/some/dir bash scripts/gpu_tp.sh
# Writes tp-gpu.log and decode-tp-llama-2-13b-<gpu>.json/.md/.png under $OUT (default
# benchmarks/results) and prints the result tables last. Stage timeouts keep partial results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/tp-gpu.log"
# NVLink multicast stays off on shared hosts (see the device notes): never unset these.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }
# stage LIMIT CMD...: run CMD (output to the log); 10 s before LIMIT every python process dumps its
# stacks (faulthandler on SIGUSR1, rank 0 and workers alike), then the stage is killed.
PYPATTERN="polarsparse|pytest|multiprocessing.spawn"  # this script's processes, rank 0 and workers
stage() {
  local limit=$1; shift
  "$@" >>"$LOG" 2>&1 &
  local pid=$! t=0
  while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$((limit - 10))" ]; do sleep 1; t=$((t + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    stamp "stage over $((limit - 10)) s: dumping stacks"
    pkill -USR1 -f "$PYPATTERN"; sleep 8
    pkill -KILL -f "$PYPATTERN"
  fi
  wait "$pid"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
nvidia-smi topo -m >>"$LOG" 2>&1
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
SIZES=${SIZES:-$( [ "$GPUS" -ge 4 ] && echo 1,2,4 || echo 1,2 )}
stamp "GPUs=$GPUS sizes=$SIZES NCCL_NVLS_ENABLE=$NCCL_NVLS_ENABLE"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "TP correctness (real shape, TP=N vs TP=1)"
  stage "${TEST_TIMEOUT:-150}" python3 -X faulthandler -m pytest tests/distributed/test_synthetic_tp.py -k gpu -q \
    -p no:cacheprovider -rfs -o log_level=INFO -o faulthandler_timeout=0
  stamp "TP correctness rc=$?"
  grep -E "passed|failed|skipped|FAILED|Error" "$LOG" | tail -6
fi

stamp "bench decode llama-2-13b TP=$SIZES (${LAYERS:-8} layers)"
stage "${BENCH_TIMEOUT:-360}" python3 -m polarsparse.bench.decode --out-dir "$OUT" --no-progress \
  --model-config llama-2-13b --layers "${LAYERS:-8}" --tensor-parallel-size "$SIZES" \
  --batch "${BATCH:-16,64}" --context "${CONTEXT:-2048}" --head-density 0.5 --mlp-density 0.5 \
  --steps "${STEPS:-6}" --profile 0 --hf-batch ""
stamp "bench rc=$?"

grep -E "^(WARNING|ERROR)|Traceback|Error:|capture failed" "$LOG" | sort | uniq -c | head -20
grep -E "ranks? ready|modes in|stage over" "$LOG"
if grep -q "stage over" "$LOG"; then  # where the stuck stage was: the innermost polarsparse frames per thread
  grep -E '^(Thread|Current thread)|File ".*polarsparse' "$LOG" | tail -60
fi
for f in "$OUT"/decode-tp-*.md; do
  [ -f "$f" ] || continue
  echo "== $f"
  sed -n '/^## Goals/,/^## Results/p' "$f" | grep -v '^$' | head -60
done
