"""Mask algebra beside SliceMask: slicing and joining heads, dropping keys, gathering rows (the
one indptr builder is fgcupy.mask.indptr_from_offsets)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .mask import (INT32_MAX, SliceMask, check_key_valid, indptr_from_counts, indptr_from_offsets, is_int,
                   num_blocks)


def concat_heads(masks, order=None) -> SliceMask:
    """One mask holding the heads of ``masks`` in order (equal batch, lengths and slice size): what
    ``slice_heads`` over consecutive head ranges undoes. With ``order``, head i of the result is
    head ``order[i]`` of that concatenation (``take_heads`` fused in: one gather). Gathers on the
    device; one host sync."""
    if isinstance(masks, SliceMask) or not hasattr(masks, "__iter__"):
        raise TypeError(f"concat_heads needs a sequence of one or more fgcupy.SliceMask, got {type(masks).__name__}")
    masks = list(masks)
    if not masks or not all(isinstance(m, SliceMask) for m in masks):
        raise TypeError("concat_heads needs one or more fgcupy.SliceMask")
    first = masks[0]
    shape = (first.batch, first.q_len, first.kv_len, first.slice_m, first.device)
    for m in masks[1:]:
        if (m.batch, m.q_len, m.kv_len, m.slice_m, m.device) != shape:
            raise ValueError(f"masks to join must agree on (batch, q_len, kv_len, slice_m, device): {shape} vs "
                             f"{(m.batch, m.q_len, m.kv_len, m.slice_m, m.device)}")
    if len(masks) == 1:
        return first if order is None else take_heads(first, order)
    bases, base = [], 0
    for m in masks:
        bases.append(base)
        base += m.capacity
    bounds = [_row_bounds(m) for m in masks]
    starts = torch.cat([start + b for (start, _), b in zip(bounds, bases)], dim=1)
    ends = torch.cat([end + b for (_, end), b in zip(bounds, bases)], dim=1)
    if order is not None:
        index = _head_index(order, starts.shape[1], first.device)
        starts, ends = starts.index_select(1, index), ends.index_select(1, index)
    return _pack_rows(torch.cat([m.indices for m in masks]), starts, ends, first)


def _int_tensor(value) -> bool:
    return torch.is_tensor(value) and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)


def _int_scalar_tensor(value) -> bool:
    return _int_tensor(value) and value.dim() == 0


def _int_list(values, name: str, what: str) -> list:
    """``values`` (a sequence, an iterator or an int tensor of ints) as Python ints; TypeError
    saying ``name`` must be a sequence of int ``what`` otherwise."""
    if isinstance(values, (str, bytes)) or not (hasattr(values, "__iter__") or _int_tensor(values)) \
            or getattr(values, "ndim", None) == 0:  # a 0-d tensor or array: one value, not a sequence
        raise TypeError(f"{name} must be a sequence of int {what}, got {values!r}")
    values = [v.item() if _int_scalar_tensor(v) else v for v in
              (values.reshape(-1) if _int_tensor(values) else values)]  # one pass: iterators too
    if not all(is_int(v) for v in values):
        raise TypeError(f"{name} must be a sequence of int {what}, got {values!r}")
    return [int(v) for v in values]


def _head_index(heads, count: int, device) -> torch.Tensor:
    order = _int_list(heads, "heads", "head indices")
    if not order or any(h < 0 or h >= count for h in order):
        raise ValueError(f"heads must be one or more head indices in [0, {count}), got {order}")
    return torch.tensor(order, dtype=torch.int64, device=device)


def take_heads(mask: SliceMask, heads) -> SliceMask:
    """The mask whose head i is ``mask``'s head ``heads[i]`` (any order, repeats allowed), packed
    back to back. Gathers on the device; one host sync."""
    if not isinstance(mask, SliceMask):
        raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
    index = _head_index(heads, mask.heads, mask.device)
    starts, ends = _row_bounds(mask)
    return _pack_rows(mask.indices, starts.index_select(1, index), ends.index_select(1, index), mask)


def _row_bounds(mask: SliceMask) -> tuple:
    """int64 [B, H, QB] (start, end) of each row, clamped into the index list as the kernels
    clamp them (SliceMask.row_bounds)."""
    starts, ends = mask.row_bounds()
    shape = mask.indptr[..., :-1].shape
    return starts.reshape(shape), ends.reshape(shape)


def _pack_rows(source, starts, ends, like: SliceMask) -> SliceMask:
    """The mask of shape starts.shape (B, H, QB) whose row r is ``source[starts[r] : ends[r]]``
    (one host sync for the total)."""
    batch, heads, q_blocks = starts.shape
    starts, ends = starts.reshape(-1), ends.reshape(-1)
    lengths = (ends - starts).clamp_min(0)
    offsets = torch.zeros(starts.numel() + 1, dtype=torch.int64, device=source.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    total = int(offsets[-1].item())
    if total > torch.iinfo(torch.int32).max:
        raise ValueError(f"the mask keeps {total} slices, more than int32 offsets can address")
    return packed_mask(offsets, gather_rows(source, starts, lengths, offsets, total), (batch, heads, q_blocks), like)


def gather_rows(source, starts, lengths, offsets, total):
    """Rows ``source[starts[r] : starts[r] + lengths[r]]`` packed back to back (row r from
    ``offsets[r]``; ``total`` keys in all)."""
    row_of = torch.repeat_interleave(torch.arange(starts.numel(), device=source.device), lengths, output_size=total)
    positions = starts[row_of] + torch.arange(total, device=source.device) - offsets[:-1][row_of]
    return source[positions]


def packed_mask(offsets, indices, shape, like: SliceMask) -> SliceMask:
    """A mask of ``shape`` (B, H, QB) whose rows sit back to back in ``indices`` from ``offsets``
    (int64, one per row plus the end), with ``like``'s slice size and lengths."""
    indptr = indptr_from_offsets(offsets.to(torch.int32), *shape)
    return SliceMask(indptr, indices, like.slice_m, like.q_len, like.kv_len)


