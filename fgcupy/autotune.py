"""Runtime autotuning of kernel and slice parameters, remembered per GPU.

Kernel tuning. A *problem key* is (GPU name, compute capability, dtype, head dim, slice size,
length bucket, density bucket). For a key, every shipped ``AttentionSpec`` of that dtype / head
dim / slice size is a candidate (key tile, stages, rows per warp, ...); candidates whose ptxas
report (``compile_report`` for the device's arch) does not compile or does not fit the device's
shared memory or register file are skipped; the rest are checked against a float32 reference
and timed with CUDA events on random inputs of the key's shape (a sample of heads). The winner
is the fastest, except that the heuristic default (``attention.default_config``) stays unless
a candidate beats it by more than ``NOISE_MARGIN``: tuning never makes things slower beyond
measurement noise. The launch schedule is not tuned: on the uniform top-k masks used for
timing every query block has the same list length, so both schedules do the same work.

Slice tuning. ``tune_slice(q, k, v, target)`` picks the slice size M and predictor density that
meet a relative-L2 target against dense attention at the least scoring + attention time.

Control (environment):
  FGCUPY_AUTOTUNE=1   tune a key on first use in ``SparseAttention.plan`` (progress on stderr)
  FGCUPY_AUTOTUNE=0   (default) use a cached result if present, else the heuristic default
  FGCUPY_CACHE_DIR    folder of ``autotune.json`` (default ``$XDG_CACHE_HOME/fgcupy`` or
                      ``~/.cache/fgcupy``)
The file has a header (library, format, version, kernel-source hash, GPUs) and entries keyed by
problem key. A corrupt, foreign or other-version file gives a warning and is treated as empty
(the next store replaces it); writers take a file lock, re-read, merge and ``os.replace``.

Ahead of time: ``python -m fgcupy.autotune --preset wan14b-480p cogvideox5b --density 1.0 0.3``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from . import bridge
from .attention_kernel import block_order, launch_attention
from .jit import (AttentionSpec, KernelCompileError, Sm90AttentionSpec, all_attention_specs, all_sm90_specs,
                  get_kernel_on)
from .jit.spec import SLICE_SIZES
from .tiles import default_spec
from .workloads import SHAPES
from .progress import progress_bar
from .timing import cuda_time_ms
from .mask import SliceMask, num_blocks, random_topk_mask

CACHE_ENV = "FGCUPY_CACHE_DIR"
AUTOTUNE_ENV = "FGCUPY_AUTOTUNE"
CACHE_FILE = "autotune.json"
FORMAT = 2
#: Tables of other library versions kept in the file (each version reads only its own).
KEEP_VERSIONS = 8
#: Seconds a writer waits for the cache lock before giving up (with a warning, no store).
LOCK_TIMEOUT_S = 10.0
# A candidate must beat the heuristic default by more than this fraction to replace it.
NOISE_MARGIN = 0.03
DENSITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
# Densities tried by tune_slice before bisection between the last failing and first passing one.
DENSITY_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
# Timed work per candidate: enough CTAs for this many full waves (1 CTA/SM) keeps the tail
# (wave quantisation) small against the 3 % margin.
SAMPLE_WAVES = 32
# Relative L2 of a candidate's output against the float32 reference: above this it is wrong.
CHECK_TOLERANCE = {"bfloat16": 2e-2, "float16": 6e-3}
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

#: Workload shapes (B, H, S, D) of fgcupy.workloads, by preset name.
PRESETS = {name: (shape.batch, shape.heads, shape.seq, shape.head_dim) for name, shape in SHAPES.items()}


class AutotuneCacheWarning(UserWarning):
    """The autotune file could not be used or written; fgcupy carries on without it."""


# ---------------------------------------------------------------------------------------------
# Problem key
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """What tuning needs to know about a GPU: identity for the key, limits for the fit check."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    smem_per_block_optin: int
    regs_per_block: int

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @classmethod
    def of(cls, device) -> "DeviceInfo":
        return _device_info(_device_index(device))


