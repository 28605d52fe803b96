"""predict_mask(method="auto"): the check's blocks and masses against a float64 brute force,
the per-head composition, and its errors (CPU; one GPU test against the CPU composition)."""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, auto_mask, predict_mask
from fgcupy.mask import num_blocks
from fgcupy.mask_algebra import take_blocks

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("q_blocks, count, expected", [(1, 8, [0]), (5, 8, [0, 1, 2, 3, 4]),
                                                       (256, 8, [0, 36, 73, 109, 146, 182, 219, 255]),
                                                       (9, 3, [0, 4, 8])])
def test_check_blocks_spread_over_the_sequence(q_blocks, count, expected):
    assert auto_mask.check_blocks(q_blocks, count) == expected


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 300), st.integers(1, 90), st.sampled_from([16, 64]),
       st.integers(0, 2**31 - 1))
def test_take_blocks_gives_those_blocks_rows(batch, heads, q_len, kv_len, slice_m, seed):
    gen = torch.Generator().manual_seed(seed)
    q_blocks = num_blocks(q_len, slice_m)
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < 0.3
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    blocks = sorted(set(torch.randint(0, q_blocks, (3,), generator=gen).tolist()))
    sub_len = (len(blocks) - 1) * slice_m + (q_len - (q_blocks - 1) * slice_m if blocks[-1] == q_blocks - 1 else slice_m)
    taken = take_blocks(mask, blocks, sub_len)
    taken.validate()
    assert (taken.q_len, taken.kv_len, taken.slice_m) == (sub_len, kv_len, slice_m)
    assert torch.equal(taken.to_dense(), dense[:, :, blocks])


@pytest.mark.parametrize("blocks", [[1.7, 2.2], ["1"], [True], "01"])
def test_take_blocks_refuses_blocks_that_are_not_ints(blocks):
    mask = SliceMask.full(1, 2, 300, 90, 64)
    with pytest.raises(TypeError, match=r"blocks must be a sequence of int query block indices"):
        take_blocks(mask, blocks, 64 * len(blocks))


def test_take_blocks_refuses_blocks_that_do_not_fill_the_length():
    mask = SliceMask.full(1, 1, 300, 50, 64)
    with pytest.raises(ValueError, match="as many as q_len"):
        take_blocks(mask, [0, 1], 64)
    with pytest.raises(ValueError, match="blocks"):
        take_blocks(mask, [7], 64)


def brute_force_check(q, k, mask: SliceMask, density: float, scale: float, check) -> tuple:
    """float64 [B, H, 2] each: the mean share missed by ``mask`` and by the exact column-max top-k
    over the queries of each head's checked blocks, then the output error each gives over
    i.i.d. values relative to the output's spread (sqrt of the rows' summed squared error over
    their summed squared probabilities), apart on the first ``check.even_rows`` rows' blocks
    and on the rest (0 where none); and bool [B, H, 2]: where every block's top-k stands clear
    of the next key by more than the bfloat16 rounding of the column max the check ranks
    (elsewhere its best mask may trade a near-tie)."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)  # [B, H, S, K]
    slice_m, kv_len = mask.slice_m, k.shape[2]
    keep = mask.to_dense()
    top = max(1, min(kv_len, round(density * kv_len)))
    first = check.even_rows // slice_m
    missed, best, error, best_error = (torch.zeros(*q.shape[:2], 2, dtype=torch.float64) for _ in range(4))
    clear = torch.ones(*q.shape[:2], 2, dtype=torch.bool)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            blocks = check.blocks[b, h].tolist()
            for part, chosen in enumerate((blocks[:first], blocks[first:])):
                m, o, e, eo, spread = [], [], [], [], []
                for j in chosen:
                    rows = p[b, h, j * slice_m : (j + 1) * slice_m]
                    colmax = rows.amax(0)
                    oracle = torch.zeros_like(colmax, dtype=torch.bool).scatter_(-1, colmax.topk(top).indices, True)
                    if top < kv_len:
                        logs = colmax.log().topk(top + 1).values
                        clear[b, h, part] &= bool(logs[-2] - logs[-1] > 2**-6 * max(1.0, float(logs[-1].abs())))
                    for kept, shares, errors in ((keep[b, h, j], m, e), (oracle, o, eo)):
                        shares.append(1 - (rows * kept).sum(-1))
                        errors.append(squared_error_over_iid_values(rows, kept))
                    spread.append(rows.square().sum(-1))
                if chosen:
                    missed[b, h, part], best[b, h, part] = torch.cat(m).mean(), torch.cat(o).mean()
                    error[b, h, part], best_error[b, h, part] = ((torch.cat(x).sum() / torch.cat(spread).sum()).sqrt()
                                                                 for x in (e, eo))
    return missed, best, error, best_error, clear


def squared_error_over_iid_values(p, kept):
    """float64 [R]: the squared output error per value dimension of keeping only ``kept`` of
    each row of probabilities ``p`` [R, K] (and renormalising), for values of unit variance
    independent across keys: the variance of sum_j (p_j - kept_j p_j / kept mass) v_j."""
    kept_p = p * kept
    return (p - kept_p / kept_p.sum(-1, keepdim=True)).square().sum(-1)


def test_the_squared_error_over_iid_values_is_the_mean_over_many_draws():
    """The yardstick of the check's estimate, against sampled values."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 50, generator=gen, dtype=torch.float64) * 2, -1)
    kept = torch.rand(3, 50, generator=gen) < 0.4
    v = torch.randn(20000, 50, 1, generator=gen, dtype=torch.float64)
    dense, sparse = p @ v, (p * kept / (p * kept).sum(-1, keepdim=True)) @ v  # [draws, 3, 1]
    sampled = (sparse - dense).square().mean(0).squeeze(-1)
    torch.testing.assert_close(sampled, squared_error_over_iid_values(p, kept), rtol=0.05, atol=0)


