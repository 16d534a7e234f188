#!/usr/bin/env bash
# GPU run for the kernels (issue 5): correctness tests at real shapes, then the kernel benchmark.
#   OUT=/some/dir bash scripts/gpu_kernels.sh [benchmark args, e.g. --sweep]
# Writes kernels-tests.log, kernels-bench.log, <tag>.json/.md/.png under $OUT
# (default benchmarks/results) and prints the goal table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/kernels -q -p no:cacheprovider \
    -n "${PYTEST_WORKERS:-6}" >"$OUT/kernels-tests.log" 2>&1
  echo "kernel tests rc=$?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/kernels-tests.log" | tail -15
fi

timeout "${BENCH_TIMEOUT:-420}" python3 -m polarsparse.bench.kernels --out-dir "$OUT" \
  --no-progress "$@" >"$OUT/kernels-bench.log" 2>&1
echo "benchmark rc=$?"
tail -45 "$OUT/kernels-bench.log"
