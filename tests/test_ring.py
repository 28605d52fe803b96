"""Ulysses x ring sequence parallelism on CPU (gloo): every grid shape of 2, 3 and 4 ranks gives
the one-process reference; a span that starts inside a query block, or masks of different slice
sizes, raise on every rank."""

import datetime
import math
import json
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from fgcupy import SliceMask, reference_attention
from tests.dist_harness import free_port

SLICE = 16
CASES = [  # (name, shard lengths per rank as multiples of SLICE (last may be ragged), heads, batch, layout, mask)
    ("even", None, 4, 1, "HND", "random"),
    ("uneven_nhd", "uneven", 3, 2, "NHD", "random"),
    ("dense_no_mask", None, 5, 1, "HND", "none"),
    ("ragged_last", "ragged", 2, 1, "NHD", "random"),
]


def _lens(kind, world):
    if kind == "uneven":
        return [SLICE * (1 + (r % 3)) for r in range(world)]
    if kind == "ragged":
        return [SLICE * 2] * (world - 1) + [SLICE + 5]
    return [SLICE * 2] * world


def _problem(kind, heads, batch, world, seed=0):
    lens = _lens(kind, world)
    total = sum(lens)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, total, 8, generator=gen) for _ in range(3))
    blocks = -(-total // SLICE)
    mask = SliceMask.from_dense(torch.rand(batch, heads, blocks, total, generator=gen) < 0.4, SLICE, total)
    return lens, q, k, v, mask


def _worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    from fgcupy.ring import HybridSequenceParallelAttention

    verdicts = {}
    for ring in [r for r in range(1, world + 1) if world % r == 0]:
        attn = HybridSequenceParallelAttention(ring=ring)
        for name, kind, heads, batch, layout, mask_kind in CASES:
            key = f"ring{ring}_{name}"
            try:
                lens, q, k, v, mask = _problem(kind, heads, batch, world)
                mask = None if mask_kind == "none" else mask
                lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
                shard = [t[:, :, lo:hi] for t in (q, k, v)]
                if layout == "NHD":
                    shard = [t.transpose(1, 2).contiguous() for t in shard]
                out, lse = attn(*shard, mask, layout=layout, return_lse=True)
                full = mask if mask is not None else SliceMask.full(batch, heads, q.shape[2], k.shape[2], SLICE)
                ref, ref_lse = reference_attention(q, k, v, full)
                out = out if layout == "HND" else out.transpose(1, 2)
                err = float((out - ref[:, :, lo:hi]).abs().max()) if out.numel() else 0.0
                lse_err = float((lse - ref_lse[:, :, lo:hi]).nan_to_num(0.0, 0.0, 0.0).abs().max()) if lse.numel() else 0.0
                same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(ref_lse[:, :, lo:hi])))
                verdicts[key] = dict(ok=err < 1e-5 and lse_err < 1e-4 and same_inf, err=err, lse_err=lse_err)
            except Exception:  # noqa: BLE001 - the parent reports it
                verdicts[key] = dict(ok=False, detail=traceback.format_exc(limit=5))
        # float64 stays float64 through the merge of the ring's partial results
        lens, q, k, v, mask = _problem("uneven", 2, 1, world, seed=3)
        q, k, v = (t.double() for t in (q, k, v))
        lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
        out = attn(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask)
        err = float((out - reference_attention(q, k, v, mask, dtype=torch.float64)[0][:, :, lo:hi]).abs().max())
        verdicts[f"ring{ring}_float64"] = dict(ok=out.dtype == torch.float64 and err < 1e-12, err=err)
        # ranks whose masks differ: every rank raises, rather than attend a mix of them
        lens, q, k, v, _ = _problem("even", 2, 1, world)
        lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
        keep = torch.rand(1, 2, -(-sum(lens) // SLICE), sum(lens), generator=torch.Generator().manual_seed(rank)) < 0.5
        try:
            attn(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], SliceMask.from_dense(keep, SLICE, sum(lens)))
            verdicts[f"ring{ring}_masks_differ"] = dict(ok=False, detail="no error")
        except ValueError as err:
            verdicts[f"ring{ring}_masks_differ"] = dict(ok="masks over all heads differ" in str(err), detail=str(err))
        # a span starting inside a query block: every rank raises
        if ring > 1:
            lens = [SLICE + 3] * world
            gen = torch.Generator().manual_seed(1)
            total = sum(lens)
            q = torch.randn(1, 2, total, 8, generator=gen)
            lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
            mask = SliceMask.full(1, 2, total, total, SLICE)
            try:
                attn(q[:, :, lo:hi], q[:, :, lo:hi], q[:, :, lo:hi], mask)
                verdicts[f"ring{ring}_misaligned"] = dict(ok=False, detail="no error")
            except ValueError as err:
                verdicts[f"ring{ring}_misaligned"] = dict(ok="slice boundary" in str(err), detail=str(err))
            # masks of different slice sizes (spans aligned for rank 0's alone): every rank raises
            lens = [2 * SLICE] * world
            total = sum(lens)
            q = torch.randn(1, 2, total, 8, generator=gen)
            lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
            mask = SliceMask.full(1, 2, total, total, SLICE if rank == 0 else 4 * SLICE)
            try:
                attn(q[:, :, lo:hi], q[:, :, lo:hi], q[:, :, lo:hi], mask)
                verdicts[f"ring{ring}_slice_sizes"] = dict(ok=False, detail="no error")
            except ValueError as err:
                verdicts[f"ring{ring}_slice_sizes"] = dict(ok="disagree on the mask's slice size" in str(err),
                                                           detail=str(err))
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdicts, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_grid_matches_one_process(world):
    path = tempfile.mktemp(prefix="fgcupy-ring-")
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, path)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert not p.is_alive(), "a rank hung"
    for rank in range(world):
        with open(f"{path}.{rank}") as f:
            verdicts = json.load(f)
        os.unlink(f"{path}.{rank}")
        rings = [r for r in range(1, world + 1) if world % r == 0]
        assert len(verdicts) == len(rings) * (len(CASES) + 2) + 2 * (len(rings) - 1)
        for name, verdict in verdicts.items():
            assert verdict["ok"], f"rank {rank} {name}: {verdict}"


