"""Is random-list attention at low density slowed by K/V rows missing in L2? (GPU)

    python -m tools.probe_kv_in_l2 [--same-masks]

wan14b-480p, the default kernel on the same random masks (a new one per round and density),
with each head's own K/V (40 heads x 16 MB: the first CTAs of each head read it from memory) and
with every head reading head 0's K/V (an expanded view: 16 MB in all, resident in L2). If the
first were clearly slower, a prefetch of the next head's K/V would pay. ``--same-masks``: three
masks at density 0.1 planned once and timed in turn over four rounds (how much one mask's time
moves between rounds, against how much masks differ).
"""
import argparse

import torch

from bench.cases import random_inputs, sdpa_call
from bench.presets import PRESETS
from bench.timing import require_cuda
from fgcupy import SparseAttention
from fgcupy.mask import random_topk_mask
from fgcupy.timing import cuda_time_ms


def own_against_shared(q, k, v, cudnn: float) -> None:
    batch, heads, seq, dim = q.shape
    shared_k, shared_v = k[:, :1].expand(-1, heads, -1, -1), v[:, :1].expand(-1, heads, -1, -1)
    for rnd in range(3):
        for density in (0.1, 0.3):
            mask = random_topk_mask(batch, heads, seq, seq, 128, density, "cuda")
            plan = SparseAttention().plan(mask, head_dim=dim, dtype=q.dtype)
            out = torch.empty_like(q)
            own = cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=20)["median_ms"]
            sh = cuda_time_ms(lambda: plan.run(q, shared_k, shared_v, out=out), reps=20)["median_ms"]
            print(f"round {rnd} d={density}: own K/V {own:.3f} ms = {own / (density * cudnn):.3f} x (d x cuDNN); "
                  f"shared K/V {sh:.3f} ms = {sh / (density * cudnn):.3f} x; own/shared {own / sh:.3f}", flush=True)


def same_masks(q, k, v) -> None:
    batch, heads, seq, dim = q.shape
    out = torch.empty_like(q)
    plans = [SparseAttention().plan(random_topk_mask(batch, heads, seq, seq, 128, 0.1, "cuda"), head_dim=dim,
                                    dtype=q.dtype) for _ in range(3)]
    for rnd in range(4):
        line = []
        for i, plan in enumerate(plans):
            t = cuda_time_ms(lambda: plan.run(q, k, v, out=out), reps=20)
            line.append(f"mask{i} {t['median_ms']:.3f} ({t['min_ms']:.3f}-{t['max_ms']:.3f})")
        print(f"round {rnd}: " + "  ".join(line), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--same-masks", action="store_true", help="time three planned masks in turn instead")
    args = parser.parse_args(argv)
    require_cuda("tools.probe_kv_in_l2")
    batch, heads, seq, dim = PRESETS["wan14b-480p"].shape
    q, k, v = random_inputs(batch, heads, seq, dim)
    print(torch.cuda.get_device_name())
    cudnn = cuda_time_ms(sdpa_call(q, k, v, "cudnn"), reps=20)["median_ms"]
    print(f"cudnn {cudnn:.3f} ms")
    if args.same_masks:
        same_masks(q, k, v)
        print(f"cudnn again {cuda_time_ms(sdpa_call(q, k, v, 'cudnn'), reps=20)['median_ms']:.3f} ms")
    else:
        own_against_shared(q, k, v, cudnn)


if __name__ == "__main__":
    main()
