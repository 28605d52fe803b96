"""fgcupy.predict_mask on CPU tensors (the torch reference path) and its option checks."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, predict_mask
from fgcupy import mask_reference as ref
from fgcupy.mask import num_blocks
from fgcupy.scoring import make_request, static_row_counts

from .mask_checks import smallest_tau_set_ok


def _qk(seq=300, kv=260, heads=2, dim=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, seq, dim, generator=gen).to(dtype)
    k = torch.randn(1, heads, kv, dim, generator=gen).to(dtype)
    return q, k


@given(st.integers(1, 200), st.integers(1, 200), st.sampled_from([16, 64]), st.floats(0, 1),
       st.one_of(st.none(), st.integers(0, 20)), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
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
    mask = predict_mask(q, k, 64, "topk", top_k=20)
    pooled = ref.pool_queries(q, 64)
    logits = pooled @ k.transpose(-1, -2) / 4.0
    expected = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(20, dim=-1).indices, True)
    assert torch.equal(mask.to_dense(), expected)


def test_tau_and_threshold_follow_their_definitions():
    q, k = _qk(seed=1)
    pooled = ref.pool_queries(q, 64)
    logits, lse = ref.logits_and_lse(pooled, k, 0.25)
    kept = predict_mask(q, k, 64, "tau", tau=0.7).to_dense()
    assert smallest_tau_set_ok(logits, kept, 0.7, lse=lse).all()
    kept = predict_mask(q, k, 64, "threshold", threshold=0.01).to_dense()
    assert torch.equal(kept, torch.exp(logits - lse.unsqueeze(-1)) >= 0.01)


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
        (dict(method="topk", density=1.5), r"density must be in \[0, 1\], got 1.5"),
        (dict(method="tau", tau=0.0), r"tau must be in \(0, 1\], got 0.0"),
        (dict(method="tau", top_k=4), r"density/top_k apply to top-k selection, not rule 'tau'"),
        (dict(method="threshold"), r"rule 'threshold' needs threshold"),
        (dict(method="threshold", threshold=-1.0), r"threshold must be a positive probability, got -1.0"),
        (dict(method="topk", density=0.1, pool=24), r"pool must divide slice_m=64"),
        (dict(method="topk", density=0.1, pool=16, combine="mean"), r"combine must be one of \('max', 'union'\)"),
        (dict(method="tau", rule="topk"), r"rule='topk' only applies to method='colmax'"),
        (dict(method="topk", density=0.1, local=-2), r"local must be None or a non-negative int"),
        (dict(method="topk", density=0.1, local=8, max_keys=50), r"max_keys must be an int >= max\(1, min_keys=0, band width 80\), got 50"),
        (dict(method="topk", density=0.1, min_keys=-1), r"min_keys must be a non-negative int"),
        (dict(method="topk", density=0.1, logits_dtype=torch.bfloat16), r"logits_dtype must be torch.float16 or"),
        (dict(method="colmax", logits_dtype=torch.float16), r"colmax and combine='max' keep float32 probabilities"),
        (dict(method="tau", pool=16, logits_dtype=torch.float16), r"applies where logits are stored"),
    ],
)
def test_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_request(16, 260, 64, **kwargs)


def test_stored_logits_are_float16_unless_asked_otherwise():
    # Block 0's pooled query picks coordinate 0; keys 0 and 1 score 1.0 and 1.0001, one float16
    # step apart is 2^-10, so stored as float16 they tie and the lower index wins.
    q = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 4.0  # scale 1/4: logit = k[:, 0]
    k = torch.full((1, 1, 40, 16), 0.0)
    k[..., 0] = -1.0
    k[0, 0, 0, 0], k[0, 0, 1, 0] = 1.0, 1.0001
    assert make_request(16, 40, 64, "topk", top_k=1).logits_dtype == torch.float16
    assert make_request(16, 40, 64, "topk", top_k=1, pool=16).logits_dtype == torch.float32
    assert make_request(16, 40, 64, "topk", top_k=1, pool=16, combine="union").logits_dtype == torch.float16
    assert make_request(16, 40, 64, "tau").logits_dtype == torch.float32  # masses need the range
    assert make_request(16, 40, 64, "threshold", threshold=0.1).logits_dtype == torch.float16
    assert make_request(16, 40, 64, "threshold", threshold=0.1, pool=16).logits_dtype == torch.float32
    assert make_request(16, 40, 64, "tau", logits_dtype=torch.float16).logits_dtype == torch.float16
    half = predict_mask(q, k, 64, "topk", top_k=1).to_dense()[0, 0, 0]
    exact = predict_mask(q, k, 64, "topk", top_k=1, logits_dtype=torch.float32).to_dense()[0, 0, 0]
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