def test_ring_must_divide_the_group():
    from fgcupy.ring import HybridSequenceParallelAttention

    with pytest.raises(RuntimeError, match="not initialised"):
        HybridSequenceParallelAttention(ring=2)


def _subgroup_worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    from fgcupy.ring import HybridSequenceParallelAttention

    verdict = {}
    try:
        sub = dist.new_group([1, 2])
        if rank in (1, 2):  # rank 0 is not in the group and does not construct it
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 2, 2 * SLICE, 8, generator=gen) for _ in range(3))
            mask = SliceMask.full(1, 2, 2 * SLICE, 2 * SLICE, SLICE)
            lo, hi = (0, SLICE) if rank == 1 else (SLICE, 2 * SLICE)
            ref = reference_attention(q, k, v, mask)[0][:, :, lo:hi]
            for _ in range(2):  # a second object on the same ranks shares the sub-groups
                out = HybridSequenceParallelAttention(sub, ring=2)(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask)
                verdict["err"] = max(verdict.get("err", 0.0), float((out - ref).abs().max()))
        later = dist.new_group([0, 1, 2])  # a group the application makes afterwards, on every rank
        x = torch.ones(1)
        dist.all_reduce(x, group=later)
        verdict["sum"] = float(x.item())
    except Exception:  # noqa: BLE001 - the parent reports it
        verdict["detail"] = traceback.format_exc(limit=5)
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    dist.destroy_process_group()


def _verdicts(worker, world: int, join_s: float) -> list:
    """Run ``worker(rank, world, port, path)`` on ``world`` spawned ranks; each rank's JSON verdict."""
    path = tempfile.mktemp(prefix="fgcupy-ring-")
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, path)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(join_s)
            assert not p.is_alive(), "a rank hung"
    finally:
        for p in procs:
            p.kill()
    verdicts = []
    for rank in range(world):
        with open(f"{path}.{rank}") as f:
            verdicts.append(json.load(f))
        os.unlink(f"{path}.{rank}")
    return verdicts


def test_a_sub_group_leaves_the_other_ranks_groups_in_step():
    """Ranks outside the group never call in, and later world-wide groups still form."""
    for rank, verdict in enumerate(_verdicts(_subgroup_worker, 3, 90)):
        assert "detail" not in verdict, verdict["detail"]
        assert verdict["sum"] == 3.0
        if rank:
            assert verdict["err"] < 1e-5


