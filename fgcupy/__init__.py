"""fgcupy: fine-grained (M x 1 slice) sparse attention for video diffusion transformers."""

from .attention import SparseAttention, sparse_attention
from .cache import MaskCache, mask_drift
from .jit import AttentionSpec, KernelCompileError
from .local_search import union_keys  # registers torch.ops.fgcupy.union_keys, which graphs may name
from .mask import SliceMask
from .reference import dense_attention, reference_attention, relative_l2
from .scoring import predict_mask

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
    "predict_mask",
    "reference_attention",
    "relative_l2",
    "sequence_parallel_attention",
    "sparse_attention",
    "union_keys",
    "workloads",
]

_LAZY = {"SequenceParallelAttention": "distributed", "sequence_parallel_attention": "distributed",
         "HybridSequenceParallelAttention": "ring", "find_diagonals": "diagonals"}


#: Modules the documentation reaches as ``fgcupy.<name>`` after ``import fgcupy``.
_SUBMODULES = ("workloads", "calibration", "head_families", "oracle", "distributed", "local_search", "diagonals")


def __getattr__(name):
    """Entry points that a first attention call does not need load on first use: sequence
    parallelism (it pulls in torch.distributed), the diagonal finder, and the modules of
    _SUBMODULES."""
    import importlib

    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
