"""Masks predicted per rank in sequence parallelism (the callable SequenceParallelAttention takes)."""

from __future__ import annotations

import torch

from .mask import SliceMask
from .scoring import predict_mask


class MaskPredictor:
    """Per-rank mask prediction for the heads a rank owns: calls ``fgcupy.predict_mask`` on the
    exchanged full-sequence q, k of each head group."""

    def __init__(self, slice_m: int = 128, **options):
        self.slice_m = slice_m
        self.options = options

    def __call__(self, q: torch.Tensor, k: torch.Tensor, heads: range) -> SliceMask:
        # Exchanged tensors are strided views of the receive buffer; scoring kernels may want rows.
        options = dict(self.options)
        if isinstance(options.get("pooling"), (list, tuple)):  # one pooling per head of the model
            options["pooling"] = [options["pooling"][h] for h in heads]
        return predict_mask(q.contiguous(), k.contiguous(), slice_m=self.slice_m, **options)

    def __repr__(self):
        options = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"MaskPredictor(slice_m={self.slice_m}{options})"
