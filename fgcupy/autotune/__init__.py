"""Runtime autotuning of kernel and slice parameters, remembered per GPU.

Kernel tuning. A *problem key* is (GPU name, compute capability, dtype, head dim, slice size,
length bucket, density bucket). For a key, every shipped ``AttentionSpec`` of that dtype / head
dim / slice size is a candidate (key tile, stages, rows per warp, ...); candidates whose ptxas
report (``compile_report`` for the device's arch) does not compile or does not fit the device's
shared memory or register file are skipped; the rest are checked against a float32 reference
and timed with CUDA events on random inputs of the key's shape (a sample of heads). The winner
is the fastest, except that the heuristic default (``tiles.default_spec``) stays unless
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
The file has a header (library, format, version, kernel-source hash, hash of the code that picks
candidates, GPUs) and entries keyed by problem key. A corrupt or foreign file gives a warning and
is treated as empty (the next store replaces it); the tables of other versions are kept beside
this version's (each reads its own; a newer fgcupy's file is never overwritten), and an entry
whose kernel is not a candidate for its key is ignored with a warning. Writers take a file lock,
re-read, merge and ``os.replace``.

Ahead of time: ``python -m fgcupy.autotune --preset wan14b-480p cogvideox5b --density 1.0 0.3``.

Modules by job: keys, candidates, selection, measure, store, choice, slices, cli; the names
below are the package's public surface.
"""

from __future__ import annotations

from .keys import (  # noqa: F401
    DENSITY_BUCKETS,
    DeviceInfo,
    ProblemKey,
    _SPEC_CLASSES,
    _TORCH_DTYPES,
    _device_index,
    _device_info,
    _device_infos,
    density_bucket,
    length_bucket,
    mask_density_estimate,
)
from .candidates import (  # noqa: F401
    Fit,
    _cached_compile_report,
    _reports,
    _reports_lock,
    candidate_specs,
    check_fit,
    heuristic_spec,
)
from .selection import (  # noqa: F401
    Candidate,
    Measurement,
    NOISE_MARGIN,
    TuneResult,
    format_table,
    select_winner,
    tune,
)
from .store import (  # noqa: F401
    AUTOTUNE_ENV,
    AutotuneCacheWarning,
    CACHE_ENV,
    CACHE_FILE,
    FORMAT,
    KEEP_VERSIONS,
    LOCK_TIMEOUT_S,
    TuneCache,
    _file_lock,
    _stamp_id,
    cache_path,
    library_stamp,
)
from .choice import (  # noqa: F401
    _session,
    _session_lock,
    _stderr_progress,
    autotune_enabled,
    choose_spec,
    planned_spec,
)

# What only a tuning run uses loads on first use: a process's first attention call needs
# planned_spec alone (the measuring, slice-tuning and command-line modules cost it ~10 ms).
_LAZY = {
    "measure": ("CHECK_TOLERANCE", "EventMeasure", "SAMPLE_WAVES", "sample_heads", "tune_on_device"),
    "slices": ("DENSITY_GRID", "SliceChoice", "SliceTrial", "_event_timer", "_kernel_attend", "tune_slice"),
    "cli": ("PRESETS", "main"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name):
    if name in _LAZY_NAMES:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