@pytest.mark.parametrize("shape", [(5, 40), (2, 7)])
def test_estimated_error_is_the_squared_error_over_iid_values(shape):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    kept = torch.rand(*shape, generator=gen) < 0.5
    kept[:, 0] = True
    lse = torch.stack([torch.logsumexp(logits.masked_fill(~kept, -math.inf) * f, -1) for f in (1, 2)], -2)
    row_lse = torch.stack([torch.logsumexp(logits * f, -1) for f in (1, 2)], -2)
    missed, squared = auto_mask.estimated_error(lse, row_lse)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(missed, 1 - (p * kept).sum(-1))
    torch.testing.assert_close(squared, squared_error_over_iid_values(p, kept))


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 2), st.integers(40, 700), st.integers(30, 400), st.sampled_from([32, 64]),
       st.sampled_from([0.05, 0.3]), st.integers(0, 2**31 - 1))
def test_the_checks_measures_match_a_float64_brute_force(batch, heads, q_len, kv_len, slice_m, density, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 16, generator=gen) * 2
    k = torch.randn(batch, heads, kv_len, 16, generator=gen)
    scale = 0.25
    cheap = predict_mask(q, k, slice_m, "topk", density=density, scale=scale)
    rule = dict(density=density, top_k=None, scale=scale, workspace_bytes=1 << 30)
    check = auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule)
    expected = brute_force_check(q, k, cheap, density, scale, check)
    torch.testing.assert_close(check.missed.double(), expected[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(check.error.double(), expected[2], rtol=1e-3, atol=1e-4)
    # The column max is stored as bfloat16 (8 significant bits): near-ties may trade places, so
    # the best mask's measures are compared where every block's top-k stands clear.
    clear = expected[4]
    torch.testing.assert_close(check.best_missed.double()[clear], expected[1][clear], rtol=0, atol=2e-5)
    torch.testing.assert_close(check.best_error.double()[clear], expected[3][clear], rtol=1e-3, atol=1e-4)
    # The check of another mask on the same blocks (as auto checks its estimated column max).
    other = predict_mask(q, k, slice_m, "colmax", lse="estimate", density=density, scale=scale)
    again = check.against(other, k, scale)
    expected_again = brute_force_check(q, k, other, density, scale, check)
    torch.testing.assert_close(again.missed.double(), expected_again[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(again.error.double(), expected_again[2], rtol=1e-3, atol=1e-4)
    assert again.best_missed is check.best_missed and again.best_error is check.best_error


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 700), st.sampled_from([16, 64, 128]), st.integers(0, 2**31 - 1))
def test_block_outlier_is_each_blocks_largest_squared_distance_from_its_mean(batch, heads, q_len, slice_m, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(batch, heads, q_len, 8, generator=gen) * torch.rand(batch, heads, q_len, 1, generator=gen) * 5)
    got = auto_mask.block_outlier(q.bfloat16(), slice_m)
    qd = q.bfloat16().double()
    for j in range(num_blocks(q_len, slice_m)):
        rows = qd[:, :, j * slice_m : (j + 1) * slice_m]
        expected = (rows - rows.mean(2, keepdim=True)).square().sum(-1).amax(-1)
        # q less its mean in bfloat16: the mean and each difference rounded to 8 bits
        bound = 2e-2 * expected + 1e-2 * rows.square().sum(-1).amax(-1) + 1e-6
        assert ((got[:, :, j].double() - expected).abs() <= bound).all()


def _key_metric_reference(k: torch.Tensor) -> torch.Tensor:
    """float64 [B, H, D, D]: the metric key_metric_factor factors: the centered key covariance
    plus its diagonal at the jitter's share, over the mean variance."""
    kd = k.double()
    centered = kd - kd.mean(2, keepdim=True)
    cov = centered.transpose(-1, -2) @ centered / k.shape[2]
    variance = cov.diagonal(dim1=-2, dim2=-1)
    cov = cov + auto_mask._KEY_METRIC_JITTER * torch.diag_embed(variance)
    return cov / variance.mean(-1)[..., None, None]


def _metric_of(k: torch.Tensor) -> torch.Tensor:
    """float64 [B, H, D, D]: L Lᵀ of key_metric_factor's L."""
    factor = auto_mask.key_metric_factor(k).double()
    return factor @ factor.transpose(-1, -2)


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 300), st.sampled_from([4, 16, 64]),
       st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_key_metric_factor_factors_the_keys_covariance(batch, heads, kv_len, dim, rank_cut, seed):
    """Keys of any rank (down to one direction), with a constant bias: L Lᵀ is their
    covariance, jittered, over its mean variance; the bias counts for nothing."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(1, dim >> rank_cut)
    basis = torch.randn(heads, rank, dim, generator=gen)
    k = torch.randn(batch, heads, kv_len, rank, generator=gen) @ basis * torch.rand(1, generator=gen) * 10
    k = k + torch.randn(1, heads, 1, dim, generator=gen) * 30
    factor = auto_mask.key_metric_factor(k)
    assert factor.dtype == torch.float32 and factor.shape == (batch, heads, dim, dim)
    expected = _key_metric_reference(k)
    got = _metric_of(k)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * expected.diagonal(dim1=-2, dim2=-1).amax())


def test_key_metric_factor_leaves_out_constant_and_non_finite_dimensions():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 200, 8, generator=gen)
    k[..., 2] = 7.0  # a bias: no spread
    k[0, 1, 50, 5] = math.nan
    k[0, 0, 60, 6] = math.inf
    metric = _metric_of(k)
    assert torch.isfinite(metric).all()
    assert (metric[0, :, 2] == 0).all() and (metric[0, 1, 5] == 0).all() and (metric[0, 0, 6] == 0).all()
    assert (metric[0, 0, 5, 5] > 0.5) and (metric[0, 1, 6, 6] > 0.5)
    still = auto_mask.key_metric_factor(torch.full((1, 1, 10, 4), 3.0))  # no key varies: nothing counts
    assert torch.equal(still, torch.zeros_like(still))


def test_key_metric_factor_in_bfloat16_on_keys_of_rank_one():
    """bfloat16 products round the covariance of keys along one direction; the factor still
    holds it (within the products' rounding)."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(64, generator=gen)
    k = (torch.randn(1, 4, 4096, 1, generator=gen) * u).bfloat16()
    got = _metric_of(k)
    expected = _key_metric_reference(k)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.diagonal(dim1=-2, dim2=-1).amax())


def test_key_metric_factor_of_float16_keys_whose_squares_sum_past_float16():
    """20,000 float16 keys of variance 4: their covariance's sums (80,000) pass float16's
    largest value; the factor still holds it."""
    k = (torch.randn(1, 2, 20_000, 8, generator=torch.Generator().manual_seed(2)) * 2 + 5).half()
    got = _metric_of(k)
    expected = _key_metric_reference(k)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.diagonal(dim1=-2, dim2=-1).amax())


