"""Fuzzing the public CPU entry points (hypothesis): every bad input gets a ValueError or
TypeError raised by fgcupy itself; every good input gives what an independent check expects.
About 20,000 generated cases (8 x 2,500); FGCUPY_FUZZ_EXAMPLES scales them."""

import math
import os
import traceback

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, predict_mask, reference_attention, sparse_attention
from fgcupy.oracle import exact_lse

EXAMPLES = int(os.environ.get("FGCUPY_FUZZ_EXAMPLES", "2500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

INT32_MAX = 2**31 - 1
ODD_INTS = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**40, -(2**31)]))
ODD_SIZES = st.one_of(ODD_INTS, st.sampled_from([1.0, 32.0, True, None, "64", math.nan]))


def ours(call):
    """Run ``call``; return its result, or None when fgcupy refused it with a ValueError or
    TypeError of its own (raised in fgcupy's code, with a message). Anything else fails."""
    try:
        return call()
    except (ValueError, TypeError) as err:
        frames = traceback.extract_tb(err.__traceback__)
        assert any("/fgcupy/" in f.filename for f in frames[-1:]), f"foreign {type(err).__name__}: {err}"
        assert str(err), "an error without a message"
        return None


def kernel_safe(mask: SliceMask) -> bool:
    """Independently of fgcupy: offsets in [0, capacity] and non-decreasing, keys of every row
    sorted, unique and in [0, kv_len), sizes within int32."""
    indptr = mask.indptr.numpy().astype(np.int64).reshape(-1, mask.q_blocks + 1)
    indices = mask.indices.numpy().astype(np.int64)
    if max(mask.q_len, mask.kv_len, mask.capacity) > INT32_MAX:
        return False
    for row in indptr:
        starts, ends = row[:-1], row[1:]
        if (starts < 0).any() or (ends > mask.capacity).any() or (ends < starts).any():
            return False
        for a, b in zip(starts, ends):
            keys = indices[a:b]
            if len(keys) and (keys.min() < 0 or keys.max() >= mask.kv_len or (np.diff(keys) <= 0).any()):
                return False
    return True


