"""fgcupy: fine-grained (M x 1 slice) sparse attention for video diffusion transformers."""

from . import predict_op as _predict_op  # noqa: F401 - registers torch.ops.fgcupy.predict_mask, which graphs may name
from .attention import SparseAttention, sparse_attention
from .jit import AttentionSpec, KernelCompileError
from .local_search import union_keys  # registers torch.ops.fgcupy.union_keys
from .mask import SliceMask

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "HybridSequenceParallelAttention",
    "SequenceParallelAttention",
    "KernelCompileError",
    "MaskCache",
    "SliceMask",
    "SparseAttention",
    "dense_attention",
    "find_diagonals",
    "mask_drift",
    "mask_recall",
    "predict_mask",
    "reference_attention",
    "relative_l2",
    "sequence_parallel_attention",
    "sparse_attention",
    "union_keys",
    "workloads",
]

_LAZY = {"SequenceParallelAttention": "distributed", "sequence_parallel_attention": "distributed",
         "HybridSequenceParallelAttention": "ring", "find_diagonals": "diagonals", "MaskCache": "cache",
         "mask_drift": "cache", "mask_recall": "cache", "predict_mask": "scoring", "dense_attention": "reference",
         "reference_attention": "reference", "relative_l2": "reference"}


#: Modules the documentation reaches as ``fgcupy.<name>`` after ``import fgcupy``.
_SUBMODULES = ("workloads", "calibration", "head_families", "oracle", "distributed", "local_search", "diagonals", "cache",
               "scoring", "reference", "gpu_prediction", "lse_estimate", "mask_kernels", "timing")


def __getattr__(name):
    """Entry points that a first attention call does not need load on first use: mask prediction
    and caching, the references, sequence parallelism (it pulls in torch.distributed), the
    diagonal finder, and the modules of _SUBMODULES."""
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