def slice_heads(mask: SliceMask, heads: range) -> SliceMask:
    """The mask of heads ``heads`` (a step-1 range) of ``mask``, with compact storage.

    Masks whose rows are stored back to back (``from_topk``, ``from_dense``, ``full``) give a view
    of their index buffer; any other storage order is gathered. Offsets outside the buffer are
    refused (ValueError), not clamped as the kernels clamp them: the sequence-parallel engines
    split heads with it, and a rank that attends a corrupt head must refuse, so that every rank
    raises. Reads four scalars (one host synchronisation), so call it when planning, not per step.
    """
    if not isinstance(mask, SliceMask):
        raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
    if not isinstance(heads, range) or heads.step != 1:
        raise TypeError(f"heads must be a range with step 1, got {heads!r}")
    if heads.start < 0 or heads.stop > mask.heads or heads.stop < heads.start:
        raise ValueError(f"heads {heads} are outside the mask's {mask.heads} heads")
    indptr = mask.indptr[:, heads.start:heads.stop]
    batch, count, width = indptr.shape
    q_blocks = width - 1
    rows = batch * count * q_blocks
    if rows == 0:
        empty = torch.zeros(batch, count, width, dtype=torch.int32, device=mask.device)
        return SliceMask(empty, mask.indices[:0], mask.slice_m, mask.q_len, mask.kv_len)
    starts = indptr[..., :-1].reshape(-1).to(torch.int64)
    ends = indptr[..., 1:].reshape(-1).to(torch.int64)
    lengths = (ends - starts).clamp_min(0)
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=mask.device)
    torch.cumsum(lengths, 0, out=offsets[1:])
    back_to_back = (ends >= starts).all()
    if rows > 1:
        back_to_back = back_to_back & (starts[1:] == ends[:-1]).all()
    in_bounds = ((lengths == 0) | ((starts >= 0) & (ends <= mask.capacity))).all()
    flag, inside, first, total = torch.stack(
        [back_to_back.to(torch.int64), in_bounds.to(torch.int64), starts[0], offsets[-1]]).tolist()
    if not inside:
        raise ValueError(f"mask offsets of heads {heads} point outside its index buffer (capacity {mask.capacity})")
    if total > torch.iinfo(torch.int32).max:
        raise ValueError(f"heads {heads} keep {total} slices, more than int32 offsets can address")
    if flag:
        indices = mask.indices[first:first + total]
    else:
        indices = gather_rows(mask.indices, starts, lengths, offsets, total)
    return packed_mask(offsets, indices, (batch, count, q_blocks), mask)


