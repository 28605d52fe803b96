"""Head families built to break mask predictors: attention finer than a query block.

``fgcupy.workloads`` imitates a DiT's head zoo; these families are its adversaries. A block of
128 consecutive video tokens spans several rows of a frame, so a head whose queries each look
at a neighbourhood of a few tokens gives the block's queries different targets, and one mean
query per block blurs them. Each family draws heads from ranges of a few knobs (per head, seeded):

* a **position kernel** over the 3-D grid offset (dt, dy, dx), in logits:
  ``peak * exp(-sum_a (d_a / sigma_a)^2 / 2)``, realised by random Fourier features on
  rotary-style pairs of the head dim (q.k = peak * mean_l cos(w_l . offset), w_l ~ N(0,
  1 / sigma^2)), so the kernel is exact in expectation and carries the ripples of a real rotary
  head. ``sigma = inf`` leaves an axis free; ``stride`` makes time periodic (keys ``stride``
  frames apart look alike: strided temporal heads);
* **mixtures**: a second kernel that the queries of some regions of the video use instead,
  so one query block holds queries that look at different places in different ways;
* **sinks** (key positions every query likes), **text tokens** appended after the video tokens
  (liked by every query), and **content noise** (about ``noise**2`` logits of jitter).

``family_qkv`` builds [B, H, S, D] q, k, v; ``mass_fraction`` tells how concentrated a head
is (fraction of keys holding 90 % of each query's mass), so a suite spans easy to hard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from .mask import positive_int
from .workloads import PATTERNS, SHAPES, VideoShape, check_float_dtype, check_grid, check_seed, grid_positions, video_qkv

INF = math.inf


@dataclass(frozen=True)
class Kernel:
    """A position kernel: per-axis (t, y, x) length-scale ranges in tokens (lo, hi), the peak
    logit range, and a temporal period in frames (0: none)."""

    sigma: tuple = ((0.3, 0.3), (0.6, 2.6), (0.6, 2.6))
    peak: tuple = (10.0, 14.0)
    stride: tuple = (0, 0)


@dataclass(frozen=True)
class Family:
    """One family of heads: a kernel, optionally a second kernel some regions use, and extras."""

    name: str
    kernel: Kernel
    alt: Kernel | None = None     # used by the queries of about half the video's regions
    sinks: int = 0
    sink_strength: float = 6.0
    text: int = 0                 # text tokens appended after the video tokens
    text_strength: float = 3.0
    noise: float = 1.0            # content noise std per element


FAMILIES = {
    f.name: f
    for f in (
        # 2-D windows of radius ~1-4 tokens within the own frame.
        Family("window2d", Kernel(((0.3, 0.3), (0.6, 2.6), (0.6, 2.6)), (10.0, 14.0))),
        # 3-D windows: a few frames and a few tokens.
        Family("window3d", Kernel(((0.6, 1.5), (0.6, 2.0), (0.6, 2.0)), (10.0, 14.0))),
        # Gaussian kernels over 3-D position: fine, sharp and coarse.
        Family("gauss-fine", Kernel(((0.3, 1.5), (0.3, 1.5), (0.3, 1.5)), (6.0, 10.0))),
        Family("gauss-sharp", Kernel(((0.3, 1.5), (0.5, 2.0), (0.5, 2.0)), (16.0, 22.0))),
        Family("gauss-coarse", Kernel(((2.0, 8.0), (2.0, 8.0), (2.0, 8.0)), (6.0, 10.0))),
        # Same place in every stride-th frame.
        Family("temporal-strided", Kernel(((INF, INF), (0.5, 1.5), (0.5, 1.5)), (10.0, 14.0), (2, 4))),
        # Broad attention leaning on sink keys and text tokens.
        Family("sinks-text", Kernel(((3.0, 8.0), (3.0, 8.0), (3.0, 8.0)), (2.0, 4.0)), sinks=8, text=256),
        # Half the regions look at a 2-D window, the rest along time; sinks for everyone.
        Family("mixture", Kernel(((0.3, 0.3), (0.6, 2.0), (0.6, 2.0)), (10.0, 14.0)),
               alt=Kernel(((INF, INF), (0.5, 1.5), (0.5, 1.5)), (8.0, 12.0)), sinks=4),
    )
}

#: Head-dim entries kept free of position kernels (they carry sinks and text).
_FREE_DIMS = 8


def _kernel_pairs(dim: int, kernels: int) -> int:
    """Rotary pairs per position kernel: all the head dim but a few entries, shared equally."""
    return (dim - _FREE_DIMS) // 2 // kernels


def _uniform(lo_hi, gen) -> float:
    lo, hi = lo_hi
    if lo == hi:  # also a free axis: (inf, inf)
        return lo
    return lo + (hi - lo) * torch.rand((), generator=gen, dtype=torch.float64).item()


def _kernel_features(kernel: Kernel, pos: torch.Tensor, scale: float, pairs: int, gen) -> torch.Tensor:
    """float32 [S, 2 * pairs]: features whose dot products are the kernel in logits."""
    sigma = [_uniform(s, gen) for s in kernel.sigma]
    peak = _uniform(kernel.peak, gen)
    stride = int(round(_uniform(kernel.stride, gen)))
    freqs = torch.randn(pairs, 3, generator=gen, dtype=torch.float64)
    for axis, s in enumerate(sigma):
        freqs[:, axis] = 0.0 if math.isinf(s) else freqs[:, axis] / s
    if stride > 1:  # periodic in time: frequencies on multiples of 2 pi / stride
        steps = torch.randint(0, stride, (pairs,), generator=gen).to(torch.float64)
        freqs[:, 0] = 2 * math.pi * steps / stride
    angles = pos.to(torch.float64) @ freqs.to(pos.device).T  # [S, pairs]
    amp = math.sqrt(peak / (scale * pairs))
    feats = torch.empty(pos.shape[0], 2 * pairs, dtype=torch.float32, device=pos.device)
    feats[:, 0::2] = (amp * torch.cos(angles)).float()
    feats[:, 1::2] = (amp * torch.sin(angles)).float()
    return feats


def _regions(grid, gen, device) -> torch.Tensor:
    """bool [T*H*W]: about half the video, in blobs a few tokens wide that drift over time."""
    t, h, w = grid
    pos = grid_positions(grid, device).to(torch.float32)
    field = torch.zeros(t * h * w, device=device)
    for _ in range(6):
        wave = torch.randn(3, generator=gen) * torch.tensor([0.1, 0.6, 0.6])
        phase = 2 * math.pi * torch.rand((), generator=gen).item()
        field += torch.cos(pos @ wave.to(device) + phase)
    return field > 0


def family_qkv(shape, family: str, *, heads: int = 8, seed: int = 0, device="cpu", dtype=torch.bfloat16):
    """(q, k, v) [B, heads, S, D] of ``family`` on ``shape``'s grid (S = grid tokens + text).

    ``shape``: a :class:`fgcupy.workloads.VideoShape` or its name. Each head draws its knobs
    from the family's ranges with its own seed, so head h is the same in any subsample.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if not isinstance(shape, VideoShape):
        raise TypeError(f"shape must be a VideoShape or a name in {sorted(SHAPES)}, got {type(shape).__name__}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    heads = positive_int("heads", heads)
    check_seed(seed)
    check_grid(shape.grid)
    check_float_dtype(dtype)
    fam = FAMILIES[family]
    dim = shape.head_dim
    if dim < 32:
        raise ValueError(f"head families need head_dim >= 32, got {dim}")
    device = torch.device(device)
    pos = grid_positions(shape.grid, device)
    grid_len, seq = pos.shape[0], pos.shape[0] + fam.text
    out = [torch.empty(shape.batch, heads, seq, dim, dtype=dtype, device=device) for _ in range(3)]
    for b in range(shape.batch):
        for h in range(heads):
            gen = torch.Generator().manual_seed(((seed * 1_000_003 + b) * 65_537 + h) & 0x7FFF_FFFF)
            for dst, src in zip(out, _one_head(fam, shape.grid, pos, grid_len, seq, dim, gen, device)):
                dst[b, h] = src.to(dtype)
    return tuple(out)


def _one_head(fam: Family, grid, pos, grid_len, seq, dim, gen, device):
    scale = 1.0 / math.sqrt(dim)
    q = torch.zeros(seq, dim, device=device)
    k = torch.zeros(seq, dim, device=device)
    pairs = _kernel_pairs(dim, 1 if fam.alt is None else 2)
    width = 2 * pairs
    feats = _kernel_features(fam.kernel, pos, scale, pairs, gen)
    if fam.alt is None:
        q[:grid_len, :width] = feats
        k[:grid_len, :width] = feats
        used = width
    else:
        alt = _kernel_features(fam.alt, pos, scale, pairs, gen)
        region = _regions(grid, gen, device).unsqueeze(1)
        q[:grid_len, :width] = torch.where(region, feats, 0.0)
        q[:grid_len, width : 2 * width] = torch.where(region, 0.0, alt)
        k[:grid_len, :width] = feats
        k[:grid_len, width : 2 * width] = alt
        used = 2 * width
    if fam.sinks:
        amp = math.sqrt(fam.sink_strength / scale)
        sink_pos = torch.randperm(grid_len, generator=gen)[: fam.sinks].to(device)
        q[:, used] = amp
        k[sink_pos, used] = amp
    if fam.text:
        amp = math.sqrt(fam.text_strength / scale)
        q[:, used + 1] = amp
        k[grid_len:, used + 1] = amp
    noise = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
        raise RuntimeError(f"family {fam.name}: non-finite q or k (a bad knob range)")
    q += fam.noise * torch.randn(seq, dim, generator=noise, device=device)
    k += fam.noise * torch.randn(seq, dim, generator=noise, device=device)
    # Values: a smooth field over position (length scale ~4 tokens) plus noise, so a missed key
    # costs what it costs in a real head.
    smooth = _kernel_features(Kernel(((4.0, 4.0), (4.0, 4.0), (4.0, 4.0)), (1.0, 1.0)), pos, 1.0, 16, gen)
    v = 0.5 * torch.randn(seq, dim, generator=noise, device=device)
    mix = torch.randn(smooth.shape[1], dim, generator=gen).to(device) / math.sqrt(smooth.shape[1])
    v[:grid_len] += smooth @ mix
    return q, k, v


def mass_fraction(q, k, mass: float = 0.9, queries: int = 256, seed: int = 0) -> float:
    """Mean over sampled queries (all heads) of the fraction of keys holding ``mass`` of the
    query's softmax: ~0 for sharp heads, ~1 for uniform ones."""
    batch, heads, q_len, dim = q.shape
    if q_len == 0 or k.shape[2] == 0:
        raise ValueError(f"mass_fraction needs queries and keys, got q_len={q_len}, kv_len={k.shape[2]}")
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass!r}")
    queries = positive_int("queries", queries)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, q_len, (min(queries, q_len),), generator=gen).to(q.device)
    logits = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)) / math.sqrt(dim)
    probs = torch.softmax(logits, -1)
    if probs.isnan().any():  # a NaN or +inf logit, or a query whose every logit is -inf: no distribution to measure
        raise ValueError("mass_fraction needs each sampled query's softmax: q and k give a NaN or infinite logit")
    probs = probs.sort(-1, descending=True).values
    needed = ((probs.cumsum(-1) < mass).sum(-1) + 1).clamp_max(k.shape[2])  # float sums can stop short of 1
    return float(needed.double().mean() / k.shape[2])


#: Names the judges give fgcupy.workloads' patterns beside the head families ("workload-mixed").
WORKLOAD_PREFIX = "workload-"
WORKLOAD_FAMILIES = [WORKLOAD_PREFIX + p for p in PATTERNS]


def family_or_workload_qkv(shape, name: str, *, heads: int = 8, seed: int = 0, device="cpu"):
    """(q, k, v) of a head family, or of a workload pattern's first ``heads`` heads where
    ``name`` is WORKLOAD_PREFIX + the pattern: the judges run both kinds the same way."""
    if name.startswith(WORKLOAD_PREFIX):
        return video_qkv(shape, name[len(WORKLOAD_PREFIX):], head_ids=range(heads), seed=seed, device=device)
    return family_qkv(shape, name, heads=heads, seed=seed, device=device)


def family_shape(shape, grid=None) -> VideoShape:
    """``shape`` (a name or VideoShape) with its grid replaced, for small test problems."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if grid is not None and (len(grid) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in grid)):
        raise ValueError(f"grid must be three positive ints (T, H, W), got {grid!r}")
    return shape if grid is None else replace(shape, grid=tuple(grid), name=f"{shape.name}-{'x'.join(map(str, grid))}")
