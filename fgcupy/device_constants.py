"""Small index tensors made once per shape and kept on their device (sample positions, row
lists, even offsets): a call that finds its shape's tensors launches nothing to make them.

They are built on the host and copied with a blocking copy, so any stream may read them at
once; never dropped (a few KB each; a freed one could still be read by work queued on another
stream); made outside inference mode (an inference tensor cannot be saved for a backward pass).
While the current stream is being captured into a CUDA graph they are made on the device and not
kept: a copy from the host is not allowed there, and the graph's memory pool is not ours to hold.
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch

_KEPT: dict = {}


def device_constant(key: Hashable, device, build: Callable):
    """``build(device)``'s tensors (a tensor, or a tuple whose tensors are moved and other items
    kept) on ``device``, made once per (key, device). ``build`` must be a function of ``key``
    alone: what it returns is shared by every later call."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build(device)
    kept = _KEPT.get((key, device))
    if kept is None:
        with torch.inference_mode(False):
            built = build(torch.device("cpu"))
            kept = (tuple(_moved(item, device) for item in built) if isinstance(built, tuple)
                    else _moved(built, device))
        _KEPT[(key, device)] = kept
    return kept


def _moved(item, device: torch.device):
    return item.to(device) if isinstance(item, torch.Tensor) else item
