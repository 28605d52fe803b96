"""The options of one mask prediction, checked once: ``make_request`` -> ``MaskRequest``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import bridge, mask_reference as ref
from .attention_kernel import check_scale, eager_scale
from .mask import SliceMask, is_int, positive_int

METHODS = ("topk", "tau", "threshold", "colmax")
#: predict_mask's methods: METHODS and "auto" (fgcupy.auto_mask: top-k by one of them per head).
PREDICT_METHODS = METHODS + ("auto",)
#: What predict_mask(method="auto") takes besides q, k, slice_m and method (one of density and top_k).
AUTO_OPTIONS = ("density", "top_k", "scale", "layout", "workspace_bytes")
#: predict_mask's method where none is named: "auto", the one near the oracle on every head family
#: (the cheap top-k alone is several times off it where a block's queries look apart;
#: README "Mask quality").
DEFAULT_METHOD = "auto"
COMBINES = ("max", "union")
#: Slice sizes the exact band takes (one query block per scoring CTA of 4 or 8 warps).
EXACT_BAND_SLICES = (64, 128)
#: The shipped default of mean-query methods (combine "max", slice_m 64 or 128): sub-blocks of
#: DEFAULT_POOL queries, and exact scores on DEFAULT_EXACT_BAND keys either side of each block
#: (notes/MEASURED.md "Mask quality" has the measurements behind them).
DEFAULT_POOL = 32
DEFAULT_EXACT_BAND = 64
#: How each sub-block of ``pool`` queries is scored (mask_reference): "mean" (its mean query),
#: "sample" (its middle query, scores dilated along the keys), "both" (the geometric mean of
#: the two scores) or "adaptive" (per query block, "sample" where the block's queries are
#: incoherent, else "mean"). The default's; an explicit ``pool`` keeps "mean" unless
#: ``pooling`` is given.
POOLINGS = ("mean", "sample", "both", "adaptive")
DEFAULT_POOLING = "adaptive"
#: Marks an option left to the default (None means "off" for exact_band).
AUTO = "auto"
#: What colmax multiplies: q and k as given ("input"), rounded to float8 e4m3 per head
#: ("e4m3": fgcupy.e4m3, twice the tensor rate on Hopper), or "auto": e4m3 where its kernel runs
#: (gpu_prediction.uses_e4m3), else as given. predict_mask's default asks for "auto" with
#: lse="estimate" and "input" otherwise.
PRODUCTS = ("input", "e4m3", AUTO)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class MaskRequest:
    """Validated parameters of one prediction."""

    method: str
    rule: str
    slice_m: int
    pool: int
    combine: str
    top_k: int | None
    tau: float | None
    threshold: float | None
    min_keys: int
    max_keys: int | None
    local: int | None
    scale: float
    logits_dtype: torch.dtype = torch.float32
    exact_band: int | None = None
    pooling: str = "mean"
    diagonals: tuple = ()
    products: str = "input"

    @property
    def kind(self) -> str:
        """mean (one pooled row per block), submax, union, or colmax."""
        if self.method == "colmax":
            return "colmax"
        if self.exact_band is not None or self.pooling != "mean":
            return "submax"
        if self.pool == self.slice_m:
            return "mean"
        return "submax" if self.combine == "max" else "union"

    @property
    def group(self) -> int:
        return self.slice_m // self.pool


_MEAN_QUERY = "'topk', 'tau' or 'threshold'"
_ANY_RULE = _MEAN_QUERY + " or 'colmax'"
#: predict_mask's options that method "auto" takes only at their defaults: (that default, the
#: methods that take the option, which its refusal names).
AUTO_REFUSES = {"tau": (None, "'tau'"), "threshold": (None, "'threshold' or 'colmax'"), "rule": (None, "'colmax'"),
                "lse": (None, "'colmax'"), "candidates": (None, "'colmax'"), "products": (AUTO, "'colmax'"),
                "min_keys": (None, _ANY_RULE), "max_keys": (None, _ANY_RULE), "local": (None, _ANY_RULE),
                "pool": (AUTO, _MEAN_QUERY), "pooling": (AUTO, _MEAN_QUERY), "combine": ("max", _MEAN_QUERY),
                "exact_band": (AUTO, _MEAN_QUERY), "diagonals": ((), _MEAN_QUERY),
                "logits_dtype": (None, _MEAN_QUERY)}


def check_method(method) -> None:
    """ValueError unless ``method`` is one of predict_mask's."""
    if not isinstance(method, str) or method not in PREDICT_METHODS:
        raise ValueError(f"method must be one of {PREDICT_METHODS}, got {method!r}")


