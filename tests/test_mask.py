import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask
from fgcupy.mask import num_blocks, random_topk_mask

from .strategies import dense_masks, mask_from


@given(dense_masks())
@settings(max_examples=60, deadline=None)
def test_dense_round_trip(case):
    dense, slice_m, q_len = case
    mask = mask_from(dense, slice_m, q_len).validate()
    assert torch.equal(mask.to_dense(), dense)
    assert mask.density() == pytest.approx(dense.float().mean().item())
    assert torch.equal(mask.row_lengths(), dense.sum(-1, dtype=torch.int32))


@given(dense_masks(), st.integers(0, 50))
@settings(max_examples=30, deadline=None)
def test_capacity_padding_is_ignored(case, extra):
    dense, slice_m, q_len = case
    total = int(dense.sum())
    mask = SliceMask.from_dense(dense, slice_m, q_len, capacity=total + extra)
    assert mask.capacity == total + extra
    assert torch.equal(mask.validate().to_dense(), dense)


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 40), st.integers(1, 200), st.data())
@settings(max_examples=40, deadline=None)
def test_from_topk_keeps_exactly_those_keys(batch, heads, q_blocks, kv_len, data):
    k = data.draw(st.integers(0, kv_len))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(batch, heads, q_blocks, kv_len, generator=gen)
    topk = torch.topk(scores, k, dim=-1).indices
    mask = SliceMask.from_topk(topk, 64, q_blocks * 64, kv_len).validate()
    expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, topk, True)
    assert torch.equal(mask.to_dense(), expected)
    assert torch.equal(mask.indptr[..., 1:] - mask.indptr[..., :-1], torch.full((batch, heads, q_blocks), k, dtype=torch.int32))


def test_full_mask_is_dense():
    mask = SliceMask.full(2, 3, 130, 70, 64).validate()
    assert mask.density() == 1.0
    assert mask.to_dense().all()


def test_accepts_numpy_arrays():
    indptr = np.array([[[0, 2, 3]]], dtype=np.int32)
    indices = np.array([1, 4, 0], dtype=np.int32)
    mask = SliceMask(indptr, indices, slice_m=64, q_len=100, kv_len=5).validate()
    assert mask.to_dense().tolist() == [[[[False, True, False, False, True], [True, False, False, False, False]]]]


@pytest.mark.parametrize(
    "indptr, indices, message",
    [
        ([[[0, 2, 9]]], [1, 4, 0], r"indptr end of \(b=0, h=0, row=1\) is 9, outside \[0, capacity=3\]"),
        ([[[0, 3, 2]]], [1, 4, 0], r"indptr decreases at \(b=0, h=0, row=1\)"),
        ([[[-1, 2, 3]]], [1, 4, 0], r"indptr start of \(b=0, h=0, row=0\) is -1"),
        ([[[0, 2, 3]]], [1, 5, 0], r"key index 5 at \(b=0, h=0, row=0\) is outside \[0, kv_len=5\)"),
        ([[[0, 2, 3]]], [4, 1, 0], r"keys of \(b=0, h=0, row=0\) are not sorted and unique \(4 then 1\)"),
        ([[[0, 2, 3]]], [2, 2, 0], r"not sorted and unique \(2 then 2\)"),
    ],
)
def test_validate_names_the_bad_row(indptr, indices, message):
    mask = SliceMask(torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32), 64, 100, 5)
    with pytest.raises(ValueError, match=message):
        mask.validate()


