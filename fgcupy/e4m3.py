"""q and k as float8 e4m3 for the column-max pass (``predict_mask(products="e4m3")``).

Hopper's tensor cores multiply e4m3 at twice the bfloat16 rate, and the column max only ranks
keys: rounded to e4m3, the estimated column max keeps every head family's oracle ratio within
0.02 of the bfloat16 inputs' (notes/PERF.md "Session 42"). Each head's q (and, apart, its k) is
multiplied by the largest power of two that keeps its rows' sums of squares within
E4M3_ROW_SUMSQ, so the rounding is e4m3's alone (a power of two is exact in any float) and the
pass's float16 sums hold every logit; the scoring kernel divides the two powers back out of its
logit scale. Plain torch, any device: the CPU reference rounds the same way (``e4m3_rounded``).
"""

from __future__ import annotations

import torch

#: The largest finite e4m3 value. No scaled head reaches it (its largest element is within the
#: square root of E4M3_ROW_SUMSQ, about 181).
E4M3_MAX = 448.0
#: The bound on each row's sum of squares once scaled. With every row of q and of k within it,
#: each partial sum of a logit's products stays within (1 + 2^-4)^2 x 2^15 < 65,504 by
#: Cauchy-Schwarz (e4m3 moves a normal element by at most 2^-4 of it), so the pass's float16
#: accumulators hold them. A bound on the norms, not on D x the largest element squared: a head
#: with a few wide channels keeps its small elements far above e4m3's subnormals (elements 2^-6
#: of 448 and below keep fewer bits). The kernels get the same number (jit constant
#: kE4m3RowSumsq).
E4M3_ROW_SUMSQ = 2.0**15
#: Where a row with a non-finite element (left out of its head's scale) is clamped once scaled,
#: so that it keeps its sum of squares within E4M3_ROW_SUMSQ (128 x 16^2 = 2^15) whatever its
#: finite elements; NaN stays NaN. The head's other rows keep their scale and precision (a NaN
#: padding key does not coarsen its head). The kernels get the same number (kE4m3NonfiniteClamp).
E4M3_NONFINITE_CLAMP = 16.0
#: The powers of two a head's scale may take: float32's normal ones. A head that would need
#: another (rows' norms below about 5e-37 or, past 16-bit inputs' range, above about 2^133)
#: keeps scale 1.
_POWERS = (2.0**-126, 2.0**127)

#: Elements per chunk of the float64 sums of squares (bounds their temporary copy).
_SUMSQ_CHUNK = 1 << 24


def head_scales(x: torch.Tensor) -> torch.Tensor:
    """float32 [B, H]: per head of ``x`` [B, H, S, D], ``scales_for`` its finite rows' largest sum
    of squares (1 where the head has no finite nonzero row, or where its rows' norms are below
    about 5e-37, past float32's powers of two: such a head rounds to zeros). No host sync."""
    return scales_for(row_sumsq(x))


def row_sumsq(x: torch.Tensor) -> torch.Tensor:
    """float64 [B, H]: the largest sum of squares of a row of each head of ``x`` [B, H, S, D],
    rows with a non-finite element left out (0 for a head of no such row), in float64 and in the kernel's order:
    each 16-byte vector's 8 squares in turn, then the vectors' sums pairwise (the first half of
    the row's vectors plus the second, and so on down), where D / 8 is a power of two; other
    head dims (no kernel) sum in torch's order. Each square is exact, so the reference and the
    kernel pick the same power of two bit for bit."""
    batch, heads, rows, dim = x.shape
    out = torch.zeros(batch, heads, dtype=torch.float64, device=x.device)
    step = max(1, _SUMSQ_CHUNK // max(1, batch * heads * dim))
    for r0 in range(0, rows, step):
        part = _kernel_order_sumsq(x[:, :, r0 : r0 + step].double())
        out = torch.maximum(out, part.masked_fill(~torch.isfinite(part), 0.0).amax(2))
    return out


def _kernel_order_sumsq(rows: torch.Tensor) -> torch.Tensor:
    """float64 [..., S]: each row's sum of squares of ``rows`` [..., S, D] (float64), summed as
    fg::e4m3_sumsq sums it where D / 8 is a power of two."""
    dim = rows.shape[-1]
    vectors = dim // 8
    if dim % 8 or vectors & (vectors - 1):
        return torch.linalg.vecdot(rows, rows)
    squares = rows.square().unflatten(-1, (vectors, 8))
    sums = squares[..., 0]
    for i in range(1, 8):
        sums = sums + squares[..., i]
    while sums.shape[-1] > 1:
        half = sums.shape[-1] // 2
        sums = sums[..., :half] + sums[..., half:]
    return sums[..., 0]


def scales_for(sumsq: torch.Tensor) -> torch.Tensor:
    """float32, sumsq's shape: per head, the largest power of two s with s^2 x sumsq <=
    E4M3_ROW_SUMSQ, from its rows' largest sum of squares ``sumsq`` (float64, as ``row_sumsq``
    gives it); 1 where sumsq is not positive and finite or s would not be a normal float32. s is
    the power at or below the square root of the quotient, its exponent half the quotient's
    (rounded down: exact, where a float log2 can round up across a power), halved where the
    product passes the bound (the quotient rounded up to a power). The rounding kernel computes
    the same (cuda_src/e4m3_convert.cu)."""
    ratio = torch.full_like(sumsq, E4M3_ROW_SUMSQ).div_(sumsq)  # one rounding, as the kernel's division
    exponent = ratio.view(torch.int64).bitwise_and(0x7FF0000000000000) >> 52  # biased by 1023
    power = ((((exponent - 1023) >> 1) + 1023) << 52).view(torch.float64)  # >> 1 rounds down, negatives too
    power = torch.where(power * power * sumsq > E4M3_ROW_SUMSQ, power / 2, power)
    usable = torch.isfinite(sumsq) & (sumsq > 0) & (power >= _POWERS[0]) & (power <= _POWERS[1])
    return torch.where(usable, power, torch.ones_like(power)).float()


def to_e4m3(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [B, H, S, D], contiguous: ``x`` times its head's scale (``head_scales``),
    a row with a non-finite element clamped at E4M3_NONFINITE_CLAMP (finite rows cannot reach
    E4M3_MAX), rounded to nearest even; a NaN stays NaN."""
    # bfloat16 holds every power of two float32 does (exact products); float16 does not.
    scaled = x * scales[:, :, None, None].to(x.dtype) if x.dtype == torch.bfloat16 else x.float() * scales[:, :, None, None]
    finite_rows = torch.isfinite(x).all(-1, keepdim=True)
    top = torch.where(finite_rows, E4M3_MAX, E4M3_NONFINITE_CLAMP).to(scaled.dtype)
    return torch.maximum(torch.minimum(scaled, top), -top).to(torch.float8_e4m3fn).contiguous()


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
