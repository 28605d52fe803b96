"""Attention speed table on the current GPU: fgcupy at several densities and tile shapes beside
SDPA (flash, cuDNN) in the same process, CUDA-event medians after warm-up; then the first
sparse_attention of new processes, cold and warm (bench.first_call).

    PYTHONPATH=. python -m bench.report_attention --preset wan14b-480p [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch

from bench.cases import fgcupy_call, random_inputs, random_topk_mask, sdpa_call, uneven_mask
from bench.first_call import measure as measure_first_call
from bench.first_call import summary as first_call_summary
from bench.presets import PRESETS
from bench.report_peers import gpu_header
from bench.timing import attention_tflops, cuda_time_ms, require_cuda
from fgcupy import SparseAttention
from fgcupy.attention import default_spec
from fgcupy.jit import AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="wan14b-480p", choices=sorted(PRESETS))
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.3])
    parser.add_argument("--tiles", default="default,m128n32s3w4,sm90-m128n128s2pv1c1,sm90-m128n64s2pv1c2",
                        help="kernels, comma separated: m<slice>n<key tile>s<stages>w<warps> (mma.sync), "
                             "sm90-m<slice>n<key tile>s<stages>pv<mode>c<ctas> (wgmma) or "
                             "ws-m<slice>n<key tile>s<stages>pp<pingpong> (warp-specialised wgmma)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--heads", type=int, help="time this many heads of the preset (TFLOP/s is per-head "
                        "independent; dense masks of hunyuan-720p exceed int32 offsets at full head count)")
    parser.add_argument("--head-dim", type=int, help="replace the preset's head dim (e.g. 96 or 256)")
    parser.add_argument("--uneven", action="store_true", help="also time a 1%%-100%% uneven-list mask")
    parser.add_argument("--no-first-call", action="store_true",
                        help="skip the first call of new processes (bench.first_call: one cold, two warm)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    require_cuda("bench.report_attention")

    preset = PRESETS[args.preset]
    batch, heads, seq, head_dim = preset.shape
    heads = args.heads or heads
    head_dim = args.head_dim or head_dim
    q, k, v = random_inputs(batch, heads, seq, head_dim)
    rows = []

    def record(method, density, ms, **extra):
        tflops = attention_tflops(batch, heads, seq, seq, head_dim, ms["median_ms"])
        rows.append(dict(method=method, density=density, ms=ms["median_ms"], min_ms=ms["min_ms"],
                         dense_equiv_tflops=tflops, kept_tflops=tflops * density, **extra))
        print(f"{method:34s} d={density:<5} {ms['median_ms']:9.3f} ms  dense-equiv {tflops:7.1f} TFLOP/s"
              f"  on kept work {tflops * density:6.1f}", flush=True)

    for backend in ("flash", "cudnn"):
        try:
            record(f"sdpa-{backend}", 1.0, cuda_time_ms(sdpa_call(q, k, v, backend), reps=args.reps))
        except RuntimeError as err:
            print(f"sdpa-{backend}: unavailable ({str(err).splitlines()[0]})")

    for density in args.densities:
        for tile in args.tiles.split(","):
            spec = None if tile == "default" else parse_tile(tile, head_dim)
            mask = random_topk_mask(batch, heads, seq, seq, spec.slice_m if spec else 128, density)
            tile_args = {"spec": spec} if spec else {}
            torch.cuda.synchronize()
            started = time.perf_counter()
            plan = SparseAttention().plan(mask, head_dim=head_dim, dtype=q.dtype, **tile_args)
            first_plan_s = time.perf_counter() - started  # includes compiling (or loading) the kernel
            started = time.perf_counter()
            plan.plan(mask, head_dim=head_dim, dtype=q.dtype, **tile_args)
            plan_ms = (time.perf_counter() - started) * 1e3  # host time of a re-plan (buffers reused)
            out = torch.empty_like(q)
            name = spec.name if spec else f"default plan ({plan.spec.name})"  # a tuned winner, or the heuristic
            record(f"fgcupy {name}", density, cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=args.reps),
                   first_plan_s=first_plan_s, replan_ms=plan_ms)
            del plan, out, mask
            torch.cuda.empty_cache()

    if args.uneven:
        # Also for the mma.sync kernel, the default of GPUs other than Hopper.
        mma_spec = default_spec("bfloat16", head_dim, 128)
        # Ideal time for the total work: the same number of kept keys spread evenly.
        mask = uneven_mask(batch, heads, seq, seq, 128)
        density = round(mask.density(), 3)
        for schedule in ("index", "longest_first"):
            record(f"fgcupy uneven 1-100% ({schedule})", density,
                   cuda_time_ms(fgcupy_call(q, k, v, mask, schedule=schedule), reps=args.reps))
            record(f"fgcupy {mma_spec.name} uneven ({schedule})", density,
                   cuda_time_ms(fgcupy_call(q, k, v, mask, schedule=schedule, spec=mma_spec), reps=args.reps))
        del mask
        even = random_topk_mask(batch, heads, seq, seq, 128, density)
        record("fgcupy even lists, same total work", density, cuda_time_ms(fgcupy_call(q, k, v, even), reps=args.reps))
        record(f"fgcupy {mma_spec.name} even lists", density,
               cuda_time_ms(fgcupy_call(q, k, v, even, spec=mma_spec), reps=args.reps))

    header = f"{gpu_header()} | preset {preset.name} (B, H, S, D) = {(batch, heads, seq, head_dim)}"
    print("\n" + header)
    print("| method | density | run ms | dense-equiv TFLOP/s | TFLOP/s on kept work | first plan s | re-plan ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        first = f"{r['first_plan_s']:.2f}" if "first_plan_s" in r else ""
        replan = f"{r['replan_ms']:.2f}" if "replan_ms" in r else ""
        print(f"| {r['method']} | {r['density']} | {r['ms']:.2f} | {r['dense_equiv_tflops']:.0f} | "
              f"{r['kept_tflops']:.0f} | {first} | {replan} |")
    first_call = None
    if not args.no_first_call:
        cold, warm = measure_first_call(cold_runs=1, warm_runs=2)
        first_call = {"cold": cold, "warm": warm}
        print("\n" + first_call_summary(cold, warm))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows, "first_call": first_call}, f, indent=1)


def parse_tile(token: str, head_dim: int, dtype: str = "bfloat16"):
    """'m128n32s3w4' -> AttentionSpec, 'sm90-m128n64s2pv1c2' -> Sm90AttentionSpec,
    'ws-m128n128s2pp1' -> Sm90WsAttentionSpec; every field of its family and no other (a field
    another family takes would be meaningless here)."""
    token = token.strip()
    ws = re.fullmatch(r"ws-m(\d+)n(\d+)s(\d+)pp(\d+)", token)
    if ws:
        return Sm90WsAttentionSpec(dtype, head_dim, *(int(g) for g in ws.groups()))
    sm90 = re.fullmatch(r"sm90-m(\d+)n(\d+)s(\d+)pv(\d+)c(\d+)", token)
    if sm90:
        return Sm90AttentionSpec(dtype, head_dim, *(int(g) for g in sm90.groups()))
    mma = re.fullmatch(r"m(\d+)n(\d+)s(\d+)w(\d+)", token)
    if mma:
        m, n, s, w = (int(g) for g in mma.groups())
        return AttentionSpec(dtype, head_dim, m, n, s, m // w)
    raise ValueError(f"cannot parse kernel {token!r}: give m<M>n<N>s<S>w<warps> (mma.sync), "
                     "sm90-m<M>n<N>s<S>pv<0|1>c<CTAs> (wgmma) or ws-m<M>n<N>s<S>pp<0|1> (warp-specialised)")


if __name__ == "__main__":
    main()
