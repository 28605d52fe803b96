"""Timeline of one sequence-parallel call on two GPUs: where the head-group pipeline's time goes.

Runs SequenceParallelAttention (wan14b-720p, density 0.3) with events recorded around every
inbound copy, barrier, attention launch and outbound copy (the library is wrapped here, not
changed), then prints each rank's timeline in milliseconds from the call's start, beside the
same head groups' attention run back to back with nothing else and all heads in one launch.

    PYTHONPATH=$PWD python -m tools.probe_pipeline [--exchange copy] [--head-groups 4]
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import sys

import torch
import torch.distributed as dist

from bench.bench_distributed import head_topk_mask, timed
from bench.presets import PRESETS
from fgcupy import SparseAttention, distributed, peer_copy
from fgcupy.distributed import SequenceParallelAttention, head_ranges, shard_ranges


class Timeline:
    """Events recorded on the current stream at named points of one call."""

    def __init__(self):
        self.points = []
        self.on = False

    def mark(self, name):
        if self.on:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.points.append((name, event))

    def wrap(self, owner, attr, label):
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            self.mark(f"{label} start")
            result = original(*args, **kwargs)
            self.mark(f"{label} end")
            return result

        setattr(owner, attr, wrapped)

    def report(self, start):
        torch.cuda.synchronize()
        return [(name, start.elapsed_time(event)) for name, event in self.points]


def worker(rank, world, port, args):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5), device_id=torch.device("cuda", rank))
    batch, heads, seq, head_dim = PRESETS[args.preset].shape
    device = torch.device("cuda", rank)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    tokens = shard_ranges(seq, world)[rank]
    owned = head_ranges(heads, world)[rank]
    seq_lens = [len(r) for r in shard_ranges(seq, world)]
    q_l, k_l, v_l = (x[:, :, tokens.start:tokens.stop].contiguous() for x in (q, k, v))
    mask = head_topk_mask(batch, owned, seq, seq, 128, args.density, 0, device)

    line = Timeline()
    line.wrap(peer_copy.CopyPlan, "inbound", "inbound")
    line.wrap(peer_copy.CopyPlan, "outbound", "outbound")
    line.wrap(peer_copy.PeerWorkspace, "barrier", "barrier")
    line.wrap(SequenceParallelAttention, "_attend", "attend")
    line.wrap(SequenceParallelAttention, "_exchange", "exchange")
    attention = SequenceParallelAttention(head_groups=args.head_groups, exchange=args.exchange)
    call = lambda: attention(q_l, k_l, v_l, mask, layout="HND", seq_lens=seq_lens)  # noqa: E731
    total = statistics.median(timed(call, 2, args.reps))
    # One instrumented call (events on the stream current at each point).
    torch.cuda.synchronize()
    dist.barrier()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    line.on = True
    start.record()
    call()
    stop.record()
    line.on = False
    points = line.report(start)
    # The same groups' attention back to back, and all heads in one launch, on local inputs.
    q_h, k_h, v_h = (x[:, owned.start:owned.stop].contiguous() for x in (q, k, v))
    out = torch.empty_like(q_h)
    per_group = attention._static[1] if attention._static else []
    groups = distributed._group_ranges(range(len(owned)), args.head_groups)

    def groups_back_to_back():
        for sub, (_, plan) in zip(groups, per_group):
            if plan is not None:
                plan.run(q_h[:, sub.start:sub.stop], k_h[:, sub.start:sub.stop], v_h[:, sub.start:sub.stop],
                         out=out[:, sub.start:sub.stop])

    whole = SparseAttention().plan(mask, head_dim=head_dim, dtype=q.dtype)
    grouped_ms = statistics.median(timed(groups_back_to_back, 2, args.reps))
    whole_ms = statistics.median(timed(lambda: whole.run(q_h, k_h, v_h, out=out), 2, args.reps))
    lines = [f"rank {rank}: call median {total:.3f} ms; instrumented call {start.elapsed_time(stop):.3f} ms; "
             f"attention alone {whole_ms:.3f} ms in one launch, {grouped_ms:.3f} ms as {args.head_groups} groups"]
    lines += [f"  {t:9.3f}  {name}" for name, t in points]
    gathered = [None] * world
    dist.all_gather_object(gathered, "\n".join(lines))
    if rank == 0:
        print(f"{PRESETS[args.preset].name} d={args.density} exchange={args.exchange} "
              f"head_groups={args.head_groups} on {world} x {torch.cuda.get_device_name()}")
        print("\n".join(gathered), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-720p", choices=sorted(PRESETS))
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--exchange", default="copy", choices=["copy", "all_to_all"])
    parser.add_argument("--head-groups", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < 2:
        print("needs 2 GPUs", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(worker, args=(2, port, args), nprocs=2, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
