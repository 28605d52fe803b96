"""fgcupy.calibration: the per-head pooling choice from a dense step's LSE (CPU reference)."""

import math

import pytest
import torch

from fgcupy import predict_mask
from fgcupy.calibration import calibrate, calibrate_pooling, captured_colmax, probe_queries, sampled_mass
from fgcupy.head_families import family_qkv
from fgcupy.mask_reference import colmax_scores
from fgcupy.oracle import exact_lse
from fgcupy.workloads import VideoShape, video_qkv

SHAPE = VideoShape("small", 1, 1, 128, (5, 30, 52))  # frames as wide as a model's: a block spans 2.5 rows


def two_kinds_of_heads():
    """Head 0 looks along time (strided), head 1 is a spatial workload head."""
    temporal = family_qkv(SHAPE, "temporal-strided", heads=1)
    spatial = video_qkv(SHAPE, "spatial", head_ids=[0])
    return [torch.cat(pair, dim=1) for pair in zip(temporal, spatial)]


def test_each_head_gets_the_pooling_that_holds_the_most_column_max_mass():
    q, k, _ = two_kinds_of_heads()
    lse = exact_lse(q, k)
    chosen = calibrate_pooling(q, k, lse, 128, density=0.1)
    colmax = colmax_scores(q, k, lse, 128, 1 / math.sqrt(128))
    held = {}
    for pooling in ("mean", "both"):
        row, key = predict_mask(q, k, 128, "topk", density=0.1, pooling=pooling).flat_rows()
        blocks = colmax.shape[2]
        per_row = colmax.reshape(-1, colmax.shape[3])[row, key].double()
        held[pooling] = torch.zeros(2, dtype=torch.float64).index_add_(0, row // blocks % 2, per_row)
    assert chosen == ["both" if held["both"][h] > held["mean"][h] else "mean" for h in range(2)]
    assert chosen == ["both", "mean"]  # sampled queries for the strided head, mean queries for the spatial one
    mask = predict_mask(q, k, 128, "topk", density=0.1, pooling="mean")
    torch.testing.assert_close(captured_colmax(colmax, mask), held["mean"])
    # The calibration's mask: each head's rows from its chosen pooling's prediction.
    joined = calibrate(q, k, lse, 128, density=0.1).mask.validate().to_dense()
    for h, pooling in enumerate(chosen):
        expected = predict_mask(q[:, h:h + 1], k[:, h:h + 1], 128, "topk", density=0.1, pooling=pooling).to_dense()
        assert torch.equal(joined[:, h:h + 1], expected)


def test_calibration_refuses_what_it_cannot_choose():
    q = torch.randn(1, 2, 256, 32)
    lse = exact_lse(q, q)
    with pytest.raises(ValueError, match="candidates must be"):
        calibrate_pooling(q, q, lse, 128, candidates=("mean", "max"), density=0.1)
    with pytest.raises(ValueError, match="may not set pooling"):
        calibrate_pooling(q, q, lse, 128, pooling="both", density=0.1)
    for method in ("threshold", "tau", "colmax"):  # masks of different sizes: the bigger would win
        with pytest.raises(ValueError, match="top-k only"):
            calibrate_pooling(q, q, lse, 128, method=method, threshold=0.002)
    chosen = calibrate_pooling(q, q, lse, 128, candidates=(c for c in ("mean", "both")), density=0.1)
    assert chosen == calibrate_pooling(q, q, lse, 128, candidates=("mean", "both"), density=0.1)
    for bad in (lse[:, :1], lse.double(), lse.to("meta")):  # the column-max kernels read it raw
        with pytest.raises(ValueError, match=r"lse must be float32 \(1, 2, 256\) on cpu"):
            calibrate_pooling(q, q, bad, 128, density=0.1)


@pytest.mark.parametrize("per_block", [4, 16])
def test_sampled_mass_is_the_probability_the_mask_keeps(per_block):
    """sampled_mass against softmax rows written out: per head, the probability of the sampled
    queries on the kept keys of their blocks (the last, partial block's samples past q_len left out)."""
    q, k, _ = two_kinds_of_heads()
    q, k = q[:, :, :1000], k[:, :, :1100]  # a partial last block of 1000 - 7 * 128 = 104 queries
    masks = [predict_mask(q, k, 128, "topk", density=0.1, pooling=p) for p in ("mean", "both")]
    got = sampled_mass(q, k, masks, 128, 1 / math.sqrt(128), per_block=per_block)
    positions = probe_queries(q.shape[2], 128, per_block)
    if per_block == 4:
        assert positions[:2].tolist() == [[8, 40, 72, 104], [136, 168, 200, 232]]
    rows = positions.reshape(-1)
    rows = rows[rows < q.shape[2]]
    probs = torch.softmax(q[:, :, rows].double() @ k.double().transpose(-1, -2) / math.sqrt(128), dim=-1)
    for i, mask in enumerate(masks):
        kept = mask.to_dense()[:, :, rows // 128]
        torch.testing.assert_close(got[i], (probs * kept).sum(dim=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per_block must be a positive divisor"):
        probe_queries(1000, 128, 3)


def test_sampled_calibration_needs_no_dense_step():
    """Without an LSE the choice comes from sampled queries: the strided head still gets the
    sampled queries, the spatial one the mean query (as with the exact column max)."""
    q, k, _ = two_kinds_of_heads()
    calibration = calibrate(q, k, None, 128, density=0.1)
    assert calibration.poolings == ["both", "mean"]
    assert calibration.mask.heads == 2


def test_default_samples_fit_small_blocks():
    """Blocks smaller than the default sample count are probed with as many queries as divide them."""
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 2, 64, 32, generator=gen) for _ in range(2))
    calibration = calibrate(q, k, None, 8, method="topk", density=0.25)
    assert len(calibration.poolings) == 2


def test_zero_heads_calibrate_to_nothing():
    q = torch.randn(1, 0, 64, 16)
    calibration = calibrate(q, q, None, 16, density=0.2)
    assert calibration.poolings == [] and calibration.mask.heads == 0 and calibration.mask.capacity == 0


def test_calibration_takes_a_slice_size_not_a_multiple_of_16():
    from fgcupy.calibration import default_samples

    assert default_samples(24) == 8
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 300, 32, generator=gen), torch.randn(1, 2, 300, 32, generator=gen)
    assert len(calibrate(q, k, slice_m=24, candidates=("mean", "sample"), density=0.2).poolings) == 2