def _mismatch_worker(rank, world, port, path):
    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "10"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    from fgcupy.ring import HybridSequenceParallelAttention

    verdict = {}
    for case, ring in (("differ", 1 if rank == 0 else 2), ("invalid", 3 if rank == 0 else 2)):
        start = time.monotonic()
        try:
            HybridSequenceParallelAttention(ring=ring)
            verdict[case] = {"error": None}
        except Exception as err:  # noqa: BLE001 - the parent reports it
            verdict[case] = {"error": type(err).__name__, "message": str(err), "s": time.monotonic() - start}
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    dist.destroy_process_group()


def test_ranks_that_ask_for_different_rings_raise_instead_of_hanging():
    """Their sub-groups would be created out of step (new_group waited forever)."""
    for rank, verdict in enumerate(_verdicts(_mismatch_worker, 2, 60)):
        differ, invalid = verdict["differ"], verdict["invalid"]
        assert differ["error"] == "ValueError" and "different ring sizes [1, 2]" in differ["message"], differ
        # a ring that does not divide the group on one rank: every rank raises at once (no timeout)
        expected = "must be a positive int dividing" if rank == 0 else "rank(s) [0] gave a ring size"
        assert invalid["error"] == "ValueError" and expected in invalid["message"] and invalid["s"] < 5, invalid


def _one_rank_fails_worker(rank, world, port, path):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    from fgcupy import SequenceParallelAttention
    from fgcupy.ring import HybridSequenceParallelAttention

    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "10"
    full = SliceMask.full(1, 2, 16, 16, 4)
    indptr = full.indptr.clone()
    indptr[0, 1, -1] += 5  # head 1, which only rank 1 attends, points past the index buffer
    q = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(rank))
    hybrid = HybridSequenceParallelAttention(ring=1)
    cases = {"bad head": lambda: hybrid(q, q, q, SliceMask(indptr, full.indices, 4, 16, 16)),
             "head dim 0": lambda: SequenceParallelAttention()(q[..., :0], q[..., :0], q[..., :0]),
             # ranks calling different engines met in each other's collectives until the timeout
             "engines differ": lambda: hybrid(q, q, q) if rank == 0 else SequenceParallelAttention()(q, q, q),
             # one rank constructing (a collective) while the other calls: gloo aborted on the sizes
             "engine built during a call": lambda: (SequenceParallelAttention()(q, q, q) if rank == 0
                                                    else HybridSequenceParallelAttention(ring=1))}
    verdict = {}
    for case, call in cases.items():
        start = time.monotonic()
        try:
            call()
            verdict[case] = {"error": None}
        except Exception as err:  # noqa: BLE001 - the parent reports it
            verdict[case] = {"error": type(err).__name__, "message": str(err), "s": time.monotonic() - start}
    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "5s" if rank == 1 else "10"
    start = time.monotonic()
    try:
        SequenceParallelAttention()(q, q, q)
        verdict["bad timeout"] = {"error": None}
    except Exception as err:  # noqa: BLE001
        verdict["bad timeout"] = {"error": type(err).__name__, "message": str(err), "s": time.monotonic() - start}
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    dist.destroy_process_group()


def test_what_one_rank_rejects_every_rank_raises_at_once():
    """A mask bad only in the heads one rank attends, a head dim of 0, an unreadable collective
    timeout on one rank: every rank raises before any rank waits in an exchange."""
    verdicts = _verdicts(_one_rank_fails_worker, 2, 90)
    for rank, verdict in enumerate(verdicts):
        for case, got in verdict.items():
            assert got["error"] in ("ValueError",), (rank, case, got)
            assert got["s"] < 5, (rank, case, got)  # not the 10 s collective timeout
        assert "ranks disagree on ring: ['Ulysses x ring of 1', 'Ulysses']" in verdict["engines differ"]["message"]
    assert "rank(s) [1] are constructing a HybridSequenceParallelAttention" in verdicts[0]["engine built during a call"]["message"]
    assert "rank(s) [0] called sequence-parallel attention" in verdicts[1]["engine built during a call"]["message"]