def drop_keys(mask: SliceMask, key_valid: torch.Tensor) -> SliceMask:
    """``mask`` without the keys where ``key_valid`` (bool ``[B, KV]``) is False and without keys
    outside [0, kv_len), on the GPU and without a host synchronisation (same capacity; rows stay
    sorted). Rows may sit anywhere in the buffer and may share entries, but an entry that rows of
    several batches share stays only where every one of those batches keeps its key: a mask
    broadcast over batch entries padded differently loses, in each, the keys the others pad.
    Give each batch entry rows of its own (as ``predict_mask`` and ``SliceMask.full`` do) to keep
    them."""
    _check_mask(mask)
    batch, heads, q_blocks, kv_len = mask.batch, mask.heads, mask.q_blocks, mask.kv_len
    check_key_valid(key_valid, batch, kv_len)
    device, capacity = mask.device, mask.capacity
    key_valid = key_valid.to(device)
    if capacity == 0 or batch * heads * q_blocks == 0:
        return mask
    # Rows bounded as the kernels bound them; each batch's rows mark the entries they cover
    # (+1 at a row's start, -1 at its end, summed), and an entry stays where it is a key in
    # range that every batch covering it keeps.
    starts, ends = (bound.view(batch, -1) for bound in mask.row_bounds())
    keys = mask.indices.to(torch.int64)
    in_range = (keys >= 0) & (keys < kv_len)
    keys = keys.clamp(0, max(kv_len - 1, 0))
    covered = torch.zeros(capacity, dtype=torch.bool, device=device)
    keep = in_range
    ones = torch.ones(starts.shape[1], dtype=torch.int64, device=device)
    for b in range(batch):
        marks = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
        marks.index_add_(0, starts[b], ones).index_add_(0, ends[b], -ones)
        mine = torch.cumsum(marks, 0)[:capacity] > 0
        if kv_len:  # with no keys every entry is out of range already
            keep = keep & (~mine | key_valid[b, keys])
        covered |= mine
    keep &= covered
    before = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
    torch.cumsum(keep, 0, out=before[1:])
    target = torch.where(keep, before[:-1], capacity)  # dropped entries land in a spare slot
    indices = torch.zeros(capacity + 1, dtype=torch.int32, device=device).scatter_(0, target, mask.indices)
    offsets = mask.indptr.to(torch.int64).clamp(0, capacity)
    indptr = before[offsets].to(torch.int32)
    return SliceMask(indptr, indices[:capacity], mask.slice_m, mask.q_len, kv_len)


def slice_rows(mask: SliceMask, first_block: int, q_len: int) -> SliceMask:
    """The query blocks of queries [first_block * slice_m, + q_len) as a mask of its own (no copy
    of the indices, no host sync)."""
    _check_mask(mask)
    _check_ints(first_block=first_block, q_len=q_len)
    last = min(mask.q_blocks, first_block + num_blocks(q_len, mask.slice_m))
    if not 0 <= first_block <= last:
        raise ValueError(f"rows from block {first_block} are outside the mask's {mask.q_blocks} blocks")
    first_query = first_block * mask.slice_m
    if first_query + q_len > mask.q_len:
        raise ValueError(f"queries [{first_query}, {first_query + q_len}) reach past the mask's q_len={mask.q_len}")
    return SliceMask(mask.indptr[..., first_block : last + 1].contiguous(), mask.indices, mask.slice_m, q_len,
                     mask.kv_len)


def take_blocks(mask: SliceMask, blocks, q_len: int) -> SliceMask:
    """The mask of query blocks ``blocks`` (ints) of ``mask``, back to back, for a sequence of
    ``q_len`` queries: the rows of those blocks, gathered (one host sync)."""
    _check_mask(mask)
    _check_ints(q_len=q_len)
    blocks = _int_list(blocks, "blocks", "query block indices")
    if any(not 0 <= b < mask.q_blocks for b in blocks) or num_blocks(q_len, mask.slice_m) != len(blocks):
        raise ValueError(f"blocks {blocks} must be blocks of the mask's {mask.q_blocks}, as many as q_len={q_len} "
                         f"fills (slice_m={mask.slice_m})")
    index = torch.tensor(blocks, dtype=torch.int64, device=mask.device)
    starts, ends = _row_bounds(mask)
    shape = _Lengths(mask.slice_m, q_len, mask.kv_len)
    return _pack_rows(mask.indices, starts.index_select(2, index), ends.index_select(2, index), shape)


