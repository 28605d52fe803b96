"""The oracle yardstick and the head families, on small problems (CPU)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import mask_reference as ref
from fgcupy.head_families import FAMILIES, family_qkv, family_shape, mass_fraction
from fgcupy import SliceMask, predict_mask
from fgcupy.mask_reference import block_coherence
from fgcupy.oracle import Judge, block_mass, exact_lse, keys_for
from fgcupy.reference import relative_l2
from fgcupy.workloads import video_qkv

SMALL = family_shape("wan14b-480p", grid=(2, 6, 20))  # 240 tokens, head dim 128


@given(seed=st.integers(0, 2**16), q_len=st.integers(1, 300), kv_len=st.integers(1, 300),
       density=st.sampled_from([0.05, 0.1, 0.3, 1.0]))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_oracle_keeps_the_top_column_maxima_of_the_float64_reference(seed, q_len, kv_len, density):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) * 2 for n in (q_len, kv_len, kv_len))
    judge = Judge(q, k, v, slice_m=64)
    # float64 column maxima from scratch
    logits = q.double() @ k.double().transpose(-1, -2) / 4.0
    probs = torch.softmax(logits, -1)
    pad = (-q_len) % 64
    colmax = torch.nn.functional.pad(probs, (0, 0, 0, pad)).unflatten(2, (-1, 64)).amax(3)
    kept = judge.oracle(density).to_dense()
    n = keys_for(density, kv_len)
    assert (kept.sum(-1) == n).all()
    # every kept key scores at least every dropped one (up to float32 rounding)
    low_kept = torch.where(kept, colmax, math.inf).amin(-1)
    high_dropped = torch.where(kept, -math.inf, colmax).amax(-1)
    assert (low_kept >= high_dropped * (1 - 1e-4) - 1e-12).all()
    torch.testing.assert_close(exact_lse(q, k), torch.logsumexp(logits, -1).float(), rtol=1e-5, atol=1e-5)


def test_full_density_oracle_is_exact_and_ratio_is_one():
    q, k, v = family_qkv(SMALL, "window2d", heads=2, dtype=torch.float32)
    judge = Judge(q, k, v)
    assert judge.oracle_error(1.0) < 1e-5
    err, ratio = judge.ratio(judge.oracle(0.2))
    assert ratio == pytest.approx(1.0) and err > 0


@given(seed=st.integers(0, 2**16), q_len=st.integers(1, 200), kv_len=st.integers(1, 200),
       slice_m=st.sampled_from([16, 64]), budget=st.sampled_from([1, 4 << 30]))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_block_mass_sums_each_tile_of_the_float64_softmax(seed, q_len, kv_len, slice_m, budget):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, 16, generator=gen) * 2 for n in (q_len, kv_len))
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1)
    qb, kb = -(-q_len // slice_m), -(-kv_len // slice_m)
    padded = torch.nn.functional.pad(probs, (0, kb * slice_m - kv_len, 0, qb * slice_m - q_len))
    expected = padded.reshape(1, 2, qb, slice_m, kb, slice_m).sum((3, 5))
    got = block_mass(q, k, exact_lse(q, k, 0.25), slice_m, slice_m, 0.25, budget_bytes=budget)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_the_block_oracle_keeps_the_blocks_of_most_mass():
    q, k, v = family_qkv(SMALL, "mixture", heads=2, seed=1)
    judge = Judge(q, k, v, slice_m=64)
    mass = block_mass(q, k, judge.lse, 64, 64, judge.scale)
    kept = judge.block_oracle_of(2, 64).to_dense()[..., ::64]  # [B, H, QB, key blocks]
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, mass.topk(2, -1).indices, True))


def test_block_oracle_is_never_better_than_the_slice_oracle_on_local_heads():
    q, k, v = family_qkv(family_shape("wan14b-480p", grid=(2, 8, 32)), "gauss-sharp", heads=2, dtype=torch.float32)
    judge = Judge(q, k, v)
    assert judge.error(judge.block_oracle(0.25)) > judge.oracle_error(0.25)


@pytest.mark.parametrize("family", ["window2d", "gauss-coarse"])
def test_blocks_for_error_finds_the_equal_error_block_count(family):
    q, k, v = family_qkv(family_shape("wan14b-480p", grid=(2, 10, 32)), family, heads=2)  # 640 tokens
    judge = Judge(q, k, v, slice_m=64)
    errors = [judge.error(judge.block_oracle_of(n, 64)) for n in range(1, 11)]
    target = judge.oracle_error(0.2)
    blocks, error = judge.blocks_for_error(target, block=64)
    assert error == errors[blocks - 1] <= target
    assert blocks == 1 or errors[blocks - 2] > target
    if all(a >= b for a, b in zip(errors, errors[1:])):  # monotone: bisection finds the first crossing
        assert blocks == next(n for n, e in enumerate(errors, 1) if e <= target)
    assert judge.blocks_for_error(errors[9] + 1.0, block=64, low=3)[0] == 3
    with pytest.raises(ValueError, match="blocks must be in"):
        judge.block_oracle_of(11, 64)


def test_block_coherence_is_one_for_identical_queries_and_low_for_random_ones():
    same = torch.ones(1, 1, 200, 8)
    assert torch.allclose(block_coherence(same, 64), torch.ones(1, 1, 4))
    rand = torch.randn(1, 1, 256, 64, generator=torch.Generator().manual_seed(0))
    assert block_coherence(rand, 128).max() < 0.2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_families_are_seeded_finite_and_span_easy_to_hard(family):
    q, k, v = family_qkv(SMALL, family, heads=2, seed=3)
    q2, _, _ = family_qkv(SMALL, family, heads=2, seed=3)
    assert torch.equal(q, q2)
    assert q.shape == (1, 2, SMALL.seq + FAMILIES[family].text, 128)
    assert all(torch.isfinite(t.float()).all() for t in (q, k, v))
    assert 0.0 < mass_fraction(q, k) <= 1.0


def test_sharp_heads_are_concentrated_and_broad_ones_are_not():
    shape = family_shape("wan14b-480p", grid=(2, 10, 26))
    sharp = mass_fraction(*family_qkv(shape, "gauss-sharp", heads=2)[:2])
    broad = mass_fraction(*family_qkv(shape, "sinks-text", heads=2)[:2])
    assert sharp < 0.05 < broad


def test_family_errors():
    with pytest.raises(ValueError, match="family must be one of"):
        family_qkv(SMALL, "nope")
    with pytest.raises(ValueError, match="unknown shape"):
        family_qkv("tiny", "window2d")
    with pytest.raises(ValueError, match="heads must be a positive int"):
        family_qkv(SMALL, "window2d", heads=0)
    with pytest.raises(ValueError, match="density must be in"):
        keys_for(0.0, 10)


def test_exact_band_default_beats_the_mean_query_on_a_local_family():
    """On a window head finer than a block, the default (pooled sub-blocks + exact band) is
    closer to the oracle than one mean query per block."""
    shape = family_shape("wan14b-480p", grid=(2, 16, 52))
    q, k, v = family_qkv(shape, "window2d", heads=2)
    judge = Judge(q, k, v)
    from fgcupy import predict_mask

    _, default = judge.ratio(predict_mask(q, k, 128, "topk", density=0.1))
    _, mean = judge.ratio(predict_mask(q, k, 128, "topk", density=0.1, pool=None, exact_band=None))
    assert default < mean
    assert relative_l2(judge.dense, judge.dense) == 0.0
    assert ref.band_bounds(0, 128, 64, 100) == (0, 100)


def test_adaptive_pooling_samples_heads_that_turn_with_position_and_keeps_coherent_ones():
    """The default pooling "adaptive": strided temporal heads (their blocks' queries point
    different ways) are sampled and land nearer the oracle than mean queries; the blocks of the
    video-like workload's heads are coherent and keep their mean-query mask."""
    shape = family_shape("wan14b-480p", grid=(3, 30, 52))  # 480p frames: a block spans 2.5 rows
    q, k, v = family_qkv(shape, "temporal-strided", heads=2)
    assert ref.adaptive_rows(q, 32, 128)[1].all()
    judge = Judge(q, k, v)
    mean = judge.error(predict_mask(q, k, 128, "topk", density=0.1, pooling="mean"))
    adaptive = judge.error(predict_mask(q, k, 128, "topk", density=0.1))
    assert adaptive < 0.7 * mean, (mean, adaptive)
    q, k, _ = video_qkv(shape, "mixed", head_ids=range(4))
    assert not ref.adaptive_rows(q, 32, 128)[1].any()
    assert torch.equal(predict_mask(q, k, 128, "topk", density=0.1).to_dense(),
                       predict_mask(q, k, 128, "topk", density=0.1, pooling="mean").to_dense())


