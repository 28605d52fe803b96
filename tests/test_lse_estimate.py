"""The LSE estimate for a column max without a dense step (CPU): float64 reference, the
prediction through it, its quality against the oracle, and its errors."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import mask_reference as ref
from fgcupy import predict_mask
from fgcupy.head_families import family_qkv, family_shape
from fgcupy.lse_estimate import band_lse, estimate_lse, sample_positions
from fgcupy.oracle import Judge
from fgcupy.workloads import video_qkv


def brute_force_lse(q, k, slice_m, band, scale):
    """float64 [B, H, q_len]: logaddexp of each query's LSE over its block's band and its LSE
    over the sampled keys (sample_positions) outside the band, scaled to all keys; NaN logits
    add no mass."""
    q64, k64 = q.double(), k.double()
    logits = (q64 @ k64.transpose(-1, -2) * scale).nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    q_len, kv_len = q.shape[2], k.shape[2]
    sampled = torch.zeros(kv_len, dtype=torch.bool)
    sampled[sample_positions(kv_len)] = True
    log_factor = math.log(kv_len / int(sampled.sum())) if kv_len else 0.0
    out = torch.empty(q.shape[:3], dtype=torch.float64)
    for j in range(-(-q_len // slice_m)):
        q0, q1 = j * slice_m, min(q_len, (j + 1) * slice_m)
        lo, hi = ref.band_bounds(j, slice_m, band, kv_len)
        in_band = torch.zeros(kv_len, dtype=torch.bool)
        in_band[lo:hi] = True
        near = torch.logsumexp(logits[:, :, q0:q1].masked_fill(~in_band, -math.inf), -1)
        far = torch.logsumexp(logits[:, :, q0:q1].masked_fill(in_band | ~sampled, -math.inf), -1) + log_factor
        out[:, :, q0:q1] = torch.logaddexp(near, far)
    return out


@given(seed=st.integers(0, 2**16), q_len=st.integers(1, 300), kv_len=st.integers(1, 300),
       slice_m=st.sampled_from([16, 64, 128]), band=st.integers(0, 80), bad=st.sampled_from([None, "nan q", "nan k", "inf q", "inf k"]),
       layout=st.sampled_from(["HND", "NHD"]))
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_estimate_matches_the_float64_reference(seed, q_len, kv_len, slice_m, band, bad, layout):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 3, q_len, 32, generator=gen), torch.randn(2, 3, kv_len, 32, generator=gen)
    if bad:  # one query or key with a NaN or infinite entry: left out of means, NaN logits add no mass
        value, which = bad.split()
        t = q if which == "q" else k
        t[1, 2, int(torch.randint(0, t.shape[2], (), generator=gen)), 3] = math.nan if value == "nan" else math.inf
    scale = 0.3
    expected = brute_force_lse(q, k, slice_m, band, scale)
    views = (q, k) if layout == "HND" else (q.transpose(1, 2), k.transpose(1, 2))
    got = estimate_lse(*views, slice_m, band=band, scale=scale, layout=layout, workspace_bytes=1 + seed % 50_000)
    assert got.dtype == torch.float32 and got.shape == (2, 3, q_len)
    assert got.isnan().sum() == expected.isnan().sum() and (got.isnan() == expected.isnan()).all()
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4, equal_nan=True)
    if bad is None or bad.endswith("q"):  # one bad query spoils no other query's estimate
        assert torch.isfinite(got).sum() >= got.numel() - 1


@pytest.mark.parametrize("q_len, kv_len, slice_m, band", [(300, 4100, 64, 64), (260, 4500, 128, 37)])
def test_estimate_samples_long_key_sets_outside_the_band(q_len, kv_len, slice_m, band):
    """From LSE_STRIDE_MIN_KEYS keys on, the keys outside each band are sampled, one in every
    few, and scaled; the band's own sampled keys are not counted twice."""
    gen = torch.Generator().manual_seed(kv_len)
    q, k = torch.randn(1, 2, q_len, 16, generator=gen), torch.randn(1, 2, kv_len, 16, generator=gen)
    assert ref.lse_key_stride(kv_len) > 1
    got = estimate_lse(q, k, slice_m, band=band, scale=0.4, workspace_bytes=200_000)
    torch.testing.assert_close(got.double(), brute_force_lse(q, k, slice_m, band, 0.4), rtol=0, atol=1e-4)