@st.composite
def raw_masks(draw):
    """Arbitrary (indptr, indices, slice_m, q_len, kv_len): mostly plausible, often broken."""
    batch, heads = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    slice_m = draw(st.one_of(st.sampled_from([1, 4, 16, 64]), ODD_SIZES))
    q_len = draw(st.one_of(st.integers(0, 80), ODD_SIZES))
    kv_len = draw(st.one_of(st.integers(0, 40), ODD_SIZES))
    q_blocks = -(-q_len // slice_m) if all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                           for x in (slice_m, q_len)) and q_len < 10**6 else draw(st.integers(0, 4))
    q_blocks += draw(st.sampled_from([0, 0, 0, 1, -1]))
    q_blocks = max(q_blocks, 0)
    counts = draw(st.lists(st.integers(-2, 12), min_size=batch * heads * q_blocks, max_size=batch * heads * q_blocks))
    flat = np.concatenate([[0], np.cumsum(np.maximum(counts, 0))]) if counts else np.zeros(1)
    if draw(st.booleans()):
        flat = flat + np.array(draw(st.lists(st.integers(-3, 3), min_size=len(flat), max_size=len(flat))))
    per_bh = q_blocks + 1
    indptr = np.zeros((batch, heads, per_bh), dtype=np.int64)
    for bh in range(batch * heads):
        indptr.reshape(-1, per_bh)[bh] = flat[bh * q_blocks : bh * q_blocks + per_bh]
    capacity = int(flat[-1]) if len(flat) else 0
    capacity = max(0, capacity + draw(st.sampled_from([0, 0, 1, -1])))
    high = kv_len if isinstance(kv_len, int) and not isinstance(kv_len, bool) and 0 < kv_len < 10**6 else 8
    indices = np.array(draw(st.lists(st.integers(-2, high + 1), min_size=capacity, max_size=capacity)), dtype=np.int64)
    dtype = draw(st.sampled_from([torch.int32, torch.int32, torch.int32, torch.int64, torch.float32]))
    return (torch.from_numpy(indptr).to(dtype), torch.from_numpy(indices).to(dtype), slice_m, q_len, kv_len)


@given(raw_masks())
@FUZZ
def test_masks_are_refused_or_safe_for_the_kernels(raw):
    mask = ours(lambda: SliceMask(*raw))
    if mask is None:
        return
    validated = ours(mask.validate)
    assert (validated is not None) == kernel_safe(mask), "validate() disagrees with the independent check"


@given(st.integers(1, 2), st.integers(1, 2), st.integers(0, 5), st.integers(0, 40), st.integers(1, 40),
       st.sampled_from([torch.int32, torch.int64, torch.int16, torch.float32, torch.bool]),
       st.sampled_from([0, 0, 1, 2**32 + 3, -1, 2**31]), st.integers(0, 2**31 - 1))
@FUZZ
def test_topk_indices_never_wrap(batch, heads, q_blocks, kv_len, k, dtype, poison, seed):
    gen = torch.Generator().manual_seed(seed)
    k = min(k, kv_len)
    keys = torch.stack([torch.randperm(kv_len, generator=gen)[:k] for _ in range(batch * heads * q_blocks)]) \
        if q_blocks and kv_len else torch.zeros(batch * heads * q_blocks, k, dtype=torch.int64)
    keys = keys.reshape(batch, heads, q_blocks, k).to(torch.int64)
    if poison and keys.numel():
        keys.view(-1)[0] = poison
    given = keys.to(dtype) if dtype != torch.bool else keys > 0  # the caller's own cast may wrap
    mask = ours(lambda: SliceMask.from_topk(given, 16, q_blocks * 16, kv_len))
    if mask is None:
        return
    assert dtype in (torch.int32, torch.int64, torch.int16)
    if ours(mask.validate) is not None:
        assert kernel_safe(mask)
        assert torch.equal(mask.to_dense(), _dense_of(given.long(), kv_len))


def _dense_of(keys, kv_len):
    dense = torch.zeros(*keys.shape[:3], kv_len, dtype=torch.bool)
    if keys.numel():
        dense.scatter_(-1, keys, True)
    return dense


@given(st.integers(0, 2), st.integers(0, 2), st.integers(0, 5), st.integers(0, 50),
       st.sampled_from([torch.bool, torch.uint8, torch.int64, torch.float32]), st.integers(0, 2**31 - 1))
@FUZZ
def test_dense_round_trip(batch, heads, q_blocks, kv_len, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < 0.3
    mask = ours(lambda: SliceMask.from_dense(dense.to(dtype), 16, q_blocks * 16))
    if mask is None:
        assert dtype == torch.float32
        return
    assert kernel_safe(mask.validate())
    assert torch.equal(mask.to_dense(), dense)
    cover = mask.block_cover(32)
    padded = torch.nn.functional.pad(dense, (0, (-kv_len) % 32, 0, (-q_blocks) % 2))
    expected = padded.unflatten(3, (-1, 32)).any(-1).unflatten(2, (-1, 2)).any(3)
    assert torch.equal(cover, expected[:, :, : cover.shape[2], : cover.shape[3]])


@st.composite
def predictions(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16, torch.float64, torch.int32,
                                  torch.bool, torch.complex64]))
    k_dtype = dtype if draw(st.integers(0, 9)) else draw(st.sampled_from([torch.float32, torch.float16]))
    shape = dict(b=draw(st.integers(1, 2)), h=draw(st.integers(1, 2)), q=draw(st.integers(0, 70)),
                 kv=draw(st.integers(0, 50)), d=draw(st.sampled_from([0, 4, 8, 16])))
    method = draw(st.sampled_from(["topk", "tau", "threshold", "colmax", "auto", "bogus"]))
    opts = {}
    for name, values in (("density", [0.0, 0.1, 0.5, 1.0, 1.5, math.nan]), ("top_k", [0, 3, 100, -1, 2.5]),
                         ("tau", [0.5, 0.9, 1.0, 0.0, 2.0]), ("threshold", [1e-3, 0.5, 0.0, -1.0, math.inf]),
                         ("pool", [None, 1, 4, 16, 3, 0]), ("combine", ["max", "union", "mean"]),
                         ("min_keys", [0, 2, -1]), ("max_keys", [None, 1, 5, 0]), ("local", [None, 0, 3, -2]),
                         ("exact_band", [None, 0, 4, -1]), ("scale", [None, 0.3, math.nan, -1.0, 0.0]),
                         ("layout", ["HND", "NHD", "BSHD"])):
        if draw(st.integers(0, 3)) == 0:
            opts[name] = draw(st.sampled_from(values))
    if method in ("topk", "auto") and "density" not in opts and "top_k" not in opts:
        opts["density"] = 0.25
    slice_m = draw(st.sampled_from([16, 64, 128, 0, 96]))
    return dtype, k_dtype, shape, method, slice_m, opts, draw(st.integers(0, 2**31 - 1))


