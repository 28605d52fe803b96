"""Tensor layouts: fgcupy works on [B, H, S, D] views; "NHD" inputs ([B, S, H, D]) are permuted
views, never copies."""

from __future__ import annotations

from . import bridge

LAYOUTS = ("HND", "NHD")


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} ('HND' = [B, H, S, D], 'NHD' = [B, S, H, D]), got {layout!r}")


def to_bhsd(x, layout: str, name: str = "tensor"):
    """A [B, H, S, D] view of ``x`` given in ``layout`` (works for torch tensors); ``name``
    names it in the error."""
    check_layout(layout)
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor ({'[B, H, S, D]' if layout == 'HND' else '[B, S, H, D]'}, "
                         f"layout {layout}), got shape {tuple(x.shape)}")
    return x if layout == "HND" else x.transpose(1, 2)


def query_key_views(q, k, layout: str = "HND") -> tuple:
    """[B, H, S, D] torch views of ``q`` and ``k`` (torch or cupy, ``layout``), checked as a pair:
    the same B, H and D, device and floating dtype, at least one token each."""
    check_layout(layout)
    qh, kh = to_bhsd(bridge.to_torch(q, "q"), layout, "q"), to_bhsd(bridge.to_torch(k, "k"), layout, "k")
    if qh.shape[0] != kh.shape[0] or qh.shape[1] != kh.shape[1] or qh.shape[3] != kh.shape[3]:
        raise ValueError(f"q and k must agree on B, H and D ([B, H, S, D]); got {tuple(qh.shape)} and {tuple(kh.shape)}")
    if qh.device != kh.device:
        raise ValueError(f"q is on {qh.device} but k on {kh.device}")
    if qh.shape[2] < 1 or kh.shape[2] < 1:
        raise ValueError(f"q and k need at least one token, got q_len={qh.shape[2]}, kv_len={kh.shape[2]}")
    if qh.shape[3] < 1:
        raise ValueError(f"q and k need a head dim of at least 1, got {qh.shape[3]}")
    for name, t in (("q", qh), ("k", kh)):
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    if kh.dtype != qh.dtype:
        raise TypeError(f"k has dtype {kh.dtype}, q has {qh.dtype}")
    return qh, kh
