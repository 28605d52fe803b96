"""Inputs a user plausibly gets wrong: answered as the kernels answer them, or refused with an
error that names the argument. CPU only (the reference paths)."""

import math
import sys

import numpy as np
import pytest
import torch

import fgcupy.jit.launch
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


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True, 0.0, -0.125])
def test_attention_refuses_a_scale_that_is_not_a_positive_finite_number(scale):
    # The kernels take the row maximum before scaling: right for positive scales only.
    q, k, v = _qkv(3)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
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
    a = predict_mask(q, k, 128, "topk", density=0.1, pool=16, min_keys=2, local=0)
    b = predict_mask(q, k, 128, "topk", density=0.1, pool=np.int64(16), min_keys=np.int32(2), local=np.int64(0))
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

    q, k, v = (x.to(torch.bfloat16) for x in _qkv(9))
    plan = SparseAttention().plan(SliceMask.full(1, 2, 128, 128, 64), head_dim=128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="q has head dim 64, the plan was made for 128"):
        plan.run(q, k, v)


def test_out_that_overlaps_itself_or_k_or_v_is_refused_and_q_in_place_is_taken():
    q, k, v = _qkv(4)
    mask = SliceMask.full(1, 2, 128, 128, 64)
    expected = sparse_attention(q, k, v, mask)
    with pytest.raises(ValueError, match="share memory"):
        sparse_attention(q, k, v, mask, out=torch.empty(1, 1, 128, 64).expand(1, 2, 128, 64))
    for name, target in (("k", k), ("v", v)):
        with pytest.raises(ValueError, match=f"out overlaps {name}"):
            sparse_attention(q, k, v, mask, out=target)
    packed = torch.randn(1, 2, 128, 3 * 64)  # a view into a tensor holding k too
    q2, k2, v2 = packed[..., :64], packed[..., 64:128], packed[..., 128:]
    with pytest.raises(ValueError, match="out overlaps k"):
        sparse_attention(q2, k2, v2, mask, out=packed[..., 64:128])
    q_copy = q.clone()
    assert sparse_attention(q_copy, k, v, mask, out=q_copy) is q_copy
    torch.testing.assert_close(q_copy, expected)


def test_an_lse_or_out_sharing_memory_with_the_inputs_is_refused_whatever_its_storage():
    """An lse inside out, q or k, and an out that is k under another storage (DLPack imports,
    cupy arrays among them, get storages of their own at the same addresses)."""
    q, k, v = _qkv(6)
    mask = SliceMask.full(1, 2, 128, 128, 64)
    out = torch.empty_like(q)
    for name, host in (("out", out), ("q", q), ("k", k), ("v", v)):
        with pytest.raises(ValueError, match=f"lse overlaps {name}"):
            sparse_attention(q, k, v, mask, out=out, lse=host.view(-1)[: 2 * 128].view(1, 2, 128))
    fused = torch.randn(3, 1, 2, 128, 64)
    q2, k2, v2 = fused[0], fused[1], fused[2]
    alias = torch.from_dlpack(fused[1:3])[0]
    assert alias.untyped_storage().data_ptr() != k2.untyped_storage().data_ptr() and alias.data_ptr() == k2.data_ptr()
    with pytest.raises(ValueError, match="out overlaps k"):
        sparse_attention(q2, k2, v2, mask, out=alias)
    lse = torch.empty(1, 2, 128)
    got, got_lse = sparse_attention(q, k, v, mask, out=out, lse=lse)
    assert got is out and got_lse is lse


