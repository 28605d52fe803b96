#!/usr/bin/env bash
# One full round on a GPU machine: GPU tests, a compute-sanitizer pass, then the speed table.
# Logs go to $OUT (or ./results). Run from the repository root.
set -uo pipefail
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -m gpu -x tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
if [ "${SANITIZE:-1}" = 1 ]; then
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -x tests \
    -k "empty or corrupt or custom_scale or cupy" 2>&1 | tail -8 | tee "$OUT/sanitizer.log"
fi
python3 -m bench.report_attention ${BENCH_ARGS:-} --json "$OUT/attention.json" 2>&1 | tee "$OUT/bench.log" | tail -30
