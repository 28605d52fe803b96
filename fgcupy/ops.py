"""Attention as a torch.library custom op, so torch.compile(fullgraph=True) and CUDA graphs take it.

``torch.ops.fgcupy.sparse_attention_`` writes attention over a slice mask's CSR into ``out``
(and ``lse``), with a fake (meta) implementation for tracing, a CUDA implementation (the
kernels) and a CPU implementation (the torch reference); ``predict_op`` does the same for
mask prediction. ``SparseAttention.run`` and ``sparse_attention`` call :func:`attend`,
which uses the op while torch.compile traces and the implementation directly otherwise (an
eager op call imports torch._dynamo: a second of a process's first call).
"""

from __future__ import annotations

import torch

from .jit.spec import spec_from_token
from .jit.spec import spec_token as _spec_token
from .mask import SliceMask
from .op_library import define


#: Marks a token whose spec was chosen for the caller (not named by it): while its Hopper kernel
#: compiles for the first time, the portable kernel may stand in (attention_kernel.runnable_spec).
AUTO_MARK = "~"


def spec_token(spec, chosen_for_caller: bool = False) -> str:
    """The string an op call carries for ``spec`` ("" lets the op choose, as plan() would);
    ``chosen_for_caller``: plan() picked it (the default or the tuned kernel), so a stand-in may
    run until it is compiled."""
    if spec is None:
        return ""
    return (AUTO_MARK if chosen_for_caller else "") + _spec_token(spec)


def _chosen_spec(token: str):
    """(the spec of an op's token or None, whether it was chosen for the caller)."""
    if not token:
        return None, True
    auto = token.startswith(AUTO_MARK)
    return spec_from_token(token[len(AUTO_MARK):] if auto else token), auto


def _attention_fake(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec):
    return None


def _attention_cpu(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec):
    """The reference; it checks what the kernels' launch checks (a graph or a direct op call
    reaches it with no other check)."""
    from .attention_kernel import check_inputs, check_order, check_outputs, check_scale
    from .reference import reference_attention

    chosen = _chosen_spec(spec)[0]  # a token the CUDA kernel could not read fails here too
    mask = SliceMask(indptr, indices, slice_m, q.shape[2], k.shape[2])
    check_inputs(q, k, v, mask, chosen)
    check_outputs(q, k, v, out, lse)
    check_scale(scale)
    if order is not None:  # the reference has no launch order, but a graph run on a GPU reads it
        check_order(order, q.shape[0] * q.shape[1] * mask.q_blocks, q.device)
    precision = torch.float64 if q.dtype == torch.float64 else torch.float32
    result, row_lse = reference_attention(q, k, v, mask, scale=scale, dtype=precision)
    out.copy_(result)
    if lse is not None:
        lse.copy_(row_lse)


def _attention_cuda(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec, checked: bool = False):
    """The kernels; ``checked``: the caller (``_attend``) has checked q, k, v against the mask and
    spec already (the op, called from a graph or directly, checks them here)."""
    from . import autotune, bridge
    from .attention_kernel import (block_order, check_forward_only, check_inputs, launch_attention, load_kernels,
                                   runnable_spec)

    mask = SliceMask(indptr, indices, slice_m, q.shape[2], k.shape[2])
    chosen, auto = _chosen_spec(spec)
    if chosen is None:
        chosen = autotune.planned_spec(mask, q.shape[-1], bridge.dtype_name(q.dtype, "q"))
    if not checked:
        check_forward_only(q, k, v)  # the kernel's out has no gradient: refused, not silently missing
        check_inputs(q, k, v, mask, chosen, planned=bool(spec))
    if auto:
        chosen = runnable_spec(q.device, chosen)
    if order is None:
        load_kernels(q.device, chosen)
        order = block_order(mask)
    launch_attention(chosen, q, k, v, out, lse, mask, order, scale)


# Attention of [B, H, S, D] views q over k, v through the mask (indptr, indices) into out (and
# float32 lse [B, H, q_len]); order: the plan's launch order (None: longest first).
define("sparse_attention_(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!)? lse, Tensor indptr, "
       "Tensor indices, Tensor? order, SymInt slice_m, float scale, str spec) -> ()",
       cpu=_attention_cpu, cuda=_attention_cuda, fake=_attention_fake)


def attend(*args) -> None:
    """``sparse_attention_``'s arguments: the op under torch.compile, else its implementation."""
    if torch.compiler.is_compiling() or args[0].device.type == "meta":  # meta: shapes only, no memory to check
        torch.ops.fgcupy.sparse_attention_(*args)
    elif args[0].device.type == "cuda":
        _attention_cuda(*args, checked=True)
    else:
        _attention_cpu(*args)
