"""Sequence-parallel attention on several GPUs (NCCL, no torchrun): time on one GPU, on P GPUs
(Ulysses exchange + fgcupy, with and without head-group pipelining, for each exchange method:
NCCL's all-to-all and the copy-engine exchange), the exchange alone and the per-rank attention
alone, all in one run so every number comes from the same machine.

    PYTHONPATH=$PWD python -m bench.bench_distributed [--world 2] [--json out.json]

Default workload: wan14b-720p attention (B=1, H=40, S=75,600, D=128, bf16), densities 0.3 and 1.0,
random top-k masks drawn per head (a rank draws exactly its heads' part of the one-GPU mask).
CUDA events, warm-up, medians; for P GPUs each repetition starts after a barrier and the slowest
rank's time counts. NCCL environment variables (NCCL_NVLS_ENABLE=0 and friends) are used as set.
The issue's bar: two GPUs at least 1.8x faster than one at density 0.3.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

from bench.presets import PRESETS
from bench.timing import attention_tflops
from fgcupy import SliceMask, SparseAttention, relative_l2
from fgcupy.distributed import SequenceParallelAttention, head_ranges, shard_ranges
from fgcupy.jit.runtime import wait_for_background
from fgcupy.mask import num_blocks


# ---- masks: per head, so any rank can draw the heads it owns ----
def head_topk_mask(batch, heads: range, q_len, kv_len, slice_m, density, seed, device) -> SliceMask:
    """Each query block keeps round(density * kv_len) keys drawn uniformly; head h's draw depends
    only on (seed, h), so a rank's local mask equals the one-GPU mask's slice of its heads."""
    if density >= 1.0:
        return full_mask(batch, len(heads), q_len, kv_len, slice_m, device)
    k = max(1, round(density * kv_len))
    q_blocks = num_blocks(q_len, slice_m)
    topk = torch.empty(batch, len(heads), q_blocks, k, dtype=torch.int32, device=device)
    for i, h in enumerate(heads):
        for b in range(batch):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + b * 10_007 + h)
            scores = torch.rand(q_blocks, kv_len, generator=gen, device=device)
            topk[b, i] = torch.topk(scores, k, dim=-1, sorted=False).indices
            del scores
    return SliceMask.from_topk(topk, slice_m, q_len, kv_len)


def full_mask(batch, heads, q_len, kv_len, slice_m, device) -> SliceMask:
    """Every key for every block, built without SliceMask.full's sort (7 GB of indices at 720p)."""
    rows = batch * heads * num_blocks(q_len, slice_m)
    if rows * kv_len > torch.iinfo(torch.int32).max:
        raise ValueError(f"{rows} rows x {kv_len} keys exceed int32 offsets")
    indices = torch.arange(kv_len, dtype=torch.int32, device=device).repeat(rows)
    flat = torch.arange(rows + 1, dtype=torch.int64, device=device) * kv_len
    starts = flat[:-1].reshape(batch, heads, -1)
    ends = flat[1:].reshape(batch, heads, -1)[..., -1:]
    return SliceMask(torch.cat([starts, ends], -1).to(torch.int32), indices, slice_m, q_len, kv_len)


# ---- timing ----
def timed(fn, warmup, reps, barrier=True) -> list[float]:
    """Milliseconds of each repetition (CUDA events); ranks start each one together, after the
    kernels still compiling on threads are in (a stand-in would be timed in their place)."""
    wait_for_background()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        if barrier and dist.is_initialized():
            dist.barrier()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return times


def slowest_median(times: list[float]) -> tuple[float, list[float]]:
    """Median over repetitions of the slowest rank's time, and each rank's median."""
    mine = torch.tensor(times, dtype=torch.float64, device="cuda")
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    per_rep = torch.stack(every).max(dim=0).values
    return statistics.median(per_rep.tolist()), [statistics.median(t.tolist()) for t in every]