@given(predictions())
@FUZZ
def test_predict_mask_refuses_or_returns_a_safe_mask(case):
    dtype, k_dtype, s, method, slice_m, opts, seed = case
    gen = torch.Generator().manual_seed(seed)
    layout = opts.get("layout", "HND")
    q_shape, k_shape = (s["b"], s["h"], s["q"], s["d"]), (s["b"], s["h"], s["kv"], s["d"])
    if layout == "NHD":
        q_shape, k_shape = (s["b"], s["q"], s["h"], s["d"]), (s["b"], s["kv"], s["h"], s["d"])
    q = (torch.randn(q_shape, generator=gen) * 2).to(dtype)
    k = (torch.randn(k_shape, generator=gen) * 2).to(k_dtype)
    lse = None
    if method == "colmax" and dtype.is_floating_point and s["d"] and s["kv"]:
        qh = q if layout != "NHD" else q.transpose(1, 2)
        kh = k if layout != "NHD" else k.transpose(1, 2)
        lse = torch.logsumexp(qh.double() @ kh.double().transpose(-1, -2) * (s["d"] ** -0.5), -1).float()
    mask = ours(lambda: predict_mask(q, k, slice_m, method, lse=lse, **opts))
    if mask is None:
        return
    assert dtype.is_floating_point and dtype == k_dtype and s["q"] > 0 and s["kv"] > 0 and s["d"] > 0
    assert (mask.q_len, mask.kv_len, mask.slice_m) == (s["q"], s["kv"], slice_m)
    assert kernel_safe(mask.validate())
    lengths = mask.row_lengths()
    assert (lengths >= min(opts.get("min_keys", 0), s["kv"])).all()
    if opts.get("max_keys") is not None:
        assert (lengths <= max(opts["max_keys"], 0) if opts.get("local") is None else True).all()


@st.composite
def attention_cases(draw):
    b, h = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    q_len, kv_len, d = draw(st.integers(1, 40)), draw(st.integers(1, 30)), draw(st.sampled_from([4, 8]))
    slice_m = draw(st.sampled_from([4, 16, 64]))
    q_blocks = -(-q_len // slice_m)
    dense = torch.rand(b, h, q_blocks, kv_len, generator=torch.Generator().manual_seed(draw(st.integers(0, 999)))) \
        < draw(st.sampled_from([0.0, 0.3, 1.0]))
    return b, h, q_len, kv_len, d, slice_m, dense, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from(["HND", "NHD"]))


@given(attention_cases())
@FUZZ
def test_sparse_attention_on_cpu_is_the_masked_softmax(case):
    b, h, q_len, kv_len, d, slice_m, dense, seed, layout = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) for n in (q_len, kv_len, kv_len))
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    as_layout = (lambda t: t) if layout == "HND" else (lambda t: t.transpose(1, 2))
    out, lse = sparse_attention(*(as_layout(t) for t in (q, k, v)), mask, layout=layout, return_lse=True)
    out = as_layout(out)
    keep = dense.repeat_interleave(slice_m, 2)[:, :, :q_len]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~keep, -math.inf)
    row_lse = torch.logsumexp(scores, -1)
    probs = torch.where(keep, torch.exp(scores - row_lse.unsqueeze(-1)), 0.0)
    torch.testing.assert_close(out, probs @ v)
    torch.testing.assert_close(lse, row_lse.float())
    assert torch.isfinite(out).all()
    if torch.isnan(q).any():
        pytest.fail("unreachable")