def test_the_launch_checks_what_the_op_writes_and_reads(monkeypatch):
    """torch.ops.fgcupy.sparse_attention_ can be called directly: the launch itself refuses an out
    or lse the kernel would write past, and hands the kernel the mask's offsets as one flat array
    even where the mask holds expanded views."""
    import ctypes

    import fgcupy.attention_kernel as ak
    from fgcupy.jit.spec import AttentionSpec

    read = []  # the offsets as the kernel would read them: six int32 from the address it gets

    def launch(spec, device, grid, params):
        read.append(list((ctypes.c_int32 * 6).from_address(int(params["indptr"]))))

    monkeypatch.setattr(ak, "launch", launch)
    # Host tensors stand in for the GPU's here: pack would refuse their addresses.
    monkeypatch.setattr(fgcupy.jit.launch, "_device_pointer", lambda where, value, devices: value.data_ptr())
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(5, heads=2, seq=128, dim=64))
    base = SliceMask.full(1, 1, 128, 128, 64)
    mask = SliceMask(base.indptr.expand(1, 2, 3), base.indices, 64, 128, 128)  # both heads read one row
    assert not mask.indptr.is_contiguous()
    spec = AttentionSpec(dtype="bfloat16", head_dim=64, slice_m=64)
    order = torch.arange(4, dtype=torch.int32)
    out = torch.empty_like(q)
    with pytest.raises(ValueError, match="out must match q"):
        ak.launch_attention(spec, q, k, v, out[:, :1], None, mask, order, 0.125)
    with pytest.raises(ValueError, match="lse must be"):
        ak.launch_attention(spec, q, k, v, out, torch.empty(3), mask, order, 0.125)
    with pytest.raises(ValueError, match="scale must be a positive"):
        ak.launch_attention(spec, q, k, v, out, None, mask, order, -0.125)
    ak.launch_attention(spec, q, k, v, out, None, mask, order, 0.125)
    assert read == [[0, 128, 256, 0, 128, 256]]


def test_rows_whose_offsets_lie_outside_the_list_are_empty_as_in_the_kernels():
    q, k, v = _qkv(6, heads=1, seq=64, dim=16)
    indices = torch.arange(4, dtype=torch.int32)
    for offsets in ([5, 6], [-4, -2]):
        mask = SliceMask(torch.tensor([[offsets]], dtype=torch.int32), indices, 64, 64, 64)
        out, lse = reference_attention(q, k, v, mask)
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse)), offsets
        assert mask.flat_rows()[1].numel() == 0


def test_prediction_refuses_what_would_silently_keep_too_many_or_no_keys():
    q, k, _ = _qkv(7)
    with pytest.raises(ValueError, match="combine='union'"):
        predict_mask(q, k, 64, "topk", density=0.5, pool=16, combine="union", max_keys=8)
    with pytest.raises(ValueError, match=r"threshold must be a probability in \(0, 1\]"):
        predict_mask(q, k, 64, "threshold", threshold=2.0)
    assert predict_mask(q, k, 64, "threshold", threshold=1.0).indptr.shape == (1, 2, 3)


@pytest.mark.parametrize("batch, heads", [(0, 2), (1, 0)])
def test_prediction_of_no_heads_is_an_empty_mask(batch, heads):
    q = torch.randn(batch, heads, 100, 64)
    mask = predict_mask(q, q, 64, density=0.2)
    assert (mask.batch, mask.heads, mask.q_blocks, mask.capacity) == (batch, heads, 2, 0)


def test_drop_keys_decides_shared_rows_per_batch_and_drops_keys_out_of_range():
    from fgcupy.mask_algebra import drop_keys, restrict_keys

    # Both heads of a batch share one stored row; batch 1 pads away every key but 6.
    indptr = torch.tensor([[[0, 3], [0, 3]], [[3, 6], [3, 6]]], dtype=torch.int32)
    mask = SliceMask(indptr, torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int32), 8, 8, 8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, :6] = False
    kept = drop_keys(mask, valid).to_dense()
    assert kept[0, 0, 0].nonzero().flatten().tolist() == kept[0, 1, 0].nonzero().flatten().tolist() == [1, 2, 3]
    assert kept[1, 0, 0].nonzero().flatten().tolist() == kept[1, 1, 0].nonzero().flatten().tolist() == [6]
    # A row shared across batches keeps only keys both batches keep.
    across = SliceMask(torch.tensor([[[0, 3]], [[0, 3]]], dtype=torch.int32), torch.tensor([1, 2, 3], dtype=torch.int32),
                       8, 8, 8)
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 2] = False
    assert drop_keys(across, valid).to_dense()[:, 0, 0].nonzero()[:, 1].tolist() == [1, 3, 1, 3]
    # Keys outside [0, kv_len) never come back as key 0.
    corrupt = SliceMask(torch.tensor([[[0, 3]]], dtype=torch.int32), torch.tensor([-5, 3, 12], dtype=torch.int32), 4, 4, 10)
    restricted = restrict_keys(corrupt, 0, 10)
    assert restricted.to_dense()[0, 0, 0].nonzero().flatten().tolist() == [3]
    assert restricted.indptr.tolist() == [[[0, 1]]]


