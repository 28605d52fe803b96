"""Specs of the kernels that round q and k to e4m3 for the Hopper max-probability pass
(cuda_src/e4m3_convert.cu): each head's largest sum of squares of a row, then the rounding."""

from __future__ import annotations

from dataclasses import dataclass

from ..e4m3 import E4M3_MAX, E4M3_NONFINITE_CLAMP, E4M3_ROW_SUMSQ
from .launch import ParamStruct
from .score_spec import E4M3_HEAD_DIMS
from .spec import _CPP_DTYPE, DTYPES
from .spec import _check_choice as check_choice

CONVERT_THREADS = 256
#: 16-byte vectors each thread of a conversion kernel loads before it uses any.
CONVERT_UNROLL = 4
CONVERT_CONSTANTS = {"kConvertThreads": CONVERT_THREADS, "kConvertUnroll": CONVERT_UNROLL,
                     "kE4m3Max": int(E4M3_MAX), "kE4m3RowSumsq": int(E4M3_ROW_SUMSQ),
                     "kE4m3NonfiniteClamp": int(E4M3_NONFINITE_CLAMP)}
#: Element strides of the input's batch, head and row (its D values contiguous), the heads per
#: batch entry, the first head (batch-major) and the rows of each.
_INPUT_FIELDS = (("x", "in"), ("stride_b", "i64"), ("stride_h", "i64"), ("stride_s", "i64"),
                 ("heads", "i32"), ("bh0", "i32"), ("rows", "i32"))
#: fg::e4m3_sumsq: raises sumsq (float64 [nbh], zeroed) to each head's largest sum of squares of
#: a row.
E4M3_SUMSQ_PARAMS = ParamStruct("E4m3SumsqParams", _INPUT_FIELDS + (("sumsq", "out"),))
#: fg::e4m3_round: each head's power of two from sumsq (as e4m3_sumsq left it) into scale
#: (float32 [nbh], fgcupy.e4m3.scales_for), the head times it into out (e4m3 [nbh, rows, D]).
E4M3_ROUND_PARAMS = ParamStruct("E4m3RoundParams", _INPUT_FIELDS + (("sumsq", "in"), ("scale", "out"),
                                                                    ("out", "out")))
E4M3_STEPS = {"sumsq": E4M3_SUMSQ_PARAMS, "round": E4M3_ROUND_PARAMS}


@dataclass(frozen=True)
class E4m3ConvertSpec:
    """``fg::e4m3_sumsq<T, D>`` or ``fg::e4m3_round<T, D>`` (``step``) on 16-bit inputs of
    ``dtype``. Compiled for sm_90: the e4m3 conversion instruction needs sm_89 or later, and only
    Hopper's pass reads e4m3."""

    dtype: str = "bfloat16"
    head_dim: int = 128
    step: str = "sumsq"

    source = "e4m3_convert.cu"
    arch = "sm_90"
    threads = CONVERT_THREADS
    constants = CONVERT_CONSTANTS
    extra_options = ()
    smem_bytes = 0

    def __post_init__(self):
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("head_dim", self.head_dim, E4M3_HEAD_DIMS)
        check_choice("step", self.step, tuple(E4M3_STEPS))

    @property
    def template(self) -> str:
        return f"fg::e4m3_{self.step}"

    @property
    def params(self) -> ParamStruct:
        return E4M3_STEPS[self.step]

    @property
    def shared_params(self) -> tuple:
        return tuple(p for p in E4M3_STEPS.values() if p is not self.params)

    @property
    def name(self) -> str:
        return f"e4m3_{self.step}_{'bf16' if self.dtype == 'bfloat16' else 'fp16'}_d{self.head_dim}"

    @property
    def name_expression(self) -> str:
        return f"{self.template}<{_CPP_DTYPE[self.dtype]}, {self.head_dim}>"

    @staticmethod
    def grid(rows: int, head_dim: int, heads: int) -> tuple:
        """One CTA per CONVERT_THREADS x CONVERT_UNROLL vectors of a head, a row of CTAs per head."""
        vectors = rows * head_dim // 8
        return (-(-vectors // (CONVERT_THREADS * CONVERT_UNROLL)), heads)


def all_e4m3_convert_specs() -> list:
    """Every conversion specialization fgcupy ships (compiled for sm_90)."""
    return [E4m3ConvertSpec(dtype, d, step) for dtype in DTYPES for d in E4M3_HEAD_DIMS for step in E4M3_STEPS]