@pytest.mark.parametrize("kind", ["key bias decoys + 2 sharp segments", "key bias decoys + 2 sharp segments, rotated",
                                  "large-norm keys read by 2 segments' quiet queries"])
def test_the_check_finds_sharp_segments_whose_queries_spread_least_in_query_space(kind):
    """Two sharp segments between the evenly spread blocks, where other blocks' queries spread
    more along a direction no key varies along (a key bias), or where the segments' own queries
    spread less than any other block's but along the keys' strongest directions: the check's
    widest blocks, measured in the keys' metric, are the segments', and "auto" is near the
    oracle where the cheap mask is 2.5-4.7x off."""
    from fgcupy.oracle import Judge
    from tools.probe_foreign_inputs import inputs

    gen = torch.Generator().manual_seed(0)
    q, k = inputs(kind, 2, 2048, gen)
    v = torch.randn(k.shape, generator=gen)
    blocks, even = auto_mask.checked_blocks(q, k, 64)
    segments = {*range(896 // 64, 1024 // 64), *range(1280 // 64, 1408 // 64)}
    assert all(set(head[even:]) <= segments for head in blocks[0].tolist())
    judge = Judge(q, k, v, 64)
    assert judge.ratio(predict_mask(q, k, 64, "topk", density=0.3))[1] > 2.5
    assert judge.ratio(predict_mask(q, k, 64, density=0.3))[1] < 1.2


@SETTINGS
@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 400), st.sampled_from([16, 64, 128]), st.integers(0, 2**31 - 1))
def test_block_outlier_in_a_metric_is_that_of_the_queries_times_it(batch, heads, q_len, slice_m, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 8, generator=gen) * torch.rand(batch, heads, q_len, 1, generator=gen) * 5
    metric = torch.randn(batch, heads, 8, 8, generator=gen)
    before = q.clone()
    got = auto_mask.block_outlier(q, slice_m, metric)
    assert torch.equal(q, before)
    torch.testing.assert_close(got, auto_mask.block_outlier(q @ metric, slice_m), rtol=1e-4, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="the keys' metric weighs every key alike: a key group no query attends "
                   "to, or a few rare keys read softly, draw the check's extra blocks away (README, Mask quality)")
@pytest.mark.parametrize("kind", ["an unread key group varying along a decoy + 2 sharp segments",
                                  "512 rare keys read softly by 2 segments"])
def test_the_check_finds_sharp_segments_that_only_the_attended_keys_show(kind):
    from fgcupy.oracle import Judge
    from tools.probe_foreign_inputs import inputs

    gen = torch.Generator().manual_seed(0)
    q, k = inputs(kind, 2, 2048, gen)
    v = torch.randn(k.shape, generator=gen)
    judge = Judge(q, k, v, 64)
    assert judge.ratio(predict_mask(q, k, 64, "topk", density=0.3))[1] > 4
    assert judge.ratio(predict_mask(q, k, 64, density=0.3))[1] < 1.2


def test_the_check_takes_blocks_that_hold_a_few_queries_of_another_run():
    """Attention within runs of 100 tokens: blocks of 64 holding a few queries of the next run
    recur between the evenly spread blocks; the check takes them, and "auto" is near the oracle
    where the cheap mask is 31x off."""
    from fgcupy.oracle import Judge
    from tools.probe_foreign_inputs import inputs

    gen = torch.Generator().manual_seed(0)
    q, k = inputs("segments of 100 tokens, strength 3.5", 2, 2048, gen)
    v = torch.randn(k.shape, generator=gen)
    judge = Judge(q, k, v, 64)
    assert judge.ratio(predict_mask(q, k, 64, "topk", density=0.1))[1] > 10
    assert judge.ratio(predict_mask(q, k, 64, density=0.1))[1] < 1.2