def test_a_merge_keeps_a_nan_lse():
    """A NaN key makes the row's LSE NaN in one process; the ring's merge must not turn it into
    "no key" (which the next span's LSE then overwrote with a finite value)."""
    from fgcupy.ring import _merge

    out = torch.full((1, 1, 2, 4), float("nan"))
    lse = torch.tensor([[[float("nan"), float("-inf")]]])
    out_i, lse_i = torch.ones(1, 1, 2, 4), torch.tensor([[[1.0, float("-inf")]]])
    merged_out, merged = _merge(out, lse, out_i, lse_i)
    assert merged[0, 0, 0].isnan() and merged[0, 0, 1] == float("-inf")
    assert merged_out[0, 0, 0].isnan().all()


# ---------------------------------------------------------------------------------------------
# the merge, the ring's size, masks for other heads, shards split anew
# ---------------------------------------------------------------------------------------------
def test_a_ring_merge_of_large_lses_stays_finite():
    """The merge subtracts the larger LSE before exponentiating: partial LSEs far from 0 (or one
    span with no key) must not overflow into NaN."""
    from fgcupy.ring import _merge

    out, out_i = torch.ones(1, 1, 2, 4), torch.full((1, 1, 2, 4), 3.0)
    lse, lse_i = torch.tensor([[[0.0, -math.inf]]]), torch.tensor([[[200.0, 150.0]]])
    merged_out, merged = _merge(out, lse, out_i, lse_i)
    torch.testing.assert_close(merged, lse_i)
    torch.testing.assert_close(merged_out, out_i)


def test_a_ring_that_does_not_divide_the_group_is_refused(monkeypatch):
    """Every rank's header is its own (one process stands for the group)."""
    from fgcupy import ring as ring_module

    monkeypatch.setattr(ring_module, "gather_headers",
                        lambda group, local, device, world: [dict(local) for _ in range(world)])
    for world, ring in ((3, 2), (4, 3), (6, 4), (2, 3), (2, 0)):
        with pytest.raises(ValueError, match=f"ring must be a positive int dividing the group's {world} ranks"):
            ring_module._agree_on_ring(None, ring, world)
    ring_module._agree_on_ring(None, 2, 4)


def test_the_hybrid_engine_refuses_a_mask_for_other_heads():
    from fgcupy.ring import HybridSequenceParallelAttention

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        attn = HybridSequenceParallelAttention(ring=1)
        q = torch.randn(1, 2, 64, 8, generator=torch.Generator().manual_seed(0))
        for heads in (1, 4):
            with pytest.raises(ValueError, match=rf"mask is for \(B, H\)=\(1, {heads}\), q for \(1, 2\)"):
                attn(q, q, q, SliceMask.full(1, heads, 64, 64, 16))
        torch.testing.assert_close(attn(q, q, q, SliceMask.full(1, 2, 64, 64, 16)),
                                   reference_attention(q, q, q, SliceMask.full(1, 2, 64, 64, 16))[0])
    finally:
        dist.destroy_process_group()


def _resharded_worker(rank, world, port, path):
    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "10"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    from fgcupy.ring import HybridSequenceParallelAttention

    verdict = {}
    try:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))
        mask = SliceMask.from_dense(torch.rand(1, 2, 4, 64, generator=gen) < 0.5, 16, 64)
        ref = reference_attention(q, k, v, mask)[0]
        attn = HybridSequenceParallelAttention(ring=2)
        for lens in ([32, 32], [16, 48], [48, 16]):  # the same mask object, shards split elsewhere
            lo, hi = sum(lens[:rank]), sum(lens[:rank + 1])
            out = attn(q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], mask)
            verdict[str(lens)] = float((out - ref[:, :, lo:hi]).abs().max())
    except Exception:  # noqa: BLE001 - the parent reports it
        verdict["detail"] = traceback.format_exc(limit=5)
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    dist.destroy_process_group()


def test_the_hybrid_engine_follows_shards_split_anew_under_one_mask():
    """The rows of a mask kept between calls belong to the span they were cut for: shards of
    other lengths under the same mask object need their own rows."""
    for rank, verdict in enumerate(_verdicts(_resharded_worker, 2, 90)):
        assert "detail" not in verdict, verdict["detail"]
        assert len(verdict) == 3 and max(verdict.values()) < 1e-5, (rank, verdict)
