"""Candidates of a local search (fgcupy.local_search): the union of a mask's moved keys and
another mask's keys, against a dense construction; the kernel against the reference on a GPU."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataclasses import replace

from fgcupy import predict_mask
from fgcupy.head_families import family_qkv
from fgcupy.jit.score_spec import UNION_MAX_OFFSETS
from fgcupy.local_search import grid_offsets, refresh_topk, search_offsets, union_keys
from fgcupy.mask import SliceMask
from fgcupy.mask_algebra import union_reference
from fgcupy.oracle import Judge
from fgcupy.workloads import SHAPES

from .strategies import dense_masks, mask_from

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def dense_union(dense, offsets, extra=None):
    """bool [B, H, QB, KV]: ``dense`` moved along the keys by each offset (keys pushed past
    either end dropped), OR ``extra``."""
    kv_len = dense.shape[-1]
    out = torch.zeros_like(dense) if extra is None else extra.clone()
    for offset in offsets:
        if offset >= 0:
            out[..., offset:] |= dense[..., : max(kv_len - offset, 0)]
        else:
            out[..., : max(kv_len + offset, 0)] |= dense[..., -offset:]
    return out


def sorted_unique_rows(mask: SliceMask) -> bool:
    lengths = mask.row_lengths().reshape(-1).tolist()
    starts = mask.indptr[..., :-1].reshape(-1).tolist()
    return all(bool((mask.indices[s : s + n].diff() > 0).all()) for s, n in zip(starts, lengths) if n > 1)


@st.composite
def union_cases(draw):
    dense, slice_m, q_len = draw(dense_masks(max_kv=200))
    kv_len = dense.shape[-1]
    offsets = draw(st.lists(st.integers(-kv_len - 3, kv_len + 3), min_size=1, max_size=UNION_MAX_OFFSETS))
    seed = draw(st.integers(0, 2**31 - 1))
    extra = None
    if draw(st.booleans()):
        extra = torch.rand(dense.shape, generator=torch.Generator().manual_seed(seed)) < draw(st.floats(0, 1))
    return dense, slice_m, q_len, offsets, extra


@SETTINGS
@given(union_cases())
def test_union_reference_matches_dense_shifts(case):
    dense, slice_m, q_len, offsets, extra = case
    mask = mask_from(dense, slice_m, q_len)
    got = union_reference(mask, offsets, None if extra is None else mask_from(extra, slice_m, q_len)).validate()
    assert torch.equal(got.to_dense(), dense_union(dense, offsets, extra))
    assert sorted_unique_rows(got)


def test_union_keys_errors():
    mask = SliceMask.full(1, 2, 100, 90, 64)
    with pytest.raises(ValueError, match="offsets must hold"):
        union_keys(mask, ())
    with pytest.raises(ValueError, match="offsets must hold"):
        union_keys(mask, range(UNION_MAX_OFFSETS + 1))
    with pytest.raises(ValueError, match="ints within int32"):
        union_keys(mask, (0, 1.5))
    with pytest.raises(ValueError, match="extra has"):
        union_keys(mask, (0,), SliceMask.full(1, 2, 100, 91, 64))
    with pytest.raises(TypeError, match="SliceMask"):
        union_keys(mask.indptr, (0,))
    with pytest.raises(TypeError, match="offsets must be a sequence of ints"):
        union_keys(mask, 1)
    assert torch.equal(union_keys(mask, (np.int64(0), np.int32(1))).indices, union_keys(mask, (0, 1)).indices)


def test_union_reference_drops_keys_outside_before_moving_them():
    """A corrupt mask's keys outside [0, kv_len) are no kept slices (no kernel attends to them),
    so moving them into range must not make them candidates; as the kernel does."""
    kv_len = 50
    indptr = torch.tensor([[[0, 3, 5]]], dtype=torch.int32)
    indices = torch.tensor([-2, 10, kv_len + 1, 4, kv_len + 3], dtype=torch.int32)
    mask = SliceMask(indptr, indices, 64, 100, kv_len)
    got = union_reference(mask, (0, 2, -3))
    assert got.indptr.tolist() == [[[0, 3, 6]]]
    assert got.indices.tolist() == [7, 10, 12, 1, 4, 6]
    extra = SliceMask(torch.tensor([[[0, 1, 2]]], dtype=torch.int32), torch.tensor([kv_len, 0], dtype=torch.int32),
                      64, 100, kv_len)
    assert union_reference(mask, (0,), extra).indices.tolist() == [10, 0, 4]


def test_grid_offsets_and_the_rotation():
    assert grid_offsets((21, 30, 52)) == (1, 52, 1560)
    assert [search_offsets((21, 30, 52), r) for r in range(4)] == [(0, 1, -1), (0, 52, -52), (0, 1560, -1560),
                                                                 (0, 1, -1)]
    for bad in ((30, 52), (0, 30, 52), (2.0, 30, 52), (True, 3, 4)):
        with pytest.raises(ValueError, match="three positive ints"):
            grid_offsets(bad)
    assert grid_offsets(np.array([21, 30, 52])) == (1, 52, 1560)  # numpy ints, as union_keys takes them
    for refresh in (1.0, -1, None):
        with pytest.raises(ValueError, match="refresh must be a non-negative int"):
            search_offsets((21, 30, 52), refresh)


@pytest.mark.parametrize("family", ["mixture", "window2d", "temporal-strided"])
def test_local_search_walks_towards_the_oracle(family):
    """Six refreshes from the cheap top-k's mask, q and k drifting a little before each: with the old
    keys moved along the grid as candidates the mask ends well below the default's error ratio
    (a plain sparse refresh stays near the default: tools.probe_sparse_refresh)."""
    grid, density = (2, 16, 32), 0.1
    q, k, v = family_qkv(replace(SHAPES["wan14b-480p"], grid=grid, heads=2), family, heads=2, seed=0)
    gen = torch.Generator().manual_seed(7)
    mask = predict_mask(q, k, 128, "topk", density=density)
    for refresh in range(6):
        q, k = (x + 0.1 * torch.randn(x.shape, generator=gen).to(x.dtype) for x in (q, k))
        default = predict_mask(q, k, 128, "topk", density=density)
        mask = refresh_topk(q, k, v, mask, union_keys(mask, search_offsets(grid, refresh), default), density)
    judge = Judge(q, k, v, 128)
    searched, predicted = judge.ratio(mask)[1], judge.ratio(default)[1]
    assert predicted > 1.4 and searched < 0.8 * predicted and searched < 1.4, (searched, predicted)


@pytest.mark.gpu
@SETTINGS
@given(union_cases())
def test_union_kernel_matches_reference(case):
    dense, slice_m, q_len, offsets, extra = case
    mask = mask_from(dense, slice_m, q_len, "cuda")
    other = None if extra is None else mask_from(extra, slice_m, q_len, "cuda")
    got = union_keys(mask, offsets, other).validate()
    expected = union_reference(mask, offsets, other)
    assert torch.equal(got.indptr, expected.indptr)
    assert torch.equal(got.indices, expected.indices)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_len", [32, 1000, 32760, 75600])
def test_union_kernel_long_rows_and_corrupt_lists(kv_len):
    """Rows of video length (one and several words a thread), and lists whose offsets point past
    the buffer or whose keys lie outside [0, kv_len): the valid keys only, no stray access."""
    gen = torch.Generator(device="cuda").manual_seed(kv_len)
    dense = torch.rand(1, 3, 4, kv_len, device="cuda", generator=gen) < 0.1
    mask = SliceMask.from_dense(dense, 128, 500)
    offsets = (0, 1, -1, 52, -1560, kv_len - 1)
    got = union_keys(mask, offsets, SliceMask.from_dense(dense.flip(-1), 128, 500))
    assert torch.equal(got.to_dense(), dense_union(dense, offsets, dense.flip(-1)))
    bad = mask.indices.clone()
    bad[::5] = kv_len + 7
    bad[1::9] = -3
    indptr = mask.indptr.clone()
    indptr[0, -1, -1] = mask.capacity + 1000  # clamped to the buffer's end: the list as it was
    corrupt = union_keys(SliceMask(indptr, bad, 128, 500, kv_len), (0, 2, -9, 5)).validate()
    expected = union_reference(SliceMask(mask.indptr, bad, 128, 500, kv_len), (0, 2, -9, 5))
    assert torch.equal(corrupt.indptr, expected.indptr) and torch.equal(corrupt.indices, expected.indices)
