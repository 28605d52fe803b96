#!/usr/bin/env bash
# One full round on a GPU machine, logs under $OUT (or ./results). Run from the repository root.
#   STEPS="tests sanitize kernels" bash bench/gpu_round.sh        (the default)
# Steps: tests (every gpu-marked test), sanitize (compute-sanitizer memcheck on a reduced run),
# kernels (bench.report_attention on the presets), tune (fgcupy.autotune tables),
# e2e (bench.bench_e2e; needs diffusers: carry .whl), peers (bench.report_peers), masks,
# contest (bench.report_equal_error), headdims (D = 96 and 256 beside SDPA), firstcall,
# tma (tools.ab_tensor_maps: whole key tiles by TMA against every tile gathered), estimate (the
# estimated LSE's parts and cost, and its column max on the head families).
set -uo pipefail
OUT=${OUT:-results}
STEPS=${STEPS:-tests sanitize kernels}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, cupy; print('torch', torch.__version__, 'cupy', cupy.__version__)" | tee -a "$OUT/gpu.txt"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then
  timeout 400 python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error" | tail -15
fi
if has sanitize; then
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -m gpu -x \
    tests/test_attention_gpu.py -k "empty or corrupt or custom_scale or cupy or schedules" 2>&1 | tail -4 | tee "$OUT/sanitizer.log"
fi
if has kernels; then  # the README's "Measured" commands
  timeout 200 python3 -m bench.report_attention --densities 1.0 0.3 0.1 --uneven --json "$OUT/attention_wan14b-480p.json" 2>&1 | tee "$OUT/bench_wan.log" | grep "^|"
  timeout 100 python3 -m bench.report_attention --preset cogvideox5b --densities 1.0 --no-first-call \
    --json "$OUT/attention_cogvideox5b.json" 2>&1 | grep "^|"
  timeout 150 python3 -m bench.report_attention --preset hunyuan-720p --heads 12 --densities 1.0 --no-first-call \
    --json "$OUT/attention_hunyuan-720p.json" 2>&1 | grep "^|"
fi
if has tune; then
  FGCUPY_CACHE_DIR=$OUT/cache timeout 300 python3 -m fgcupy.autotune --preset wan14b-480p cogvideox5b --density 1.0 0.3 \
    --json "$OUT/autotune.json" > "$OUT/autotune_tune.log" 2>&1; grep -v '^fgcupy autotune:' "$OUT/autotune_tune.log" | tail -60
fi
if has e2e; then
  timeout 300 python3 -m bench.bench_e2e --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log" | tail -25
fi
if has peers; then
  timeout 400 python3 -m bench.report_peers --out "$OUT" 2>&1 | tee "$OUT/peers.log" | tail -30
fi
if has contest; then
  timeout 400 python3 -m bench.report_equal_error --json "$OUT/equal_error.json" 2>&1 | tee "$OUT/equal_error.log" | tail -22
fi
if has headdims; then
  timeout 100 python3 -m bench.report_attention --head-dim 96 --densities 1.0 0.3 0.1 --tiles default --no-first-call 2>&1 | grep "^|"
  timeout 100 python3 -m bench.report_attention --head-dim 256 --heads 20 --densities 1.0 0.3 0.1 --no-first-call \
    --tiles default,ws-m128n64s2pp0,m128n32s2w8 2>&1 | grep "^|"
fi
if has tma; then
  timeout 200 python3 -m tools.ab_tensor_maps 2>&1 | tee "$OUT/ws_tma_runs_ab.log"
fi
if has firstcall; then
  timeout 120 python3 -m bench.first_call 2>&1 | tee "$OUT/first_call.log" | head -3
fi
if has estimate; then
  timeout 150 python3 -m tools.profile_estimate 2>&1 | tee "$OUT/estimate_parts.log"
  timeout 300 python3 -m bench.report_masks --densities 0.1 0.3 --skip quality timing drift \
    --judged default "colmax, estimated LSE" 2>&1 | tee "$OUT/masks_families.log" | tail -30
fi
if has masks; then
  timeout 300 python3 -m bench.report_masks --json "$OUT/masks.json" 2>&1 | tee "$OUT/masks.log" | tail -40
fi
