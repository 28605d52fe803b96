"""Mask-prediction kernels against the torch reference on fresh random inputs (GPU only)."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fgcupy
from fgcupy import MaskCache, SliceMask, gpu_prediction, mask_kernels, predict_mask, scoring
from fgcupy import mask_reference as ref
from fgcupy.jit import runtime as jit_runtime
from fgcupy.jit.score_spec import SelectSpec
from fgcupy.mask import num_blocks
from fgcupy.mask_request import e4m3_runs_for
from fgcupy.workloads import VideoShape, video_qkv

from .mask_checks import selection_cases, smallest_tau_set_ok, tau_rows_agree

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
#: Scoring kernels this GPU runs: the wgmma one only on Hopper.
SCORE_KERNELS = ["mma"] + (["wgmma"] if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
                           else [])


def _inputs(seed, batch, heads, q_len, kv_len, dim, dtype, layout="HND"):
    gen = torch.Generator().manual_seed(seed)

    def make(n):
        shape = (batch, heads, n, dim) if layout == "HND" else (batch, n, heads, dim)
        x = torch.randn(shape, generator=gen).to(DEVICE, dtype)
        return x if layout == "HND" else x.transpose(1, 2)  # [B, H, S, D] view of NHD storage

    return make(q_len), make(kv_len)


@st.composite
def score_problems(draw):
    size = st.one_of(st.integers(1, 200), st.integers(200, 1500))
    return dict(
        dtype=draw(st.sampled_from([torch.bfloat16, torch.float16])), dim=draw(st.sampled_from([64, 128])),
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), q_len=draw(size), kv_len=draw(size),
        pool=draw(st.sampled_from([1, 16, 64, 128])), layout=draw(st.sampled_from(["HND", "NHD"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Scores stored as bfloat16 from float32 sums in another order: one rounding step apart at most.
PROB_RTOL = 2**-7


def _close(got, expected, rtol, atol):
    err = (got - expected).abs()
    assert torch.isfinite(got).all()
    assert (err <= atol + rtol * expected.abs()).all(), f"max error {err.max().item():.3e}"


@given(score_problems())
@SETTINGS
def test_mean_query_logits_and_lse(p):
    q, k = _inputs(p["seed"], p["batch"], p["heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"], p["layout"])
    scale = 1 / math.sqrt(p["dim"])
    rows = ref.pool_queries(q, p["pool"]).to(p["dtype"]).contiguous()
    bh = p["batch"] * p["heads"]
    vals, lse = mask_kernels.gpu_scores("logits", rows, k, scale)
    exp_logits, exp_lse = ref.logits_and_lse(rows, k, scale)
    n_rows = rows.shape[2]
    assert vals.shape == (bh, n_rows, mask_kernels.row_stride(p["kv_len"]))
    _close(vals[..., : p["kv_len"]], exp_logits.reshape(bh, n_rows, -1), 1e-4, 1e-4)
    _close(lse, exp_lse.reshape(bh, n_rows), 1e-5, 1e-4)
    # Stored as float16: the float32 logits rounded (one float16 step of slack for the sum order).
    half, half_lse = mask_kernels.gpu_scores("logits_f16", rows, k, scale)
    assert half.dtype == torch.float16 and half.shape == (bh, n_rows, mask_kernels.row_stride(p["kv_len"], 2))
    _close(half[..., : p["kv_len"]].float(), exp_logits.reshape(bh, n_rows, -1), 2**-10, 2e-4)
    assert torch.equal(half_lse, lse)
    for kernel in SCORE_KERNELS:
        stats = mask_kernels.gpu_scores("stats", rows, k, scale, kernel=kernel)
        _close(stats, exp_lse.reshape(bh, n_rows), 1e-5, 1e-4)
        # A chunk of heads from the middle: the same rows.
        if bh > 1:
            part = mask_kernels.gpu_scores("stats", rows, k, scale, bh0=1, nbh=bh - 1, kernel=kernel)
            _close(part, exp_lse.reshape(bh, n_rows)[1:], 1e-5, 1e-4)


@given(score_problems(), st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]), st.sampled_from(SCORE_KERNELS))
@SETTINGS
def test_maxprob_scores(p, group, kernel):
    q, k = _inputs(p["seed"], p["batch"], p["heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"], p["layout"])
    scale = 1 / math.sqrt(p["dim"])
    rows = q if p["pool"] == 1 else ref.pool_queries(q, p["pool"]).to(p["dtype"]).contiguous()
    _, lse = ref.logits_and_lse(rows, k, scale)
    lse[..., ::7] = -math.inf  # rows without keys (an empty sparse row) contribute 0
    bh = p["batch"] * p["heads"]
    warps = 4 if group <= 64 else 8
    kernel = "mma" if group == 1 else kernel  # single rows: the mma.sync kernel only
    got = mask_kernels.gpu_scores("maxprob", rows, k, scale, lse=lse.reshape(bh, -1), group=group, warps=warps,
                                  kernel=kernel)
    expected = ref.maxprob_scores(rows, k, lse, group, scale)
    out_rows = num_blocks(rows.shape[2], group)
    assert got.dtype == ref.PROB_DTYPE and got.shape == (bh, out_rows, mask_kernels.row_stride(p["kv_len"], 2))
    _close(got[..., : p["kv_len"]].float(), expected.reshape(bh, out_rows, -1), PROB_RTOL, 1e-6)


@given(score_problems(), st.sampled_from([64, 128]), st.floats(0.0, 1.0), st.sampled_from(SCORE_KERNELS))
@SETTINGS
def test_candidate_colmax_scores_exactly_the_listed_keys(p, slice_m, density, kernel):
    """List mode: each block's listed keys get the exact column max (the sparse LSE given, rows
    without keys contributing 0), two candidate masks listing a key twice write the same score,
    and every other key keeps 0; a chunk of heads from the middle reads its own lists (wgmma:
    blocks of 128 only)."""
    kernel = "mma" if slice_m == 64 else kernel
    q, k = _inputs(p["seed"], p["batch"], p["heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"], p["layout"])
    scale = 1 / math.sqrt(p["dim"])
    batch, heads, q_len, kv_len = p["batch"], p["heads"], p["q_len"], p["kv_len"]
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    q_blocks = num_blocks(q_len, slice_m)
    masks = [SliceMask.from_dense((torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < d).to(DEVICE), slice_m,
                                  q_len) for d in (density, density / 2)]
    _, lse = ref.logits_and_lse(q, k, scale)
    lse[..., ::5] = -math.inf
    bh = batch * heads
    listed = masks[0].to_dense() | masks[1].to_dense()
    expected = ref.colmax_scores(q, k, lse, slice_m, scale).masked_fill(~listed, 0.0).reshape(bh, q_blocks, -1)
    ld = mask_kernels.row_stride(kv_len, 2)
    got = torch.zeros(bh, q_blocks, ld, dtype=ref.PROB_DTYPE, device=DEVICE)
    for mask in masks:
        mask_kernels.gpu_candidate_colmax(q, k, scale, lse.reshape(bh, -1), mask, got, kernel=kernel)
    _close(got[..., :kv_len].float(), expected, PROB_RTOL, 1e-6)
    assert not got[..., kv_len:].any()
    if bh > 1:
        part = torch.zeros(bh - 1, q_blocks, ld, dtype=ref.PROB_DTYPE, device=DEVICE)
        mask_kernels.gpu_candidate_colmax(q, k, scale, lse.reshape(bh, -1)[1:], masks[0], part, bh0=1, nbh=bh - 1,
                                          kernel=kernel)
        own = ref.colmax_scores(q, k, lse, slice_m, scale).masked_fill(~masks[0].to_dense(), 0.0)
        _close(part[..., :kv_len].float(), own.reshape(bh, q_blocks, -1)[1:], PROB_RTOL, 1e-6)


@pytest.mark.parametrize("kernel", SCORE_KERNELS)
def test_candidate_lists_with_keys_out_of_range_touch_nothing_else(kernel):
    """A corrupt list (keys past kv_len, negative keys) scores its valid keys exactly and neither
    reads nor writes out of bounds: the bad entries are skipped."""
    q, k = _inputs(3, 1, 2, 300, 500, 128, torch.bfloat16)
    scale = 1 / math.sqrt(128)
    valid = SliceMask.from_dense((torch.rand(1, 2, 3, 500, generator=torch.Generator().manual_seed(4)) < 0.3)
                                 .to(DEVICE), 128, 300)
    bad = valid.indices.clone()
    bad[::7] = 500 + torch.arange(bad[::7].numel(), device=DEVICE, dtype=torch.int32)
    bad[3::11] = -5
    corrupt = SliceMask(valid.indptr, bad, 128, 300, 500)
    _, lse = ref.logits_and_lse(q, k, scale)
    ld = mask_kernels.row_stride(500, 2)
    got = torch.zeros(2, 3, ld, dtype=ref.PROB_DTYPE, device=DEVICE)
    mask_kernels.gpu_candidate_colmax(q, k, scale, lse.reshape(2, -1), corrupt, got, kernel=kernel)
    listed = torch.zeros(1, 2, 3, 500, dtype=torch.bool, device=DEVICE)
    rows = torch.repeat_interleave(torch.arange(6, device=DEVICE), valid.row_lengths().reshape(-1).long())
    good = (bad >= 0) & (bad < 500)
    listed.view(6, 500)[rows[good], bad[good].long()] = True
    expected = ref.colmax_scores(q, k, lse, 128, scale).masked_fill(~listed, 0.0).reshape(2, 3, -1)
    _close(got[..., :500].float(), expected, PROB_RTOL, 1e-6)
    assert not got[..., 500:].any()


@pytest.mark.parametrize("shape", [(1, 2, 300, 400, 64, 64), (2, 3, 1000, 777, 128, 128), (1, 2, 5000, 5000, 128, 128)])
@pytest.mark.parametrize("rule", [dict(rule="topk", top_k=40), dict(rule="tau", tau=0.8, workspace_bytes=1)])
def test_candidate_colmax_prediction_matches_reference(shape, rule):
    """predict_mask(method="colmax", candidates=...) with the LSE of a sparse step over one
    candidate mask: the GPU pipeline selects what the reference selects, and only candidates."""
    batch, heads, q_len, kv_len, dim, slice_m = shape
    q, k = _inputs(5, batch, heads, q_len, kv_len, dim, torch.bfloat16)
    old = predict_mask(q, k, slice_m, "topk", top_k=60)
    new = predict_mask(q, k, slice_m, "topk", top_k=60, pool=slice_m, exact_band=None)
    _, lse = fgcupy.sparse_attention(q, k, k, old, return_lse=True)
    kw = dict(rule)
    workspace = kw.pop("workspace_bytes", scoring.DEFAULT_WORKSPACE)
    got = predict_mask(q, k, slice_m, "colmax", lse=lse, candidates=[old, new], workspace_bytes=workspace,
                       **kw).validate()
    req = scoring.make_request(dim, kv_len, slice_m, "colmax", **kw)
    expected = ref.predict_mask_reference(q, k, slice_m, "colmax", rule=req.rule, top_k=req.top_k, tau=req.tau,
                                          lse=lse, scale=req.scale,
                                          candidates=old.to_dense() | new.to_dense()).to_dense()
    assert (got.to_dense() != expected).sum().item() <= 5 + 0.002 * int(expected.sum())
    assert not (got.to_dense() & ~(old.to_dense() | new.to_dense())).any()


@given(score_problems(), st.sampled_from([64, 128]), st.sampled_from([0, 3, 64, 500, 5000]),
       st.sampled_from(SCORE_KERNELS))
@SETTINGS
def test_exact_band_scores(p, slice_m, band, kernel):
    """Pooled max-prob scores raised to the exact column maxima on each block's band, by the
    kernels "auto" picks on Hopper (wgmma) and elsewhere (mma.sync)."""
    q, k = _inputs(p["seed"], p["batch"], p["heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"], p["layout"])
    pool = min(p["pool"], slice_m)
    req = scoring.make_request(p["dim"], p["kv_len"], slice_m, "topk", top_k=1, pool=pool, exact_band=band)
    pred = gpu_prediction.GpuPrediction(q, k, req, None, scoring.DEFAULT_WORKSPACE)
    with mock.patch.object(jit_runtime, "is_hopper", lambda index: kernel == "wgmma"):
        got, _ = pred._scores(0, pred.bh)
    rows = ref.rounded(ref.pool_queries(q, pool), q.dtype)
    _, sub_lse = ref.logits_and_lse(rows, k, req.scale)
    expected = ref.refine_band(ref.maxprob_scores(rows, k, sub_lse, slice_m // pool, req.scale), q, k, sub_lse, pool,
                               slice_m, band, req.scale)
    bh = p["batch"] * p["heads"]
    _close(got[..., : p["kv_len"]].float(), expected.reshape(bh, got.shape[1], -1), PROB_RTOL, 1e-6)


@given(score_problems(), st.sampled_from([64, 128]), st.sampled_from([0, 3, 64]),
       st.lists(st.integers(-2000, 2000), max_size=3), st.sampled_from(SCORE_KERNELS))
@SETTINGS
def test_diagonal_bands_score_exactly(p, slice_m, band, diagonals, kernel):
    """The exact band moved by each diagonal (past either end of the keys too) raises the same
    scores as mask_reference's bands, on both kernels."""
    q, k = _inputs(p["seed"], p["batch"], p["heads"], p["q_len"], p["kv_len"], p["dim"], p["dtype"], p["layout"])
    pool = min(p["pool"], slice_m)
    req = scoring.make_request(p["dim"], p["kv_len"], slice_m, "topk", top_k=1, pool=pool, exact_band=band,
                               diagonals=diagonals)
    pred = gpu_prediction.GpuPrediction(q, k, req, None, scoring.DEFAULT_WORKSPACE)
    with mock.patch.object(jit_runtime, "is_hopper", lambda index: kernel == "wgmma"):
        got, _ = pred._scores(0, pred.bh)
    expected = ref.pooled_scores(q, k, pool, slice_m, band, req.scale, "mean", req.diagonals)
    bh = p["batch"] * p["heads"]
    _close(got[..., : p["kv_len"]].float(), expected.reshape(bh, got.shape[1], -1), PROB_RTOL, 1e-6)


