"""SparseAttentionConfig: what ``fgcupy.integrations.diffusers.apply`` installs, checked when it
is made (a setting that cannot work is refused here, not at the first sparse step)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from ..cache import MaskCache
from ..jit.spec import SLICE_SIZES
from ..local_search import grid_offsets
from ..mask import is_int

# The parameter each named predictor method is tuned by (checked at config time, so a missing
# density fails at apply() rather than on the first refresh step deep inside a pipeline).
_METHOD_PARAMETER = {"topk": "density", "tau": "tau", "threshold": "threshold", "auto": "density"}
#: The mean-query predictors: the exact band find_diagonals moves is theirs.
_MEAN_QUERY = ("topk", "tau", "threshold")
#: The exact predictor: refresh steps run dense attention and keep its row LSE, and the mask is
#: the exact column max (fgcupy.predict_mask(method="colmax")), selected by the rule of the one
#: parameter given (density: top-k, tau, threshold).
EXACT_PREDICTOR = "colmax"
#: The selection rule each parameter gives an exact (column-max) mask.
_RULE_OF_PARAMETER = {"density": "topk", "tau": "tau", "threshold": "threshold"}
DEFAULT_DENSITY = 0.1
#: compact_masks=None holds masks compactly where, expanded, every patched layer's for both
#: guidance branches would take more than this share of the GPU's memory.
COMPACT_SHARE = 0.25
#: refresh_every of predicted masks (each refresh predicts anew).
DEFAULT_REFRESH_EVERY = 5
#: refresh_every where the first mask is the warm-up's exact one and refreshes are sparse: such a
#: refresh costs about twice a prediction, and with the warm-up's column max two of them in a
#: 50-step schedule keep the mask cost per step under 2 % of dense attention (notes/MEASURED.md "End to end").
WARMUP_REFRESH_EVERY = 20
#: refresh_every where the first mask is predicted and refreshes search around the old mask, with
#: the ramp (refreshes on sparse steps 1, 2, 4, 8, 16, then every 32): each search moves the
#: mask closer to the exact one, so the early ones buy the most (notes/MEASURED.md "Over a whole schedule").
SEARCH_REFRESH_EVERY = 32
#: The same without the ramp: four searches in 50 sparse steps.
EVEN_SEARCH_REFRESH_EVERY = 10
#: dense_steps where the warm-up can make the first mask: one dense step's exact masks (sparse
#: refreshes every 20 after it) cost over 50 steps what the searches from a predicted mask do.
DEFAULT_DENSE_STEPS = 1
#: predict_mask options that shape the selection or bound its memory (and so apply to an exact
#: column-max mask too).
_SELECTION_OPTIONS = ("top_k", "min_keys", "max_keys", "local", "workspace_bytes")


@dataclass(frozen=True)
class SparseAttentionConfig:
    """What ``apply`` installs. Options left None are resolved when the config is made (the
    attributes then hold the values in use). ``config.replace(**changes)`` makes a new config
    from the settings this one was given, resolving the defaults again; ``dataclasses.replace``
    passes the resolved values on as if given (a default density, say, is then refused with a
    predictor that takes tau).

    predictor: a ``fgcupy.predict_mask`` method name ("topk", "tau", "threshold", or "auto": the
        top-k mask checked per head, the estimated column max where the check finds it missing
        attention; predictor_kwargs top_k, scale and workspace_bytes only, no find_diagonals or
        process_group) tuned by its
        own ``density`` (default 0.1) / ``tau`` / ``threshold`` (+ ``predictor_kwargs``), or a callable
        ``predictor(q, k, slice_m=...) -> SliceMask`` with q, k ``[B, H, S, D]`` views; or "colmax",
        the exact schedule (FG-Attn): a layer's refresh calls run dense attention (their output
        is exact) and keep its row LSE, and the mask is the exact column max selected by the one
        of ``density`` (top-k, the default 0.1), ``tau`` or ``threshold`` given. The most accurate
        masks, at the price of a dense call and a column-max pass per refresh (about 0.47x a dense
        attention on an H200 with the wgmma scoring kernel): choose a long refresh interval.
    slice_m: queries per slice (a kernel size, 64 or 128).
    dense_steps: the first denoising steps run dense (stock processor): early steps set the layout.
        With dense_steps >= 1 the defaults make the first mask exact and keep it so
        (``mask_from_warmup`` and ``sparse_refresh`` below); with 0, the first mask is predicted
        and sparse refreshes with a local search walk it towards the exact one
        (``local_search`` and ``refresh_ramp`` below). None (the default): 1 where the warm-up
        can make the first mask and keep it (a named predictor, no process_group, no
        calibrate_pooling, and none of mask_from_warmup=False, sparse_refresh=False,
        predict_on_refresh=False, refresh_ramp=True, refresh_steps, grid, estimate_first_mask), or
        mask_from_warmup=True; else 0. Over 50 steps one dense step
        costs what the searches it replaces do (a Wan-14B block at 32,760 tokens on an H200:
        1.63x over stock either way) and its masks had 0.99-1.05x the oracle's error on every
        head family against 1.01-1.40x (notes/MEASURED.md "Over a whole schedule"). A few-step (distilled)
        model spends a larger share of its steps dense: give it dense_steps=0.
    dense_layers: indices (in model order) of self-attention layers that always run dense.
    refresh_every / refresh_steps: masks are re-predicted every ``refresh_every`` sparse steps
        (counted from the first sparse step), or exactly on the steps listed in ``refresh_steps``
        (a layer with no mask yet makes one on its first sparse step; with ``mask_from_warmup``
        that step uses the warm-up's exact mask instead); other steps reuse the layer's cached mask.
        None: 20 with the warm-up's exact mask and sparse refreshes (each costs about two
        predictions; over a 50-step schedule with 1 or 5 dense steps the mask cost stays under 2 %
        of dense attention per step, notes/MEASURED.md "End to end"); with a predicted first mask and searching
        refreshes (local_search, no predict_on_refresh: the default with dense_steps=0) 32 on the
        ramp below, or 10 with refresh_ramp=False; else 5.
    refresh_ramp: with refresh_every, also refresh on the sparse steps 1, 2, 4, ... below it
        (with 32: sparse steps 1, 2, 4, 8, 16, 32, 64, ...). Where each refresh improves the mask
        (a local search walking a predicted mask towards the exact one) early refreshes gain the
        most. None (the default): on where refreshes search from a predicted first mask without
        the predictor (local_search, predict_on_refresh False) and neither refresh_every nor
        refresh_steps is given; else off.
    calibrate_pooling: with predictor "topk", a layer's first refresh picks per head the pooling
        ("mean" or "both") whose mask holds the most probability of 16 sampled queries per
        query block (``fgcupy.calibration``, exact softmax rows of those queries: no dense
        step); that step's mask is the chosen one and later refreshes predict with those
        poolings. Once per layer (and guidance branch, input shape and token grid) while the
        handle lives: later generations keep the choice (``handle.reset(recalibrate=True)`` makes
        it again). Not with mask_from_warmup=True (the calibrating refresh would replace the
        exact mask) nor predict_on_refresh=False (no refresh would use the poolings).
    find_diagonals: with a named mean-query predictor, a layer's first predicting refresh (the
        one after the calibration, with calibrate_pooling) finds up to this many diagonals (``fgcupy.find_diagonals``: key offsets, such as whole frames, where
        sampled queries of every head attend; one host sync) and every refresh of that layer
        then scores them exactly too (``predict_mask(diagonals=...)``). Kept per layer (and
        guidance branch, input shape and token grid) while the handle lives, like calibrated
        poolings. Not with predict_on_refresh=False (no refresh would score them).
        Each diagonal costs about one exact band per refresh; the offsets are shared by a
        layer's heads (notes/MEASURED.md "Mask quality" has what they gain and lose per head family).
        0: off.
    mask_from_warmup: the last of the ``dense_steps`` warm-up steps runs its dense attention
        through fgcupy's kernel (the same exact output) and keeps its row LSE, and each layer's
        first mask is the exact column max of that step (FG-Attn's schedule), selected by the
        predictor's density / tau / threshold (and the selection options of ``predictor_kwargs``:
        top_k, min_keys, max_keys, local). It serves the first sparse step, which then needs no
        prediction. Costs one column-max pass per layer and generation (about half a dense
        attention on an H200). Needs dense_steps >= 1 and a named predictor. None (the default):
        on wherever it can be (dense_steps >= 1, a named predictor, no
        process_group and no calibrate_pooling): over a 50-step schedule of the head families,
        with sparse refreshes, its masks had 0.99-1.05x the oracle's error where predicted ones had
        0.91-4.0x (notes/MEASURED.md "Over a whole schedule").
    estimate_first_mask: a layer's first mask (and the first for new input shapes or key
        padding) is the exact column max with each query's LSE estimated instead of predicted
        (``predict_mask(method="colmax", lse="estimate")``: no dense step), selected like
        mask_from_warmup's; later refreshes as configured. Costs one column-max pass and the
        estimate per layer and generation (and guidance branch, without share_branches): 0.41x
        the time of SDPA cuDNN's dense attention for a wan14b-480p layer on an H100 (README
        "Mask quality"). On the head
        families the estimated masks had 1.00-1.06x the oracle's error where the default
        predictor's had up to 3.6x (H100), and over 50 searched sparse steps 1.03-1.06x where a
        predicted first mask's had 1.11-1.57x (CPU; notes/MEASURED.md "Mask quality",
        docs/diffusers.md). Needs a
        named predictor; not with mask_from_warmup=True (the warm-up's exact mask is
        the first), calibrate_pooling (its refresh makes the first mask) or process_group. With it
        the default dense_steps is 0, and given warm-up steps do not make the first mask
        (mask_from_warmup defaults to False).
    sparse_refresh: a refresh of a layer that has a mask attends through that mask (this call's
        output) and keeps each query's LSE over the kept keys; the new mask, which serves the
        following steps, is the exact column max with that LSE over the keys the old mask keeps
        and the keys the predictor picks (``predict_mask(method="colmax", candidates=...)``),
        selected by the predictor's density / tau / threshold. No dense step: the predictor's
        cost plus one Q K^T pass over the candidates' union (``fgcupy.union_keys``: one host
        synchronisation a refresh for its size). Masks stay as good as the old mask plus the
        candidates (notes/MEASURED.md "Mask quality"), so a refresh never throws the warm-up's exact mask
        away. Needs a named predictor and no process_group. None (the default): on
        with the warm-up's exact mask, and from a predicted first mask where a named
        predictor, no process_group, no calibrate_pooling and no find_diagonals allow it.
    local_search: with sparse_refresh, the candidates also hold the old mask's keys moved by one
        step of the token grid either way, a token, a row and a frame in turn (one kind a refresh;
        ``fgcupy.local_search``): refresh after refresh the mask follows attention that shifts
        by a few tokens, which the cheap predictor cannot see where a query block's queries look
        at different places. Every candidate is scored once (``union_keys``). None (the
        default): on where sparse refreshes start from a mask a named predictor made
        (no warm-up exact mask, no find_diagonals, no calibrate_pooling, no process_group):
        over 50 sparse steps of the head families its masks (searching on the ramp below) had
        1.01-1.40x the oracle's error where masks predicted every 5 steps had 0.89-3.61x
        (notes/MEASURED.md "Over a whole schedule"); also on with sparse refreshes where predict_on_refresh=False or a
        grid is given (options of the search alone).
    predict_on_refresh: with local_search, False leaves the predictor out of sparse refreshes: the
        candidates are the old mask's keys and their moved copies only, which saves the
        prediction (about 7 % of a dense attention call on an H200) and on the head families
        tracked the oracle as closely (notes/MEASURED.md "Refreshing from a sparse step"); the first mask of a
        layer still comes from the predictor (or the warm-up's exact one). None (the default):
        False where refreshes search from a predicted first mask, else True.
    grid: (frames, height, width) of the latent token grid for local_search; None reads it from
        each transformer call (``hidden_states`` [B, C, F, H, W] over the model's ``patch_size``).
        Without either the search moves keys by one token only.
    refresh_on_drift: also re-predict a layer's mask on a step where its queries or keys moved
        by more than this since the mask was made (``fgcupy.cache.means_drift`` of their block
        means, in (0, 2); costs one host sync per layer and sparse step). None: schedule only.
    refresh_on_missed_mass: also refresh a layer's mask on the sparse step after one where the
        share of attention mass it misses grew past this factor (> 1) of that share on the mask's
        first sparse step, in any head (1 - ``fgcupy.cache.mask_recall``: the sparse call's LSE
        against the exact LSE of 64 sampled queries per head; an output's error grows with the
        mass its mask misses, so the factor reads as how much worse the mask got). The reading
        reaches the host without a sync, one step late (later if the GPU has not finished it:
        readings wait for it). With ``attention_fn`` each sparse step then also runs fgcupy's
        attention for its LSE. None: schedule only.
    share_branches: later calls of the same step (classifier-free guidance's second pass) reuse the
        first call's masks instead of predicting their own: half the mask memory. Pipelines that
        put both branches in one batch (CogVideoX's) make one call per step: each batch entry
        keeps its own mask rows, and this option changes nothing. A branch whose key padding or
        input shapes differ from the first's keeps masks of its own.
    compact_masks: hold each layer's mask compactly (``fgcupy.MaskCache``'s "auto" storage: the
        smaller of its keys, int16 where kv_len fits, and a bit map) and expand it, on each
        sparse call, into one kernel plan shared by the layers of a shape: at d = 0.1 a bit map
        takes 1 bit a key against 32 bits a kept key (3.2x less), for one write of the kept keys
        per call (reuse calls 1.5-8 % longer on an H100). None (the default): compact where the
        first mask, held expanded by every patched layer for both guidance branches (one with
        share_branches), would take more than COMPACT_SHARE of the GPU's memory (Wan-14B at 720p
        and d = 0.1: 53 GiB), decided again for each generation. Not True with process_group
        (its head groups keep their own masks; None stays expanded there).
    fallback: where fgcupy's kernel cannot run (no GPU, CPU tensors), use the stock processor
        instead of raising.
    attention_fn: replaces fgcupy's kernel: ``attention_fn(q, k, v, mask, scale) -> out`` with
        q, k, v, out ``[B, S, H, D]``; for other backends, comparisons and CPU tests. The LSE of a
        sparse refresh, of the warm-up's exact mask, of refresh_on_missed_mass's readings and of
        predictor="colmax"'s refreshes (a dense call whose LSE makes the mask, before attention_fn
        runs on that step) still comes from fgcupy's attention (``sparse_refresh=False,
        mask_from_warmup=False``, no refresh_on_missed_mass and a named predictor leave it out).
    process_group: a torch.distributed group whose ranks each hold a contiguous sequence shard
        (rank order = sequence order): self-attention then runs through SequenceParallelAttention
        (fgcupy's kernel on CUDA tensors, its float32 reference elsewhere), dense steps and layers
        included. Wan only; excludes ``attention_fn``.
    parallel_options: keyword arguments of SequenceParallelAttention for ``process_group``:
        ``head_groups``, ``exchange`` (``"copy"``: copy-engine transfers on one host), ``key_tile``.
    """

    predictor: str | Callable = "topk"
    density: float | None = None  # "topk" without one keeps 0.1
    tau: float | None = None
    threshold: float | None = None
    predictor_kwargs: dict = field(default_factory=dict)
    slice_m: int = 128
    dense_steps: int | None = None
    dense_layers: tuple[int, ...] = ()
    refresh_every: int | None = None
    refresh_steps: tuple[int, ...] | None = None
    refresh_ramp: bool | None = None
    refresh_on_drift: float | None = None
    refresh_on_missed_mass: float | None = None
    mask_from_warmup: bool | None = None
    estimate_first_mask: bool = False
    sparse_refresh: bool | None = None
    local_search: bool | None = None
    predict_on_refresh: bool | None = None
    grid: tuple[int, int, int] | None = None
    calibrate_pooling: bool = False
    find_diagonals: int = 0
    share_branches: bool = False
    compact_masks: bool | None = None
    fallback: bool = False
    attention_fn: Callable | None = None
    process_group: object = None
    parallel_options: dict = field(default_factory=dict)

    def __post_init__(self):
        for option in ("predictor_kwargs", "parallel_options"):  # the config's own copy, checked once
            if not isinstance(getattr(self, option), dict):
                raise TypeError(f"{option} must be a dict, got {type(getattr(self, option)).__name__}")
            object.__setattr__(self, option, _ReadOnlyDict(getattr(self, option)))
        object.__setattr__(self, "_given", {f.name: getattr(self, f.name) for f in fields(self)})
        for name in ("density", "tau", "threshold"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not math.isfinite(value)):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
        for option in ("calibrate_pooling", "share_branches", "fallback", "estimate_first_mask"):
            if not isinstance(getattr(self, option), bool):  # "False" would switch it on
                raise TypeError(f"{option} must be a bool, got {getattr(self, option)!r}")
        if self.predictor == EXACT_PREDICTOR:
            self._check_exact_schedule()
        elif isinstance(self.predictor, str):
            if self.predictor not in _METHOD_PARAMETER:
                raise ValueError(f"predictor must be one of {tuple(_METHOD_PARAMETER)} (fgcupy.predict_mask methods "
                                 f"that need no dense step), {EXACT_PREDICTOR!r} (exact masks from a dense call on "
                                 f"each refresh) or a callable, got {self.predictor!r}")
            needed = _METHOD_PARAMETER[self.predictor]
            if needed == "density" and self.density is None and "top_k" not in self.predictor_kwargs:
                object.__setattr__(self, "density", DEFAULT_DENSITY)
            given_top_k = "top_k" in self.predictor_kwargs
            if getattr(self, needed) is None and not (needed == "density" and given_top_k):
                raise ValueError(f"predictor={self.predictor!r} needs {needed}=..., got None")
            for other in set(_METHOD_PARAMETER.values()) - {needed}:
                if getattr(self, other) is not None:
                    raise ValueError(f"{other}={getattr(self, other)!r} does not apply to predictor={self.predictor!r} "
                                     f"(it takes {needed}; from another config, config.replace(...) resolves "
                                     "its defaults again where dataclasses.replace keeps them)")
        elif not callable(self.predictor):
            raise TypeError(f"predictor must be a method name or a callable, got {type(self.predictor).__name__}")
        else:
            given = [name for name in ("density", "tau", "threshold") if getattr(self, name) is not None]
            if given or self.predictor_kwargs:
                raise ValueError(f"a callable predictor is called as predictor(q, k, slice_m=...): "
                                 f"{', '.join(given + ['predictor_kwargs'] * bool(self.predictor_kwargs))} would "
                                 "not reach it (bind them into the callable)")
        for name in ("density", "tau"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.slice_m not in SLICE_SIZES:
            raise ValueError(f"slice_m must be one of {SLICE_SIZES} (sizes with a kernel), got {self.slice_m!r}")
        if self.dense_steps is not None and (not is_int(self.dense_steps) or self.dense_steps < 0):
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        if self.dense_steps is not None:
            object.__setattr__(self, "dense_steps", int(self.dense_steps))  # numpy integers as ints
        if self.refresh_every is not None and self.refresh_steps is not None:
            raise ValueError("refresh_every and refresh_steps both say when to refresh: give one of them "
                             "(refresh_steps lists every refresh step)")
        self._resolve_schedule_defaults()
        if self.refresh_steps is None and (not is_int(self.refresh_every) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be an int >= 1, got {self.refresh_every!r}")
        if is_int(self.refresh_every):
            object.__setattr__(self, "refresh_every", int(self.refresh_every))
        if not isinstance(self.refresh_ramp, bool):
            raise TypeError(f"refresh_ramp must be a bool, got {self.refresh_ramp!r}")
        if self.refresh_ramp and self.refresh_steps is not None:
            raise ValueError("refresh_ramp spaces the refreshes of refresh_every; refresh_steps lists every refresh "
                             "step: give one of them")
        if self.calibrate_pooling:
            if self.predictor != "topk":
                raise ValueError(f"calibrate_pooling compares masks of equal size: predictor='topk' only, "
                                 f"got predictor={self.predictor!r}")
            self._refuse_process_group("calibrate_pooling", "queries and keys")
            if "pooling" in self.predictor_kwargs:
                raise ValueError("calibrate_pooling chooses the pooling: predictor_kwargs may not set it")
        if self.compact_masks is not None and not isinstance(self.compact_masks, bool):
            raise TypeError(f"compact_masks must be a bool or None, got {self.compact_masks!r}")
        if self.compact_masks and self.process_group is not None:
            raise ValueError("compact_masks holds the masks of whole layers; with process_group each head group keeps "
                             "its own expanded mask: not with process_group (sequence parallel)")
        if not is_int(self.find_diagonals) or self.find_diagonals < 0:
            raise ValueError(f"find_diagonals must be an int >= 0 (diagonals per layer), got {self.find_diagonals!r}")
        object.__setattr__(self, "find_diagonals", int(self.find_diagonals))
        if self.find_diagonals:
            if self.predictor not in _MEAN_QUERY:
                raise ValueError(f"find_diagonals moves the exact band of the mean-query predictors {_MEAN_QUERY}, "
                                 f"got predictor={self.predictor!r}")
            self._refuse_process_group("find_diagonals", "queries and keys")
            if "diagonals" in self.predictor_kwargs:
                raise ValueError("find_diagonals finds the diagonals: predictor_kwargs may not set them")
        if self.estimate_first_mask:
            self._check_estimate_first_mask()
        if self.mask_from_warmup:
            self._check_mask_from_warmup()
            if self.calibrate_pooling:
                raise ValueError("calibrate_pooling makes a layer's first refresh from sampled queries, which would "
                                 "replace the warm-up's exact mask: not with mask_from_warmup=True")
        for option in ("find_diagonals", "calibrate_pooling"):
            if getattr(self, option) and self.predict_on_refresh is False:
                raise ValueError(f"{option} serves the refreshes that predict, but with predict_on_refresh=False none "
                                 "does: it would not be used")
        if self.sparse_refresh:
            self._check_sparse_refresh()
        self._check_local_search()
        self._check_refresh_trigger("refresh_on_drift", 0.0, 2.0, "1 - cosine similarity", upper_open=True)
        self._check_refresh_trigger("refresh_on_missed_mass", 1.0, math.inf, "a factor of the mask's first miss")
        object.__setattr__(self, "dense_layers", _int_tuple(self.dense_layers, "dense_layers"))
        if self.refresh_steps is not None:
            object.__setattr__(self, "refresh_steps", _int_tuple(self.refresh_steps, "refresh_steps"))
            warmup = [step for step in self.refresh_steps if step < self.dense_steps]
            if warmup:
                raise ValueError(f"refresh_steps {list(self.refresh_steps)} lists steps of the warm-up ({warmup} < "
                                 f"dense_steps={self.dense_steps}), which run dense and make no mask: list sparse "
                                 "steps only")
        own = sorted(set(_METHOD_PARAMETER.values()) & set(self.predictor_kwargs))
        if own:
            raise ValueError(f"predictor_kwargs may not set {', '.join(own)}: give the config's own "
                             f"{', '.join(own)} (checked, and read by the exact masks and refreshes too)")
        if self.attention_fn is not None and not callable(self.attention_fn):
            raise TypeError(f"attention_fn must be callable, got {type(self.attention_fn).__name__}")
        if self.process_group is not None and self.attention_fn is not None:
            raise ValueError("attention_fn and process_group exclude each other: with a process group attention "
                             "runs in fgcupy.distributed.SequenceParallelAttention")
        unknown = set(self.parallel_options) - {"head_groups", "exchange", "key_tile"}
        if unknown:
            raise ValueError(f"parallel_options accepts head_groups, exchange and key_tile, got {sorted(unknown)}")
        if self.parallel_options and self.process_group is None:
            raise ValueError("parallel_options apply to sequence parallelism: give process_group too")
        if self.process_group is not None:
            from ..distributed import check_options

            check_options(**self.parallel_options)
        if isinstance(self.predictor, str):
            self._check_predictor_arguments()

    def replace(self, **changes) -> "SparseAttentionConfig":
        """A new config of the settings this one was given, with ``changes``; the defaults are
        resolved again for the new settings."""
        unknown = sorted(set(changes) - set(self._given))
        if unknown:
            raise TypeError(f"SparseAttentionConfig has no setting {', '.join(unknown)}")
        return type(self)(**{**self._given, **changes})

    def __hash__(self):
        """Over every setting, the dicts' items included (a config can key a dict or a cache)."""
        return hash(tuple(_hashable(getattr(self, f.name)) for f in fields(self)))

    def _resolve_schedule_defaults(self) -> None:
        """Fill the None defaults where sparse refreshes can work (a named predictor,
        no process_group, no calibrate_pooling): one dense step, whose exact mask is the first,
        and refreshes keeping its keys as candidates, every 20 sparse steps; with dense_steps=0
        (and without find_diagonals), the first mask is predicted and refreshes search
        around the old mask (its keys moved along the token grid, no prediction) on sparse steps
        1, 2, 4, 8, 16, then every 32. Elsewhere masks are predicted every 5 sparse steps."""
        named = isinstance(self.predictor, str) and self.predictor in _METHOD_PARAMETER
        sparse_possible = named and self.process_group is None and not self.calibrate_pooling
        if self.dense_steps is None:
            object.__setattr__(self, "dense_steps", DEFAULT_DENSE_STEPS if self._wants_warmup_mask(sparse_possible) else 0)
        if self.mask_from_warmup is None:
            object.__setattr__(self, "mask_from_warmup",
                               self.dense_steps >= 1 and sparse_possible and not self.estimate_first_mask)
        # From a predicted mask, refreshes search (no prediction) unless the predictor was asked
        # for diagonals, which only predicting refreshes score.
        search_start = sparse_possible and not self.find_diagonals and self.mask_from_warmup is not True
        if self.sparse_refresh is None:
            object.__setattr__(self, "sparse_refresh", search_start or (self.mask_from_warmup is True and named))
        if self.local_search is None:  # also wherever an option only a search uses is given
            asked = self.predict_on_refresh is False or self.grid is not None
            object.__setattr__(self, "local_search", self.sparse_refresh is True and (search_start or asked))
        searching = self.local_search is True and self.sparse_refresh is True and self.mask_from_warmup is not True
        if self.predict_on_refresh is None:  # a search from a predicted mask needs no prediction, unless
            # the predictor was asked for diagonals or calibrated poolings, which only predictions use
            object.__setattr__(self, "predict_on_refresh",
                               not searching or bool(self.find_diagonals) or bool(self.calibrate_pooling))
        if self.refresh_every is None and self.refresh_steps is None:  # listed steps need no period
            if self.mask_from_warmup is True and self.sparse_refresh is True:
                every = WARMUP_REFRESH_EVERY
            elif self.local_search is True and self.predict_on_refresh is False:
                # Each search improves the mask: by default the first ones come early (the ramp).
                if self.refresh_ramp is None and self.refresh_steps is None:
                    object.__setattr__(self, "refresh_ramp", True)
                every = SEARCH_REFRESH_EVERY if self.refresh_ramp else EVEN_SEARCH_REFRESH_EVERY
            else:
                every = DEFAULT_REFRESH_EVERY
            object.__setattr__(self, "refresh_every", every)
        if self.refresh_ramp is None:
            object.__setattr__(self, "refresh_ramp", False)

    def _wants_warmup_mask(self, sparse_possible: bool) -> bool:
        """Whether the default dense_steps is the warm-up's: asked for (mask_from_warmup=True), or
        possible and kept to the end, that is no option of the schedule without dense steps
        (refreshes that never predict, the ramp), no predicting refreshes that would replace the
        exact mask (sparse_refresh=False), no list of refresh steps (taken as given), no grid (the
        search's), no estimated first mask."""
        if self.mask_from_warmup is not None:
            return self.mask_from_warmup
        return (sparse_possible and self.estimate_first_mask is not True and self.sparse_refresh is not False
                and self.predict_on_refresh is not False
                and self.refresh_ramp is not True and self.refresh_steps is None and self.grid is None)

    def mask_making(self) -> str:
        """How this schedule makes masks, in words (the first line of ``handle.describe()``)."""
        predictor = self.predictor if isinstance(self.predictor, str) else "a callable predictor"
        if self.exact:
            return "masks: the exact column max of a dense call on each refresh"
        first = ("the exact column max of the last warm-up step" if self.mask_from_warmup
                 else "the exact column max with estimated LSEs" if self.estimate_first_mask
                 else f"predicted ({predictor})")
        if not self.sparse_refresh:
            later = f"predicted ({predictor})"
        else:
            candidates = ["the old mask's keys"]
            if self.predict_on_refresh:
                candidates.append(f"the {predictor} predictor's")
            if self.local_search:
                candidates.append("their moves along the token grid")
            later = "sparse: the exact column max over " + ", ".join(candidates)
        return f"masks: first {first}; refreshes {later}"

    def schedule_summary(self, steps: int = 50) -> str:
        """Which of the first ``steps`` steps run dense and which make new masks, in words."""
        dense = [s for s in range(steps) if self.is_dense_step(s)]
        refresh = [s for s in range(steps) if self.is_refresh_step(s)]  # dense steps make none
        return f"of the first {steps} steps: dense {dense or 'none'}; new masks on {refresh or 'none'}"

    @property
    def exact(self) -> bool:
        """Whether refresh calls run dense and predict exact column-max masks from their LSE."""
        return self.predictor == EXACT_PREDICTOR

    def _check_exact_schedule(self) -> None:
        given = [name for name in _RULE_OF_PARAMETER if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"predictor={EXACT_PREDICTOR!r} selects by one rule: give one of density, tau, threshold, "
                             f"got {given}")
        if {"rule", "lse", "scale"} & set(self.predictor_kwargs):
            raise ValueError(f"predictor={EXACT_PREDICTOR!r} takes its rule from density / tau / threshold and its "
                             f"lse (at the model's attention scale) from the dense call: predictor_kwargs may not set "
                             f"'rule', 'lse' or 'scale'")
        if not given and not ("top_k" in self.predictor_kwargs):
            object.__setattr__(self, "density", DEFAULT_DENSITY)
        self._refuse_process_group(f"predictor={EXACT_PREDICTOR!r}", "LSE", "; use a predicted mask there")

    def _check_mask_from_warmup(self) -> None:
        if not isinstance(self.mask_from_warmup, bool):
            raise TypeError(f"mask_from_warmup must be a bool, got {self.mask_from_warmup!r}")
        if self.dense_steps < 1:
            raise ValueError("mask_from_warmup makes the first mask on the last dense warm-up step: it needs "
                             f"dense_steps >= 1, got {self.dense_steps}")
        if not isinstance(self.predictor, str):
            raise ValueError("mask_from_warmup selects the exact mask by the predictor's density / tau / threshold: "
                             "a callable predictor has none; give a named predictor")
        self._refuse_process_group("mask_from_warmup", "LSE")

    def _check_refresh_trigger(self, name: str, lower: float, upper: float, meaning: str,
                               upper_open: bool = False) -> None:
        """A refresh_on_* threshold: a number in (lower, upper] (finite; (lower, upper) with
        ``upper_open``, where no reading exceeds upper), and per rank, so not with process_group."""
        value = getattr(self, name)
        if value is None:
            return
        number = not isinstance(value, bool) and isinstance(value, (int, float))
        inside = number and (lower < value < upper if upper_open else lower < value <= upper)
        if not inside or not math.isfinite(value):
            bounds = f"({lower:g}, {upper:g}{')' if upper_open else ']'}" if math.isfinite(upper) else f"({lower:g}, inf)"
            raise ValueError(f"{name} must be a number in {bounds} ({meaning}), got {value!r}")
        if self.process_group is not None:
            raise ValueError(f"{name} decides per rank from its own shard: not with process_group (the ranks "
                             "must refresh together); use refresh_every or refresh_steps")

    def _check_sparse_refresh(self) -> None:
        if not isinstance(self.sparse_refresh, bool):
            raise TypeError(f"sparse_refresh must be a bool, got {self.sparse_refresh!r}")
        if self.predictor not in _METHOD_PARAMETER:
            raise ValueError(f"sparse_refresh adds the keys of a named predictor {tuple(_METHOD_PARAMETER)} to the "
                             f"old mask's and selects by its parameter, got predictor={self.predictor!r}")
        self._refuse_process_group("sparse_refresh", "queries, keys and LSE")

    def _check_local_search(self) -> None:
        if not isinstance(self.local_search, bool):
            raise TypeError(f"local_search must be a bool, got {self.local_search!r}")
        if not (isinstance(self.predictor, str) and self.predictor in _METHOD_PARAMETER):
            given = [option for option, on in (("local_search=True", self.local_search),
                                               ("predict_on_refresh=False", self.predict_on_refresh is False),
                                               ("grid", self.grid is not None)) if on]
            if given:
                raise ValueError(f"{', '.join(given)}: a local search refreshes the masks of a named predictor "
                                 f"{tuple(_METHOD_PARAMETER)} from sparse steps, got predictor={self.predictor!r}")
        if self.local_search and not self.sparse_refresh:
            raise ValueError("local_search adds candidates to a sparse refresh: set sparse_refresh=True too")
        if not isinstance(self.predict_on_refresh, bool):
            raise TypeError(f"predict_on_refresh must be a bool, got {self.predict_on_refresh!r}")
        if not self.predict_on_refresh and not self.local_search:
            raise ValueError("predict_on_refresh=False leaves a sparse refresh only the old mask's keys: it needs "
                             "local_search=True")
        if self.grid is not None:
            if not self.local_search:
                raise ValueError("grid is read by local_search only: set local_search=True or leave grid None")
            grid_offsets(self.grid)
            object.__setattr__(self, "grid", tuple(self.grid))

    def _check_estimate_first_mask(self) -> None:
        if not (isinstance(self.predictor, str) and self.predictor in _METHOD_PARAMETER):
            raise ValueError(f"estimate_first_mask selects by a named predictor's density / tau / threshold "
                             f"{tuple(_METHOD_PARAMETER)}, got predictor={self.predictor!r}")
        if self.mask_from_warmup:
            raise ValueError("estimate_first_mask and mask_from_warmup=True both make a layer's first mask: give one")
        if self.calibrate_pooling:
            raise ValueError("calibrate_pooling's refresh makes a layer's first mask: not with estimate_first_mask")
        self._refuse_process_group("estimate_first_mask", "queries and keys")

    def _refuse_process_group(self, option: str, needs: str, hint: str = "") -> None:
        if self.process_group is not None:
            raise ValueError(f"{option} needs each layer's full-sequence {needs} on one device: not with process_group "
                             f"(sequence parallel){hint}")

    def _check_predictor_arguments(self) -> None:
        """Refuse now what predict_mask would refuse at the first sparse step."""
        import inspect

        from ..mask_request import AUTO_OPTIONS, LONGEST_KV, check_options, check_workspace_bytes, make_request

        kwargs = self.predictor_arguments()
        allowed = set(inspect.signature(make_request).parameters) - {"head_dim", "kv_len", "slice_m", "method"}
        allowed.add("workspace_bytes")
        if "layout" in kwargs:
            raise ValueError("predictor_kwargs may not set 'layout': the processors give the predictor [B, H, S, D] "
                             "(\"HND\") views of the model's q and k")
        supplied = sorted(set(kwargs) & {"slice_m", "candidates", "q", "k", "method", "lse"})
        if supplied:
            raise ValueError(f"predictor_kwargs may not set {supplied}: the integration gives the predictor these "
                             "(slice_m: the config's own; method: its predictor; lse: a dense or sparse step's)")
        top_k = kwargs.get("top_k")
        if top_k is not None and not (is_int(top_k) and top_k >= 1):
            raise ValueError(f"predictor_kwargs' top_k must be an int >= 1 (an empty mask gives zeros), got {top_k!r}")
        unknown = set(kwargs) - allowed
        if unknown:
            raise ValueError(f"predictor_kwargs holds options predict_mask does not take: {sorted(unknown)}")
        if "workspace_bytes" in kwargs:
            check_workspace_bytes(kwargs["workspace_bytes"])
        if self.predictor == "auto":
            takes = [name for name in AUTO_OPTIONS if name not in ("layout", "density")]  # density: the config's
            others = sorted(set(kwargs) - {"density", *takes})
            if others:
                raise ValueError(f"predictor='auto' takes {takes} in predictor_kwargs, got {others}")
            self._refuse_process_group("predictor='auto'", "queries and keys")
        checked = {name: value for name, value in kwargs.items() if name != "workspace_bytes"}
        if isinstance(checked.get("pooling"), (list, tuple)) and self.process_group is not None:
            raise ValueError("a pooling per head does not apply with process_group (each rank predicts a share "
                             "of the heads): give one pooling")
        # At the longest sequence: a video model's are long, and a count that fails there fails deep in a run.
        check_options(self.slice_m, self.predictor, checked, LONGEST_KV)
        runtime_options = []  # what the handle adds to these options at run time
        if self.calibrate_pooling:
            from ..calibration import DEFAULT_CANDIDATES

            runtime_options += [("calibrate_pooling tries", {"pooling": p}) for p in DEFAULT_CANDIDATES]
        if self.find_diagonals:
            runtime_options.append(("find_diagonals adds", {"diagonals": (self.slice_m,)}))
        for what, extra in runtime_options:
            try:
                check_options(self.slice_m, self.predictor, {**checked, **extra}, LONGEST_KV)
            except ValueError as err:
                shown = ", ".join(f"{k}={v!r}" for k, v in extra.items())
                raise ValueError(f"{what} {shown}, which predictor_kwargs do not allow: {err}") from None

    def mask_cache(self) -> MaskCache:
        """An empty MaskCache with this schedule; masks are kept expanded, so reuse costs no
        conversion, or compact (``compact_masks=True``; with None the handle chooses before
        its first mask)."""
        return MaskCache(warmup=self.dense_steps, refresh_every=self.refresh_every, refresh_steps=self.refresh_steps,
                         ramp=self.refresh_ramp, expanded=self.compact_masks is not True)

    def is_dense_step(self, step: int) -> bool:
        return self.mask_cache().action(step) == "dense"

    def is_refresh_step(self, step: int) -> bool:
        """Whether the schedule predicts new masks on ``step``: the first sparse step, where no
        layer has a mask yet (unless mask_from_warmup gives it the warm-up's), and the refreshes."""
        if step == self.dense_steps:
            return not self.mask_from_warmup
        return self.mask_cache().action(step) == "refresh"

    def predictor_arguments(self) -> dict:
        """predict_mask's keyword arguments: the chosen method's own parameter (density for
        "topk", tau for "tau", threshold for "threshold"; for "colmax" the rule of the one given)
        and ``predictor_kwargs``."""
        args = {}
        if self.exact:
            for name, rule in _RULE_OF_PARAMETER.items():
                if getattr(self, name) is not None:
                    args.update(rule=rule, **{name: getattr(self, name)})
            if not args:  # top_k in predictor_kwargs
                args["rule"] = "topk"
        elif isinstance(self.predictor, str):
            name = _METHOD_PARAMETER[self.predictor]
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        args.update(self.predictor_kwargs)
        return args

    def exact_arguments(self) -> dict:
        """predict_mask's keyword arguments for an exact column-max mask (method "colmax"): the
        rule of the predictor's own parameter and the selection options of predictor_kwargs."""
        args = self.predictor_arguments()
        if self.exact:
            return args
        kept = (_METHOD_PARAMETER[self.predictor], *_SELECTION_OPTIONS)
        return {"rule": _RULE_OF_PARAMETER[_METHOD_PARAMETER[self.predictor]],
                **{key: value for key, value in args.items() if key in kept}}


class _ReadOnlyDict(dict):
    """A config's predictor_kwargs or parallel_options: checked once when the config is made,
    so they cannot be changed afterwards (``replace`` makes a config with other options)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a SparseAttentionConfig's options are checked when it is made and cannot change: "
                        "config.replace(predictor_kwargs={...}) makes one with other options")

    __setitem__ = __delitem__ = __ior__ = clear = pop = popitem = setdefault = update = _refuse

    def __reduce__(self):
        return type(self), (dict(self),)


def _hashable(value):
    """``value`` with its dicts, lists and sets as hashable tuples and frozensets."""
    if isinstance(value, dict):
        return frozenset((key, _hashable(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(item) for item in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_hashable(item) for item in value)
    return value


def _int_tuple(values, what: str) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, got {type(values).__name__}")
    out = tuple(values)
    if any(not is_int(v) or v < 0 for v in out):
        raise ValueError(f"{what} must hold ints >= 0, got {out}")
    return tuple(sorted({int(v) for v in out}))