def test_counts_past_the_keys_mean_all_keys():
    """min_keys / max_keys beyond kv_len (sys.maxsize as "no cap") are taken as kv_len, and a
    local band wider than 2^30 as 2^30 (every key of any sequence the kernels index), so the
    kernels' int32 fields never overflow."""
    from fgcupy.scoring import make_request

    req = make_request(64, 1000, 128, "topk", density=0.1, min_keys=2**40, max_keys=2**40, local=2**33)
    assert (req.min_keys, req.max_keys, req.local) == (1000, 1000, 2**30 - 1)
    q, k, _ = _qkv(seq=256)
    for kwargs in (dict(max_keys=sys.maxsize), dict(local=2**31), dict(min_keys=2**31)):  # q_len = kv_len = 256
        capped = predict_mask(q, k, 128, "topk", density=0.1, **kwargs)
        at_kv_len = predict_mask(q, k, 128, "topk", density=0.1, **{name: 256 for name in kwargs})
        assert torch.equal(capped.to_dense(), at_kv_len.to_dense())


def test_head_selection_reads_rows_as_the_kernels_clamp_them():
    """A row whose start lies before the list reads from its first entry (it had wrapped to the
    list's end, or into the neighbouring mask's entries)."""
    from fgcupy.mask_algebra import concat_heads, slice_heads, take_heads

    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    corrupt = SliceMask(i32([[[-2, 1], [1, 3]]]), i32([5, 6, 7]), 4, 4, 8)
    dense = corrupt.to_dense()
    assert dense[0, 0, 0].nonzero().flatten().tolist() == [5]
    assert torch.equal(take_heads(corrupt, [1, 0]).to_dense(), dense.flip(1))
    assert torch.equal(concat_heads([corrupt, corrupt]).to_dense(), torch.cat([dense, dense], 1))
    past_end = SliceMask(i32([[[0, 2], [2, 9]]]), i32([0, 1, 2, 3, 4, 5]), 4, 4, 8)  # head 1 runs past the list
    assert torch.equal(slice_heads(past_end, range(0, 1)).to_dense(), past_end.to_dense()[:, :1])
    with pytest.raises(ValueError, match=r"offsets of heads range\(1, 2\) point outside its index buffer \(capacity 6\)"):
        slice_heads(past_end, range(1, 2))  # refused: a sequence-parallel rank attending it must raise


def test_head_selection_names_a_mask_or_head_given_where_a_sequence_belongs():
    from fgcupy.mask_algebra import concat_heads, take_heads

    mask = SliceMask.full(1, 2, 8, 8, 4)
    with pytest.raises(TypeError, match="concat_heads needs a sequence of one or more fgcupy.SliceMask, got SliceMask"):
        concat_heads(mask)
    for heads in (1, torch.tensor(1), np.array(1)):
        with pytest.raises(TypeError, match="heads must be a sequence of int head indices"):
            take_heads(mask, heads)


def test_mask_sizes_given_as_numpy_ints_are_python_ints():
    mask = SliceMask.full(1, 1, np.int64(8), 8, np.int64(4))
    assert all(type(getattr(mask, name)) is int for name in ("slice_m", "q_len", "kv_len"))


