"""Top-k mask prediction as a torch.library op (``torch.ops.fgcupy.predict_topk``).

A top-k mask's sizes follow from the shapes, so the op has a meta implementation and
torch.compile(fullgraph=True) takes it; the CUDA implementation runs the kernels, the CPU one the
torch reference. :func:`predict` uses the op only while torch.compile traces (see fgcupy.ops).
"""

from __future__ import annotations

import torch

from .gpu_prediction import DEFAULT_WORKSPACE, GpuPrediction, predict_reference, row_counts
from .mask import num_blocks
from .mask_request import make_request
from .op_library import define


def _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits, pooling,
             diagonals):
    return make_request(q.shape[3], k.shape[2], slice_m, "topk", top_k=top_k, pool=pool,
                        exact_band=None if exact_band < 0 else exact_band, min_keys=min_keys,
                        max_keys=None if max_keys < 0 else max_keys, local=None if local < 0 else local,
                        scale=scale, logits_dtype=torch.float16 if half_logits else torch.float32, pooling=pooling,
                        diagonals=tuple(diagonals))


def _predict_meta(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits, pooling,
                  diagonals):
    batch, heads, q_len, _ = q.shape
    q_blocks = num_blocks(q_len, slice_m)
    capacity = batch * heads * sum(row_counts(q_blocks, k.shape[2], slice_m, top_k, min_keys,
                                              None if max_keys < 0 else max_keys, None if local < 0 else local))
    return (q.new_empty((batch, heads, q_blocks + 1), dtype=torch.int32),
            q.new_empty((capacity,), dtype=torch.int32))


@torch.no_grad()  # integer indices out: nothing to differentiate (and reductions into out= refuse grad)
def _predict_cpu(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits, pooling,
                 diagonals):
    mask = predict_reference(q, k, _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local,
                                             scale, half_logits, pooling, diagonals), None)
    return mask.indptr, mask.indices


@torch.no_grad()
def _predict_cuda(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits, pooling,
                  diagonals):
    req = _request(q, k, slice_m, top_k, pool, exact_band, min_keys, max_keys, local, scale, half_logits, pooling,
                   diagonals)
    mask = GpuPrediction(q, k, req, None, DEFAULT_WORKSPACE).run()
    return mask.indptr, mask.indices


# (indptr, indices) of a top-k mask predicted from [B, H, S, D] q, k (negative exact_band /
# max_keys / local: off; see fgcupy.predict_mask).
define("predict_topk(Tensor q, Tensor k, SymInt slice_m, SymInt top_k, SymInt pool, SymInt exact_band, "
       "SymInt min_keys, SymInt max_keys, SymInt local, float scale, bool half_logits, str pooling, "
       "int[] diagonals) -> (Tensor, Tensor)",
       cpu=_predict_cpu, cuda=_predict_cuda, meta=_predict_meta)


def predict(*args) -> tuple:
    """``predict_topk``'s arguments: the op under torch.compile, else its implementation."""
    if torch.compiler.is_compiling():
        return torch.ops.fgcupy.predict_topk(*args)
    return _predict_cuda(*args) if args[0].device.type == "cuda" else _predict_cpu(*args)
