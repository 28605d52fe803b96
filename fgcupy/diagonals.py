"""Diagonals: key offsets at which a head attends whatever the query.

Under relative positions (the 3-D rotary embeddings of video DiTs) many heads look at the same
place one or more frames away, or one row up: their mass lies on diagonals of the score matrix,
key = query + d, outside a query block's exact band, where pooled queries blur it.
``find_diagonals`` measures, from the exact softmax rows of a few sampled queries, how much mass
each offset holds (over every head) and returns the strongest offsets outside the band, for
``predict_mask(method="topk", diagonals=...)``. Plain torch, any device.
"""

from __future__ import annotations

import math

import torch

from .attention_kernel import check_scale, eager_scale
from .layout import query_key_views
from .mask import is_int, positive_int
from .mask_request import DEFAULT_EXACT_BAND

#: Queries sampled per head (evenly spaced over the sequence).
DEFAULT_SAMPLES = 64
#: Offsets summed around each candidate, so a diagonal that wobbles by a few keys still counts.
PEAK_WIDTH = 9
#: A diagonal holds at least this fraction of a query's mass (over PEAK_WIDTH offsets) ...
DEFAULT_MIN_MASS = 0.005
#: ... and this many times the mean of as many offsets around it (within a band's reach): on
#: the head families, attention at the same place in other frames holds 1.4-11 % at 12-54
#: times its surroundings; broad heads' offsets under 10 times (tests/test_diagonals.py).
DEFAULT_MIN_CONTRAST = 10.0
#: ... and is held by at least this share of one head's sampled queries (that reach the offset).
#: A key that every query looks at (a sink, a text token) puts its mass at a different offset
#: for each sampled query; a diagonal puts it at the same offset for most of them.
DEFAULT_MIN_SUPPORT = 0.25
_CHUNK_BYTES = 256 << 20


def offset_mass(q, k, *, samples: int = DEFAULT_SAMPLES, scale: float | None = None) -> torch.Tensor:
    """float32 [q_len + kv_len - 1]: the softmax mass at each offset key - query (index
    offset + q_len - 1), averaged over the batch, the heads and ``samples`` evenly spaced queries
    (each query's mass sums to 1; a query with no finite logit, such as a fully padded batch
    entry's, counts for nothing). q, k: [B, H, S, D]."""
    return _offset_stats(q, k, samples, scale)[0]