def options_auto_refuses(options: dict) -> list:
    """The names in ``options`` (predict_mask keywords besides AUTO_OPTIONS) that method "auto"
    does not take: those given at another value than their default (min_keys=0, top-k's own
    floor, and an empty sequence of diagonals count as defaults), and names it does not know."""
    refused = []
    for name, value in options.items():
        if name not in AUTO_REFUSES:
            refused.append(name)
        elif not _is_default(None if name == "min_keys" and is_int(value) and value == 0 else value,
                             AUTO_REFUSES[name][0]):
            refused.append(name)
    return refused


def _is_default(value, default) -> bool:
    """Whether an option was left at its default (an empty list of diagonals counts as none)."""
    if isinstance(default, tuple):  # diagonals: any empty sequence (list, tuple, array, tensor)
        return not isinstance(value, (str, bytes)) and hasattr(value, "__len__") and len(value) == 0
    if isinstance(default, str):
        return isinstance(value, str) and value == default
    if default is None:
        return value is None
    return is_int(value) and value == default


def auto_refusal(given: list, takes=AUTO_OPTIONS) -> ValueError:
    """The error for options method "auto" does not take (``given``, their names), saying which
    methods take each: "auto" is the default, so a call that names no method lands here.
    ``takes``: what the caller passes on to it."""
    hints = "; ".join(f"{name}: method {AUTO_REFUSES[name][1]}" for name in given if name in AUTO_REFUSES)
    return ValueError(f"method='auto' (predict_mask's default) takes {list(takes)} (one of density and top_k); "
                      f"got {given}. Name the method those options are for" + (f" ({hints})" if hints else ""))


def check_auto_column_max(head_dim: int, kv_len: int, slice_m, density=None, top_k=None, scale=None) -> None:
    """Refuse what the column max of the heads "auto" flags cannot take (a slice size), saying so:
    the caller may not have named a method at all."""
    try:
        make_request(head_dim, kv_len, slice_m, "colmax", rule="topk", density=density, top_k=top_k, scale=scale)
    except ValueError as err:
        raise ValueError(f"method='auto' (predict_mask's default) predicts the heads its check flags by the column "
                         f"max: {err}; method='topk' scores without it") from None


