"""Kernels built from other revisions' cuda_src/ beside the working tree's, in one process.

    PYTHONPATH=. python -m tools.ab_sources REV [REV ...] [--skip attention scoring]

Each REV's cuda_src/ (``git archive``) is unpacked into a temporary folder and the runtime is
pointed at one folder or another between timings (``use_sources``), in alternation, so every
build meets the same clocks. First each build's outputs are compared with the first REV's
(attention outputs, scores, and the keys of default predictions), then:
* attention: wan14b-480p dense and random key lists (0.3, 0.1), cogvideox5b dense, beside SDPA
  cuDNN; CUDA-event medians;
* selection: default predictions on flat rows (random inputs) at 32,760 and 75,600 tokens;
* scoring: the column-max pass (every query, groups of 128, LSE given; on the inputs and on their
  e4m3 copies), the default's pooled
  passes (pool 32: stats, max-probability over groups of 4), its fused exact band and whole
  default predictions (top-k 0.1 and 0.3), queued medians, beside the same run's SDPA cuDNN.
Each build is timed in ROUNDS alternating rounds; a line shows the median of its rounds' medians
(then each round's).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import tarfile
import tempfile
from pathlib import Path

import torch

import fgcupy.jit.runtime as runtime
import fgcupy.jit.source as source
from bench.cases import random_inputs, random_topk_mask, sdpa_call
from fgcupy import SliceMask, SparseAttention, mask_kernels, predict_mask
from fgcupy.attention_kernel import STAND_IN_ENV
from fgcupy.e4m3_kernels import gpu_heads_as_e4m3
from fgcupy.oracle import exact_lse
from fgcupy.reference import relative_l2
from fgcupy.timing import cuda_time_ms
from tools.scoring_setup import queued_ms, scoring_setup

ROUNDS = 3


def use_sources(folder: Path) -> None:
    """Compile and load kernels from ``folder`` from now on (its hash keys the disk cache)."""
    source.SOURCE_DIR = Path(folder)
    source.source_hash.cache_clear()
    source.read_source.cache_clear()
    runtime._kernels.clear()


def revision_sources(rev: str, into: Path) -> Path:
    """``rev``'s cuda_src/ unpacked under ``into``; a folder of kernel sources is taken as is
    (for a copy of the tree without its git history: ``git archive REV cuda_src | tar -x -C DIR``
    beforehand, then pass DIR/cuda_src)."""
    if Path(rev).is_dir():
        folder = Path(rev)
    else:
        repo = Path(__file__).resolve().parent.parent
        archive = subprocess.run(["git", "-C", str(repo), "archive", rev, "cuda_src"], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(into, filter="data")
        folder = into / "cuda_src"
    if not (folder / "adaptive_rows.cu").exists():
        # Earlier kernels write float32 max-probability scores into the bfloat16 rows the
        # launchers allocate: past their end.
        raise SystemExit(f"{rev}: kernels from before the bfloat16 score rows (no adaptive_rows.cu) do not fit "
                         "today's launchers; compare them with that revision's own tools")
    return folder


def _alternate(variants: dict, fn, timer, rounds: int = ROUNDS) -> dict:
    """{name: [times]}: ``timer(fn)`` under each variant's sources, ``rounds`` times in turn."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, folder in variants.items():
            use_sources(folder)
            times[name].append(timer(fn))
    return times


def _line(label: str, times: dict, base: float | None = None, unit: str = "x cuDNN") -> str:
    def cell(name, ts):
        middle = statistics.median(ts)  # of the rounds' medians: cuDNN's one median is no best-of
        extra = f" = {middle / base:.3f} {unit}" if base else ""
        return f"{name} {middle:.3f} ms{extra} ({' / '.join(f'{t:.3f}' for t in ts)})"

    return f"  {label:22s} " + " | ".join(cell(n, ts) for n, ts in times.items())


def attention(variants: dict) -> None:
    for preset, shape, densities in (("wan14b-480p", (1, 40, 32760, 128), (1.0, 0.3, 0.1)),
                                     ("cogvideox5b", (1, 48, 17550, 64), (1.0,))):
        _attention_preset(variants, preset, shape, densities)
        torch.cuda.empty_cache()


def _attention_preset(variants: dict, preset: str, shape: tuple, densities: tuple) -> None:
    B, H, S, D = shape
    event_ms = lambda fn: cuda_time_ms(fn, reps=10)["median_ms"]  # noqa: E731
    q, k, v = random_inputs(B, H, S, D)
    cudnn = event_ms(sdpa_call(q, k, v, "cudnn"))
    print(f"{preset}: SDPA cuDNN {cudnn:.2f} ms", flush=True)
    small = [t[:, :2, :2048].contiguous() for t in (q, k, v)]
    small_mask = random_topk_mask(1, 2, 2048, 2048, 128, 0.3)
    outs = {}
    for name, folder in variants.items():
        use_sources(folder)
        outs[name] = SparseAttention().plan(small_mask, head_dim=D, dtype=q.dtype).run(*small).float()
    first, *rest = outs
    for name in rest:
        print(f"  {name} against {first}: relative L2 {relative_l2(outs[name], outs[first]):.2e}")
    for density in densities:
        mask = (SliceMask.full(B, H, S, S, 128, device="cuda") if density == 1.0
                else random_topk_mask(B, H, S, S, 128, density))
        plan = SparseAttention().plan(mask, head_dim=D, dtype=q.dtype)
        times = _alternate(variants, lambda: plan.run(q, k, v), event_ms)
        print(_line(f"density {density}", times, cudnn * density, "x (d x cuDNN)"), flush=True)