# ---- one rank ----
def worker(rank, world, port, args, out_path):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=10), device_id=torch.device("cuda", rank))
    preset = PRESETS[args.preset]
    batch, heads, seq, head_dim = preset.shape
    device = torch.device("cuda", rank)
    rows = []
    lead = rank == 0

    def say(line):
        if lead:
            print(line, flush=True)

    def record(what, density, ms, per_rank=None, **extra):
        row = dict(what=what, density=density, ms=ms, per_rank_ms=per_rank, **extra)
        rows.append(row)
        ranks = f"  ranks {', '.join(f'{t:.2f}' for t in per_rank)}" if per_rank else ""
        shown = "".join(f"  {key} {value}" for key, value in extra.items())
        say(f"{what:48s} d={density:<4} {'' if ms is None else f'{ms:9.3f} ms'}{ranks}{shown}")
        return row

    started = time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(args.seed)  # same draws on every rank
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    tokens = shard_ranges(seq, world)[rank]
    owned = head_ranges(heads, world)[rank]
    seq_lens = [len(r) for r in shard_ranges(seq, world)]

    def shard(x):
        part = x[:, :, tokens.start:tokens.stop]
        return (part if args.layout == "HND" else part.transpose(1, 2)).contiguous()

    q_l, k_l, v_l = shard(q), shard(k), shard(v)
    say(f"{world} x {torch.cuda.get_device_name()} | torch {torch.__version__} | {preset.name} {preset.shape} "
        f"layout {args.layout} | NCCL env: {' '.join(f'{n}={x}' for n, x in sorted(_nccl_env().items())) or '(none)'}")

    for density in args.densities:
        # one GPU: rank 0 alone, the others wait at the broadcast of its result
        single_out = torch.empty_like(q)
        single_ms = 0.0
        if lead:
            mask = head_topk_mask(batch, range(heads), seq, seq, args.slice_m, density, args.seed, device)
            plan = SparseAttention().plan(mask, head_dim=head_dim, dtype=q.dtype)
            single_ms = statistics.median(timed(lambda: plan.run(q, k, v, out=single_out), args.warmup, args.reps,
                                                barrier=False))
            tflops = attention_tflops(batch, heads, seq, seq, head_dim, single_ms, density=density)
            record("1 GPU fgcupy", density, single_ms, tflops_on_kept=round(tflops, 1))
            del plan, mask
            torch.cuda.empty_cache()
        single_ms = _broadcast_float(single_ms)
        dist.broadcast(single_out, 0)

        mask = head_topk_mask(batch, owned, seq, seq, args.slice_m, density, args.seed, device)
        # attention alone on this rank's heads, in the exchanged layout ([S, B, 3, h, D] views)
        grid = torch.empty(seq, batch, 3, len(owned), head_dim, dtype=q.dtype, device=device)
        for i, t in enumerate((q, k, v)):
            grid[:, :, i].copy_(t[:, owned.start:owned.stop].permute(2, 0, 1, 3))
        views = [grid[:, :, i].permute(1, 2, 0, 3) for i in range(3)]
        local_plan = SparseAttention().plan(mask, head_dim=head_dim, dtype=q.dtype)
        local_out = torch.empty(seq, batch, len(owned), head_dim, dtype=q.dtype, device=device).permute(1, 2, 0, 3)
        attention_alone, per = slowest_median(timed(lambda: local_plan.run(*views, out=local_out), args.warmup,
                                                    args.reps))
        record(f"{world} GPUs: attention alone ({len(owned)} heads/rank)", density, attention_alone, per)
        # the same on contiguous [B, h, S, D] tensors: what the exchanged layout costs the kernel
        q_h, k_h, v_h = (t[:, owned.start:owned.stop].contiguous() for t in (q, k, v))
        contiguous_out = torch.empty_like(q_h)
        ms, per = slowest_median(timed(lambda: local_plan.run(q_h, k_h, v_h, out=contiguous_out), args.warmup,
                                       args.reps))
        record(f"{world} GPUs: attention alone, contiguous inputs", density, ms, per)
        del grid, views, local_plan, local_out, q_h, k_h, v_h, contiguous_out

        for exchange in args.exchanges:
            for groups in args.head_groups:
                attention = SequenceParallelAttention(head_groups=groups, exchange=exchange)
                call = lambda: attention(q_l, k_l, v_l, mask, layout=args.layout, seq_lens=seq_lens)  # noqa: E731
                out = call()  # slices and plans the mask once
                ms, per = slowest_median(timed(call, args.warmup, args.reps))
                both = record(f"{world} GPUs: {exchange} exchange + attention, {groups} head group(s)", density, ms,
                              per, speedup_vs_1gpu=round(single_ms / ms, 3), head_groups=groups, exchange=exchange)
                if groups == args.head_groups[0]:
                    _check_against_single(out, single_out, tokens, args.layout, density, record)
                del out
                xms, xper = slowest_median(timed(
                    lambda: attention.exchange_only(q_l, k_l, v_l, layout=args.layout, seq_lens=seq_lens),
                    args.warmup, args.reps))
                moved = 4 * q_l.numel() * q_l.element_size() * (world - 1) / world  # q, k, v out + o back
                record(f"{world} GPUs: {exchange} exchange alone, {groups} head group(s)", density, xms, xper,
                       bytes_sent_per_rank=int(moved), gb_per_s_per_rank=round(moved / xms / 1e6, 1))
                # time the pipeline hid: (attention alone + exchange alone) - both together
                both["overlap_hidden_ms"] = round(attention_alone + xms - ms, 3)
                del attention
                torch.cuda.empty_cache()
        del mask, single_out
        torch.cuda.empty_cache()

    if lead:
        print(f"\ntotal {time.perf_counter() - started:.0f} s (without process start-up)")
        print("| what | density | ms | speed-up vs 1 GPU | hidden by overlap (ms) |\n|---|---|---|---|---|")
        for r in rows:
            ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
            print(f"| {r['what']} | {r['density']} | {ms} | {r.get('speedup_vs_1gpu', '')} "
                  f"| {r.get('overlap_hidden_ms', '')} |")
        with open(out_path, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), world=world, preset=preset.name,
                           nccl_env=_nccl_env(),
                           rows=rows), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _nccl_env() -> dict:
    return {name: value for name, value in os.environ.items() if name.startswith("NCCL_")}