def make_request(head_dim, kv_len, slice_m, method, *, density=None, top_k=None, tau=None, threshold=None,
                 rule=None, pool=AUTO, combine="max", min_keys=None, max_keys=None, local=None, scale=None,
                 logits_dtype=None, exact_band=AUTO, pooling=AUTO, diagonals=(), products="input") -> MaskRequest:
    """Check every option; ValueError naming expected and actual."""
    defaults_apply = method in ("topk", "tau", "threshold") and combine == "max" and slice_m in EXACT_BAND_SLICES
    if isinstance(exact_band, str) and exact_band == AUTO:
        exact_band = DEFAULT_EXACT_BAND if defaults_apply else None
    if isinstance(pooling, str) and pooling == AUTO:
        pooling = DEFAULT_POOLING if defaults_apply and isinstance(pool, str) and pool == AUTO else "mean"
    if isinstance(pool, str) and pool == AUTO:
        pool = min(DEFAULT_POOL, slice_m) if defaults_apply else None
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    slice_m = positive_int("slice_m", slice_m)
    if method == "colmax":
        if rule is None:  # the rule whose option is given; threshold by default
            rule = "topk" if density is not None or top_k is not None else "tau" if tau is not None else "threshold"
    elif rule is not None and rule != method:
        raise ValueError(f"rule={rule!r} only applies to method='colmax' (method {method!r} is its own rule)")
    else:
        rule = method
    from .jit.score_spec import RULE_IDS  # the kernels' constants load with their first use

    if rule not in RULE_IDS:
        raise ValueError(f"rule must be one of {tuple(RULE_IDS)}, got {rule!r}")
    if rule == "topk":
        if (density is None) == (top_k is None):
            raise ValueError("top-k selection needs exactly one of density (fraction of keys) or top_k")
        if density is not None:
            if not is_number(density) or not 0.0 <= density <= 1.0:
                raise ValueError(f"density must be a number in [0, 1], got {density!r}")
            # A positive density keeps at least one key (rounding to none would zero every output).
            top_k = max(1, round(density * kv_len)) if density > 0 and kv_len else 0
        if not is_int(top_k) or top_k < 0:
            raise ValueError(f"top_k must be a non-negative int, got {top_k!r}")
        top_k = int(min(top_k, kv_len))
    elif density is not None or top_k is not None:
        raise ValueError(f"density/top_k apply to top-k selection, not rule {rule!r}")
    for name, value in (("tau", tau), ("threshold", threshold)):
        if value is not None and not is_number(value):
            raise ValueError(f"{name} must be a number, got {value!r}")
    if rule == "tau":
        tau = 0.9 if tau is None else float(tau)
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {tau}")
    elif tau is not None:
        raise ValueError(f"tau applies to rule 'tau', not {rule!r}")
    if rule == "threshold":
        if threshold is None:
            if method != "colmax":
                raise ValueError("rule 'threshold' needs threshold (a probability)")
            threshold = 0.5 / kv_len
        threshold = float(threshold)
        if not 0.0 < threshold <= 1.0:  # scores are probabilities: above 1 nothing would pass
            raise ValueError(f"threshold must be a probability in (0, 1], got {threshold}")
    elif threshold is not None:
        raise ValueError(f"threshold applies to rule 'threshold', not {rule!r}")
    pool = slice_m if pool is None else pool
    if method == "colmax":
        if pool != slice_m:
            raise ValueError("pool applies to mean-query methods, not colmax")
        if slice_m not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"colmax needs slice_m a power of two <= 128, got {slice_m}")
    elif not is_int(pool) or pool < 1 or slice_m % pool or (pool < slice_m and (slice_m // pool) & (slice_m // pool - 1)):
        raise ValueError(f"pool must divide slice_m={slice_m} into a power-of-two number of sub-blocks, got {pool!r}")
    elif pool < slice_m and slice_m // pool > 128:
        raise ValueError(f"at most 128 sub-blocks per block, got slice_m / pool = {slice_m // pool}")
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if method == "colmax" and combine != "max":
        raise ValueError(f"combine joins the sub-blocks of mean-query methods; colmax scores every query: got "
                         f"combine={combine!r}")
    if combine == "union" and method != "colmax" and pool == slice_m:
        raise ValueError(f"combine='union' joins the selections of sub-blocks of pool queries: give pool < "
                         f"slice_m={slice_m} (with pool = slice_m it is one mean query per block)")
    if min_keys is None:  # a block no key's score reaches would attend to nothing: zeros out
        min_keys = 1 if rule == "threshold" else 0
    if not is_int(min_keys) or min_keys < 0:
        raise ValueError(f"min_keys must be a non-negative int, got {min_keys!r}")
    if local is not None and (not is_int(local) or local < 0):
        raise ValueError(f"local must be None or a non-negative int (keys beyond the block on each side), got {local!r}")
    # Counts past kv_len mean "all keys"; a band wider than any sequence the kernels index (int32)
    # is all keys too. Both are int32 fields of the kernels.
    min_keys = int(min(min_keys, kv_len))
    local = None if local is None else int(min(local, _LOCAL_MAX))
    if max_keys is not None:
        if combine == "union":
            raise ValueError("max_keys caps one selection per block; combine='union' makes one per sub-block and "
                             "their union per block could exceed it: use combine='max' with max_keys")
        band_width = slice_m + 2 * local if local is not None else 0
        if not is_int(max_keys) or max_keys < max(1, min_keys, min(band_width, kv_len)):
            raise ValueError(f"max_keys must be an int >= max(1, min_keys={min_keys}, band width "
                             f"{min(band_width, kv_len)}), got {max_keys!r}")
        max_keys = int(min(max_keys, max(kv_len, 1)))
    if exact_band is not None:
        if not is_int(exact_band) or exact_band < 0:
            raise ValueError(f"exact_band must be None or a non-negative int (keys beyond the block on each side), "
                             f"got {exact_band!r}")
        if method == "colmax" or combine != "max":
            raise ValueError(f"exact_band refines pooled max-prob scores: it needs a mean-query method and "
                             f"combine='max', got method={method!r}, combine={combine!r}")
        if slice_m not in EXACT_BAND_SLICES:
            raise ValueError(f"exact_band needs slice_m in {EXACT_BAND_SLICES} (one query block per CTA), got {slice_m}")
        if slice_m + 2 * int(exact_band) > _INT32_MAX:
            raise ValueError(f"exact_band={exact_band} is too wide for int32 key offsets")
        exact_band = int(exact_band)
    diagonals = _checked_diagonals(diagonals, exact_band, slice_m)
    if not isinstance(pooling, str) or pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "mean" and (method == "colmax" or combine != "max"):
        raise ValueError(f"pooling={pooling!r} scores sub-blocks by their middle query for the max-prob combine: it "
                         f"needs a mean-query method and combine='max', got method={method!r}, combine={combine!r}")
    if not isinstance(products, str) or products not in PRODUCTS:
        raise ValueError(f"products must be one of {PRODUCTS}, got {products!r}")
    if products == AUTO and method != "colmax":  # mean-query methods score in the inputs' dtype alone
        products = "input"
    if products != "input" and method != "colmax":
        raise ValueError(f"products={products!r} applies to method='colmax', not {method!r}")
    scale = eager_scale(scale)
    if scale is not None:
        if not torch.compiler.is_compiling() and not is_number(scale):  # compiling: maybe symbolic
            raise TypeError(f"scale must be a number or None, got {type(scale).__name__}")
        check_scale(scale)  # the attention kernels' bound: past float32, logits turn to inf and rank as key order
    scale = ref.default_scale(head_dim) if scale is None else float(scale)
    stores_logits = method != "colmax" and exact_band is None and pooling == "mean" and (pool == slice_m or combine == "union")
    if logits_dtype is None:
        logits_dtype = torch.float16 if stores_logits and rule in ("topk", "threshold") else torch.float32
    elif logits_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"logits_dtype must be torch.float16 or torch.float32, got {logits_dtype!r}")
    elif logits_dtype == torch.float16 and not stores_logits:
        raise ValueError("logits_dtype=torch.float16 applies where logits are stored (mean-query scoring with one "
                         "pooled row per block, or combine='union'); colmax and combine='max' store "
                         "probabilities (bfloat16)")
    return MaskRequest(method, rule, slice_m, int(pool), combine, top_k, tau, threshold, int(min_keys),
                       None if max_keys is None else int(max_keys), None if local is None else int(local), scale,
                       logits_dtype, exact_band, pooling, diagonals, products)


#: ``local`` past this is taken as this: the band of every block of a sequence shorter than 2^30
#: already holds every key, and the kernels' band ends stay within int32.
_LOCAL_MAX = 2**30 - 1


#: Key counts to check options at before q and k are known. Counts past kv_len mean all keys, so
#: at one key every bound that depends on it (min_keys, the band under max_keys) is loosest (what
#: is refused there fails at any length); at the longest the kernels index (int32) it is tightest.
ONE_KEY, LONGEST_KV = 1, 2**31 - 1


def check_options(slice_m, method: str, options: dict, kv_len: int) -> None:
    """Refuse now what make_request would refuse for ``options`` at ``kv_len`` keys, before q and
    k are known: a per-head pooling list entry by entry (its length is checked with the heads);
    method "auto" as the top-k it selects by and the column max of its flagged heads, with a
    scale its check's attention takes.
    ``options`` are make_request's keywords."""
    if method == "auto":
        if options.get("scale") is not None:
            check_scale(eager_scale(options["scale"]))
        check_auto_column_max(128, kv_len, slice_m, **{name: options[name] for name in ("density", "top_k", "scale")
                                                       if name in options})
        method = "topk"
    poolings = options.get("pooling")
    if isinstance(poolings, (list, tuple)):
        if not poolings:
            raise ValueError("a per-head pooling list needs one pooling per head, got an empty list")
        for each in poolings:
            make_request(128, kv_len, slice_m, method, **dict(options, pooling=each))
    else:
        make_request(128, kv_len, slice_m, method, **options)


def is_number(value) -> bool:
    """A Python or numpy real number, not a bool (nor a tensor or a string)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def check_workspace_bytes(value) -> int:
    """``value`` as an int the ops take (at most 2**62), or ValueError unless it is a
    non-negative, finite number of bytes (a score buffer's budget: predict_mask, estimate_lse,
    and the diffusers config that passes it on)."""
    if is_int(value) and value >= 0:  # any int, past float's range too
        return int(min(value, 2**62))
    if not is_number(value) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"workspace_bytes must be a non-negative number of bytes, got {value!r}")
    return int(min(value, 2**62))


def _checked_diagonals(diagonals, exact_band, slice_m: int) -> tuple:
    """Sorted distinct non-zero key shifts of the exact band (0, the band itself, is implied)."""
    if isinstance(diagonals, (str, bytes)) or not hasattr(diagonals, "__iter__"):
        raise ValueError(f"diagonals must be a sequence of ints (key offsets), got {diagonals!r}")
    if isinstance(diagonals, torch.Tensor) and not diagonals.is_floating_point() and diagonals.dim() == 1:
        diagonals = diagonals.tolist()  # find_diagonals' offsets as a tensor: ints on the host
    diagonals = tuple(diagonals)
    for d in diagonals:
        if not is_int(d):
            raise ValueError(f"diagonals must be ints (key offsets), got {d!r} in {diagonals!r}")
    if diagonals and exact_band is None:
        raise ValueError("diagonals move the exact band: they need exact_band (and a pooled method with "
                         "combine='max'), got exact_band=None")
    width = 0 if exact_band is None else slice_m + 2 * exact_band
    if any(abs(int(d)) + width > _INT32_MAX for d in diagonals):
        raise ValueError(f"diagonals {diagonals!r} are too far for int32 key offsets")
    return tuple(sorted({int(d) for d in diagonals} - {0}))


def checked_lse(lse, q) -> torch.Tensor:
    """``lse`` as a torch tensor, if it is the float32 [B, H, q_len] row LSE of [B, H, S, D] ``q``
    on q's device (the column-max kernels read it raw); else ValueError."""
    lse_t = bridge.to_torch(lse, "lse")
    expected = tuple(q.shape[:3])
    if tuple(lse_t.shape) != expected or lse_t.dtype != torch.float32 or lse_t.device != q.device:
        raise ValueError(f"lse must be float32 {expected} on {q.device}; got {tuple(lse_t.shape)}, "
                         f"{lse_t.dtype}, {lse_t.device}")
    return lse_t


def checked_candidates(candidates, qh, kh, slice_m: int, method: str) -> tuple:
    """``candidates`` as a checked tuple of SliceMasks (empty for None)."""
    if candidates is None:
        return ()
    if method != "colmax":
        raise ValueError(f"candidates apply to method='colmax' (exact scores of the listed keys), not {method!r}")
    masks = (candidates,) if isinstance(candidates, SliceMask) else tuple(candidates)
    expected = (qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2], slice_m)
    for mask in masks:
        if not isinstance(mask, SliceMask):
            raise TypeError(f"candidates must be a SliceMask or a list of them, got {type(mask).__name__}")
        shape = (mask.batch, mask.heads, mask.q_len, mask.kv_len, mask.slice_m)
        if shape != expected:
            raise ValueError(f"candidates have (B, H, q_len, kv_len, slice_m)={shape}, the prediction {expected}")
        if mask.indptr.device != qh.device:
            raise ValueError(f"candidates are on {mask.indptr.device}, q on {qh.device}")
    if not masks:
        raise ValueError("candidates is empty: give at least one SliceMask (or None to score every key)")
    return masks