@given(st.integers(1, 5), st.integers(1, 5000), st.sampled_from([0, 1, 2, 3, 4, 5, 8, 16, 32, 64, 100]),
       st.integers(0, 2**31 - 1))
@SETTINGS
def test_dilated_rows_match_the_reference(rows, kv_len, radius, seed):
    """fg::dilate_rows equals max_pool1d's sliding max on the keys (tile edges, short rows, the
    padding after kv_len left out); radii past the kernel's run on the reference."""
    values = _probabilities(rows, kv_len, seed)
    scores = _padded(values, ref.PROB_DTYPE)
    scores[..., kv_len:] = 2.0  # padding must not leak into the keys' maxima
    got = mask_kernels.gpu_dilate(scores, radius, kv_len)
    expected = ref.dilate_keys(values.to(DEVICE)[None], radius)
    assert got.dtype == ref.PROB_DTYPE and torch.equal(got[..., :kv_len].float(), expected)
    other = _padded(_probabilities(rows, kv_len, seed + 1), ref.PROB_DTYPE)
    mean = mask_kernels.gpu_dilate(scores, radius, kv_len, mul=other.clone())
    # sqrt in float32, rounded; a subnormal product is flushed to 0 by the kernel: sqrt of the
    # smallest normal is the slack.
    expected_mean = torch.sqrt(other[..., :kv_len].float() * expected)
    torch.testing.assert_close(mean[..., :kv_len].float(), expected_mean, rtol=PROB_RTOL, atol=2e-19)


