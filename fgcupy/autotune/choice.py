"""The spec plan() uses: this process's choice, the stored winner, a fresh tune
(FGCUPY_AUTOTUNE=1), or the heuristic default."""

from __future__ import annotations


import os
import sys
import threading
import warnings
from typing import Callable

import torch

from ..jit import AttentionSpec
from ..mask import SliceMask
from .candidates import heuristic_spec
from .keys import DeviceInfo, ProblemKey, mask_density_estimate
from .selection import TuneResult
from .store import AUTOTUNE_ENV, AutotuneCacheWarning, TuneCache


def tune_on_device(*args, **kwargs) -> TuneResult:
    """measure.tune_on_device, imported when a tune runs: the attention calls that only look a
    choice up never load the measuring code."""
    from .measure import tune_on_device as tune

    return tune(*args, **kwargs)


# Choice at plan time
# ---------------------------------------------------------------------------------------------
_session: dict[str, AttentionSpec] = {}  # key id -> spec chosen in this process
_session_lock = threading.Lock()  # guards _key_locks
_key_locks: dict[str, threading.RLock] = {}  # key id -> held while that key is looked up or tuned
_gpu_locks: dict[str, threading.Lock] = {}  # GPU name -> held while a tune times kernels on such a GPU


def autotune_enabled() -> bool:
    """FGCUPY_AUTOTUNE: 1/true/yes/on tune on first use; 0/false/no/off/unset do not."""
    value = os.environ.get(AUTOTUNE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value not in ("", "0", "false", "no", "off"):
        warnings.warn(f"fgcupy autotune: {AUTOTUNE_ENV}={value!r} is not 0 or 1; not tuning",
                      AutotuneCacheWarning, stacklevel=3)
    return False


def choose_spec(key: ProblemKey, default: AttentionSpec, tune_fn: Callable[[ProblemKey], TuneResult | None],
                cache: TuneCache | None = None, gpu: DeviceInfo | None = None) -> AttentionSpec:
    """This process's choice, else the cached winner, else (FGCUPY_AUTOTUNE=1) a fresh tune that
    is stored, else ``default``. A failed tune warns and falls back to ``default`` for the rest of
    the process; a ``tune_fn`` that returns None (not now) leaves a later call to tune. A tune holds
    its own key and its GPU model alone: other keys plan meanwhile, and tunes take turns (the
    events of two at once would each time the other's kernels too)."""
    spec = _session.get(key.id)
    if spec is not None:
        return spec
    with _session_lock:
        key_lock = _key_locks.setdefault(key.id, threading.RLock())
        gpu_lock = _gpu_locks.setdefault(key.gpu, threading.Lock())
    with key_lock:
        spec = _session.get(key.id)
        if spec is not None:
            return spec
        cache = cache or TuneCache()
        spec = cache.lookup(key)
        if spec is not None and gpu is not None and spec.smem_bytes > gpu.smem_per_block_optin:
            warnings.warn(f"fgcupy autotune: the stored {spec.name} for {key.id} needs {spec.smem_bytes:,} bytes of "
                          f"shared memory per block, {gpu.name} grants {gpu.smem_per_block_optin:,}; not using it",
                          AutotuneCacheWarning, stacklevel=3)
            spec = None
        if spec is None and autotune_enabled():
            try:
                with gpu_lock:
                    result = tune_fn(key)
            except Exception as err:  # noqa: BLE001 - tuning is an optimisation, never fatal
                warnings.warn(f"fgcupy autotune: tuning {key.id} failed ({type(err).__name__}: {err}); "
                              f"using {default.name}", AutotuneCacheWarning, stacklevel=3)
                result = False  # failed: this process keeps the default
            if result is None:  # not now (a CUDA graph capture): a later plan tunes
                return default
            if result and result.measured:
                if result.storable:
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