def resolved_products(products, method: str, lse) -> str:
    """The request's products for predict_mask's ``products``: "auto" stays "auto" (e4m3 where
    the kernel runs) for colmax with lse="estimate", an estimate already; else it is "input"."""
    if isinstance(products, str) and products == AUTO:
        estimated = isinstance(lse, str) and lse == "estimate"
        return AUTO if method == "colmax" and estimated else "input"
    return products


def check_products(req: MaskRequest, qh, candidates: tuple) -> None:
    """Refuse e4m3 products where they cannot run: with candidates (whose lists the e4m3 pass
    does not take), or on a GPU without the e4m3 kernel (the CPU reference rounds as it does)."""
    if req.products != "e4m3":
        return
    if candidates:
        raise ValueError("products='e4m3' scores every key; candidates are scored with the inputs' products "
                         "(products='input')")
    if qh.device.type == "cuda" and not e4m3_runs_for(qh):
        from .jit.score_spec import E4M3_HEAD_DIMS

        raise ValueError(f"products='e4m3' runs on Hopper (sm_90) GPUs with head dims {E4M3_HEAD_DIMS}; got head "
                         f"dim {qh.shape[3]} on {qh.device} (use products='input')")


def e4m3_runs_for(qh) -> bool:
    """Whether the e4m3 column-max pass runs for q [B, H, S, D] here (a Hopper GPU, a head dim it has)."""
    from .mask_kernels import e4m3_runs  # the kernels' module loads with its first use

    return qh.device.type == "cuda" and e4m3_runs(qh.device, qh.shape[3])
