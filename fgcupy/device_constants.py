"""Small index tensors made once per shape and kept on their device (sample positions, row
lists, even offsets): a call that finds its shape's tensors launches nothing to make them.

CUDA ones are built on the host and copied by a worker thread of this module's own, on its own
stream, which it synchronises before handing them over, so any stream may read them at once. The
thread matters: a CUDA graph tree's warm-up runs ops eagerly with every allocation of the calling
thread routed into the graph's pool, which the tree may reset and whose live tensors it refuses.
They are never dropped (a few KB each; a freed one could still be read by work queued on another
stream) and made outside inference mode (an inference tensor cannot be saved for a backward pass).
While the current stream is being captured into a CUDA graph, one not yet kept is made on the
device and not kept: a copy from the host is not allowed there.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Hashable

import torch

_KEPT: dict = {}
_COPY_STREAMS: dict = {}
_MAKER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fgcupy-device-constants")


def device_constant(key: Hashable, device, build: Callable):
    """``build(device)``'s tensors (a tensor, or a tuple whose tensors are moved and other items
    kept) on ``device``, made once per (key, device). ``build`` must be a function of ``key``
    alone: what it returns is shared by every later call. It runs on this module's one worker
    thread for CUDA devices, so it must not ask for another device constant (that would wait on
    itself)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # the worker's current device may differ
    kept = _KEPT.get((key, device))
    if kept is None and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return build(device)
    if kept is None:
        kept = _MAKER.submit(_made, device, build).result() if device.type == "cuda" else _made(device, build)
        _KEPT[(key, device)] = kept
    return kept


def _made(device: torch.device, build: Callable):
    """``build``'s tensors moved to ``device``; on CUDA, on this module's stream, copies finished."""
    with torch.inference_mode(False):
        built = build(torch.device("cpu"))
        if device.type != "cuda":
            return _moved_all(built, device)
        stream = _copy_stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            moved = _moved_all(built, device)
            stream.synchronize()
        return moved


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    """This module's own stream on CUDA ``device`` (an index given; made once)."""
    stream = _COPY_STREAMS.get(device.index)
    if stream is None:
        stream = _COPY_STREAMS[device.index] = torch.cuda.Stream(device.index)
    return stream


def _moved_all(built, device: torch.device):
    return tuple(_moved(item, device) for item in built) if isinstance(built, tuple) else _moved(built, device)


def _moved(item, device: torch.device):
    return item.to(device) if isinstance(item, torch.Tensor) else item
