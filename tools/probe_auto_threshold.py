"""How the flag threshold of ``method="auto"`` trades quality for cost, head by head.

For each head family (fgcupy.head_families, and fgcupy.workloads' patterns) and density, each
head's check ratio (the cheap mask's estimated output error, its square less
``auto_mask.ERROR_FLOOR`` squared, over its best mask's, the larger of the evenly spread and
the widest blocks: the threshold is ``auto_mask.ERROR_RATIO``) and its missed-mass ratio (the
cheap mask's missed share less ``MISS_FLOOR`` over the best mask's: flagged past
``MISS_RATIO`` whatever the threshold) beside its own error ÷ its own oracle error through the
cheap mask and through the mask "auto" gives a flagged head. Then, per threshold of the check
ratio, how many heads are flagged and the family's error ÷ the oracle's with those choices
(errors add over heads as squared norms, as ``fgcupy.oracle.Judge`` reads them over all
heads), with the floor and with each of ``--floors``.

    PYTHONPATH=. python -m tools.probe_auto_threshold [--grid T H W] [--heads 8]
        [--densities 0.1 0.3] [--families ...] [--thresholds 1.2 1.5 2] [--floors 3e-4]
        [--device cuda] [--rounding]

``--rounding`` prints instead, per family, the check's estimated errors where both masks keep
every key (their true errors 0): what the LSE's rounding alone reads, the floor's yardstick.
"""

from __future__ import annotations

import argparse
import math
from unittest import mock

import torch

from fgcupy import auto_mask, predict_mask
from fgcupy.gpu_prediction import DEFAULT_WORKSPACE
from fgcupy.head_families import FAMILIES, WORKLOAD_FAMILIES, family_or_workload_qkv, family_shape
from fgcupy.oracle import Judge
from fgcupy.reference import reference_attention

def squared_errors(judge: Judge, mask) -> torch.Tensor:
    """float64 [H]: each head's squared L2 distance from dense attention, summed over the batch."""
    out, _ = reference_attention(judge.q, judge.k, judge.v, mask, scale=judge.scale, rows_per_chunk=2048)
    return (out.double() - judge.dense.double()).square().sum(dim=(0, 2, 3)).cpu()


def _over_best(excess, best) -> torch.Tensor:
    """float64 [H]: excess / best (inf where only best is 0, 0 where both are), the larger of any
    batch entry and either group of blocks."""
    best = best.double()
    ratio = torch.where(best > 0, excess / best.clamp_min(1e-300), torch.where(excess > 0, math.inf, 0.0))
    return ratio.amax(dim=(0, 2)).cpu()


def _ratio(measure, best, floor: float = 0.0) -> torch.Tensor:
    """float64 [H]: sqrt(measure^2 - floor^2) / best, the ratio above which a head is not flagged."""
    return _over_best((measure.double().square() - floor**2).clamp_min(0).sqrt(), best)


def check_ratios(q, k, cheap, density: float, scale: float, floors) -> tuple:
    """(float64 [F, H] the error ratio above which each head would not be flagged, with each of
    the F ``floors``, float64 [H] its missed-mass ratio, bool [H] whether the missed mass flags
    it, float64 [H, 2] the cheap and the best mask's largest estimated errors)."""
    rule = dict(density=density, top_k=None, scale=scale, workspace_bytes=DEFAULT_WORKSPACE)
    check = auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule)
    errors = torch.stack([e.double().amax(dim=(0, 2)).cpu() for e in (check.error, check.best_error)], -1)
    ratios = torch.stack([_ratio(check.error, check.best_error, floor) for floor in floors])
    masses = _over_best(check.missed.double() - auto_mask.MISS_FLOOR, check.best_missed)
    return ratios, masses, auto_mask.misses_more(check).any(-1).any(0).cpu(), errors


def flagged_mask(q, k, density: float):
    """The mask "auto" gives with every head flagged by its first check (its later checks, of
    the estimate, as they are)."""
    real = auto_mask.flagged_heads
    first = []

    def every_head_first(check):
        if not first:
            first.append(True)
            return list(range(check.missed.shape[1]))
        return real(check)

    with mock.patch.object(auto_mask, "flagged_heads", every_head_first):
        return predict_mask(q, k, 128, "auto", density=density)


def over(squared, oracle_squared) -> float:
    """An error ÷ the oracle's, from their squares (1 where both are 0)."""
    squared, oracle_squared = float(squared), float(oracle_squared)
    if oracle_squared > 0:
        return math.sqrt(squared / oracle_squared)
    return 1.0 if squared == 0 else math.inf