def _offset_stats(q, k, samples, scale, level: float = DEFAULT_MIN_MASS,
                  min_reach: float = DEFAULT_MIN_SUPPORT) -> tuple:
    """(``offset_mass``, float32 [q_len + kv_len - 1] support): per offset, the largest share over
    the (batch entry, head) pairs of the sampled queries that can reach it (key inside the
    sequence) whose PEAK_WIDTH keys around it hold at least ``level`` of their mass; 0 where fewer
    than ``min_reach`` of the sampled queries reach it."""
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    if q_len < 1 or kv_len < 1:
        raise ValueError(f"offset_mass needs queries and keys, got q_len={q_len}, kv_len={kv_len}")
    samples = positive_int("samples", samples)
    if scale is not None:
        scale = eager_scale(scale)
        check_scale(scale)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    rows = torch.linspace(0, q_len - 1, min(int(samples), q_len), device=q.device).round().long().unique()
    where = (torch.arange(kv_len, device=q.device)[None, :] - rows[:, None] + (q_len - 1)).reshape(-1)
    width = q_len + kv_len - 1
    mass = torch.zeros(width, dtype=torch.float32, device=q.device)
    reach = torch.zeros(width, dtype=torch.float32, device=q.device).index_add_(
        0, where, torch.ones(where.numel(), device=q.device))
    support = torch.zeros(width, dtype=torch.float32, device=q.device)
    per_head = rows.numel() * kv_len * 4
    step = max(1, _CHUNK_BYTES // per_head)
    kf = k.float()
    counted = torch.zeros((), dtype=torch.float32, device=q.device)  # rows with mass (no host sync)
    for b in range(batch):
        for h0 in range(0, heads, step):
            logits = torch.matmul(q[b, h0 : h0 + step, rows].float(), kf[b, h0 : h0 + step].transpose(-1, -2))
            # a NaN key (padded, as the diffusers integration marks them) holds no mass; a row
            # with no finite logit (all keys padded) has no softmax and counts for nothing
            probs = torch.softmax(logits.nan_to_num(nan=-math.inf) * scale, dim=-1).nan_to_num_(nan=0.0)
            counted += (probs.sum(-1) > 0).sum()
            mass.index_add_(0, where, probs.sum(0).reshape(-1))
            windows = _box(probs, PEAK_WIDTH) >= level
            for head in windows:  # [rows, kv_len]: the rows of one head holding a peak there
                count = torch.zeros(width, dtype=torch.float32, device=q.device)
                count.index_add_(0, where, head.reshape(-1).float())
                torch.maximum(support, count / reach.clamp_min(1.0), out=support)
    # an offset few sampled queries can reach (near +-S) has no share worth the name
    support.masked_fill_(reach < min_reach * rows.numel(), 0.0)
    return mass / counted.clamp_min(1.0), support


@torch.no_grad()  # host ints from statistics: no graph for inputs that require grad
def find_diagonals(q, k, slice_m: int = 128, *, count: int = 4, exact_band: int = DEFAULT_EXACT_BAND,
                   min_mass: float = DEFAULT_MIN_MASS, min_contrast: float = DEFAULT_MIN_CONTRAST,
                   min_support: float = DEFAULT_MIN_SUPPORT, samples: int = DEFAULT_SAMPLES,
                   scale: float | None = None, layout: str = "HND") -> tuple:
    """Up to ``count`` key offsets (ints, ascending) for ``predict_mask(method="topk", diagonals=...)``: the
    offsets d whose PEAK_WIDTH offsets around d hold the most sampled attention mass, each at
    least ``min_mass`` of a query's mass and ``min_contrast`` times the mean of its surroundings
    (a peak, not a broad head's slope), held (at ``min_mass`` or more) by at least
    ``min_support`` of one head's sampled queries that reach it (a diagonal, not a key every
    query looks at, such as a sink, seen from one sampled query); those must be at least the
    smaller of ``min_support`` and DEFAULT_MIN_SUPPORT of all sampled queries. None overlaps the
    block's own band nor another chosen diagonal's (bands of slice_m + 2 * exact_band keys).
    q, k: [B, H, S, D] ("HND") or [B, S, H, D] ("NHD"), torch or cupy. One host
    synchronisation (the offsets are host ints)."""
    qh, kh = query_key_views(q, k, layout)
    if not is_int(count) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    if not is_int(exact_band) or exact_band < 0:
        raise ValueError(f"exact_band must be a non-negative int, got {exact_band!r}")
    slice_m = positive_int("slice_m", slice_m)
    if not (min_mass >= 0 and min_contrast >= 0 and 0 <= min_support <= 1):
        raise ValueError(f"min_mass and min_contrast must be non-negative and min_support in [0, 1], got "
                         f"{min_mass!r}, {min_contrast!r}, {min_support!r}")
    apart = int(slice_m) + 2 * int(exact_band)  # closer than this, two bands overlap
    if min_contrast > (2 * apart + 1) / PEAK_WIDTH:  # the surroundings' mean counts the peak too
        raise ValueError(f"no peak can stand {min_contrast} times above surroundings of slice_m + 2 * exact_band = "
                         f"{apart} offsets either way (at most {(2 * apart + 1) / PEAK_WIDTH:.2f}): a larger "
                         "slice_m or exact_band, or a smaller min_contrast")
    if count == 0:
        return ()
    q_len = qh.shape[2]
    mass, support = _offset_stats(qh, kh, samples, scale, min_mass, min(min_support, DEFAULT_MIN_SUPPORT))
    peak = _box(mass, PEAK_WIDTH)
    around = _box(mass, 2 * apart + 1) * (PEAK_WIDTH / (2 * apart + 1))
    offsets = torch.arange(mass.numel(), device=mass.device) - (q_len - 1)
    eligible = ((offsets.abs() >= apart) & (peak >= min_mass) & (peak >= min_contrast * around)
                & (support >= min_support))
    peak = torch.where(eligible, peak, torch.zeros_like(peak)).cpu()
    offsets, mass, allowed = offsets.cpu(), mass.cpu(), eligible.cpu()
    half = PEAK_WIDTH // 2
    chosen = []
    for _ in range(int(count)):
        best = int(peak.argmax())  # the first of the windows that hold the peak alike
        if not float(peak[best]) > 0.0:
            break
        lo = max(0, best - half)  # the peak itself, within its window, among eligible offsets
        best = lo + int(torch.where(allowed[lo:best + half + 1], mass[lo:best + half + 1], -1.0).argmax())
        chosen.append(int(offsets[best]))
        near = (offsets - offsets[best]).abs() < apart
        peak[near] = 0.0
        allowed &= ~near
    return tuple(sorted(chosen))


def _box(x: torch.Tensor, width: int) -> torch.Tensor:
    """Sums of ``width`` (odd) consecutive entries along x's last axis centred on each, zeros
    past the ends: differences of float64 prefix sums (linear in the length at any width)."""
    length, half = x.shape[-1], width // 2
    prefix = torch.nn.functional.pad(x.double().cumsum(-1), (1, 0))
    at = torch.arange(length, device=x.device)
    return (prefix[..., (at + half + 1).clamp_max(length)] - prefix[..., (at - half).clamp_min(0)]).to(x.dtype)
