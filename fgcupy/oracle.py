"""The oracle mask of a given density, and predictors judged against it.

For a query block, the oracle slice mask keeps the keys with the highest column maximum of the
softmax (max over the block's queries of their probability), so the largest probability it
drops is as small as it can be (the FG-Attn criterion). It is the yardstick, not a
proven optimum of the output error (a block's column sum does a few percent better on some
heads: notes/MEASURED.md "Mask quality"). The oracle 128x128 block mask keeps, per query block, the key
blocks holding the most attention (the block's queries' summed probability over the block's
keys: ranked by the highest column maximum instead, a block mask needs up to 8 % more blocks for
the same error). A predictor is judged by its output error divided by
the oracle's error at the same density: absolute errors hide failures, since some heads are easy
for every method.

Everything here is plain torch (float32, any device) and independent of the kernels under test.
"""

from __future__ import annotations

import math

import torch

from .attention_kernel import check_scale, eager_scale
from .mask import SliceMask, num_blocks, positive_int
from .mask_reference import colmax_scores, nan_free_logsumexp, probabilities
from .reference import dense_attention, reference_attention, relative_l2


def exact_lse(q, k, scale: float | None = None, budget_bytes: int = 4 << 30) -> torch.Tensor:
    """float32 [B, H, q_len]: each query's natural-log LSE over every key (a dense step's LSE),
    in row chunks whose float32 scores stay within ``budget_bytes``; NaN logits (a NaN query or
    key) add no mass, as in the kernels' sums."""
    if scale is not None:
        scale = eager_scale(scale)
        check_scale(scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kf = k.float()
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    rows_per_chunk = max(16, budget_bytes // max(1, q.shape[0] * q.shape[1] * k.shape[2] * 4))
    for r0 in range(0, q.shape[2], rows_per_chunk):
        logits = torch.matmul(q[:, :, r0 : r0 + rows_per_chunk].float(), kf.transpose(-1, -2)) * scale
        lse[:, :, r0 : r0 + rows_per_chunk] = nan_free_logsumexp(logits)
    return lse


def block_mass(q, k, lse, slice_m: int, block: int, scale: float, budget_bytes: int = 4 << 30) -> torch.Tensor:
    """float32 [B, H, ceil(q_len / slice_m), ceil(kv_len / block)]: the softmax mass each query
    block gives each key block (its queries' probabilities summed over the key block's keys), in
    row chunks whose float32 scores stay within ``budget_bytes``. NaN logits add nothing."""
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    key_blocks = num_blocks(kv_len, block)
    out = torch.zeros(batch, heads, num_blocks(q_len, slice_m), key_blocks, dtype=torch.float32, device=q.device)
    kf = k.float()
    rows = max(1, budget_bytes // max(1, batch * heads * kv_len * 4 * slice_m)) * slice_m
    for r0 in range(0, q_len, rows):
        r1 = min(q_len, r0 + rows)
        logits = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        probs = probabilities(logits, lse[:, :, r0:r1].unsqueeze(-1))
        probs = torch.nn.functional.pad(probs, (0, key_blocks * block - kv_len, 0, (-(r1 - r0)) % slice_m))
        tiles = probs.unflatten(2, (-1, slice_m)).sum(3).unflatten(-1, (key_blocks, block)).sum(-1)
        out[:, :, r0 // slice_m : r0 // slice_m + tiles.shape[2]] = tiles
    return out


def keys_for(density: float, kv_len: int) -> int:
    """Keys per block at ``density`` (at least one)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return max(1, min(kv_len, round(density * kv_len)))


class Judge:
    """One problem (q, k, v [B, H, S, D]) with its dense output and column maxima, so every
    mask of it is judged against the same yardstick."""

    def __init__(self, q, k, v, slice_m: int = 128, scale: float | None = None):
        slice_m = positive_int("slice_m", slice_m)
        self.q, self.k, self.v, self.slice_m = q, k, v, slice_m
        if scale is not None:
            scale = eager_scale(scale)
            check_scale(scale)
        self.scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        self.dense = dense_attention(q, k, v, scale=self.scale)
        self.lse = exact_lse(q, k, self.scale)
        self.colmax = colmax_scores(q, k, self.lse, slice_m, self.scale, exact=True)  # [B, H, QB, S]
        self._oracle_err = {}
        self._block_mass = {}

    @property
    def kv_len(self) -> int:
        return self.k.shape[2]

    def oracle(self, density: float) -> SliceMask:
        """The oracle slice mask keeping round(density x kv_len) keys per block: each block's keys
        of highest column max (the largest probability any of its queries gives them). The
        yardstick of every predictor, not the proven best mask of that density: a mask by each
        block's column sum does a few percent better on some heads (notes/MEASURED.md "Mask quality")."""
        top = self.colmax.topk(keys_for(density, self.kv_len), dim=-1).indices.sort(-1).values
        return SliceMask.from_topk(top.to(torch.int32), self.slice_m, self.q.shape[2], self.kv_len)

    def block_oracle(self, density: float, block: int = 128) -> SliceMask:
        """The oracle block x block mask keeping round(density x key blocks) blocks per query
        block (needs slice_m == block), as a SliceMask of whole key blocks."""
        return self.block_oracle_of(keys_for(density, num_blocks(self.kv_len, block)), block)

    def block_oracle_of(self, blocks: int, block: int = 128) -> SliceMask:
        """The oracle block x block mask keeping ``blocks`` key blocks per query block, those its
        queries give the most attention (needs slice_m == block), as a SliceMask of whole key
        blocks."""
        if block != self.slice_m:
            raise ValueError(f"block oracle needs block == slice_m ({self.slice_m}), got {block}")
        kb = num_blocks(self.kv_len, block)
        if not 1 <= blocks <= kb:
            raise ValueError(f"blocks must be in [1, {kb}] (key blocks of {block}), got {blocks}")
        if block not in self._block_mass:
            self._block_mass[block] = block_mass(self.q, self.k, self.lse, self.slice_m, block, self.scale)
        scores = self._block_mass[block]
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(blocks, dim=-1).indices, True)
        dense = chosen.repeat_interleave(block, dim=-1)[..., : self.kv_len]
        return SliceMask.from_dense(dense, block, self.q.shape[2])

    def blocks_for_error(self, target: float, block: int = 128, low: int = 1) -> tuple:
        """(key blocks per query block, error) of the smallest oracle block mask whose error is at
        most ``target``, by bisection between ``low`` and every block (the full mask is exact).
        Bisection assumes the error falls as blocks are added, which the nested masks make the
        rule, not a law: the result's error is at most ``target`` and one block fewer's is above,
        unless even every block's error (float rounding, ~1e-7) is above ``target``: then every
        block and that error.
        The equal-error density of a block-sparse kernel beside a slice mask of error ``target``."""
        kb = num_blocks(self.kv_len, block)
        lo, hi = max(1, min(low, kb)), kb
        errors = {kb: self.error(self.block_oracle_of(kb, block))}
        if self._block_error(lo, block, errors) <= target:
            return lo, errors[lo]
        while hi - lo > 1:  # error(lo) > target >= error(hi) holds (error(kb) is ~0)
            mid = (lo + hi) // 2
            if self._block_error(mid, block, errors) <= target:
                hi = mid
            else:
                lo = mid
        return hi, errors[hi]

    def _block_error(self, blocks: int, block: int, cache: dict) -> float:
        if blocks not in cache:
            cache[blocks] = self.error(self.block_oracle_of(blocks, block))
        return cache[blocks]

    def error(self, mask: SliceMask) -> float:
        """Relative L2 error of attention through ``mask`` against dense float32 attention."""
        out, _ = reference_attention(self.q, self.k, self.v, mask, scale=self.scale, rows_per_chunk=2048)
        return relative_l2(out, self.dense)

    def oracle_error(self, density: float) -> float:
        key = keys_for(density, self.kv_len)
        if key not in self._oracle_err:
            self._oracle_err[key] = self.error(self.oracle(density))
        return self._oracle_err[key]

    def ratio(self, mask: SliceMask) -> tuple:
        """(error, error / oracle error at the mask's own density). Meant for masks that keep the
        same number of keys in every block, as the oracle does: against a mask whose blocks keep
        different counts the oracle of its mean count is no fair yardstick (nor is it rounded
        the same way)."""
        if mask.slice_m != self.slice_m:
            raise ValueError(f"the mask's slice_m={mask.slice_m} is not the judge's {self.slice_m}: its oracle is "
                             "of other blocks")
        err = self.error(mask)
        best = self.oracle_error(max(mask.density(), 1.0 / self.kv_len))  # an empty mask: the one-key oracle
        return err, (err / best if best > 0 else (1.0 if err == 0 else math.inf))