class _Lengths(NamedTuple):
    """What packed_mask takes from its ``like``: a mask's slice size and lengths."""
    slice_m: int
    q_len: int
    kv_len: int


def restrict_keys(mask: SliceMask, start: int, stop: int) -> SliceMask:
    """The keys [start, stop) of ``mask``, renumbered from 0 (kv_len = stop - start), on the
    device and without a host synchronisation."""
    _check_mask(mask)
    _check_ints(start=start, stop=stop)
    if not 0 <= start <= stop <= mask.kv_len:
        raise ValueError(f"key range [{start}, {stop}) is outside [0, kv_len={mask.kv_len}]")
    valid = torch.zeros(mask.batch, mask.kv_len, dtype=torch.bool, device=mask.device)
    valid[:, start:stop] = True
    kept = drop_keys(mask, valid)
    return SliceMask(kept.indptr, (kept.indices - start).clamp_min(0), mask.slice_m, mask.q_len, stop - start)


def _check_mask(mask, name: str = "mask") -> None:
    if not isinstance(mask, SliceMask):
        raise TypeError(f"{name} must be a fgcupy.SliceMask, got {type(mask).__name__}")


def _check_ints(**values) -> None:
    for name, value in values.items():
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def union_reference(mask: SliceMask, offsets=(0,), extra: SliceMask | None = None) -> SliceMask:
    """The keys of ``mask`` moved by each of ``offsets`` (0: the keys themselves), joined with the
    keys of ``extra`` (same shape), inside [0, kv_len), sorted and unique per row: candidates for
    a local search around a mask. Keys outside [0, kv_len) in either mask are dropped before
    they move (no kernel attends to them), as the kernel does. Plain torch; synchronises
    (``fgcupy.union_keys`` is the kernel)."""
    check_union(mask, offsets, extra)
    rows = mask.batch * mask.heads * mask.q_blocks
    row_of, keys = mask.kept_pairs()
    moved_rows = [row_of for _ in offsets]
    moved_keys = [keys + int(offset) for offset in offsets]
    if extra is not None:
        extra_rows, extra_keys = extra.kept_pairs()
        moved_rows.append(extra_rows)
        moved_keys.append(extra_keys)
    row_of, keys = torch.cat(moved_rows), torch.cat(moved_keys)
    inside = (keys >= 0) & (keys < mask.kv_len)
    flat = torch.unique(row_of[inside] * max(mask.kv_len, 1) + keys[inside])
    counts = torch.bincount(flat // max(mask.kv_len, 1), minlength=rows)
    indptr = indptr_from_counts(counts, mask.batch, mask.heads, mask.q_blocks)
    indices = (flat % max(mask.kv_len, 1)).to(torch.int32)
    return SliceMask(indptr, indices, mask.slice_m, mask.q_len, mask.kv_len)


def check_union(mask, offsets, extra) -> None:
    _check_mask(mask)
    offsets = tuple(offsets)
    from .jit.score_spec import UNION_MAX_OFFSETS  # the kernels' constants load with their first use

    if not 1 <= len(offsets) <= UNION_MAX_OFFSETS:
        raise ValueError(f"offsets must hold 1 to {UNION_MAX_OFFSETS} ints, got {len(offsets)}")
    for offset in offsets:
        if isinstance(offset, bool) or not isinstance(offset, int) or abs(offset) > INT32_MAX:
            raise ValueError(f"offsets must be ints within int32, got {offset!r}")
    if extra is not None:
        _check_mask(extra, "extra")
        shape = (mask.batch, mask.heads, mask.q_len, mask.kv_len, mask.slice_m)
        other = (extra.batch, extra.heads, extra.q_len, extra.kv_len, extra.slice_m)
        if other != shape:
            raise ValueError(f"extra has (B, H, q_len, kv_len, slice_m)={other}, the mask {shape}")
        if extra.device != mask.device:
            raise ValueError(f"extra is on {extra.device}, the mask on {mask.device}")
