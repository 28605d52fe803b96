"""pytest-benchmark suite: the report commands' timing cases, on a GPU.

    python -m pytest bench --benchmark-only        (skipped without a CUDA GPU)

Each case is timed by pytest-benchmark around a call that ends with a CUDA-event measurement
of that call (so wall time = GPU time + one synchronisation); the CUDA-event median of the same
work (fgcupy.timing, as the reports use) is stored in ``extra_info["cuda_event_ms"]``.
Problem: 8 heads of wan14b-480p (32,760 tokens, D = 128, bf16).
"""

from __future__ import annotations

import pytest
import torch

from bench.cases import fgcupy_call, random_inputs, random_topk_mask, sdpa_call
from fgcupy import predict_mask
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import video_qkv

HEADS, SEQ, DIM = 8, 32_760, 128


@pytest.fixture(scope="module")
def qkv():
    return random_inputs(1, HEADS, SEQ, DIM)


def _events(fn):
    """fn, then a wait on a CUDA event recorded after it."""
    def call():
        fn()
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
    return call


def _bench(benchmark, fn, **info):
    benchmark.extra_info.update(info, cuda_event_ms=cuda_time_ms(fn, warmup=3, reps=10)["median_ms"])
    benchmark.pedantic(_events(fn), rounds=10, warmup_rounds=3)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_sdpa_dense(benchmark, qkv, backend):
    _bench(benchmark, sdpa_call(*qkv, backend), what=f"sdpa-{backend}")


@pytest.mark.parametrize("density", [1.0, 0.3, 0.1])
def test_fgcupy_random_lists(benchmark, qkv, density):
    mask = random_topk_mask(1, HEADS, SEQ, SEQ, 128, density)
    _bench(benchmark, fgcupy_call(*qkv, mask), what="fgcupy", density=density)


PREDICTORS = {"default (auto)": dict(), "topk": dict(method="topk"),
              "mean query": dict(method="topk", pool=None, exact_band=None)}


@pytest.mark.parametrize("predictor", list(PREDICTORS))
def test_predict_mask(benchmark, predictor):
    q, k, _ = video_qkv("wan14b-480p", "mixed", head_ids=range(HEADS), device="cuda")
    kw = PREDICTORS[predictor]
    _bench(benchmark, lambda: predict_mask(q, k, 128, density=0.1, **kw), what=f"predict {predictor}")
