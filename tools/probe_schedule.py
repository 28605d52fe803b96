"""Mask schedules over a whole denoising trajectory, per head family (a quality probe; CPU or GPU).

    PYTHONPATH=. python -m tools.probe_schedule [--grid 21x30x52] [--heads 8] [--device cuda]
        [--steps 50] [--dense-steps 5] [--drift 0.045] [--schedules default "search /5" ...]

With ``--dense-steps 0`` every step is sparse and only the schedules that start from a
prediction apply (SparseAttentionConfig's default is one dense step: ``--dense-steps 1``).

A head family's q and k drift step by step (fresh content noise of std ``--drift`` added to every
entry each step: a random walk, v kept). With ``--morph N`` the heads also turn, over the first N
steps, into another draw of the same family (q, k and v at angle pi/2 * step / N between the
seed's draw and the next seed's: other length scales, frequencies, regions, sinks), a trajectory
whose structure changes, not only its content noise. The first ``--dense-steps`` run dense; from then on each
schedule keeps its own mask, made or refreshed on its refresh steps (every N sparse steps from the
first) as SparseAttentionConfig would make it:

    default            the predictor (predict_mask top-k) on each refresh: SparseAttentionConfig's
                       predicted schedule (sparse_refresh=False)
    sparse /N          sparse_refresh=True: exact column max over the old mask's and the predictor's keys
    search /N          + local_search=True, predict_on_refresh=False: the old keys and their moves
                       by a token, a row or a frame of the grid (one kind a refresh, in turn)
    search ramp /N     the same, also refreshing on sparse steps 1, 2, 4, ... below N (MaskCache's ramp)
    search 1,3,...     the same, refreshing on the sparse steps listed
    warm-up ...        mask_from_warmup=True: the first mask is the exact column max of the last
                       dense step; "warm-up, reused" never refreshes; "warm-up + sparse /20" is
                       SparseAttentionConfig()'s default (one dense step); "ramp" also refreshes
                       on sparse steps 1, 2, 4, ... below N; "4,20" on the sparse steps listed;
                       "missed g" also refreshes on the sparse step after one where the mass the
                       mask misses (1 - fgcupy.cache.mask_recall) grew past g x its first reading
                       (SparseAttentionConfig(refresh_on_missed_mass=g))
    estimated ...      the first mask is the column max with each query's LSE estimated
                       (predict_mask(method="colmax", lse="estimate"): no dense step), then
                       refreshed as named

Every sparse step's mask is judged against that step's oracle (error / oracle error, the same
density), so a schedule pays for the steps its mask grows stale. Printed per family and density:
the mean ratio over the sparse steps, the last step's, and per refresh the candidates scored (as a
multiple of the mask's keys): what a refresh costs besides the attention call.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, replace

import torch

from fgcupy import predict_mask, sparse_attention
from fgcupy.cache import mask_recall, missed_more, refreshes_on
from fgcupy.head_families import FAMILIES, WORKLOAD_FAMILIES, family_or_workload_qkv
from fgcupy.local_search import refresh_topk, search_offsets, union_keys
from fgcupy.oracle import Judge
from fgcupy.workloads import SHAPES
from tools.probe_sparse_refresh import drifted

SLICE_M = 128


@dataclass(frozen=True)
class Schedule:
    """first: how the first sparse step's mask is made ("predict", "warm-up": the last dense
    step's exact mask, or "estimate": the column max with estimated LSEs); refresh: what a refresh does ("predict", "sparse", "search" or None: the
    mask is reused); every: sparse steps between refreshes."""

    first: str
    refresh: str | None
    every: int = 5
    ramp: bool = False  # also refresh on the powers of two below ``every`` (MaskCache's ramp)
    steps: tuple[int, ...] | None = None  # refresh on these sparse steps instead
    missed: float | None = None  # refresh_on_missed_mass: also refresh after the mass the mask misses grew past this x its first

    def refreshes(self, sparse_step: int) -> bool:
        if self.refresh is None or sparse_step == 0:
            return False
        return sparse_step in self.steps if self.steps is not None else refreshes_on(sparse_step, self.every, self.ramp)


SCHEDULES = {
    "default": Schedule("predict", "predict"),
    "sparse /5": Schedule("predict", "sparse"),
    "sparse /10": Schedule("predict", "sparse", 10),
    "sparse /20": Schedule("predict", "sparse", 20),
    "search /5": Schedule("predict", "search"),
    "search /10": Schedule("predict", "search", 10),
    "search ramp /16": Schedule("predict", "search", 16, ramp=True),
    "search ramp /32": Schedule("predict", "search", 32, ramp=True),
    "search 1,3,7,15,31": Schedule("predict", "search", steps=(1, 3, 7, 15, 31)),
    "search 1,4,12,28": Schedule("predict", "search", steps=(1, 4, 12, 28)),
    "warm-up, reused": Schedule("warm-up", None),
    "warm-up + default": Schedule("warm-up", "predict"),
    "warm-up + sparse /5": Schedule("warm-up", "sparse"),
    "warm-up + sparse /20": Schedule("warm-up", "sparse", 20),
    "warm-up + search /5": Schedule("warm-up", "search"),
    "warm-up + search /20": Schedule("warm-up", "search", 20),
    "warm-up + sparse ramp /20": Schedule("warm-up", "sparse", 20, ramp=True),
    "warm-up + sparse 4,20": Schedule("warm-up", "sparse", steps=(4, 20)),
    "warm-up + sparse /20 missed 1.5": Schedule("warm-up", "sparse", 20, missed=1.5),
    "warm-up + sparse /20 missed 2": Schedule("warm-up", "sparse", 20, missed=2.0),
    "estimated, reused": Schedule("estimate", None),
    "estimated + sparse /20": Schedule("estimate", "sparse", 20),
    "estimated + search ramp /32": Schedule("estimate", "search", 32, ramp=True),
}

class Run:
    """One schedule's mask over a trajectory, and what its refreshes scored."""

    def __init__(self, schedule: Schedule, density: float, grid):
        self.schedule, self.density, self.grid = schedule, density, grid
        self.mask, self.searches, self.scored = None, 0, []
        self.recall0, self.fell, self.triggered = None, False, []

    def step(self, sparse_step: int, q, k, v, warmup_mask) -> None:
        """Make or refresh the mask on sparse step ``sparse_step`` (0: the first) of q, k, v."""
        plan = self.schedule
        if sparse_step == 0:
            if plan.first == "estimate":
                self.mask = predict_mask(q, k, SLICE_M, "colmax", density=self.density, lse="estimate")
            else:
                self.mask = warmup_mask if plan.first == "warm-up" else self._predict(q, k)
        elif plan.refreshes(sparse_step) or self.fell:
            if self.fell and not plan.refreshes(sparse_step):
                self.triggered.append(sparse_step)
            self.fell, self.recall0 = False, None
            if plan.refresh == "predict":
                self.mask = self._predict(q, k)
                return
            if plan.refresh == "sparse":
                candidates = union_keys(self.mask, (0,), self._predict(q, k))
            else:
                candidates = union_keys(self.mask, search_offsets(self.grid, self.searches))
                self.searches += 1
            self.scored.append(candidates.density() / self.density)
            self.mask = refresh_topk(q, k, v, self.mask, candidates, self.density)
            return
        if plan.missed is not None:
            self._read_recall(q, k, v)

    def _read_recall(self, q, k, v) -> None:
        """SparseAttentionConfig(refresh_on_missed_mass=...): this sparse step's reading of the mass
        the mask keeps; one that misses more than ``missed`` x the first's refreshes on the next step."""
        _, lse = sparse_attention(q, k, v, self.mask, return_lse=True)
        recall = mask_recall(q, k, lse, q.shape[-1] ** -0.5)
        if self.recall0 is None:
            self.recall0 = recall
        else:
            self.fell = bool(missed_more(recall, self.recall0, self.schedule.missed))

    def _predict(self, q, k):
        return predict_mask(q, k, SLICE_M, "topk", density=self.density)