@pytest.mark.parametrize("block_size", [0, -128, 1.5, True])
def test_block_cover_refuses_a_block_size_that_is_not_positive(block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        SliceMask.full(1, 1, 8, 8, 4).block_cover(block_size)


def test_from_block_mask_refuses_lengths_past_the_block_masks():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask = flex.create_block_mask(lambda b, h, q, k: q >= k, 1, 1, 256, 256, device="cpu")
    with pytest.raises(ValueError, match="exceed the BlockMask's sequence lengths"):
        SliceMask.from_block_mask(block_mask, 128, 256, kv_len=300)
    assert SliceMask.from_block_mask(block_mask, 128, 256, kv_len=200).kv_len == 200
    causal = flex.create_block_mask(lambda b, h, q, k: q >= k, 1, 2, 1024, 1024, device="cpu")
    part = causal[:, :, :2]  # two query blocks, the whole mask's lengths
    with pytest.raises(ValueError, match=r"blocks cover \(q_len, kv_len\)=\(256, 1024\)"):
        SliceMask.from_block_mask(part, 128)
    assert torch.equal(SliceMask.from_block_mask(part, 128, q_len=256).to_dense(),
                       SliceMask.from_block_mask(causal, 128).to_dense()[:, :, :2])


def test_block_mask_sizes_given_as_numpy_ints_work_in_flex_attention():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mask = SliceMask.from_dense(torch.rand(1, 1, 4, 256, generator=torch.Generator().manual_seed(0)) < 0.3, 64, 256)
    q = torch.randn(1, 1, 256, 32)
    block_mask = mask.to_block_mask(np.int64(128))
    assert block_mask.BLOCK_SIZE == (128, 128)
    want = flex.flex_attention(q, q, q, block_mask=mask.to_block_mask(128))
    torch.testing.assert_close(flex.flex_attention(q, q, q, block_mask=block_mask), want)


@pytest.mark.parametrize("slice_m", [0, -64, 64.0, True])
def test_from_block_mask_refuses_a_slice_size_that_is_not_a_positive_int(slice_m):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    block_mask = flex.create_block_mask(lambda b, h, q, k: q >= k, 1, 1, 256, 256, device="cpu")
    with pytest.raises(ValueError, match="slice_m must be a positive int"):
        SliceMask.from_block_mask(block_mask, slice_m)
    with pytest.raises(TypeError, match="BlockMask"):
        SliceMask.from_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 128)


@pytest.mark.parametrize("heads", [[0.9, 1.5], "12", [True], [torch.tensor(0.0)]])
def test_head_selection_refuses_indices_that_are_not_ints(heads):
    from fgcupy.mask_algebra import take_heads

    mask = SliceMask.full(1, 3, 8, 8, 4)
    with pytest.raises(TypeError, match="heads must be a sequence of int"):
        take_heads(mask, heads)


def test_head_selection_takes_numpy_and_tensor_indices():
    from fgcupy.mask_algebra import take_heads

    mask = SliceMask.from_dense(torch.rand(1, 3, 2, 8, generator=torch.Generator().manual_seed(1)) < 0.5, 4, 8)
    want = mask.to_dense()[:, [2, 0]]
    for heads in ([2, 0], np.array([2, 0]), torch.tensor([2, 0]), [np.int64(2), 0], list(torch.tensor([2, 0])),
                  iter([2, 0]), (h for h in (2, 0))):
        assert torch.equal(take_heads(mask, heads).to_dense(), want)


def test_density_counts_rows_as_the_kernels_bound_them():
    backwards = SliceMask(torch.tensor([[[3, 0]]], dtype=torch.int32), torch.arange(3, dtype=torch.int32), 4, 4, 4)
    past_the_list = SliceMask(torch.tensor([[[0, 100]]], dtype=torch.int32), torch.arange(3, dtype=torch.int32), 4, 4, 4)
    assert backwards.density() == 0.0 == backwards.to_dense().float().mean().item()
    assert past_the_list.density() == 0.75 == past_the_list.to_dense().float().mean().item()


