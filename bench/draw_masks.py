"""Draw the predicted and the oracle slice mask of one head side by side (PNG).

    python -m bench.draw_masks --family window2d --density 0.1 --out masks.png
    python -m bench.draw_masks --pattern mixed --head 2 --grid 4 30 52 --device cpu

Inputs: a head family of fgcupy.head_families or a pattern of fgcupy.workloads, on the
preset's latent grid (or --grid T H W). Panels: the default predictor ("auto"), the cheap top-k alone, one mean query per
block, and the oracle (exact column-max top-k) at the same density, each with its block cover
shaded and its error / the oracle's error in the title.
"""

from __future__ import annotations

import argparse

import torch

from fgcupy import predict_mask
from fgcupy.head_families import FAMILIES, family_qkv, family_shape
from fgcupy.oracle import Judge
from fgcupy.plot import draw_masks
from fgcupy.workloads import PATTERNS, SHAPES, video_qkv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--family", choices=list(FAMILIES), default=None)
    source.add_argument("--pattern", choices=list(PATTERNS), default=None)
    parser.add_argument("--preset", default="wan14b-480p", choices=sorted(SHAPES))
    parser.add_argument("--grid", type=int, nargs=3, metavar=("T", "H", "W"), help="latent grid (default: the preset's)")
    parser.add_argument("--head", type=int, default=0)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="masks.png")
    args = parser.parse_args(argv)
    if args.head < 0:
        parser.error(f"--head must be a head index >= 0, got {args.head}")
    if not 0 < args.density <= 1:  # before the dense attention the oracle needs
        parser.error(f"--density must be in (0, 1], got {args.density}")

    shape = family_shape(args.preset, args.grid)
    if args.pattern:
        q, k, v = video_qkv(shape, args.pattern, head_ids=[args.head], device=args.device)
        what = f"pattern {args.pattern}, head {args.head}"
    else:
        family = args.family or "window2d"
        q, k, v = family_qkv(shape, family, heads=args.head + 1, device=args.device)
        q, k, v = (t[:, args.head : args.head + 1].contiguous() for t in (q, k, v))
        what = f"family {family}, head {args.head}"
    judge = Judge(q, k, v)
    masks = {}
    for label, kw in (("default (auto)", {}), ("topk", dict(method="topk")),
                      ("mean query", dict(method="topk", pool=None, exact_band=None))):
        mask = predict_mask(q, k, 128, density=args.density, **kw)
        _, ratio = judge.ratio(mask)
        masks[f"{label} (x{ratio:.2f} oracle error)"] = mask
    masks["oracle"] = judge.oracle(args.density)
    title = f"{what}, {shape.name} grid {shape.grid}, density {args.density}"
    print(f"wrote {draw_masks(masks, args.out, title=title)}: {title}")


if __name__ == "__main__":
    main()