@given(st.integers(1, 20_000))
@settings(max_examples=30, deadline=None)
def test_the_sample_takes_one_key_per_run_at_a_hashed_place(kv_len):
    positions, stride = sample_positions(kv_len), ref.lse_key_stride(kv_len)
    assert len(positions) == -(-kv_len // stride) and positions[-1] < kv_len
    assert (positions // stride == torch.arange(len(positions))).all()  # one per run, ascending
    if stride > 1:  # no grid period lines up: a frame's first run (1560 keys: a multiple of 8) moves
        for period in (1560, 3120):
            starts = positions[positions % period < stride]
            assert len(set((starts % stride).tolist())) > 1, period


def _hashed_place(run: int, stride: int) -> int:
    """The place in its run of the key that sample_positions takes, in Python integers."""
    mixed = run * 2654435761 % (1 << 32)
    mixed ^= mixed >> 16
    mixed = mixed * 0x45D9F3B % (1 << 32)
    return (mixed ^ (mixed >> 16)) % stride


@pytest.mark.parametrize("kv_len", [4096, 32_760, 118_800, 8 * 3_390_000 + 3])
def test_the_sample_is_the_integer_hash_at_every_length_it_takes(kv_len):
    """The first product is taken in float64 (so that inductor's int32 index arithmetic never
    meets the multiplier): exact up to 3.39 million runs, the last included."""
    positions, stride = sample_positions(kv_len), ref.lse_key_stride(kv_len)
    runs = sorted({0, 1, 2, 3, len(positions) - 2, len(positions) - 1}
                  | set(torch.randint(0, len(positions), (200,), generator=torch.Generator().manual_seed(0)).tolist()))
    for run in runs:
        assert positions[run] == min(kv_len - 1, run * stride + _hashed_place(run, stride)), run
        assert torch.bincount(positions % stride).min() > len(positions) / stride / 2


def test_prediction_with_the_estimate_is_the_colmax_of_that_lse():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 500, 64, generator=gen), torch.randn(1, 2, 700, 64, generator=gen)
    lse = estimate_lse(q, k, 64, scale=0.2)
    for kw in (dict(density=0.2), dict(threshold=0.01), dict(rule="tau", tau=0.8)):
        got = predict_mask(q, k, 64, "colmax", lse="estimate", scale=0.2, **kw)
        expected = predict_mask(q, k, 64, "colmax", lse=lse, scale=0.2, **kw)
        assert torch.equal(got.indptr, expected.indptr) and torch.equal(got.indices, expected.indices)


@pytest.mark.parametrize("family", ["gauss-sharp", "mixture", "window2d", "workload-spatial"])
def test_the_estimated_column_max_is_near_the_oracle_where_the_cheap_top_k_is_not(family):
    """Without a dense step the estimated column max stays near the oracle on heads built to
    break cheap predictors (the cheap top-k misses sharp Gaussians by an order of magnitude here)."""
    shape = family_shape("wan14b-480p", grid=(3, 16, 24))
    if family.startswith("workload-"):
        q, k, v = video_qkv(shape, family[len("workload-"):], head_ids=range(2))
    else:
        q, k, v = family_qkv(shape, family, heads=2)
    judge = Judge(q, k, v)
    for density in (0.1, 0.3):
        _, estimated = judge.ratio(predict_mask(q, k, 128, "colmax", lse="estimate", density=density))
        assert estimated < 1.45, (density, estimated)
    if family == "gauss-sharp":
        _, cheap = judge.ratio(predict_mask(q, k, 128, "topk", density=0.3))
        assert cheap > 3 * estimated


def test_estimate_errors():
    q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 50, 16)
    for kwargs, message in ((dict(slice_m=0), "slice_m must be a positive int"),
                            (dict(slice_m=True), "slice_m must be a positive int"),
                            (dict(band=-1), "band must be a non-negative int"),
                            (dict(scale=0.0), "scale must be a positive finite"),
                            (dict(scale=math.inf), "scale must be a positive finite"),
                            (dict(workspace_bytes=math.inf), "workspace_bytes"),
                            (dict(workspace_bytes=-1), "workspace_bytes")):
        with pytest.raises(ValueError, match=message):
            estimate_lse(q, k, **kwargs)
    with pytest.raises(ValueError, match="agree on B, H and D"):
        estimate_lse(q, torch.randn(1, 3, 50, 16))
    with pytest.raises(ValueError, match='or "estimate"'):
        predict_mask(q, k, 16, "colmax", lse="dense")
    with pytest.raises(ValueError, match='"estimate" where none ran'):
        predict_mask(q, k, 16, "colmax")
    with pytest.raises(ValueError, match="lse applies to method='colmax'"):
        predict_mask(q, k, 16, "topk", density=0.1, lse="estimate")
    assert predict_mask(q[:, :0], k[:, :0], 16, "colmax", lse="estimate", density=0.5).indices.numel() == 0


