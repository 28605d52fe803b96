"""Tensor layouts: fgcupy works on [B, H, S, D] views; "NHD" inputs ([B, S, H, D]) are permuted
views, never copies."""

from __future__ import annotations

LAYOUTS = ("HND", "NHD")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} ('HND' = [B, H, S, D], 'NHD' = [B, S, H, D]), got {layout!r}")


def to_bhsd(x, layout: str):
    """A [B, H, S, D] view of ``x`` given in ``layout`` (works for torch tensors)."""
    check_layout(layout)
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D tensor in layout {layout}, got shape {tuple(x.shape)}")
    return x if layout == "HND" else x.transpose(1, 2)
