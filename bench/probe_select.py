"""Where the selection kernel's time goes: time fg::select_rows (top-k, fused emit, and tau) on
wan14b-480p video-like scores, full and cut short after its first pass or after the search
(the source is patched here, not in the package), beside the scoring kernel.

    PYTHONPATH=$PWD python3 -m bench.probe_select
"""

import math

import numpy as np
import torch

from fgcupy.timing import cuda_time_ms
from fgcupy import bridge, mask_kernels, scoring
from fgcupy import mask_reference as ref
from fgcupy.jit.score_spec import SelectSpec
from fgcupy.jit.source import nvrtc_options, read_source
from fgcupy.workloads import SHAPES, video_qkv

STOPS = {
    "first pass only": ("  const unsigned band_cnt = cnt[0];", "  if (row >= 0) return;\n"),
    "first pass + search": ("  if (tid == 0) counts[row] = static_cast<int>(cut.n);", "  if (row >= 0) return;\n"),
    "full": None,
}


def compile_variant(patch, spec):
    import cupy

    src = read_source("mask_select.cu")
    if patch is not None:
        anchor, extra = patch
        assert anchor in src, anchor
        src = src.replace(anchor, extra + anchor, 1)
    module = cupy.RawModule(code=src, options=nvrtc_options(), name_expressions=[spec.name_expression])
    kernel = module.get_function(spec.name_expression)
    kernel.max_dynamic_shared_size_bytes = spec.smem_bytes
    return kernel


def window_stats(vals, lse, top_k, chunk=512):
    """Keys in the level-0 bin (1/32 logit below the lse) that holds each row's k-th key: the
    window the radix select must narrow (more than 2048 keys -> passes over the row)."""
    sizes, spreads = [], []
    for r0 in range(0, vals.shape[0], chunk):
        v = vals[r0 : r0 + chunk]
        depth = ((lse[r0 : r0 + chunk, None] - v) * 32).clamp(0, 2046).floor()
        kth = torch.topk(v, top_k, dim=1).values[:, -1:]
        kth_bin = ((lse[r0 : r0 + chunk, None] - kth) * 32).clamp(0, 2046).floor()
        sizes.append((depth == kth_bin).sum(1).float().cpu())
        spreads.append((v.amax(1) - v.median(1).values).float().cpu())
    sizes, spreads = torch.cat(sizes), torch.cat(spreads)
    q = torch.tensor([0.5, 0.9, 0.99])
    print(f"window at the k-th key: median / p90 / p99 {torch.quantile(sizes, q).tolist()}, "
          f"rows > 2048: {(sizes > 2048).float().mean().item():.3f}; max - median logit: "
          f"median {spreads.median().item():.3f}")


def main():
    shape = SHAPES["wan14b-480p"]
    q, k, _ = video_qkv(shape, "mixed", seed=0, device="cuda")
    pooled = ref.pool_queries(q, 128).to(q.dtype).contiguous()
    req_topk = scoring.make_request(shape.head_dim, shape.seq, 128, "topk", density=0.1)
    req_tau = scoring.make_request(shape.head_dim, shape.seq, 128, "tau", tau=0.9)
    for mode, scores in (("logits_f16", "float16"), ("logits", "float32")):
        spec = SelectSpec(True, scores)
        vals, lse = mask_kernels.gpu_scores(mode, pooled, k, req_topk.scale, warps=8)
        n, per_head, ld = vals.shape
        rows = n * per_head
        counts = torch.empty(rows, dtype=torch.int32, device="cuda")
        offsets = (torch.arange(rows, device="cuda", dtype=torch.int64) * req_topk.top_k).to(torch.int32)
        out = torch.empty(rows * req_topk.top_k, dtype=torch.int32, device="cuda")
        bits = torch.empty(rows, mask_kernels.bit_words(shape.seq), dtype=torch.int32, device="cuda")
        smem = spec.launch_smem(ld)
        if scores == "float32":
            window_stats(vals[..., : shape.seq].reshape(rows, shape.seq), lse.reshape(rows), req_topk.top_k)
        ptr = mask_kernels._ptr
        print(f"{scores} scores: rows {rows} x {shape.seq} keys, shared memory {smem} bytes")
        for name, patch in STOPS.items():
            kernel = compile_variant(patch, spec)
            for label, req, with_out in (("top-k", req_topk, True), ("tau", req_tau, False)):
                args = (ptr(vals), np.int64(ld), ptr(lse), np.int32(shape.seq), np.int32(per_head), np.int32(128),
                        np.int32(-1), np.int32(mask_kernels.RULE_IDS[req.rule]), np.int32(req.top_k or 0),
                        np.float32(req.tau or 0.0), np.float32(0.0), np.int32(0), np.int32(shape.seq), ptr(counts),
                        ptr(offsets if with_out else None), ptr(out if with_out else None),
                        ptr(None if with_out else bits), np.int32(bits.shape[1]))

                def call():
                    with bridge.torch_stream(vals.device):
                        kernel((rows,), (spec.threads,), args, shared_mem=smem)

                ms = cuda_time_ms(call, warmup=2, reps=10)
                print(f"  {name:22s} {label:6s} {ms['median_ms']:.3f} ms", flush=True)
    scale = 1 / math.sqrt(shape.head_dim)
    for mode in ("logits_f16", "logits"):
        ms = cuda_time_ms(lambda m=mode: mask_kernels.gpu_scores(m, pooled, k, scale, warps=8), warmup=2, reps=10)
        print(f"  score kernel ({mode}, 8 warps) {ms['median_ms']:.3f} ms")


if __name__ == "__main__":
    main()
