"""Each query's softmax LSE estimated without a dense step, for the exact column max.

The column-max score of a key is the highest probability that any query of the block gives
it, and a probability needs its query's LSE (the log of its softmax normaliser). A dense step
yields the LSE; without one, ``estimate_lse`` log-adds two parts of each query's own mass:

* the exact mass of the keys around the query's block (its band: the block's own keys and
  ``band`` more on either side), where local and sharp heads put most of each query's mass;
* the mass of one key in every few outside the band (``sample_positions``), scaled to all of
  them: the broad part a band cannot see.

The sample leaves the band out: counted in both parts, a band key that the sample holds would
weigh stride + 1 times, and on sharp heads a query's peak is such a key one time in stride.
Per query, not per block: a block's mean query stands for none of its queries where they look
different ways (region mixtures), and misses each query's own peaks on unstructured heads.
On a GPU the band and the sample run on the scoring stats kernel (mask_kernels.gpu_scores; the
sample with each block's band keys skipped); elsewhere, and under torch.compile (where it
traces), plain torch in chunks bounded by ``workspace_bytes``.
"""

from __future__ import annotations

import math

import torch

from . import mask_reference as ref
from .layout import query_key_views
from .attention_kernel import check_scale, eager_scale
from .device_constants import device_constant
from .mask import is_int, num_blocks
from .mask_request import check_workspace_bytes

#: Keys either side of a block whose exact mass the estimate counts (the default exact band).
ESTIMATE_BAND = 64
#: Bytes the torch path's logits of one chunk (and their temporaries) may take.
DEFAULT_BAND_WORKSPACE = 1 << 30