@given(st.integers(1, 6), st.integers(1, 9000), st.sampled_from([0, 1, 3, 4, 16, 64, 100]), st.integers(0, 2**31 - 1))
@SETTINGS
def test_rows_dilated_in_place_match_the_reference(rows, kv_len, radius, seed):
    """fg::dilate_rows_in_place: flagged rows get max_pool1d's sliding max over their keys
    (across its tiles, in place), the other rows stay bit for bit; radii past the kernel's run
    on the reference."""
    values = _probabilities(rows, kv_len, seed)
    flags = torch.rand(rows, generator=torch.Generator().manual_seed(seed)) < 0.6
    scores = _padded(values, ref.PROB_DTYPE)
    scores[..., kv_len:] = 2.0  # padding must not leak into the keys' maxima
    before = scores.clone()
    got = mask_kernels.gpu_dilate_in_place(scores, radius, kv_len, flags.to(DEVICE))
    assert got is scores
    expected = ref.dilate_keys(values.to(DEVICE)[None], radius)
    flagged = flags.to(DEVICE)
    assert torch.equal(got[0, flagged, :kv_len].float(), expected[0, flagged])
    assert torch.equal(got[0, ~flagged], before[0, ~flagged])


def _probabilities(rows, kv_len, seed):
    """float32 [rows, kv_len] holding bfloat16 values like max-probability scores: a few large,
    no subnormals (the kernels flush them, -ftz=true)."""
    values = (torch.rand(rows, kv_len, generator=torch.Generator().manual_seed(seed)) ** 8).to(ref.PROB_DTYPE).float()
    values[values < torch.finfo(torch.float32).tiny] = 0.0
    return values


def _padded(values, dtype=torch.float32):
    rows, kv_len = values.shape
    ld = mask_kernels.row_stride(kv_len, torch.empty(0, dtype=dtype).element_size())
    buf = torch.full((1, rows, ld), math.nan, device=DEVICE, dtype=dtype)
    buf[0, :, :kv_len] = values.to(DEVICE, dtype)
    return buf


