"""fgcupy against the peers on video-like attention, in one process on one GPU.

For a preset and a pattern of fgcupy.workloads it predicts slice masks at several densities
(the cheap top-k predictor), then times, with CUDA-event medians after warm-up:
  * SDPA flash and cuDNN (dense), FlexAttention dense;
  * fgcupy on the slice mask;
  * FlexAttention on the 128x128 block cover of the same slice mask (what a block-sparse
    kernel must compute to be exact);
  * FlexAttention on 128x128 block masks chosen from pooled block scores at the block densities
    of --block-densities; the summary names the first whose output error is no larger than
    fgcupy's and the grid point below it, which bracket FlexAttention's equal-error time;
  * where they are installed: FlexAttention with its FLASH backend (dense and pooled block
    masks) and FlashInfer's variable block-sparse attention with 128 x 1 blocks on the slice
    mask (the FG-Attn paper's baseline); elsewhere a line says why they were left out.
Errors are relative L2 against dense float32 attention on a subsample of heads. Writes
``report.json`` and ``report.md`` into --out; ``python -m bench.plot`` draws the figures.

    PYTHONPATH=. python -m bench.report_peers --preset wan14b-480p --out results/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial

import torch

from bench.timing import attention_tflops, cuda_time_ms, require_cuda
from fgcupy import SparseAttention, predict_mask, relative_l2
from fgcupy.reference import dense_attention
from fgcupy.workloads import SHAPES, video_qkv



def visited_share(block_mask, pairs: int) -> float:
    """The share of ``pairs`` (query block, key block) pairs a FlexAttention BlockMask computes,
    partial and full blocks alike (a block cover lists every block as full)."""
    full = block_mask.full_kv_num_blocks
    return float(block_mask.kv_num_blocks.sum() + (0 if full is None else full.sum())) / pairs

def pooled_block_mask(q, k, density: float, block: int = 128):
    """FlexAttention BlockMask keeping, per 128-query row block, the top key blocks by the
    softmax of mean-pooled q against mean-pooled k (the usual block predictor), as full blocks
    (FlexAttention evaluates no mask_mod in them)."""
    from torch.nn.attention.flex_attention import BlockMask

    batch, heads, seq, dim = q.shape
    blocks = math.ceil(seq / block)
    pad = blocks * block - seq

    def pool(x):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, pad))
        sums = x.view(batch, heads, blocks, block, dim).sum(3)
        counts = torch.full((blocks,), float(block), device=x.device)
        counts[-1] = block - pad
        return sums / counts.view(1, 1, -1, 1)

    scores = torch.softmax(pool(q) @ pool(k).transpose(-1, -2) / math.sqrt(dim), dim=-1)
    keep = max(1, round(density * blocks))
    top = torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
    counts = torch.full((batch, heads, blocks), keep, dtype=torch.int32, device=q.device)
    full_indices = torch.zeros(batch, heads, blocks, blocks, dtype=torch.int32, device=q.device)
    full_indices[..., :keep] = top
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), full_indices, full_kv_num_blocks=counts,
                                    full_kv_indices=full_indices, BLOCK_SIZE=block, seq_lengths=(seq, seq))


def optional_peer(name: str, make_call, reps: int):
    """CUDA-event timing of the call ``make_call()`` returns, for a peer that may not be installed
    here (FlashInfer, FlexAttention's FLASH backend): None, with the reason printed, where making
    it or its first call fails."""
    try:
        call = make_call()
        call()
        torch.cuda.synchronize()
    except Exception as err:  # noqa: BLE001 - any failure means "not available here"
        reason = (str(err).strip().splitlines() or [""])[0][:160]
        print(f"{name:28s} unavailable here ({type(err).__name__}: {reason})", flush=True)
        return None
    return cuda_time_ms(call, reps=reps)


def flashinfer_slices(q, k, v, mask):
    """FlashInfer's block-sparse attention with 128 x 1 blocks (the FG-Attn paper's baseline) on
    the slice mask: its variable block-sparse wrapper, one block layout per head."""
    import flashinfer

    batch, heads, seq, dim = q.shape
    if batch != 1 or mask.slice_m != 128:
        raise ValueError("the FlashInfer comparison takes one batch and slices of 128 queries")
    workspace = torch.empty(128 * 1024 * 1024, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.sparse.VariableBlockSparseAttentionWrapper(workspace)
    blocks = mask.q_blocks
    row_sizes = torch.full((heads, blocks), 128, dtype=torch.int32, device=q.device)
    row_sizes[:, -1] = seq - 128 * (blocks - 1)
    col_sizes = torch.ones(heads, seq, dtype=torch.int32, device=q.device)
    wrapper.plan(mask.to_dense()[0], row_sizes, col_sizes, heads, heads, dim, q_data_type=q.dtype)
    return lambda: wrapper.run(q[0], k[0], v[0])  # HND: [heads, tokens, dim]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-480p", choices=sorted(SHAPES))
    parser.add_argument("--pattern", default="mixed")
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--block-densities", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
    parser.add_argument("--error-heads", type=int, default=8, help="heads (spread evenly) used for the error columns")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    require_cuda("bench.report_peers")

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import flex_attention

    os.makedirs(args.out, exist_ok=True)
    shape = SHAPES[args.preset]
    started = time.perf_counter()
    q, k, v = video_qkv(shape, args.pattern, device="cuda", dtype=torch.bfloat16)
    print(f"inputs {tuple(q.shape)} pattern {args.pattern} built in {time.perf_counter() - started:.1f} s", flush=True)
    batch, heads, seq, dim = q.shape
    # Error heads spread over the problem (the head styles repeat every few heads; the first few
    # would over-weight some styles and miss others).
    sub = torch.linspace(0, heads - 1, min(args.error_heads, heads)).round().long().unique().tolist()
    ref = dense_attention(q[:, sub], k[:, sub], v[:, sub])
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []

    def record(method, density, ms, error=None, **extra):
        tflops = attention_tflops(batch, heads, seq, seq, dim, ms["median_ms"])
        row = dict(method=method, density=density, ms=ms["median_ms"], dense_equiv_tflops=tflops,
                   kept_tflops=tflops * density, rel_l2=error, **extra)
        rows.append(row)
        err = "" if error is None else f"  rel L2 {error:.4f}"
        print(f"{method:28s} d={density:<6.3f} {ms['median_ms']:8.2f} ms  {tflops:7.1f} TFLOP/s dense-equiv{err}", flush=True)

    for backend, name in ((SDPBackend.FLASH_ATTENTION, "sdpa-flash"), (SDPBackend.CUDNN_ATTENTION, "sdpa-cudnn")):
        def call(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        record(name, 1.0, cuda_time_ms(call, reps=args.reps))
    record("flex-dense", 1.0, cuda_time_ms(lambda: flex(q, k, v), reps=args.reps))
    flash_options = {"BACKEND": "FLASH"}
    flash_dense = optional_peer("flex-flash-dense", lambda: partial(flex, q, k, v, kernel_options=flash_options),
                                args.reps)
    if flash_dense is not None:
        record("flex-flash-dense", 1.0, flash_dense)

    fg_errors = {}
    for density in args.densities:
        mask_ms = cuda_time_ms(lambda: predict_mask(q, k, slice_m=128, method="topk", density=density), reps=args.reps)
        mask = predict_mask(q, k, slice_m=128, method="topk", density=density)
        plan = SparseAttention().plan(mask, head_dim=dim, dtype=q.dtype)
        out = torch.empty_like(q)
        ms = cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=args.reps)
        error = relative_l2(out[:, sub].float(), ref)
        fg_errors[density] = error
        record("fgcupy", mask.density(), ms, error, target_density=density, spec=plan.spec.name,
               predict_ms=mask_ms["median_ms"])
        cover = mask.to_block_mask(128, exact=False)
        cover_density = visited_share(cover, batch * heads * math.ceil(seq / 128) ** 2)
        record("flex-block-cover", cover_density, cuda_time_ms(lambda: flex(q, k, v, block_mask=cover), reps=args.reps),
               target_density=density, slice_density=mask.density(), fgcupy_ms=ms["median_ms"])
        flashinfer_ms = optional_peer("flashinfer-slices", partial(flashinfer_slices, q, k, v, mask), args.reps)
        if flashinfer_ms is not None:
            record("flashinfer-slices", mask.density(), flashinfer_ms, target_density=density)
        del mask, plan, cover, out
        torch.cuda.empty_cache()

    block_errors = {}
    for density in args.block_densities:
        block_mask = pooled_block_mask(q, k, density)
        kept = visited_share(block_mask, batch * heads * math.ceil(seq / 128) ** 2)  # whole blocks round d
        out = flex(q, k, v, block_mask=block_mask)
        error = relative_l2(out[:, sub].float(), ref)
        block_errors[density] = error
        record("flex-block-pooled", kept, cuda_time_ms(lambda: flex(q, k, v, block_mask=block_mask), reps=args.reps),
               error, target_density=density)
        if flash_dense is not None:
            flash_out = flex(q, k, v, block_mask=block_mask, kernel_options=flash_options)
            record("flex-flash-block-pooled", kept,
                   cuda_time_ms(lambda: flex(q, k, v, block_mask=block_mask, kernel_options=flash_options),
                                reps=args.reps), relative_l2(flash_out[:, sub].float(), ref), target_density=density)
            del flash_out
        del block_mask, out

    header = f"{gpu_header()} | preset {args.preset} {tuple(q.shape)} bf16 | pattern {args.pattern}"
    summary = equal_quality_summary(rows, fg_errors, block_errors)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"header": header, "rows": rows, "summary": summary}, f, indent=1)
    lines = [f"# fgcupy vs peers\n\n{header}\n", "| method | density | ms | dense-equiv TFLOP/s | rel L2 |", "|---|---|---|---|---|"]
    for r in rows:
        err = "" if r["rel_l2"] is None else f"{r['rel_l2']:.4f}"
        lines.append(f"| {r['method']} | {r['density']:.3f} | {r['ms']:.2f} | {r['dense_equiv_tflops']:.0f} | {err} |")
    lines += ["", *[f"- {s}" for s in summary]]
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:  # the figures, where matplotlib is installed (else: python -m bench.plot <out>/report.json)
        from bench.plot import main as plot

        plot([os.path.join(args.out, "report.json")])
    except ImportError:
        print("matplotlib not installed: run `python -m bench.plot report.json` elsewhere for the figures")


def gpu_header() -> str:
    """GPU name, driver and library versions for report headers."""
    import cupy

    driver = cupy.cuda.runtime.driverGetVersion()
    return (f"{torch.cuda.get_device_name()} | driver CUDA {driver // 1000}.{driver % 1000 // 10} | "
            f"torch {torch.__version__} | cupy {cupy.__version__}")


def equal_quality_summary(rows, fg_errors, block_errors):
    """Speed ratios the issue asks for, from the measured rows."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    flash = by["sdpa-flash"][0]["ms"]
    cudnn = by["sdpa-cudnn"][0]["ms"]
    out = []
    for fg, cover in zip(by.get("fgcupy", []), by.get("flex-block-cover", [])):
        d = fg["density"]  # the mask's own density: whole keys round the requested one
        line = (f"slice density {d:.3f}: fgcupy {fg['ms']:.2f} ms; block cover {cover['density']:.3f} dense "
                f"-> FlexAttention {cover['ms']:.2f} ms ({cover['ms'] / fg['ms']:.2f}x slower); "
                f"fgcupy / ({d:.3f} x SDPA-flash) = {fg['ms'] / (d * flash):.2f}, "
                f"/ ({d:.3f} x SDPA-cuDNN) = {fg['ms'] / (d * cudnn):.2f}")
        pooled = sorted(by.get("flex-block-pooled", []), key=lambda b: b["density"])
        matching = [b for b in pooled if b["rel_l2"] <= fg["rel_l2"]]
        if matching:
            best = matching[0]
            line += (f"; equal quality: block density {best['density']:.2f} (rel L2 {best['rel_l2']:.4f} <= "
                     f"{fg['rel_l2']:.4f}) takes {best['ms']:.2f} ms ({best['ms'] / fg['ms']:.2f}x fgcupy)")
            worse = [b for b in pooled if b["density"] < best["density"]]
            if worse:  # the grid brackets the equal-error density: FlexAttention's time lies between
                below = worse[-1]
                line += (f", the grid point below ({below['density']:.2f}, rel L2 {below['rel_l2']:.4f}) "
                         f"{below['ms']:.2f} ms ({below['ms'] / fg['ms']:.2f}x)")
            else:
                line += ", the lowest grid point: an upper bound"
        else:
            line += f"; no pooled block mask up to density {max(block_errors, default=0)} matched rel L2 {fg['rel_l2']:.4f}"
        out.append(line)
    return out


if __name__ == "__main__":
    main()