def _same_keys(a, b) -> bool:
    """Whether two slice masks keep the same keys in every row (slots no row owns are not data)."""
    return all(torch.equal(x, y) for x, y in zip(a.flat_rows(), b.flat_rows()))


def _compare_masks(variants: dict, predict, label: str) -> None:
    """Print whether every variant's ``predict()`` keeps the same keys as the first variant's."""
    masks = {}
    for name, folder in variants.items():
        use_sources(folder)
        masks[name] = predict()
    first, *rest = masks
    for name in rest:
        same = _same_keys(masks[name], masks[first])
        print(f"  {label}: {name} {'keeps the same keys as' if same else 'DIFFERS from'} {first}")


def scoring(variants: dict) -> None:
    setup = scoring_setup()
    q, k, scale, pooled, pooled_lse, dense = setup.q, setup.k, setup.scale, setup.pooled, setup.pooled_lse, setup.dense_ms
    heads = setup.shape.heads
    lse = exact_lse(q, k, scale).reshape(heads, -1)
    base = mask_kernels.gpu_scores("maxprob", pooled, k, scale, lse=pooled_lse, group=4, warps=8)
    work = base.clone()
    heads_bh = q.shape[0] * q.shape[1]
    q8, k8, head_scale = gpu_heads_as_e4m3(q, k, 0, heads_bh)
    passes = {
        "column-max pass": lambda: mask_kernels.gpu_scores("maxprob", q, k, scale, lse=lse, group=128, warps=8,
                                                           kernel="wgmma"),
        "column-max pass, e4m3": lambda: mask_kernels.gpu_scores("maxprob", q8, k8, scale, lse=lse, group=128,
                                                                 head_scale=head_scale),
        "pool-32 stats pass": lambda: mask_kernels.gpu_scores("stats", pooled, k, scale, warps=8, kernel="wgmma"),
        "pool-32 max-prob pass": lambda: mask_kernels.gpu_scores("maxprob", pooled, k, scale, lse=pooled_lse,
                                                                 group=4, warps=8, kernel="wgmma"),
        # Raises `work` in place to maxima: timed on its own output (calls after the first change
        # nothing), compared from a fresh copy of the pooled scores.
        "fused exact band": lambda: mask_kernels.gpu_refine_band(q, k, scale, pooled_lse, 32, 128, (-64, 256),
                                                                 work, kernel="wgmma"),
    }
    for label, fn in passes.items():
        outs = {}
        for name, folder in variants.items():
            use_sources(folder)
            work.copy_(base)
            outs[name] = fn().clone()
        first, *rest = outs
        for name in rest:
            # The keys' columns only (a row's padding past them is never written); equal
            # infinities differ by 0, not nan.
            a, b = outs[name][..., : k.shape[2]], outs[first][..., : k.shape[2]]
            diff = (a - b).abs().masked_fill(a == b, 0).max().item()
            print(f"  {label}: largest difference {name} - {first} {diff:.2e}")
    predictions = {density: (lambda d=density: predict_mask(q, k, 128, method="topk", density=d)) for density in (0.1, 0.3)}
    for density, fn in predictions.items():
        _compare_masks(variants, fn, f"default d={density}")
    for label, fn in passes.items():
        print(_line(label, _alternate(variants, fn, queued_ms), dense), flush=True)
    for density, fn in predictions.items():
        print(_line(f"default d={density}", _alternate(variants, fn, queued_ms), dense / 100, "% of cuDNN"), flush=True)


def selection(variants: dict) -> None:
    """Default predictions (top-k 0.1) on flat rows: random q, k of 40 heads at 32,760 and 75,600
    tokens, as in the random-weight block of bench.bench_e2e (the selection's slowest rows)."""
    for seq in (32_760, 75_600):
        q, k, _ = random_inputs(1, 40, seq, 128, seed=3)
        fn = lambda: predict_mask(q, k, 128, method="topk", density=0.1)  # noqa: E731
        _compare_masks(variants, fn, f"flat rows {seq}")
        print(_line(f"default d=0.1, flat rows, {seq} tokens", _alternate(variants, fn, queued_ms), None, "ms"),
              flush=True)


def main() -> None:
    # Time the kernels each tree builds: a plan made while a Hopper kernel still compiles would run
    # the mma.sync stand-in (attention_kernel.runnable_spec), and a switch of sources clears the
    # loaded kernels, so a cold machine could time the stand-in for one tree throughout.
    os.environ[STAND_IN_ENV] = "0"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revs", nargs="+", help="git revisions (or folders of kernel sources) timed beside the tree's")
    parser.add_argument("--skip", nargs="*", default=[], choices=["scoring", "selection", "attention"])
    args = parser.parse_args()
    print(torch.cuda.get_device_name())
    tree = source.SOURCE_DIR
    with tempfile.TemporaryDirectory() as folder:
        variants = {rev: revision_sources(rev, Path(folder) / str(i)) for i, rev in enumerate(args.revs)}
        variants["tree"] = tree
        try:
            if "scoring" not in args.skip:
                scoring(variants)
            if "selection" not in args.skip:
                selection(variants)
            if "attention" not in args.skip:
                attention(variants)
        finally:
            use_sources(tree)


if __name__ == "__main__":
    main()