def test_the_check_flags_a_mask_that_misses_few_heavy_keys_for_many_light_ones():
    """A window of ~16 tokens beside a global rank-4 component: the cheap mask misses about the
    mass the best mask misses (a missed-mass check passed it, "auto" stayed 1.3-2.1x off), but
    on a few heavy window keys rather than many light global ones; the error estimate flags it."""
    from fgcupy.oracle import Judge
    from tools.probe_foreign_inputs import inputs

    gen = torch.Generator().manual_seed(0)
    q, k = inputs("window of 16 tokens + rank-4 component", 2, 2048, gen)
    v = torch.randn(k.shape, generator=gen)
    judge = Judge(q, k, v, 64)
    cheap = predict_mask(q, k, 64, "topk", density=0.1)
    rule = dict(density=0.1, top_k=None, scale=judge.scale, workspace_bytes=1 << 30)
    check = auto_mask.check_heads(q, k, cheap, predict_mask, judge.scale, rule)
    assert (check.missed < 1.2 * check.best_missed).all()
    assert auto_mask.flagged_heads(check) == [0, 1]
    assert judge.ratio(cheap)[1] > 1.5
    assert judge.ratio(predict_mask(q, k, 64, density=0.1))[1] < 1.2


def test_the_check_also_takes_each_heads_widest_blocks():
    """Blocks the even spread leaves out, whose queries spread most, are checked per head."""
    q = torch.randn(1, 2, 40 * 64, 16, generator=torch.Generator().manual_seed(0))
    even = auto_mask.check_blocks(40)
    wide = {0: [3, 15, 21, 38], 1: [1, 2, 25, 30]}
    for head, blocks in wide.items():
        for j in blocks:
            q[0, head, j * 64 : (j + 1) * 64] *= 3 + j / 10
    chosen, first = auto_mask.checked_blocks(q, q, 64)
    assert chosen.shape == (1, 2, auto_mask.CHECK_BLOCKS + auto_mask.SPREAD_BLOCKS) and first == len(even)
    for head, blocks in wide.items():
        assert chosen[0, head, : len(even)].tolist() == even and sorted(chosen[0, head, len(even) :].tolist()) == blocks
    every, first = auto_mask.checked_blocks(q[:, :, : 12 * 64], q[:, :, : 12 * 64], 64)
    assert every.tolist() == [[list(range(12))] * 2] and first == 12


def test_auto_finds_a_head_that_is_hard_only_between_the_evenly_spread_blocks():
    """Sharp queries in every block but those the even spread checks: the cheap mask is far off
    there, and the widest blocks show it."""
    from fgcupy.oracle import Judge

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4096, 64, generator=gen) for _ in range(3))
    sharp = torch.full((4096,), 10.0)
    for j in auto_mask.check_blocks(32):
        sharp[j * 128 : (j + 1) * 128] = 1.0
    q = q * sharp[:, None]
    judge = Judge(q, k, v, 128)
    cheap = judge.ratio(predict_mask(q, k, 128, "topk", density=0.1))[1]
    auto = judge.ratio(predict_mask(q, k, 128, "auto", density=0.1))[1]
    assert cheap > 5 and auto < 1.5, (cheap, auto)


def _two_kinds_of_head(seq: int = 1024, dim: int = 32, seed: int = 0):
    """Head 0: i.i.d. sharp logits (each query its own peaks); head 1: the queries of each
    block of 128 alike (one mean query stands for them all)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, seq, dim, generator=gen)
    q = torch.randn(1, 2, seq, dim, generator=gen) * 3
    q[0, 1] = q[0, 1, ::128].repeat_interleave(128, 0)[:seq] + 0.01 * torch.randn(seq, dim, generator=gen)
    return q, k


def _checked(q, k, density: float = 0.1, predict=predict_mask) -> tuple:
    """(the cheap top-k mask of q, k at ``density``, the check of it with ``predict``)."""
    scale = q.shape[-1] ** -0.5
    rule = dict(density=density, top_k=None, scale=scale, workspace_bytes=1 << 30)
    cheap = predict_mask(q, k, 128, "topk", density=density)
    return cheap, auto_mask.check_heads(q, k, cheap, predict, scale, rule)


def test_a_nan_key_adds_no_mass_to_the_check():
    q, k = _two_kinds_of_head()
    cheap, clean = _checked(q, k)
    k[0, 0, 500, 0] = math.nan  # one NaN entry: no mass for that key, the head still checked
    _, check = _checked(q, k)
    assert check.missed[0, 0, 0] > 0.5 and check.best_missed[0, 0, 0] > 0.3
    torch.testing.assert_close(check.missed[0, 1], clean.missed[0, 1])
    assert auto_mask.flagged_heads(check) == [0]


def test_auto_predicts_again_only_the_heads_the_cheap_mask_fails():
    q, k = _two_kinds_of_head()
    cheap, check = _checked(q, k)
    assert auto_mask.flagged_heads(check) == [0]
    auto = predict_mask(q, k, 128, "auto", density=0.1)
    exact = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)
    auto.validate()
    assert torch.equal(auto.to_dense()[:, 0], exact.to_dense()[:, 0])
    assert torch.equal(auto.to_dense()[:, 1], cheap.to_dense()[:, 1])


@pytest.mark.parametrize("flagged", [[0, 1, 2, 3], [1, 2], [3], [0, 2, 3]])
def test_auto_puts_the_column_max_in_the_flagged_heads_alone(monkeypatch, flagged):
    """Whatever heads the check flags (all, a run, one, a set with a gap), their rows are the
    estimated column max's and the others' the cheap mask's."""
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 4, 384, 32, generator=gen) * 2 for _ in range(2))
    answers = iter([flagged, []])  # the cheap mask's check, then the estimate's: it passes
    monkeypatch.setattr(auto_mask, "flagged_heads", lambda check: next(answers))
    auto = predict_mask(q, k, 128, "auto", density=0.2)
    auto.validate()
    cheap = predict_mask(q, k, 128, "topk", density=0.2).to_dense()
    exact = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.2).to_dense()
    assert not torch.equal(cheap, exact)
    for head in range(4):
        assert torch.equal(auto.to_dense()[:, head], (exact if head in flagged else cheap)[:, head])


