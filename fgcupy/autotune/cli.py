"""``python -m fgcupy.autotune``: tune workload presets ahead of time and print the tables."""

from __future__ import annotations


import argparse
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import torch

from ..jit.spec import SLICE_SIZES
from ..workloads import SHAPES
from .choice import _stderr_progress
from .keys import DeviceInfo, ProblemKey, _TORCH_DTYPES
from .measure import tune_on_device
from .selection import format_table
from .store import AUTOTUNE_ENV, CACHE_ENV, CACHE_FILE, TuneCache, cache_path

#: Workload shapes (B, H, S, D) of fgcupy.workloads, by preset name.
PRESETS = {name: (shape.batch, shape.heads, shape.seq, shape.head_dim) for name, shape in SHAPES.items()}


# Command line
# ---------------------------------------------------------------------------------------------
def _density(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fgcupy.autotune",
        description="Tune fgcupy's kernel for workload presets on this GPU and store the winners "
                    f"(file: ${CACHE_ENV}/{CACHE_FILE}, default {cache_path()}).",
        epilog=f"{AUTOTUNE_ENV}=1 tunes each new problem on first use inside SparseAttention.plan; "
               f"{AUTOTUNE_ENV}=0 (default) uses stored winners and otherwise the heuristic default.")
    parser.add_argument("--preset", nargs="+", default=["wan14b-480p"], choices=sorted(PRESETS))
    parser.add_argument("--density", type=_density, nargs="+", default=[1.0, 0.3],
                        help="each is tuned at its bucket's density, the one plan-time tuning uses")
    parser.add_argument("--slice-m", type=int, nargs="+", default=list(SLICE_SIZES), choices=SLICE_SIZES)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_TORCH_DTYPES))
    parser.add_argument("--force", action="store_true", help="re-tune keys that are already stored")
    parser.add_argument("--no-store", action="store_true", help="print only; leave the cache file alone")
    parser.add_argument("--reps", type=_positive_int, default=5, help="timed reps per candidate per round (3 rounds)")
    parser.add_argument("--json", help="also write every result (with candidate tables) here")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("fgcupy autotune: no CUDA device visible; nothing to tune", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    info = DeviceInfo.of(device)
    cache = TuneCache()
    print(f"{info.name} ({info.arch}, {info.sm_count} SMs, {info.smem_per_block_optin} B smem/block) | "
          f"torch {torch.__version__} | cache {cache.path}", flush=True)
    started = time.perf_counter()
    summary, dump, seen = [], [], set()

    def write_json():  # after every key, whole or not at all: a failed or interrupted run keeps what it measured
        if args.json is not None:
            path = Path(args.json)
            if not args.json or not path.name or path.name in (".", ".."):
                raise ValueError("it names no file")
            # a new file of an unguessable name (O_EXCL): a link planted in its place is not followed
            tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
            handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                with os.fdopen(handle, "w") as f:
                    json.dump({"gpu": dataclasses.asdict(info), "torch": torch.__version__, "results": dump}, f,
                              indent=1)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)

    try:
        write_json()  # an unwritable path fails now, not after the tuning
    except (OSError, ValueError) as err:
        print(f"fgcupy autotune: cannot write --json {args.json}: {err}", file=sys.stderr)
        return 2
    for name in args.preset:
        batch, heads, seq, head_dim = PRESETS[name]
        for density in args.density:
            for slice_m in args.slice_m:
                key = ProblemKey.make(info, args.dtype, head_dim, slice_m, seq, seq, density)
                density = key.density
                if key.id in seen:  # densities of one bucket are one problem
                    continue
                seen.add(key.id)
                entry = None if args.force else cache.entry(key)
                cached = None if entry is None else cache.lookup(key)
                if cached is not None:
                    print(f"\n{name} d={density} m={slice_m}: cached (tuned {entry.get('tuned_at')}, "
                          f"{entry.get('tune_seconds')} s)")
                    try:
                        print(format_table(key.id, entry.get("candidates", []), entry.get("default", ""), cached.name))
                    except (KeyError, TypeError, ValueError):  # a hand-edited entry: the spec alone
                        print(f"{key.id}: {cached.name} (its candidate table is unreadable)")
                    summary.append((name, density, slice_m, entry.get("default"), _ms(entry.get("default_ms")),
                                    cached.name, _ms(entry.get("winner_ms")), 0.0, "cached"))
                    dump.append({"preset": name, "cached": True, **entry})
                    write_json()
                    continue
                print(f"\n{name} d={density} m={slice_m}: tuning", flush=True)
                result = tune_on_device(key, device, seq, seq, batch * heads, density=density,
                                        reps=args.reps, progress=_stderr_progress)
                print(result.table(), flush=True)
                if not args.no_store:
                    cache.store([result], info)
                summary.append((name, density, slice_m, result.default.name, result.ms_of(result.default),
                                result.winner.name, result.ms_of(result.winner), result.seconds, "tuned"))
                dump.append({"preset": name, "cached": False, **result.to_entry()})
                write_json()
                torch.cuda.empty_cache()

    print(f"\nsummary ({time.perf_counter() - started:.1f} s in all; times on the sampled heads)")
    print("| preset | density | M | default | ms | winner | ms | speedup | tune s | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, density, m, dname, dms, wname, wms, secs, how in summary:
        speed = f"{dms / wms:.3f}" if dms and wms else "-"
        dms_s = f"{dms:.3f}" if dms else "-"
        wms_s = f"{wms:.3f}" if wms else "-"
        print(f"| {name} | {density} | {m} | {dname} | {dms_s} | {wname} | {wms_s} | {speed} | {secs:.1f} | {how} |")
    return 0


def _ms(value) -> float | None:
    """A stored time as a positive finite float, or None (a hand-edited entry's)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    return float(value) if number else None
