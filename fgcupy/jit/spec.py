"""KernelSpec: one compiled specialization of a kernel template, and everything derived from it.

A spec is the single source of truth for a kernel's template arguments: the readable name used
in logs and reports, the C++ name expression handed to NVRTC, the launch shape and the shared
memory it needs all come from here, so the runtime path and the CPU compile checks agree.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

import numpy as np

from .launch import ParamStruct

DTYPES = ("bfloat16", "float16")
#: Head dims of mask prediction and of the first wgmma attention kernel (Sm90AttentionSpec).
HEAD_DIMS = (64, 128)
#: Head dims of attention: the mma.sync kernel (any sm_80+ GPU) and the warp-specialised one.
ATTENTION_HEAD_DIMS = (64, 96, 128, 256)
SLICE_SIZES = (64, 128)
KEY_TILES = (32, 64, 128)
STAGES = (2, 3)
#: Producer warps of the warp-specialised Hopper kernel (its Sm90WsShape::kProducerWarps).
WS_PRODUCER_WARPS = 4
ROWS_PER_WARP = (16, 32)

_CPP_DTYPE = {"bfloat16": "fg::bf16_t", "float16": "fg::fp16_t"}
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16"}

# Opt-in shared memory per block on sm_80 (163 KB) bounds every spec we ship; sm_90 allows 227 KB.
MAX_SMEM_BYTES_SM80 = 163 * 1024


#: The attention kernels' one argument (cuda_src/attn_common.cuh unpacks its fields; the
#: warp-specialised kernel's struct adds tensor maps, below): tensors, the mask's CSR and the
#: launch order, sizes, [B, H, S] element strides of q, k, v, o, and the softmax scale times log2(e).
_ATTN_FIELDS = (
    ("q", "in"), ("k", "in"), ("v", "in"), ("o", "out"), ("lse", "out"),
    ("indptr", "in"), ("indices", "in"), ("order", "in"),
    ("heads", "i32"), ("q_blocks", "i32"), ("q_len", "i32"), ("kv_len", "i32"), ("capacity", "i32"),
    ("q_sb", "i64"), ("q_sh", "i64"), ("q_ss", "i64"), ("k_sb", "i64"), ("k_sh", "i64"), ("k_ss", "i64"),
    ("v_sb", "i64"), ("v_sh", "i64"), ("v_ss", "i64"), ("o_sb", "i64"), ("o_sh", "i64"), ("o_ss", "i64"),
    ("scale_log2", "f32"),
)
ATTN_PARAMS = ParamStruct("AttnParams", _ATTN_FIELDS)
#: The warp-specialised kernel's struct: the same fields, then tensor maps of K and V (rows of
#: the kernel's key tile, 64 columns) for key tiles that are one contiguous run, and whether they
#: are valid (``tma``; 0 where the driver could not encode them: every tile is gathered).
ATTN_TMA_PARAMS = ParamStruct("AttnParams", _ATTN_FIELDS + (("k_map", "tmap"), ("v_map", "tmap"), ("tma", "i32")))


class _AttentionKernelSpec:
    """What both attention specs derive the same way from their template arguments: the readable
    name, the C++ name expression, the launch width and the dynamic shared memory."""

    params = ATTN_PARAMS

    # Subclasses set: source, template, name_prefix, arch, extra_options, _smem_slack, head_dims.
    _smem_slack = 0
    head_dims = HEAD_DIMS

    def _template_args(self) -> tuple:
        raise NotImplementedError

    def _name_suffix(self) -> str:
        raise NotImplementedError

    def _check_common(self, key_tiles) -> None:
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("head_dim", self.head_dim, self.head_dims)
        _check_choice("slice_m", self.slice_m, SLICE_SIZES)
        _check_choice("key_tile", self.key_tile, key_tiles)
        _check_choice("stages", self.stages, STAGES)

    @property
    def name(self) -> str:
        return (
            f"{self.name_prefix}_{_SHORT_DTYPE[self.dtype]}_d{self.head_dim}_m{self.slice_m}"
            f"_n{self.key_tile}_s{self.stages}_{self._name_suffix()}"
        )

    @property
    def name_expression(self) -> str:
        args = ", ".join(str(a) for a in (self.head_dim, self.slice_m, self.key_tile, self.stages, *self._template_args()))
        return f"{self.template}<{_CPP_DTYPE[self.dtype]}, {args}>"

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def row_elems(self) -> int:
        """Elements per row of a tile in shared memory: the head dim rounded up to 64 (the
        swizzle's span; the kernel never touches the columns past the head dim)."""
        return -(-self.head_dim // 64) * 64

    @property
    def smem_bytes(self) -> int:
        """Q tile, K and V stages (2-byte elements), one float bias per key per stage."""
        tile = self.key_tile * self.row_elems
        return (self.slice_m * self.row_elems + 2 * self.stages * tile) * 2 + self.stages * self.key_tile * 4 + self._smem_slack


@dataclass(frozen=True)
class AttentionSpec(_AttentionKernelSpec):
    """Template arguments of ``fg::sparse_attn_fwd`` (mma.sync; any sm_80+ GPU)."""

    dtype: str = "bfloat16"
    head_dim: int = 128
    slice_m: int = 128
    key_tile: int = 64
    stages: int = 2
    rows_per_warp: int = 16

    source = "sparse_attn.cu"
    template = "fg::sparse_attn_fwd"
    name_prefix = "sparse_attn_fwd"
    arch = None  # any sm_80+ target
    extra_options = ()
    head_dims = ATTENTION_HEAD_DIMS

    def __post_init__(self):
        self._check_common(KEY_TILES)
        _check_choice("rows_per_warp", self.rows_per_warp, ROWS_PER_WARP)
        if self.rows_per_warp == 32 and (self.key_tile * self.head_dim > 4096 or self.threads < 128):
            # Two m-tiles per warp double the accumulators: past this ptxas spills (see tests).
            raise ValueError(
                f"rows_per_warp=32 needs key_tile * head_dim <= 4096 and >= 4 warps, got key_tile="
                f"{self.key_tile}, head_dim={self.head_dim}, {self.warps} warps"
            )
        if self.head_dim > 128 and self.key_tile > 32:
            # 128 output accumulators per thread leave room for 32-key score tiles only.
            raise ValueError(f"head_dim={self.head_dim} needs key_tile=32 (larger tiles spill), got {self.key_tile}")
        rows_per_pass = self.threads // (self.row_elems // 8)
        if self.key_tile % rows_per_pass:
            raise ValueError(
                f"key_tile={self.key_tile} must be a multiple of {rows_per_pass} "
                f"for slice_m={self.slice_m}, head_dim={self.head_dim}"
            )

    def _template_args(self) -> tuple:
        return (self.rows_per_warp // 16,)

    def _name_suffix(self) -> str:
        return f"w{self.warps}"

    @property
    def warps(self) -> int:
        return self.slice_m // self.rows_per_warp


@dataclass(frozen=True)
class Sm90AttentionSpec(_AttentionKernelSpec):
    """Template arguments of ``fg::sparse_attn_fwd_sm90`` (wgmma; needs an sm_90a target).

    ``pv`` picks how O += P V runs: 0 = mma.sync with ldmatrix.trans, 1 = wgmma reading V as
    an MN-major operand (faster; see the kernel source).
    """

    dtype: str = "bfloat16"
    head_dim: int = 128
    slice_m: int = 128
    key_tile: int = 64
    stages: int = 2
    pv: int = 1
    ctas_per_sm: int = 1

    source = "sparse_attn_sm90.cu"
    template = "fg::sparse_attn_fwd_sm90"
    name_prefix = "sparse_attn_fwd_sm90"
    arch = "sm_90a"
    extra_options = ("-arch=sm_90a",)
    rows_per_warp = 16
    _smem_slack = 1024  # the kernel aligns its tiles to 1024 bytes (128-byte swizzle atoms)

    def __post_init__(self):
        self._check_common((64, 128))
        _check_choice("pv", self.pv, (0, 1))
        _check_choice("ctas_per_sm", self.ctas_per_sm, (1, 2))
        if self.ctas_per_sm == 2 and (
            self.key_tile != 64 or self.pv != 1 or 2 * self.smem_bytes > MAX_SMEM_BYTES_SM90_PER_SM
        ):
            # Two CTAs per SM cap registers at 128 per thread: only 64-key tiles with the wgmma
            # P V path fit without spills (see tests/test_compile.py).
            raise ValueError(
                f"ctas_per_sm=2 needs key_tile=64, pv=1 and two CTAs' shared memory "
                f"({2 * self.smem_bytes} B) within {MAX_SMEM_BYTES_SM90_PER_SM} B; got "
                f"key_tile={self.key_tile}, pv={self.pv}"
            )

    def _template_args(self) -> tuple:
        return (self.pv, self.ctas_per_sm)

    def _name_suffix(self) -> str:
        return f"pv{self.pv}_c{self.ctas_per_sm}"

    @property
    def warps(self) -> int:
        return self.slice_m // 16


@dataclass(frozen=True)
class Sm90WsAttentionSpec(_AttentionKernelSpec):
    """Template arguments of ``fg::sparse_attn_fwd_sm90_ws`` (warp-specialised wgmma; sm_90a).

    One producer warpgroup gathers K/V into ``stages`` buffers signalled by mbarriers; one
    consumer warpgroup per 64 query rows overlaps its softmax with its P V product, and with
    ``pingpong`` the two consumers of a 128-query slice take turns on the tensor cores.
    """

    dtype: str = "bfloat16"
    head_dim: int = 128
    slice_m: int = 128
    key_tile: int = 128
    stages: int = 2
    pingpong: int = 1

    source = "sparse_attn_sm90_ws.cu"
    template = "fg::sparse_attn_fwd_sm90_ws"
    name_prefix = "sparse_attn_fwd_sm90ws"
    arch = "sm_90a"
    extra_options = ("-arch=sm_90a",)
    head_dims = ATTENTION_HEAD_DIMS  # 96 runs in 128-wide tiles, the padding zero-filled
    params = ATTN_TMA_PARAMS

    def __post_init__(self):
        self._check_common((64, 128))
        _check_choice("pingpong", self.pingpong, (0, 1))
        if self.head_dim > 128 and self.key_tile != 64:
            # 128 output accumulators per consumer thread leave room for 64-key score tiles only.
            raise ValueError(f"head_dim={self.head_dim} needs key_tile=64 (larger tiles spill), got {self.key_tile}")
        if self.pingpong and self.slice_m != 128:
            raise ValueError(f"pingpong=1 needs two consumer warpgroups (slice_m=128), got slice_m={self.slice_m}")

    def _template_args(self) -> tuple:
        return (self.pingpong,)

    def _name_suffix(self) -> str:
        return f"pp{self.pingpong}"

    @property
    def warps(self) -> int:
        return (self.slice_m // 64 + 1) * 4

    @property
    def _smem_slack(self) -> int:
        """1024 bytes to align the tiles (128-byte swizzle atoms), four mbarriers and one
        unmasked-flag word per producer warp per stage."""
        return 1024 + 4 * 8 * self.stages + 4 * WS_PRODUCER_WARPS * self.stages


#: The attention kernels' spec classes by name (tune files and op arguments name them).
ATTENTION_SPEC_CLASSES = {cls.__name__: cls for cls in (AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec)}


def spec_token(spec) -> str:
    """``spec`` as a string that :func:`spec_from_token` rebuilds alone (a custom op's
    argument: a string, read in whatever process or graph the op runs)."""
    fields = ",".join(f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec))
    return f"{type(spec).__name__}({fields})"


@functools.lru_cache(maxsize=256)
def spec_from_token(token: str):
    """The spec ``spec_token`` wrote; ValueError for anything else."""
    name, _, rest = token.partition("(")
    cls = ATTENTION_SPEC_CLASSES.get(name)
    if cls is None or not rest.endswith(")"):
        raise ValueError(f"not a kernel spec token: {token!r}")
    fields = {}
    for item in filter(None, rest[:-1].split(",")):
        key, _, value = item.partition("=")
        fields[key] = int(value) if value.lstrip("-").isdigit() else value
    try:
        return cls(**fields)
    except TypeError as err:
        raise ValueError(f"not a kernel spec token: {token!r} ({err})") from None


def all_attention_specs() -> list[AttentionSpec]:
    """Every specialization fgcupy ships (and the CPU tests compile)."""
    return _shipped(AttentionSpec, MAX_SMEM_BYTES_SM80, KEY_TILES, STAGES, ROWS_PER_WARP)


MAX_SMEM_BYTES_SM90 = 227 * 1024
MAX_SMEM_BYTES_SM90_PER_SM = 228 * 1024 - 2 * 1024  # two CTAs, 1 KB reserved by the driver each


def all_sm90_specs() -> list[Sm90AttentionSpec]:
    """Every wgmma specialization fgcupy ships for Hopper (sm_90a)."""
    return _shipped(Sm90AttentionSpec, MAX_SMEM_BYTES_SM90, (64, 128), STAGES, (0, 1), (1, 2))


def all_sm90_ws_specs() -> list[Sm90WsAttentionSpec]:
    """Every warp-specialised wgmma specialization fgcupy ships for Hopper (sm_90a)."""
    return _shipped(Sm90WsAttentionSpec, MAX_SMEM_BYTES_SM90, (64, 128), STAGES, (0, 1))


def _shipped(spec_class, smem_limit: int, *axes) -> list:
    """Every valid ``spec_class(dtype, head_dim, slice_m, *rest)`` over the product of the
    shipped dtypes, head dims and slice sizes with ``axes``, within ``smem_limit`` bytes."""
    specs = []
    for args in itertools.product(DTYPES, spec_class.head_dims, SLICE_SIZES, *axes):
        try:
            spec = spec_class(*args)
        except ValueError:
            continue
        if spec.smem_bytes <= smem_limit:
            specs.append(spec)
    return specs


def _check_choice(what, value, allowed):
    """``value`` must be one of ``allowed`` and of its kind (an int, numpy's included, for
    numbers; never a bool or a float that happens to be equal)."""
    if isinstance(allowed[0], int):
        kind_ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    else:
        kind_ok = type(value) is type(allowed[0])
    if value not in allowed or not kind_ok:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
