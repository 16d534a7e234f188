#!/usr/bin/env bash
# GPU run for the decode engine (issue 6), sized for one ~6-minute device call:
#   1. GPU correctness tests (CUDA graphs vs eager, dense engine vs transformers greedy tokens,
#      sparse engine at 100% density vs dense at real shapes),
#   2. `bench decode` for OPT-6.7B and LLaMA-3-8B (trimmed grid; one run per model).
#   OUT=/some/dir bash scripts/gpu_decode.sh
# Writes decode-gpu.log and decode-<model>-<gpu>.json/.md/.png under $OUT (default
# benchmarks/results) and prints the result tables last. Stage timeouts keep partial results.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG="$OUT/decode-gpu.log"
export PYTHONPATH=src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*" | tee -a "$LOG"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$LOG"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  stamp "GPU tests"
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest tests/engine/test_runner_gpu.py -q -p no:cacheprovider -rf >>"$LOG" 2>&1
  stamp "GPU tests rc=$?"
  grep -E "passed|failed|FAILED|Error" "$LOG" | tail -8
fi

BENCH=(python3 -m polarsparse.bench.decode --out-dir "$OUT" --no-progress --steps "${STEPS:-10}")
stamp "bench decode opt-6.7b"
timeout "${OPT_TIMEOUT:-120}" "${BENCH[@]}" --model-config opt-6.7b --batch 1,8,32,64,128 --context 1024,4096 \
  --hf-batch 1,8,32 --hf-context 1024 >>"$LOG" 2>&1
stamp "opt-6.7b rc=$?"
stamp "bench decode llama-3-8b"
timeout "${LLAMA_TIMEOUT:-200}" "${BENCH[@]}" --model-config llama-3-8b --batch 1,8,32,64,128,256 \
  --context 1024,4096,16384 --extend-positions --hf-batch 1,8,32 --hf-context 1024 \
  --hf-compile-batch "${HF_COMPILE_BATCH:-8}" >>"$LOG" 2>&1
stamp "llama-3-8b rc=$?"

grep -E "^(WARNING|ERROR)|Traceback|Error:" "$LOG" | sort | uniq -c | head -20
for f in "$OUT"/decode-*.md; do
  [ -f "$f" ] || continue
  echo "== $f"
  sed -n '/^## Goals/,/^## Skipped/p' "$f" | grep -v '^$' | head -80
done