def test_validate_names_batch_and_head():
    dense = torch.ones(2, 3, 2, 8, dtype=torch.bool)
    mask = SliceMask.from_dense(dense, 64, 128)
    bad = mask.indices.clone()
    row = (1 * 3 + 2) * 2 + 1  # (b=1, h=2, row=1)
    bad[row * 8 + 3] = 99
    with pytest.raises(ValueError, match=r"key index 99 at \(b=1, h=2, row=1\)"):
        SliceMask(mask.indptr, bad, 64, 128, 8).validate()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(indptr=torch.zeros(1, 1, 3, dtype=torch.int64)), TypeError, "indptr must be int32"),
        (dict(indices=torch.zeros(3, dtype=torch.float32)), TypeError, "indices must be int32"),
        (dict(indptr=torch.zeros(1, 3, dtype=torch.int32)), ValueError, r"shape \[B, H, QB \+ 1\]"),
        (dict(q_len=300), ValueError, r"indptr has 2 query blocks, expected 5"),
        (dict(slice_m=0), ValueError, "slice_m must be an int >= 1, got 0"),
        (dict(slice_m=-64), ValueError, "slice_m must be an int >= 1, got -64"),
        (dict(kv_len=-1), ValueError, "kv_len must be an int >= 0"),
        (dict(indices=torch.zeros(1, 3, dtype=torch.int32)), ValueError, "indices must be 1-D"),
        (dict(indices=[1, 2]), TypeError, "indices must be a torch tensor, numpy or cupy array"),
    ],
)
def test_constructor_errors(kwargs, error, message):
    args = dict(indptr=torch.zeros(1, 1, 3, dtype=torch.int32), indices=torch.zeros(3, dtype=torch.int32),
                slice_m=64, q_len=100, kv_len=5)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        SliceMask(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(slice_m=0), "slice_m must be an int >= 1, got 0"),
    (dict(batch=-1), "batch must be an int >= 0, got -1"),
    (dict(q_len=10.5), "q_len must be an int >= 0, got 10.5"),
    (dict(kv_len=-3), "kv_len must be an int >= 0, got -3"),
])
def test_random_topk_mask_names_a_bad_size(kwargs, message):
    from fgcupy.mask import random_topk_mask

    args = {**dict(batch=1, heads=1, q_len=10, kv_len=10, slice_m=4, density=0.3), **kwargs}
    with pytest.raises(ValueError, match=message):
        random_topk_mask(**args)
    assert random_topk_mask(np.int64(1), 2, 10, 10, np.int32(4), 0.3).density() == pytest.approx(0.3)


