"""Candidates for a sparse refresh that searches around the old mask.

Attention in video transformers moves slowly between diffusion steps, and where it moves it
mostly shifts: a head that looked at a key now looks at its neighbour in the token grid. A sparse
refresh (exact column maxima over candidate keys, SparseAttentionConfig(sparse_refresh=True)) that
also scores the old mask's keys moved by one token, one row or one frame follows that drift step
by step (a local search), where the cheap predictor alone cannot see structure finer than a
query block. ``union_keys`` builds those candidates without duplicates, so each key is scored once.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from .attention import sparse_attention
from .jit.runtime import kernels_can_run
from .mask import SliceMask, is_int
from .mask_algebra import check_union, union_reference
from .op_library import define, pack_csr, packed_csr_empty, unpack_csr


def union_keys(mask: SliceMask, offsets=(0,), extra: SliceMask | None = None) -> SliceMask:
    """Per row, the keys of ``mask`` moved by each of ``offsets`` (0: the keys themselves) and the
    keys of ``extra`` (a mask of the same shape), inside [0, kv_len), sorted and unique. On CUDA
    tensors one kernel counts and one writes (one host sync for the size); elsewhere the torch
    reference (mask_algebra.union_reference). Under torch.compile, an op whose index count is a
    run-time value (``torch.ops.fgcupy.union_keys``)."""
    if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Iterable):
        raise TypeError(f"offsets must be a sequence of ints, e.g. (0, 1, -1), got {type(offsets).__name__}")
    offsets = tuple(int(o) if isinstance(o, np.integer) else o for o in offsets)
    if not torch.compiler.is_compiling():
        return _union_keys(mask, offsets, extra)
    check_union(mask, offsets, extra)
    indptr, indices = unpack_csr(torch.ops.fgcupy.union_keys(
        mask.indptr, mask.indices, list(offsets), None if extra is None else extra.indptr,
        None if extra is None else extra.indices, mask.slice_m, mask.q_len, mask.kv_len), mask.indptr.shape)
    return SliceMask(indptr, indices, mask.slice_m, mask.q_len, mask.kv_len)


def _union_keys(mask: SliceMask, offsets: tuple, extra: SliceMask | None) -> SliceMask:
    if isinstance(mask, SliceMask) and mask.device.type == "cuda" and kernels_can_run():
        from .mask_kernels import gpu_union

        check_union(mask, offsets, extra)
        joined = gpu_union(mask, offsets, extra)
        if joined is not None:
            return joined
    return union_reference(mask, offsets, extra)


def _union_op(indptr, indices, offsets, extra_indptr, extra_indices, slice_m, q_len, kv_len):
    mask = SliceMask(indptr, indices, slice_m, q_len, kv_len)
    extra = None if extra_indptr is None else SliceMask(extra_indptr, extra_indices, slice_m, q_len, kv_len)
    joined = _union_keys(mask, tuple(offsets), extra)
    return pack_csr(joined.indptr, joined.indices)


def _union_fake(indptr, indices, offsets, extra_indptr, extra_indices, slice_m, q_len, kv_len):
    return packed_csr_empty(indptr, indptr.shape)


# union_keys of the mask (indptr, indices) and the optional mask extra, packed (op_library.pack_csr).
define("union_keys(Tensor indptr, Tensor indices, int[] offsets, Tensor? extra_indptr, Tensor? extra_indices, "
       "SymInt slice_m, SymInt q_len, SymInt kv_len) -> Tensor",
       cpu=_union_op, cuda=_union_op, fake=_union_fake)


def refresh_topk(q, k, v, old: SliceMask, candidates: SliceMask, density: float) -> SliceMask:
    """The mask a sparse refresh keeps by top-k at ``density`` (what SparseAttentionConfig
    (sparse_refresh=True) makes with a top-k predictor): attention through ``old`` gives each
    query's LSE over its keys, and the exact column max with that LSE over the keys of
    ``candidates`` (``union_keys`` around ``old``) picks each block's keys. q, k, v [B, H, S, D]."""
    _, lse = sparse_attention(q, k, v, old, return_lse=True)
    from .scoring import predict_mask  # loads with the first search, not with the op's registration

    return predict_mask(q, k, old.slice_m, "colmax", rule="topk", density=density, lse=lse, candidates=[candidates])


def grid_offsets(grid) -> tuple[int, int, int]:
    """Key offsets of one token, one row and one frame of a (frames, height, width) token grid."""
    grid = tuple(grid)
    if len(grid) != 3 or any(not is_int(n) or n < 1 for n in grid):
        raise ValueError(f"grid must be three positive ints (frames, height, width), got {grid!r}")
    _, height, width = map(int, grid)
    return 1, width, height * width


def search_offsets(grid, refresh: int) -> tuple[int, int, int]:
    """The offsets a local search scores on its ``refresh``-th refresh: the keys themselves and
    one step of the grid either way, a token, a row and a frame in turn. One kind a refresh scored
    1.2-2.2x the mask's keys on the head families, all three at once 1.4-3.5x for errors within
    0-0.06x of it but on sharp Gaussians (notes/results/local_search_families_cpu_3x30x52.log)."""
    if not is_int(refresh) or refresh < 0:
        raise ValueError(f"refresh must be a non-negative int (which refresh this is), got {refresh!r}")
    step = grid_offsets(grid)[int(refresh) % 3]
    return 0, step, -step