def test_nan_inputs_stay_nan_and_empty_rows_stay_zero():
    q = torch.randn(1, 1, 8, 4)
    q[0, 0, 0, 0] = math.nan
    dense = torch.zeros(1, 1, 2, 6, dtype=torch.bool)
    dense[0, 0, 0] = True
    out, lse = reference_attention(q, torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4),
                                   SliceMask.from_dense(dense, 4, 8))
    assert torch.isnan(out[0, 0, 0]).all() and torch.isfinite(out[0, 0, 1:4]).all()
    assert (out[0, 0, 4:] == 0).all() and torch.isneginf(lse[0, 0, 4:]).all()


def test_sizes_beyond_int32_are_refused_up_front():
    with pytest.raises(ValueError, match=r"kv_len must be < 2\*\*31"):
        SliceMask.from_topk(torch.zeros(1, 1, 1, 1, dtype=torch.int32), 64, 10, 2**40)
    with pytest.raises(ValueError, match=r"top-k index 4294967299 at \(0, 0, 0, 0\) is outside \[0, kv_len=10\)"):
        SliceMask.from_topk(torch.tensor([[[[2**32 + 3, 1]]]]), 64, 10, 10)
    with pytest.raises(TypeError, match=r"top-k indices must be an integer tensor, got torch.float32"):
        SliceMask.from_topk(torch.tensor([[[[2.7, 1.0]]]]), 64, 10, 10)
    assert SliceMask.from_dense(torch.zeros(1, 1, 1, 0, dtype=torch.bool), 64, 10).capacity == 0


@pytest.mark.parametrize("shape, q_len", [((1, 0, 2, 10), 32), ((1, 1, 0, 10), 0), ((2, 3, 4, 0), 64)])
def test_empty_dimensions_round_trip_through_the_cache_and_head_joins(shape, q_len):
    from fgcupy import MaskCache
    from fgcupy.distributed import concat_heads, slice_heads

    dense = torch.zeros(shape, dtype=torch.bool)
    mask = SliceMask.from_dense(dense, 16 if q_len else 64, q_len)
    for storage in ("bits", "index"):
        cache = MaskCache(storage=storage)
        cache.put("layer", mask, 0)
        assert torch.equal(cache.get("layer").to_dense(), dense)
    joined = concat_heads([mask, mask])
    assert joined.heads == 2 * mask.heads and kernel_safe(joined.validate())
    assert torch.equal(slice_heads(joined, range(mask.heads)).to_dense(), dense)


SCHEDULE_VALUES = st.one_of(st.integers(-2, 12), st.sampled_from([None, 2.5, True, "3", [1, 2], (4, "x"), math.nan]))


@given(warmup=SCHEDULE_VALUES, refresh_every=SCHEDULE_VALUES,
       refresh_steps=st.one_of(st.none(), st.lists(SCHEDULE_VALUES, max_size=3), st.sampled_from(["abc", 5])),
       storage=st.sampled_from(["auto", "bits", "index", "dense", 3]), expanded=st.sampled_from([False, True, 1]),
       step=SCHEDULE_VALUES)
@FUZZ
def test_mask_cache_schedules_are_refused_or_consistent(warmup, refresh_every, refresh_steps, storage, expanded,
                                                        step):
    from fgcupy import MaskCache

    cache = ours(lambda: MaskCache(warmup=warmup, refresh_every=refresh_every, refresh_steps=refresh_steps,
                                   storage=storage, expanded=expanded))
    if cache is None:
        return
    action = ours(lambda: cache.action(step))
    if action is None:
        return
    assert isinstance(step, int) and not isinstance(step, bool) and step >= 0
    if step < cache.warmup:
        expected = "dense"
    elif cache.refresh_steps is not None:
        expected = "refresh" if step in cache.refresh_steps else "reuse"
    else:
        expected = "refresh" if (step - cache.warmup) % cache.refresh_every == 0 else "reuse"
    assert action == expected
    assert ours(lambda: cache.action(step, layer="never cached")) in ("dense", "refresh")