def test_band_lse_is_minus_infinity_where_a_block_has_no_band_keys():
    q, k = torch.randn(2, 300, 8), torch.randn(2, 10, 8)
    near = band_lse(q, k, 128, 0, 0.3)
    assert torch.isfinite(near[:, :10]).all() and torch.isneginf(near[:, 128:]).all()
    expected = torch.logsumexp(q[:, :128] @ k.transpose(-1, -2) * 0.3, -1)
    torch.testing.assert_close(near[:, :128], expected)


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_estimated_prediction_compiles_with_fullgraph(dynamic):
    """The estimate is plain torch inside predict_mask: one graph, with a ragged last block and
    with symbolic shapes (the default scale then comes from a symbolic head dim)."""
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 300, 32, generator=gen), torch.randn(1, 2, 270, 32, generator=gen)

    def step(q, k):
        mask = predict_mask(q, k, 64, "colmax", density=0.2, lse="estimate")
        return mask.indptr, mask.indices

    expected = step(q, k)
    torch._dynamo.reset()
    indptr, indices = torch.compile(step, fullgraph=True, dynamic=dynamic)(q, k)
    assert torch.equal(indptr, expected[0]) and torch.equal(indices, expected[1])


def _stats_reference(slice_m, scale):
    """The stats kernel's contract in torch: each row's LSE over its keys, or over its query
    block's band of them (keys [tile * slice_m + lo, + width) clipped), less the keys its block's
    skip range holds; NaN logits propagate."""

    def stats(rows, keys, bh0, nbh, band_keys, skip):
        r = rows.flatten(0, 1)[bh0 : bh0 + nbh].double()
        k = keys.flatten(0, 1)[bh0 : bh0 + nbh].double()
        logits = r @ k.transpose(-1, -2) * scale
        cols = torch.arange(k.shape[1])
        if band_keys is not None:
            lo, width = band_keys
            tile_start = torch.arange(r.shape[1]) // slice_m * slice_m + lo
            inside = (cols >= tile_start.unsqueeze(1)) & (cols < tile_start.unsqueeze(1) + width)
            logits = logits.masked_fill(~inside, -math.inf)
        if skip is not None:
            ranges, block = skip
            row_range = ranges.long()[torch.arange(r.shape[1]) // block]
            skipped = (cols >= row_range[:, :1]) & (cols < row_range[:, 1:])
            logits = logits.masked_fill(skipped, -math.inf)
        return torch.logsumexp(logits, -1).float()

    return stats


@pytest.mark.parametrize("slice_m, band, kv_len", [(64, 64, 4500), (128, 37, 4100), (128, 64, 900)])
def test_the_kernel_paths_parts_give_the_torch_paths_estimate(slice_m, band, kv_len):
    """The GPU composition (band and sampled keys on the stats kernel, each block's band keys
    skipped in the sample) on a CPU stand-in of the kernel's contract: the direct estimate, sharp
    queries (their mass inside the band), a NaN query and an infinite one included, over heads in
    several kernel calls and torch chunks."""
    from fgcupy.lse_estimate import lse_parts_from_stats

    gen = torch.Generator().manual_seed(kv_len + band)
    q, k = torch.randn(2, 3, 300, 32, generator=gen), torch.randn(2, 3, kv_len, 32, generator=gen)
    q[0, 1, 10:40] = k[0, 1, 10:40] * 4  # peaks inside the band
    q[1, 2, 7] = math.nan
    q[1, 0, 50, 3] = math.inf
    scale = 0.3
    near, far = lse_parts_from_stats(q, k, slice_m, band, _stats_reference(slice_m, scale), 4)
    got = torch.logaddexp(near, far)
    expected = estimate_lse(q, k, slice_m, band=band, scale=scale)
    assert (got.isnan() == expected.isnan()).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, equal_nan=True)
    q_nhd = q.transpose(1, 2).contiguous().transpose(1, 2)  # an NHD layout's strides
    near, far = lse_parts_from_stats(q_nhd, k, slice_m, band, _stats_reference(slice_m, scale), 4)
    torch.testing.assert_close(torch.logaddexp(near, far), got, rtol=0, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("q_len, kv_len, slice_m, band", [(300, 260, 100_000, 5), (300, 260, 64, 10**6),
                                                          (50, 400, 128, 3), (10, 5, 64, 0), (300, 260, 64, 7)])
def test_band_lse_is_each_blocks_band_at_any_slice_or_band_size(q_len, kv_len, slice_m, band):
    """A slice or band far past the sequence is the band cut to it (it padded queries and keys to
    the slice and band: 40 GB for 300 tokens at slice_m = 100,000)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, q_len, 8), torch.randn(2, kv_len, 8)
    block = torch.arange(q_len) // slice_m
    keys = torch.arange(kv_len)
    inside = (keys >= block[:, None] * slice_m - band) & (keys < (block[:, None] + 1) * slice_m + band)
    want = torch.logsumexp((q @ k.transpose(-1, -2) * 0.3).masked_fill(~inside, -math.inf), -1)
    assert torch.allclose(band_lse(q, k, slice_m, band, 0.3), want, atol=1e-5)