def test_digest_tells_masks_of_other_shapes_apart():
    mask = SliceMask.from_dense(torch.rand(1, 2, 2, 8, generator=torch.Generator().manual_seed(2)) > 0.5, 4, 8)
    other_split = SliceMask(mask.indptr.reshape(2, 1, 3), mask.indices, 4, 8, 8)
    other_lengths = SliceMask(mask.indptr, mask.indices, 4, 5, 64)
    assert len({mask.digest(), other_split.digest(), other_lengths.digest()}) == 3
    assert mask.digest() == SliceMask(mask.indptr.clone(), mask.indices.clone(), 4, 8, 8).digest()


def test_drop_keys_of_a_mask_with_no_keys_and_spare_capacity():
    from fgcupy.mask_algebra import drop_keys

    mask = SliceMask.from_dense(torch.zeros(1, 1, 1, 0, dtype=torch.bool), 4, 4, capacity=3)
    kept = drop_keys(mask, torch.zeros(1, 0, dtype=torch.bool))
    assert kept.density() == 0.0 and kept.capacity == 3


def test_mask_slicing_takes_numpy_ints():
    from fgcupy.mask_algebra import restrict_keys, slice_rows

    mask = SliceMask.full(1, 1, 12, 8, 4)
    assert slice_rows(mask, np.int64(1), np.int64(8)).q_blocks == 2
    assert restrict_keys(mask, np.int64(2), np.int64(6)).kv_len == 4


def test_mask_builders_name_a_bad_capacity_or_length():
    with pytest.raises(ValueError, match="capacity must be a non-negative int"):
        SliceMask.from_dense(torch.ones(1, 1, 2, 4, dtype=torch.bool), 4, 8, capacity=10.5)
    with pytest.raises(ValueError, match="kv_len must be a non-negative int"):
        SliceMask.from_topk(torch.zeros(1, 1, 2, 1, dtype=torch.int64), 4, 8, None)


@pytest.mark.parametrize("density", [-0.5, float("nan"), "0.1", True])
def test_random_lists_refuse_a_density_that_is_not_a_non_negative_number(density):
    from fgcupy.mask import random_topk_mask

    with pytest.raises(ValueError, match="density must be a non-negative number"):
        random_topk_mask(1, 1, 8, 8, 4, density)


def nan_key_cases():
    """(name, predict_mask options): the default, one mean query with each rule, a sampled pooling."""
    return [("default", dict(density=0.2)), ("mean topk", dict(density=0.2, pool=None, exact_band=None)),
            ("mean threshold", dict(method="threshold", threshold=1 / 512, pool=None, exact_band=None)),
            ("mean tau", dict(method="tau", tau=0.9, pool=None, exact_band=None)),
            ("tau", dict(method="tau", tau=0.9)), ("sample", dict(density=0.2, pooling="sample"))]


def assert_nan_adds_nothing(q, k, device):
    """One NaN key changes a head's masks by what that key's mass was (rows keep nearly the same
    keys; mean queries do not keep the NaN key, sampled poolings' dilation may), and so does one
    NaN query where its sub-block is one of several: a NaN had made every row's normaliser NaN,
    and the masks empty, dense or in index order."""
    for name, options in nan_key_cases():
        options = dict(options)
        method = options.pop("method", "topk")
        clean = predict_mask(q, k, 64, method, **options).to_dense()
        for which in ("key",) if name.startswith("mean") else ("key", "query"):
            qn, kn = q.clone(), k.clone()
            (kn if which == "key" else qn)[0, 0, 200, 0] = float("nan")
            got = predict_mask(qn, kn, 64, method, **options).to_dense()
            assert torch.equal(got[:, 1:], clean[:, 1:]), (name, which)  # the other head is untouched
            overlap = (got[0, 0] & clean[0, 0]).sum(-1) / clean[0, 0].sum(-1).clamp_min(1)
            assert overlap.min() > 0.9 and got[0, 0].sum(-1).min() > 0, (name, which, overlap)
            if which == "key" and name.startswith("mean"):
                assert not got[0, 0, :, 200].any(), name
    # The exact column max with the LSE a dense step without that key would give.
    from fgcupy.mask_reference import nan_free_logsumexp

    kn = k.clone()
    kn[0, 0, 200, 0] = float("nan")
    lse = nan_free_logsumexp((q.float() @ kn.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]))
    clean = predict_mask(q, k, 64, "colmax", rule="topk", density=0.2, lse=exact_lse(q, k)).to_dense()
    got = predict_mask(q, kn, 64, "colmax", rule="topk", density=0.2, lse=lse).to_dense()
    assert not got[0, 0, :, 200].any() and torch.equal(got[:, 1:], clean[:, 1:])
    assert ((got[0, 0] & clean[0, 0]).sum(-1) >= 0.9 * clean[0, 0].sum(-1)).all()