def heads_of(args, shape, family: str, seed: int):
    return family_or_workload_qkv(shape, family, heads=args.heads, seed=seed, device=args.device)


class Morph:
    """q, k, v turning from one draw of a family into another over ``steps`` steps, plus the
    random walk of content noise."""

    def __init__(self, first, second, steps: int, drift: float, gen: torch.Generator):
        self.first, self.second, self.steps, self.drift, self.gen = first, second, steps, drift, gen
        self.noise = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in first[:2]]

    def at(self, step: int):
        if step:
            for n in self.noise:
                n += self.drift * torch.randn(n.shape, generator=self.gen).to(n.device)
        angle = math.pi / 2 * min(step / self.steps, 1.0)
        a, b = math.cos(angle), math.sin(angle)
        blend = [(a * x.float() + b * y.float()) for x, y in zip(self.first, self.second)]
        q, k, v = blend[0] + self.noise[0], blend[1] + self.noise[1], blend[2]
        return tuple(t.to(self.first[0].dtype) for t in (q, k, v))


def trajectory(args, shape, family: str, schedules: dict) -> None:
    q, k, v = heads_of(args, shape, family, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 7)
    morph = Morph((q, k, v), heads_of(args, shape, family, args.seed + 1), args.morph, args.drift, gen) if args.morph else None
    runs = {(name, d): Run(plan, d, shape.grid) for name, plan in schedules.items() for d in args.densities}
    ratios = {key: [] for key in runs}
    warmup = {}
    for step in range(args.steps):
        if morph is not None:
            q, k, v = morph.at(step)
        elif step:
            q, k = drifted(q, args.drift, gen), drifted(k, args.drift, gen)
        if step < args.dense_steps - 1:
            continue
        sparse_step = step - args.dense_steps
        if sparse_step < 0:  # the last warm-up step: its exact masks
            last_dense = Judge(q, k, v, SLICE_M)
            warmup = {d: last_dense.oracle(d) for d in args.densities}
            continue
        judge = Judge(q, k, v, SLICE_M) if sparse_step % args.judge_every == 0 or step == args.steps - 1 else None
        for (name, density), run in runs.items():
            run.step(sparse_step, q, k, v, warmup.get(density))
            if judge is not None:
                ratios[(name, density)].append(judge.ratio(run.mask)[1])
    for density in args.densities:
        for name in schedules:
            run, seen = runs[(name, density)], ratios[(name, density)]
            scored = (f"{sum(run.scored) / len(run.scored):.2f}x the mask's keys scored in {len(run.scored)} refreshes"
                      if run.scored else "")
            if run.schedule.missed is not None:
                scored += f" (on missed mass: sparse steps {run.triggered})"
            print(f"{family:17s} d={density}  {name:22s} mean x{sum(seen) / len(seen):.2f}  "
                  f"last x{seen[-1]:.2f}  worst x{max(seen):.2f}  {scored}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES),
                        choices=list(FAMILIES) + WORKLOAD_FAMILIES,
                        help="head families, or fgcupy.workloads patterns as workload-<pattern>")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--grid", default="5x30x52", help="frames x height x width of the token grid")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--drift", type=float, default=0.045, help="std of the content noise added each step")
    parser.add_argument("--morph", type=int, default=0,
                        help="steps over which the heads turn into another draw of their family (0: never)")
    parser.add_argument("--judge-every", type=int, default=1, help="judge every n-th sparse step (and the last)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.dense_steps < 0 or args.steps <= args.dense_steps:
        parser.error("needs 0 <= --dense-steps < --steps")
    if args.dense_steps == 0 and any(SCHEDULES[name].first == "warm-up" for name in args.schedules):
        parser.error("warm-up schedules need --dense-steps >= 1")
    grid = tuple(int(x) for x in args.grid.split("x"))
    shape = replace(SHAPES["wan14b-480p"], grid=grid, heads=args.heads)
    schedules = {name: SCHEDULES[name] for name in args.schedules}
    if args.morph < 0:
        parser.error("--morph must be >= 0")
    morph = f", turning into another draw over {args.morph} steps" if args.morph else ""
    print(f"grid {grid}, {args.heads} heads per family, {args.steps} steps ({args.dense_steps} dense), drift "
          f"{args.drift} a step{morph}, device {args.device}; error / that step's oracle error over the sparse steps",
          flush=True)
    for family in args.families:
        trajectory(args, shape, family, schedules)


if __name__ == "__main__":
    main()
