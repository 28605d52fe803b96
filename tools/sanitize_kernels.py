"""Run every kernel of fgcupy once on small inputs, for compute-sanitizer (GPU).

    compute-sanitizer --tool memcheck  python -m tools.sanitize_kernels
    compute-sanitizer --tool racecheck python -m tools.sanitize_kernels [--masks-only | --only NAME ...]

Covers: the mma.sync attention kernel (both slice sizes; head dims 64, 96, 128, 256), both wgmma kernels (on
Hopper; the warp-specialised one over lists of several key tiles, head dims 64, 96, 128 and 256,
with random lists (every tile gathered) and with full and window masks, whose contiguous tiles
load through tensor maps), the launch-order kernel, every mask-scoring mode (band mode
included), the dilation of sampled poolings (in place for "adaptive", the default), both selection kernels (staged and global rows,
each rule), the emit kernel, the candidates' union and the column max over a list (the portable
column-max kernel with 64-query blocks). ``--masks-only`` skips the attention kernels; ``--only``
runs just the attention kernels whose names contain one of its words (racecheck over every
attention kernel takes minutes: a run cut short can be finished). Each result is checked against the reference, so
a run that sanitizes clean also computed the right thing.
"""

from __future__ import annotations

import torch

from bench.cases import window_mask
from fgcupy import SliceMask, predict_mask, reference_attention, sparse_attention, union_keys
from fgcupy.jit import AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec
from fgcupy.mask import random_topk_mask
from fgcupy.mask_algebra import union_reference
from fgcupy.reference import relative_l2


def attention_cases():
    """(spec, tokens) pairs."""
    for d in (64, 128):
        for m in (64, 128):
            yield AttentionSpec("bfloat16", d, m), 300
    yield AttentionSpec("float16", 96, 128, key_tile=32, stages=3, rows_per_warp=32), 300
    yield AttentionSpec("bfloat16", 256, 64, key_tile=32, stages=2), 300
    if torch.cuda.get_device_capability()[0] == 9:
        yield Sm90AttentionSpec("bfloat16", 128, 128, key_tile=64, stages=2, pv=1, ctas_per_sm=2), 300
        yield Sm90AttentionSpec("float16", 64, 64, key_tile=64, stages=2, pv=1, ctas_per_sm=1), 300
        yield Sm90WsAttentionSpec("bfloat16", 128, 128, key_tile=128, stages=2, pingpong=1), 1500
        yield Sm90WsAttentionSpec("bfloat16", 64, 128, key_tile=64, stages=3, pingpong=0), 1500
        yield Sm90WsAttentionSpec("float16", 128, 64, key_tile=64, stages=2, pingpong=0), 1500
        yield Sm90WsAttentionSpec("bfloat16", 96, 128, key_tile=128, stages=2, pingpong=1), 1500
        yield Sm90WsAttentionSpec("bfloat16", 256, 128, key_tile=64, stages=2, pingpong=1), 1500
        yield Sm90WsAttentionSpec("float16", 256, 64, key_tile=64, stages=3, pingpong=0), 1500


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks-only", action="store_true", help="skip the attention kernels")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help="only the attention kernels whose names contain one of these (no mask kernels)")
    args = parser.parse_args(argv)
    from bench.timing import require_cuda

    require_cuda("tools.sanitize_kernels")
    cases = [] if args.masks_only else list(attention_cases())
    if args.only:
        cases = [(spec, tokens) for spec, tokens in cases if any(word in spec.name for word in args.only)]
        if not cases:
            parser.error(f"no attention kernel's name contains any of {args.only}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for spec, tokens in cases:
        d, m = spec.head_dim, spec.slice_m
        dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float16
        q, k, v = (torch.randn(1, 2, tokens, d, generator=gen, device="cuda", dtype=dtype) for _ in range(3))
        masks = {"random": random_topk_mask(1, 2, tokens, tokens, m, 0.3, "cuda", gen)}
        if isinstance(spec, Sm90WsAttentionSpec):
            masks["full"] = SliceMask.full(1, 2, tokens, tokens, m, device="cuda")
            masks["window"] = window_mask(1, 2, tokens, m, 200)
        for kind, mask in masks.items():
            out = sparse_attention(q, k, v, mask, spec=spec)
            err = relative_l2(out.float(), reference_attention(q, k, v, mask)[0])
            print(f"{spec.name} {kind}: rel L2 {err:.2e}")
            assert err < 2e-2
    if args.only:
        return
    q, k = (torch.randn(1, 2, 700, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / 8.0, -1)
    for kw in (dict(method="topk", density=0.1), dict(method="topk", density=0.1, pool=None, exact_band=None),
               dict(method="tau", tau=0.8), dict(method="threshold", threshold=0.01, pool=None, exact_band=None),
               dict(method="topk", top_k=20, pool=16, combine="union"), dict(method="colmax", lse=lse),
               dict(method="topk", density=0.1, pooling="sample"), dict(method="topk", density=0.1, pooling="both"),
               dict(method="topk", density=0.1, pooling="mean")):
        mask = predict_mask(q, k, 64, **kw).validate()
        print(f"predict_mask {kw.get('method')} {sorted(k for k in kw if k != 'lse')} {kw.get('pooling', '')}: "
              f"density {mask.density():.3f}")
    old = predict_mask(q, k, 64, "topk", density=0.1)
    union = union_keys(old, (0, 3, -40), predict_mask(q, k, 64, "topk", density=0.1, pooling="both")).validate()
    expected = union_reference(old, (0, 3, -40), predict_mask(q, k, 64, "topk", density=0.1, pooling="both"))
    assert torch.equal(union.indptr, expected.indptr) and torch.equal(union.indices, expected.indices)
    sparse_lse = sparse_attention(q, k, k, old, return_lse=True)[1]
    mask = predict_mask(q, k, 64, "colmax", rule="topk", density=0.1, lse=sparse_lse, candidates=[union]).validate()
    print(f"union_keys {union.density():.3f} of the slices; column max over it: density {mask.density():.3f}")
    # Rows past every GPU's staging limit (81,920 keys on Hopper): float16 logits, bfloat16 scores.
    long_k = torch.randn(1, 1, 100_000, 64, generator=gen, device="cuda", dtype=torch.float16)
    mask = predict_mask(long_k[:, :, :128], long_k, 64, "tau", tau=0.9, pool=None, exact_band=None).validate()
    print(f"global-row selection, logits: density {mask.density():.4f}")
    mask = predict_mask(long_k[:, :, :128], long_k, 64, "topk", density=0.1).validate()
    print(f"global-row selection, max-probability scores: density {mask.density():.4f}")


if __name__ == "__main__":
    main()
