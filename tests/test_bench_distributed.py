"""The distributed benchmark's masks: a rank's per-head draw must equal its slice of the one-GPU
mask, or the 1-GPU vs 2-GPU comparison would time (and check) different work."""

import pytest
import torch

from bench.bench_distributed import full_mask, head_topk_mask
from fgcupy import SliceMask
from fgcupy.distributed import head_ranges, slice_heads


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_rank_masks_are_slices_of_the_one_gpu_mask(density):
    whole = head_topk_mask(2, range(5), 300, 280, 64, density, seed=3, device="cpu").validate()
    assert abs(whole.density() - (round(density * 280) / 280)) < 1e-9
    for owned in head_ranges(5, 2):
        part = head_topk_mask(2, owned, 300, 280, 64, density, seed=3, device="cpu")
        assert torch.equal(part.to_dense(), slice_heads(whole, owned).to_dense())


def test_full_mask_equals_slicemask_full():
    mine = full_mask(2, 3, 130, 77, 64, device="cpu").validate()
    assert torch.equal(mine.indptr, SliceMask.full(2, 3, 130, 77, 64).indptr)
    assert torch.equal(mine.to_dense(), SliceMask.full(2, 3, 130, 77, 64).to_dense())
