"""fgcupy as torch.library custom ops, so torch.compile(fullgraph=True) and CUDA graphs take it.

``torch.ops.fgcupy.sparse_attention_`` writes attention over a slice mask's CSR into ``out``
(and ``lse``); ``torch.ops.fgcupy.predict_topk`` returns the CSR of a top-k mask, whose sizes
are known from the shapes. Each has a fake (meta) implementation for tracing, a CUDA
implementation (the kernels) and a CPU implementation (the torch reference).
``SparseAttention.run``, ``sparse_attention`` and ``predict_mask`` (top-k) go through them.
"""

from __future__ import annotations

import torch

from .mask import SliceMask, num_blocks

_SPECS: dict = {}  # spec name -> spec (the op takes the name: a custom op argument is a string)


def spec_token(spec) -> str:
    """The name an op call carries for ``spec`` ("" lets the op choose, as plan() would)."""
    if spec is None:
        return ""
    _SPECS[spec.name] = spec
    return spec.name


@torch.library.custom_op("fgcupy::sparse_attention_", mutates_args=("out", "lse"))
def sparse_attention_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor | None,
                      indptr: torch.Tensor, indices: torch.Tensor, order: torch.Tensor | None, slice_m: int,
                      scale: float, spec: str) -> None:
    """Attention of [B, H, S, D] views q over k, v through the mask (indptr, indices) into out
    (and float32 lse [B, H, q_len]); ``order``: the plan's launch order (None: longest first)."""
    raise NotImplementedError(f"fgcupy::sparse_attention_ has no implementation for device {q.device}")


@sparse_attention_.register_fake
def _(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec):
    return None


@sparse_attention_.register_kernel("cpu")
def _(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec):
    from .reference import reference_attention

    mask = SliceMask(indptr, indices, slice_m, q.shape[2], k.shape[2])
    result, row_lse = reference_attention(q, k, v, mask, scale=scale)
    out.copy_(result)
    if lse is not None:
        lse.copy_(row_lse)


@sparse_attention_.register_kernel("cuda")
def _(q, k, v, out, lse, indptr, indices, order, slice_m, scale, spec):
    from . import autotune, bridge
    from .attention_kernel import block_order, check_inputs, launch_attention
    from .jit import get_kernel_on

    mask = SliceMask(indptr, indices, slice_m, q.shape[2], k.shape[2])
    chosen = _SPECS.get(spec) if spec else autotune.planned_spec(mask, q.shape[-1], bridge.dtype_name(q.dtype, "q"))
    if chosen is None:
        raise ValueError(f"unknown kernel spec {spec!r} (plan() registers the specs it chooses)")
    if not spec:
        check_inputs(q, k, v, mask, chosen)
    get_kernel_on(q.device, chosen)
    launch_attention(chosen, q, k, v, out, lse, mask, block_order(mask) if order is None else order, scale)


def static_capacity(batch: int, heads: int, q_blocks: int, kv_len: int, slice_m: int, top_k: int, min_keys: int,
                    max_keys: int | None, local: int | None) -> int:
    """Slices a top-k mask keeps, from the shapes alone (scoring.static_row_counts in Python ints)."""
    cap = kv_len if max_keys is None else min(max_keys, kv_len)
    total = 0
    for j in range(q_blocks):
        band = 0
        if local is not None:
            lo = min(max(j * slice_m - local, 0), kv_len)
            hi = max(min(max((j + 1) * slice_m + local, 0), kv_len), lo)
            band = hi - lo
        low = min(max(band, min_keys), kv_len)
        total += min(max(low, top_k), max(low, cap))
    return batch * heads * total


@torch.library.custom_op("fgcupy::predict_topk", mutates_args=())
def predict_topk(q: torch.Tensor, k: torch.Tensor, slice_m: int, top_k: int, pool: int, exact_band: int,
                 min_keys: int, max_keys: int, local: int, scale: float, half_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(indptr, indices) of a top-k mask predicted from [B, H, S, D] q, k (negative
    exact_band / max_keys / local: off; see fgcupy.predict_mask)."""
    raise NotImplementedError(f"fgcupy::predict_topk has no implementation for device {q.device}")


def _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits):
    from .scoring import make_request

    return make_request(q.shape[3], k.shape[2], slice_m, "topk", top_k=top_k, pool=pool,
                        exact_band=None if exact_band < 0 else exact_band, min_keys=min_keys,
                        max_keys=None if max_keys < 0 else max_keys, local=None if local < 0 else local,
                        scale=scale, logits_dtype=torch.float16 if half_logits else torch.float32)


@predict_topk.register_fake
def _(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits):
    batch, heads, q_len, _ = q.shape
    q_blocks = num_blocks(q_len, slice_m)
    capacity = static_capacity(batch, heads, q_blocks, k.shape[2], slice_m, top_k, min_keys,
                               None if max_keys < 0 else max_keys, None if local < 0 else local)
    return (q.new_empty((batch, heads, q_blocks + 1), dtype=torch.int32),
            q.new_empty((capacity,), dtype=torch.int32))


@predict_topk.register_kernel("cpu")
def _(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits):
    from .scoring import _predict_reference

    mask = _predict_reference(q, k, _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local,
                                             scale, half_logits), None)
    return mask.indptr, mask.indices


@predict_topk.register_kernel("cuda")
def _(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits):
    from .scoring import DEFAULT_WORKSPACE, _GpuPrediction

    req = _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits)
    mask = _GpuPrediction(q, k, req, None, DEFAULT_WORKSPACE).run()
    return mask.indptr, mask.indices