def test_a_nan_key_or_query_adds_nothing_to_the_prediction():
    q, k, _ = _qkv(seed=4, seq=512)
    assert_nan_adds_nothing(q, k, "cpu")


def test_the_attention_op_checks_what_it_is_handed_on_the_cpu():
    """Called directly or from a compiled graph, the CPU op checks as the kernels' launch does
    (it had written a batch-2 out from batch-1 inputs, and a compiled call wrote over k)."""
    q, k, v = _qkv(seq=130)
    mask = SliceMask.full(1, 2, 130, 130, 64)
    op = torch.ops.fgcupy.sparse_attention_
    with pytest.raises(ValueError, match="out must match q"):
        op(q, k, v, torch.zeros(2, 2, 130, 64), None, mask.indptr, mask.indices, None, 64, 0.125, "")
    with pytest.raises(ValueError, match="scale must be a positive"):
        op(q, k, v, torch.empty_like(q), None, mask.indptr, mask.indices, None, 64, -1.0, "")
    with pytest.raises(TypeError, match="k has dtype"):
        op(q, k.double(), v, torch.empty_like(q), None, mask.indptr, mask.indices, None, 64, 0.125, "")
    compiled = torch.compile(lambda q, k, v, out: sparse_attention(q, k, v, mask, out=out), fullgraph=True)
    with pytest.raises(Exception, match="out overlaps k"):
        compiled(q, k, v, k)


def test_out_whose_elements_share_memory_is_refused():
    q, k, v = _qkv(seq=130)
    mask = SliceMask.full(1, 2, 130, 130, 64)
    overlapping = torch.empty(130 * 64 + 64).as_strided((1, 2, 130, 64), (8320, 32, 64, 1))
    with pytest.raises(ValueError, match="share memory"):
        sparse_attention(q, k, v, mask, out=overlapping)
    transposed = torch.empty(1, 130, 2, 64).transpose(1, 2)  # strided, every element its own
    assert torch.allclose(sparse_attention(q, k, v, mask, out=transposed), reference_attention(q, k, v, mask)[0])


def test_a_plan_takes_its_own_dtype_on_the_cpu_too():
    from fgcupy import SparseAttention

    q, k, v = (x.to(torch.bfloat16) for x in _qkv(seq=130))
    mask = SliceMask.full(1, 2, 130, 130, 64)
    plan = SparseAttention().plan(mask, 64, torch.bfloat16)
    assert plan.run(q, k, v).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="the plan expects torch.bfloat16"):
        plan.run(q.float(), k.float(), v.float())


def test_plan_options_left_at_none_keep_the_one_shot_path():
    q, k, v = _qkv(seq=130)
    mask = SliceMask.full(1, 2, 130, 130, 64)
    expected = sparse_attention(q, k, v, mask)
    assert torch.equal(sparse_attention(q, k, v, mask, spec=None, key_tile=None), expected)
    with pytest.raises(TypeError, match="choose a kernel, which takes bfloat16 or float16"):
        sparse_attention(q, k, v, mask, key_tile=64)


