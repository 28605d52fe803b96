"""Figures from bench.report_peers' report.json: time vs density and error vs density.

    python -m bench.plot results/report.json   (writes time_vs_density.png, error_vs_density.png)
"""

from __future__ import annotations

import argparse
import json
import os


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="report.json written by bench.report_peers")
    return parser.parse_args(argv)


def main(argv=None):
    path = parse_args(argv).report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = json.load(open(path))
    folder = os.path.dirname(path)
    by = {}
    for r in report["rows"]:
        by.setdefault(r["method"], []).append(r)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (method, rows) in enumerate(by.items()):
        rows = sorted(rows, key=lambda r: r["density"])
        xs, ys = [r["density"] for r in rows], [r["ms"] for r in rows]
        if len(rows) == 1 and xs[0] == 1.0:  # a dense baseline: a line across the densities
            ax.axhline(ys[0], linestyle="--", linewidth=1, label=f"{method} (dense)", color=f"C{i}")
        else:
            ax.plot(xs, ys, marker="o", label=method, color=f"C{i}")
    ax.set_xlabel("density (slices kept for fgcupy; blocks computed for FlexAttention)")
    ax.set_ylabel("time (ms, median of CUDA-event timings)")
    ax.set_title(report["header"], fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "time_vs_density.png"), dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ("fgcupy", "flex-block-pooled"):
        rows = sorted((r for r in by.get(method, []) if r.get("rel_l2") is not None), key=lambda r: r["density"])
        if rows:
            ax.plot([r["density"] for r in rows], [r["rel_l2"] for r in rows], marker="o",
                    label={"fgcupy": "slice mask (default predictor)", "flex-block-pooled": "128x128 block mask (pooled scores)"}[method])
    ax.set_xlabel("density")
    ax.set_ylabel("relative L2 error vs dense float32")
    ax.set_yscale("log")
    ax.set_title(report["header"], fontsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "error_vs_density.png"), dpi=120)
    print(f"wrote {folder}/time_vs_density.png and {folder}/error_vs_density.png")


if __name__ == "__main__":
    main()
