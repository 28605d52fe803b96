"""Small index tensors made once per shape and kept on their device (sample positions, row
lists, even offsets): a call that finds its shape's tensors launches nothing to make them.

They are built on the host and copied with a blocking copy, so any stream may read them at
once; the copy runs on a stream of this module's own, so the memory never comes from a pool that
a CUDA graph tree routes the current stream to (its warm-up runs ops eagerly into the graph's
pool, which the tree may reset); never dropped (a few KB each; a freed one could still be read by
work queued on another stream); made outside inference mode (an inference tensor cannot be saved
for a backward pass). While the current stream is being captured into a CUDA graph they are made
on the device and not kept: a copy from the host is not allowed there.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Hashable

import torch

_KEPT: dict = {}
_COPY_STREAMS: dict = {}


def device_constant(key: Hashable, device, build: Callable):
    """``build(device)``'s tensors (a tensor, or a tuple whose tensors are moved and other items
    kept) on ``device``, made once per (key, device). ``build`` must be a function of ``key``
    alone: what it returns is shared by every later call."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build(device)
    kept = _KEPT.get((key, device))
    if kept is None:
        with torch.inference_mode(False), _copy_stream(device):
            built = build(torch.device("cpu"))
            kept = (tuple(_moved(item, device) for item in built) if isinstance(built, tuple)
                    else _moved(built, device))
        _KEPT[(key, device)] = kept
    return kept


def _copy_stream(device: torch.device):
    """This module's own stream on a CUDA ``device`` (made once), as the current stream."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    index = torch.cuda.current_device() if device.index is None else device.index
    stream = _COPY_STREAMS.get(index)
    if stream is None:
        stream = _COPY_STREAMS[index] = torch.cuda.Stream(index)
    return torch.cuda.stream(stream)


def _moved(item, device: torch.device):
    return item.to(device) if isinstance(item, torch.Tensor) else item
