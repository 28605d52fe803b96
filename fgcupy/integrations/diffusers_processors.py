"""The attention processors ``apply`` installs on Wan, HunyuanVideo and CogVideoX attention modules: they
run the model's own projections, norms and rotary embeddings, then hand q, k, v to the handle
(fgcupy.integrations.diffusers), or to the stock processor where fgcupy does not apply."""

from __future__ import annotations

import torch

from ..jit.spec import HEAD_DIMS

_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


class _Processor:
    """Shared routing of the three processors; the stock processor is kept for every call that
    fgcupy does not take, so those calls give exactly the stock result."""

    def __init__(self, handle, layer):
        """``handle``: the SparseAttentionHandle that installed it; ``layer``: its per-layer state."""
        self._handle = handle
        self._layer = layer
        self.stock = layer.stock

    # diffusers sets the attention backend and context-parallel config on processors: keep them on
    # the stock processor, which runs the dense and fallback calls.
    @property
    def _attention_backend(self):
        return getattr(self.stock, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.stock._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.stock._parallel_config = value

    # The schedule's bookkeeping runs eagerly under torch.compile: traced, its state (layer, step,
    # cached masks) would become guards, and every layer and step would compile again.
    @torch.compiler.disable
    def _route(self, attn, device: torch.device, structural: str | None) -> str:
        """'stock', 'dense' or 'sparse' for this call (and count the stock/dense ones)."""
        layer, handle = self._layer, self._handle
        head_dim = attn.to_q.out_features // attn.heads
        reason = structural
        if reason is None and self._parallel_config is not None:
            reason = "context_parallel"
        if reason is None and head_dim not in HEAD_DIMS:
            reason = f"head_dim_{head_dim}"
        if reason is not None and handle.config.process_group is not None and reason != "cross_attention":
            # the stock processor would attend within this rank's shard only: a silently wrong answer
            raise ValueError(f"layer {layer.name}: sequence-parallel attention cannot take this call ({reason})")
        if reason is not None:
            layer.stats.record_stock(reason)
            return "stock"
        if handle.is_dense(layer):
            if handle.makes_warmup_mask(layer) and handle.device_ok(layer, device):
                return "sparse"  # handle.attend runs it dense and keeps the exact mask
            layer.stats.dense_calls += 1
            return "dense"
        if not handle.device_ok(layer, device):
            layer.stats.record_stock("no_gpu")
            return "stock"
        return "sparse"

    @torch.compiler.disable
    def _attention(self, q, k, v, key_valid=None, key_version=0, attention_mask=None, dense=False):
        """fgcupy on q, k, v ``[B, S, H, D]``; the stock attention call for dtypes without a kernel."""
        handle = self._handle
        if handle.config.process_group is not None:
            return handle.attend_parallel(self._layer, q, k, v, dense)
        if handle.config.attention_fn is None and q.dtype not in _KERNEL_DTYPES:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            self._layer.stats.record_stock(f"dtype_{str(q.dtype).removeprefix('torch.')}")
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=None)
        return handle.attend(self._layer, q, k, v, key_valid, key_version)


def _rotate_pairs_wan(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each (even, odd) channel pair of x ``[B, S, H, D]`` turned by its
    angle, in the frequencies' precision (float64), rounded once to x's dtype."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def _rotate_pairs_hunyuan(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """HunyuanVideo's rotary embedding: x ``[B, S, H, D]``, cos/sin ``[S, D]`` (already repeated per
    pair), computed in float32: x * cos + (-odd, even) * sin."""
    cos, sin = (f.to(x.device)[None, :, None, :] for f in freqs)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _headed_qkv(attn, tokens: torch.Tensor) -> tuple:
    """q, k, v ``[B, S, H, D]`` of ``tokens`` through the module's projections, q and k through its
    per-head norms where it has them (HunyuanVideo, CogVideoX)."""
    query, key, value = (proj(tokens).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class WanSparseProcessor(_Processor):
    """Wan self-attention with fgcupy: the stock WanAttnProcessor's math, attention replaced."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        structural = None
        if encoder_hidden_states is not None or attn.is_cross_attention:
            structural = "cross_attention"
        elif attention_mask is not None:
            structural = "attention_mask"
        elif getattr(attn, "add_k_proj", None) is not None:
            structural = "image_context"
        route = self._route(attn, hidden_states.device, structural)
        parallel = self._handle.config.process_group is not None
        if route == "stock" or (route == "dense" and not parallel):  # parallel dense steps need the exchange
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query = _rotate_pairs_wan(query, *rotary_emb)
            key = _rotate_pairs_wan(key, *rotary_emb)

        out = self._attention(query, key, value, dense=route == "dense")
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class HunyuanVideoSparseProcessor(_Processor):
    """HunyuanVideo joint (video + text) self-attention with fgcupy: the stock
    HunyuanVideoAttnProcessor2_0's math, attention replaced; the text padding mask becomes part of
    the slice mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        in_stream = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream blocks
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        kv_len = hidden_states.shape[1] + text_len
        structural = None
        if attention_mask is not None and not _iskey_padding(attention_mask, hidden_states.shape[0], kv_len):
            structural = "attention_mask"
        if attention_mask is not None and structural is None and self._handle.config.share_branches:
            # whether this branch's padding lets it share the first branch's masks decides its route
            self._handle.key_padding(attention_mask, hidden_states.shape[0], kv_len)
        route = self._route(attn, hidden_states.device, structural)
        if route != "sparse":
            return self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        key_valid, key_version = None, 0
        if attention_mask is not None:
            key_valid, key_version = self._handle.key_padding(attention_mask, hidden_states.shape[0], kv_len)

        tokens = torch.cat([hidden_states, encoder_hidden_states], dim=1) if in_stream else hidden_states
        query, key, value = _headed_qkv(attn, tokens)
        if image_rotary_emb is not None:
            video = tokens.shape[1] - (text_len if in_stream else 0)
            query = torch.cat([_rotate_pairs_hunyuan(query[:, :video], image_rotary_emb), query[:, video:]], dim=1)
            key = torch.cat([_rotate_pairs_hunyuan(key[:, :video], image_rotary_emb), key[:, video:]], dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual-stream blocks
            text_q, text_k, text_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))

        out = self._attention(query, key, value, key_valid, key_version, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        video_out, text_out = out[:, : out.shape[1] - text_len], out[:, out.shape[1] - text_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


class CogVideoXSparseProcessor(_Processor):
    """CogVideoX joint (text + video) self-attention with fgcupy: the stock
    CogVideoXAttnProcessor2_0's math (text tokens first, rotary embedding on the video tokens
    only), attention replaced."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        structural = None
        if attn.is_cross_attention:
            structural = "cross_attention"
        elif attention_mask is not None:
            structural = "attention_mask"
        route = self._route(attn, hidden_states.device, structural)
        if route != "sparse":
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask,
                              image_rotary_emb=image_rotary_emb)
        text_len = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = _headed_qkv(attn, tokens)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            def rotated(x):  # the stock function takes [B, H, S, D]
                video = apply_rotary_emb(x[:, text_len:].transpose(1, 2), image_rotary_emb).transpose(1, 2)
                return torch.cat([x[:, :text_len], video], dim=1)

            query, key = rotated(query), rotated(key)

        out = self._attention(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_len:], out[:, :text_len]


def _iskey_padding(mask: torch.Tensor, batch: int, kv_len: int) -> bool:
    """A boolean ``[B or 1, 1, 1, KV]`` mask (True = attend): one flag per key, the same for every
    query and head, which a slice mask can absorb exactly."""
    return (
        isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
        and mask.shape[0] in (1, batch) and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == kv_len
    )
