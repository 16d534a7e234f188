#!/usr/bin/env bash
# GPU run for the kernels (issue 5): correctness tests at real shapes, the kernel benchmark and,
# with PROFILE=1, an Nsight Compute summary of the three kernels at two representative shapes.
#   OUT=/some/dir bash scripts/gpu_kernels.sh [benchmark args, e.g. --sweep]
# Env: SKIP_TESTS=1, TEST_FILTER=<pytest -k expr>, PROFILE=1, *_TIMEOUT (seconds).
# Writes kernels-tests.log, kernels-bench.log, kernels-ncu.txt and <tag>.json/.md/.png under
# $OUT (default benchmarks/results) and prints the goal table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests/kernels -q -p no:cacheprovider \
    -n "${PYTEST_WORKERS:-6}" -k "${TEST_FILTER:-}" >"$OUT/kernels-tests.log" 2>&1
  echo "kernel tests rc=$?"
  grep -E "passed|failed|FAILED|ERROR" "$OUT/kernels-tests.log" | tail -15
fi

if [ "${PROFILE:-0}" = 1 ]; then
  cat >/tmp/polarsparse_profile.py <<'PY'
import torch
from polarsparse.bench.kernels import _mlp_weights, _paged_kv, _random_head_idx
from polarsparse.kernels import attention, mlp
dev, bf16 = torch.device("cuda"), torch.bfloat16
q = torch.randn(32, 32, 128, dtype=bf16, device=dev)            # LLaMA-3-8B, B=32, ctx 4k, 50%
kc, vc, bt, lens = _paged_kv(32, 8, 128, 4096, 32, bf16, dev)
hidx = _random_head_idx(32, 8, 4, dev)
w1, b1, w2t, b2 = _mlp_weights("opt-6.7b", bf16, dev)           # OPT-6.7B, B=1, 10% neurons
x = torch.randn(1, 4096, dtype=bf16, device=dev)
idx = torch.randperm(16384, device=dev)[:1664].sort().values
for _ in range(2):
    attention.triton_paged_decode_attention(q, kc, vc, bt, lens, 128 ** -0.5, hidx)
    mlp.triton_gather_fc2(mlp.triton_gather_fc1(x, w1, b1, idx, "relu"), w2t, b2, idx)
torch.cuda.synchronize()
PY
  timeout "${PROFILE_TIMEOUT:-120}" ncu --clock-control none --section SpeedOfLight \
    --section LaunchStats --section Occupancy \
    -k "regex:_attn_decode_kernel|_fc1_kernel|_fc2_kernel" -s 3 -c 3 \
    python3 /tmp/polarsparse_profile.py >"$OUT/kernels-ncu.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "^  _|Memory Throughput|DRAM Throughput|Duration|Registers Per|Achieved Occupancy" \
    "$OUT/kernels-ncu.txt" | head -40
fi

timeout "${BENCH_TIMEOUT:-420}" python3 -m polarsparse.bench.kernels --out-dir "$OUT" \
  --no-progress "$@" >"$OUT/kernels-bench.log" 2>&1
echo "benchmark rc=$?"
tail -32 "$OUT/kernels-bench.log"
