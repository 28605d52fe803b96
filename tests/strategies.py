"""Hypothesis strategies shared by mask, reference and kernel tests."""

import torch
from hypothesis import strategies as st

from fgcupy.mask import SliceMask, num_blocks


@st.composite
def dense_masks(draw, max_batch=2, max_heads=3, max_q=300, max_kv=300, slice_sizes=(16, 64, 128)):
    """(dense bool [B, H, QB, KV], slice_m, q_len): per-row densities from empty to full."""
    batch = draw(st.integers(1, max_batch))
    heads = draw(st.integers(1, max_heads))
    slice_m = draw(st.sampled_from(slice_sizes))
    q_len = draw(st.integers(1, max_q))
    kv_len = draw(st.integers(1, max_kv))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q_blocks = num_blocks(q_len, slice_m)
    density = torch.rand(batch, heads, q_blocks, 1, generator=gen)
    # Some rows empty, some full, the rest random.
    density[torch.rand(density.shape, generator=gen) < 0.1] = 0.0
    density[torch.rand(density.shape, generator=gen) < 0.1] = 1.0
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < density
    return dense, slice_m, q_len


def mask_from(dense, slice_m, q_len, device="cpu"):
    return SliceMask.from_dense(dense.to(device), slice_m, q_len)