@pytest.mark.parametrize("flagged, weak", [([0, 1, 2, 3], [0, 1, 2, 3]), ([1, 2], [0]), ([0, 2, 3], [1]),
                                            ([0, 1, 3], [0, 2]), ([3], [0])])
def test_auto_puts_the_exact_lse_in_the_heads_whose_estimate_fails(monkeypatch, flagged, weak):
    """Flagged heads whose estimated column max fails the check in turn (``weak``: places in
    ``flagged``) get the column max with the exact LSE; the other flagged heads keep the estimate's."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 4, n, 16, generator=gen) * 3 for n in (512, 4096))  # the estimate samples from 4,096 keys
    answers = iter([flagged, weak])
    monkeypatch.setattr(auto_mask, "flagged_heads", lambda check: next(answers))
    auto = predict_mask(q, k, 128, "auto", density=0.2)
    auto.validate()
    cheap = predict_mask(q, k, 128, "topk", density=0.2).to_dense()
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.2).to_dense()
    lse = auto_mask.exact_row_lse(q, k, 16 ** -0.5)
    exact = predict_mask(q, k, 128, "colmax", lse=lse, density=0.2).to_dense()
    assert all(not torch.equal(estimated[:, h], exact[:, h]) for h in range(4))
    weak_heads = [flagged[i] for i in weak]
    for head in range(4):
        expected = exact if head in weak_heads else estimated if head in flagged else cheap
        assert torch.equal(auto.to_dense()[:, head], expected[:, head])


def _sharpening_heads(q_len: int = 1024, kv_len: int = 4096, dim: int = 32, seed: int = 0):
    """Three i.i.d. heads, logits of std 1, 3 and 10: the cheap mask passes the first; the
    estimated column max, which samples one key in eight past 4,096, the second; only the
    exact LSE finds the third's peaks (each query's mass on one or two keys)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 3, kv_len, dim, generator=gen)
    q = torch.randn(1, 3, q_len, dim, generator=gen) * torch.tensor([1.0, 3.0, 10.0]).view(1, 3, 1, 1)
    return q, k


