"""Where the selection kernel's time goes: time fg::select_rows (top-k, fused emit, and tau) on
wan14b-480p video-like scores, full and cut short after its first pass or after the search
(the source is patched here, not in the package), beside the scoring kernel; with --baseline,
another version of mask_select.cu timed in full in the same run.

    PYTHONPATH=$PWD python3 -m bench.probe_select [--baseline OLD_mask_select.cu]
"""

import argparse
import math

import numpy as np
import torch

from fgcupy.timing import cuda_time_ms
from fgcupy import bridge, mask_kernels, scoring
from fgcupy import mask_reference as ref
from fgcupy.jit.score_spec import SelectSpec
from fgcupy.jit.source import nvrtc_options, read_source
from fgcupy.workloads import SHAPES, video_qkv

FIRST_PASS_STOP = ("  const unsigned band_cnt = cnt[0];", "  if (row >= 0) return;\n")
#: Patches: (anchor, text inserted before it) or {"old": text, "new": replacement}; a list of
#: patches is applied in order.
STOPS = {
    "first pass only": FIRST_PASS_STOP,
    # Diagnostic: the same pass with plain (racy) histogram increments, to price the atomics.
    "first pass, no atomics": [FIRST_PASS_STOP, ("atomicAdd(cnt + bs[e], 1u);", "cnt[bs[e]] += 1u; //")],
    # Variant: all eight 16-byte loads of a thread in flight at once (one batch for a 32k row).
    "full, 8 loads in flight": {"old": """  for (int base = 0; base < nvec; base += 4 * kSelThreads) {
    typename S::Raw raw[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int f = base + j * kSelThreads + tid;
      if (f < nvec) raw[j] = S::load(c.vals, f);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {""", "new": """  for (int base = 0; base < nvec; base += 8 * kSelThreads) {
    typename S::Raw raw[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int f = base + j * kSelThreads + tid;
      if (f < nvec) raw[j] = S::load(c.vals, f);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {"""},
    "first pass + search": ("  if (tid == 0) counts[row] = static_cast<int>(cut.n);", "  if (row >= 0) return;\n"),
    "full": None,
}


def compile_variant(patch, spec, src=None):
    import cupy

    src = read_source("mask_select.cu") if src is None else src
    patches = [] if patch is None else (patch if isinstance(patch, list) else [patch])
    for p in patches:  # (anchor, text to insert before it) or {"old": text, "new": replacement}
        old, new = (p["old"], p["new"]) if isinstance(p, dict) else (p[0], p[1] + p[0])
        assert old in src, old
        src = src.replace(old, new, 1)
    module = cupy.RawModule(code=src, options=nvrtc_options(), name_expressions=[spec.name_expression])
    kernel = module.get_function(spec.name_expression)
    kernel.max_dynamic_shared_size_bytes = spec.smem_bytes
    return kernel, module


#: --phases: thread 0 of every CTA stamps clock64() at these points (inserted before the anchor).
PHASE_MARKS = [
    ("start", "  RowCtx<S> c;\n  c.vals = vals"),
    ("first pass", "  const unsigned band_cnt = cnt[0];"),
    ("level-0 bin", "  const int bin = sc.bin;\n  unsigned before = sc.before_cnt;"),
    ("gather", "      if (!by_mass && nc <= kRankMax) {"),
    ("rank", "        break;\n      }\n      skip_common_prefix();"),
    ("search end", "  if (tid == 0) counts[row] = static_cast<int>(cut.n);"),
    ("decide", "  if (bits == nullptr && offsets == nullptr) return;"),
    ("output", "    return;\n  }\n  unsigned pos;"),
]
PHASE_SLOTS = 131072


