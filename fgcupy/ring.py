"""Ulysses x ring sequence parallelism: a grid of R spans x U ranks.

Ulysses alone (fgcupy.distributed) stops at world size = head count and its all-to-all grows
with the ranks. Here the group's ranks form R *spans* of U consecutive ranks (rank order is
sequence order): within a span, an all-to-all gives each rank U-th of the heads over the span's
tokens (Ulysses); across spans, the ranks holding the same heads (a *ring*) all-gather their
keys and values, and each attends its span's queries over every span's keys with the slice mask
restricted to that span, merging the partial outputs exactly through their log-sum-exps. A
second all-to-all returns the output to the tokens' owners.

Masks: a static SliceMask over the whole sequence and all heads (or None: every key); each span
must start on a slice boundary (shard lengths multiple of slice_m, the last one excepted), so a
query block never straddles two spans. Self-attention only (k, v shards as long as q's).
Construct it on every rank of ``group`` (others need not take part): its sub-groups are created
among their members alone, once per set of ranks for the default group's lifetime.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.distributed as dist

from .attention import dense_attention_with_lse, sparse_attention
from .layout import LAYOUTS
from .mask import SliceMask, is_int
from .mask_algebra import restrict_keys, slice_heads, slice_rows
from .reference import reference_attention
from .sp_exchange import probe_all_to_all, return_heads, send_heads
from .sp_handshake import (CONSTRUCTING, DENSE_SLICE_M, _DTYPE_CODES, _HEADER, _MASK_KINDS, _scale_code, _wait,
                           check_agreement, check_attention_inputs, collective_timeout, gather_headers, head_ranges,
                           shard_views)



# Sub-groups by their ranks, per default group (weakly: a destroyed one takes its sub-groups).
_SUBGROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _subgroup(ranks: list):
    """The process group of ``ranks`` (None on a rank outside it), created among its members
    alone, so ranks outside the caller's group need not call in (a world-wide creation they skip
    would leave their later groups out of step); group-local creation names a group by its ranks,
    so each set is created once and shared."""
    made = _SUBGROUPS.setdefault(dist.group.WORLD, {})
    key = tuple(sorted(ranks))
    if key not in made:
        made[key] = dist.new_group(list(key), use_local_synchronization=True)
    return made[key]


def _agree_on_ring(group, ring, world: int) -> None:
    """ValueError on every rank unless every rank of ``group`` asked for the same valid ``ring``
    (one all-gather, bounded by the collective timeout on gloo; a rank with an invalid ring takes
    part too, so the others hear of it instead of waiting)."""
    valid = is_int(ring) and 1 <= ring <= world and world % ring == 0
    local = dict.fromkeys(_HEADER, 0) | {"error": CONSTRUCTING, "ring": int(ring) if valid else 0}
    headers = gather_headers(group, local, torch.device("cpu"), world)  # a header: see CONSTRUCTING
    calling = [rank for rank, h in enumerate(headers) if h["error"] != CONSTRUCTING]
    if calling:
        raise ValueError(f"rank(s) {calling} called sequence-parallel attention while this rank constructs a "
                         "HybridSequenceParallelAttention (a collective of the group): construct the engines on "
                         "every rank before calling them")
    if not valid:
        raise ValueError(f"ring must be a positive int dividing the group's {world} ranks, got {ring!r}")
    rings = [h["ring"] for h in headers]
    bad = [rank for rank, value in enumerate(rings) if value == 0]
    if bad:
        raise ValueError(f"rank(s) {bad} gave a ring size that does not divide the group's {world} ranks")
    if len(set(rings)) > 1:
        raise ValueError(f"the ranks asked for different ring sizes {rings}: every rank of the group must give one")


class HybridSequenceParallelAttention:
    """``HybridSequenceParallelAttention(group, ring=R)(q_shard, k_shard, v_shard, mask)``.

    ``ring``: the number of spans R (it divides the group's size W; U = W / R ranks per span).
    ring=1 is Ulysses over the whole group, ring=W pure ring attention.
    """

    def __init__(self, group=None, *, ring: int):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        if dist.get_rank(group) < 0:
            raise ValueError("this process is not a member of the given process group")
        world = dist.get_world_size(group)
        _agree_on_ring(group, ring, world)  # ranks that differ would create sub-groups out of step: a hang
        ring = int(ring)
        self.group, self.ring, self.ulysses = group, ring, world // ring
        ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(world)]
        span_groups = [_subgroup([ranks[j * self.ulysses + u] for u in range(self.ulysses)]) for j in range(ring)]
        ring_groups = [_subgroup([ranks[j * self.ulysses + u] for j in range(ring)]) for u in range(self.ulysses)]
        rank = dist.get_rank(group)
        self.span, self.member = divmod(rank, self.ulysses)
        self.span_group, self.ring_group = span_groups[self.span], ring_groups[self.member]
        self._rows_key, self._rows_mask = None, None  # this rank's rows of the last mask
        self._checked_mask = None  # (the last mask, its digest for the cross-rank check, its heads on this rank)

    def __call__(self, q, k, v, mask: SliceMask | None = None, *, layout: str = "HND", scale: float | None = None,
                 return_lse: bool = False):
        """Attention of this rank's query shard over the whole sequence: ``out`` in q's layout
        (and float32 ``lse [B, H, S_r]`` with ``return_lse``)."""
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        local = dict.fromkeys(_HEADER, 0)
        local["ring"] = self.ring  # Ulysses alone sends 0: ranks calling the other engine raise
        problem = None
        try:
            qh, kh, vh = self._check_local(q, k, v, mask, layout, scale, return_lse, local)
        except Exception as err:  # noqa: BLE001 - raised below, after the other ranks hear of it
            problem = err
        local["error"] = int(problem is not None)
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        headers = gather_headers(self.group, local, device, world)
        if problem is not None:
            raise problem
        bad = [i for i, h in enumerate(headers) if h["error"]]
        if bad:
            raise ValueError(f"hybrid sequence-parallel attention stopped: rank(s) {bad} rejected their inputs")
        lens, _ = check_agreement(headers)  # k/v shards equal q's (checked locally)
        U = self.ulysses
        spans = [sum(lens[j * U:(j + 1) * U]) for j in range(self.ring)]
        starts = [sum(spans[:j]) for j in range(self.ring)]
        slice_sizes = sorted({h["mask_slice_m"] for h in headers if h["mask"]})
        if len(slice_sizes) > 1:
            raise ValueError(f"ranks disagree on the mask's slice size: {[h['mask_slice_m'] for h in headers]} "
                             "(rank order)")
        slice_m = slice_sizes[0] if slice_sizes else DENSE_SLICE_M
        if slice_sizes and any(s % slice_m for s in starts):
            raise ValueError(f"every span must start on a slice boundary (slice_m={slice_m}); span starts {starts} "
                             f"(shards {lens})")
        out, lse = self._attend(qh, kh, vh, mask, lens, spans, starts, scale, return_lse, rank)
        out = out if layout == "HND" else out.transpose(1, 2)
        return (out, lse) if return_lse else out

    def _check_local(self, q, k, v, mask, layout, scale, return_lse, local):
        collective_timeout()  # a bad FGCUPY_COLLECTIVE_TIMEOUT_S raises before the header, on every rank
        qh, kh, vh = shard_views(q, k, v, layout)
        if kh.shape != qh.shape or vh.shape != qh.shape or kh.dtype != qh.dtype or vh.dtype != qh.dtype:
            raise ValueError(f"q, k, v shards must agree in shape and dtype (self-attention); got "
                             f"{tuple(qh.shape)} {qh.dtype}, {tuple(kh.shape)} {kh.dtype}, {tuple(vh.shape)} {vh.dtype}")
        check_attention_inputs(qh, kh, vh, uses_kernel=qh.device.type == "cuda")
        if mask is not None and not isinstance(mask, SliceMask):
            raise TypeError(f"mask must be a fgcupy.SliceMask over the whole sequence or None, got {type(mask).__name__}")
        batch, heads, q_len, head_dim = qh.shape
        local.update(batch=batch, heads=heads, head_dim=head_dim, q_len=q_len, kv_len=q_len,
                     dtype=_DTYPE_CODES[qh.dtype], head_groups=1, attend=1, return_lse=int(bool(return_lse)),
                     layout=LAYOUTS.index(layout), scale=_scale_code(scale),
                     mask_kind=_MASK_KINDS["none" if mask is None else "static"])
        if mask is not None:
            if (mask.batch, mask.heads) != (batch, heads):
                raise ValueError(f"mask is for (B, H)={(mask.batch, mask.heads)}, q for {(batch, heads)}")
            if self._checked_mask is None or self._checked_mask[0] is not mask:  # one sync per new mask
                # with this rank's heads, sliced before the header: a mask bad there raises on every rank
                self._checked_mask = (mask, mask.digest(), slice_heads(mask, head_ranges(heads, self.ulysses)[self.member]))
            local.update(mask=1, mask_batch=mask.batch, mask_heads=mask.heads, mask_q_len=mask.q_len,
                         mask_kv_len=mask.kv_len, mask_slice_m=mask.slice_m, mask_digest=self._checked_mask[1])
        return qh, kh, vh

    def _attend(self, qh, kh, vh, mask, lens, spans, starts, scale, return_lse, rank):
        batch, heads, _, head_dim = qh.shape
        U, j, u = self.ulysses, self.span, self.member
        subs = head_ranges(heads, U)
        mine = subs[u]
        span_lens = lens[j * U:(j + 1) * U]
        method = probe_all_to_all(self.span_group, qh.device)
        views, pending = send_heads(self.span_group, [qh, kh, vh], span_lens, subs, method, 0, U, u)
        pending.wait()
        qj, kj, vj = views  # [B, h, span_j, D]
        keys, values = self._gather_ring(kj.contiguous(), vj.contiguous(), spans)
        work = torch.float64 if qh.dtype == torch.float64 else torch.float32  # the merge's precision
        out = torch.zeros(batch, len(mine), spans[j], head_dim, dtype=work, device=qh.device)
        lse = torch.full((batch, len(mine), spans[j]), -math.inf, dtype=work, device=qh.device)
        if len(mine):
            rows = None if mask is None else self._rows(mask, mine, batch, spans, starts, qh.device)
            for i in range(self.ring):
                if spans[i] == 0 or spans[j] == 0:
                    continue
                part = None if rows is None else restrict_keys(rows, starts[i], starts[i] + spans[i])
                out, lse = _merge(out, lse, *_partial(qj, keys[i], values[i], part, scale, work))
        grid = out.to(qh.dtype).permute(2, 0, 1, 3).contiguous()  # [span_j, B, h, D]
        pending, chunks = return_heads(self.span_group, grid, subs, span_lens, method, 1, U, u)
        pending.wait()
        result = torch.empty_like(qh)
        for sub, chunk in zip(subs, chunks):
            if len(sub) and chunk.numel():
                result[:, sub.start:sub.stop].copy_(chunk.permute(1, 2, 0, 3))
        lse_out = None
        if return_lse:
            pending, chunks = return_heads(self.span_group, lse.float().permute(2, 0, 1).contiguous(), subs, span_lens,
                                           method, 2, U, u)
            pending.wait()
            lse_out = torch.empty(batch, heads, qh.shape[2], dtype=torch.float32, device=qh.device)
            for sub, chunk in zip(subs, chunks):
                if len(sub) and chunk.numel():
                    lse_out[:, sub.start:sub.stop].copy_(chunk.permute(1, 2, 0))
        return result, lse_out

    def _gather_ring(self, k, v, spans):
        """Every span's keys and values of this rank's heads (all-gather over the ring, padded to
        the longest span)."""
        longest = max(spans)
        pad = longest - k.shape[2]
        kv = torch.nn.functional.pad(torch.stack([k, v]), (0, 0, 0, pad))
        gathered = [torch.empty_like(kv) for _ in range(self.ring)]
        _wait(dist.all_gather(gathered, kv, group=self.ring_group, async_op=True), self.ring_group)
        return [g[0, :, :, :n] for g, n in zip(gathered, spans)], [g[1, :, :, :n] for g, n in zip(gathered, spans)]

    def _rows(self, mask, heads, batch, spans, starts, device):
        """The mask of this rank's heads and its span's query blocks, over every key; kept while
        the same mask object comes back (slicing heads synchronises), as SequenceParallelAttention
        keeps its static masks."""
        key = (id(mask), heads, batch, tuple(spans), device)
        if self._rows_key == key and self._rows_mask[0] is mask:
            return self._rows_mask[1]
        j = self.span
        rows = slice_rows(self._checked_mask[2].to(device), starts[j] // mask.slice_m, spans[j])
        self._rows_key, self._rows_mask = key, (mask, rows)
        return rows


def _partial(q, k, v, part, scale, work):
    """(out, lse) in ``work`` precision of q [B, h, S_q, D] over k, v through the SliceMask
    ``part`` (None: every key). CPU tensors run the reference in ``work``, so a partial result
    is not rounded to q's dtype before the merge (float64 stays float64); GPU tensors the kernels."""
    if q.device.type == "cpu":
        if part is None:
            part = SliceMask.full(q.shape[0], q.shape[1], q.shape[2], k.shape[2], DENSE_SLICE_M)
        return reference_attention(q, k, v, part, scale=scale, dtype=work)
    if part is None:  # every key: dense attention (head groups within the dense index budget)
        out, lse = dense_attention_with_lse(q, k, v, DENSE_SLICE_M, scale=scale)
    else:
        out, lse = sparse_attention(q, k, v, part, scale=scale, return_lse=True)
    return out.to(work), lse.to(work)


def _merge(out, lse, out_i, lse_i):
    """Exact merge of two partial attentions over disjoint key sets (in their dtype; -inf = no
    key)."""
    both = torch.maximum(lse, lse_i)
    base = torch.where(torch.isfinite(both), both, 0.0)
    w, w_i = torch.exp(lse - base), torch.exp(lse_i - base)
    total = w + w_i
    merged = torch.where(total == 0, -math.inf, base + torch.log(total))  # NaN stays NaN
    safe = torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return (out * w.unsqueeze(-1) + out_i * w_i.unsqueeze(-1)) / safe, merged