def test_the_estimate_is_checked_and_the_exact_lse_taken_where_it_fails():
    from fgcupy.oracle import Judge

    q, k = _sharpening_heads()
    scale = q.shape[-1] ** -0.5
    cheap, check = _checked(q, k)
    assert auto_mask.flagged_heads(check) == [1, 2]
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)
    assert auto_mask.flagged_heads(check.against(estimated, k, scale)) == [2]
    exact = predict_mask(q, k, 128, "colmax", lse=auto_mask.exact_row_lse(q, k, scale), density=0.1)
    auto = predict_mask(q, k, 128, "auto", density=0.1)
    for head, expected in enumerate((cheap, estimated, exact)):
        assert torch.equal(auto.to_dense()[:, head], expected.to_dense()[:, head])
    judge = Judge(q[:, 2:], k[:, 2:], torch.randn(k[:, 2:].shape, generator=torch.Generator().manual_seed(1)), 128)
    head_two = [predict_mask(q[:, 2:], k[:, 2:], 128, "colmax", lse=lse, density=0.1)
                for lse in ("estimate", auto_mask.exact_row_lse(q[:, 2:], k[:, 2:], scale))]
    assert judge.ratio(head_two[1])[1] < 1.05 < 3 < judge.ratio(head_two[0])[1]


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 200), st.integers(1, 300), st.integers(1, 1 << 16), st.integers(0, 2**31 - 1))
def test_exact_row_lse_in_chunks_matches_float64(heads, rows, kv_len, workspace, seed):
    """The torch path cuts heads, then rows, to keep its logits within the workspace."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, rows, 16, generator=gen) * 2
    k = torch.randn(2, heads, kv_len, 16, generator=gen)
    got = auto_mask.exact_row_lse(q, k, 0.25, workspace)
    logits = q.double() @ k.double().transpose(-1, -2) * 0.25
    torch.testing.assert_close(got.double(), torch.logsumexp(logits, -1), rtol=0, atol=1e-4)
    both = auto_mask.exact_row_lse(q, k, 0.25, workspace, twice=True)
    expected = torch.stack([torch.logsumexp(logits * factor, -1) for factor in (1, 2)], 2)
    torch.testing.assert_close(both.double(), expected, rtol=0, atol=2e-4)


def test_auto_keeps_the_cheap_mask_where_every_head_passes():
    q, k = _two_kinds_of_head()
    q, k = q[:, 1:], k[:, 1:]
    cheap = predict_mask(q, k, 128, "topk", density=0.2)
    auto = predict_mask(q, k, 128, "auto", density=0.2, layout="HND")
    assert torch.equal(auto.indptr, cheap.indptr) and torch.equal(auto.indices, cheap.indices)


def test_auto_takes_nhd_views_and_no_heads():
    q, k = _two_kinds_of_head()
    hnd = predict_mask(q, k, 128, "auto", top_k=50)
    nhd = predict_mask(q.transpose(1, 2), k.transpose(1, 2), 128, "auto", top_k=50, layout="NHD")
    assert torch.equal(hnd.to_dense(), nhd.to_dense())
    empty = predict_mask(q[:, :0], k[:, :0], 128, "auto", density=0.1)
    assert (empty.batch, empty.heads, empty.q_len) == (1, 0, q.shape[2])


def test_auto_takes_each_option_it_lists(monkeypatch):
    from fgcupy.mask_request import AUTO_OPTIONS

    q, k = _two_kinds_of_head(256)
    values = dict(density=0.25, scale=0.2, layout="NHD", workspace_bytes=1 << 20)
    assert set(values) | {"top_k"} == set(AUTO_OPTIONS)
    seen = []
    real = auto_mask.predict_auto

    def spy(qh, kh, slice_m, predict, **kwargs):
        seen.append((qh.shape, kwargs))
        return real(qh, kh, slice_m, predict, **kwargs)

    monkeypatch.setattr(auto_mask, "predict_auto", spy)
    predict_mask(q.transpose(1, 2), k.transpose(1, 2), 128, "auto", **values)
    assert seen == [(q.shape, dict(density=None, top_k=64, scale=0.2, workspace_bytes=1 << 20))]
    assert predict_mask(q, k, 128, "auto", top_k=9).row_lengths().unique().tolist() == [9]


def test_block_keys_refuses_a_mask_of_uneven_blocks():
    uneven = SliceMask.from_dense(torch.tensor([[[[True, False, True], [True, False, False]]]]), 64, 128)
    with pytest.raises(ValueError, match="same count in each of its 2 blocks, back to back, and stores nothing more; this one's 3 stored"):
        auto_mask.block_keys(uneven)
    shifted = SliceMask(torch.tensor([[[0, 1, 4]]], dtype=torch.int32), torch.tensor([0, 0, 1, 2], dtype=torch.int32),
                        64, 128, 3)  # 1 + 3 keys: the total divides, the blocks differ
    spare = SliceMask(torch.tensor([[[0, 2, 4]]], dtype=torch.int32), torch.tensor([0, 1, 0, 1, 0, 0, 0, 0], dtype=torch.int32),
                      64, 128, 3)  # 2 + 2 keys and 4 spare slots
    for mask in (shifted, spare):
        mask.validate()
        with pytest.raises(ValueError, match="same count in each of its 2 blocks"):
            auto_mask.block_keys(mask)
    even = SliceMask.from_dense(torch.tensor([[[[True, False, True], [True, True, False]]]]), 64, 128)
    assert auto_mask.block_keys(even).tolist() == [[[[0, 2], [0, 1]]]]


@pytest.mark.parametrize("options, match", [
    (dict(tau=0.9), "auto"), (dict(density=0.1, lse="estimate"), "auto"), (dict(density=0.1, pool=16), "auto"),
    (dict(density=0.1, local=4), "auto"), (dict(), "exactly one of density"), (dict(density=0.1, top_k=3), "exactly one"),
    (dict(density=1.5), "density"), (dict(density=0.1, scale=-1.0), "scale"),
    (dict(density=0.1, scale=3e38), "scale must be a positive finite number up to"),  # the check's attention
])
def test_auto_refuses_what_it_does_not_take(options, match):
    q, k = _two_kinds_of_head(256)
    with pytest.raises(ValueError, match=match):
        predict_mask(q, k, 128, "auto", **options)


def test_auto_takes_other_options_left_at_their_defaults():
    q, k = _two_kinds_of_head(256)
    plain = predict_mask(q, k, 128, "auto", density=0.1)
    spelled = predict_mask(q, k, 128, "auto", density=0.1, diagonals=[], min_keys=0, combine="max", local=None)
    assert torch.equal(plain.to_dense(), spelled.to_dense())
    for empty in (torch.tensor([], dtype=torch.int64), ()):
        assert torch.equal(predict_mask(q, k, 128, "auto", density=0.1, diagonals=empty).to_dense(), plain.to_dense())
    for options in (dict(min_keys=True), dict(min_keys=1), dict(diagonals=[0])):
        with pytest.raises(ValueError, match="auto"):
            predict_mask(q, k, 128, "auto", density=0.1, **options)


def test_auto_refuses_slices_the_column_max_cannot_take_before_predicting():
    q, k = _two_kinds_of_head(300)
    with pytest.raises(ValueError, match=r"method='auto' \(predict_mask's default\) predicts the heads its check flags by the column max: .*power of two"):
        predict_mask(q, k, 100, "auto", density=0.1)


def test_the_default_method_is_auto():
    q, k = _two_kinds_of_head()
    default = predict_mask(q, k, 128, density=0.1).to_dense()
    assert torch.equal(default, predict_mask(q, k, 128, "auto", density=0.1).to_dense())
    cheap = predict_mask(q, k, 128, "topk", density=0.1).to_dense()
    assert not torch.equal(default[:, 0], cheap[:, 0]) and torch.equal(default[:, 1], cheap[:, 1])


@pytest.mark.parametrize("options, named", [(dict(pool=16), ["pool"]), (dict(tau=0.9), ["tau"]),
                                            (dict(local=4, max_keys=9), ["max_keys", "local"])])
def test_options_of_another_method_without_a_method_say_which_to_name(options, named):
    q, k = _two_kinds_of_head(256)
    message = re.escape("method='auto' (predict_mask's default) takes") + ".*" + re.escape(f"got {named}. Name the method")
    with pytest.raises(ValueError, match=message):
        predict_mask(q, k, 128, density=0.1 if "tau" not in options else None, **options)


@pytest.mark.parametrize("options, hint", [(dict(lse="estimate"), "lse: method 'colmax'"),
                                           (dict(products="e4m3"), "products: method 'colmax'"),
                                           (dict(pool=8), "pool: method 'topk', 'tau' or 'threshold'")])
def test_the_refusal_names_the_methods_that_take_each_option(options, hint):
    q, k = _two_kinds_of_head(256)
    with pytest.raises(ValueError, match=re.escape(hint)):
        predict_mask(q, k, 128, density=0.1, **options)


def test_a_slice_the_column_max_cannot_take_points_to_topk():
    q, k = _two_kinds_of_head(300)
    with pytest.raises(ValueError, match="method='topk' scores without it"):
        predict_mask(q, k, 100, density=0.1)
    assert predict_mask(q, k, 100, "topk", density=0.1).q_blocks == 3


def test_an_unknown_method_lists_auto():
    q, k = _two_kinds_of_head(256)
    with pytest.raises(ValueError, match="auto"):
        predict_mask(q, k, 128, "best")


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len, slice_m, layout, dtype, options, keeps", [
    (300, 500, 128, "HND", torch.bfloat16, dict(density=0.1), 50),
    (50, 50, 64, "HND", torch.float16, dict(density=0.2), 10),
    (256, 256, 128, "NHD", torch.bfloat16, dict(density=1.0), 256),
    (256, 256, 64, "HND", torch.bfloat16, dict(density=0.0), 0),
    (256, 100, 128, "HND", torch.bfloat16, dict(top_k=500), 100),
])
def test_the_default_on_the_gpu_keeps_top_ks_count_on_odd_inputs(q_len, kv_len, slice_m, layout, dtype, options,
                                                                 keeps):
    gen = torch.Generator().manual_seed(q_len + kv_len)
    q, k = (torch.randn(2, 2, n, 64, generator=gen).to("cuda", dtype) for n in (q_len, kv_len))
    q[0, 1, 3], k[1, 0, 5] = float("nan"), float("inf")
    if layout == "NHD":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    mask = predict_mask(q.requires_grad_(), k, slice_m, layout=layout, **options).validate()
    assert mask.q_blocks == num_blocks(q_len, slice_m) and (mask.row_lengths() == keeps).all()


@pytest.mark.gpu
def test_auto_on_the_gpu_is_the_composition_it_checks():
    """On the kernels: the check's masses near the CPU's, and each head's rows those of the
    cheap mask or of the estimated column max, as the GPU's own check flags it."""
    q, k = _two_kinds_of_head(2048, 64)
    qg, kg = q.cuda().bfloat16(), k.cuda().bfloat16()
    scale = q.shape[-1] ** -0.5
    rule = dict(density=0.1, top_k=None, scale=scale, workspace_bytes=1 << 30)
    cheap = predict_mask(qg, kg, 128, "topk", density=0.1)
    check = auto_mask.check_heads(qg, kg, cheap, predict_mask, scale, rule)
    missed = check.missed
    cpu = brute_force_check(qg.float().cpu(), kg.float().cpu(), cheap.to("cpu"), 0.1, scale,
                             check.of_heads(lambda t: t.cpu()))
    # The best mask's: its column max is stored as bfloat16, so near-ties may trade places (as on the CPU).
    for got, expected, atol in zip((check.missed, check.best_missed, check.error, check.best_error), cpu,
                                   (5e-3, 2e-2, 5e-3, 3e-2)):
        torch.testing.assert_close(got.double().cpu(), expected, rtol=0.02, atol=atol)
    assert auto_mask.flagged_heads(check) == [0]
    auto = predict_mask(qg, kg, 128, "auto", density=0.1)
    auto.validate()
    exact = predict_mask(qg, kg, 128, "colmax", lse="estimate", density=0.1)
    assert torch.equal(auto.to_dense()[:, 0], exact.to_dense()[:, 0])
    assert torch.equal(auto.to_dense()[:, 1], cheap.to_dense()[:, 1])
    assert math.isfinite(float(missed.sum()))