def test_a_tensor_scale_is_refused_clearly_under_torch_compile():
    q, k, v = _qkv(seq=130)
    mask = SliceMask.full(1, 2, 130, 130, 64)
    scale = torch.tensor(0.2)
    eager = sparse_attention(q, k, v, mask, scale=scale)
    assert torch.allclose(eager, sparse_attention(q, k, v, mask, scale=0.2))
    with pytest.raises(Exception, match="scale as a tensor cannot be traced"):
        torch.compile(lambda q, k, v: sparse_attention(q, k, v, mask, scale=scale), fullgraph=True)(q, k, v)


@pytest.mark.parametrize("kwargs, shapes, message", [
    (dict(slice_m=0), None, "slice_m must be a positive int"),
    ({}, ((1, 2, 130, 64), (1, 1, 130, 64), (1, 1, 130, 64)), "one batch and head count"),
    ({}, ((1, 2, 130, 64), (1, 2, 130, 64), (1, 2, 120, 64)), "one batch and head count"),
])
def test_dense_attention_with_lse_refuses_what_it_cannot_take(kwargs, shapes, message):
    from fgcupy.attention import dense_attention_with_lse

    tensors = _qkv(seq=130) if shapes is None else tuple(torch.randn(s) for s in shapes)
    with pytest.raises(ValueError, match=message):
        dense_attention_with_lse(*tensors, **kwargs)


