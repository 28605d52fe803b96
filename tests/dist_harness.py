"""Multi-process harness for sequence-parallel tests: spawns one process per rank (gloo on CPU,
NCCL on GPUs), runs a list of cases in every rank and gathers each rank's verdicts.

Cases run in one spawn because starting processes costs seconds; each rank writes its results
after every case, so a hang or crash still reports what passed before it. The same cases serve
the CPU tests (reference path, float32) and the GPU check (fgcupy kernel, bf16).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fgcupy import SliceMask, reference_attention, relative_l2
from fgcupy.distributed import MaskPredictor, SequenceParallelAttention, head_ranges, shard_ranges, slice_heads
from fgcupy.mask import num_blocks
from fgcupy.reference import dense_attention


@dataclass(frozen=True)
class Case:
    """One distributed problem; ``shards`` overrides the default near-equal split of the queries
    (and of the keys when ``kv_seq`` is None)."""

    name: str
    batch: int = 1
    heads: int = 4
    seq: int = 48
    kv_seq: int | None = None
    head_dim: int = 16
    slice_m: int = 8
    layout: str = "HND"
    head_groups: int = 1
    exchange: str = "auto"
    mask: str = "full"  # full | local | callable | predict (MaskPredictor per rank) | none
    return_lse: bool = True
    shards: tuple | None = None
    pass_seq_lens: bool = False
    seed: int = 0
    group: str = "world"  # world | pair (the last two ranks) | self (each rank alone)
    dtype: str | None = None  # overrides the run's dtype
    scale: float | None = None
    reuse: bool = False  # call again with the same mask (no re-plan), then with another mask
    hide_all_to_all: bool = False  # all_to_all_single raises, as on backends without it: "auto" must fall back


PREDICTOR = dict(method="topk", density=0.4)  # slice_m comes from the case


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- inputs and expectations (identical on every rank: same seed, same CPU generator) ----
def make_problem(case: Case, device, dtype):
    gen = torch.Generator().manual_seed(case.seed)
    kv_seq = case.seq if case.kv_seq is None else case.kv_seq
    shape = lambda n: (case.batch, case.heads, n, case.head_dim)  # noqa: E731
    q = torch.randn(shape(case.seq), generator=gen)
    k = torch.randn(shape(kv_seq), generator=gen)
    v = torch.randn(shape(kv_seq), generator=gen)
    q_blocks = num_blocks(case.seq, case.slice_m)
    keep = torch.rand(case.batch, case.heads, q_blocks, 1, generator=gen)
    keep[torch.rand(keep.shape, generator=gen) < 0.15] = 0.0  # some query blocks keep no key
    dense = torch.rand(case.batch, case.heads, q_blocks, kv_seq, generator=gen) < keep
    mask = SliceMask.from_dense(dense, case.slice_m, case.seq).to(device)
    return tuple(t.to(device, dtype) for t in (q, k, v)), mask


def shard(x, pieces: range, layout: str):
    """Sequence shard of a [B, H, S, D] tensor, as a contiguous tensor in ``layout``."""
    part = x[:, :, pieces.start:pieces.stop]
    return (part if layout == "HND" else part.transpose(1, 2)).contiguous()


def _lengths(case: Case, world: int):
    kv_seq = case.seq if case.kv_seq is None else case.kv_seq
    if case.shards is not None:
        starts = [sum(case.shards[:i]) for i in range(len(case.shards))]
        q_ranges = [range(s, s + n) for s, n in zip(starts, case.shards)]
    else:
        q_ranges = shard_ranges(case.seq, world)
    kv_ranges = q_ranges if case.kv_seq is None else shard_ranges(kv_seq, world)
    return q_ranges, kv_ranges


class _HeadLog:
    """A mask callable that records the heads it is asked for (the test checks ownership)."""

    def __init__(self, mask):
        self.mask, self.calls = mask, []

    def __call__(self, q, k, heads):
        self.calls.append((heads.start, heads.stop, tuple(q.shape), tuple(k.shape)))
        return slice_heads(self.mask, heads)


def single_process(q, k, v, mask, compute, scale=None):
    """The one-process result the distributed one must reproduce: same compute path, all heads."""
    if mask is None:
        return dense_attention(q, k, v, scale=scale).to(q.dtype), None
    if compute == "reference":
        accumulate = torch.float64 if q.dtype == torch.float64 else torch.float32
        return reference_attention(q, k, v, mask, scale=scale, dtype=accumulate)
    from fgcupy import sparse_attention

    return sparse_attention(q, k, v, mask, scale=scale, return_lse=True)


def _without_all_to_all(call):
    """Run ``call`` with torch.distributed.all_to_all_single refusing, as a backend without it
    does; the exchange probe must pick point-to-point and say so."""
    from fgcupy import sp_exchange

    def refuse(*args, **kwargs):
        raise RuntimeError("ProcessGroupGloo does not support alltoall_base (simulated)")

    saved = dist.all_to_all_single
    sp_exchange._PROBED.clear()
    dist.all_to_all_single = refuse
    try:
        result = call()
    finally:
        dist.all_to_all_single = saved
    chosen = [method for methods in sp_exchange._PROBED.values() for method in methods.values()]
    sp_exchange._PROBED.clear()
    if chosen != ["p2p"]:
        raise AssertionError(f"with all_to_all_single missing the probe chose {chosen}, expected ['p2p']")
    return result


def run_case(case: Case, settings: dict, group, rank: int, world: int) -> dict:
    device, compute = settings["device"], settings["compute"]
    dtype = getattr(torch, case.dtype or settings["dtype"])
    (q, k, v), mask = make_problem(case, device, dtype)
    if case.mask == "predict":  # what one process would predict over all heads
        from fgcupy.scoring import predict_mask

        mask = predict_mask(q, k, slice_m=case.slice_m, **PREDICTOR)
    expected, expected_lse = single_process(q, k, v, None if case.mask == "none" else mask, compute, case.scale)
    q_ranges, kv_ranges = _lengths(case, world)
    mine_q, mine_kv = q_ranges[rank], kv_ranges[rank]
    q_l, k_l, v_l = shard(q, mine_q, case.layout), shard(k, mine_kv, case.layout), shard(v, mine_kv, case.layout)
    owned = head_ranges(case.heads, world)[rank]
    mask_arg = {"full": mask, "local": slice_heads(mask, owned) if case.mask == "local" else None,
                "callable": _HeadLog(mask), "none": None,
                "predict": MaskPredictor(slice_m=case.slice_m, **PREDICTOR)}[case.mask]
    attention = SequenceParallelAttention(group, head_groups=case.head_groups, compute=compute, exchange=case.exchange)
    seq_lens = [len(r) for r in q_ranges] if case.pass_seq_lens else None
    if case.hide_all_to_all:
        result = _without_all_to_all(lambda: attention(q_l, k_l, v_l, mask_arg, layout=case.layout,
                                                       scale=case.scale, return_lse=case.return_lse))
    else:
        result = attention(q_l, k_l, v_l, mask_arg, layout=case.layout, scale=case.scale, seq_lens=seq_lens,
                           return_lse=case.return_lse)
    out, lse = result if case.return_lse else (result, None)
    report = {}
    if case.reuse:
        again = attention(q_l, k_l, v_l, mask_arg, layout=case.layout, scale=case.scale, seq_lens=seq_lens,
                          return_lse=case.return_lse)
        again = again[0] if case.return_lse else again
        if attention.plan_builds != 1 or not torch.equal(again, out):
            raise AssertionError(f"same mask again: {attention.plan_builds} plan builds, equal output "
                                 f"{torch.equal(again, out)} (expected 1 build, equal)")
        other = make_problem(Case(**{**case.__dict__, "seed": case.seed + 1}), device, dtype)[1]
        expected, expected_lse = single_process(q, k, v, other, compute, case.scale)
        other_arg = other if case.mask == "full" else slice_heads(other, owned)
        mask = other
        result = attention(q_l, k_l, v_l, other_arg, layout=case.layout, scale=case.scale, seq_lens=seq_lens,
                           return_lse=case.return_lse)
        out, lse = result if case.return_lse else (result, None)
        if attention.plan_builds != 2:
            raise AssertionError(f"a new mask must be planned: {attention.plan_builds} plan builds, expected 2")
    want = shard(expected.to(dtype), mine_q, case.layout)
    if out.shape != want.shape or out.dtype != dtype:
        raise AssertionError(f"output {tuple(out.shape)} {out.dtype}, expected {tuple(want.shape)} {dtype}")
    if settings.get("exact", compute == "reference") and case.mask != "none":
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    else:
        err = relative_l2(out.float(), want.float())
        report["rel_l2_vs_single"] = err
        report["bitwise_equal"] = bool(torch.equal(out, want))
        limit = settings["tolerance"] if case.mask == "none" else settings["tolerance_vs_single"]
        if not err <= limit:
            raise AssertionError(f"relative L2 {err:.3e} against the single-process result (limit {limit})")
        if case.mask != "none":
            ref = shard(reference_attention(q, k, v, mask, scale=case.scale)[0], mine_q, case.layout)
            ref_err = relative_l2(out.float(), ref)
            report["rel_l2_vs_float32_reference"] = ref_err
            if not ref_err <= settings["tolerance"]:
                raise AssertionError(f"relative L2 {ref_err:.3e} against float32 (limit {settings['tolerance']})")
    if case.return_lse and expected_lse is not None:
        want_lse = expected_lse[:, :, mine_q.start:mine_q.stop].float()
        finite = torch.isfinite(want_lse)
        if not torch.equal(torch.isfinite(lse), finite):
            raise AssertionError("lse is not -inf exactly where a query block keeps no key")
        if finite.any():
            worst = (lse[finite] - want_lse[finite]).abs().max().item()
            report["lse_max_abs_diff"] = worst
            if worst > settings["lse_tolerance"]:
                raise AssertionError(f"lse differs by {worst:.3e} (limit {settings['lse_tolerance']})")
    if case.mask == "callable":
        heads_seen = sorted({(a, b) for a, b, _, _ in mask_arg.calls})
        covered = sorted(h for a, b in heads_seen for h in range(a, b))
        if covered != list(owned):
            raise AssertionError(f"the mask callable was asked for heads {heads_seen}, rank owns {owned}")
        for _, _, q_shape, _ in mask_arg.calls:
            if q_shape[2] != case.seq:
                raise AssertionError(f"the mask callable saw q of shape {q_shape}, not the whole sequence")
        report["callable_calls"] = len(mask_arg.calls)
    return report


# ---- error cases: each must raise on every rank, and no rank may block ----
ERROR_SLICE_M = 64  # a size the kernel has, so GPU runs fail where CPU runs do


def _error_inputs(rank, world, heads=4, seq=24, head_dim=64, device="cpu", dtype=torch.float32):
    ranges = shard_ranges(seq, world)
    gen = torch.Generator().manual_seed(1)
    make = lambda n: torch.randn(1, heads, n, head_dim, generator=gen).to(device, dtype)  # noqa: E731
    n = len(ranges[rank])
    return make(n), make(n), make(n), SliceMask.full(1, heads, seq, seq, ERROR_SLICE_M, device=device)


def error_cases(settings):
    """name -> fn(rank, world, group): calls that must raise. Some fail on one rank only; the
    header exchange must make every rank raise."""
    device, dtype, compute = settings["device"], getattr(torch, settings["dtype"]), settings["compute"]
    inputs = lambda rank, world, **kw: _error_inputs(rank, world, device=device, dtype=dtype, **kw)  # noqa: E731

    def call(group, q, k, v, mask=None, head_groups=1, exchange="auto", **kw):
        return SequenceParallelAttention(group, head_groups=head_groups, compute=compute,
                                         exchange=exchange)(q, k, v, mask, **kw)

    def heads_disagree(rank, world, group):
        q, k, v, _ = inputs(rank, world, heads=4 if rank == 0 else 2)
        call(group, q, k, v)

    def mask_too_short_on_last_rank(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        if rank == world - 1:
            mask = SliceMask.full(1, 4, 16, 16, ERROR_SLICE_M, device=device)
        call(group, q, k, v, mask)

    def dtype_mismatch_on_rank0(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        if rank == 0:
            k = k.to(torch.float64 if dtype == torch.float32 else torch.float16)
        call(group, q, k, v, mask)

    def mask_wrong_heads(rank, world, group):
        q, k, v, _ = inputs(rank, world)
        call(group, q, k, v, SliceMask.full(1, 3, 24, 24, ERROR_SLICE_M, device=device))

    def bad_layout(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, layout="BSHD")

    def head_groups_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, head_groups=1 + rank)

    def return_lse_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, return_lse=rank == 0)

    def seq_lens_wrong(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, seq_lens=[q.shape[2] + 1] * world)

    def callable_returns_wrong_heads(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, lambda qq, kk, heads: mask)  # all heads, not the group's

    def exchange_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, exchange="p2p" if rank == 0 else "all_to_all")

    def scale_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, scale=0.3 if rank == 0 else None)

    def zero_scale_on_rank0(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, scale=0.0 if rank == 0 else None)

    def layout_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        layout = "NHD" if rank == 0 else "HND"
        if layout == "NHD":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        call(group, q, k, v, mask, layout=layout)

    def mask_presence_disagree(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask if rank == 0 else None)

    def seq_lens_lists_differ(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        lens = [len(r) for r in shard_ranges(24, world)]
        if rank == 0:
            lens[-1] += 5  # rank 0's own entry is right, its view of the others is not
        call(group, q, k, v, mask, seq_lens=lens)

    def seq_lens_on_one_rank(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q, k, v, mask, seq_lens=[len(r) for r in shard_ranges(24, world)] if rank == 0 else None)

    def grad_on_rank0(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        call(group, q.requires_grad_(rank == 0), k, v, mask)

    def mask_callable_fails_on_last_rank(rank, world, group):
        q, k, v, mask = inputs(rank, world)

        def predictor(qq, kk, heads):
            if rank == world - 1:
                raise ValueError("the predictor broke")
            return slice_heads(mask, heads)

        call(group, q, k, v, predictor)

    def masks_over_all_heads_differ(rank, world, group):
        q, k, v, mask = inputs(rank, world)
        keep = torch.rand(1, mask.heads, mask.q_blocks, mask.kv_len, generator=torch.Generator().manual_seed(rank)) < 0.5
        call(group, q, k, v, SliceMask.from_dense(keep.to(device), mask.slice_m, mask.q_len))

    return {
        "masks_over_all_heads_differ": (masks_over_all_heads_differ, "ValueError",
                                        r"the ranks' masks over all heads differ \(ranks \[\[0\], \[1\]\] hold alike"),
        "grad_on_rank0": (grad_on_rank0, {0: "RuntimeError", "other": "ValueError"},
                          {0: r"no backward pass", "other": r"rank\(s\) \[0\] of the group rejected"}),
        "exchange_disagree": (exchange_disagree, "ValueError", r"ranks disagree on exchange: \['p2p', 'all_to_all'"),
        "scale_disagree": (scale_disagree, "ValueError", r"ranks disagree on scale: \[0.3, None"),
        "zero_scale_on_rank0": (zero_scale_on_rank0, "ValueError",
                                {0: r"scale must be a positive finite number", "other": r"rank\(s\) \[0\] of the group rejected"}),
        "layout_disagree": (layout_disagree, "ValueError", r"ranks disagree on layout: \['NHD', 'HND'"),
        "mask_presence_disagree": (mask_presence_disagree, "ValueError",
                                   r"ranks disagree on mask kind: \['static', 'none'"),
        "seq_lens_lists_differ": (seq_lens_lists_differ, "ValueError", r"ranks disagree on seq lens: different lists"),
        "seq_lens_on_one_rank": (seq_lens_on_one_rank, "ValueError",
                                 r"ranks disagree on seq lens: \['given', 'not given'"),
        "mask_callable_fails_on_last_rank": (mask_callable_fails_on_last_rank, "ValueError",
                                             {1: r"the predictor broke", "other": r"mask callable failed on rank\(s\) \[1\]"}),
        "heads_disagree": (heads_disagree, "ValueError", r"ranks disagree on heads: \[4, 2\]"),
        "mask_too_short_on_last_rank": (mask_too_short_on_last_rank, "ValueError",
                                        r"mask is for q_len=16, kv_len=16; the shards add up to q_len=24"),
        "dtype_mismatch_on_rank0": (dtype_mismatch_on_rank0, "ValueError",
                                    {0: r"k is torch\.float", "other": r"rank\(s\) \[0\] of the group rejected"}),
        "mask_wrong_heads": (mask_wrong_heads, "ValueError", r"mask has 3 heads; expected all 4 heads or this rank's"),
        "bad_layout": (bad_layout, "ValueError", r"layout must be one of"),
        "head_groups_disagree": (head_groups_disagree, "ValueError", r"ranks disagree on head groups: \[1, 2"),
        "return_lse_disagree": (return_lse_disagree, "ValueError", r"ranks disagree on return lse"),
        "seq_lens_wrong": (seq_lens_wrong, "ValueError", r"seq_lens\[\d\]=\d+, but this rank's q shard has"),
        "callable_returns_wrong_heads": (callable_returns_wrong_heads, "ValueError",
                                         r"the mask callable returned a mask for \(B, H, q_len, kv_len\)=\(1, 4, 24, 24\)"),
    }


# ---- the per-rank worker ----
def _worker(rank, world, port, backend, settings, cases, errors, path):
    results = {}

    def save():
        with open(f"{path}.{rank}.tmp", "w") as f:
            json.dump(results, f)
        os.replace(f"{path}.{rank}.tmp", f"{path}.{rank}")

    try:
        torch.set_num_threads(1)
        kwargs = {}
        if backend == "nccl":
            torch.cuda.set_device(rank)
            settings = dict(settings, device=f"cuda:{rank}")
            kwargs["device_id"] = torch.device("cuda", rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=settings.get("pg_timeout_s", 30)), **kwargs)
        # every rank creates every group, in the same order (new_group is collective)
        groups = {"world": None, "pair": dist.new_group([world - 2, world - 1]) if world > 2 else None}
        alone = [dist.new_group([r]) for r in range(world)]
        groups["self"] = alone[rank]
        for case in cases:
            group = groups[case.group]
            if dist.get_rank(group) < 0:
                results[case.name] = dict(ok=True, skipped="not a member of the case's group")
                save()
                continue
            started = time.perf_counter()
            try:
                report = run_case(case, settings, group, dist.get_rank(group), dist.get_world_size(group))
                results[case.name] = dict(ok=True, **report)
            except Exception:  # noqa: BLE001 - every failure becomes a verdict the parent reports
                results[case.name] = dict(ok=False, detail=traceback.format_exc(limit=6))
            results[case.name]["seconds"] = round(time.perf_counter() - started, 3)
            save()
        error_group = groups[settings.get("error_group", "world")]
        for name in errors:
            fn, _, _ = error_cases(settings)[name]
            if dist.get_rank(error_group) < 0:
                results[name] = dict(ok=True, skipped="not a member of the error cases' group")
                save()
                continue
            try:
                fn(dist.get_rank(error_group), dist.get_world_size(error_group), error_group)
                results[name] = dict(ok=False, detail="no exception")
            except Exception as err:  # noqa: BLE001
                results[name] = dict(ok=True, error=type(err).__name__, message=str(err))
            save()
        dist.barrier()  # every rank finished: nobody is left blocked in a collective
        results["__finished__"] = dict(ok=True)
        save()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["__crash__"] = dict(ok=False, detail=traceback.format_exc())
        save()


def run_world(world: int, backend: str, settings: dict, cases, errors=(), timeout_s: float = 120.0):
    """Spawn ``world`` ranks, run ``cases`` then ``errors`` in each; returns one dict per rank
    (case name -> verdict). Ranks still running at the deadline are killed and say so."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="fgcupy-dist-") as folder:
        path = os.path.join(folder, "results")
        procs = [ctx.Process(target=_worker, args=(r, world, port, backend, settings, list(cases), list(errors), path),
                             daemon=True)  # never outlive the caller
                 for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results = []
        for r in range(world):
            try:
                with open(f"{path}.{r}") as f:
                    results.append(json.load(f))
            except FileNotFoundError:
                results.append({})
            if r in hung:
                results[r]["__hung__"] = dict(ok=False, detail=f"rank {r} still running after {timeout_s} s: killed")
    return results

