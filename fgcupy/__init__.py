"""fgcupy: fine-grained (M x 1 slice) sparse attention for video diffusion transformers."""

from .attention import SparseAttention, sparse_attention
from .jit import AttentionSpec, KernelCompileError
from .mask import SliceMask
from .reference import dense_attention, reference_attention, relative_l2

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "KernelCompileError",
    "SliceMask",
    "SparseAttention",
    "dense_attention",
    "reference_attention",
    "relative_l2",
    "sparse_attention",
]
