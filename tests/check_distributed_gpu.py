"""Sequence-parallel attention on GPUs with NCCL, without torchrun: spawns one process per GPU,
runs fgcupy's kernel on sequence shards and checks every rank's output against the single-GPU
run of the same mask (bf16 tolerance; the same kernel sees the same keys, so it is usually
bitwise equal) and against the float32 reference; then the error paths, which must raise on
every rank without blocking any.

    PYTHONPATH=$PWD python -m tests.check_distributed_gpu [--world 2] [--json out.json]

Exits 1 if any case fails on any rank. NCCL environment variables are used as set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tests.dist_harness import Case, error_cases, run_world

GPU = dict(device="cuda", dtype="bfloat16", compute="fgcupy", tolerance=1e-2, tolerance_vs_single=4e-3,
           lse_tolerance=1e-3, pg_timeout_s=120, error_group="world")

CASES = [
    Case("even_d128_m128", heads=4, seq=1024, head_dim=128, slice_m=128),
    Case("uneven_nhd_d64_m64_groups2", heads=5, seq=2077, head_dim=64, slice_m=64, layout="NHD", head_groups=2),
    Case("p2p_uneven_heads", heads=3, seq=777, head_dim=128, slice_m=64, exchange="p2p", head_groups=2),
    Case("local_masks_groups3", heads=6, seq=1500, head_dim=128, slice_m=128, mask="local", head_groups=3),
    Case("mask_callable", heads=4, seq=900, head_dim=64, slice_m=128, mask="callable", head_groups=2),
    Case("mask_predictor", heads=4, seq=1700, head_dim=128, slice_m=128, mask="predict", head_groups=2),
    Case("dense_no_mask", heads=2, seq=700, head_dim=128, slice_m=128, mask="none", return_lse=False),
    Case("kv_shards_differ", heads=4, seq=640, kv_seq=1111, head_dim=128, slice_m=128),
    Case("batch2_groups2_scale", batch=2, heads=3, seq=800, head_dim=64, slice_m=64, head_groups=2, scale=0.07),
    Case("seq_lens_given_groups4", heads=8, seq=2048, head_dim=128, slice_m=128, pass_seq_lens=True, head_groups=4),
    Case("fewer_heads_than_ranks", heads=1, seq=512, head_dim=128, slice_m=128),
    Case("reuse_then_new_mask", heads=4, seq=1200, head_dim=128, slice_m=128, head_groups=2, reuse=True),
    Case("custom_shards", heads=4, seq=1000, head_dim=128, slice_m=128, shards=(300, 700)),
    Case("medium_8k_groups2", heads=8, seq=8192, head_dim=128, slice_m=128, head_groups=2, layout="NHD"),
    # copy-engine exchange (fgcupy.peer_copy)
    Case("copy_even_hnd", heads=4, seq=1024, head_dim=128, slice_m=128, exchange="copy", return_lse=False),
    Case("copy_uneven_nhd_groups2", heads=5, seq=2077, head_dim=64, slice_m=64, layout="NHD", head_groups=2,
         exchange="copy", return_lse=False),
    Case("copy_uneven_heads_groups3", heads=7, seq=1500, head_dim=128, slice_m=128, head_groups=3, exchange="copy",
         return_lse=False),
    Case("copy_batch2_custom_shards", batch=2, heads=4, seq=1000, head_dim=64, slice_m=64, shards=(300, 700),
         exchange="copy", return_lse=False),
    Case("copy_mask_predictor", heads=4, seq=1700, head_dim=128, slice_m=128, mask="predict", head_groups=2,
         exchange="copy", return_lse=False),
    Case("copy_dense_seq_lens", heads=2, seq=700, head_dim=128, slice_m=128, mask="none", pass_seq_lens=True,
         exchange="copy", return_lse=False),
    Case("copy_reuse", heads=4, seq=1200, head_dim=128, slice_m=128, head_groups=2, reuse=True, exchange="copy",
         return_lse=False),
    Case("copy_with_lse_uses_all_to_all", heads=4, seq=640, head_dim=128, slice_m=128, exchange="copy"),
    Case("copy_kv_shards_differ_uses_all_to_all", heads=4, seq=640, kv_seq=1111, head_dim=128, slice_m=128,
         exchange="copy"),
]


def cases_for(world: int):
    """Custom shard lengths are written for two ranks; other worlds use the default split."""
    return [c for c in CASES if c.shards is None or len(c.shards) == world]


def run(world: int, timeout_s: float = 240.0):
    errors = list(error_cases(GPU))
    results = run_world(world, "nccl", GPU, cases_for(world), errors, timeout_s=timeout_s)
    return results, [c.name for c in cases_for(world)] + errors


def failures(results, names):
    """(rank, name, detail) of everything that did not pass, missing verdicts included."""
    bad = []
    for rank, mine in enumerate(results):
        for key in ("__crash__", "__hung__"):
            if key in mine:
                bad.append((rank, key, mine[key]["detail"]))
        for name in names + ["__finished__"]:
            verdict = mine.get(name)
            if verdict is None:
                bad.append((rank, name, "no verdict (crashed or hung before it)"))
            elif not verdict["ok"]:
                bad.append((rank, name, verdict.get("detail", "")))
    return bad


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--json", help="write every rank's verdicts here")
    parser.add_argument("--timeout", type=float, default=240, help="kill the ranks after this many seconds")
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < args.world:
        print(f"needs {args.world} GPUs, torch sees {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results, names = run(args.world, timeout_s=args.timeout)
    for name in names:
        verdicts = [r.get(name, {}) for r in results]
        status = "ok" if all(v.get("ok") for v in verdicts) else "FAIL"
        extra = []
        for rank, v in enumerate(verdicts):
            if "rel_l2_vs_single" in v:
                bitwise = " (bitwise)" if v.get("bitwise_equal") else ""
                extra.append(f"r{rank}: vs 1-GPU {v['rel_l2_vs_single']:.2e}{bitwise}"
                             f", vs fp32 {v.get('rel_l2_vs_float32_reference', float('nan')):.2e}")
            elif "error" in v:
                extra.append(f"r{rank}: {v['error']}: {v['message'][:70]}")
        print(f"{status:4s} {name:34s} {'; '.join(extra)}")
    bad = failures(results, names)
    for rank, name, detail in bad:
        print(f"\n--- rank {rank}: {name}\n{detail}")
    print(f"\n{len(names) - len({n for _, n, _ in bad})}/{len(names)} passed on {args.world} GPUs "
          f"({torch.cuda.get_device_name(0)}) in {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
