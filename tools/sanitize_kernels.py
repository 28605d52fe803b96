"""Run every kernel of fgcupy once on small inputs, for compute-sanitizer (GPU).

    compute-sanitizer --tool memcheck  python -m tools.sanitize_kernels
    compute-sanitizer --tool racecheck python -m tools.sanitize_kernels [--masks-only | --only NAME ...]

Covers: the mma.sync attention kernel (both slice sizes; head dims 64, 96, 128, 256), both wgmma kernels (on
Hopper; the warp-specialised one over lists of several key tiles, head dims 64, 96, 128 and 256,
with random lists (every tile gathered) and with full and window masks, whose contiguous tiles
load through tensor maps), the launch-order kernel, every mask-scoring mode (band mode
included), the dilation of sampled poolings (in place for "adaptive", the default), both selection kernels (staged and global rows,
each rule), the emit kernel, the candidates' union and the column max over a list (the portable
column-max kernel with 64-query blocks), and on Hopper the e4m3 conversion kernels and column-max
pass, the LSE estimate's stats kernel, ``method="auto"`` on heads that take each of its three masks,
and a compact mask cache's bit packing. ``--masks-only`` skips the attention kernels; ``--only``
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
    compact_cache_round_trip(gen)
    if torch.cuda.get_device_capability()[0] == 9:
        hopper_predictors(gen)


def compact_cache_round_trip(gen) -> None:
    """A MaskCache in compact storage (fg::pack_rows, then fg::emit_rows) gives the mask back."""
    from fgcupy import MaskCache

    q, k = (torch.randn(1, 2, 900, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = predict_mask(q, k, 64, "tau", tau=0.7).validate()
    cache = MaskCache(storage="bits")
    cache.put("layer", mask)
    back = cache.get("layer").validate()
    assert torch.equal(back.to_dense(), mask.to_dense())
    print(f"compact mask cache: {cache.memory_bytes()} bytes, density {back.density():.3f}, round trip exact")


def hopper_predictors(gen) -> None:
    """The e4m3 kernels, the LSE estimate and ``method="auto"``, each against its reference."""
    import math

    from fgcupy import auto_mask, mask_kernels
    from fgcupy import mask_reference as ref
    from fgcupy.e4m3 import e4m3_rounded
    from fgcupy.lse_estimate import estimate_lse

    # Logits of std 1, 3 and 10: the cheap mask passes the first head, the estimated column
    # max the second, and only the exact LSE finds the third's peaks (see tests/test_auto_mask.py).
    k = torch.randn(1, 3, 4500, 128, generator=gen, device="cuda")
    q = torch.randn(1, 3, 1000, 128, generator=gen, device="cuda") * torch.tensor([1.0, 3.0, 10.0], device="cuda").view(1, 3, 1, 1)
    q, k = q.bfloat16(), k.bfloat16()
    scale = 128 ** -0.5
    qr, kr = e4m3_rounded(q[:, :2]), e4m3_rounded(k[:, :2])
    _, lse = ref.logits_and_lse(qr, kr, scale)
    got = mask_kernels.gpu_colmax_e4m3(q[:, :2], k[:, :2], scale, lse.reshape(2, -1), 64)[..., :4500].float()
    expected = ref.maxprob_scores(qr, kr, lse, 64, scale).reshape(got.shape)
    worst = float((got - expected).abs().max())
    print(f"e4m3 column max: largest probability error {worst:.2e}")
    assert worst < 2e-2
    est = estimate_lse(q, k, 128)
    est_cpu = estimate_lse(q.cpu().float(), k.cpu().float(), 128)
    worst = float((est.cpu() - est_cpu).abs().max())
    print(f"LSE estimate on the stats kernel: largest difference from the torch path {worst:.2e}")
    assert worst < 5e-2
    cheap = predict_mask(q, k, 128, "topk", density=0.1)
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)
    exact = predict_mask(q, k, 128, "colmax", lse=auto_mask.exact_row_lse(q, k, scale), products="e4m3", density=0.1)
    auto = predict_mask(q, k, 128, "auto", density=0.1).validate()
    picked = []
    for head in range(3):
        rows = auto.to_dense()[:, head]
        options = [name for name, m in (("cheap", cheap), ("estimated", estimated), ("exact LSE", exact))
                   if torch.equal(rows, m.to_dense()[:, head])]
        assert options, f"auto's head {head} is none of the masks it chooses from"
        picked.append(options[-1])
    print(f"auto: heads take {picked}")
    assert math.isfinite(auto.density())


if __name__ == "__main__":
    main()
