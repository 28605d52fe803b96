"""How the flag threshold of ``method="auto"`` trades quality for cost, head by head.

For each head family (fgcupy.head_families, and fgcupy.workloads' patterns) and density, each
head's check ratio (the cheap mask's missed share over its best mask's, less
``auto_mask.MISS_FLOOR``, the larger of the evenly spread and the widest blocks: a head is
flagged where this exceeds the threshold) beside its own error ÷ its own oracle error through
the cheap mask and through the mask "auto" gives a flagged head. Then, per threshold, how many
heads it flags and the family's error ÷ the oracle's with those choices (errors add over heads
as squared norms, as ``fgcupy.oracle.Judge`` reads them over all heads).

    PYTHONPATH=. python -m tools.probe_auto_threshold [--grid T H W] [--heads 8]
        [--densities 0.1 0.3] [--families ...] [--thresholds 1.2 1.5 2] [--device cuda]
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


def check_ratios(q, k, cheap, density: float, scale: float) -> torch.Tensor:
    """float64 [H]: the threshold above which each head would not be flagged."""
    rule = dict(density=density, top_k=None, scale=scale, workspace_bytes=DEFAULT_WORKSPACE)
    check = auto_mask.check_heads(q, k, cheap, predict_mask, scale, rule)
    missed, best = check.missed.double(), check.best_missed.double()
    excess = missed - auto_mask.MISS_FLOOR
    ratio = torch.where(best > 0, excess / best.clamp_min(1e-300), torch.where(excess > 0, math.inf, 0.0))
    return ratio.amax(dim=(0, 2)).cpu()  # any batch entry, either group of blocks


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


def summary(name, density, ratios, cheap, flagged, oracle, thresholds) -> list:
    """Lines: each head, then each threshold's flagged count and family error ÷ oracle error."""
    lines = [f"## {name} d={density}"]
    for h in range(len(ratios)):
        lines.append(f"  head {h}: check x{ratios[h]:.2f}  cheap x{over(cheap[h], oracle[h]):.2f}  "
                     f"flagged path x{over(flagged[h], oracle[h]):.2f}")
    rows = []
    for t in thresholds:
        chosen = torch.where(ratios > t, flagged, cheap)
        rows.append((t, int((ratios > t).sum()), over(chosen.sum(), oracle.sum())))
        lines.append(f"  threshold {t:g}: {rows[-1][1]} of {len(ratios)} flagged, family x{rows[-1][2]:.2f}")
    return lines, rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan14b-480p")
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"), help="latent grid (default: the preset's)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES) + WORKLOAD_FAMILIES)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.2, 1.3, 1.4, 1.5, 1.7, 2.0, 3.0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    shape = family_shape(args.preset, tuple(args.grid) if args.grid else None)
    device = torch.device(args.device)
    print(torch.cuda.get_device_name() if device.type == "cuda" else "cpu", shape.name, shape.grid, flush=True)
    worst = {t: (0.0, "") for t in args.thresholds}
    flagged_total = {t: 0 for t in args.thresholds}
    for name in args.families:
        q, k, v = family_or_workload_qkv(shape, name, heads=args.heads, device=device)
        judge = Judge(q, k, v)
        for density in args.densities:
            cheap_mask = predict_mask(q, k, 128, "topk", density=density)
            ratios = check_ratios(q, k, cheap_mask, density, judge.scale)
            errors = [squared_errors(judge, m) for m in (cheap_mask, flagged_mask(q, k, density),
                                                          judge.oracle(density))]
            lines, rows = summary(name, density, ratios, *errors, args.thresholds)
            print("\n".join(lines), flush=True)
            for t, count, ratio in rows:
                flagged_total[t] += count
                if ratio > worst[t][0]:
                    worst[t] = (ratio, f"{name} d={density}")
        del q, k, v, judge
    print("## every family: per threshold, the heads flagged and the worst family's error ÷ the oracle's")
    for t in args.thresholds:
        print(f"  threshold {t:g}: {flagged_total[t]} heads flagged, worst x{worst[t][0]:.2f} ({worst[t][1]})")


if __name__ == "__main__":
    main()
