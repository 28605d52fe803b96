"""Sequence parallelism's data movement over torch.distributed: sending each rank the heads it
owns over every token, returning outputs to the tokens' owners, by all-to-all or point-to-point
(the copy-engine exchange is fgcupy.peer_copy)."""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from .sp_handshake import Pending, _uses_nccl, _wait

# group -> {device type: exchange method}; weak, so a destroyed group (and its connections) goes.
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# ---- exchange ----


def probe_all_to_all(group, device: torch.device) -> str:
    """'all_to_all' if the backend runs an uneven ``all_to_all_single`` on ``device``, else 'p2p'.
    Unsupported collectives raise at the call on every rank alike, so all ranks agree; the wait
    is bounded as every collective's is (sp_handshake._wait)."""
    group = group if group is not None else dist.group.WORLD
    known = _PROBED.get(group, {})
    if device.type in known:
        return known[device.type]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    send_counts = [j + 1 for j in range(world)]
    send = torch.zeros(sum(send_counts), device=device)
    recv = torch.empty((rank + 1) * world, device=device)
    try:
        work = dist.all_to_all_single(recv, send, [rank + 1] * world, send_counts, group=group, async_op=True)
        _wait(work, group)  # bounded on gloo (TimeoutError): a rank that never probes is no hang
        method = "all_to_all"
    except (RuntimeError, NotImplementedError, ValueError):
        method = "p2p"
    _PROBED.setdefault(group, {})[device.type] = method
    return method


def send_heads(group, tensors, lens, subs, method, tag, world, rank):
    """Start the exchange of ``tensors`` (this rank's [B, H, S_r, D] shards) so rank j gets
    heads ``subs[j]`` over all tokens; returns [B, h, S, D] views of the arriving buffer."""
    first = tensors[0]
    batch, _, _, head_dim = first.shape
    width = len(tensors)
    mine = len(subs[rank])
    send_counts = [lens[rank] * batch * width * len(s) * head_dim for s in subs]
    recv_counts = [n * batch * width * mine * head_dim for n in lens]
    send = torch.empty(sum(send_counts), dtype=first.dtype, device=first.device)
    offset = 0
    for sub, count in zip(subs, send_counts):
        if count:
            chunk = send[offset:offset + count].view(lens[rank], batch, width, len(sub), head_dim)
            for i, t in enumerate(tensors):
                chunk[:, :, i].copy_(t[:, sub.start:sub.stop].permute(2, 0, 1, 3))
        offset += count
    recv = torch.empty(sum(recv_counts), dtype=first.dtype, device=first.device)
    pending = exchange(group, send, recv, send_counts, recv_counts, method, tag, world, rank)
    # Tokens arrive in rank order, so the buffer is [S, B, width, h, D] with S in sequence order.
    grid = recv.view(sum(lens), batch, width, mine, head_dim)
    return [grid[:, :, i].permute(1, 2, 0, 3) for i in range(width)], pending


def return_heads(group, grid, subs, q_lens, method, tag, world, rank):
    """Start returning ``grid`` ([S, B, h, ...], this rank's heads over all tokens) to the ranks
    owning the tokens; returns the pending exchange and per-rank [S_r, B, h_j, ...] chunks."""
    tail = tuple(grid.shape[3:])
    batch, mine = grid.shape[1], grid.shape[2]
    inner = 1
    for n in tail:
        inner *= n
    send_counts = [n * batch * mine * inner for n in q_lens]
    recv_counts = [q_lens[rank] * batch * len(s) * inner for s in subs]
    recv = torch.empty(sum(recv_counts), dtype=grid.dtype, device=grid.device)
    pending = exchange(group, grid.reshape(-1), recv, send_counts, recv_counts, method, tag, world, rank)
    chunks = [c.view(q_lens[rank], batch, len(s), *tail) for c, s in zip(recv.split(recv_counts), subs)]
    return pending, chunks


def exchange(group, send, recv, send_counts, recv_counts, method, tag, world, rank):
    if method == "all_to_all":
        work = dist.all_to_all_single(recv, send, recv_counts, send_counts, group=group, async_op=True)
        return Pending([work], (send, recv), group)
    sends, recvs = send.split(send_counts), recv.split(recv_counts)
    if send_counts[rank]:
        recvs[rank].copy_(sends[rank])
    ops = []
    for peer in range(world):
        if peer == rank:
            continue
        global_peer = peer if group is None else dist.get_global_rank(group, peer)
        if send_counts[peer]:
            ops.append(dist.P2POp(dist.isend, sends[peer], global_peer, group, tag))
        if recv_counts[peer]:
            ops.append(dist.P2POp(dist.irecv, recvs[peer], global_peer, group, tag))
    if not ops:
        return Pending([], (send, recv), group)
    if _uses_nccl(group, send.device):
        works = dist.batch_isend_irecv(ops)  # NCCL: one group call, or paired sends deadlock
    else:
        works = [op.op(op.tensor, op.peer, op.group, op.tag) for op in ops]
    return Pending(works, (send, recv), group, pollable=False)
