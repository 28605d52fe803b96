"""fgcupy.predict_mask on CPU tensors (the torch reference path) and its option checks."""

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, predict_mask, reference_attention, sparse_attention
from fgcupy import mask_reference as ref
from fgcupy.mask import num_blocks
from fgcupy.mask_request import DEFAULT_POOLING
from fgcupy.scoring import make_request, static_row_counts

from .mask_checks import smallest_tau_set_ok

#: One mean query per block, no exact band: the plain mean-query predictor.
MEAN = dict(pool=64, exact_band=None)


def _qk(seq=300, kv=260, heads=2, dim=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, dim, generator=gen).to(dtype)
    k = torch.randn(1, heads, kv, dim, generator=gen).to(dtype)
    return q, k


@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([16, 64]), st.floats(0, 1),
       st.one_of(st.none(), st.integers(0, 20)), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@example(seq=17, kv=1, slice_m=16, density=0.0, local=16, seed=0)  # a band wider than the keys
def test_topk_keeps_the_static_number_of_keys(seq, kv, slice_m, density, local, seed):
    q, k = _qk(seq, kv, seed=seed)
    mask = predict_mask(q, k, slice_m, "topk", density=density, local=local).validate()
    req = make_request(16, kv, slice_m, "topk", density=density, local=local)
    expected = static_row_counts(num_blocks(seq, slice_m), kv, req)
    assert torch.equal(mask.row_lengths()[0, 0].long(), expected)
    if local is not None:
        band = ref.band_mask(num_blocks(seq, slice_m), kv, slice_m, local)
        assert mask.to_dense()[:, :, band].all()


def test_mean_query_topk_keeps_the_best_scoring_keys():
    q, k = _qk()
    mask = predict_mask(q, k, 64, "topk", top_k=20, **MEAN)
    pooled = ref.pool_queries(q, 64)
    logits = pooled @ k.transpose(-1, -2) / 4.0
    expected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(20, dim=-1).indices, True)
    assert torch.equal(mask.to_dense(), expected)


def test_tau_and_threshold_follow_their_definitions():
    q, k = _qk(seed=1)
    pooled = ref.pool_queries(q, 64)
    logits, lse = ref.logits_and_lse(pooled, k, 0.25)
    kept = predict_mask(q, k, 64, "tau", tau=0.7, **MEAN).to_dense()
    assert smallest_tau_set_ok(logits, kept, 0.7, lse=lse).all()
    probs = torch.exp(logits - lse.unsqueeze(-1))
    for threshold in (0.01, 0.0035):  # no key reaches the first: every row would be empty
        reached = probs >= threshold
        kept = predict_mask(q, k, 64, "threshold", threshold=threshold, min_keys=0, **MEAN).to_dense()
        assert torch.equal(kept, reached)
        # By default a row keeps at least its best key: no block attends to nothing.
        best = torch.zeros_like(reached).scatter_(-1, probs.argmax(-1, keepdim=True), True)
        kept = predict_mask(q, k, 64, "threshold", threshold=threshold, **MEAN).to_dense()
        assert torch.equal(kept, torch.where(reached.any(-1, keepdim=True), reached, best))