def phase_source():
    src = read_source("mask_select.cu")
    prelude = ("extern \"C\" {\n__device__ long long fg_probe[%d];\n}\n#define FG_MARK(k) if (threadIdx.x == 0) "
               "fg_probe[blockIdx.x * %d + (k)] = clock64();\n" % (PHASE_SLOTS, len(PHASE_MARKS)))
    src = src.replace("namespace fg {", prelude + "namespace fg {", 1)
    for k, (_, anchor) in enumerate(PHASE_MARKS):
        assert src.count(anchor) == 1, anchor
        indent = anchor[: len(anchor) - len(anchor.lstrip())]
        src = src.replace(anchor, f"{indent}FG_MARK({k});\n" + anchor, 1)
    return src


def print_phases(stamps, rows):
    """Median / mean SM cycles between consecutive marks each CTA reached (thread 0's clock)."""
    t = stamps[: rows * len(PHASE_MARKS)].reshape(rows, len(PHASE_MARKS))
    spans = {}
    for row in t:
        hit = [k for k in range(len(PHASE_MARKS)) if row[k] > 0]
        for a, b in zip(hit, hit[1:]):
            spans.setdefault((a, b), []).append(row[b] - row[a])
        if hit and hit[0] == 0 and hit[-1] == len(PHASE_MARKS) - 1:
            spans.setdefault((0, hit[-1]), []).append(row[hit[-1]] - row[0])
    print(f"  phases (SM cycles per CTA; rows {rows}):")
    for (a, b), d in sorted(spans.items(), key=lambda kv: (kv[0][1] - kv[0][0] == len(PHASE_MARKS) - 1, kv[0])):
        d = np.asarray(d, dtype=np.float64)
        print(f"    {PHASE_MARKS[a][0]:>12s} -> {PHASE_MARKS[b][0]:12s} median {np.median(d):8.0f} mean {d.mean():8.0f} "
              f"p90 {np.percentile(d, 90):8.0f} ({d.size / rows:.0%} of rows)")


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="another mask_select.cu to time in full beside this one")
    parser.add_argument("--phases", action="store_true", help="also stamp clock64() between phases (top-k)")
    args = parser.parse_args()
    variants = {name: (patch, None) for name, patch in STOPS.items()}  # name -> (patch, source)
    if args.baseline:
        with open(args.baseline) as f:
            variants["full, --baseline source"] = (None, f.read())
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
        runs = list(variants.items()) + ([("phases", (None, phase_source()))] if args.phases else [])
        for name, (patch, source) in runs:
            kernel, module = compile_variant(patch, spec, src=source)
            for label, req, with_out in (("top-k", req_topk, True), ("tau", req_tau, False)):
                kargs = (ptr(vals), np.int64(ld), ptr(lse), np.int32(shape.seq), np.int32(per_head), np.int32(128),
                        np.int32(-1), np.int32(mask_kernels.RULE_IDS[req.rule]), np.int32(req.top_k or 0),
                        np.float32(req.tau or 0.0), np.float32(0.0), np.int32(0), np.int32(shape.seq), ptr(counts),
                        ptr(offsets if with_out else None), ptr(out if with_out else None),
                        ptr(None if with_out else bits), np.int32(bits.shape[1]))

                def call():
                    with bridge.torch_stream(vals.device):
                        kernel((rows,), (spec.threads,), kargs, shared_mem=smem)

                ms = cuda_time_ms(call, warmup=2, reps=10)
                print(f"  {name:22s} {label:6s} {ms['median_ms']:.3f} ms", flush=True)
                if name == "phases" and label == "top-k":
                    import cupy

                    stamps = cupy.ndarray((PHASE_SLOTS,), cupy.int64, memptr=module.get_global("fg_probe"))
                    stamps.fill(0)
                    call()
                    torch.cuda.synchronize()
                    print_phases(cupy.asnumpy(stamps), rows)
    scale = 1 / math.sqrt(shape.head_dim)
    for mode in ("logits_f16", "logits"):
        ms = cuda_time_ms(lambda m=mode: mask_kernels.gpu_scores(m, pooled, k, scale, warps=8), warmup=2, reps=10)
        print(f"  score kernel ({mode}, 8 warps) {ms['median_ms']:.3f} ms")


if __name__ == "__main__":
    main()
