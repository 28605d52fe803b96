"""Inputs a user plausibly gets wrong: answered as the kernels answer them, or refused with an
error that names the argument. CPU only (the reference paths)."""

import numpy as np
import pytest
import torch

from fgcupy import SliceMask, predict_mask, reference_attention, sparse_attention
from fgcupy.calibration import calibrate
from fgcupy.oracle import exact_lse


def _qkv(seed=0, heads=2, seq=128, dim=64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, seq, dim, generator=gen) for _ in range(3))


def test_values_of_dropped_keys_never_reach_the_output():
    """0 x NaN is NaN: a dropped key's inf or NaN value must add nothing (the kernels never read
    it), while a kept one's spreads to the queries that keep it."""
    q, k, v = _qkv()
    v[:, :, 100:] = float("nan")
    v[:, :, 99, 3] = float("inf")
    keep = torch.zeros(1, 2, 2, 128, dtype=torch.bool)
    keep[..., :99] = True
    out = sparse_attention(q, k, v, SliceMask.from_dense(keep, 64, 128))
    assert torch.isfinite(out).all()
    expected = torch.softmax((q @ k[:, :, :99].transpose(-1, -2)) / 8, -1) @ v[:, :, :99]
    assert torch.allclose(out, expected, atol=1e-5)
    keep[0, 1, 1, 110] = True  # one kept NaN value: that block's queries alone turn NaN
    out, _ = reference_attention(q, k, v, SliceMask.from_dense(keep, 64, 128))
    assert out[0, 1, 64:].isnan().all() and torch.isfinite(out[0, 0]).all() and torch.isfinite(out[0, 1, :64]).all()
    empty = SliceMask.from_dense(torch.zeros_like(keep), 64, 128)
    assert (sparse_attention(q, k, v, empty) == 0).all()


@pytest.mark.parametrize("bad_key", [-1, -5, 128, 500])
def test_keys_outside_the_sequence_are_dropped(bad_key):
    """As the kernels drop them (a negative index must not wrap to the sequence's end)."""
    q, k, v = _qkv(1, heads=1)
    listed = SliceMask.from_topk(torch.tensor([[[[bad_key, 5, 7], [1, 2, bad_key]]]], dtype=torch.int32), 64, 128, 128)
    clean = SliceMask.from_topk(torch.tensor([[[[5, 7], [1, 2]]]], dtype=torch.int32), 64, 128, 128)
    assert torch.equal(listed.to_dense(), clean.to_dense())
    assert torch.equal(sparse_attention(q, k, v, listed), sparse_attention(q, k, v, clean))
    assert torch.equal(listed.block_cover(128), clean.block_cover(128))
    with pytest.raises(ValueError, match=rf"key index {bad_key} at \(b=0, h=0, row=[01]\) is outside"):
        listed.validate()


def test_one_shot_call_takes_run_arguments_and_names_unknown_ones():
    q, k, v = _qkv(2)
    mask = SliceMask.full(1, 2, 128, 128, 64)
    buf = torch.empty(1, 2, 128)
    _, lse = sparse_attention(q, k, v, mask, return_lse=True, lse=buf)
    assert lse.data_ptr() == buf.data_ptr() and torch.allclose(buf, torch.logsumexp(q @ k.transpose(-1, -2) / 8, -1))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['return_lses'\]"):
        sparse_attention(q, k, v, mask, return_lses=True)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_attention_refuses_a_scale_that_is_not_a_finite_number(scale):
    q, k, v = _qkv(3)
    with pytest.raises(ValueError, match="scale must be a finite number or None"):
        sparse_attention(q, k, v, SliceMask.full(1, 2, 128, 128, 64), scale=scale)


def test_attention_takes_a_one_element_tensor_scale():
    q, k, v = _qkv(3)
    mask = SliceMask.full(1, 2, 128, 128, 64)
    assert torch.equal(sparse_attention(q, k, v, mask, scale=torch.tensor(0.1)), sparse_attention(q, k, v, mask, scale=0.1))


