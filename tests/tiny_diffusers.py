"""Tiny diffusers video transformers (random weights, nothing downloaded) and small predictors for
the integration tests. Import only after ``pytest.importorskip("diffusers")``."""

from __future__ import annotations

import math

import torch

from fgcupy import SliceMask, reference_attention
from fgcupy.mask import num_blocks


def tiny_wan(head_dim: int = 64, heads: int = 2, layers: int = 2, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    ).eval()


def tiny_hunyuan(head_dim: int = 64, heads: int = 2, seed: int = 0):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    t_dim = head_dim // 4
    hw_dim = (head_dim - t_dim) // 2
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=False, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(t_dim, hw_dim, head_dim - t_dim - hw_dim),
    ).eval()


def tiny_cogvideox(head_dim: int = 64, heads: int = 2, seed: int = 0):
    """CogVideoX with rotary embeddings: latents [1, 3, 4, 16, 16] make 3 x 8 x 8 video tokens."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=16, sample_height=16, sample_frames=9, patch_size=2,
        max_text_seq_length=7, use_rotary_positional_embeddings=True,
    ).eval()


def cogvideox_inputs(frames: int = 3, size: int = 16, text: int = 7, head_dim: int = 64, seed: int = 1,
                     device="cpu", dtype=torch.float32):
    """Latents [1, F, 4, size, size] (CogVideoX's frame-first layout), text states [1, text, 32] and
    the 3-D rotary embedding the pipeline would pass, (cos, sin) [F * (size / 2)^2, head_dim]."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, frames, 4, size, size, generator=gen)
    text_states = torch.randn(1, text, 32, generator=gen)
    side = size // 2
    rotary = get_3d_rotary_pos_embed(head_dim, ((0, 0), (side, side)), (side, side), frames)
    return latents.to(device, dtype), text_states.to(device, dtype), tuple(r.to(device) for r in rotary)


def wan_inputs(frames: int = 3, size: int = 16, text: int = 7, seed: int = 1, device="cpu", dtype=torch.float32):
    """Latents [1, 4, F, size, size] -> F * (size / 2)^2 tokens; text [1, text, 32]."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size, generator=gen)
    text_states = torch.randn(1, text, 32, generator=gen)
    return latents.to(device, dtype), text_states.to(device, dtype)


def hunyuan_inputs(frames: int = 3, size: int = 16, text: int = 12, valid_text: int = 9, seed: int = 1,
                   device="cpu", dtype=torch.float32):
    """Latents, text states, a text padding mask keeping ``valid_text`` tokens, pooled projections."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, size, size, generator=gen)
    text_states = torch.randn(1, text, 32, generator=gen)
    text_mask = torch.zeros(1, text, dtype=torch.long)
    text_mask[:, :valid_text] = 1
    pooled = torch.randn(1, 16, generator=gen)
    return latents.to(device, dtype), text_states.to(device, dtype), text_mask.to(device), pooled.to(device, dtype)


def full_predictor(q, k, slice_m):
    """Every key kept: the sparse path must then give the dense answer."""
    batch, heads, q_len, _ = q.shape
    return SliceMask.full(batch, heads, q_len, k.shape[2], slice_m, device=q.device)


class CountingPredictor:
    """Wraps a predictor and counts its calls (one call = one mask refresh of one layer)."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.calls = 0

    def __call__(self, q, k, slice_m):
        self.calls += 1
        return self.predictor(q, k, slice_m)


def oracle_topk(density: float):
    """Per query block, the keys with the largest attention probability of any of its queries
    (exact, from q and k): a mask that follows the layer's real attention."""

    def predict(q, k, slice_m):
        batch, heads, q_len, head_dim = q.shape
        kv_len = k.shape[2]
        keep = max(1, round(density * kv_len))
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(head_dim)
        probs = torch.softmax(scores, dim=-1)
        q_blocks = num_blocks(q_len, slice_m)
        pad = q_blocks * slice_m - q_len
        probs = torch.nn.functional.pad(probs, (0, 0, 0, pad))
        block_max = probs.reshape(batch, heads, q_blocks, slice_m, kv_len).amax(dim=3)
        top = torch.topk(block_max, keep, dim=-1).indices
        return SliceMask.from_topk(top, slice_m, q_len, kv_len)

    return predict


def random_predictor(density: float, seed: int = 0):
    """A random mask that always keeps key 0 (so no row is empty): the sparse math must then equal
    dense attention restricted to exactly those keys."""

    def predict(q, k, slice_m):
        batch, heads, q_len, _ = q.shape
        kv_len = k.shape[2]
        gen = torch.Generator().manual_seed(seed)
        dense = torch.rand(batch, heads, num_blocks(q_len, slice_m), kv_len, generator=gen) < density
        dense[..., 0] = True
        return SliceMask.from_dense(dense.to(q.device), slice_m, q_len)

    return predict


def reference_attention_fn(q, k, v, mask, scale):
    """``attention_fn`` stand-in for the kernel: fgcupy's exact float32 reference, NHD in and out."""
    return reference_attention(q, k, v, mask, scale=scale, layout="NHD")[0].to(q.dtype)


def expand_mask(mask: SliceMask, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The slice mask as a boolean [B, H, S, KV] attention mask for SDPA (True = attend)."""
    dense = mask.to_dense().repeat_interleave(mask.slice_m, dim=2)[:, :, : mask.q_len]
    if key_valid is not None:
        dense = dense & key_valid[:, None, None, :]
    return dense


def cpu_config(**overrides):
    """A config that runs on CPU: the exact reference stands in for the kernel. No dense warm-up
    step unless asked for (the tests of the warm-up schedule ask)."""
    from fgcupy.integrations import diffusers as fd

    base = dict(predictor=full_predictor, attention_fn=reference_attention_fn, dense_steps=0)
    base.update(overrides)
    return fd.SparseAttentionConfig(**base)


def hunyuan_attention_call(config):
    """A tiny HunyuanVideo patched by ``config``, and what a direct call of its first attention
    takes: (handle, attn, its stock processor, hidden states, 12 text states, rotary embedding)."""
    from fgcupy.integrations import diffusers as fd

    model = tiny_hunyuan()
    handle = fd.apply(model, config)
    attn = model.transformer_blocks[0].attn
    rotary = model.rope(hunyuan_inputs()[0])
    video, dim = rotary[0].shape[0], attn.to_q.in_features
    gen = torch.Generator().manual_seed(3)
    hidden, text_states = torch.randn(1, video, dim, generator=gen), torch.randn(1, 12, dim, generator=gen)
    return handle, attn, handle.layers["transformer_blocks.0.attn"].stock, hidden, text_states, rotary


def run_wan(model, latents, text, t=500):
    with torch.no_grad():
        return model(latents, torch.tensor([t]), text).sample
