"""Sequence-parallel attention on GPUs with NCCL: a one-GPU world (the exchange path with P=1 and
the kernel on exchanged, strided buffers) and, where two GPUs exist, the two-rank check of
tests/check_distributed_gpu.py."""

import pytest
import torch

from tests.check_distributed_gpu import GPU, failures, run
from tests.dist_harness import Case, run_world

pytestmark = pytest.mark.gpu


def test_one_gpu_world_matches_single_gpu():
    cases = [Case("one_gpu_groups3", heads=6, seq=1500, head_dim=128, slice_m=128, head_groups=3, layout="NHD"),
             Case("one_gpu_d64_m64", heads=2, seq=777, head_dim=64, slice_m=64, mask="callable")]
    results = run_world(1, "nccl", GPU, cases, timeout_s=180)
    bad = failures(results, [c.name for c in cases])
    assert not bad, "\n".join(f"rank {r} {n}: {d}" for r, n, d in bad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: torch sees fewer")
def test_two_gpus_match_single_gpu():
    results, names = run(2)
    bad = failures(results, names)
    assert not bad, "\n".join(f"rank {r} {n}: {d}" for r, n, d in bad)