def estimate_lse(q, k, slice_m: int = 128, *, band: int = ESTIMATE_BAND, scale: float | None = None,
                 layout: str = "HND", workspace_bytes: int = DEFAULT_BAND_WORKSPACE) -> torch.Tensor:
    """float32 [B, H, q_len] natural-log LSE estimate of each query of ``q`` over the keys ``k``
    ([B, H, S, D] "HND" or [B, S, H, D] "NHD", torch or cupy), on q's device: what
    ``predict_mask(method="colmax", lse=...)`` needs where no dense step ran
    (``lse="estimate"`` there calls this). ``slice_m``: the query blocks whose band is counted
    exactly; ``scale`` defaults to 1 / sqrt(D). NaN logits add no mass (a NaN query's estimate
    is -inf); a query with an infinite entry gets +inf or -inf, no other query is touched."""
    qh, kh = query_key_views(q, k, layout)
    for name, value, low in (("slice_m", slice_m, 1), ("band", band, 0)):
        if not is_int(value) or value < low:
            raise ValueError(f"{name} must be a {'positive' if low else 'non-negative'} int, got {value!r}")
    scale = ref.default_scale(qh.shape[3]) if scale is None else eager_scale(scale)
    check_scale(scale)
    check_workspace_bytes(workspace_bytes)
    slice_m = int(slice_m)
    batch, heads, q_len, _ = qh.shape
    kv_len = kh.shape[2]
    band = min(int(band), max(kv_len, num_blocks(q_len, slice_m) * slice_m))  # wider bands hold the same keys
    on_kernel = _kernel_lse_parts(qh, kh, slice_m, band, scale)
    if on_kernel is not None:
        return torch.logaddexp(*on_kernel)
    out = torch.empty(batch, heads, q_len, dtype=torch.float32, device=qh.device)
    chunk = max(1, min(heads, int(workspace_bytes // _bytes_per_head(q_len, kv_len, slice_m, band, qh.shape[3]))))
    for b in range(batch):
        for h0 in range(0, heads, chunk):  # views of q and k (an NHD layout is not copied whole)
            near, far = lse_parts(qh[b, h0 : h0 + chunk], kh[b, h0 : h0 + chunk], slice_m, band, scale,
                                  workspace_bytes)
            out[b, h0 : h0 + chunk] = torch.logaddexp(near, far)
    return out


def _bytes_per_head(q_len: int, kv_len: int, slice_m: int, band: int, dim: int) -> int:
    """Float32 bytes one head of the torch path holds at its peak: the band's logits and their
    exponentials, the band windows matmul makes contiguous and the padded keys, or the sampled
    keys' logits with two temporaries (rows in chunks past ``workspace_bytes``)."""
    blocks, width = num_blocks(q_len, slice_m), slice_m + 2 * band
    band_bytes = 2 * blocks * slice_m * width + blocks * dim * width + 2 * (kv_len + width) * dim
    return 4 * max(band_bytes, 3 * q_len * num_blocks(kv_len, ref.lse_key_stride(kv_len)))


def lse_parts(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float,
              workspace_bytes: int = DEFAULT_BAND_WORKSPACE) -> tuple:
    """(band part, sampled part), each float32 [N, q_len], of ``estimate_lse`` for q [N, q_len,
    D] and k [N, kv_len, D] (unchecked), in plain torch: the estimate is their logaddexp."""
    return band_lse(q, k, slice_m, band, scale), sampled_outside_band_lse(q, k, slice_m, band, scale, workspace_bytes)


def stats_kernel_runs(rows: torch.Tensor) -> bool:
    """Whether the scoring stats kernel takes rows [..., D] here: half precision on a GPU that
    runs the kernels, a head dim it has, and no trace under torch.compile (where torch runs)."""
    if rows.device.type != "cuda" or torch.compiler.is_compiling() or rows.dtype not in (torch.bfloat16, torch.float16):
        return False
    from .jit.runtime import kernels_can_run
    from .jit.spec import HEAD_DIMS

    return rows.shape[-1] in HEAD_DIMS and kernels_can_run()


def _kernel_lse_parts(qh, kh, slice_m: int, band: int, scale: float):
    """(band part, sampled part), float32 [B, H, q_len] each, by the stats kernel (one CTA per
    query block and its band; one per row tile over the sampled keys, the band's skipped); None
    where it does not apply (CPU tensors, a trace under torch.compile, shapes or dtypes the kernel
    lacks), and the torch path runs."""
    from .jit.launch import GRID_LIMITS
    from .jit.spec import SLICE_SIZES

    if slice_m not in SLICE_SIZES or not stats_kernel_runs(qh):
        return None
    from .mask_kernels import gpu_scores

    def stats(rows, keys, bh0, nbh, band_keys, skip):
        return gpu_scores("stats", rows, keys, scale, bh0=bh0, nbh=nbh, warps=slice_m // 16 if band_keys else 8,
                          band=band_keys, skip=skip)

    return lse_parts_from_stats(qh, kh, slice_m, band, stats, GRID_LIMITS[2])


def lse_parts_from_stats(qh, kh, slice_m: int, band: int, stats, heads_per_call: int) -> tuple:
    """The kernel path's (band part, sampled part), float32 [B, H, q_len] each, given ``stats``
    (rows [B, H, R, D], keys [B, H, n, D], bh0, nbh, band (lo, width) or None, skip (ranges
    [QB, 2], block rows) or None -> the LSE [nbh, R] of each row over its keys, or over its row
    tile's band of them, less the keys its block's range skips: the stats kernel)."""
    batch, heads, q_len, _ = qh.shape
    positions, ranges, log_factor = _sample_plan(kh.shape[2], num_blocks(q_len, slice_m), slice_m, band, qh.device)
    sampled = kh if positions is None else kh.index_select(2, positions)
    near, far = [], []
    for bh0 in range(0, batch * heads, heads_per_call):
        nbh = min(heads_per_call, batch * heads - bh0)
        near.append(stats(qh, kh, bh0, nbh, (-band, slice_m + 2 * band), None))
        far.append(stats(qh, sampled, bh0, nbh, None, (ranges, slice_m)))
    # A NaN query has no mass, as in torch; infinities stay.
    near, far = ((part[0] if len(part) == 1 else torch.cat(part)).reshape(batch, heads, q_len).nan_to_num_(
        nan=-math.inf, posinf=math.inf, neginf=-math.inf) for part in (near, far))
    return near, far.add_(log_factor)


def _sample_plan(kv_len: int, q_blocks: int, slice_m: int, band: int, device: torch.device) -> tuple:
    """(int64 sample_positions(kv_len) on ``device``, None where every key counts; int32
    [q_blocks, 2] _band_sample_ranges; the log of the keys per sampled key): what the kernel
    path's sample takes, made once per shape (fgcupy.device_constants), so a call launches no
    small integer operations for it."""
    def build(on):
        positions, log_factor = _sample(kv_len, on)
        return positions, _band_sample_ranges(q_blocks, slice_m, band, kv_len, on), log_factor

    return device_constant(("lse sample", kv_len, q_blocks, slice_m, band), device, build)


def sample_positions(kv_len: int, device=None) -> torch.Tensor:
    """int64 [ceil(kv_len / stride)], ascending: the keys the sampled part counts, one per run
    of ``lse_key_stride(kv_len)`` keys (every key below its length), at a place in the run that
    a hash of the run's index picks. Not each run's first key, as a pooled row's LSE takes
    (mask_reference.lse_key_sample: those rows all sit at one place in their runs of queries,
    so a regular sample treats them alike): a frame or row of the token grid is often a
    multiple of the stride, and a query that looks at its place in other frames would find all
    or none of its peaks in a regular sample, by its own place in its run. Tensor arithmetic, so
    torch.compile traces it; the hash's first product is taken in float64 (exact for runs below
    3.4 million), since inductor keeps an arange's integer arithmetic as an index expression,
    int32 on a GPU, where the multiplier does not fit."""
    stride = ref.lse_key_stride(kv_len)
    runs = torch.arange(num_blocks(kv_len, stride), device=device)
    if stride == 1:
        return runs
    # A multiplicative hash (runs x 2654435761 mod 2^32) with two xor-shift rounds.
    mixed = torch.remainder(runs.double() * 2654435761.0, 4294967296.0).long()
    mixed = mixed ^ (mixed >> 16)
    mixed = (mixed * 0x45D9F3B) % (1 << 32)
    mixed = mixed ^ (mixed >> 16)
    return (runs * stride + mixed % stride).clamp_max(kv_len - 1)  # the last run may be short


def _sampled_keys(k: torch.Tensor) -> tuple:
    """(k [..., S, D]'s keys at ``sample_positions`` (k itself where every key counts), the log of
    the keys per sampled key that the sample's LSE is raised by)."""
    positions, log_factor = _sample(k.shape[-2], k.device)
    return (k if positions is None else k.index_select(k.dim() - 2, positions)), log_factor


def _sample(kv_len: int, device) -> tuple:
    """(int64 sample_positions(kv_len), None where every key counts; the log of the keys per
    sampled key that the sample's LSE is raised by)."""
    if ref.lse_key_stride(kv_len) == 1:
        return None, 0.0
    positions = sample_positions(kv_len, device)
    return positions, math.log(kv_len / positions.shape[0])


def _band_sample_ranges(blocks: int, slice_m: int, band: int, kv_len: int, device) -> torch.Tensor:
    """int32 [blocks, 2]: per query block, the places [first, end) in the sample (the keys at
    ``sample_positions(kv_len)``, ascending) of the sampled keys in its band
    (mask_reference.band_bounds). No host sync."""
    positions = sample_positions(kv_len, device)
    lo, hi = _band_limits(torch.arange(blocks, device=device), slice_m, band, kv_len)
    return torch.stack([torch.searchsorted(positions, lo), torch.searchsorted(positions, hi)], 1).to(torch.int32)


def _band_limits(block: torch.Tensor, slice_m: int, band: int, kv_len: int) -> tuple:
    """(lo, hi): the keys [lo, hi) of each query block ``block``'s band, mask_reference.band_bounds
    for a tensor of blocks."""
    lo = (block * slice_m - band).clamp(0, kv_len)
    return lo, torch.maximum(lo, ((block + 1) * slice_m + band).clamp_max(kv_len))


def sampled_outside_band_lse(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float,
                             workspace_bytes: int = DEFAULT_BAND_WORKSPACE) -> torch.Tensor:
    """float32 [N, q_len]: each query's LSE over the sampled keys (``sample_positions``)
    outside its block's band, plus the log of the keys per sampled key, for q [N, q_len, D] and
    k [N, kv_len, D]: the mass outside the band, estimated from one key in every few. Rows in chunks
    whose logits stay within ``workspace_bytes``; NaN logits add no mass."""
    n, q_len, _ = q.shape
    kv_len = k.shape[1]
    sampled, log_factor = _sampled_keys(k)
    sampled = sampled.float()
    positions = sample_positions(kv_len, q.device)
    out = torch.empty(n, q_len, dtype=torch.float32, device=q.device)
    rows = max(1, int(workspace_bytes // max(1, 12 * n * sampled.shape[1])))  # logits and two temporaries
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        logits = torch.matmul(q[:, r0:r1].float(), sampled.transpose(-1, -2)) * scale  # [N, rows, n]
        lo, hi = _band_limits(torch.arange(r0, r1, device=q.device) // slice_m, slice_m, band, kv_len)
        inside = (positions >= lo.unsqueeze(1)) & (positions < hi.unsqueeze(1))
        logits.masked_fill_(inside.unsqueeze(0), -math.inf)
        logits.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        out[:, r0:r1] = torch.logsumexp(logits, -1) + log_factor
    return out


def band_lse(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float) -> torch.Tensor:
    """float32 [N, q_len]: each query's exact LSE over its block's band (keys [j*M - band,
    (j+1)*M + band) of block j, clipped to the keys; -inf where that holds none) for q [N, q_len,
    D] and k [N, kv_len, D]; NaN logits add no mass."""
    n, q_len, dim = q.shape
    kv_len = k.shape[1]
    blocks = num_blocks(q_len, slice_m)
    # Past the ends the band holds no key: one block longer than both lengths, or a band that
    # reaches every key from every block, is the same band cut to them (the logits stay
    # O(q_len x (q_len + kv_len)) whatever the sizes asked for).
    if blocks == 1:
        slice_m = max(q_len, min(slice_m, kv_len))
    band = min(band, kv_len + (blocks - 1) * slice_m)
    width = slice_m + 2 * band
    right = max(0, blocks * slice_m + band - kv_len)
    padded = torch.nn.functional.pad(k.float(), (0, 0, band, right))
    windows = padded.unfold(1, width, slice_m)[:, :blocks]  # [N, QB, D, width]: block j's band keys
    queries = torch.nn.functional.pad(q.float(), (0, 0, 0, blocks * slice_m - q_len)).view(n, blocks, slice_m, dim)
    logits = torch.matmul(queries, windows) * scale  # [N, QB, M, width]
    keys = torch.arange(blocks, device=q.device).unsqueeze(1) * slice_m - band + torch.arange(width, device=q.device)
    outside = (keys < 0) | (keys >= kv_len)
    logits.masked_fill_(outside.view(1, blocks, 1, width), -math.inf)
    logits.nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.logsumexp(logits, -1).view(n, blocks * slice_m)[:, :q_len]