def test_sub_block_pooling_max_and_union():
    q, k = _qk(seed=2)
    union = predict_mask(q, k, 64, "topk", top_k=10, pool=16, combine="union").to_dense()
    maxed = predict_mask(q, k, 64, "topk", top_k=10, pool=16, combine="max").to_dense()
    assert (maxed.sum(-1) == 10).all()
    # Each 16-query sub-block's own top 10 are in its block's union.
    sub = ref.pool_queries(q, 16) @ k.transpose(-1, -2)
    top = sub.topk(10, dim=-1).indices
    for p in range(sub.shape[2]):
        assert union[:, :, p // 4].gather(-1, top[:, :, p]).all()
    assert (union.sum(-1) >= 10).all() and (union.sum(-1) <= 40).all()


def test_colmax_threshold_is_the_exact_column_max():
    q, k = _qk(seq=130, kv=90, seed=3)
    logits = q @ k.transpose(-1, -2) / 4.0
    lse = torch.logsumexp(logits, -1)
    probs = torch.softmax(logits, -1)
    mask = predict_mask(q, k, 64, "colmax", lse=lse)
    colmax = torch.stack([probs[:, :, j * 64 : (j + 1) * 64].amax(2) for j in range(3)], 2)
    assert torch.equal(mask.to_dense(), colmax >= 0.5 / 90)
    top = predict_mask(q, k, 64, "colmax", lse=lse, rule="topk", top_k=7).to_dense()
    assert (top.sum(-1) == 7).all()


@given(st.integers(0, 2**31 - 1), st.sampled_from([16, 64]), st.integers(1, 150), st.integers(1, 120),
       st.floats(0.05, 1.0))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_colmax_over_candidates_is_the_exact_top_k_among_them(seed, slice_m, q_len, kv_len, density):
    """candidates: each block's top-k by the float64 column max with the given (sparse) LSE,
    among the keys any candidate mask keeps; blocks with fewer candidates keep them all."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 2, q_len, 16, generator=gen), torch.randn(1, 2, kv_len, 16, generator=gen)
    q_blocks = num_blocks(q_len, slice_m)
    parts = [torch.rand(1, 2, q_blocks, kv_len, generator=gen) < density for _ in range(2)]
    listed = parts[0] | parts[1]
    logits = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    rows = listed.repeat_interleave(slice_m, 2)[:, :, :q_len]
    lse = torch.logsumexp(logits.masked_fill(~rows, -math.inf), -1)  # a sparse step's LSE
    top_k = max(1, kv_len // 4)
    got = predict_mask(q, k, slice_m, "colmax", rule="topk", top_k=top_k, lse=lse.float(),
                       candidates=[SliceMask.from_dense(part, slice_m, q_len) for part in parts]).to_dense()
    assert (got.sum(-1) == top_k).all()
    probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)
    pad = q_blocks * slice_m - q_len
    colmax = torch.nn.functional.pad(probs, (0, 0, 0, pad)).unflatten(2, (q_blocks, slice_m)).amax(3)
    kept_min = colmax.masked_fill(~(got & listed), math.inf).amin(-1)
    dropped = listed & ~got
    dropped_max = colmax.masked_fill(~dropped, -math.inf).amax(-1)
    # Kept candidates outrank dropped ones up to the stored scores' rounding (8 significant
    # bits); a block keeps other keys only once every candidate is kept.
    assert (dropped_max <= kept_min * (1 + 2**-6) + 1e-30).all()
    assert not (dropped.any(-1) & (got & ~listed).any(-1)).any()
    few = listed.sum(-1) <= top_k
    assert (got | ~listed)[few].all()


def test_candidates_errors():
    q, k = _qk()
    lse = torch.zeros(1, 2, 300)
    other = SliceMask.full(1, 2, 300, 300, 128)
    with pytest.raises(ValueError, match=r"candidates apply to method='colmax'"):
        predict_mask(q, k, 64, "topk", top_k=3, candidates=SliceMask.full(1, 2, 300, 300, 64))
    with pytest.raises(ValueError, match=r"candidates have \(B, H, q_len, kv_len, slice_m\)=\(1, 2, 300, 300, 128\)"):
        predict_mask(q, k, 64, "colmax", lse=lse, candidates=other)
    with pytest.raises(TypeError, match="candidates must be a SliceMask or a list of them"):
        predict_mask(q, k, 64, "colmax", lse=lse, candidates=[torch.zeros(3)])
    with pytest.raises(ValueError, match="candidates is empty"):
        predict_mask(q, k, 64, "colmax", lse=lse, candidates=[])


def test_layout_nhd_matches_hnd():
    q, k = _qk(seed=4)
    a = predict_mask(q, k, 64, "tau", tau=0.8)
    b = predict_mask(q.transpose(1, 2), k.transpose(1, 2), 64, "tau", tau=0.8, layout="NHD")
    assert torch.equal(a.to_dense(), b.to_dense())


def test_min_and_max_keys_bound_every_block():
    q, k = _qk(seed=5)
    mask = predict_mask(q, k, 64, "threshold", threshold=0.2, min_keys=4, max_keys=9)
    lengths = mask.row_lengths()
    assert (lengths >= 4).all() and (lengths <= 9).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="best"), r"method must be one of \('topk', 'tau', 'threshold', 'colmax'\), got 'best'"),
        (dict(method="topk"), r"exactly one of density"),
        (dict(method="topk", density=0.1, top_k=3), r"exactly one of density"),
        (dict(method="topk", density=1.5), r"density must be a number in \[0, 1\], got 1.5"),
        (dict(method="tau", tau=0.0), r"tau must be in \(0, 1\], got 0.0"),
        (dict(method="tau", top_k=4), r"density/top_k apply to top-k selection, not rule 'tau'"),
        (dict(method="threshold"), r"rule 'threshold' needs threshold"),
        (dict(method="threshold", threshold=-1.0), r"threshold must be a probability in \(0, 1\], got -1.0"),
        (dict(method="threshold", threshold=1.5), r"threshold must be a probability in \(0, 1\], got 1.5"),
        (dict(method="topk", density=0.1, pool=24), r"pool must divide slice_m=64"),
        (dict(method="topk", density=0.1, pool=16, combine="mean"), r"combine must be one of \('max', 'union'\)"),
        (dict(method="tau", rule="topk"), r"rule='topk' only applies to method='colmax'"),
        (dict(method="topk", density=0.1, local=-2), r"local must be None or a non-negative int"),
        (dict(method="topk", density=0.1, local=8, max_keys=50), r"max_keys must be an int >= max\(1, min_keys=0, band width 80\), got 50"),
        (dict(method="topk", density=0.1, min_keys=-1), r"min_keys must be a non-negative int"),
        (dict(method="topk", density=0.1, logits_dtype=torch.bfloat16), r"logits_dtype must be torch.float16 or"),
        (dict(method="colmax", logits_dtype=torch.float16), r"colmax and combine='max' store probabilities \(bfloat16\)"),
        (dict(method="tau", pool=16, logits_dtype=torch.float16), r"applies where logits are stored"),
        (dict(method="topk", density=0.1, exact_band=-1), r"exact_band must be None or a non-negative int"),
        (dict(method="topk", density=0.1, exact_band=True), r"exact_band must be None or a non-negative int"),
        (dict(method="colmax", exact_band=4), r"exact_band refines pooled max-prob scores"),
        (dict(method="topk", density=0.1, pool=16, combine="union", exact_band=4), r"combine='max'"),
        (dict(method="topk", density=0.1, exact_band=None, diagonals=[300]), r"diagonals move the exact band"),
        (dict(method="topk", density=0.1, diagonals=[1.5]), r"diagonals must be ints"),
        (dict(method="topk", density=0.1, diagonals=[True]), r"diagonals must be ints"),
        (dict(method="topk", density=0.1, diagonals=300), r"diagonals must be a sequence of ints"),
        (dict(method="topk", density=0.1, diagonals=[2**31]), r"too far for int32"),
        (dict(method="colmax", combine="union"), r"combine joins the sub-blocks of mean-query methods"),
        # past float32 the logits turn to inf and the mask to key order: the kernels' bound
        (dict(method="topk", density=0.1, scale=1e39), r"scale must be a positive finite number up to 2.36e\+38"),
        (dict(method="topk", density=0.1, scale=10**400), r"scale must be a positive finite number up to"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_request(16, 260, 64, **kwargs)


def test_diagonals_given_as_an_iterator_reach_every_pooling_of_a_per_head_list():
    q, k = (torch.randn(1, 2, 512, 16, generator=torch.Generator().manual_seed(n)) for n in (1, 2))
    options = dict(method="topk", density=0.1, pooling=["mean", "sample"], exact_band=16)
    listed = predict_mask(q, k, 64, diagonals=[256], **options)
    once = predict_mask(q, k, 64, diagonals=iter([256]), **options)
    assert torch.equal(listed.indices, once.indices) and torch.equal(listed.indptr, once.indptr)


def test_a_workspace_past_floats_range_is_capped_as_documented():
    from fgcupy.mask_request import check_workspace_bytes

    assert check_workspace_bytes(10**400) == check_workspace_bytes(2**70) == 2**62


def test_stored_logits_are_float16_unless_asked_otherwise():
    # Block 0's pooled query picks coordinate 0; keys 0 and 1 score 1.0 and 1.0001, one float16
    # step apart is 2^-10, so stored as float16 they tie and the lower index wins.
    q = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 4.0  # scale 1/4: logit = k[:, 0]
    k = torch.full((1, 1, 40, 16), 0.0)
    k[..., 0] = -1.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 1.0, 1.0001
    assert make_request(16, 40, 64, "topk", top_k=1).logits_dtype == torch.float32  # the default: probabilities
    assert make_request(16, 40, 64, "topk", top_k=1, **MEAN).logits_dtype == torch.float16
    assert make_request(16, 40, 64, "topk", top_k=1, pool=16, exact_band=None).logits_dtype == torch.float32
    assert make_request(16, 40, 64, "topk", top_k=1, pool=16, combine="union").logits_dtype == torch.float16
    assert make_request(16, 40, 64, "tau", **MEAN).logits_dtype == torch.float32  # masses need the range
    assert make_request(16, 40, 64, "threshold", threshold=0.1, **MEAN).logits_dtype == torch.float16
    assert make_request(16, 40, 64, "threshold", threshold=0.1, pool=16, exact_band=None).logits_dtype == torch.float32
    assert make_request(16, 40, 64, "tau", logits_dtype=torch.float16, **MEAN).logits_dtype == torch.float16
    half = predict_mask(q, k, 64, "topk", top_k=1, **MEAN).to_dense()[0, 0, 0]
    exact = predict_mask(q, k, 64, "topk", top_k=1, logits_dtype=torch.float32, **MEAN).to_dense()[0, 0, 0]
    assert half.nonzero().flatten().tolist() == [0]
    assert exact.nonzero().flatten().tolist() == [1]


def test_input_errors():
    q, k = _qk()
    with pytest.raises(ValueError, match=r"q and k must agree on B, H and D"):
        predict_mask(q, k[:, :1], 64, "topk", top_k=3)
    with pytest.raises(ValueError, match=r"method='colmax' needs lse"):
        predict_mask(q, k, 64, "colmax")
    with pytest.raises(ValueError, match=r"lse must be float32 \(1, 2, 300\)"):
        predict_mask(q, k, 64, "colmax", lse=torch.zeros(1, 2, 299))
    with pytest.raises(ValueError, match=r"lse applies to method='colmax'"):
        predict_mask(q, k, 64, "tau", lse=torch.zeros(1, 2, 300))
    with pytest.raises(ValueError, match=r"layout must be one of"):
        predict_mask(q, k, 64, "topk", top_k=3, layout="BHSD")
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor or a cupy.ndarray"):
        predict_mask([1, 2], k, 64, "topk", top_k=3)


def test_returns_a_slice_mask_of_the_query_shape():
    q, k = _qk(seq=129, kv=70)
    mask = predict_mask(q, k, 64, "topk", density=0.5)
    assert isinstance(mask, SliceMask)
    assert (mask.batch, mask.heads, mask.q_blocks, mask.q_len, mask.kv_len, mask.slice_m) == (1, 2, 3, 129, 70, 64)
    assert mask.density() == pytest.approx(35 / 70)
    assert math.isclose(make_request(16, 70, 64, "topk", density=0.5).scale, 0.25)


def test_exact_band_scores_are_the_exact_column_maxima_on_the_band():
    """With the band covering every key and sub-blocks of one query, lse~ is the query's own
    LSE (band mass + its own total mass = twice its mass: log 2 more), so the refined scores
    are half the exact column maxima everywhere."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 200, 16, generator=gen), torch.randn(1, 2, 150, 16, generator=gen)
    scale = 0.25
    _, lse = ref.logits_and_lse(q, k, scale)
    pooled = ref.maxprob_scores(q, k, lse, 64, scale)
    refined = ref.refine_band(pooled * 0, q, k, lse, 1, 64, 1000, scale)
    torch.testing.assert_close(refined, ref.colmax_scores(q, k, lse, 64, scale) / 2, rtol=1e-5, atol=1e-7)


def test_exact_band_keeps_each_query_neighbours_where_pooling_blurs():
    """Queries of a block that each attend to one key near them (a different one per query):
    the pooled mean sees none of them, the exact band finds every one."""
    dim, seq = 64, 256
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(seq, dim, generator=gen)
    keys = keys / keys.norm(dim=1, keepdim=True) * 6
    q = (keys.roll(1, 0) + 0.01 * torch.randn(seq, dim, generator=gen))[None, None]  # query i likes key i - 1
    k = keys[None, None]
    base = predict_mask(q, k, 64, "topk", top_k=70, **MEAN)
    exact = predict_mask(q, k, 64, "topk", top_k=70, pool=64, exact_band=1)
    wanted = torch.zeros(1, 1, 4, seq, dtype=torch.bool)
    for i in range(seq):
        wanted[0, 0, i // 64, (i - 1) % seq] = True
    wanted[0, 0, 0, seq - 1] = False  # query 0's key 255 is outside block 0's band
    assert (exact.to_dense() & wanted).sum() == wanted.sum()
    assert (base.to_dense() & wanted).sum() < wanted.sum() * 0.6


def test_diagonals_are_the_band_moved_along_the_keys():
    """Each diagonal d scores keys [j*M - L + d, (j+1)*M + L + d) exactly (clipped to the keys,
    nothing past either end), as a band of its own; the request keeps them sorted, distinct, and
    without 0 (the band itself)."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 280, 16, generator=gen)
    scale = 0.25
    scores, sub_lse = ref.raw_subblock_scores(q, k, 16, 64, scale, "mean")
    for shift in (-200, 90, 1000):
        moved = ref.refine_band(scores, q, k, sub_lse, 16, 64, 8, scale, shift)
        for j in range(scores.shape[2]):
            lo, hi = min(max(0, 64 * j - 8 + shift), 280), min(280, 64 * j + 72 + shift)
            outside = torch.ones(280, dtype=torch.bool)
            outside[lo:max(lo, hi)] = False
            assert torch.equal(moved[:, :, j, outside], scores[:, :, j, outside])
            if hi > lo:
                logits = q[:, :, 64 * j : 64 * j + 64] @ k[:, :, lo:hi].transpose(-1, -2) * scale
                own = sub_lse[:, :, torch.arange(64 * j, min(300, 64 * j + 64)) // 16]
                lse = torch.logaddexp(torch.logsumexp(logits, -1), own)
                exact = ref.stored_probs(torch.exp(logits - lse.unsqueeze(-1)).amax(2))
                # Stored rounded: a score next to a rounding boundary may land one step off.
                torch.testing.assert_close(moved[:, :, j, lo:hi], torch.maximum(scores[:, :, j, lo:hi], exact),
                                           rtol=2**-7, atol=1e-7)
    req = make_request(16, 280, 64, "topk", top_k=5, diagonals=[90, -200, 0, 90])
    assert req.diagonals == (-200, 90)
    both = ref.pooled_scores(q, k, 16, 64, 8, scale, "mean", req.diagonals)
    one_by_one = ref.refine_band(ref.refine_band(ref.refine_band(scores, q, k, sub_lse, 16, 64, 8, scale), q, k,
                                                 sub_lse, 16, 64, 8, scale, -200), q, k, sub_lse, 16, 64, 8, scale, 90)
    assert torch.equal(both, one_by_one)
    mask = predict_mask(q, k, 64, "topk", top_k=40, pool=16, exact_band=8, diagonals=[90, -200])
    assert torch.equal(mask.to_dense(), ref.select(both, "topk", k=40))


def test_the_default_pools_sub_blocks_and_scores_the_band_exactly():
    assert make_request(16, 400, 128, "topk", top_k=5).pool == 32
    assert make_request(16, 400, 128, "topk", top_k=5).exact_band == 64
    assert make_request(16, 400, 64, "tau", pool=16).exact_band == 64
    assert make_request(16, 400, 32, "topk", top_k=5).exact_band is None  # no kernel for 32-query bands
    assert make_request(16, 400, 32, "topk", top_k=5).pool == 32
    union = make_request(16, 400, 128, "topk", top_k=5, pool=16, combine="union")
    assert union.exact_band is None and union.pool == 16


@given(st.integers(1, 300), st.integers(1, 200), st.sampled_from([2, 4, 8, 16, 32, 64]), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_sampled_scores_against_a_float64_recount(q_len, kv_len, pool, seed):
    """pooling="sample": each group's middle query (clamped to the last query), its exact softmax,
    the max over the block's groups, then the max over keys within pool // 2 either side;
    recounted here in float64 with plain loops over groups and keys."""
    slice_m, dim, scale = 64, 16, 0.3
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, q_len, dim, generator=gen), torch.randn(1, 1, kv_len, dim, generator=gen)
    rows = q[:, :, ref.sample_rows(q_len, pool)]
    _, lse = ref.logits_and_lse(rows, k, scale)
    got = ref.dilate_keys(ref.maxprob_scores(rows, k, lse, slice_m // pool, scale, exact=True), pool // 2)
    half = pool // 2
    probs = torch.softmax(q[0, 0].double() @ k[0, 0].double().T * scale, -1)
    for j in range(num_blocks(q_len, slice_m)):
        groups = range(j * slice_m // pool, min((j + 1) * slice_m // pool, num_blocks(q_len, pool)))
        middle = [min(g * pool + half, q_len - 1) for g in groups]
        best = probs[middle].amax(0)
        expected = torch.stack([best[max(0, key - half): key + half + 1].max() for key in range(kv_len)])
        torch.testing.assert_close(got[0, 0, j].double(), expected, rtol=1e-5, atol=1e-7)


def test_pooling_follows_the_default_and_is_refused_where_it_cannot_apply():
    req = make_request(64, 1000, 128, "topk", density=0.1)
    assert (req.pool, req.pooling, req.exact_band, req.kind) == (32, DEFAULT_POOLING, 64, "submax")
    assert make_request(64, 1000, 128, "topk", density=0.1, pool=16).pooling == "mean"  # an explicit pool
    assert make_request(64, 1000, 128, "topk", density=0.1, pool=16, pooling="both").pooling == "both"
    with pytest.raises(ValueError, match="give pool < slice_m=128"):
        make_request(64, 1000, 128, "topk", density=0.1, combine="union")  # pool = slice_m: nothing to join
    assert make_request(64, 1000, 128, "tau", pool=128, pooling="sample", exact_band=None).kind == "submax"
    with pytest.raises(ValueError, match=r"pooling must be one of \('mean', 'sample', 'both', 'adaptive'\), got True"):
        make_request(64, 1000, 128, "topk", density=0.1, pooling=True)
    with pytest.raises(ValueError, match="pooling='sample' scores sub-blocks by their middle query"):
        make_request(64, 1000, 128, "topk", density=0.1, pool=16, combine="union", pooling="sample")
    with pytest.raises(ValueError, match="pooling='both' scores sub-blocks by their middle query"):
        make_request(64, 1000, 128, "colmax", pooling="both")


def test_sampled_prediction_equals_the_reference_pipeline():
    """predict_mask (CPU: the op's reference path) with sampled rows, and with both poolings, at
    the default pool and band: scoring, dilation, geometric mean, exact band (with the mean rows'
    LSE for "both"), top-k; against the steps written out."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 300, 32, generator=gen), torch.randn(1, 2, 260, 32, generator=gen)
    scale = 1 / math.sqrt(32)
    raw = {}
    for pooling, rows in (("mean", ref.rounded(ref.pool_queries(q, 32), q.dtype)),
                          ("sample", q[:, :, ref.sample_rows(300, 32)])):
        _, lse = ref.logits_and_lse(rows, k, scale)
        scores = ref.maxprob_scores(rows, k, lse, 2, scale)
        raw[pooling] = (ref.dilate_keys(scores, 16) if pooling == "sample" else scores), lse
    (mean, mean_lse), (sample, sample_lse) = raw["mean"], raw["sample"]
    blocks = {"sample": ref.refine_band(sample, q, k, sample_lse, 32, 64, 64, scale),
              "both": ref.refine_band(ref.stored_probs((mean * sample).sqrt()), q, k, mean_lse, 32, 64,
                                      64, scale)}
    for pooling in ("sample", "both"):
        got = predict_mask(q, k, 64, "topk", top_k=40, pooling=pooling)
        assert torch.equal(got.to_dense(), ref.select(blocks[pooling], "topk", k=40)), pooling


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_pooling_per_head_is_each_heads_own_prediction(layout):
    """pooling=[...] per head: head h's mask is what pooling[h] gives that head alone."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 300, 32, generator=gen), torch.randn(1, 4, 260, 32, generator=gen)
    poolings = ["both", "mean", "sample", "both"]
    args = (q, k) if layout == "HND" else (q.transpose(1, 2), k.transpose(1, 2))
    got = predict_mask(*args, 64, "topk", top_k=40, pooling=poolings, layout=layout).validate().to_dense()
    for h, pooling in enumerate(poolings):
        alone = predict_mask(q[:, h : h + 1], k[:, h : h + 1], 64, "topk", top_k=40, pooling=pooling)
        assert torch.equal(got[:, h : h + 1], alone.to_dense()), (h, pooling)
    same = predict_mask(q, k, 64, "tau", tau=0.8, pooling=["sample"] * 4).to_dense()
    assert torch.equal(same, predict_mask(q, k, 64, "tau", tau=0.8, pooling="sample").to_dense())


@pytest.mark.parametrize("poolings", [["sample", "mean"], ["mean", "sample"]])
def test_pooling_per_head_stores_each_poolings_own_logits(poolings):
    """With one pooled row per block, "mean" keeps float16 logits by default and "sample" float32
    probabilities: each head gets its own pooling's default, in any order of the list."""
    gen = torch.Generator().manual_seed(15)
    q, k = torch.randn(1, 2, 256, 64, generator=gen), torch.randn(1, 2, 256, 64, generator=gen)
    options = dict(density=0.2, pool=128, exact_band=None)
    got = predict_mask(q, k, 128, "topk", pooling=poolings, **options).to_dense()
    for h, pooling in enumerate(poolings):
        alone = predict_mask(q[:, h : h + 1], k[:, h : h + 1], 128, "topk", pooling=pooling, **options)
        assert torch.equal(got[:, h : h + 1], alone.to_dense()), (h, pooling)


@pytest.mark.parametrize("pooling, message", [
    (["mean"] * 3, r"one of \('mean', 'sample', 'both', 'adaptive'\) for each of the 4 heads"),
    (["mean", "mean", "max", "mean"], r"for each of the 4 heads"),
])
def test_pooling_per_head_refuses_bad_lists(pooling, message):
    q = torch.randn(1, 4, 100, 16)
    with pytest.raises(ValueError, match=message):
        predict_mask(q, q, 64, "topk", density=0.1, pooling=pooling)
    with pytest.raises(ValueError, match="not colmax"):
        predict_mask(q, q, 64, "colmax", lse=torch.zeros(1, 4, 100), pooling=["mean", "both"] * 2)


def test_workspace_bytes_is_a_non_negative_number():
    """Any size works (0: one head at a time, as 1 does); what is not a size is refused."""
    q = torch.randn(1, 2, 100, 16)
    expected = predict_mask(q, q, 64, "topk", density=0.2).indices
    for size in (0, 1, 1e9, 10**40):
        assert torch.equal(predict_mask(q, q, 64, "topk", density=0.2, workspace_bytes=size).indices, expected)
    for bad in (True, -1, float("nan"), float("inf"), "1", None):
        with pytest.raises(ValueError, match="workspace_bytes must be a non-negative number"):
            predict_mask(q, q, 64, "topk", density=0.2, workspace_bytes=bad)


def test_no_heads_with_an_empty_pooling_list_is_an_empty_mask():
    q = torch.randn(1, 0, 100, 16)
    mask = predict_mask(q, q, 64, "topk", density=0.2, pooling=[])
    assert (mask.heads, mask.q_blocks, mask.indices.numel()) == (0, 2, 0)


def _blocks_of_two_kinds(q_len, dim, slice_m, seed):
    """q [1, 2, q_len, dim] float32 whose even blocks share one direction (coherent) and whose
    odd blocks are noise (incoherent), and the bool [1, 2, QB] of the incoherent ones."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, q_len, dim, generator=gen)
    block = torch.arange(q_len) // slice_m
    coherent = block % 2 == 0
    q[:, :, coherent] = 0.2 * q[:, :, coherent] + torch.randn(1, 2, 1, dim, generator=gen)
    blocks = num_blocks(q_len, slice_m)
    return q, (torch.arange(blocks) % 2 == 1).expand(1, 2, blocks)


@given(st.integers(1, 400), st.sampled_from([16, 64]), st.sampled_from([16, 32]), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_block_coherence_against_a_float64_recount(q_len, slice_m, dim, seed):
    """Each block's norm of the mean query over the mean query norm (a short last block over its
    own queries; an all-zero block 0), recounted in float64; the same from sub-block means."""
    q, _ = _blocks_of_two_kinds(q_len, dim, slice_m, seed)
    q[0, 0, ::7] = 0.0
    q[0, 1, :slice_m] = 0.0
    got = ref.block_coherence(q, slice_m)
    from_sub_blocks = ref.coherence_of(q, ref.pool_queries(q, 8), 8, slice_m)  # what a prediction computes
    torch.testing.assert_close(from_sub_blocks, got, rtol=1e-5, atol=1e-6)
    for h in range(2):
        for j in range(num_blocks(q_len, slice_m)):
            rows = q[0, h, j * slice_m : (j + 1) * slice_m].double()
            norms = rows.norm(dim=1).mean()
            expected = rows.mean(0).norm() / norms if norms > 0 else 0.0
            assert abs(got[0, h, j].item() - float(expected)) < 1e-5, (h, j)


def test_adaptive_pooling_samples_the_incoherent_blocks_only():
    """pooling="adaptive": blocks below COHERENCE_CUT get the sampled rows' dilated scores, the
    others the mean rows' scores; each with its rows' LSE in the exact band; top-k of that."""
    q, incoherent = _blocks_of_two_kinds(300, 32, 64, 6)
    k = torch.randn(1, 2, 260, 32, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ref.adaptive_rows(q, 32, 64)[1], incoherent)
    scale = 1 / math.sqrt(32)
    mean, mean_lse = ref.raw_subblock_scores(q, k, 32, 64, scale, "mean")
    sample, sample_lse = ref.raw_subblock_scores(q, k, 32, 64, scale, "sample")
    got, got_lse = ref.raw_subblock_scores(q, k, 32, 64, scale, "adaptive")
    assert torch.equal(got, torch.where(incoherent.unsqueeze(-1), sample, mean))
    per_row = incoherent.repeat_interleave(2, 2)[:, :, : mean_lse.shape[2]]
    assert torch.equal(got_lse, torch.where(per_row, sample_lse, mean_lse))
    banded = ref.refine_band(got, q, k, got_lse, 32, 64, 64, scale)
    mask = predict_mask(q, k, 64, "topk", top_k=40, pool=32, pooling="adaptive")
    assert torch.equal(mask.to_dense(), ref.select(banded, "topk", k=40))


@given(st.integers(1, 9_000), st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_pooled_rows_lse_comes_from_a_strided_sample_of_long_rows(kv_len, seed):
    """sampled_lse: every key below LSE_STRIDE_MIN_KEYS, else every LSE_KEY_STRIDE-th key with
    the log of the keys per sampled key added; on rows whose mass is spread out (what a pooled
    row's scores are) the estimate stays near the exact LSE."""
    gen = torch.Generator().manual_seed(seed)
    rows, k = torch.randn(1, 2, 3, 16, generator=gen), torch.randn(1, 2, kv_len, 16, generator=gen)
    scale = 0.1  # logits of std 0.4: the estimate's error has a std under 0.03 (the bound is 5 of them)
    got = ref.sampled_lse(rows, k, scale)
    exact = ref.logits_and_lse(rows, k, scale)[1]
    if kv_len < ref.LSE_STRIDE_MIN_KEYS:
        assert ref.lse_key_stride(kv_len) == 1 and torch.equal(got, exact)
        return
    stride = ref.lse_key_stride(kv_len)
    assert stride == ref.LSE_KEY_STRIDE > 1
    sample = k[:, :, ::stride]
    expected = ref.logits_and_lse(rows, sample, scale)[1] + math.log(kv_len / sample.shape[2])
    torch.testing.assert_close(got, expected)
    assert (got - exact).abs().max().item() < 0.15


def test_default_prediction_of_long_rows_normalises_by_the_sampled_lse():
    """The pooled scores' rows (and the exact band's sub-block mass) use sampled_lse."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 1, 256, 32, generator=gen), torch.randn(1, 1, 5000, 32, generator=gen)
    scale = 1 / math.sqrt(32)
    scores, sub_lse = ref.raw_subblock_scores(q, k, 32, 128, scale, "mean")
    rows = ref.rounded(ref.pool_queries(q, 32), q.dtype)
    torch.testing.assert_close(sub_lse, ref.sampled_lse(rows, k, scale))
    torch.testing.assert_close(scores, ref.maxprob_scores(rows, k, sub_lse, 4, scale))


def test_a_nan_query_leaves_its_blocks_mask_to_the_other_queries():
    """The exact band ignores a NaN query, as the kernels' fmaxf does: its block keeps the keys
    its other 127 queries need."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 512, 64, generator=gen)
    q = (base * 2 + 0.3 * torch.randn(1, 1, 512, 64, generator=gen)).bfloat16()
    k = (base * 2).bfloat16()
    clean = predict_mask(q, k, 128, "topk", density=0.3)
    q[0, 0, 5, 0] = float("nan")
    with_nan = predict_mask(q, k, 128, "topk", density=0.3)
    assert torch.equal(with_nan.to_dense()[0, 0, 0], clean.to_dense()[0, 0, 0])


def test_the_op_called_directly_checks_its_tensors():
    """torch.ops.fgcupy.predict_mask may be named in a graph: q, k, the LSE and the candidates are
    checked there as predict_mask checks them (a one-head LSE was broadcast over two heads)."""
    import fgcupy  # noqa: F401 - registers the op
    from fgcupy.predict_op import request_token

    q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    colmax = request_token(make_request(64, 256, 128, "colmax", density=0.1))
    op = torch.ops.fgcupy.predict_mask
    lse = torch.zeros(1, 2, 256)
    with pytest.raises(ValueError, match=r"lse must be float32 \(1, 2, 256\)"):
        op(q, k, lse[:, :1], [], [], colmax, 25, -1.0, 0.125, 1 << 30)
    with pytest.raises(ValueError, match="needs lse"):
        op(q, k, None, [], [], colmax, 25, -1.0, 0.125, 1 << 30)
    with pytest.raises(ValueError, match="q and k must agree on B, H and D"):
        op(q, k[:, :1], lse, [], [], colmax, 25, -1.0, 0.125, 1 << 30)
    with pytest.raises(TypeError, match="floating"):
        op(q, k.to(torch.int32), lse, [], [], colmax, 25, -1.0, 0.125, 1 << 30)
    other = SliceMask.full(1, 1, 256, 256, 128)
    with pytest.raises(ValueError, match=r"candidates have \(B, H, q_len, kv_len, slice_m\)"):
        op(q, k, lse, [other.indptr], [other.indices], colmax, 25, -1.0, 0.125, 1 << 30)
    topk = request_token(make_request(64, 256, 128, "topk", density=0.1))
    with pytest.raises(ValueError, match="lse applies to method='colmax'"):
        op(q, k, lse, [], [], topk, 25, -1.0, 0.125, 1 << 30)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_non_finite_query_leaves_its_block_mask(bad):
    """An infinite query made its block's coherence NaN, the block fell to mean pooling and its
    mean turned infinite: 9 of 102 keys kept. Such a block is scored by its sub-blocks instead."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 1024, 64, generator=gen).half() for _ in range(2))
    clean = predict_mask(q, k, 128, "topk", density=0.1)
    q[0, 0, 5, 0] = bad
    dirty = predict_mask(q, k, 128, "topk", density=0.1)

    def block0(m):
        return set(m.indices[m.indptr[0, 0, 0]:m.indptr[0, 0, 1]].tolist())

    assert len(block0(dirty) & block0(clean)) >= 0.9 * len(block0(clean))
    assert not bool(ref.block_coherence(q, 128)[0, 0, 0] >= ref.COHERENCE_CUT)


# ---------------------------------------------------------------------------------------------
# option conflicts, the op called directly, the CPU op's precision
# ---------------------------------------------------------------------------------------------
def test_colmax_refuses_a_pool():
    q = torch.randn(1, 2, 128, 16, generator=torch.Generator().manual_seed(0))
    lse = torch.zeros(1, 2, 128)
    with pytest.raises(ValueError, match="pool applies to mean-query methods, not colmax"):
        predict_mask(q, q, 64, "colmax", lse=lse, density=0.1, pool=32)
    with pytest.raises(ValueError, match="pool applies to mean-query methods, not colmax"):
        make_request(16, 128, 64, "colmax", density=0.1, pool=16)


def test_the_op_called_directly_refuses_a_pooling_list_of_another_length():
    from fgcupy.predict_op import request_token  # registers the op

    q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    req = make_request(64, 256, 128, "topk", density=0.1)
    op = torch.ops.fgcupy.predict_mask
    for poolings in (("mean", "sample", "both"), ("mean", "sample", "mean")):
        token = request_token(req, (poolings, None))
        with pytest.raises(ValueError, match="a pooling per head needs 2 entries, got 3"):
            op(q, k, None, [], [], token, 25, -1.0, 0.125, 1 << 30)


def test_pooling_per_head_keeps_the_diagonals():
    """A pooling per head goes through the op's token: its diagonals must survive the trip."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 256, 32, generator=gen), torch.randn(1, 2, 512, 32, generator=gen)
    options = dict(top_k=48, exact_band=16, diagonals=[256])
    got = predict_mask(q, k, 64, "topk", pooling=["mean", "sample"], **options).to_dense()
    for h, pooling in enumerate(("mean", "sample")):
        alone = predict_mask(q[:, h : h + 1], k[:, h : h + 1], 64, "topk", pooling=pooling, **options)
        assert torch.equal(got[:, h : h + 1], alone.to_dense()), (h, pooling)


def test_a_union_top_k_prediction_compiles_with_fullgraph():
    """combine='union' keeps a data-dependent number of keys per block even under top-k: the
    op's fake implementation must not size it as a static top-k."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen) for _ in range(3))

    def step(q, k, v):
        mask = predict_mask(q, k, 64, "topk", density=0.2, pool=16, combine="union")
        return sparse_attention(q, k, v, mask), mask.indptr, mask.indices

    mask = predict_mask(q, k, 64, "topk", density=0.2, pool=16, combine="union")
    torch._dynamo.reset()
    out, indptr, indices = torch.compile(step, fullgraph=True)(q, k, v)
    assert torch.equal(indptr, mask.indptr) and torch.equal(indices, mask.indices)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask)[0])


def test_float64_attention_on_cpu_stays_float64():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 150, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = SliceMask.from_dense(torch.rand(1, 2, 3, 150, generator=gen) < 0.5, 64, 150)
    out, lse = sparse_attention(q, k, v, mask, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, mask, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=0, atol=1e-5)
