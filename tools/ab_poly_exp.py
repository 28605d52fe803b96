"""A/B in one process on Hopper: part of the exponentials computed on the FMA pipe (a degree-5
polynomial, 2.2e-7 relative) instead of all on the special-function unit (ex2.approx), which
runs 16 results per clock per SM against 128 for FMAs.

    PYTHONPATH=. python -m tools.ab_poly_exp [--skip scoring attention]

* scoring: the pooled stats pass of the cheap top-k prediction (one exponential per score) with a
  quarter, three eighths or half of them on the polynomial (tools.compare_scoring's launcher of
  a source variant), LSE differences and queued medians beside the current kernel;
* attention: the online softmax of every attention kernel (cuda_src/attn_common.cuh) with a
  quarter or half of each tile's exponentials on the polynomial, built from a patched copy of
  cuda_src/ and swapped in by clearing the kernel tables; errors against the reference, then
  dense and random lists (0.3, 0.1) at wan14b-480p (D = 128) and cogvideox5b (D = 64), CUDA-event
  medians in alternation, beside SDPA cuDNN.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

import fgcupy.jit.source as source
from bench.cases import random_inputs, random_topk_mask, sdpa_call
from fgcupy import SliceMask, SparseAttention, mask_kernels, reference_attention
from fgcupy.reference import relative_l2
from fgcupy.timing import cuda_time_ms
from tools.ab_sources import use_sources
from tools.compare_scoring import EarlierKernel
from tools.scoring_setup import queued_ms, scoring_setup

POLY_EXP2 = """
// 2^x on the FMA pipe: 2^round(x) * p(x - round(x)), p of degree 5 on [-0.5, 0.5]; 0 below -127.
__device__ __forceinline__ float poly_exp2(float x) {
  x = fmaxf(x, -127.f);
  const float t = x + 12582912.f;
  const float f = x - (t - 12582912.f);
  float p = 1.326697039e-03f;
  p = fmaf(p, f, 9.675459746e-03f);
  p = fmaf(p, f, 5.550742616e-02f);
  p = fmaf(p, f, 2.402212175e-01f);
  p = fmaf(p, f, 6.931469492e-01f);
  p = fmaf(p, f, 1.000000071e+00f);
  return __int_as_float(max(__float_as_int(p) + (__float_as_int(t) << 23), 0));
}
"""
STATS_EXP = "          part[(i >> 1) & 1][i & 1] += fast_exp2(fmaf(acc[i], scale_log2, -base[(i >> 1) & 1]));"
STATS_VARIANTS = {"1/4": "(i & 3) == 3", "3/8": "(i & 7) == 3 || (i & 7) >= 6", "1/2": "(i & 1) == 1"}
SOFTMAX_EXP = """    x[0] = fast_exp2(x[0] - base[0]);
    x[1] = fast_exp2(x[1] - base[0]);
    x[2] = fast_exp2(x[2] - base[1]);
    x[3] = fast_exp2(x[3] - base[1]);"""
SOFTMAX_VARIANTS = {"1/4": "(nt & 3) == 3", "1/2": "(nt & 1) == 1"}


def _patched(code: str, old: str, new: str, anchor: str) -> str:
    if old not in code or anchor not in code:
        raise SystemExit(f"the source this A/B patches changed: update tools/ab_poly_exp.py ({old.strip()[:40]}...)")
    return code.replace(anchor, POLY_EXP2 + anchor, 1).replace(old, new, 1)


def stats_variant(cond: str) -> str:
    code = source.read_source("mask_score_sm90.cu")
    new = ("          {\n            const float x = fmaf(acc[i], scale_log2, -base[(i >> 1) & 1]);\n"
           f"            part[(i >> 1) & 1][i & 1] += ({cond}) ? poly_exp2(x) : fast_exp2(x);\n          }}")
    return _patched(code, STATS_EXP, new, "template <class T, int D, int MODE, int GROUP>")


def softmax_variant_dir(cond: str) -> Path:
    folder = Path(tempfile.mkdtemp()) / "cuda_src"
    shutil.copytree(source.SOURCE_DIR, folder)
    header = folder / "attn_common.cuh"
    poly = SOFTMAX_EXP.replace("fast_exp2", "poly_exp2")
    new = f"    if ({cond}) {{\n{poly}\n    }} else {{\n{SOFTMAX_EXP}\n    }}"
    header.write_text(_patched(header.read_text(), SOFTMAX_EXP, new, "template <int N>\n__device__ __forceinline__ void softmax_tile"))
    return folder


def scoring() -> None:
    setup = scoring_setup()
    k, scale, pooled = setup.k, setup.scale, setup.pooled

    def current():
        return mask_kernels.gpu_scores("stats", pooled, k, scale, warps=8, kernel="wgmma")

    variants = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, cond in STATS_VARIANTS.items():
            path = Path(folder) / f"stats_{len(variants)}.cu"
            path.write_text(stats_variant(cond))
            variants[name] = EarlierKernel(str(path), k, scale)
    base = current()
    for name, variant in variants.items():
        print(f"stats pass, {name} on the polynomial: largest LSE difference "
              f"{float((variant('stats', pooled) - base).abs().max()):.2e}")
    for rep in range(3):
        line = f"[{rep}] stats pass: all ex2.approx {queued_ms(current):.3f} ms"
        for name, variant in variants.items():
            line += f" | {name} polynomial {queued_ms(lambda: variant('stats', pooled)):.3f} ms"
        print(line, flush=True)


def attention() -> None:
    variants = {"ex2.approx": source.SOURCE_DIR}
    variants.update({f"{name} polynomial": softmax_variant_dir(cond) for name, cond in SOFTMAX_VARIANTS.items()})
    for preset, (B, H, S, D) in (("wan14b-480p", (1, 40, 32760, 128)), ("cogvideox5b", (1, 48, 17550, 64))):
        q, k, v = random_inputs(B, H, S, D)
        cudnn = cuda_time_ms(sdpa_call(q, k, v, "cudnn"), reps=10)["median_ms"]
        print(f"{preset}: SDPA cuDNN {cudnn:.2f} ms", flush=True)
        small = [t[:, :2, :2048].contiguous() for t in (q, k, v)]
        small_mask = random_topk_mask(1, 2, 2048, 2048, 128, 0.3)
        expected = reference_attention(*small, small_mask)[0]
        for name, folder in variants.items():
            use_sources(folder)
            got = SparseAttention().plan(small_mask, head_dim=D, dtype=q.dtype).run(*small)
            print(f"  {name}: relative L2 against the reference {relative_l2(got.float(), expected):.2e}")
        masks = {"dense": SliceMask.full(B, H, S, S, 128, device="cuda"),
                 "random 0.3": random_topk_mask(B, H, S, S, 128, 0.3), "random 0.1": random_topk_mask(B, H, S, S, 128, 0.1)}
        for mask_name, mask in masks.items():
            times = {name: [] for name in variants}
            for _ in range(2):
                for name, folder in variants.items():
                    use_sources(folder)
                    plan = SparseAttention().plan(mask, head_dim=D, dtype=q.dtype)
                    times[name].append(cuda_time_ms(lambda: plan.run(q, k, v), reps=10)["median_ms"])
            print(f"  {mask_name:10s} " + " | ".join(
                f"{name} {min(t):.2f} ms ({min(t) / cudnn:.3f} x cuDNN)" for name, t in times.items()), flush=True)
        torch.cuda.empty_cache()
    use_sources(variants["ex2.approx"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip", nargs="*", default=[], choices=["scoring", "attention"])
    args = parser.parse_args()
    if "scoring" not in args.skip:
        scoring()
    if "attention" not in args.skip:
        attention()


if __name__ == "__main__":
    main()
