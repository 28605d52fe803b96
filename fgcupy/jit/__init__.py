"""Run-time compilation of fgcupy's CUDA templates (see spec.py, runtime.py, report.py)."""

from .compile import KernelCompileError
from .runtime import get_kernel, get_kernel_on
from .spec import (AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec, all_attention_specs, all_sm90_specs,
                   all_sm90_ws_specs)

__all__ = ["AttentionSpec", "Sm90AttentionSpec", "Sm90WsAttentionSpec", "KernelCompileError", "all_attention_specs",
           "all_sm90_specs", "all_sm90_ws_specs", "get_kernel", "get_kernel_on"]