@pytest.mark.gpu
def test_auto_on_the_gpu_takes_the_exact_lse_where_the_estimate_fails():
    """On the kernels (head dim 128: the e4m3 pass on Hopper): the sharpening heads' rows are the
    cheap mask's, the estimated column max's and the column max's with the exact LSE (the same
    products), and the last near the oracle."""
    from fgcupy.mask_request import e4m3_runs_for
    from fgcupy.oracle import Judge

    q, k = (t.cuda().bfloat16() for t in _sharpening_heads(dim=128))
    scale = q.shape[-1] ** -0.5
    cheap = predict_mask(q, k, 128, "topk", density=0.1)
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)
    products = "e4m3" if e4m3_runs_for(q) else "input"
    exact = predict_mask(q, k, 128, "colmax", lse=auto_mask.exact_row_lse(q, k, scale), products=products,
                         density=0.1)
    auto = predict_mask(q, k, 128, "auto", density=0.1)
    auto.validate()
    for head, expected in enumerate((cheap, estimated, exact)):
        assert torch.equal(auto.to_dense()[:, head], expected.to_dense()[:, head])
    v = torch.randn(k[:, 2:].shape, generator=torch.Generator().manual_seed(1)).cuda().bfloat16()
    judge = Judge(q[:, 2:], k[:, 2:], v, 128)
    assert judge.ratio(predict_mask(q[:, 2:], k[:, 2:], 128, "auto", density=0.1))[1] < 1.2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_key_metric_factor_on_the_gpu(dtype):
    """On cuBLAS products (16-bit, rounded on output): keys of full rank with a bias, of rank
    one, and float16 keys whose squares sum past float16; and the segments' blocks taken."""
    from tools.probe_foreign_inputs import inputs

    gen = torch.Generator().manual_seed(3)
    full = torch.randn(1, 2, 32_760, 128, generator=gen) * 2 + torch.randn(1, 2, 1, 128, generator=gen) * 8
    rank_one = torch.randn(1, 2, 32_760, 1, generator=gen) * torch.randn(128, generator=gen)
    for k in (full, rank_one):
        k = k.to("cuda", dtype)
        got = _metric_of(k).cpu()
        expected = _key_metric_reference(k.cpu())
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * expected.diagonal(dim1=-2, dim2=-1).amax())
    q, k = (t.to("cuda", dtype) for t in inputs("key bias decoys + 2 sharp segments, rotated", 2, 2048, gen))
    blocks, even = auto_mask.checked_blocks(q, k, 64)
    segments = {*range(896 // 64, 1024 // 64), *range(1280 // 64, 1408 // 64)}
    assert all(set(head[even:]) <= segments for head in blocks[0].tolist())


def _check_of(missed, best_missed, error, best_error) -> auto_mask.HeadCheck:
    """A HeadCheck holding only the measures (float [B, H, 2] each) flagged_heads reads."""
    t = [torch.tensor(x, dtype=torch.float32) for x in (missed, best_missed, error, best_error)]
    return auto_mask.HeadCheck(None, None, None, None, *t, 0)


@pytest.mark.parametrize("missed, error, flagged", [
    (0.0122, 0.10, True),                     # misses past 1.2x (+ 1e-4)
    (0.0119, 0.10, False),                    # within it: 0.0119 < 1.2 x 0.01 + 1e-4
    (0.01, 0.141, True),                      # errs past 1.4x
    (0.01, 0.139, False),
])
def test_flagged_heads_reads_either_rule(missed, error, flagged):
    check = _check_of([[[missed, 0.0]]], [[[0.01, 0.0]]], [[[error, 0.0]]], [[[0.1, 0.0]]])
    assert auto_mask.flagged_heads(check) == ([0] if flagged else [])


def test_flagged_heads_takes_errors_below_the_floor_as_the_same():
    """Both errors at the LSE's rounding: the squares must differ by more than the floor's square."""
    floor = auto_mask.ERROR_FLOOR
    below = _check_of([[[0.0, 0.0]]], [[[0.0, 0.0]]], [[[0.9 * floor, 0.0]]], [[[0.0, 0.0]]])
    above = _check_of([[[0.0, 0.0]]], [[[0.0, 0.0]]], [[[1.1 * floor, 0.0]]], [[[0.0, 0.0]]])
    assert auto_mask.flagged_heads(below) == [] and auto_mask.flagged_heads(above) == [0]


def test_flagged_heads_takes_any_group_of_blocks_and_any_batch_entry():
    calm, bad = [0.01, 0.01], [0.01, 0.05]  # per head: (even, widest) missed shares
    missed = [[calm, calm, calm], [calm, calm, bad]]  # [B = 2, H = 3, 2]: head 2 bad in entry 1, widest blocks
    best = [[[0.01, 0.01]] * 3] * 2
    zeros = [[[0.0, 0.0]] * 3] * 2
    assert auto_mask.flagged_heads(_check_of(missed, best, zeros, zeros)) == [2]


def test_a_head_failing_in_one_batch_entry_is_flagged():
    """A guidance branch of its own can hold the incoherent head: any entry flags it."""
    q, k = _two_kinds_of_head()
    q, k = torch.cat([q[:, [1, 1]], q[:, [0, 1]]]), torch.cat([k[:, [1, 1]], k[:, [0, 1]]])  # head 0 bad in entry 1
    assert auto_mask.flagged_heads(_checked(q, k)[1]) == [0]


def test_rows_whose_best_mask_keeps_a_nan_key_are_left_out_of_both_means():
    """Their LSE over the best mask is NaN: counted, it made the head's mean NaN and the head
    never flagged (a NaN compares false)."""
    q, k = _two_kinds_of_head()
    k[0, 0, 500] = math.nan

    def keeps_the_nan_key(q, k, slice_m, method, **options):
        mask = predict_mask(q, k, slice_m, method, **options)
        if method != "colmax":
            return mask
        keys = auto_mask.block_keys(mask).clone()
        keys[..., 0] = 500
        return SliceMask(mask.indptr, keys.reshape(-1), mask.slice_m, mask.q_len, mask.kv_len)

    _, check = _checked(q, k, predict=keeps_the_nan_key)
    assert torch.isfinite(check.missed).all() and torch.isfinite(check.best_missed).all()


@pytest.mark.parametrize("option", [{"local": 0}, {"max_keys": 0}])
def test_auto_refuses_options_it_does_not_take_even_at_zero(option):
    q, k = torch.randn(1, 1, 256, 32), torch.randn(1, 1, 256, 32)
    with pytest.raises(ValueError, match="auto"):
        predict_mask(q, k, 128, "auto", density=0.1, **option)
