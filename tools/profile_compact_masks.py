"""What ``SparseAttentionConfig(compact_masks=True)`` saves and costs per layer of a Wan-14B-sized
model (40 heads x 128, bfloat16): the mask's bytes held expanded (int32 keys) and compact
(fgcupy.MaskCache "auto": int16 keys or a bit map), and the time of a reuse call each way: the
layer's own plan running, against its compact mask expanded into a shared plan's buffers
(MaskCache.get(out=...), as the integration does), planned and run. Also the compact store
(MaskCache.put, on refresh steps). Random top-k key lists, ascending in each block as
predict_mask's are; CUDA-event medians, one process; the reuse calls also queued (the host
running ahead, as it does through a model's layers: fgcupy.timing).

    PYTHONPATH=. python -m tools.profile_compact_masks [--seqs 32760 75600] [--densities 0.1 0.3]
"""

from __future__ import annotations

import argparse
import re

import torch

from bench.cases import random_topk_mask, sdpa_call
from fgcupy import MaskCache, SliceMask, SparseAttention
from fgcupy.timing import cuda_time_ms

HEADS, DIM, SLICE_M = 40, 128, 128


def layer_row(seq: int, density: float) -> str:
    """One table row: bytes and reuse-call times for a layer of ``seq`` tokens at ``density``."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, seq, HEADS, DIM, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    drawn = random_topk_mask(1, HEADS, seq, seq, SLICE_M, density)
    rows = drawn.indptr.shape[-1] - 1
    per_row = drawn.indices.numel() // (HEADS * rows)  # keys ascending in each row, as predict_mask's selection lays them
    mask = SliceMask(drawn.indptr, drawn.indices.view(-1, per_row).sort(-1).values.reshape(-1), SLICE_M, seq, seq)
    own = SparseAttention().plan(mask, head_dim=DIM, dtype=torch.bfloat16)
    cache = MaskCache()
    cache.put("layer", mask)
    shared = SparseAttention().plan(cache.get("layer"), head_dim=DIM, dtype=torch.bfloat16)
    assert torch.equal(own.run(q, k, v, layout="NHD"), shared.run(q, k, v, layout="NHD"))

    def compact_call():
        shared.plan(cache.get("layer", out=shared.mask.indices), head_dim=DIM, dtype=torch.bfloat16)
        return shared.run(q, k, v, layout="NHD")

    calls = (("own", lambda: own.run(q, k, v, layout="NHD")),
             ("compact", compact_call),
             ("expand", lambda: cache.get("layer", out=shared.mask.indices)),
             ("put", lambda: MaskCache().put("layer", mask)),
             ("cudnn", sdpa_call(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), "cudnn")))
    timed = {name: cuda_time_ms(fn, warmup=3, reps=10)["median_ms"] for name, fn in calls}
    queued = {name: cuda_time_ms(fn, warmup=3, reps=10, queued=True)["median_ms"] for name, fn in calls[:2]}
    form = re.search(r"\)=\([^)]*\), (\w+ \w+),", cache.describe().splitlines()[1]).group(1)  # e.g. "bits uint8"
    expanded, compact = mask.memory_bytes(), cache.memory_bytes()
    return (f"| {seq} | {density} | {expanded / 2**20:.1f} MiB | {compact / 2**20:.1f} MiB ({form}, "
            f"{expanded / compact:.2f}x less) | {timed['own']:.2f} / {queued['own']:.2f} ms | "
            f"{timed['compact']:.2f} / {queued['compact']:.2f} ms (+{100 * (queued['compact'] / queued['own'] - 1):.1f} % "
            f"queued) | {timed['expand']:.3f} ms | {timed['put']:.2f} ms | {timed['cudnn']:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[32_760, 75_600])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, {HEADS} heads x {DIM}, slices of {SLICE_M}, random top-k lists")
    print("| tokens | d | mask expanded | compact | reuse call, own plan (one by one / queued) | compact: expand + "
          "plan + run (same) | of it, the expansion | compact store (refresh) | SDPA cuDNN dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq in args.seqs:
        for density in args.densities:
            print(layer_row(seq, density), flush=True)


if __name__ == "__main__":
    main()
