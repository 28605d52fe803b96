"""Slice-size tuning: the slice size and predictor density meeting an error target at the
least scoring + attention time."""

from __future__ import annotations


import contextlib
import math
import warnings
from dataclasses import dataclass

import torch

from .. import bridge
from ..attention_kernel import block_order, check_inputs, launch_attention
from ..jit.spec import SLICE_SIZES
from ..mask import is_int, positive_int
from ..timing import cuda_time_ms
from .choice import planned_spec

# Densities tried by tune_slice before bisection between the last failing and first passing one.
DENSITY_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)


# Slice-size tuning
# ---------------------------------------------------------------------------------------------
@dataclass
class SliceTrial:
    slice_m: int
    density: float
    rel_l2: float
    scoring_ms: float | None = None
    attention_ms: float | None = None

    @property
    def total_ms(self) -> float | None:
        if self.scoring_ms is None or self.attention_ms is None:
            return None
        return self.scoring_ms + self.attention_ms


@dataclass
class SliceChoice:
    slice_m: int
    density: float
    rel_l2: float
    met_target: bool
    scoring_ms: float
    attention_ms: float
    heads_sampled: int
    heads_total: int
    trials: list[SliceTrial]

    @property
    def total_ms(self) -> float:
        """Scoring + attention on the sampled heads."""
        return self.scoring_ms + self.attention_ms

    @property
    def estimated_full_ms(self) -> float:
        """Both parts scale with heads: the sample's time times heads_total / heads_sampled."""
        return self.total_ms * self.heads_total / self.heads_sampled


def _event_timer(fn, label=None, warmup: int = 2, reps: int = 7) -> float:
    """Median CUDA-event milliseconds of ``fn`` on torch's current stream."""
    return cuda_time_ms(fn, warmup=warmup, reps=reps)["median_ms"]


def _kernel_attend(q, k, v, mask):
    """Attention through the kernel ``SparseAttention.plan`` would pick (contiguous [B, H, S, D]
    CUDA tensors; a predictor's mask checked against them as a plan's run checks it)."""
    if q.device.type != "cuda":
        raise ValueError(f"tune_slice times the attention kernel, which needs CUDA tensors; q is on {q.device} "
                         "(pass attend= to tune another attention)")
    out = torch.empty_like(q)
    spec = planned_spec(mask, q.shape[-1], bridge.dtype_name(q.dtype, "q"))
    check_inputs(q, k, v, mask, spec)
    launch_attention(spec, q, k, v, out, None, mask, block_order(mask), 1.0 / math.sqrt(q.shape[-1]))
    return out


def tune_slice(q, k, v, target: float, *, layout: str = "HND", slice_sizes=SLICE_SIZES,
               densities=DENSITY_GRID, heads: int = 4, refine: int = 3, predictor=None, attend=None,
               timer=None, progress=None) -> SliceChoice:
    """Slice size M and predictor density meeting ``rel L2 <= target`` (vs dense float32
    attention) at the least scoring + attention time, measured on ``heads`` sampled heads.

    For each M the densities are tried in increasing order (error falls as density rises); the
    step from the last failing to the first passing density is bisected ``refine`` times. If no
    M meets the target, the most accurate trial is returned with ``met_target=False`` and a
    warning. ``predictor(q, k, slice_m=, method="topk", density=)`` defaults to
    ``fgcupy.scoring.predict_mask``; ``attend(q, k, v, mask)`` to the slice kernel;
    ``timer(fn, label) -> ms`` to CUDA events.
    """
    from ..layout import query_key_views, to_bhsd

    if isinstance(target, bool) or not (isinstance(target, (int, float)) and target > 0):
        raise ValueError(f"target must be a positive relative L2 error, got {target!r}")
    if not is_int(refine) or refine < 0:
        raise ValueError(f"refine must be a non-negative int (bisection steps), got {refine!r}")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must be in (0, 1], got {densities!r}")
    if not slice_sizes or any(m not in SLICE_SIZES for m in slice_sizes):
        raise ValueError(f"slice_sizes must be a non-empty list of {SLICE_SIZES}, got {slice_sizes!r}")
    heads = positive_int("heads", heads)
    if predictor is None:
        try:
            from ..scoring import predict_mask as predictor
        except ImportError as err:
            raise ImportError("fgcupy.scoring.predict_mask is not available; pass predictor=") from err
    attend = attend or _kernel_attend
    timer = timer or _event_timer
    progress = progress or (lambda line: None)
    densities = sorted(set(float(d) for d in densities))

    q, k = query_key_views(q, k, layout)
    v = to_bhsd(bridge.to_torch(v, "v"), layout, "v")
    if v.shape != k.shape or v.device != k.device:
        raise ValueError(f"v must match k ([B, H, S, D], device): got {tuple(v.shape)} on {v.device} and "
                         f"{tuple(k.shape)} on {k.device}")
    # Events and syncs go to torch's current device: make it q's.
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        return _tune_slice(q, k, v, target, slice_sizes, densities, heads, refine, predictor, attend, timer, progress)