def summary(name, density, ratios, floors, masses, by_mass, estimates, cheap, flagged, oracle, thresholds) -> list:
    """Lines: each head, then each (floor, threshold)'s flagged count and family error ÷ oracle
    error. ``ratios`` [F, H]: each head's check ratio with each of the F ``floors``; ``by_mass``
    [H]: heads the missed mass flags at any threshold."""
    lines = [f"## {name} d={density}"]
    for h in range(ratios.shape[1]):
        lines.append(f"  head {h}: check x{ratios[0, h]:.2f} ({estimates[h, 0]:.2g} / {estimates[h, 1]:.2g})  "
                     f"mass x{masses[h]:.2f}  cheap x{over(cheap[h], oracle[h]):.2f}  "
                     f"flagged path x{over(flagged[h], oracle[h]):.2f}")
    rows = []
    for floor, floor_ratios in zip(floors, ratios):
        for t in thresholds:
            flags = (floor_ratios > t) | by_mass
            chosen = torch.where(flags, flagged, cheap)
            rows.append(((floor, t), int(flags.sum()), over(chosen.sum(), oracle.sum())))
            lines.append(f"  floor {floor:g} threshold {t:g}: {rows[-1][1]} of {len(floor_ratios)} flagged, "
                         f"family x{rows[-1][2]:.2f}")
    return lines, rows


def rounding(shape, families, heads: int, device) -> None:
    """Per family: the largest estimated error of the check's two masks where both keep every
    key, and whether any head is flagged (none should be)."""
    for name in families:
        q, k, _ = family_or_workload_qkv(shape, name, heads=heads, device=device)
        scale = q.shape[-1] ** -0.5
        rule = dict(density=1.0, top_k=None, scale=scale, workspace_bytes=DEFAULT_WORKSPACE)
        every_key = predict_mask(q, k, 128, "topk", density=1.0)
        check = auto_mask.check_heads(q, k, every_key, predict_mask, scale, rule)
        print(f"  {name}: estimated error up to {check.error.max().item():.3g} (best mask "
              f"{check.best_error.max().item():.3g}), missed share up to {check.missed.max().item():.3g}, "
              f"heads flagged {auto_mask.flagged_heads(check)}", flush=True)
        del q, k, every_key, check


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-480p")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"), help="latent grid (default: the preset's)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES) + WORKLOAD_FAMILIES)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.2, 1.3, 1.4, 1.5, 1.7, 2.0, 3.0],
                        help="thresholds of the error ratio (the missed mass flags past MISS_RATIO at each)")
    parser.add_argument("--floors", type=float, nargs="*", default=[],
                        help="floors to try beside auto_mask.ERROR_FLOOR")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounding", action="store_true",
                        help="the check's estimated errors where both masks keep every key, per family")
    args = parser.parse_args(argv)
    shape = family_shape(args.preset, tuple(args.grid) if args.grid else None)
    device = torch.device(args.device)
    print(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", shape.name, shape.grid, flush=True)
    if args.rounding:
        rounding(shape, args.families, args.heads, device)
        return
    floors = [auto_mask.ERROR_FLOOR] + [f for f in args.floors if f != auto_mask.ERROR_FLOOR]
    settings = [(f, t) for f in floors for t in args.thresholds]
    worst = {key: (0.0, "") for key in settings}
    flagged_total = {key: 0 for key in settings}
    for name in args.families:
        q, k, v = family_or_workload_qkv(shape, name, heads=args.heads, device=device)
        judge = Judge(q, k, v)
        for density in args.densities:
            cheap_mask = predict_mask(q, k, 128, "topk", density=density)
            ratios, masses, by_mass, estimates = check_ratios(q, k, cheap_mask, density, judge.scale, floors)
            errors = [squared_errors(judge, m) for m in (cheap_mask, flagged_mask(q, k, density),
                                                          judge.oracle(density))]
            lines, rows = summary(name, density, ratios, floors, masses, by_mass, estimates, *errors, args.thresholds)
            print("\n".join(lines), flush=True)
            for key, count, ratio in rows:
                flagged_total[key] += count
                if ratio > worst[key][0]:
                    worst[key] = (ratio, f"{name} d={density}")
        del q, k, v, judge
    print("## every family: per floor and threshold, the heads flagged and the worst family's error ÷ the oracle's")
    for floor, t in settings:
        print(f"  floor {floor:g} threshold {t:g}: {flagged_total[floor, t]} heads flagged, "
              f"worst x{worst[floor, t][0]:.2f} ({worst[floor, t][1]})")


if __name__ == "__main__":
    main()
