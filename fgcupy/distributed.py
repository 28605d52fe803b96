"""Sequence-parallel (Ulysses) slice-sparse attention on torch.distributed.

Each rank of a process group passes its contiguous shard of the sequence (rank order is sequence
order) of q, k, v, as ``[B, H, S_r, D]`` (layout "HND") or ``[B, S_r, H, D]`` ("NHD"). An
all-to-all turns sequence shards into head shards: rank j receives heads ``head_ranges(H, P)[j]``
over the whole sequence, attends (fgcupy's kernel on CUDA, the float32 reference elsewhere) and a
second all-to-all returns the output to sequence shards. Attention is per head, so every rank
computes exactly what one process computes for those heads, and masks never travel.

Strategies (chosen so no token and no head is ever padded or dropped):
- Uneven sequence shards: shards may have any lengths (zero included); the exchange uses exact
  split sizes (``all_to_all_single`` with split lists), so nothing is padded and no pad needs
  masking. Lengths are gathered from the ranks on every call (in the header); ``seq_lens``, where
  given, is checked against them.
- Heads the world size does not divide: uneven head groups, the first ``H % P`` ranks own one
  head more (the slowest rank sets the pace: H=40 on P=3 runs like 14 heads on each). Ranks past
  ``H`` (``H < P``) own no head and only relay tokens.
- Masks are per head over the whole sequence (``q_len`` = total tokens). A rank passes the full
  ``H``-head mask (it takes its own heads with ``slice_heads``), a mask of just its own heads, a
  callable ``mask(q, k, heads) -> SliceMask`` (for example ``MaskPredictor``) called per head group
  on the exchanged full-sequence q, k, or None for dense attention.
- Overlap: ``head_groups=G`` splits each rank's heads into G groups and exchanges each group
  separately; attention on group g runs while later groups are still being exchanged and group
  g's output travels back while group g+1 is attended. Collectives are asynchronous: NCCL runs them
  on its own stream, and the compute stream waits on each group's arrival only. G=1 exchanges
  everything before attending. Whether G > 1 pays is measured by bench/bench_distributed.py.
- Exchange: "all_to_all" (``all_to_all_single``, what NCCL uses) or "p2p" (``isend``/``irecv``,
  batched on NCCL), for backends whose all-to-all is missing (gloo lacked it in some torch
  releases). "auto" uses all-to-all on NCCL and probes other backends once per group.
  "copy" (GPUs of one host, NCCL group): every rank writes its pieces straight into its peers'
  buffers with the copy engines (CUDA IPC, fgcupy.peer_copy), so the exchange takes no SM from
  attention; NCCL only provides barriers. It covers self-attention (equal q and k/v shards)
  without ``return_lse``; other calls use what "auto" picks. Ranks on different hosts raise.
- Errors: before any data moves, ranks exchange a small header (shapes, dtype, layout, scale,
  head groups, exchange kind, mask kind and shape, a digest of a static mask over every head
  (``SliceMask.digest``, taken once per mask object), ``seq_lens``, an error flag), so an input that
  one rank rejects, or on which ranks disagree, raises on every rank instead of leaving the others
  blocked in a collective. On gloo groups, a mask callable that fails on one rank makes every rank
  raise (the ranks agree after each head group's masks), and every wait (header, all-to-all,
  point-to-point) is bounded by ``FGCUPY_COLLECTIVE_TIMEOUT_S`` (default 60 s); NCCL groups are
  bounded by the process group's own timeout.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from .jit.spec import KEY_TILES
from .layout import LAYOUTS, to_bhsd
from .mask import SliceMask, positive_int
from .mask_algebra import concat_heads, slice_heads  # noqa: F401 - public here
from .sp_masks import MaskPredictor  # noqa: F401 - public here
from .sp_exchange import probe_all_to_all, return_heads, send_heads
from .sp_handshake import (  # noqa: F401 - some are public here
    _backend, _Call, check_agreement, check_attention_inputs, check_seq_lens, collective_timeout,
    COLLECTIVE_TIMEOUT_ENV,
    COMPUTES, DENSE_SLICE_M, _DTYPE_CODES, EXCHANGES, gather_headers, _group_ranges, head_ranges,
    _HEADER, _lens_digest, _MASK_KINDS, _scale_code, shard_ranges, shard_views, _uses_nccl, _wait,
)


# ---- the entry points ----
def check_options(*, head_groups: int = 1, compute: str = "auto", exchange: str = "auto",
                  key_tile: int | None = None) -> None:
    """ValueError for SequenceParallelAttention options it cannot take (the diffusers config checks
    its parallel_options with it when it is made)."""
    positive_int("head_groups", head_groups)
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got {compute!r}")
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got {exchange!r}")
    if key_tile is not None and key_tile not in KEY_TILES:
        raise ValueError(f"key_tile must be None or one of {KEY_TILES}, got {key_tile!r}")


def _dense(q, k, v, out, lse, scale, key_tile: int | None = None) -> None:
    """The kernel's attention of every query over every key into ``out`` (and ``lse``), in head
    groups whose full index lists stay within attention.DENSE_INDEX_BUDGET (a list of every key
    of a whole 75,600-token sequence is 45 M entries per head)."""
    from .attention import dense_attention_with_lse

    dense_out, dense_lse = dense_attention_with_lse(q, k, v, DENSE_SLICE_M, scale=scale, key_tile=key_tile)
    out.copy_(dense_out)
    if lse is not None:
        lse.copy_(dense_lse)


class SequenceParallelAttention:
    """Ulysses sequence-parallel slice-sparse attention for one process group.

    >>> attn = SequenceParallelAttention(group, head_groups=2)
    >>> out = attn(q_shard, k_shard, v_shard, mask)      # mask: full-H, own heads, callable or None

    A static mask is sliced and planned once and reused while the same mask object comes back
    (slicing synchronises; later calls with that mask do not, apart from the header exchange), so
    a mask whose tensors were changed in place must come as a new ``SliceMask``. A mask callable
    gets ``heads``, the range of global head indices of the group, and must return a mask of
    those heads over the whole sequence; a mask object it returned for the group on the last call
    keeps that call's plan (the same rule: changed in place, it must come as a new one).
    """

    def __init__(self, group=None, *, head_groups: int = 1, compute: str = "auto", exchange: str = "auto",
                 key_tile: int | None = None):
        check_options(head_groups=head_groups, compute=compute, exchange=exchange, key_tile=key_tile)
        self.group = group
        self.head_groups = head_groups
        self.compute = compute
        self.exchange = exchange
        self.key_tile = key_tile
        self.plan_builds = 0  # how often masks were sliced and planned (tests check reuse)
        self.lengths: tuple | None = None  # (q_len, kv_len) of the whole sequence, as of the last call
        self._static_key = None
        self._static = None  # (mask, per head group (mask, plan or None), its digest or 0)
        self._dynamic_plans: dict = {}

    # ---- public ----
    def __call__(self, q, k, v, mask=None, *, layout: str = "HND", scale: float | None = None,
                 seq_lens=None, return_lse: bool = False):
        """Attention of this rank's query shard over the whole sequence.

        Returns ``out`` (q's shape, dtype and layout) and, with ``return_lse``, float32
        ``lse [B, H, S_r]`` (natural log; -inf where a query block keeps no key).
        ``seq_lens``: every rank's shard length (the same list on all ranks, which they check);
        only for self-attention (k, v shards as long as q's).
        """
        return self._forward(q, k, v, mask, layout, scale, seq_lens, return_lse, attend=True)

    def exchange_only(self, q, k, v, *, layout: str = "HND", seq_lens=None) -> None:
        """Both exchanges without attention, pipelined as in a call: the communication cost alone
        (benchmarks). Nothing is returned: the output would be uninitialised memory."""
        self._forward(q, k, v, None, layout, None, seq_lens, False, attend=False)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    # ---- the call ----
    def _forward(self, q, k, v, mask, layout, scale, seq_lens, return_lse, attend):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
        world, rank = self.world_size, self.rank
        if rank < 0:
            raise ValueError("this process is not a member of the given process group")
        problem = None
        local = dict.fromkeys(_HEADER, 0)
        local.update(attend=int(attend), return_lse=int(bool(return_lse)),
                     exchange=EXCHANGES.index(self.exchange),
                     mask_kind=_MASK_KINDS["none" if mask is None else
                                           "static" if isinstance(mask, SliceMask) else "callable"])
        device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
        try:
            collective_timeout()  # a bad FGCUPY_COLLECTIVE_TIMEOUT_S raises before the header, on every rank
            qh, kh, vh, compute = self._check_local(q, k, v, layout, local, world, rank)
            device = qh.device
            mask_info = self._prepare_masks(mask, qh, compute, world, rank) if attend else None
            if mask_info is not None:
                local.update(mask=1, mask_batch=mask_info[0], mask_heads=mask_info[1], mask_q_len=mask_info[2],
                             mask_kv_len=mask_info[3], mask_digest=mask_info[4])
            if seq_lens is not None:
                seq_lens = check_seq_lens(seq_lens, world, rank, local)
                local["seq_lens"] = _lens_digest(seq_lens)
            local.update(layout=LAYOUTS.index(layout), scale=_scale_code(scale))
        except Exception as err:  # noqa: BLE001 - raised below, after the other ranks hear of it
            problem = err
        local["error"] = 1 if problem is not None else 0
        headers = gather_headers(self.group, local, device, world)
        if problem is not None:
            raise problem
        bad = [i for i, h in enumerate(headers) if h["error"]]
        if bad:
            raise ValueError(f"sequence-parallel attention stopped: rank(s) {bad} of the group rejected "
                             f"their inputs (their errors say why)")
        q_lens, kv_lens = check_agreement(headers)
        self.lengths = (sum(q_lens), sum(kv_lens))
        method = self._exchange_method(device)
        if method == "copy":
            if q_lens == kv_lens and not return_lse and device.type == "cuda" and _uses_nccl(self.group, device):
                return self._pipeline_copy(_Call(qh, kh, vh, q, layout, mask, compute, method, q_lens, kv_lens, scale,
                                                 return_lse, attend, world, rank))
            method = self._auto_method(device)
        return self._pipeline(_Call(qh, kh, vh, q, layout, mask, compute, method, q_lens, kv_lens, scale, return_lse,
                                    attend, world, rank))

    def _check_local(self, q, k, v, layout, local, world, rank):
        qh, kh, vh = shard_views(q, k, v, layout)
        for name, t in (("k", kh), ("v", vh)):
            if t.dtype != qh.dtype or t.device != qh.device:
                raise ValueError(f"{name} is {t.dtype} on {t.device}, q is {qh.dtype} on {qh.device}")
        batch, heads, q_len, head_dim = qh.shape
        if kh.shape != vh.shape:
            raise ValueError(f"k and v shapes differ: {tuple(kh.shape)} vs {tuple(vh.shape)} ([B, H, S, D])")
        if (kh.shape[0], kh.shape[1], kh.shape[3]) != (batch, heads, head_dim):
            raise ValueError(f"k has [B, H, S, D] shape {tuple(kh.shape)}; q's {tuple(qh.shape)} needs "
                             f"B={batch}, H={heads}, D={head_dim}")
        if qh.device.type != "cuda" and _backend(self.group) == "nccl":
            raise ValueError(f"the group's backend is {_backend(self.group)!r}: q, k, v must be CUDA tensors, "
                             f"got {qh.device}")
        compute = self.compute
        if compute == "auto":
            compute = "fgcupy" if qh.device.type == "cuda" else "reference"
        if compute == "fgcupy" and qh.device.type != "cuda":
            raise ValueError(f"compute='fgcupy' needs CUDA tensors, got {qh.device}")
        check_attention_inputs(qh, kh, vh, uses_kernel=compute == "fgcupy")
        local.update(batch=batch, heads=heads, head_dim=head_dim, q_len=q_len, kv_len=kh.shape[2],
                     dtype=_DTYPE_CODES[qh.dtype], head_groups=self.head_groups)
        return qh, kh, vh, compute

    def _agree_on_masks(self, mask, failure, device) -> None:
        """After a head group's mask callable ran on every rank (gloo groups): all raise if any
        failed, instead of the others waiting in the next exchange."""
        if mask is None or isinstance(mask, SliceMask) or _uses_nccl(self.group, device):
            if failure is not None:
                raise failure
            return
        flags = torch.zeros(self.world_size, dtype=torch.int64)
        flags[self.rank] = failure is not None
        _wait(dist.all_reduce(flags, group=self.group, async_op=True), self.group)
        if failure is not None:
            raise failure
        if flags.any():
            failed = [i for i, f in enumerate(flags.tolist()) if f]
            raise ValueError(f"sequence-parallel attention stopped: the mask callable failed on rank(s) {failed} "
                             f"of the group (their errors say why)")

    def _exchange_method(self, device):
        return self.exchange if self.exchange != "auto" else self._auto_method(device)

    def _auto_method(self, device):
        if _uses_nccl(self.group, device):
            return "all_to_all"
        return probe_all_to_all(self.group, device)

    # ---- masks and plans ----
    def _prepare_masks(self, mask, qh, compute, world, rank):
        """Slice and plan a static mask per head group (cached); returns (B, H, q_len, kv_len,
        digest) of the given mask for the cross-rank check (the digest of a mask over every head,
        else 0), or None when the mask is not static."""
        if mask is None or (callable(mask) and not isinstance(mask, SliceMask)):
            return None
        if not isinstance(mask, SliceMask):
            raise TypeError(f"mask must be a fgcupy.SliceMask, a callable (q, k, heads) -> SliceMask or None, "
                            f"got {type(mask).__name__}")
        batch, heads, _, head_dim = qh.shape
        owned = head_ranges(heads, world)[rank]
        if mask.heads == heads:
            first = owned.start
        elif mask.heads == len(owned):
            first = 0
        else:
            raise ValueError(f"mask has {mask.heads} heads; expected all {heads} heads or this rank's "
                             f"{len(owned)} (heads {owned.start}..{owned.stop - 1})")
        if mask.batch != batch:
            raise ValueError(f"mask has batch {mask.batch}, q has {batch}")
        key = (id(mask), heads, world, rank, self.head_groups, compute, qh.device, qh.dtype, head_dim, self.key_tile)
        if self._static_key != key or self._static[0] is not mask:
            per_group = []
            for sub in _group_ranges(owned, self.head_groups):
                local = range(sub.start - owned.start + first, sub.stop - owned.start + first)
                part = slice_heads(mask, local)
                per_group.append((part, self._plan(part, qh, compute) if len(sub) else None))
            self._static = (mask, per_group, mask.digest() if mask.heads == heads else 0)
            self._static_key = key
            self.plan_builds += 1
        return mask.batch, mask.heads, mask.q_len, mask.kv_len, self._static[2]

    def _plan(self, mask, qh, compute, plan=None):
        if compute != "fgcupy":
            return None
        from .attention import SparseAttention  # cupy only where the kernel runs

        if mask.device != qh.device:
            mask = mask.to(qh.device)
        plan = SparseAttention() if plan is None else plan
        return plan.plan(mask, head_dim=qh.shape[-1], dtype=qh.dtype, key_tile=self.key_tile)

    def _group_mask(self, g, mask, qg, kg, heads, compute, q_total, kv_total):
        if isinstance(mask, SliceMask):
            return self._static[1][g]
        if mask is None:  # all keys: _attend runs dense attention (no list of every key is kept)
            return None, None
        part = mask(qg, kg, heads)
        if not isinstance(part, SliceMask):
            raise TypeError(f"the mask callable returned {type(part).__name__}, expected a fgcupy.SliceMask")
        expected = (qg.shape[0], len(heads), q_total, kv_total)
        if (part.batch, part.heads, part.q_len, part.kv_len) != expected:
            raise ValueError(f"the mask callable returned a mask for (B, H, q_len, kv_len)="
                             f"{(part.batch, part.heads, part.q_len, part.kv_len)}; heads {heads} need {expected}")
        previous = self._dynamic_plans.get(("callable", g))
        plan_key = (compute, qg.device, qg.dtype, qg.shape[-1])
        if previous is not None and previous[0] is part and previous[2] == plan_key:
            return part, previous[1]  # the group's mask of the last call: its plan stands
        plan = self._plan(part, qg, compute, plan=previous[1] if previous else None)
        self._dynamic_plans[("callable", g)] = (part, plan, plan_key)
        return part, plan

    def _attend(self, compute, qg, kg, vg, mask, plan, out, lse, scale):
        if mask is None and compute == "fgcupy":
            _dense(qg, kg, vg, out, lse, scale, self.key_tile)
            return
        if mask is None:  # the reference over every key
            mask = SliceMask.full(qg.shape[0], qg.shape[1], qg.shape[2], kg.shape[2], DENSE_SLICE_M, device=qg.device)
        if compute == "fgcupy":
            plan.run(qg, kg, vg, scale=scale, out=out, lse=lse)
            return
        from .reference import reference_attention

        accumulate = torch.float64 if qg.dtype == torch.float64 else torch.float32
        ref_out, ref_lse = reference_attention(qg, kg, vg, mask, scale=scale, dtype=accumulate)
        out.copy_(ref_out)
        if lse is not None:
            lse.copy_(ref_lse)

    # ---- exchange pipeline ----
    def _pipeline(self, call: _Call):
        qh, kh, vh, q, layout, mask, compute, method = (call.qh, call.kh, call.vh, call.q, call.layout, call.mask,
                                                        call.compute, call.method)
        q_lens, kv_lens, scale, return_lse, attend = call.q_lens, call.kv_lens, call.scale, call.return_lse, call.attend
        world, rank = call.world, call.rank
        batch, heads, _, head_dim = qh.shape
        owned = head_ranges(heads, world)
        groups = [[_group_ranges(r, self.head_groups)[g] for r in owned] for g in range(self.head_groups)]
        q_total, kv_total = sum(q_lens), sum(kv_lens)
        if q_lens == kv_lens:
            streams = [([qh, kh, vh], q_lens)]  # one message per group: tokens carry q, k, v together
        else:
            streams = [([qh], q_lens), ([kh, vh], kv_lens)]
        tags = iter(range(1 << 20))
        arrivals = []
        for subs in groups:  # issue every inbound exchange first: group g arrives while g-1 computes
            if not any(len(s) for s in subs):
                arrivals.append(None)
                continue
            views, pendings = [], []
            for tensors, lens in streams:
                got, pending = send_heads(self.group, tensors, lens, subs, method, next(tags), world, rank)
                views += got
                pendings.append(pending)
            arrivals.append((views, pendings))

        out = torch.empty_like(q)
        oh = to_bhsd(out, layout)
        lse = torch.empty(batch, heads, qh.shape[2], dtype=torch.float32, device=qh.device) if return_lse else None
        departures = []
        for g, subs in enumerate(groups):
            if arrivals[g] is None:
                continue
            views, pendings = arrivals[g]
            for pending in pendings:
                pending.wait()
            mine = subs[rank]
            out_grid = torch.empty(q_total, batch, len(mine), head_dim, dtype=qh.dtype, device=qh.device)
            out_g = out_grid.permute(1, 2, 0, 3)
            lse_g = None
            if return_lse:
                lse_g = torch.empty(batch, len(mine), q_total, dtype=torch.float32, device=qh.device)
            if attend and len(mine):
                qg, kg, vg = views
                failure = None
                try:
                    part, plan = self._group_mask(g, mask, qg, kg, mine, compute, q_total, kv_total)
                except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
                    failure = err
                self._agree_on_masks(mask, failure, qh.device)
                self._attend(compute, qg, kg, vg, part, plan, out_g, lse_g, scale)
            elif attend:
                self._agree_on_masks(mask, None, qh.device)
            arrivals[g] = None  # the inputs of this group may be freed once its exchange is done
            sent = [return_heads(self.group, out_grid, subs, q_lens, method, next(tags), world, rank)]
            if lse_g is not None:
                sent.append(return_heads(self.group, lse_g.permute(2, 0, 1).contiguous(), subs, q_lens, method,
                                               next(tags), world, rank))
            departures.append((subs, sent))
        for subs, sent in departures:
            for (pending, chunks), target in zip(sent, (oh, lse)):
                pending.wait()
                for sub, chunk in zip(subs, chunks):
                    if len(sub) and chunk.numel():
                        # chunk: [S_r, B, h, D] (output) or [S_r, B, h] (lse) -> [B, h, S_r(, D)]
                        order = (1, 2, 0, 3) if chunk.dim() == 4 else (1, 2, 0)
                        target[:, sub.start:sub.stop].copy_(chunk.permute(*order))
        if not attend:
            return None
        return (out, lse) if return_lse else out

    def _pipeline_copy(self, call: _Call):
        """The pipeline with copy-engine transfers (fgcupy.peer_copy). Host order is the schedule:
        group 0's inbound copies and barrier, then per group g its attention (waiting for its
        barrier only), the inbound copies of group g + 1 (so the attention is queued before the
        host spends time on copies), and g's outbound copies behind its attention. Inbound and
        outbound copies use separate streams, so no inbound copy waits for an attention."""
        qh, kh, vh, q, layout, mask, compute = call.qh, call.kh, call.vh, call.q, call.layout, call.mask, call.compute
        lens, scale, attend, world, rank = call.q_lens, call.scale, call.attend, call.world, call.rank
        from .peer_copy import CopyPlan, PeerWorkspace

        batch, heads, _, head_dim = qh.shape
        owned = head_ranges(heads, world)
        groups = [[_group_ranges(r, self.head_groups)[g] for r in owned] for g in range(self.head_groups)]
        device = qh.device
        plan = CopyPlan(batch, heads, head_dim, lens, groups, qh.element_size())
        sources = [CopyPlan.source(x) for x in (qh, kh, vh)]
        ws = PeerWorkspace.get(self.group, device, plan.nbytes)
        current = torch.cuda.current_stream(device)
        # Inputs are ready, and this rank is done with the previous call's buffer (its output was
        # copied out on the current stream).
        ws.stream.wait_stream(current)
        if ws.last_recv_bytes is not None and any(new > old for new, old in zip(plan.recv_bytes, ws.last_recv_bytes)):
            # Copies into a peer's buffer would reach its last return area, which it may still be
            # reading: wait for every rank first (all decide alike: the plans are the same).
            with torch.cuda.stream(ws.stream):
                ws.barrier()
        ws.last_recv_bytes = list(plan.recv_bytes)

        def inbound(g):
            """Queue group g's copies into the peers and the barrier after them; the returned
            event fires once every rank's copies into this rank have landed. The first barrier
            also says every rank finished the previous call, so its buffers may be overwritten."""
            with torch.cuda.stream(ws.stream):
                plan.inbound(ws, sources, rank, g)
                ws.barrier()
                arrived = torch.cuda.Event()
                arrived.record(ws.stream)
            return arrived

        arrival = inbound(0)
        ws.out_stream.wait_event(arrival)  # the peers' return regions are free from here on
        total = sum(lens)
        for g, subs in enumerate(groups):
            mine = subs[rank]
            current.wait_event(arrival)
            out_g = plan.new_out(rank, g, qh.dtype, device)
            if attend and len(mine):
                qg, kg, vg = plan.recv_views(ws.local, rank, g, qh.dtype)
                part, attn_plan = self._group_mask(g, mask, qg, kg, mine, compute, total, total)
                self._attend(compute, qg, kg, vg, part, attn_plan, out_g, None, scale)
            done = torch.cuda.Event()
            done.record(current)
            if g + 1 < len(groups):
                arrival = inbound(g + 1)
            ws.out_stream.wait_event(done)
            with torch.cuda.stream(ws.out_stream):
                plan.outbound(ws, out_g, rank, g)
            out_g.record_stream(ws.out_stream)
        for x in sources:
            x.record_stream(ws.stream)
        with torch.cuda.stream(ws.out_stream):
            ws.barrier()  # every rank's outputs for this rank's tokens have landed
        current.wait_stream(ws.out_stream)
        if not attend:
            return None
        out = torch.empty_like(q)
        to_bhsd(out, layout).copy_(plan.returned(ws.local, rank, qh.dtype))
        return out



def sequence_parallel_attention(q, k, v, mask=None, *, group=None, layout: str = "HND", scale: float | None = None,
                                seq_lens=None, head_groups: int = 1, compute: str = "auto", exchange: str = "auto",
                                return_lse: bool = False, key_tile: int | None = None):
    """One-shot ``SequenceParallelAttention(group, ...)(q, k, v, mask, ...)``. Keep an object
    instead when the same mask serves several calls (its slices and plans are reused)."""
    attention = SequenceParallelAttention(group, head_groups=head_groups, compute=compute, exchange=exchange,
                                          key_tile=key_tile)
    return attention(q, k, v, mask, layout=layout, scale=scale, seq_lens=seq_lens, return_lse=return_lse)
