#!/usr/bin/env bash
# GPU run for the decode engine (issue 6), sized for one device call of up to ~9 minutes:
#   1. GPU correctness tests (TESTS: kernels at real shapes, CUDA graphs vs eager, dense engine vs
#      transformers greedy tokens, sparse engine at 100% density vs dense at real shapes),
#   2. SELECT_BENCH=1: the top-k selection micro-benchmark (scripts/gpu_select_bench.py),
#   3. TRACE=1: kernel timelines of a few decode steps (scripts/gpu_step_trace.py),
#   4. `bench decode` for each of MODELS (one run per model, trimmed grids below).
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

TESTS=${TESTS:-tests/engine/test_runner_gpu.py}
if [ "$TESTS" != none ]; then
  stamp "GPU tests: $TESTS"
  timeout "${TEST_TIMEOUT:-150}" python3 -m pytest $TESTS -q -p no:cacheprovider -rf >>"$LOG" 2>&1
  stamp "GPU tests rc=$?"
  grep -E "passed|failed|FAILED|Error" "$LOG" | tail -8
fi

if [ "${SELECT_BENCH:-0}" = 1 ]; then
  stamp "top-k selection micro-benchmark"
  timeout "${SELECT_TIMEOUT:-90}" python3 scripts/gpu_select_bench.py >"$OUT/select-bench.md" 2>>"$LOG"
  stamp "select bench rc=$?"
  cat "$OUT/select-bench.md"
fi

if [ "${TRACE:-0}" = 1 ]; then
  stamp "decode step kernel traces"
  TRACE_ARGS=${TRACE_ARGS:-"--model-config llama-3-8b --batch 8|--model-config opt-6.7b --batch 1|--model-config opt-6.7b --batch 1 --mlp-table --head-density 0.5"}
  IFS='|' read -ra TRACES <<<"$TRACE_ARGS"
  for t in "${TRACES[@]}"; do
    timeout 90 python3 scripts/gpu_step_trace.py --layers 4 --top 14 $t 2>>"$LOG" | tee -a "$OUT/step-traces.md"
  done
fi

BENCH=(python3 -m polarsparse.bench.decode --out-dir "$OUT" --no-progress --steps "${STEPS:-10}")
for model in ${MODELS:-opt-6.7b llama-3-8b}; do
  stamp "bench decode $model"
  case $model in
    opt-6.7b)
      timeout "${OPT_TIMEOUT:-150}" "${BENCH[@]}" --model-config opt-6.7b --batch "${OPT_BATCH:-1,8,32,64}" \
        --context "${OPT_CONTEXT:-1024,2048}" --hf-batch "${HF_BATCH:-1,8,32}" --hf-context 1024 \
        --profile 1 --profile-at "${OPT_PROFILE_AT:-1:1024}" >>"$LOG" 2>&1 ;;
    llama-3-8b)
      timeout "${LLAMA_TIMEOUT:-200}" "${BENCH[@]}" --model-config llama-3-8b --batch "${LLAMA_BATCH:-1,8,32,64,128,256}" \
        --context "${LLAMA_CONTEXT:-1024,4096,16384}" --extend-positions --hf-batch "${HF_BATCH:-1,8,32}" --hf-context 1024 \
        --hf-compile-batch "${HF_COMPILE_BATCH:-8}" --profile 1 --profile-at "${LLAMA_PROFILE_AT:-8:1024}" >>"$LOG" 2>&1 ;;
  esac
  stamp "$model rc=$?"
done

grep -E "^(WARNING|ERROR)|Traceback|Error:" "$LOG" | sort | uniq -c | head -20
for f in "$OUT"/decode-*.md; do
  [ -f "$f" ] || continue
  echo "== $f"
  sed -n '/^## Goals/,/^## Skipped/p' "$f" | grep -v '^$' | grep -v "transformers " | head -70
done