def _dense_from(counts, offsets, indices, kv_len):
    dense = torch.zeros(counts.numel(), kv_len, dtype=torch.bool, device=counts.device)
    rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts.long())
    first = torch.repeat_interleave(offsets.long(), counts.long())
    pos = torch.arange(rows.numel(), device=counts.device) - torch.repeat_interleave(
        torch.cumsum(counts.long(), 0) - counts.long(), counts.long()) + first
    keys = indices[pos].long()
    assert ((keys >= 0) & (keys < kv_len)).all()
    dense[rows, keys] = True
    assert int(dense.sum()) == rows.numel(), "duplicate keys in a row"
    return dense


@pytest.mark.parametrize("scores", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("staged", [True, False])
@given(case=selection_cases(max_kv=3000))
@SETTINGS
def test_selection_matches_reference(staged, scores, case):
    values, lse, rule, opts = case["values"], case["lse"], case["rule"], case["opts"]
    if scores == "float16":
        assume(lse is not None)  # float16 rows hold logits only
        values = values.half().float()  # the reference ranks the stored values
    if scores == "bfloat16":
        assume(lse is None)  # bfloat16 rows hold probabilities only
        values = values.bfloat16().float()
    rows, kv_len = values.shape
    local, slice_m = case["local"], case["slice_m"]
    kwargs = {"top_k": opts["k"]} if rule == "topk" else {rule: opts[rule]}
    req = scoring.make_request(64, kv_len, slice_m, "colmax", rule=rule, local=local, min_keys=opts["min_keys"],
                               max_keys=opts.get("max_keys"), **kwargs)
    buf = _padded(values, getattr(torch, scores))
    lse_d = None if lse is None else lse.to(DEVICE).reshape(1, rows)
    spec = SelectSpec(staged=staged and SelectSpec.fits(buf.shape[2]), scores=scores,
                      rule="topk" if rule == "topk" else "any")
    with mock.patch.object(mask_kernels, "select_spec", lambda device, ld, scores, rule: spec):
        counts, bits = mask_kernels.gpu_select(buf, kv_len, req, lse=lse_d, band=local, bits=True)
        assert bits.shape == (rows, mask_kernels.bit_words(kv_len))
        # The bitmask holds exactly the counted keys.
        recounted = torch.empty_like(counts)
        mask_kernels.gpu_emit(bits, kv_len, rows, 1, slice_m, recounted)
        assert torch.equal(recounted, counts)
        offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32)
        out = torch.full((max(int(counts.sum()), 1),), -1, dtype=torch.int32, device=DEVICE)
        mask_kernels.gpu_emit(bits, kv_len, rows, 1, slice_m, counts, offsets=offsets, out=out)
        got = _dense_from(counts, offsets, out, kv_len)
        # Fused emit (row sizes given) writes the same keys.
        fused = torch.full_like(out, -1)
        again = torch.empty_like(counts)
        mask_kernels.gpu_select(buf, kv_len, req, lse=lse_d, band=local, offsets=offsets, out=fused, counts=again)
    band = ref.band_mask(rows, kv_len, slice_m, local, DEVICE) if local is not None else None
    expected = ref.select(values.to(DEVICE), rule, lse=None if lse is None else lse.to(DEVICE), band=band,
                          k=req.top_k, tau=req.tau, threshold=req.threshold, min_keys=req.min_keys,
                          max_keys=req.max_keys)
    if rule == "tau":
        # Float32 sums on the GPU may move the cut by one key where the running mass meets
        # tau within rounding; anything else must match.
        assert tau_rows_agree(values, got, expected, req.tau, lse=lse, band=band).all()
    else:
        assert torch.equal(got, expected)
        assert torch.equal(again, counts) and torch.equal(fused, out)


