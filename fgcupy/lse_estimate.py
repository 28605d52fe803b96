"""Each query's softmax LSE estimated without a dense step, for the exact column max.

The column-max score of a key is the highest probability that any query of the block gives
it, and a probability needs its query's LSE (the log of its softmax normaliser). A dense step
yields the LSE; without one, ``estimate_lse`` log-adds two parts:

* the exact log-mass of the keys around the query's block (its band: the block's own keys and
  ``band`` more on either side), where local and sharp heads put most of each query's mass;
* the log-mass that the block's mean query gives every key, from every few keys
  (``mask_reference.sampled_lse``): the broad part a band cannot see.

Either part alone fails on some heads (the band alone on region mixtures, the mean alone on
sharp Gaussians and concentrated spatial heads: README "Mask quality"); the sum overcounts
the band's keys by at most a factor of two, which moves every probability of a query alike.
Plain torch on any device, in head chunks bounded by ``workspace_bytes``.
"""

from __future__ import annotations

import math

import torch

from . import mask_reference as ref
from .layout import query_key_views
from .mask import num_blocks
from .mask_request import is_number

#: Keys either side of a block whose exact mass the estimate counts (the default exact band).
ESTIMATE_BAND = 64
#: Bytes the band logits of one head chunk (and their exponentials) may take.
DEFAULT_BAND_WORKSPACE = 1 << 30


def estimate_lse(q, k, slice_m: int = 128, *, band: int = ESTIMATE_BAND, scale: float | None = None,
                 layout: str = "HND", workspace_bytes: int = DEFAULT_BAND_WORKSPACE) -> torch.Tensor:
    """float32 [B, H, q_len] natural-log LSE estimate of each query of ``q`` over the keys ``k``
    ([B, H, S, D] "HND" or [B, S, H, D] "NHD", torch or cupy), on q's device: what
    ``predict_mask(method="colmax", lse=...)`` needs where no dense step ran
    (``lse="estimate"`` there calls this). ``slice_m``: the query blocks whose mean query and
    band are used; ``scale`` defaults to 1 / sqrt(D). A query whose block holds a NaN query
    keeps only its band's part; a NaN key adds no mass."""
    qh, kh = query_key_views(q, k, layout)
    for name, value in (("slice_m", slice_m), ("band", band)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "slice_m" else 0):
            raise ValueError(f"{name} must be a {'positive' if name == 'slice_m' else 'non-negative'} int, "
                             f"got {value!r}")
    scale = ref.default_scale(qh.shape[3]) if scale is None else scale
    if not is_number(scale) or not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if not is_number(workspace_bytes) or not (workspace_bytes >= 0 and math.isfinite(workspace_bytes)):
        raise ValueError(f"workspace_bytes must be a non-negative number of bytes, got {workspace_bytes!r}")
    batch, heads, q_len, dim = qh.shape
    out = torch.empty(batch * heads, q_len, dtype=torch.float32, device=qh.device)
    q_flat, k_flat = qh.reshape(batch * heads, q_len, dim), kh.reshape(batch * heads, kh.shape[2], dim)
    blocks = num_blocks(q_len, slice_m)
    per_head = 2 * 4 * blocks * slice_m * (slice_m + 2 * band) + 4 * (kh.shape[2] + 2 * band + slice_m) * dim
    chunk = max(1, min(batch * heads, int(workspace_bytes // max(per_head, 1))))
    for h0 in range(0, batch * heads, chunk):
        qc, kc = q_flat[h0 : h0 + chunk], k_flat[h0 : h0 + chunk]
        means = ref.pool_queries(qc.unsqueeze(0), slice_m)
        broad = ref.sampled_lse(means, kc.unsqueeze(0), float(scale))[0]
        near = band_lse(qc, kc, slice_m, band, float(scale))
        out[h0 : h0 + chunk] = torch.logaddexp(near, broad.repeat_interleave(slice_m, -1)[:, :q_len])
    return out.view(batch, heads, q_len)


def band_lse(q: torch.Tensor, k: torch.Tensor, slice_m: int, band: int, scale: float) -> torch.Tensor:
    """float32 [N, q_len]: each query's exact LSE over its block's band (keys [j*M - band,
    (j+1)*M + band) of block j, clipped to the keys; -inf where that holds none) for q [N, q_len,
    D] and k [N, kv_len, D]; NaN logits add no mass."""
    n, q_len, dim = q.shape
    kv_len = k.shape[1]
    blocks = num_blocks(q_len, slice_m)
    width = slice_m + 2 * band
    right = max(0, blocks * slice_m + band - kv_len)
    padded = torch.nn.functional.pad(k.float(), (0, 0, band, right))
    windows = padded.unfold(1, width, slice_m)[:, :blocks]  # [N, QB, D, width]: block j's band keys
    queries = torch.nn.functional.pad(q.float(), (0, 0, 0, blocks * slice_m - q_len)).view(n, blocks, slice_m, dim)
    logits = torch.matmul(queries, windows) * scale  # [N, QB, M, width]
    keys = torch.arange(blocks, device=q.device).unsqueeze(1) * slice_m - band + torch.arange(width, device=q.device)
    outside = (keys < 0) | (keys >= kv_len)
    logits.masked_fill_(outside.view(1, blocks, 1, width), -math.inf).nan_to_num_(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    return torch.logsumexp(logits, -1).view(n, blocks * slice_m)[:, :q_len]