def test_in_place_on_q_cut_from_a_fused_projection():
    """q, k, v cut from one fused QKV tensor interleave in memory without sharing an element:
    out=q in place is taken (it had been refused as overlapping k), out=k still is not."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(1, 130, 3, 2, 64, generator=gen).unbind(2)  # NHD views, one allocation
    mask = SliceMask.full(1, 2, 130, 130, 64)
    expected = reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)[0].transpose(1, 2)
    keys, values = k.clone(), v.clone()
    out = sparse_attention(q, k, v, mask, layout="NHD", out=q)
    assert out.data_ptr() == q.data_ptr() and torch.allclose(q, expected, atol=1e-5)
    assert torch.equal(k, keys) and torch.equal(v, values)
    with pytest.raises(ValueError, match="out overlaps k"):
        sparse_attention(q, k, v, mask, layout="NHD", out=k)


def test_references_check_their_inputs_against_each_other():
    from fgcupy.reference import dense_attention

    q = torch.randn(2, 2, 8, 6)
    mask = SliceMask.full(2, 2, 8, 8, 4)
    for k, v in ((q[:1], q[:1]), (q, q[..., :4]), (q, q[:, :, :5])):
        with pytest.raises(ValueError, match=r"k, v \[B, H, KV, D\] with q's B, H and D"):
            dense_attention(q, k, v)
        with pytest.raises(ValueError, match=r"k, v \[B, H, KV, D\] with q's B, H and D|mask is for"):
            reference_attention(q, k, v, mask)
    for rows in (0, -1, 2.5):
        with pytest.raises(ValueError, match="rows_per_chunk must be a positive int"):
            dense_attention(q, q, q, rows_per_chunk=rows)


def test_relative_l2_refuses_other_shapes_and_reads_nan_for_a_non_finite_reference():
    from fgcupy import relative_l2

    with pytest.raises(ValueError, match="one shape"):
        relative_l2(torch.ones(4), torch.ones(3, 4))
    assert math.isnan(relative_l2(torch.ones(3), torch.tensor([1.0, float("nan"), 1.0])))
    assert math.isnan(relative_l2(torch.ones(3), torch.tensor([1.0, float("inf"), 1.0])))
    assert relative_l2(torch.full((4,), 2.0), torch.zeros(4)) == 4.0  # a zero reference: the norm of out


def test_judge_checks_its_slice_size_and_the_masks_it_judges():
    from fgcupy.oracle import Judge

    q = torch.randn(1, 1, 16, 8)
    for slice_m in (0, -1, 4.0, True):
        with pytest.raises(ValueError, match="slice_m must be a positive int"):
            Judge(q, q, q, slice_m=slice_m)
    judge = Judge(q, q, q, slice_m=8)
    with pytest.raises(ValueError, match="slice_m=4 is not the judge's 8"):
        judge.ratio(SliceMask.full(1, 1, 16, 16, 4))


def test_family_and_video_inputs_check_seed_and_knobs():
    from fgcupy.head_families import family_qkv, family_shape
    from fgcupy.workloads import video_qkv

    shape = family_shape("wan14b-480p", grid=(2, 4, 4))
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*31\)"):
        family_qkv(shape, "window2d", heads=1, seed=2**32)
    for knob in ({"sinks": -1}, {"objects": -1}, {"sinks": 1.5}):
        with pytest.raises(ValueError, match="must be a non-negative int"):
            video_qkv("wan1.3b-480p", head_ids=[0], **knob)


def test_calibration_names_bad_candidates_and_sample_counts():
    from fgcupy.calibration import calibrate, probe_queries

    q = torch.randn(1, 1, 128, 64)
    with pytest.raises(TypeError, match="not one str"):
        calibrate(q, q, slice_m=64, candidates="mean", density=0.1)
    with pytest.raises(ValueError, match="per_block must be a positive divisor"):
        probe_queries(128, 64, 4.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no CUDA GPU")
def test_cuda_timing_says_it_needs_a_gpu_before_calling_anything():
    from fgcupy.timing import cuda_time_ms

    calls = []
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        cuda_time_ms(lambda: calls.append(1))
    assert not calls


def test_attention_names_bad_head_dims_scales_and_outputs():
    q = torch.randn(1, 1, 8, 4)
    mask = SliceMask.full(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="head dim of at least 1"):
        sparse_attention(q[..., :0], q[..., :0], q[..., :0], mask)
    for scale in (1e300, 10**400):
        with pytest.raises(ValueError, match="scale must be a positive finite number up to"):
            sparse_attention(q, q, q, mask, scale=scale)
    with pytest.raises(ValueError, match="out requires grad"):
        sparse_attention(q, q, q, mask, out=torch.empty_like(q).requires_grad_())
    with torch.inference_mode():
        inference_out = torch.empty_like(q)
    with pytest.raises(ValueError, match="out is an inference tensor"):
        sparse_attention(q, q, q, mask, out=inference_out)
    with pytest.raises(ValueError, match=r"k must be a 4-D tensor \(\[B, H, S, D\], layout HND\)"):
        sparse_attention(q, q[0], q, mask)


def test_attention_on_meta_tensors_gives_shapes():
    mask = SliceMask.full(1, 2, 256, 256, 128, device="meta")
    q = torch.empty(1, 2, 256, 64, device="meta")
    out, lse = sparse_attention(q, q, q, mask, return_lse=True)
    assert out.shape == q.shape and out.device.type == "meta" and lse.shape == (1, 2, 256)


@pytest.mark.parametrize("seed", range(6))
def test_non_finite_values_of_kept_keys_add_as_ieee_arithmetic_has_it(seed):
    """The reference against p x v summed element by element in float64: a kept NaN, an
    infinity whose probability underflows to 0, infinities of both signs, a NaN query; dropped
    keys' values never count."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, 96, 8, generator=gen) for _ in range(3))
    k[0, 0, 5] *= 40  # keys whose probability underflows for some queries
    for key, dim, value in ((5, 1, math.inf), (7, 2, -math.inf), (9, 2, math.inf), (11, 0, math.nan), (13, 4, math.inf)):
        v[0, seed % 2, key + seed, dim] = value
    q[0, 1, 70] = math.nan
    keep = torch.rand(1, 2, 3, 96, generator=gen) < 0.5
    mask = SliceMask.from_dense(keep, 32, 96)
    out, _ = reference_attention(q, k, v, mask, dtype=torch.float64)
    scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(
        ~keep.repeat_interleave(32, 2), -math.inf)
    probs = torch.softmax(scores, -1)
    terms = torch.where(keep.repeat_interleave(32, 2).unsqueeze(-1), probs.unsqueeze(-1) * v.double().unsqueeze(2), 0.0)
    expected = terms.sum(3)
    assert expected.isnan().any() and expected.isinf().any()
    torch.testing.assert_close(out, expected, equal_nan=True)