@given(st.fixed_dictionaries({}, optional={
    "predictor": st.sampled_from(["topk", "tau", "threshold", "auto", "colmax", "bogus", "", 3, None]),
    "density": st.sampled_from([None, 0.1, 0.0, 1.5, math.nan, "0.2"]),
    "tau": st.sampled_from([None, 0.9, 2.0, math.nan]),
    "threshold": st.sampled_from([None, 1e-3, -1.0, math.inf]),
    "slice_m": st.sampled_from([64, 128, 96, 128.0, True]),
    "dense_steps": st.sampled_from([0, 2, -1, 1.5, True]),
    "refresh_every": st.sampled_from([1, 5, 0, 2.5]),
    "refresh_steps": st.sampled_from([None, (3, 7), (-1,), "x", 4]),
    "predictor_kwargs": st.sampled_from([{}, {"pool": 16}, {"pool": 24}, {"min_keys": -1}, {"bogus": 1},
                                         {"exact_band": None}, "pool=16"]),
    "dense_layers": st.sampled_from([(), (1, 2), (-1,), "x", 3]),
}))
@FUZZ
def test_integration_configs_are_refused_when_made(kwargs):
    pytest.importorskip("diffusers")
    from fgcupy.integrations.diffusers import SparseAttentionConfig

    config = ours(lambda: SparseAttentionConfig(**kwargs))
    if config is None:
        return
    # what it accepted, predict_mask accepts too (checked with a tiny CPU problem)
    q = torch.randn(1, 1, 2 * config.slice_m, 16)
    dense_step = dict(lse=exact_lse(q, q)) if config.exact else {}  # the exact schedule's LSE
    mask = ours(lambda: predict_mask(q, q, config.slice_m, config.predictor, **config.predictor_arguments(),
                                     **dense_step))
    assert mask is not None, f"config {kwargs} accepted what predict_mask refuses"


@given(st.integers(1, 2), st.integers(1, 3), st.integers(0, 40), st.integers(0, 40), st.sampled_from([8, 16]),
       st.fixed_dictionaries({}, optional={
           "scale": st.sampled_from([None, 0.3, 0.0, -1.0, math.inf, math.nan, "0.3"]),
           "samples": ODD_SIZES,
           "layout": st.sampled_from(["HND", "NHD", "BHSD", None]),
           "key_valid": st.sampled_from(["ok", "none valid", "wrong shape", "int"]),
       }), st.sampled_from(["ok", "short", "list"]), st.integers(0, 2**16))
@FUZZ
def test_mask_recall_is_refused_or_a_kept_share(batch, heads, q_len, kv_len, dim, options, lse_kind, seed):
    """mask_recall: refused by fgcupy, or each head's mean over its sampled queries of
    exp(LSE through a mask - exact LSE), which a full mask puts at 1 (a query with no valid key
    reads 1 too)."""
    from fgcupy import mask_recall

    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(batch, heads, q_len, dim, generator=gen), torch.randn(batch, heads, kv_len, dim, generator=gen)
    layout = options.get("layout", "HND")
    valid = {"ok": torch.rand(batch, kv_len, generator=gen) > 0.3, "none valid": torch.zeros(batch, kv_len, dtype=torch.bool),
             "wrong shape": torch.ones(batch, kv_len + 1, dtype=torch.bool),
             "int": torch.ones(batch, kv_len, dtype=torch.int64)}[options.pop("key_valid", "ok")]
    scale = options.get("scale")
    scale_f = 1 / math.sqrt(dim) if scale is None or not isinstance(scale, float) or not scale > 0 else scale
    logits = (q @ k.transpose(-1, -2)) * scale_f
    full = torch.logsumexp(logits.masked_fill(~valid.bool()[:, None, None, :], -math.inf), -1) if valid.dtype == torch.bool \
        and valid.shape[1] == kv_len else torch.zeros(batch, heads, q_len)
    lse = {"ok": full, "short": full[:, :, : max(0, q_len - 1)], "list": full.tolist()}[lse_kind]
    views = (q, k) if layout != "NHD" else (q.transpose(1, 2), k.transpose(1, 2))
    recall = ours(lambda: mask_recall(*views, lse, key_valid=valid, **options))
    if recall is None:
        return
    assert recall.shape == (batch, heads) and recall.dtype == torch.float32
    assert torch.allclose(recall, torch.ones_like(recall), atol=1e-4), recall  # the full mask keeps everything
