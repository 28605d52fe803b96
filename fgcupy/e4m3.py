"""q and k as float8 e4m3 for the column-max pass (``predict_mask(products="e4m3")``).

Hopper's tensor cores multiply e4m3 at twice the bfloat16 rate, and the column max only ranks
keys: rounded to e4m3, the estimated column max keeps every head family's oracle ratio within
0.02 of the bfloat16 inputs' (notes/PERF.md "Session 42"). Each head's q (and, apart, its k) is
multiplied by the power of two that brings its largest magnitude to at most ``E4M3_TARGET``, so
the rounding is e4m3's alone (a power of two is exact in any float); the scoring kernel divides
the two powers back out of its logit scale. Plain torch, any device: the CPU reference rounds the
same way (``e4m3_rounded``).
"""

from __future__ import annotations

import torch

#: The largest finite e4m3 value.
E4M3_MAX = 448.0
#: The largest magnitude a head is scaled to (and clamped at), below E4M3_MAX: the pass sums a
#: logit's 128 products in float16 accumulators, which then hold any of them (128 x 16 x 16 =
#: 32,768 < 65,504); what e4m3 gives up for it is range below, where elements 1,024 times under
#: the head's largest lose bits. The kernels get the same number (jit constant kE4m3Target).
E4M3_TARGET = 16.0


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, H]: per head of ``x`` [B, H, S, D], the power of two that takes its largest
    magnitude to at most E4M3_TARGET (1 where that magnitude is 0 or not finite: an infinite
    element is then clamped, a NaN stays NaN; 1 also where it is below about 5e-38, past
    float32's powers of two, and the head rounds to zeros). No host sync."""
    amax = (torch.linalg.vector_norm(x, float("inf"), dim=(2, 3)).float() if x.numel()  # one pass, no |x| copy
            else x.new_zeros(x.shape[:2], dtype=torch.float32))
    return scales_for_amax(amax)


def scales_for_amax(amax: torch.Tensor) -> torch.Tensor:
    """float32, amax's shape: ``head_scales`` from each head's largest magnitude (float32): the
    largest power of two s with amax x s <= E4M3_TARGET, found as the power of two at or below
    E4M3_TARGET / amax (its exponent bits: exact, where a float log2 can round up across a
    power), halved where the product passes E4M3_TARGET (the quotient rounded up to a power); 1
    where that quotient is not finite. The rounding kernel computes the same
    (cuda_src/e4m3_convert.cu)."""
    ratio = torch.full_like(amax, E4M3_TARGET).div_(amax)  # one rounding: `E4M3_TARGET / amax` is a reciprocal times 16
    power = (ratio.view(torch.int32) & 0x7F800000).view(torch.float32)
    scale = torch.where(amax * power > E4M3_TARGET, power / 2, power)
    usable = torch.isfinite(amax) & (amax > 0) & torch.isfinite(ratio)
    return torch.where(usable, scale, torch.ones_like(scale))


def to_e4m3(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [B, H, S, D], contiguous: ``x`` times its head's scale, rounded to nearest
    even (magnitudes past E4M3_TARGET, only an infinite element's head has any, clamped to it)."""
    # bfloat16 holds every power of two float32 does (exact products); float16 does not.
    scaled = x * scales[:, :, None, None].to(x.dtype) if x.dtype == torch.bfloat16 else x.float() * scales[:, :, None, None]
    return scaled.clamp_(-E4M3_TARGET, E4M3_TARGET).to(torch.float8_e4m3fn).contiguous()


def e4m3_rounded(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` [B, H, S, D] as the e4m3 pass sees it: rounded under its head's scale, then
    divided back."""
    scales = head_scales(x)
    return to_e4m3(x.float(), scales).float() / scales[:, :, None, None]


def heads_as_e4m3(q: torch.Tensor, k: torch.Tensor, bh0: int, nbh: int) -> tuple:
    """(q, k of heads [bh0, bh0 + nbh) (batch-major) of q, k [B, H, S, D] as e4m3 [1, nbh, S, D],
    float32 [nbh]: each head's factor of the logit scale, 1 / (q's scale x k's scale))."""
    q_part, k_part = _heads(q, bh0, nbh), _heads(k, bh0, nbh)
    q_scales, k_scales = head_scales(q_part), head_scales(k_part)
    factor = (1.0 / (q_scales * k_scales)).reshape(-1)
    return to_e4m3(q_part, q_scales), to_e4m3(k_part, k_scales), factor


def _heads(x: torch.Tensor, bh0: int, nbh: int) -> torch.Tensor:
    """[1, nbh, S, D]: heads [bh0, bh0 + nbh) of x [B, H, S, D], counted batch-major (a view
    within one batch entry)."""
    heads = x.shape[1]
    parts = [x[b, max(bh0 - b * heads, 0) : min(bh0 + nbh - b * heads, heads)]
             for b in range(bh0 // heads, (bh0 + nbh - 1) // heads + 1)] if nbh else [x[0, :0]]
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).unsqueeze(0)
