"""Benchmark cases: inputs, masks and the callables of fgcupy and its peers, built once so the
pytest-benchmark suite and the report command time exactly the same work."""

from __future__ import annotations

import torch

from fgcupy import SliceMask, SparseAttention
from fgcupy.mask import num_blocks
from fgcupy.mask import random_topk_mask as mask_random_topk


def random_inputs(batch, heads, seq, head_dim, dtype=torch.bfloat16, seed=0, device="cuda"):
    gen = torch.Generator(device=device).manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, head_dim, generator=gen, device=device, dtype=dtype) for _ in range(3))


def random_topk_mask(batch, heads, q_len, kv_len, slice_m, density, seed=0, device="cuda"):
    """``fgcupy.mask.random_topk_mask`` with a seeded generator on ``device`` (no host sync)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return mask_random_topk(batch, heads, q_len, kv_len, slice_m, density, device, gen)


def window_mask(batch, heads, tokens, slice_m, radius, device="cuda"):
    """Each query block keeps the keys within ``radius`` of its centre: one contiguous run per
    block, whose whole key tiles the Hopper kernel loads through tensor maps."""
    blocks = num_blocks(tokens, slice_m)
    centre = (torch.arange(blocks, device=device) * slice_m + slice_m // 2)[:, None]
    keys = torch.arange(tokens, device=device)[None, :]
    within = ((keys - centre).abs() <= radius).expand(batch, heads, blocks, tokens)
    return SliceMask.from_dense(within, slice_m, tokens)


def uneven_mask(batch, heads, q_len, kv_len, slice_m, low=0.01, high=1.0, seed=0, device="cuda"):
    """Query blocks keep between ``low`` and ``high`` of the keys, growing with the block's
    position in (batch, head, block) order: the longest lists come last, the worst case for a
    launch in index order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q_blocks = num_blocks(q_len, slice_m)
    fraction = torch.linspace(low, high, batch * heads * q_blocks, device=device)
    keep_prob = fraction.view(batch, heads, q_blocks, 1)
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen, device=device) < keep_prob
    return SliceMask.from_dense(dense, slice_m, q_len)


def fgcupy_call(q, k, v, mask, **tile):
    plan = SparseAttention().plan(mask, head_dim=q.shape[-1], dtype=q.dtype, **tile)
    out = torch.empty_like(q)
    return lambda: plan.run(q, k, v, out=out)


def sdpa_call(q, k, v, backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def call():
        with sdpa_kernel(chosen):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return call


def flex_call(q, k, v, block_mask=None):
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda: compiled(q, k, v, block_mask=block_mask)