MEAN = dict(pool=None, exact_band=None)  # one mean query per block, no exact band
CONFIGS = [
    dict(method="topk", density=0.1),  # the default: pooled sub-blocks and an exact band
    dict(method="tau", tau=0.8),
    dict(method="threshold", threshold=0.01, min_keys=3),
    dict(method="topk", density=0.1, **MEAN),
    dict(method="topk", density=0.1, logits_dtype=torch.float32, **MEAN),
    dict(method="tau", tau=0.8, logits_dtype=torch.float16, **MEAN),
    dict(method="topk", top_k=30, local=8, min_keys=5, workspace_bytes=1, **MEAN),
    dict(method="tau", tau=0.8, **MEAN),
    dict(method="tau", tau=0.5, max_keys=300, local=0, workspace_bytes=1, **MEAN),
    dict(method="threshold", threshold=0.01, min_keys=3, **MEAN),
    dict(method="threshold", threshold=0.01, logits_dtype=torch.float32, **MEAN),
    dict(method="topk", top_k=20, pool=16, combine="max", exact_band=None),
    dict(method="tau", tau=0.7, pool=32, combine="max", workspace_bytes=1, exact_band=None),
    dict(method="topk", top_k=10, pool=16, combine="union", local=4),
    dict(method="tau", tau=0.6, pool=16, combine="union", workspace_bytes=1),
    dict(method="colmax"),
    dict(method="colmax", rule="topk", top_k=40, local=2, workspace_bytes=1),
    dict(method="colmax", rule="tau", tau=0.9, max_keys=400),
    dict(method="topk", top_k=40, pool=16, exact_band=24),
    dict(method="topk", top_k=40, exact_band=0, workspace_bytes=1),
    dict(method="tau", tau=0.8, pool=32, exact_band=200),
    dict(method="threshold", threshold=0.01, pool=16, exact_band=1000, local=4),
    dict(method="topk", top_k=30, pool=32, pooling="sample", exact_band=None, workspace_bytes=1),
    dict(method="tau", tau=0.8, pool=16, pooling="sample", exact_band=None),
    dict(method="threshold", threshold=0.01, pool=8, pooling="sample", exact_band=24),
    dict(method="topk", top_k=40, pool=32, pooling="both"),
    dict(method="tau", tau=0.7, pool=16, pooling="both", exact_band=None, workspace_bytes=1),
    dict(method="topk", top_k=40, pool=32, pooling="adaptive"),
    dict(method="tau", tau=0.8, pool=16, pooling="adaptive", exact_band=None, workspace_bytes=1),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("shape", [(1, 2, 300, 400, 64, 64), (2, 3, 1000, 777, 128, 128)])
def test_predict_mask_matches_reference(config, shape):
    batch, heads, q_len, kv_len, dim, slice_m = shape
    q, k = _inputs(11, batch, heads, q_len, kv_len, dim, torch.bfloat16)
    kw = dict(config)
    workspace = kw.pop("workspace_bytes", scoring.DEFAULT_WORKSPACE)
    lse = ref.logits_and_lse(q, k, 1 / math.sqrt(dim))[1] if kw["method"] == "colmax" else None
    got = predict_mask(q, k, slice_m, lse=lse, workspace_bytes=workspace, **kw).validate()
    assert got.device.type == torch.device(DEVICE).type
    req = scoring.make_request(dim, kv_len, slice_m, **kw)
    expected = ref.predict_mask_reference(
        q, k, slice_m, req.method, rule=req.rule, top_k=req.top_k, tau=req.tau, threshold=req.threshold,
        pool=req.pool, combine=req.combine, min_keys=req.min_keys, max_keys=req.max_keys, local=req.local,
        lse=lse, scale=req.scale, logits_dtype=req.logits_dtype, exact_band=req.exact_band,
        pooling=req.pooling).to_dense()
    # Scores differ from the float32 reference only by summation order: a handful of slices at
    # the cut may flip.
    assert (got.to_dense() != expected).sum().item() <= 5 + 0.002 * int(expected.sum())
    if req.rule == "topk" and req.kind != "union":
        expected_lengths = scoring.static_row_counts(got.q_blocks, kv_len, req).to(DEVICE)
        assert (got.row_lengths().long() == expected_lengths).all()


@pytest.mark.parametrize("config", [
    dict(method="tau", tau=0.8),
    dict(method="threshold", threshold=0.01, min_keys=3),
    dict(method="tau", tau=0.6, pool=16, combine="union", local=4),
    dict(method="tau", tau=0.5, max_keys=300, local=0, pool=None, exact_band=None),
    dict(method="colmax", rule="threshold", threshold=0.002),
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_selections_written_chunk_by_chunk_equal_those_written_at_once(config):
    """Where every head's selection bitmasks outgrow the workspace, each chunk of heads is
    written out before the next is scored: the same mask, bit for bit, as one buffer for all."""
    q, k = _inputs(7, 2, 3, 1000, 1500, 128, torch.bfloat16)
    lse = ref.logits_and_lse(q, k, 1 / math.sqrt(128))[1] if config["method"] == "colmax" else None
    whole = predict_mask(q, k, 128, lse=lse, **config).validate()
    req = scoring.make_request(128, 1500, 128, **config)
    seen = []
    real = gpu_prediction.GpuPrediction._emit_each_chunk

    def spy(self):
        seen.append(self.chunk)
        return real(self)

    with mock.patch.object(gpu_prediction.GpuPrediction, "_emit_each_chunk", spy):
        assert predict_mask(q, k, 128, lse=lse, **config).validate().indices.numel() == whole.indices.numel()
        assert not seen  # the default workspace holds every bitmask
        chunked = predict_mask(q, k, 128, lse=lse, workspace_bytes=1, **config).validate()
    assert seen == [1]
    assert torch.equal(chunked.indptr, whole.indptr)
    kept = whole.row_lengths().sum().item()
    assert torch.equal(chunked.indices[:kept] if req.max_keys else chunked.indices, whole.indices[:kept])


@pytest.mark.parametrize("scores", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("kv_len", [3000, 32_760, 100_000])
def test_rows_of_few_distinct_scores_select_exactly(scores, kv_len):
    """Rows whose keys share a handful of values (flat attention stored in 16 bits): the cut
    falls inside thousands of exact ties, which are kept in index order, as the reference does
    (negative float16 logits too)."""
    gen = torch.Generator().manual_seed(kv_len)
    rows = 8
    levels = torch.randint(1, 6, (rows, kv_len), generator=gen).float()
    lse = None
    if scores == "float16":
        values = -levels  # negative logits: their order keys carry the bits float16 lacks as ones
        lse = torch.logsumexp(values, -1)
    else:
        values = (1 + levels / 64) / kv_len  # probabilities within a few bfloat16 steps of 1 / kv_len
        values = ref.stored_probs(values) if scores == "bfloat16" else values
    buf = _padded(values, getattr(torch, scores))
    for rule, kw in (("topk", dict(top_k=kv_len // 10)), ("topk", dict(top_k=kv_len // 2)),
                     ("threshold", dict(threshold=1.03 / kv_len if lse is None else 0.5 / kv_len))):
        req = scoring.make_request(64, kv_len, 1, "colmax", rule=rule, **kw)
        counts, bits = mask_kernels.gpu_select(buf, kv_len, req, lse=None if lse is None else lse.to(DEVICE)[None],
                                               bits=True)
        got = ((bits.unsqueeze(-1) >> torch.arange(32, device=DEVICE)) & 1).bool().reshape(rows, -1)[:, :kv_len]
        expected = ref.select(values.to(DEVICE), rule, lse=None if lse is None else lse.to(DEVICE), k=req.top_k,
                              threshold=req.threshold)
        assert torch.equal(got, expected), (rule, kw)
        assert torch.equal(counts.long(), expected.sum(-1))


@pytest.mark.parametrize("kv_len", [75_600, 100_000])
def test_long_rows_select_correctly(kv_len):
    """Rows past sm_80's staging limit: staged in the larger shared memory where the GPU grants
    it (Hopper, up to 81,920 keys), else read from global memory."""
    q, k = _inputs(3, 1, 1, 200, kv_len, 64, torch.float16)
    ld = mask_kernels.row_stride(kv_len)
    assert not SelectSpec.fits(ld)
    spec = mask_kernels.select_spec(q.device, ld, "float32", "tau")
    optin = mask_kernels._smem_optin(q.device.index or 0)
    assert spec.staged == (kv_len <= 81_920 and optin >= mask_kernels.SELECT_LARGE_SMEM + 1024)
    got = predict_mask(q, k, 64, "tau", tau=0.9, **MEAN).validate().to_dense()
    rows = ref.rounded(ref.pool_queries(q, 64), torch.float16)
    logits, lse = ref.logits_and_lse(rows, k, 1 / 8)
    stored = ref.rounded(logits, torch.float16)  # the default logits_dtype
    assert smallest_tau_set_ok(stored, got, 0.9, lse=lse).all()
    # The default predictor's bfloat16 max-probability rows, staged or not alike.
    got = predict_mask(q, k, 64, "topk", density=0.1).validate().to_dense()
    expected = gpu_prediction.predict_reference(q, k, scoring.make_request(64, kv_len, 64, "topk", density=0.1),
                                         None).to_dense()
    assert (got != expected).sum().item() <= 5 + 0.002 * int(expected.sum())


def test_topk_prediction_never_synchronises():
    q, k = _inputs(4, 1, 4, 2048, 2048, 128, torch.bfloat16)
    predict_mask(q, k, 128, "topk", density=0.1, local=128)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = predict_mask(q, k, 128, "topk", density=0.1, local=128)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    mask.validate()
    assert mask.row_lengths().min().item() >= round(0.1 * 2048)


def test_runs_on_torch_current_stream():
    q_real, k = _inputs(5, 1, 2, 1000, 1000, 64, torch.bfloat16)
    expected = predict_mask(q_real, k, 64, "topk", density=0.2).to_dense()
    q = torch.zeros_like(q_real)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        q.copy_(q_real)
        mask = predict_mask(q, k, 64, "topk", density=0.2)
    side.synchronize()
    assert torch.equal(mask.to_dense(), expected)


def test_video_workload_on_the_gpu_is_seeded_and_light():
    shape = VideoShape("wan-slice", 1, 4, 128, (21, 30, 52))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    q, k, v = video_qkv(shape, "mixed", seed=2, device=DEVICE)
    outputs = 3 * q.numel() * q.element_size()
    assert q.device.type == "cuda" and q.dtype == torch.bfloat16 and q.shape == (1, 4, 32_760, 128)
    # Beyond its outputs, generation holds a few float32 [S, D] buffers, whatever the head count.
    assert torch.cuda.max_memory_allocated() - before < outputs + 16 * 32_760 * 128 * 4
    again = video_qkv(shape, "mixed", seed=2, device=DEVICE, head_ids=[3])
    assert torch.equal(again[0][:, 0], q[:, 3])


def test_mask_cache_on_the_gpu():
    q, k = _inputs(6, 1, 2, 700, 900, 64, torch.bfloat16)
    for storage in ("index", "bits"):
        cache = MaskCache(warmup=1, refresh_every=2, storage=storage, method="tau", slice_m=64, tau=0.9)
        assert cache.mask_for("l", 0, q, k) is None
        fresh = cache.mask_for("l", 1, q, k)
        reused = cache.mask_for("l", 2, q, k)
        assert isinstance(reused, SliceMask) and reused.device.type == torch.device(DEVICE).type
        assert torch.equal(reused.validate().to_dense(), fresh.to_dense())


def test_pooling_per_head_on_the_gpu():
    """pooling=[...] on CUDA: each head's mask is its own pooling's prediction (the groups are
    predicted apart and joined back in head order)."""
    q, k = _inputs(11, 1, 4, 700, 900, 128, torch.bfloat16)
    poolings = ["both", "mean", "both", "sample"]
    got = predict_mask(q, k, 128, "topk", density=0.1, pooling=poolings).validate().to_dense()
    for h, pooling in enumerate(poolings):
        alone = predict_mask(q[:, h : h + 1], k[:, h : h + 1], 128, "topk", density=0.1, pooling=pooling)
        assert torch.equal(got[:, h : h + 1], alone.to_dense()), (h, pooling)


@pytest.mark.parametrize("kv_len", [777, 5000])
@pytest.mark.parametrize("slice_m, pool, kernel", [(64, 16, "mma"), (128, 32, "mma"), (128, 32, "wgmma")])
def test_adaptive_pooling_on_blocks_of_both_kinds(slice_m, pool, kernel, kv_len):
    """pooling="adaptive" on CUDA, where some blocks are coherent (one shared direction) and
    the others noise: the same blocks are sampled as in the reference, and the scores (sampled
    rows dilated in place, the band on each block's own rows' LSE) match it; past
    ref.LSE_STRIDE_MIN_KEYS keys the rows' LSE comes from a strided sample of the keys."""
    if kernel not in SCORE_KERNELS:
        pytest.skip("the wgmma scoring kernel needs an sm_90 GPU")
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(1, 3, 1000, 128, generator=gen)
    coherent = (torch.arange(1000) // slice_m) % 3 == 0
    q[:, :, coherent] = 0.2 * q[:, :, coherent] + torch.randn(1, 3, 1, 128, generator=gen)
    q = q.to(DEVICE, torch.bfloat16)
    k = torch.randn(1, 3, kv_len, 128, generator=gen).to(DEVICE, torch.bfloat16)
    sampled = ref.adaptive_rows(q, pool, slice_m)[1]
    assert sampled.any() and not sampled.all()
    req = scoring.make_request(128, kv_len, slice_m, "topk", top_k=50, pool=pool, pooling="adaptive")
    pred = gpu_prediction.GpuPrediction(q, k, req, None, scoring.DEFAULT_WORKSPACE)
    assert torch.equal(pred.sampled, sampled.reshape(-1))
    with mock.patch.object(jit_runtime, "is_hopper", lambda index: kernel == "wgmma"):
        got, _ = pred._scores(0, pred.bh)
    expected = ref.pooled_scores(q, k, pool, slice_m, req.exact_band, req.scale, "adaptive")
    _close(got[..., :kv_len].float(), expected.reshape(3, got.shape[1], -1), PROB_RTOL, 1e-6)
    mask = predict_mask(q, k, slice_m, "topk", top_k=50, pool=pool, pooling="adaptive").validate()
    reference = ref.select(expected, "topk", k=50)
    assert (mask.to_dense() != reference).sum().item() <= 5 + 0.002 * int(reference.sum())


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 700), st.sampled_from([(64, 16), (128, 32), (128, 16), (64, 8)]),
       st.sampled_from([64, 128, 256]), st.sampled_from([torch.bfloat16, torch.float16]), st.sampled_from(["HND", "NHD"]),
       st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
@SETTINGS
def test_adaptive_rows_match_the_reference(batch, heads, q_len, blocks, dim, dtype, layout, share, seed):
    """fg::adaptive_rows: the sampled blocks and each sub-block's row (middle or mean query) of
    mask_reference.adaptive_rows, both layouts and dtypes, short last blocks and sub-blocks;
    ``share`` of a common direction makes blocks of either kind."""
    slice_m, pool = blocks
    q, _ = _inputs(seed, batch, heads, q_len, 1, dim, dtype, layout)
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(batch, heads, 1, dim, generator=gen).to(DEVICE)
    q = ((1 - share) * q.float() + share * 3 * common).to(dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2) if layout == "NHD" else q
    rows, sampled = mask_kernels.gpu_adaptive_rows(q, pool, slice_m)
    expected_rows, expected_sampled = ref.adaptive_rows(q, pool, slice_m)
    assert mask_kernels.gpu_adaptive_rows(q, 2, slice_m) is None  # sub-blocks of 2: the torch path
    coherence = ref.block_coherence(q, slice_m)
    near_cut = (coherence - ref.COHERENCE_CUT).abs() < 1e-4  # float sums in another order may go either way
    assert torch.equal(sampled | near_cut, expected_sampled | near_cut)
    per_row = near_cut.repeat_interleave(slice_m // pool, 2)[:, :, : rows.shape[2]]
    # Means: float32 sums in another order, rounded: one 16-bit step apart at most.
    torch.testing.assert_close(rows[~per_row].float(), expected_rows[~per_row].float(), rtol=2**-7, atol=1e-3)
    middles = sampled.repeat_interleave(slice_m // pool, 2)[:, :, : rows.shape[2]] & ~per_row
    assert torch.equal(rows[middles], expected_rows[middles])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_adaptive_rows_sample_a_block_with_a_non_finite_query(bad):
    """A NaN or infinite query makes its block sampled in the kernel as in the reference, so the
    block's other sub-blocks keep rows of their own (an infinite mean would spoil them)."""
    gen = torch.Generator().manual_seed(3)
    common = torch.randn(1, 2, 1, 128, generator=gen)
    q = (0.2 * torch.randn(1, 2, 512, 128, generator=gen) + common).to(DEVICE, torch.bfloat16)  # coherent
    q[0, 1, 130, 7] = bad
    rows, sampled = mask_kernels.gpu_adaptive_rows(q, 32, 128)
    expected_rows, expected_sampled = ref.adaptive_rows(q, 32, 128)
    assert torch.equal(sampled, expected_sampled)
    assert sampled[0, 1].tolist() == [False, True, False, False] and not sampled[0, 0].any()
    torch.testing.assert_close(rows.float(), expected_rows.float(), rtol=2**-7, atol=1e-3, equal_nan=True)


@pytest.mark.parametrize("slice_m", [64, 128])
@pytest.mark.parametrize("rule, option", [("topk", dict(density=0.1)), ("tau", dict(tau=0.9)),
                                          ("threshold", dict(threshold=1e-3))])
def test_colmax_kernels_are_those_an_exact_prediction_launches(slice_m, rule, option):
    """colmax_kernels (loaded ahead of a dense step whose LSE an exact prediction waits for) names
    each kernel that prediction launches but the emit of top-k, which it fuses."""
    from fgcupy import gpu_prediction
    from fgcupy.oracle import exact_lse

    q, k = _inputs(12, 1, 2, 1000, 1200, 128, torch.bfloat16)
    lse = exact_lse(q, k)
    launched = []
    real_launch = mask_kernels.launch

    def recording_launch(spec, *args, **kw):
        launched.append(spec)
        return real_launch(spec, *args, **kw)

    with mock.patch.object(gpu_prediction, "load_in_background", lambda device, spec: None), \
            mock.patch.object(mask_kernels, "launch", recording_launch):
        predict_mask(q, k, slice_m, "colmax", lse=lse, rule=rule, **option).validate()
    ahead = gpu_prediction.colmax_kernels("bfloat16", 128, slice_m, k.shape[2], rule, q.device)
    assert ahead and set(ahead) == set(launched), (ahead, launched)


@pytest.mark.parametrize("kwargs", [
    dict(density=0.1),
    dict(density=0.1, pooling="both"),
    dict(density=0.1, pooling="sample", pool=16),
    dict(method="tau", tau=0.9),
    dict(method="tau", tau=0.9, pool=32, combine="union", exact_band=None),
    dict(method="threshold", threshold=1e-3, exact_band=None, pool=None),
])
def test_kernels_loaded_ahead_are_launched(kwargs):
    """A prediction starts loading its later passes' kernels, and the attention kernels its mask
    most likely meets, on threads as it begins; each must be one that the prediction and a
    one-shot attention over its mask launch (a wrong guess compiles a kernel for nothing), or
    the next attention once a Hopper kernel its stand-in ran for is compiled."""
    from fgcupy import attention_kernel, gpu_prediction
    from fgcupy.jit import runtime

    q, k = _inputs(11, 1, 2, 1000, 1200, 128, torch.bfloat16)
    ahead, launched = [], []
    real_launch = mask_kernels.launch

    def recording_launch(spec, *args, **kw):
        launched.append(spec)
        return real_launch(spec, *args, **kw)

    with mock.patch.object(gpu_prediction, "load_in_background", lambda device, spec: ahead.append(spec)), \
            mock.patch.object(mask_kernels, "launch", recording_launch), \
            mock.patch.object(attention_kernel, "launch", recording_launch):
        method = kwargs.pop("method", "topk")
        mask = predict_mask(q, k, 128, method, **kwargs).validate()
        fgcupy.sparse_attention(q, k, k, mask)
        runtime.wait_for_background()
        fgcupy.sparse_attention(q, k, k, mask)
    assert ahead and set(ahead) <= set(launched), (ahead, launched)


def test_tau_on_a_long_row_of_alike_keys_keeps_its_mass():
    """300,000 keys of one logit: the fixed-point mass of one bin passes 2^32 in its low word,
    which must carry (it wrapped, and tau = 0.9 kept 78.7 % of the mass)."""
    kv_len = 300_000
    q = torch.zeros(1, 1, 128, 64, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 1, kv_len, 64, dtype=torch.bfloat16, device="cuda")
    mask = predict_mask(q, k, 128, method="tau", tau=0.9, pool=None, exact_band=None)
    kept = int(mask.row_lengths().max())
    # "Reaches tau" allows the kernel's relative float32 slack (kTauSlack, 1e-5) and a key of rounding.
    assert 0.9 * kv_len * (1 - 1e-5) - 1 <= kept <= 0.9 * kv_len + 2, kept


def test_adaptive_rows_of_sub_blocks_not_a_multiple_of_four_come_from_torch():
    """The kernel's warps take four queries at a time within one sub-block: pools of 6 (or blocks
    not a multiple of 32 queries) go to the torch reference, which pools them right."""
    q = torch.randn(1, 2, 480, 64, dtype=torch.bfloat16, device="cuda")
    assert mask_kernels.gpu_adaptive_rows(q, 6, 48) is None
    assert mask_kernels.gpu_adaptive_rows(q, 8, 48) is None
    assert mask_kernels.gpu_adaptive_rows(q, 8, 64) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_nan_key_or_query_adds_nothing_to_the_kernels_prediction(dtype):
    """The kernels' normalisers leave NaN products out, as the reference's do (a NaN key had made
    every row's normaliser NaN, so its head's masks came out empty or in index order)."""
    from .test_untrusted_inputs import assert_nan_adds_nothing

    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 512, 64, generator=gen).to("cuda", dtype) for _ in range(2))
    assert_nan_adds_nothing(q, k, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_estimated_lse_and_its_column_max_on_the_gpu(dtype):
    """lse="estimate" on CUDA: the estimate agrees with the CPU's on the same inputs, the
    prediction is the column max of that estimate, and it stays near the oracle on sharp heads."""
    from fgcupy.head_families import family_qkv, family_shape
    from fgcupy.lse_estimate import estimate_lse
    from fgcupy.oracle import Judge

    shape = family_shape("wan14b-480p", grid=(3, 16, 24))
    q, k, v = family_qkv(shape, "gauss-sharp", heads=2, dtype=dtype)
    got = estimate_lse(q.to(DEVICE), k.to(DEVICE), 128, workspace_bytes=1 << 20)
    torch.testing.assert_close(got.cpu(), estimate_lse(q, k, 128), rtol=0, atol=2e-4)
    # the band on the stats kernel: 64-query blocks, NHD views, fewer keys than queries, a NaN
    # query, a block of NaN queries (its estimate -inf) and a query with an infinite entry (+inf)
    qn = q.clone()
    qn[0, 1, 70] = float("nan")
    qn[0, 0, :64] = float("nan")
    qn[0, 0, 200, 3] = float("inf")
    for slice_m, keys in ((64, 1152), (128, 500), (64, 300)):
        on_gpu = estimate_lse(qn.transpose(1, 2).to(DEVICE), k[:, :, :keys].transpose(1, 2).to(DEVICE), slice_m,
                              layout="NHD")
        torch.testing.assert_close(on_gpu.cpu(), estimate_lse(qn, k[:, :, :keys], slice_m), rtol=0, atol=2e-4)
    qd, kd = q.to(DEVICE), k.to(DEVICE)
    mask = predict_mask(qd, kd, 128, "colmax", density=0.1, lse="estimate")
    # with the estimate, the products are e4m3 where that kernel runs (fgcupy.e4m3)
    products = "e4m3" if e4m3_runs_for(qd) else "input"
    same = predict_mask(qd, kd, 128, "colmax", density=0.1, lse=got, products=products)
    assert torch.equal(mask.indptr, same.indptr) and torch.equal(mask.indices, same.indices)
    _, ratio = Judge(q.float(), k.float(), v.float()).ratio(mask.to("cpu"))
    assert ratio < 1.45


@pytest.mark.parametrize("slice_m, band", [(128, 64), (64, 37)])
def test_estimated_lse_samples_long_key_sets_on_the_gpu(slice_m, band):
    """Past lse_key_stride's length the stats kernel samples the keys and skips each block's
    band keys in the sample: the same estimate as the CPU's direct sample outside the band, on
    sharp heads (whose band holds nearly all the mass) and broad ones."""
    from fgcupy.lse_estimate import estimate_lse

    gen = torch.Generator().manual_seed(slice_m + band)
    for std in (1.0, 8.0):
        q, k = (torch.randn(1, 3, n, 64, generator=gen) * std ** 0.5 for n in (1000, 4700))
        q[0, 1, 5:20] = k[0, 1, 5:20] * 3  # queries that find their own key sharply, inside the band
        q, k = q.bfloat16(), k.bfloat16()
        got = estimate_lse(q.to(DEVICE), k.to(DEVICE), slice_m, band=band)
        # LSEs up to ~200 here: the kernel's float32 sums and approximate exp2 agree to ~1e-5 of that
        torch.testing.assert_close(got.cpu(), estimate_lse(q, k, slice_m, band=band), rtol=1e-5, atol=1e-3)