def _tune_slice(q, k, v, target, slice_sizes, densities, heads, refine, predictor, attend, timer, progress):
    from ..reference import dense_attention, relative_l2

    batch, n_heads = q.shape[:2]
    total = batch * n_heads
    pick = torch.linspace(0, total - 1, min(heads, total)).round().long().unique()
    qs, ks, vs = (x.flatten(0, 1)[pick.to(x.device)].unsqueeze(0).contiguous() for x in (q, k, v))
    ref = dense_attention(qs, ks, vs)
    trials: list[SliceTrial] = []

    def evaluate(m: int, d: float) -> SliceTrial:
        mask = predictor(qs, ks, slice_m=m, method="topk", density=d)
        err = relative_l2(attend(qs, ks, vs, mask).float(), ref)
        trial = SliceTrial(m, d, err)
        trials.append(trial)
        progress(f"M={m} density={d:.4g}: rel L2 {err:.3e}" + (" (meets target)" if err <= target else ""))
        return trial

    picks: list[tuple[bool, SliceTrial]] = []
    for m in slice_sizes:
        passing, last_fail = None, None
        for d in densities:
            t = evaluate(m, d)
            if t.rel_l2 <= target:
                passing = t
                break
            last_fail = t
        if passing is not None and last_fail is not None:
            lo, hi = last_fail.density, passing.density
            for _ in range(refine):
                t = evaluate(m, (lo + hi) / 2)
                if t.rel_l2 <= target:
                    passing, hi = t, t.density
                else:
                    lo = t.density
        chosen = passing or min((t for t in trials if t.slice_m == m), key=lambda t: t.rel_l2)
        mask = predictor(qs, ks, slice_m=m, method="topk", density=chosen.density)
        chosen.scoring_ms = timer(lambda: predictor(qs, ks, slice_m=m, method="topk", density=chosen.density),
                                  {"stage": "scoring", "slice_m": m, "density": chosen.density})
        chosen.attention_ms = timer(lambda: attend(qs, ks, vs, mask),
                                    {"stage": "attention", "slice_m": m, "density": chosen.density})
        progress(f"M={m}: density {chosen.density:.4g}, scoring {chosen.scoring_ms:.3f} ms + attention "
                 f"{chosen.attention_ms:.3f} ms")
        picks.append((passing is not None, chosen))

    met = [t for ok, t in picks if ok]
    if met:
        best = min(met, key=lambda t: (t.total_ms, t.rel_l2))
    else:
        best = min((t for _, t in picks), key=lambda t: (t.rel_l2, t.total_ms))
        warnings.warn(f"fgcupy autotune: no slice size meets rel L2 <= {target:g}; the best is "
                      f"{best.rel_l2:.3e} (M={best.slice_m}, density {best.density:g})", RuntimeWarning, stacklevel=2)
    return SliceChoice(best.slice_m, best.density, best.rel_l2, bool(met), best.scoring_ms, best.attention_ms,
                       len(pick), total, trials)