@given(dense_masks(slice_sizes=(64, 128), max_q=400, max_kv=400))
@settings(max_examples=25, deadline=None)
def test_block_cover_contains_every_slice(case):
    dense, slice_m, q_len = case
    mask = mask_from(dense, slice_m, q_len)
    cover = mask.block_cover(128)
    batch, heads, q_blocks, kv_len = dense.shape
    rows = torch.arange(q_blocks) * slice_m // 128
    keys = torch.arange(kv_len) // 128
    expanded = cover[:, :, rows][..., keys]
    assert not (dense & ~expanded).any(), "a kept slice lies outside the cover"
    # And the cover is minimal: each covered block holds at least one kept slice.
    counts = torch.zeros(cover.shape, dtype=torch.int32)
    b, h, j, key = torch.nonzero(dense, as_tuple=True)
    counts.index_put_((b, h, j * slice_m // 128, key // 128), torch.ones_like(b, dtype=torch.int32), accumulate=True)
    assert torch.equal(counts > 0, cover)


def test_block_mask_round_trip_and_exact_mask_mod():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(0)
    dense = torch.rand(1, 2, 4, 300, generator=gen) < 0.05
    mask = SliceMask.from_dense(dense, 64, 256)
    block_mask = mask.to_block_mask(128, exact=True)
    assert isinstance(block_mask, flex.BlockMask)
    back = SliceMask.from_block_mask(block_mask, 64)
    assert torch.equal(back.to_dense(), mask.block_cover(128)[:, :, torch.arange(4) // 2][..., torch.arange(300) // 128])
    # The mask_mod reproduces the slice map exactly.
    b, h, q, kv = 0, 1, torch.arange(256)[:, None], torch.arange(300)[None, :]
    got = block_mask.mask_mod(torch.tensor(b), torch.tensor(h), q, kv)
    assert torch.equal(got, dense[0, 1][q // 64, kv])


def test_whole_block_masks_list_full_blocks():
    """exact=False lists every covered block as a full block (FlexAttention evaluates no mask_mod
    there): the same blocks as the cover. (Eager flex_attention applies mask_mod alone, not the
    blocks, so the attention itself is checked on the GPU, compiled.)"""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator().manual_seed(1)
    mask = SliceMask.from_dense(torch.rand(1, 2, 6, 700, generator=gen) < 0.002, 128, 700)
    block_mask = mask.to_block_mask(128, exact=False)
    assert int(block_mask.kv_num_blocks.sum()) == 0
    assert torch.equal(block_mask.full_kv_num_blocks, mask.block_cover(128).sum(-1, dtype=torch.int32))
    back = SliceMask.from_block_mask(block_mask, 128)
    cover = mask.block_cover(128)[..., torch.arange(700) // 128]
    assert torch.equal(back.to_dense(), cover)
    assert torch.equal(block_mask.to_dense().bool(), mask.block_cover(128))


def test_block_size_must_be_multiple_of_slice():
    mask = SliceMask.full(1, 1, 256, 256, 128)
    with pytest.raises(ValueError, match="multiple of slice_m=128"):
        mask.block_cover(64)


def test_num_blocks():
    assert [num_blocks(n, 64) for n in (0, 1, 64, 65)] == [0, 1, 1, 2]


def test_random_topk_mask_counts_and_no_keys():
    gen = torch.Generator().manual_seed(0)
    mask = random_topk_mask(1, 2, 100, 50, 32, 0.1, generator=gen).validate()
    assert mask.row_lengths().unique().tolist() == [5]
    assert random_topk_mask(1, 1, 8, 0, 4, 0.5).capacity == 0


def test_digest_tells_masks_apart_and_ignores_spare_capacity():
    gen = torch.Generator().manual_seed(1)
    dense = torch.rand(2, 3, 4, 50, generator=gen) < 0.3
    mask = SliceMask.from_dense(dense, 16, 60)
    assert mask.digest() == SliceMask.from_dense(dense.clone(), 16, 60).digest()
    spare = SliceMask.from_dense(dense, 16, 60, capacity=mask.capacity + 9)
    spare.indices[mask.capacity:] = 7  # room no row covers
    assert spare.digest() == mask.digest()
    moved = dense.clone()
    moved[1, 2, 3, 0] = not bool(moved[1, 2, 3, 0])
    assert SliceMask.from_dense(moved, 16, 60).digest() != mask.digest()
    assert 0 <= mask.digest() < 2**62
    assert SliceMask.full(1, 0, 10, 10, 16).digest() == SliceMask.full(1, 0, 10, 10, 16).digest()


def test_constructors_name_what_is_wrong():
    for dtype in (torch.uint16, torch.uint32, torch.uint64):  # checked as int64
        assert SliceMask.from_topk(torch.tensor([[[[3, 1, 2]]]]).to(dtype), 4, 3, 5).indices.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="outside"):
        SliceMask.from_topk(torch.tensor([[[[2**63 + 1]]]], dtype=torch.uint64), 4, 3, 5)  # no wrap into a key
    assert SliceMask.from_topk(torch.tensor([[[[3, 1, 2]]]], dtype=torch.uint8), 4, 3, 5).indices.tolist() == [1, 2, 3]
    for dtype, index, kv_len in ((torch.uint8, 200, 300), (torch.int8, 100, 200), (torch.int16, 5, 40000)):
        assert SliceMask.from_topk(torch.tensor([[[[index]]]], dtype=dtype), 4, 3, kv_len).indices.tolist() == [index]
    with pytest.raises(ValueError, match="dense mask has 3 query blocks"):
        SliceMask.from_dense(torch.ones(1, 1, 3, 10, dtype=torch.bool), 128, 100)


def test_density_leaves_out_keys_the_kernels_leave_out():
    """Entries outside [0, kv_len) (a top-k list padded with -1) are not attended to."""
    topk = torch.tensor([[[[0, 1, -1, -1], [2, 3, 4, 9]]]], dtype=torch.int32)  # kv_len 8: -1, 9 outside
    mask = SliceMask.from_topk(topk, 16, 32, 8)
    assert mask.density() == pytest.approx(mask.to_dense().float().mean().item()) == 5 / 16
    repeated = SliceMask(torch.tensor([[[0, 3]]], dtype=torch.int32), torch.tensor([2, 2, 7], dtype=torch.int32), 16, 16, 8)
    assert repeated.density() == 3 / 8  # a key listed twice counts twice


@pytest.mark.parametrize("pair", [(0, 2**31 - 1), (32767, 2**31 - 1), (100, -2147450779), (0, -2147450879)])
def test_a_digest_tells_apart_masks_that_differ_in_one_key(pair):
    keys = [SliceMask(torch.tensor([[[0, 1]]], dtype=torch.int32), torch.tensor([key], dtype=torch.int32), 16, 16, 8)
            for key in pair]
    assert keys[0].digest() != keys[1].digest()


def test_to_refuses_a_dtype():
    with pytest.raises(TypeError, match="takes a device, got the dtype torch.int64"):
        SliceMask.full(1, 1, 16, 8, 16).to(torch.int64)


@pytest.mark.parametrize("build", [lambda: SliceMask.from_dense(torch.zeros(1, 1, 1, 4, dtype=torch.bool), 16, 16,
                                                                capacity=2**31),
                                   lambda: SliceMask.full(1, 1, 2**40, 0, 1)])
def test_int32_limits_are_checked_before_allocating(build):
    with pytest.raises(ValueError, match=r"capacity=2147483648 is more than int32|rows x 0 keys exceed int32"):
        build()


def test_to_dense_builds_the_map_in_groups_of_rows_with_the_same_result(monkeypatch):
    """The (row, key) pairs of a whole full mask took about 40 bytes per kept slice at once."""
    import fgcupy.mask as mask_module

    gen = torch.Generator().manual_seed(5)
    dense = torch.rand(2, 3, 5, 70, generator=gen) < 0.4
    dense[0, 1, 2] = False  # an empty row
    mask = SliceMask.from_dense(dense, 64, 300)
    whole = mask.to_dense()
    for pairs in (1, 7, 40, 10**6):
        monkeypatch.setattr(mask_module, "_PAIRS_PER_PASS", pairs)
        assert torch.equal(mask.to_dense(), whole), pairs
    assert torch.equal(whole, dense)


def test_a_full_mask_of_no_rows_builds_no_keys():
    """It built arange(kv_len) to repeat it zero times: 8 GB at the largest kv_len."""
    mask = SliceMask.full(0, 8, 4096, 2**29, 128)
    assert mask.capacity == 0 and mask.indices.numel() == 0


def test_offsets_past_the_list_make_an_empty_row_for_density_and_digest_too():
    """A start past the list is clamped as the kernels clamp it (an empty row), and a key equal to
    kv_len is dropped as they drop it: density, the dense map and the digest agree."""
    past = SliceMask(torch.tensor([[[5, 7, 9]]], dtype=torch.int32), torch.tensor([0, 1, 9], dtype=torch.int32),
                     4, 8, 8)
    assert past.density() == float(past.to_dense().float().mean()) and isinstance(past.digest(), int)
    at_end = SliceMask(torch.tensor([[[0, 2]]], dtype=torch.int32), torch.tensor([1, 8], dtype=torch.int32), 4, 4, 8)
    assert at_end.density() == float(at_end.to_dense().float().mean()) == 1 / 8


def test_the_digest_tells_apart_the_key_length_the_slice_size_and_each_key_bit():
    indptr, indices = torch.tensor([[[0, 1]]], dtype=torch.int32), torch.tensor([5], dtype=torch.int32)
    base = SliceMask(indptr, indices, 4, 4, 512)
    assert base.digest() != SliceMask(indptr, indices, 4, 4, 64).digest()
    assert base.digest() != SliceMask(indptr, indices, 8, 4, 512).digest()
    for bit in range(9):  # keys differing in one bit, low half and high
        other = SliceMask(indptr, indices ^ (1 << bit), 4, 4, 512)
        assert base.digest() != other.digest(), bit


def test_from_topk_refuses_an_index_equal_to_kv_len():
    with pytest.raises(ValueError, match="outside"):
        SliceMask.from_topk(torch.tensor([[[[1, 8]]]]), 4, 4, 8)


def test_random_topk_mask_rounds_the_key_count():
    assert (random_topk_mask(1, 1, 8, 10, 4, 0.39).row_lengths() == 4).all()  # 3.9 keys: 4, not 3


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_mask_algebra_bounds_rows_as_the_kernels_do_and_refuses_what_it_must():
    from fgcupy.mask_algebra import drop_keys, slice_heads, take_blocks

    one_past = SliceMask(_i32([[[0, 2], [2, 7]]]), _i32([0, 1, 2, 3, 4, 5]), 4, 4, 8)  # head 1 ends at 7 > 6
    with pytest.raises(ValueError, match="outside its index buffer"):
        slice_heads(one_past, range(1, 2))
    outside = SliceMask(_i32([[[-2, 1], [1, 8]]]), _i32([5, 6, 7]), 4, 4, 8)  # clamped: [0, 1) and [1, 3)
    assert torch.equal(drop_keys(outside, torch.ones(1, 8, dtype=torch.bool)).to_dense(), outside.to_dense())
    with pytest.raises(ValueError, match="blocks"):
        take_blocks(SliceMask.full(1, 1, 128, 300, 64), [2], 64)  # block 2 of 2