def _broadcast_float(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda")
    dist.broadcast(t, 0)
    return float(t.item())


def _check_against_single(out, single_out, tokens, layout, density, record):
    """Each rank's output shard against its slice of the one-GPU output (same kernel, same keys:
    bf16-level agreement at worst); rank 0 records the worst rank."""
    shard = out if layout == "HND" else out.transpose(1, 2)
    want = single_out[:, :, tokens.start:tokens.stop]
    stats = torch.tensor([relative_l2(shard.float(), want.float()), float(not torch.equal(shard, want))],
                         dtype=torch.float64, device=out.device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    err, differs = stats.tolist()
    record(f"{dist.get_world_size()} GPUs vs 1 GPU: output check", density, None, worst_rel_l2=f"{err:.2e}",
           bitwise_equal=not differs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--preset", default="wan14b-720p", choices=sorted(PRESETS))
    parser.add_argument("--densities", type=float, nargs="+", default=[0.3, 1.0])
    parser.add_argument("--head-groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--exchanges", nargs="+", default=["all_to_all", "copy"], choices=["all_to_all", "p2p", "copy"],
                        help="exchange methods of SequenceParallelAttention to time")
    parser.add_argument("--slice-m", type=int, default=128)
    parser.add_argument("--layout", default="HND", choices=["HND", "NHD"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench_distributed.json")
    parser.add_argument("--deadline-s", type=float, default=230, help="kill the ranks after this long")
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, torch sees {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = torch.multiprocessing.spawn(worker, args=(args.world, port, args, args.json), nprocs=args.world,
                                          join=False, daemon=True)
    deadline = time.monotonic() + args.deadline_s
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            print(f"bench_distributed: stopped after --deadline-s {args.deadline_s} s", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