def test_exact_lse_leaves_out_nan_keys_as_the_kernels_do():
    """One NaN key (padding) made every LSE NaN, every column max zero and the oracle arbitrary."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 300, 16), torch.randn(1, 2, 260, 16)
    k[:, :, -5:] = float("nan")
    assert torch.allclose(exact_lse(q, k), exact_lse(q, k[:, :, :-5]))


def test_keys_for_rounds():
    assert keys_for(0.29, 100) == 29 and keys_for(0.15, 10) == 2 and keys_for(0.001, 10) == 1


def _judge_640():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 640, 16, generator=gen) * s for s in (2.0, 1.0, 1.0))
    return Judge(q, k, v, 64)


def test_the_judge_rounds_block_counts_and_rates_an_empty_mask_against_the_one_key_oracle():
    judge = _judge_640()
    assert (judge.block_oracle(0.35, 64).row_lengths() == 4 * 64).all()  # round(0.35 x 10 blocks)
    empty = SliceMask.from_dense(torch.zeros(1, 2, 10, 640, dtype=torch.bool), 64, 640)
    err, ratio = judge.ratio(empty)
    assert math.isfinite(err) and math.isfinite(ratio)


def test_blocks_for_error_takes_a_count_whose_error_equals_the_target():
    judge = _judge_640()
    errors = [judge.error(judge.block_oracle_of(n, 64)) for n in range(1, 11)]
    n = next(n for n in range(2, 10) if errors[n - 2] > errors[n - 1])
    assert judge.blocks_for_error(errors[n - 1], 64)[0] == n
