"""Specs of the mask-prediction kernels (scoring in mask_score.cu, selection in mask_select.cu).

Like AttentionSpec, each spec is the single source of the template arguments, the readable
name, the launch shape and the shared memory, so the runtime path (jit.get_kernel) and the
no-GPU compile checks (jit.report.compile_report) build the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..e4m3 import E4M3_ROW_SUMSQ
from .launch import ParamStruct
from .plain_spec import PlainKernelSpec
from .spec import DTYPES, HEAD_DIMS
from .spec import _check_choice as check_choice

#: Rows and keys as float8 e4m3 (the Hopper max-probability pass only, at twice the bfloat16
#: tensor rate): its mode and head dims (a row of 128 bytes or more fills the 128-byte swizzle).
E4M3 = "float8_e4m3"
E4M3_MODES = ("maxprob",)
E4M3_HEAD_DIMS = (128,)

_CPP_DTYPE = {"bfloat16": "fg::bf16_t", "float16": "fg::fp16_t", E4M3: "fg::e4m3_t"}
_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", E4M3: "e4m3"}

#: Scoring modes (template MODE of fg::mask_score).
#: "listmax" is "maxprob" over each query block's own list of keys (a SliceMask's CSR).
SCORE_MODES = {"logits": 0, "stats": 1, "maxprob": 2, "logits_f16": 3, "band": 4, "listmax": 5}
#: The modes of the portable (mma.sync) kernel mask_score.cu; "band" is the wgmma kernel's only,
#: "listmax" (and "maxprob" with groups of a whole block) the portable column-max kernel's.
PORTABLE_SCORE_MODES = tuple(m for m in SCORE_MODES if m not in ("band", "listmax"))
#: The modes of the portable column-max kernel (mask_colmax.cu): a whole query block a CTA.
COLMAX_MODES = ("maxprob", "listmax")
SCORE_KEY_TILE = 64
#: The Hopper scoring kernel (mask_score_sm90.cu): resident rows per CTA and keys per tile.
SM90_SCORE_ROWS = 128
SM90_SCORE_KEY_TILE = 128
SM90_SCORE_MODES = ("stats", "maxprob", "band", "listmax")
#: Row groups of the Hopper max-probability pass (its template GROUP): powers of two to 128.
SM90_SCORE_GROUPS = (2, 4, 8, 16, 32, 64, 128)
_SM90_GROUPS = {"stats": (1,), "maxprob": SM90_SCORE_GROUPS, "band": (SM90_SCORE_ROWS,), "listmax": (SM90_SCORE_ROWS,)}
#: Selection rules (fg::select_rows' rule argument).
RULE_IDS = {"topk": 0, "tau": 1, "threshold": 2}
#: Selection kernels: one taking any rule at launch, one compiled for top-k alone.
SELECT_RULES = ("any", "topk")
SCORE_WARPS = (4, 8)
#: fg::mask_score's one argument (see cuda_src/mask_score.cu for what each field means).
SCORE_PARAMS = ParamStruct("ScoreParams", (
    ("rows", "in"), ("r_sb", "i64"), ("r_sh", "i64"), ("r_ss", "i64"),
    ("k", "in"), ("k_sb", "i64"), ("k_sh", "i64"), ("k_ss", "i64"),
    ("out", "out"), ("out_ld", "i64"), ("partial", "out"), ("partial_sq", "out"), ("lse", "in"),
    ("heads", "i32"), ("bh0", "i32"), ("n_rows", "i32"), ("kv_len", "i32"), ("key_chunk", "i32"),
    ("group", "i32"), ("out_rows", "i32"), ("band_lo", "i32"), ("band_width", "i32"),
    ("scale", "f32"), ("scale_log2", "f32"), ("list_indptr", "in"), ("list_indices", "in"), ("head_scale", "in"),
    ("skip_ranges", "in"), ("skip_block", "i32"),
))

#: Selection kernel constants (written ahead of mask_select.cu as C++ constants: SELECT_CONSTANTS).
SELECT_THREADS = 512
SELECT_BINS = 2048
SELECT_CANDIDATES = 2048
#: Fixed dynamic shared memory of the selection kernel: histogram counts and masses (two 32-bit
#: words a bin), candidates (key and index).
SELECT_FIXED_SMEM = SELECT_BINS * 12 + SELECT_CANDIDATES * 8
#: Staged bytes per key: its 16-bit coarse bin.
SELECT_STAGED_BYTES = 2
#: Dynamic shared memory cap of the staged selection kernel: sm_80 allows 163 KB per block,
#: static shared memory included (about 200 bytes here), so stay a little below.
SELECT_MAX_SMEM = 162 * 1024
#: The cap where the GPU grants it (sm_90: 227 KB per block): staged rows up to 81,920 keys.
SELECT_LARGE_SMEM = 226 * 1024
EMIT_THREADS = 256
#: The C++ constants each mask kernel source is compiled with (source.kernel_source writes them).
SCORE_CONSTANTS = {"kScoreKeyTile": SCORE_KEY_TILE, "kSm90ScoreRows": SM90_SCORE_ROWS,
                   "kSm90ScoreKeyTile": SM90_SCORE_KEY_TILE, "kE4m3RowSumsq": int(E4M3_ROW_SUMSQ),
                   **{f"kMode_{m}": v for m, v in SCORE_MODES.items()}}
SELECT_CONSTANTS = {"kSelThreads": SELECT_THREADS, "kBins": SELECT_BINS, "kCand": SELECT_CANDIDATES,
                    "kEmitThreads": EMIT_THREADS, "kStagedBytes": SELECT_STAGED_BYTES,
                    **{f"kRule_{r}": v for r, v in RULE_IDS.items()}}
#: fg::select_rows' one argument (see cuda_src/mask_select.cu).
SELECT_PARAMS = ParamStruct("SelectParams", (
    ("vals", "in"), ("ld", "i64"), ("lse", "in"), ("counts", "out"), ("offsets", "in"), ("out", "out"),
    ("bits", "out"), ("kv_len", "i32"), ("rows_per_bh", "i32"), ("slice_m", "i32"), ("band", "i32"),
    ("rule", "i32"), ("k_keys", "i32"), ("tau", "f32"), ("thr", "f32"), ("min_keys", "i32"),
    ("max_keys", "i32"), ("words", "i32"),
))
#: fg::emit_rows' one argument.
EMIT_PARAMS = ParamStruct("EmitParams", (
    ("bits", "in"), ("counts", "out"), ("offsets", "in"), ("out", "out"), ("words", "i32"), ("kv_len", "i32"),
    ("sub_rows", "i32"), ("out_rows", "i32"), ("group", "i32"), ("slice_m", "i32"), ("add_band", "i32"),
))
#: The sliding-max kernel (mask_dilate.cu): keys per CTA, outputs per thread, largest radius.
DILATE_RUN = 16
DILATE_THREADS = 256
DILATE_TILE = DILATE_RUN * DILATE_THREADS
DILATE_MAX_RADIUS = 64
DILATE_CONSTANTS = {"kDilateTile": DILATE_TILE, "kDilateRun": DILATE_RUN, "kDilateThreads": DILATE_THREADS,
                    "kDilateMaxRadius": DILATE_MAX_RADIUS}
#: fg::dilate_rows' one argument.
DILATE_PARAMS = ParamStruct("DilateParams", (
    ("src", "in"), ("mul", "in"), ("dst", "out"), ("ld", "i32"), ("kv_len", "i32"), ("radius", "i32"),
))
#: fg::dilate_rows_in_place's one argument (flags: one bool per row).
DILATE_IN_PLACE_PARAMS = ParamStruct("DilateInPlaceParams", (
    ("scores", "out"), ("flags", "in"), ("ld", "i32"), ("kv_len", "i32"), ("radius", "i32"),
))
#: fg::adaptive_rows (adaptive_rows.cu): threads per CTA, the most sub-blocks per block and the
#: largest head dim it holds in shared memory, and its one argument.
ROWS_THREADS = 256
ROWS_MAX_GROUPS = 8
ROWS_MAX_DIM = 256
ADAPTIVE_ROWS_PARAMS = ParamStruct("AdaptiveRowsParams", (
    ("q", "in"), ("rows", "out"), ("sampled", "out"), ("stride_b", "i64"), ("stride_h", "i64"), ("stride_s", "i64"),
    ("heads", "i32"), ("q_len", "i32"), ("dim", "i32"), ("slice_m", "i32"), ("pool", "i32"), ("is_bf16", "i32"),
    ("cut", "f32"),
))
#: fg::union_rows (mask_union.cu): threads per CTA, offsets per union, and its one argument.
#: Its two rows of key bits sit in dynamic shared memory within the 48 KB every GPU grants
#: without opting in: rows up to UNION_MAX_WORDS * 32 keys.
UNION_THREADS = 256
UNION_MAX_OFFSETS = 8
UNION_MAX_WORDS = 6016
UNION_PARAMS = ParamStruct("UnionParams", (
    ("indptr", "in"), ("indices", "in"), ("extra_indptr", "in"), ("extra_indices", "in"), ("counts", "out"),
    ("offsets", "in"), ("out", "out"), ("capacity", "i32"), ("extra_capacity", "i32"), ("q_blocks", "i32"),
    ("kv_len", "i32"), ("words", "i32"), ("n_offsets", "i32"),
    *((f"offset{i}", "i32") for i in range(UNION_MAX_OFFSETS)),
))
#: fg::pack_rows (mask_union.cu): each row's keys as a bit map in global memory, its count of
#: keys; one row of bits in shared memory: rows up to PACK_MAX_WORDS * 32 keys.
PACK_MAX_WORDS = 2 * UNION_MAX_WORDS
PACK_PARAMS = ParamStruct("PackParams", (
    ("indptr", "in"), ("indices", "in"), ("bits", "out"), ("counts", "out"), ("capacity", "i32"), ("q_blocks", "i32"),
    ("kv_len", "i32"), ("words", "i32"),
))
#: Score-row storage the selection kernel reads (template S of fg::select_rows): float32 or
#: float16 logits, bfloat16 max-probability scores (what the "maxprob" and "band" modes write).
SELECT_SCORES = {"float32": "fg::F32Scores", "float16": "fg::F16Scores", "bfloat16": "fg::BF16Scores"}
_SELECT_SUFFIX = {"float32": "", "float16": "_f16", "bfloat16": "_bf16"}


def _check_choice(what, value, allowed):
    """spec._check_choice over any collection of choices (a dict's keys included)."""
    check_choice(what, value, tuple(allowed))


@dataclass(frozen=True)
class ScoreSpec:
    """``fg::mask_score<T, D, MODE, WARPS>``: rows x keys scores on tensor cores."""

    dtype: str = "bfloat16"
    head_dim: int = 128
    mode: str = "logits"
    warps: int = 4

    source = "mask_score.cu"
    template = "fg::mask_score"
    modes = PORTABLE_SCORE_MODES
    extra_options = ()
    params = SCORE_PARAMS
    constants = SCORE_CONSTANTS

    def __post_init__(self):
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("head_dim", self.head_dim, HEAD_DIMS)
        _check_choice("mode", self.mode, self.modes)
        _check_choice("warps", self.warps, SCORE_WARPS)

    @property
    def name(self) -> str:
        kernel = self.template.rsplit("::", 1)[-1]
        return f"{kernel}_{self.mode}_{_SHORT_DTYPE[self.dtype]}_d{self.head_dim}_w{self.warps}"

    @property
    def name_expression(self) -> str:
        return f"{self.template}<{_CPP_DTYPE[self.dtype]}, {self.head_dim}, {SCORE_MODES[self.mode]}, {self.warps}>"

    key_tile = SCORE_KEY_TILE

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def rows_per_cta(self) -> int:
        return self.warps * 16

    @staticmethod
    def grid(chunks: int, row_tiles: int, heads: int) -> tuple:
        return (chunks, row_tiles, heads)

    @property
    def smem_bytes(self) -> int:
        tiles = (self.rows_per_cta + 2 * SCORE_KEY_TILE) * self.head_dim * 2
        return tiles + (self.warps * SCORE_KEY_TILE * 4 if self.mode == "maxprob" else 0)


@dataclass(frozen=True)
class ColmaxSpec(ScoreSpec):
    """``fg::mask_colmax<T, D, MODE, WARPS>``: the exact column max of whole query blocks of
    WARPS x 16 rows on mma.sync, keys as the A operand (tiles of WARPS x 16 keys); "maxprob" over
    a key range or band, "listmax" over each block's list."""

    mode: str = "maxprob"
    warps: int = 8

    source = "mask_colmax.cu"
    template = "fg::mask_colmax"
    modes = COLMAX_MODES

    @property
    def key_tile(self) -> int:
        return self.warps * 16

    @property
    def smem_bytes(self) -> int:
        """The block's rows, two key stages (2 bytes an element) and the rows' lse."""
        return (self.rows_per_cta + 2 * self.key_tile) * self.head_dim * 2 + self.rows_per_cta * 4


@dataclass(frozen=True)
class Sm90ScoreSpec:
    """``fg::mask_score_sm90<T, D, MODE, GROUP>``: the stats and maxprob modes on wgmma (sm_90a),
    128 rows per CTA, 128-key tiles, two CTAs per SM. Its grid puts row tiles first (``grid``).
    ``group``: rows per max-probability group (one of SM90_SCORE_GROUPS), compiled in; stats
    takes 1 (the default), "band" (an exact band's stats and max-probability passes in one
    launch, groups of a whole row tile) 128."""

    dtype: str = "bfloat16"
    head_dim: int = 128
    mode: str = "stats"
    group: int = 1

    source = "mask_score_sm90.cu"
    template = "fg::mask_score_sm90"
    arch = "sm_90a"
    extra_options = ("-arch=sm_90a",)
    params = SCORE_PARAMS
    constants = SCORE_CONSTANTS
    threads = 256
    rows_per_cta = SM90_SCORE_ROWS
    key_tile = SM90_SCORE_KEY_TILE

    def __post_init__(self):
        _check_choice("dtype", self.dtype, DTYPES + (E4M3,))
        _check_choice("head_dim", self.head_dim, E4M3_HEAD_DIMS if self.dtype == E4M3 else HEAD_DIMS)
        _check_choice("mode", self.mode, E4M3_MODES if self.dtype == E4M3 else SM90_SCORE_MODES)
        _check_choice(f"group of mode {self.mode!r}", self.group, _SM90_GROUPS[self.mode])

    @property
    def name(self) -> str:
        group = f"_g{self.group}" if self.mode == "maxprob" else ""  # band, listmax: always 128
        return f"mask_score_sm90_{self.mode}{group}_{_SHORT_DTYPE[self.dtype]}_d{self.head_dim}"

    @property
    def name_expression(self) -> str:
        return (f"{self.template}<{_CPP_DTYPE[self.dtype]}, {self.head_dim}, {SCORE_MODES[self.mode]}, "
                f"{self.group}>")

    @property
    def smem_bytes(self) -> int:
        """Resident rows, two key stages, the rows' lse and 1 KB to align the swizzled tiles."""
        itemsize = 1 if self.dtype == E4M3 else 2
        return (SM90_SCORE_ROWS + 2 * SM90_SCORE_KEY_TILE) * self.head_dim * itemsize + SM90_SCORE_ROWS * 4 + 1024

    @staticmethod
    def grid(chunks: int, row_tiles: int, heads: int) -> tuple:
        return (row_tiles, chunks, heads)


def staged_bytes(row_stride: int) -> int:
    """Shared memory of the staged bins: every thread owns a whole number of 32-key words
    (keys_per_thread in mask_select.cu), so the array covers SELECT_THREADS of those."""
    keys = -(-row_stride // SELECT_THREADS)  # ceiling division
    per_thread = -(-keys // 32) * 32
    return SELECT_THREADS * per_thread * SELECT_STAGED_BYTES


@dataclass(frozen=True)
class SelectSpec:
    """``fg::select_rows<STAGED, S, RULE>``: per-row threshold search (and optional emit). The
    staged variant keeps every key's 16-bit coarse bin in shared memory after one read of the
    row; the other re-reads the row from global memory on every pass (rows too long to stage).
    ``scores``: the dtype of the score rows (float16 only holds logits, bfloat16 only
    max-probability scores). ``rule``: "any" (the rule a launch passes) or "topk" (compiled in:
    top-k alone compiles in about a fifth of the time, which a cold first prediction waits for)."""

    staged: bool = True
    scores: str = "float32"
    max_smem: int = SELECT_MAX_SMEM  # dynamic shared memory the staged kernel may ask for
    rule: str = "any"

    source = "mask_select.cu"
    template = "fg::select_rows"
    extra_options = ()
    threads = SELECT_THREADS
    params = SELECT_PARAMS
    shared_params = (EMIT_PARAMS,)  # emit_rows is compiled with it (one source file)
    constants = SELECT_CONSTANTS

    def __post_init__(self):
        if not isinstance(self.staged, bool):
            raise ValueError(f"staged must be a bool, got {self.staged!r}")
        _check_choice("scores", self.scores, SELECT_SCORES)
        _check_choice("max_smem", self.max_smem, (SELECT_MAX_SMEM, SELECT_LARGE_SMEM))
        _check_choice("rule", self.rule, SELECT_RULES)

    @property
    def name(self) -> str:
        rule = "" if self.rule == "any" else f"_{self.rule}"
        return f"select_rows_{'staged' if self.staged else 'global'}{_SELECT_SUFFIX[self.scores]}{rule}"

    @property
    def name_expression(self) -> str:
        rule = -1 if self.rule == "any" else RULE_IDS[self.rule]
        return f"{self.template}<{'true' if self.staged else 'false'}, {SELECT_SCORES[self.scores]}, {rule}>"

    @property
    def smem_bytes(self) -> int:
        """The most dynamic shared memory a launch may ask for (the runtime's opt-in size)."""
        return self.max_smem if self.staged else SELECT_FIXED_SMEM

    def launch_smem(self, row_stride: int) -> int:
        return SELECT_FIXED_SMEM + (staged_bytes(row_stride) if self.staged else 0)

    @staticmethod
    def fits(row_stride: int, max_smem: int = SELECT_MAX_SMEM) -> bool:
        """Whether a row of ``row_stride`` keys can be staged in ``max_smem`` bytes."""
        return SELECT_FIXED_SMEM + staged_bytes(row_stride) <= max_smem


@dataclass(frozen=True)
class EmitSpec(PlainKernelSpec):
    """``fg::emit_rows``: count or write the kept keys of each output row from the selection
    bitmasks, the union over a group of selected sub-rows plus an optional diagonal band."""

    source = "mask_select.cu"
    template = "fg::emit_rows"
    threads = EMIT_THREADS
    params = EMIT_PARAMS
    shared_params = (SELECT_PARAMS,)
    constants = SELECT_CONSTANTS


@dataclass(frozen=True)
class DilateSpec(PlainKernelSpec):
    """``fg::dilate_rows``: each bfloat16 score row's sliding maximum over keys j - radius .. j + radius."""

    source = "mask_dilate.cu"
    template = "fg::dilate_rows"
    threads = DILATE_THREADS
    params = DILATE_PARAMS
    shared_params = (DILATE_IN_PLACE_PARAMS,)
    constants = DILATE_CONSTANTS

    @staticmethod
    def grid(rows: int, ld: int) -> tuple:
        return (rows * (-(-ld // DILATE_TILE)),)


@dataclass(frozen=True)
class DilateInPlaceSpec(PlainKernelSpec):
    """``fg::dilate_rows_in_place``: the sliding maximum of the flagged bfloat16 score rows, in
    place (one CTA per row)."""

    source = "mask_dilate.cu"
    template = "fg::dilate_rows_in_place"
    threads = DILATE_THREADS
    params = DILATE_IN_PLACE_PARAMS
    shared_params = (DILATE_PARAMS,)
    constants = DILATE_CONSTANTS


@dataclass(frozen=True)
class AdaptiveRowsSpec(PlainKernelSpec):
    """``fg::adaptive_rows``: pooling "adaptive"'s scored rows and sampled blocks in one read of
    the (16-bit) queries."""

    source = "adaptive_rows.cu"
    template = "fg::adaptive_rows"
    threads = ROWS_THREADS
    params = ADAPTIVE_ROWS_PARAMS
    constants = {"kRowsThreads": ROWS_THREADS, "kRowsMaxGroups": ROWS_MAX_GROUPS, "kRowsMaxDim": ROWS_MAX_DIM}


@dataclass(frozen=True)
class UnionSpec(PlainKernelSpec):
    """``fg::union_rows``: count or write each row's keys of a mask moved by a few offsets,
    joined with another mask's keys (the candidates of a local search)."""

    source = "mask_union.cu"
    template = "fg::union_rows"
    threads = UNION_THREADS
    params = UNION_PARAMS
    shared_params = (PACK_PARAMS,)
    constants = {"kUnionThreads": UNION_THREADS, "kUnionMaxOffsets": UNION_MAX_OFFSETS}


@dataclass(frozen=True)
class PackSpec(PlainKernelSpec):
    """``fg::pack_rows``: each row's keys as a bit map (fgcupy.MaskCache's compact form) and its
    count."""

    source = "mask_union.cu"
    template = "fg::pack_rows"
    threads = UNION_THREADS
    params = PACK_PARAMS
    shared_params = (UNION_PARAMS,)
    constants = UnionSpec.constants


def all_mask_specs() -> list:
    """Every mask-prediction specialization fgcupy ships (and the CPU tests compile)."""
    specs = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            specs.append(ScoreSpec(dtype, d, "logits", 4))
            specs.append(ScoreSpec(dtype, d, "logits", 8))
            specs.append(ScoreSpec(dtype, d, "logits_f16", 4))
            specs.append(ScoreSpec(dtype, d, "logits_f16", 8))
            specs.append(ScoreSpec(dtype, d, "stats", 4))
            specs.append(ScoreSpec(dtype, d, "stats", 8))
            specs.append(ScoreSpec(dtype, d, "maxprob", 4))
            specs.append(ScoreSpec(dtype, d, "maxprob", 8))
            specs += [ColmaxSpec(dtype, d, mode, warps) for mode in COLMAX_MODES for warps in SCORE_WARPS]
    selects = [SelectSpec(staged, scores, rule=rule) for staged in (True, False) for scores in SELECT_SCORES
               for rule in SELECT_RULES]
    return specs + selects + [EmitSpec(), DilateSpec(), DilateInPlaceSpec(), AdaptiveRowsSpec(), UnionSpec(), PackSpec()]


def all_sm90_mask_specs() -> list:
    """Every Hopper (sm_90a) scoring specialization fgcupy ships."""
    sixteen_bit = [Sm90ScoreSpec(dtype, d, mode, group) for dtype in DTYPES for d in HEAD_DIMS
                   for mode, groups in _SM90_GROUPS.items() for group in groups]
    return sixteen_bit + [Sm90ScoreSpec(E4M3, d, mode, group) for d in E4M3_HEAD_DIMS for mode in E4M3_MODES
                          for group in _SM90_GROUPS[mode]]