def _device_index(device) -> int:
    device = torch.device(device) if device is not None else torch.device("cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


_device_infos: dict[int, DeviceInfo] = {}


def _device_info(index: int) -> DeviceInfo:
    info = _device_infos.get(index)
    if info is None:
        from cupy.cuda import runtime

        props = torch.cuda.get_device_properties(index)
        info = DeviceInfo(
            name=props.name,
            capability=(props.major, props.minor),
            sm_count=props.multi_processor_count,
            smem_per_block_optin=runtime.deviceGetAttribute(runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, index),
            regs_per_block=runtime.deviceGetAttribute(runtime.cudaDevAttrMaxRegistersPerBlock, index),
        )
        _device_infos[index] = info
    return info


def length_bucket(length: int) -> int:
    """Nearest power of two in log scale (32,760 -> 32,768; 17,550 -> 16,384), at least 128."""
    return 2 ** max(7, round(math.log2(max(length, 1))))


def density_bucket(density: float) -> float:
    """Nearest of DENSITY_BUCKETS in log scale (tile choice follows keys per row, a ratio)."""
    density = min(max(float(density), DENSITY_BUCKETS[0]), 1.0)
    return min(DENSITY_BUCKETS, key=lambda b: abs(math.log(density / b)))


@dataclass(frozen=True)
class ProblemKey:
    gpu: str
    arch: str
    dtype: str
    head_dim: int
    slice_m: int
    q_bucket: int
    kv_bucket: int
    density: float

    @classmethod
    def make(cls, info: DeviceInfo, dtype: str, head_dim: int, slice_m: int, q_len: int, kv_len: int,
             density: float) -> "ProblemKey":
        return cls(info.name, info.arch, dtype, int(head_dim), int(slice_m), length_bucket(q_len),
                   length_bucket(kv_len), density_bucket(density))

    @property
    def id(self) -> str:
        return (f"{self.gpu}|{self.arch}|{self.dtype}|d{self.head_dim}|m{self.slice_m}"
                f"|q{self.q_bucket}|kv{self.kv_bucket}|p{self.density:g}")


_SPEC_CLASSES = {cls.__name__: cls for cls in (AttentionSpec, Sm90AttentionSpec)}


def mask_density_estimate(mask: SliceMask) -> float:
    """Capacity / all slices: exact for top-k and from_dense masks, an upper bound otherwise;
    reads shapes only, so planning stays free of host synchronisation."""
    total = mask.batch * mask.heads * mask.q_blocks * mask.kv_len
    return min(1.0, mask.capacity / total) if total else 1.0


# ---------------------------------------------------------------------------------------------
# Candidates and fit
# ---------------------------------------------------------------------------------------------
def heuristic_spec(dtype: str, head_dim: int, slice_m: int, arch: str | None = None) -> AttentionSpec:
    """The documented default when nothing is tuned: ``tiles.default_spec`` (the wgmma
    kernel on Hopper, the mma.sync kernel elsewhere)."""
    return default_spec(dtype, head_dim, slice_m, arch)


def candidate_specs(dtype: str, head_dim: int, slice_m: int, arch: str | None = None) -> list[AttentionSpec]:
    """Every shipped spec (the set CI compiles) for this dtype, head dim and slice size, plus the
    heuristic default; device limits are applied later by ``check_fit``. The wgmma specs join
    on Hopper (``arch`` "sm_90")."""
    shipped = all_attention_specs() + (all_sm90_specs() if arch == "sm_90" else [])
    specs = [s for s in shipped if (s.dtype, s.head_dim, s.slice_m) == (dtype, head_dim, slice_m)]
    default = heuristic_spec(dtype, head_dim, slice_m, arch)
    if default not in specs:
        specs.insert(0, default)
    return specs


@dataclass
class Fit:
    registers: int | None
    smem_bytes: int
    spill_bytes: int | None
    reason: str | None  # None: fits


def check_fit(spec: AttentionSpec, info: DeviceInfo, compiler=None) -> Fit:
    """Compile ``spec`` for the device's arch and compare ptxas' numbers with its limits."""
    if compiler is None:
        from .jit.report import compile_report as compiler
    try:
        rep = compiler(spec, getattr(spec, "arch", None) or info.arch)  # sm_90a-only specs name their own
    except KernelCompileError as err:
        first = next((line for line in err.nvrtc_log.splitlines() if "error" in line), "see log")
        return Fit(None, spec.smem_bytes, None, f"compile failed: {first.strip()[:80]}")
    except ImportError:
        # No NVRTC bindings (cuda-bindings is a test extra): judge shared memory from the spec;
        # the runtime compile in the measurement catches what does not build.
        rep = None
    except Exception as err:  # noqa: BLE001 - an unreadable report skips the candidate, not the tune
        return Fit(None, spec.smem_bytes, None, f"no ptxas report: {type(err).__name__}: {str(err)[:60]}")
    static = rep.static_smem_bytes if rep is not None else 0
    smem = spec.smem_bytes + static
    registers = rep.registers if rep is not None else None
    spills = rep.spill_store_bytes + rep.spill_load_bytes if rep is not None else None
    if smem > info.smem_per_block_optin:
        return Fit(registers, smem, spills, f"smem {smem} B > {info.smem_per_block_optin} B per block")
    if registers is not None and registers * spec.threads > info.regs_per_block:
        return Fit(registers, smem, spills,
                   f"{registers} regs x {spec.threads} threads > {info.regs_per_block} per block")
    return Fit(registers, smem, spills, None)


_reports: dict = {}
_reports_lock = threading.Lock()


def _cached_compile_report(spec, arch):
    """compile_report, once per (spec, arch) in this process (densities share a spec's report)."""
    from .jit.report import compile_report

    with _reports_lock:
        if (spec, arch) in _reports:
            return _reports[(spec, arch)]
    rep = compile_report(spec, arch)
    with _reports_lock:
        _reports[(spec, arch)] = rep
    return rep


# ---------------------------------------------------------------------------------------------
# Selection and results
# ---------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    ms: float | None
    tflops: float | None = None
    note: str = ""
    registers: int | None = None  # from the loaded kernel, for tables without a ptxas report


def select_winner(timings: Mapping[AttentionSpec, float | None], default: AttentionSpec,
                  margin: float = NOISE_MARGIN) -> AttentionSpec | None:
    """Fastest valid spec, but the default unless the fastest beats it by more than ``margin``."""
    valid = {s: t for s, t in timings.items() if t is not None and math.isfinite(t) and t > 0}
    if not valid:
        return None
    best = min(valid, key=lambda s: (valid[s], s.name))
    if default in valid and valid[best] >= valid[default] * (1.0 - margin):
        return default
    return best


@dataclass
class Candidate:
    spec: AttentionSpec
    registers: int | None
    smem_bytes: int | None
    spill_bytes: int | None
    ms: float | None
    tflops: float | None
    status: str

    def row(self) -> dict:
        return {"spec": self.spec.name, "registers": self.registers, "smem_bytes": self.smem_bytes,
                "spill_bytes": self.spill_bytes, "ms": self.ms, "tflops": self.tflops, "status": self.status}


@dataclass
class TuneResult:
    key: ProblemKey
    default: AttentionSpec
    winner: AttentionSpec
    measured: bool  # False: no candidate could be timed; winner is the heuristic default
    candidates: list[Candidate]
    seconds: float
    workload: dict = field(default_factory=dict)

    def ms_of(self, spec: AttentionSpec) -> float | None:
        return next((c.ms for c in self.candidates if c.spec == spec), None)

    @property
    def speedup(self) -> float | None:
        d, w = self.ms_of(self.default), self.ms_of(self.winner)
        return d / w if d and w else None

    def to_entry(self) -> dict:
        return {
            "key": dataclasses.asdict(self.key),
            "spec": dataclasses.asdict(self.winner),
            "kernel": type(self.winner).__name__,
            "spec_name": self.winner.name,
            "default": self.default.name,
            "winner_ms": self.ms_of(self.winner),
            "default_ms": self.ms_of(self.default),
            "tune_seconds": round(self.seconds, 3),
            "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "workload": self.workload,
            "candidates": [c.row() for c in self.candidates],
        }

    def table(self) -> str:
        return format_table(self.key.id, [c.row() for c in self.candidates], self.default.name, self.winner.name)


def format_table(title: str, rows: list[dict], default_name: str, winner_name: str) -> str:
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [title, "| spec | regs | smem KB | spill B | ms | TFLOP/s | |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        tag = [t for t, n in (("default", default_name), ("WINNER", winner_name)) if r["spec"] == n]
        status = ", ".join(tag + ([r["status"]] if r["status"] != "ok" else []))
        smem = None if r["smem_bytes"] is None else r["smem_bytes"] / 1024
        lines.append(f"| {r['spec']} | {num(r['registers'], 'd')} | {num(smem, '.1f')} | {num(r['spill_bytes'], 'd')}"
                     f" | {num(r['ms'], '.3f')} | {num(r['tflops'], '.0f')} | {status} |")
    return "\n".join(lines)


def tune(key: ProblemKey, info: DeviceInfo, measure: Callable[[list[AttentionSpec]], Mapping[AttentionSpec, Measurement]],
         *, compiler=None, margin: float = NOISE_MARGIN, progress: Callable[[str], None] | None = None,
         workload: dict | None = None) -> TuneResult:
    """Enumerate, fit-check, measure and select for one key. ``measure`` times a list of specs
    (``EventMeasure`` on a GPU; tests pass a fake); ``compiler`` defaults to ``compile_report``."""
    progress = progress or (lambda line: None)
    started = time.perf_counter()
    compiler = compiler or _cached_compile_report
    specs = candidate_specs(key.dtype, key.head_dim, key.slice_m, key.arch)
    default = heuristic_spec(key.dtype, key.head_dim, key.slice_m, key.arch)
    progress(f"{key.id}: checking {len(specs)} candidates for {info.arch}")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        fits = list(pool.map(lambda s: check_fit(s, info, compiler), specs))
    runnable = [s for s, f in zip(specs, fits) if f.reason is None]
    for s, f in zip(specs, fits):
        if f.reason is not None:
            progress(f"  skip {s.name}: {f.reason}")
    progress(f"  timing {len(runnable)} candidates")
    measured = dict(measure(runnable)) if runnable else {}
    candidates = []
    for s, f in zip(specs, fits):
        m = measured.get(s)
        if f.reason is not None:
            status = f"skipped: {f.reason}"
        elif m is None or m.ms is None:
            status = f"failed: {m.note if m else 'not measured'}"
        else:
            status = "ok"
        registers = f.registers if f.registers is not None else (m.registers if m else None)
        candidates.append(Candidate(s, registers, f.smem_bytes, f.spill_bytes, m.ms if m else None,
                                    m.tflops if m else None, status))
    winner = select_winner({c.spec: c.ms for c in candidates if c.status == "ok"}, default, margin)
    result = TuneResult(key, default, winner or default, winner is not None, candidates,
                        time.perf_counter() - started, workload or {})
    if winner is None:
        progress(f"  no candidate could be timed: keeping the heuristic default {default.name}")
    else:
        speed = result.speedup
        progress(f"  winner {winner.name}" + (f" ({speed:.3f}x the default)" if speed else "")
                 + f" after {result.seconds:.1f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Measurement on the GPU
# ---------------------------------------------------------------------------------------------
def sample_heads(total_heads: int, q_blocks: int, sm_count: int, waves: int = SAMPLE_WAVES) -> int:
    """Heads to time: enough CTAs for ``waves`` full waves, never more than the problem has."""
    return max(1, min(total_heads, math.ceil(waves * sm_count / max(q_blocks, 1))))


class EventMeasure:
    """Times specs on random q/k/v and a random top-k mask of the key's shape (``plan(spec=)``).

    Each spec is first checked against a float32 reference on one head (a wrong kernel never
    wins), then all are timed in interleaved rounds (order reversed every round) so clock or
    thermal drift does not favour whichever ran first; the result is the median of every rep.
    """

    def __init__(self, key: ProblemKey, device, q_len: int, kv_len: int, heads: int, *, density: float | None = None,
                 warmup: int = 2, rounds: int = 3, reps: int = 5, seed: int = 0, progress=None):
        self.key, self.device = key, torch.device(device)
        self.q_len, self.kv_len, self.heads = q_len, kv_len, heads
        self.density = key.density if density is None else density
        self.warmup, self.rounds, self.reps, self.seed = warmup, rounds, reps, seed
        self.progress = progress or (lambda line: None)

    def workload(self) -> dict:
        return {"heads": self.heads, "q_len": self.q_len, "kv_len": self.kv_len, "density": self.density,
                "reps": self.rounds * self.reps}

    def __call__(self, specs: list[AttentionSpec]) -> dict[AttentionSpec, Measurement]:
        from .reference import reference_attention, relative_l2

        key, device = self.key, self.device
        dtype = _TORCH_DTYPES[key.dtype]
        results: dict[AttentionSpec, Measurement] = {}
        with torch.cuda.device(device):
            gen = torch.Generator(device=device).manual_seed(self.seed)
            q, k, v = (torch.randn(1, self.heads, n, key.head_dim, generator=gen, device=device, dtype=dtype)
                       for n in (self.q_len, self.kv_len, self.kv_len))
            mask = random_topk_mask(1, self.heads, self.q_len, self.kv_len, key.slice_m, self.density, device, gen)
            keys_per_row = mask.capacity // max(1, mask.heads * mask.q_blocks)
            flops = 4.0 * self.heads * self.q_len * keys_per_row * key.head_dim
            head0 = SliceMask(mask.indptr[:, :1].contiguous(), mask.indices, key.slice_m, self.q_len, self.kv_len)
            ref, _ = reference_attention(q[:, :1], k[:, :1], v[:, :1], head0, rows_per_chunk=2048)
            order = block_order(mask)
            out = torch.empty_like(q)
            scale = 1.0 / math.sqrt(key.head_dim)
            current = []

            def use(spec):
                get_kernel_on(device, spec)
                current[:] = [spec]

            def run():
                launch_attention(current[0], q, k, v, out, None, mask, order, scale)

            good, registers = [], {}
            for i, spec in enumerate(progress_bar(specs, desc="fgcupy autotune: load + check")):
                self.progress(f"  [{i + 1}/{len(specs)}] load + check {spec.name}")
                try:
                    registers[spec] = getattr(get_kernel_on(device, spec), "num_regs", None)
                    use(spec)
                    out.fill_(float("nan"))
                    run()
                    err = relative_l2(out[:, :1].float(), ref)
                except Exception as exc:  # noqa: BLE001 - one bad candidate must not end the tune
                    results[spec] = Measurement(None, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
                    continue
                if not err <= CHECK_TOLERANCE[key.dtype]:
                    results[spec] = Measurement(None, note=f"wrong result: rel L2 {err:.2e} vs float32 reference")
                    continue
                for _ in range(self.warmup):
                    run()
                good.append(spec)
            torch.cuda.synchronize(device)
            samples = {s: [] for s in good}
            stream = torch.cuda.current_stream(device)
            bar = progress_bar(total=self.rounds * len(good), desc="fgcupy autotune: timing")
            for r in range(self.rounds):
                self.progress(f"  round {r + 1}/{self.rounds}: {len(good)} candidates x {self.reps} reps")
                for spec in (good if r % 2 == 0 else good[::-1]):
                    bar.update()
                    use(spec)
                    run()
                    events = []
                    for _ in range(self.reps):
                        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record(stream)
                        run()
                        stop.record(stream)
                        events.append((start, stop))
                    events[-1][1].synchronize()
                    samples[spec].extend(a.elapsed_time(b) for a, b in events)
            bar.close()
            for spec, times in samples.items():
                ms = statistics.median(times)
                results[spec] = Measurement(ms, flops / (ms * 1e-3) / 1e12, registers=registers.get(spec))
        return results


def tune_on_device(key: ProblemKey, device, q_len: int, kv_len: int, total_heads: int, *,
                   progress=None, **measure_options) -> TuneResult:
    """Tune ``key`` on ``device`` with inputs of length q_len/kv_len over a sample of heads."""
    info = DeviceInfo.of(device)
    heads = sample_heads(total_heads, num_blocks(q_len, key.slice_m), info.sm_count)
    measure = EventMeasure(key, device, q_len, kv_len, heads, progress=progress, **measure_options)
    return tune(key, info, measure, progress=progress, workload=measure.workload())


# ---------------------------------------------------------------------------------------------
# Persistence
# ---------------------------------------------------------------------------------------------
def cache_path() -> Path:
    """$FGCUPY_CACHE_DIR/autotune.json, else $XDG_CACHE_HOME/fgcupy/..., else ~/.cache/fgcupy/..."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder).expanduser() / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fgcupy" / CACHE_FILE


def library_stamp() -> dict:
    """What makes stored timings stale: the library version and the kernel sources."""
    from . import __version__
    from .jit.source import source_hash

    return {"version": __version__, "kernel_hash": source_hash()}


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None = None):
    """Exclusive lock on ``path`` (a side file) for the read-merge-write of the cache: created
    0600, never through a symlink, waited on for at most ``timeout`` seconds (TimeoutError)."""
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        deadline = time.monotonic() + timeout
        try:
            import fcntl

            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{path} stayed locked for {timeout:.0f} s") from None
                    time.sleep(0.05)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamp_id(stamp: dict) -> str:
    return f"{stamp.get('version')}|{stamp.get('kernel_hash')}"


class TuneCache:
    """The JSON file of tuned winners. Reads are memoised by the file's stat signature (and
    ``choose_spec`` memoises per key), so planning rarely touches the disk; every problem with
    the file becomes a warning, never an exception."""

    _memo: dict = {}  # path -> (signature, entries)
    _warned: set = set()
    _lock = threading.Lock()

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_path()

    # ---- reading ----
    def entries(self) -> dict[str, dict]:
        """Entries valid for this library version and kernel sources ({} when unusable)."""
        try:
            st = self.path.stat()
        except OSError:
            return {}
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            memo = self._memo.get(str(self.path))
            if memo is not None and memo[0] == signature:
                return memo[1]
        entries, problem = self._read()
        if problem:
            self._warn(problem, signature)
        with self._lock:
            self._memo[str(self.path)] = (signature, entries)
        return entries

    def _read(self) -> tuple[dict, str | None]:
        """(entries, problem): entries are usable ones; problem says why the file was not."""
        try:
            raw = self.path.read_bytes()
        except OSError as err:
            return {}, f"cannot read {self.path}: {err}"
        data, problem = self._parse(raw)
        if problem:
            return {}, problem
        stamp = library_stamp()
        tables = self._tables(data)
        entries = tables.get(_stamp_id(stamp), {}).get("entries")
        if entries is None:
            theirs = {k: data["header"].get(k) for k in stamp}
            return {}, (f"{self.path} was written by fgcupy {theirs['version']} (kernels {theirs['kernel_hash']}), "
                        f"this is {stamp['version']} (kernels {stamp['kernel_hash']}): its results are stale "
                        f"and fresh tunes will be stored beside them")
        return entries, None

    def _parse(self, raw: bytes) -> tuple[dict | None, str | None]:
        """(data, problem): the parsed file if it is an fgcupy autotune file."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # ValueError includes UnicodeDecodeError
            return None, f"{self.path} is corrupt ({type(err).__name__}); it will be replaced by a fresh tune"
        header = data.get("header") if isinstance(data, dict) else None
        if not isinstance(header, dict) or header.get("library") != "fgcupy" or header.get("format") not in (1, FORMAT):
            return None, f"{self.path} is not an fgcupy autotune file (format {FORMAT}); it will be replaced"
        return data, None

    @staticmethod
    def _tables(data: dict) -> dict:
        """{version stamp id: {"header": ..., "entries": {...}}} of every well-formed table."""
        tables = {}
        others = data.get("other_versions")
        if isinstance(others, dict):
            for stamp_id, table in others.items():
                if isinstance(table, dict) and isinstance(table.get("entries"), dict):
                    tables[stamp_id] = {"header": table.get("header") if isinstance(table.get("header"), dict) else {},
                                        "entries": table["entries"]}
        if isinstance(data.get("entries"), dict):
            tables[_stamp_id(data["header"])] = {"header": data["header"], "entries": data["entries"]}
        return tables

    def _warn(self, message: str, signature) -> None:
        with self._lock:
            if (str(self.path), signature, message) in self._warned:
                return
            self._warned.add((str(self.path), signature, message))
        warnings.warn(f"fgcupy autotune: {message}", AutotuneCacheWarning, stacklevel=3)

    def lookup(self, key: ProblemKey) -> AttentionSpec | None:
        entry = self.entries().get(key.id)
        if entry is None:
            return None
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
                raise TypeError("an entry must be an object with a spec object")
            fields = entry["spec"]
            bad = {k: v for k, v in fields.items() if not (type(v) is int or type(v) is str)}
            if bad:
                raise TypeError(f"spec fields must be ints or strings, got {bad}")
            spec = _SPEC_CLASSES[entry.get("kernel", "AttentionSpec")](**fields)
        except (KeyError, TypeError, ValueError) as err:
            self._warn(f"ignoring unusable entry {key.id!r} in {self.path}: {err}", None)
            return None
        if (spec.dtype, spec.head_dim, spec.slice_m) != (key.dtype, key.head_dim, key.slice_m):
            self._warn(f"ignoring entry {key.id!r} in {self.path}: its spec {spec.name} is for another problem", None)
            return None
        return spec

    def entry(self, key: ProblemKey) -> dict | None:
        return self.entries().get(key.id)

    # ---- writing ----
    def store(self, results: Iterable[TuneResult], gpu: DeviceInfo | None = None) -> bool:
        """Merge ``results`` into the file under a lock and replace it atomically. Returns False
        (with a warning) when the folder or file cannot be written."""
        new = {r.key.id: r.to_entry() for r in results if r.measured}
        if not new:
            return True
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                tables = {}
                if self.path.exists():
                    data, problem = self._parse(self.path.read_bytes())
                    if problem:
                        self._warn(problem, None)
                    else:
                        tables = self._tables(data)
                stamp = library_stamp()
                mine = tables.pop(_stamp_id(stamp), {"header": {}, "entries": {}})
                header = mine["header"]
                gpus = dict(header.get("gpus", {})) if isinstance(header.get("gpus"), dict) else {}
                if gpu is not None:
                    gpus[f"{gpu.name}|{gpu.arch}"] = {"name": gpu.name, "arch": gpu.arch, "sm_count": gpu.sm_count}
                merged = {**mine["entries"], **new}
                newest = sorted(tables.items(), key=lambda item: str(item[1]["header"].get("written", "")),
                                reverse=True)[:KEEP_VERSIONS]
                data = {
                    "header": {"library": "fgcupy", "format": FORMAT, **stamp, "gpus": gpus,
                               "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
                    "entries": dict(sorted(merged.items())),
                    "other_versions": dict(newest),
                }
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump(data, f, indent=1)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
        except OSError as err:
            self._warn(f"cannot write {self.path}: {err}; tuned results stay in this process only", None)
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Choice at plan time
# ---------------------------------------------------------------------------------------------
_session: dict[str, AttentionSpec] = {}  # key id -> spec chosen in this process
_session_lock = threading.RLock()


def autotune_enabled() -> bool:
    """FGCUPY_AUTOTUNE: 1/true/yes/on tune on first use; 0/false/no/off/unset do not."""
    value = os.environ.get(AUTOTUNE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(f"fgcupy autotune: {AUTOTUNE_ENV}={value!r} is not 0 or 1; not tuning",
                      AutotuneCacheWarning, stacklevel=3)
    return False


def choose_spec(key: ProblemKey, default: AttentionSpec, tune_fn: Callable[[ProblemKey], TuneResult],
                cache: TuneCache | None = None, gpu: DeviceInfo | None = None) -> AttentionSpec:
    """This process's choice, else the cached winner, else (FGCUPY_AUTOTUNE=1) a fresh tune that
    is stored, else ``default``. A failed tune warns and falls back to ``default``."""
    with _session_lock:
        spec = _session.get(key.id)
        if spec is not None:
            return spec
        cache = cache or TuneCache()
        spec = cache.lookup(key)
        if spec is None and autotune_enabled():
            try:
                result = tune_fn(key)
            except Exception as err:  # noqa: BLE001 - tuning is an optimisation, never fatal
                warnings.warn(f"fgcupy autotune: tuning {key.id} failed ({type(err).__name__}: {err}); "
                              f"using {default.name}", AutotuneCacheWarning, stacklevel=3)
                result = None
            if result is not None and result.measured:
                cache.store([result], gpu)
                spec = result.winner
        spec = spec or default
        _session[key.id] = spec
        return spec


def planned_spec(mask: SliceMask, head_dim: int, dtype: str) -> AttentionSpec:
    """The spec ``SparseAttention.plan`` uses when no key tile / stages are given."""
    if mask.device.type != "cuda" or not torch.cuda.is_available():
        return heuristic_spec(dtype, head_dim, mask.slice_m)
    info = DeviceInfo.of(mask.device)
    default = heuristic_spec(dtype, head_dim, mask.slice_m, info.arch)
    key = ProblemKey.make(info, dtype, head_dim, mask.slice_m, mask.q_len, mask.kv_len, mask_density_estimate(mask))

    def tune_fn(k: ProblemKey) -> TuneResult | None:
        if torch.cuda.is_current_stream_capturing():
            warnings.warn(f"fgcupy autotune: not tuning {k.id} during CUDA graph capture; using {default.name}",
                          AutotuneCacheWarning, stacklevel=4)
            return None
        return tune_on_device(k, mask.device, mask.q_len, mask.kv_len, mask.batch * mask.heads,
                              progress=_stderr_progress)

    return choose_spec(key, default, tune_fn, gpu=info)


def _stderr_progress(line: str) -> None:
    print(f"fgcupy autotune: {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
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
    """Attention through the kernel ``SparseAttention.plan`` would pick (contiguous [B, H, S, D])."""
    out = torch.empty_like(q)
    spec = planned_spec(mask, q.shape[-1], bridge.dtype_name(q.dtype, "q"))
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
    from .layout import to_bhsd
    from .reference import dense_attention, relative_l2

    if not (isinstance(target, (int, float)) and target > 0):
        raise ValueError(f"target must be a positive relative L2 error, got {target!r}")
    if not densities or any(not 0 < d <= 1 for d in densities):
        raise ValueError(f"densities must be in (0, 1], got {densities!r}")
    if predictor is None:
        try:
            from .scoring import predict_mask as predictor
        except ImportError as err:
            raise ImportError("fgcupy.scoring.predict_mask is not available; pass predictor=") from err
    attend = attend or _kernel_attend
    timer = timer or _event_timer
    progress = progress or (lambda line: None)
    densities = sorted(set(float(d) for d in densities))

    q, k, v = (to_bhsd(bridge.to_torch(x, n), layout) for x, n in ((q, "q"), (k, "k"), (v, "v")))
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


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fgcupy.autotune",
        description="Tune fgcupy's kernel for workload presets on this GPU and store the winners "
                    f"(file: ${CACHE_ENV}/{CACHE_FILE}, default {cache_path()}).",
        epilog=f"{AUTOTUNE_ENV}=1 tunes each new problem on first use inside SparseAttention.plan; "
               f"{AUTOTUNE_ENV}=0 (default) uses stored winners and otherwise the heuristic default.")
    parser.add_argument("--preset", nargs="+", default=["wan14b-480p"], choices=sorted(PRESETS))
    parser.add_argument("--density", type=float, nargs="+", default=[1.0, 0.3])
    parser.add_argument("--slice-m", type=int, nargs="+", default=list(SLICE_SIZES), choices=SLICE_SIZES)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_TORCH_DTYPES))
    parser.add_argument("--force", action="store_true", help="re-tune keys that are already stored")
    parser.add_argument("--no-store", action="store_true", help="print only; leave the cache file alone")
    parser.add_argument("--reps", type=int, default=5, help="timed reps per candidate per round (3 rounds)")
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
    summary, dump = [], []
    for name in args.preset:
        batch, heads, seq, head_dim = PRESETS[name]
        for density in args.density:
            for slice_m in args.slice_m:
                key = ProblemKey.make(info, args.dtype, head_dim, slice_m, seq, seq, density)
                entry = None if args.force else cache.entry(key)
                if entry is not None and cache.lookup(key) is not None:
                    print(f"\n{name} d={density} m={slice_m}: cached (tuned {entry.get('tuned_at')}, "
                          f"{entry.get('tune_seconds')} s)")
                    print(format_table(key.id, entry.get("candidates", []), entry.get("default", ""), entry["spec_name"]))
                    summary.append((name, density, slice_m, entry.get("default"), entry.get("default_ms"),
                                    entry["spec_name"], entry.get("winner_ms"), 0.0, "cached"))
                    dump.append({"preset": name, "cached": True, **entry})
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
                torch.cuda.empty_cache()

    print(f"\nsummary ({time.perf_counter() - started:.1f} s in all; times on the sampled heads)")
    print("| preset | density | M | default | ms | winner | ms | speedup | tune s | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, density, m, dname, dms, wname, wms, secs, how in summary:
        speed = f"{dms / wms:.3f}" if dms and wms else "-"
        dms_s = f"{dms:.3f}" if dms else "-"
        wms_s = f"{wms:.3f}" if wms else "-"
        print(f"| {name} | {density} | {m} | {dname} | {dms_s} | {wname} | {wms_s} | {speed} | {secs:.1f} | {how} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": dataclasses.asdict(info), "torch": torch.__version__, "results": dump}, f, indent=1)
    return 0


if __name__ == "__main__":
    from fgcupy import autotune as _module  # one module instance: plan() imports it by this name

    sys.exit(_module.main())