@pytest.mark.parametrize("kwargs, name", [
    (dict(slice_m=0), "slice_m"), (dict(heads=-1), "heads"), (dict(q_len=10.0), "q_len"), (dict(batch=True), "batch"),
])
def test_full_mask_names_a_bad_size(kwargs, name):
    args = dict(batch=1, heads=2, q_len=100, kv_len=80, slice_m=64) | kwargs
    with pytest.raises(ValueError, match=rf"{name} must be an int >= [01]"):
        SliceMask.full(**args)
    assert SliceMask.full(*(np.int64(x) for x in (1, 2, 100, 80, 64))).q_blocks == 2


def test_a_positive_density_keeps_at_least_one_key():
    q, k, _ = _qkv(4, seq=256)
    assert predict_mask(q, k, 128, density=0.001).row_lengths().min() == 1
    assert predict_mask(q, k, 128, density=0.0).row_lengths().max() == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(density=True), "density must be a number in"), (dict(density=torch.tensor(0.2)), "density must be a number in"),
    (dict(top_k=True), "top_k must be a non-negative int"),
    (dict(density=0.1, min_keys=True), "min_keys must be a non-negative int"),
    (dict(density=0.1, local=True), "local must be None or a non-negative int"),
    (dict(method="tau", tau=True), "tau must be a number"), (dict(method="tau", tau="0.5"), "tau must be a number"),
])
def test_predict_mask_refuses_flags_and_tensors_for_numbers(kwargs, message):
    q, k, _ = _qkv(5)
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "topk")
    with pytest.raises(ValueError, match=message):
        predict_mask(q, k, 128, method, **kwargs)


def test_predict_mask_takes_numpy_ints():
    q, k, _ = _qkv(6, seq=256)
    a = predict_mask(q, k, 128, density=0.1, pool=16, min_keys=2, local=0)
    b = predict_mask(q, k, 128, density=0.1, pool=np.int64(16), min_keys=np.int32(2), local=np.int64(0))
    assert torch.equal(a.indices, b.indices)


def test_colmax_takes_its_rule_from_the_option_given():
    q, k, _ = _qkv(7, seq=256)
    lse = exact_lse(q, k)
    by_density = predict_mask(q, k, 128, "colmax", lse=lse, density=0.1)
    assert torch.equal(by_density.indices, predict_mask(q, k, 128, "colmax", lse=lse, rule="topk", density=0.1).indices)
    by_tau = predict_mask(q, k, 128, "colmax", lse=lse, tau=0.5)
    assert torch.equal(by_tau.indices, predict_mask(q, k, 128, "colmax", lse=lse, rule="tau", tau=0.5).indices)
    default = predict_mask(q, k, 128, "colmax", lse=lse)  # threshold 0.5 / kv_len
    assert torch.equal(default.indices, predict_mask(q, k, 128, "colmax", lse=lse, rule="threshold").indices)
    with pytest.raises(ValueError, match="tau applies to rule 'tau', not 'topk'"):
        predict_mask(q, k, 128, "colmax", lse=lse, density=0.1, tau=0.5)


def test_calibration_takes_either_layout():
    q, k, _ = _qkv(8, seq=512)
    hnd = calibrate(q, k, density=0.1)
    nhd = calibrate(q.transpose(1, 2), k.transpose(1, 2), density=0.1, layout="NHD")
    assert hnd.poolings == nhd.poolings and torch.equal(hnd.mask.indices, nhd.mask.indices)


def test_from_topk_refuses_a_repeated_key_it_checks_anyway():
    with pytest.raises(ValueError, match=r"top-k index 2 is listed twice in row \(0, 0, 1\)"):
        SliceMask.from_topk(torch.tensor([[[[1, 5], [2, 2]]]]), 64, 128, 128)
    listed = SliceMask.from_topk(torch.tensor([[[[1, 5], [2, 2]]]], dtype=torch.int32), 64, 128, 128)  # no sync
    with pytest.raises(ValueError, match="not sorted and unique"):
        listed.validate()


def test_a_cpu_plan_keeps_its_head_dim():
    from fgcupy import SparseAttention

    q, k, v = _qkv(9)
    plan = SparseAttention().plan(SliceMask.full(1, 2, 128, 128, 64), head_dim=128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q has head dim 64, the plan was made for 128"):
        plan.run(q, k, v)
