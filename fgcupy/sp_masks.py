"""Masks predicted per rank in sequence parallelism (the callable SequenceParallelAttention takes)."""

from __future__ import annotations

import torch

from .mask import SliceMask
from .mask_algebra import slice_heads
from .scoring import check_predict_options, predict_mask


class MaskPredictor:
    """Per-rank mask prediction for the heads a rank owns: calls ``fgcupy.predict_mask`` on the
    exchanged full-sequence q, k of each head group. Options that hold one entry per head of the
    model (a pooling list, an ``lse`` tensor [B, H, S], ``candidates`` masks) are given for every
    head and cut to the group's; like every option but density, top_k, scale and workspace_bytes
    they need a method named (predict_mask's default, "auto", takes only those), and what
    predict_mask would refuse is refused when the predictor is made."""

    def __init__(self, slice_m: int = 128, **options):
        held = {name: value for name, value in options.items() if name != "layout"}
        check_predict_options(held | {"slice_m": slice_m}, "MaskPredictor")
        self.slice_m = slice_m
        self.options = options

    def __call__(self, q: torch.Tensor, k: torch.Tensor, heads: range) -> SliceMask:
        # Exchanged tensors are strided views of the receive buffer; scoring kernels may want rows.
        options = dict(self.options)
        if isinstance(options.get("pooling"), (list, tuple)):  # one pooling per head of the model
            options["pooling"] = [options["pooling"][h] for h in heads]
        if isinstance(options.get("lse"), torch.Tensor):
            options["lse"] = options["lse"][:, heads.start : heads.stop]
        candidates = options.get("candidates")
        if isinstance(candidates, SliceMask):
            options["candidates"] = slice_heads(candidates, heads)
        elif isinstance(candidates, (list, tuple)):
            options["candidates"] = [slice_heads(c, heads) if isinstance(c, SliceMask) else c for c in candidates]
        return predict_mask(q.contiguous(), k.contiguous(), slice_m=self.slice_m, **options)

    def __repr__(self):
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"MaskPredictor(slice_m={self.slice_m}{options})"
