"""The ``fgcupy`` namespace of torch operators, defined through ``torch.library.Library``.

Each op is a schema plus a CPU and a CUDA kernel and a fake implementation (shapes only), which
torch.compile traces through. ``torch.library.custom_op`` would do the same but costs ~10 ms per op at import (it reads
its caller's source for error messages), which a process's first call pays.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable

import torch

from .mask import INT32_MAX

LIBRARY = torch.library.Library("fgcupy", "DEF")


def define(schema: str, *, cpu: Callable, cuda: Callable, fake: Callable, syncs_host: bool = False) -> None:
    """Define ``fgcupy::<schema>`` with a kernel per device type and its fake implementation.
    ``syncs_host``: the op waits on the host inside, so CUDA graphs must leave it out (tagged
    cudagraph_unsafe where this torch has the tag).
    The kernels run untraced (``_untraced``)."""
    unsafe = getattr(torch.Tag, "cudagraph_unsafe", None)
    name = LIBRARY.define(schema, tags=(unsafe,) if syncs_host and unsafe is not None else ())
    for kernel, key in ((cpu, "CPU"), (cuda, "CUDA")):
        LIBRARY.impl(name, _untraced(kernel), key)
    torch.library.register_fake(f"fgcupy::{name}", fake, lib=LIBRARY)


def _untraced(kernel: Callable) -> Callable:
    """``kernel`` with torch.compile off inside it: a graph that breaks at the op calls it
    eagerly, and dynamo would otherwise trace every frame it enters (the launch code's numpy
    structs among them, which dynamo cannot fake). Where torch._dynamo was never imported nothing
    can be tracing, so importing fgcupy does not import it (about a second)."""
    disabled = []

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return kernel(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(kernel))
        return disabled[0](*args, **kwargs)

    return run


#: A mask's indices start this many int32 entries apart in a packed CSR (128 bytes, so vector
#: loads of the indices stay aligned).
_PACK_ALIGN = 32


def _indices_offset(indptr_numel: int) -> int:
    return -(-indptr_numel // _PACK_ALIGN) * _PACK_ALIGN


def packed_csr_empty(like: torch.Tensor, indptr_shape, kept=None) -> torch.Tensor:
    """The fake of :func:`pack_csr`'s result: int32, room for ``indptr_shape`` and ``kept`` indices
    (None: a count known only when the op runs, an unbacked size)."""
    if kept is None:  # not offset + an unbacked count: min and max must be plain ints, offset may be symbolic
        return like.new_empty((torch.library.get_ctx().new_dynamic_size(max=INT32_MAX),), dtype=torch.int32)
    return like.new_empty((_indices_offset(math.prod(indptr_shape)) + kept,), dtype=torch.int32)


def pack_csr(indptr: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A mask's int32 (indptr, indices) as one tensor. An op whose output size is known only when it
    runs returns this rather than a pair: torch 2.11's inductor passed such a pair, as a tuple, into
    the CUDA graph of the nodes that unpack it (reduce-overhead crashed)."""
    offset = _indices_offset(indptr.numel())
    packed = indptr.new_empty((offset + indices.numel(),))
    packed[: indptr.numel()] = indptr.reshape(-1)
    packed[indptr.numel() : offset] = 0  # the alignment gap: an output is written everywhere
    packed[offset:] = indices
    return packed


def unpack_csr(packed: torch.Tensor, indptr_shape) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr, indices) views of :func:`pack_csr`'s tensor, as an op returned it (its own
    storage from the start). The indices view is made by as_strided, not a slice: torch 2.11's
    inductor failed on a slice from a symbolic start of an unbacked size under dynamic shapes."""
    if not torch.compiler.is_compiling() and (packed.storage_offset() or packed.stride(0) != 1):
        raise ValueError(f"a packed mask is its own storage from the start, one element after another; this one starts "
                         f"{packed.storage_offset()} elements in, at a stride of {packed.stride(0)}")
    numel = math.prod(indptr_shape)
    offset = _indices_offset(numel)
    torch._check(packed.shape[0] >= offset)  # what an unbacked packed size does not say by itself
    return packed[:numel].view(tuple(indptr_shape)), packed.as_strided((packed.shape[0] - offset,), (1,), offset)
