"""Kernels ready to launch: one per (spec, device) in this process.

A kernel comes from this process's table, else from the disk cache (``kernel_cache``), else from
NVRTC (``nvrtc``: libnvrtc through ctypes; then written to the disk cache); it is loaded and
launched by the CUDA driver through ctypes (``driver``), so a process whose kernels are cached
imports no CUDA Python package and loads no compiler. Where libnvrtc or libcuda is missing,
cupy.RawModule compiles, caches (CUPY_CACHE_DIR) and launches instead.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from functools import lru_cache

import torch

from . import driver, kernel_cache, nvrtc
from .compile import KernelCompileError, compile_cubin
from .source import nvrtc_options, spec_defines

log = logging.getLogger("fgcupy")

_lock = threading.Lock()  # guards _key_locks
_key_locks: dict = {}  # (spec, device index) -> the lock its one load holds
_kernels: dict = {}
_failed_in_background: dict = {}  # (spec, device index) -> what its background load raised (raised once, not retried)
_loading_in_background: set = set()  # (spec, device index) a thread is loading (guarded by _lock)
_threads: set = set()  # the loading threads, joined at exit (guarded by _lock)
_compiled_in_background: dict = {}  # (spec, device index) -> (its binary, from the disk cache?), made ready on a thread, not yet loaded
_compile_failed: set = set()  # (spec, device index) whose background compile failed: not tried there again


def _forget_after_fork() -> None:
    """A forked child starts with no loads and fresh locks, the driver's and NVRTC's included:
    its parent's threads do not exist there (a lock one held would stay locked for good) and
    loaded kernels belong to the parent's CUDA context."""
    global _lock
    _lock = threading.Lock()
    driver._lib_lock = threading.Lock()
    nvrtc._lib_lock = threading.Lock()
    _key_locks.clear()
    _kernels.clear()
    _failed_in_background.clear()
    _loading_in_background.clear()
    _threads.clear()
    _compiled_in_background.clear()
    _compile_failed.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class DriverKernel:
    """A kernel loaded through the CUDA driver; launches on torch's current stream."""

    def __init__(self, function: driver.Function):
        self.function = function

    @property
    def num_regs(self) -> int:
        return self.function.num_regs

    def launch(self, device, grid, block: int, params, shared_mem: int) -> None:
        stream = torch.cuda.current_stream(device).cuda_stream
        self.function.launch(grid, block, shared_mem, stream, params.tobytes())


class CupyKernel:
    """A cupy.RawKernel (the path without libnvrtc or libcuda); launches on torch's current stream."""

    def __init__(self, raw):
        self.raw = raw

    @property
    def num_regs(self) -> int:
        return self.raw.num_regs

    def launch(self, device, grid, block: int, params, shared_mem: int) -> None:
        from .. import bridge

        with bridge.torch_stream(device):
            self.raw(tuple(grid), (block,), (params,), shared_mem=shared_mem)


@lru_cache(maxsize=None)
def kernels_can_run() -> bool:
    """Whether fgcupy's kernels can run in this process: torch sees a CUDA GPU of compute
    capability 8.0 or newer (the kernels use cp.async and bf16 tensor-core products), and kernels
    can be compiled and launched (libnvrtc and libcuda through ctypes, else cupy)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        return False
    from . import nvrtc

    if driver.available() and nvrtc.available():
        return True
    from ..bridge import cupy_available

    return cupy_available()


def get_kernel(spec):
    """The kernel for ``spec`` on torch's current device, loaded (or compiled) on first use."""
    return get_kernel_on(torch.device("cuda", torch.cuda.current_device()), spec)


def get_kernel_on(device, spec):
    """The kernel for ``spec`` on a torch device (its index, or torch's current device)."""
    return _get_kernel(device, spec, background=False)


def ready_kernel_on(device, spec):
    """The kernel for ``spec`` if it can be had without compiling: loaded, compiled by
    ``compile_in_background``, or in the disk cache (then loaded now); None while it would need
    NVRTC or a thread is compiling it. A background compile or load that failed is raised here,
    as ``get_kernel_on`` would."""
    key = (spec, device_index(device))
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    if key in _loading_in_background or not driver.available():
        return None
    return _get_kernel(device, spec, background=False, compile_missing=False)


def kernel_at_hand(device, spec) -> bool:
    """Whether ``spec``'s kernel likely needs no compile here: loaded, compiled by a thread, or a
    file in the disk cache (nothing is loaded or read: a file that load then refuses, cut short
    or writable by others, is compiled after all)."""
    key = (spec, device_index(device))
    if key in _kernels or key in _compiled_in_background:
        return True
    return kernel_cache.cache_file(spec, getattr(spec, "arch", None) or device_arch(key[1])).is_file()


def loaded_kernel_on(device, spec):
    """The kernel for ``spec`` if this process has loaded it, else None (nothing is loaded here)."""
    return _kernels.get((spec, device_index(device)))


def compile_in_background(device, spec) -> bool:
    """Start compiling ``spec`` for ``device`` on a thread unless it is loaded, compiled or under
    way: NVRTC only, no CUDA call off the caller's thread (a module load there could meet a CUDA
    graph capture); ``ready_kernel_on`` loads the binary on the caller's thread once it is there.
    False where no thread can compile it (no libnvrtc or libcuda through ctypes: the caller
    loads it itself, through cupy) or a background compile of it failed (its error is raised
    once by ``ready_kernel_on``; after that the caller compiles it, and so meets the error, itself)."""
    if not (driver.available() and nvrtc.available()):
        return False
    key = (spec, device_index(device))
    if key in _compile_failed:
        return False
    if key in _kernels or key in _failed_in_background or key in _compiled_in_background:
        return True
    arch = getattr(spec, "arch", None) or device_arch(key[1])
    with _lock:
        if key in _loading_in_background:
            return True
        _loading_in_background.add(key)
    thread = threading.Thread(target=_compile_quietly, args=(key, arch), daemon=True, name="fgcupy-compile")
    return _start(thread, key)


def _start(thread: threading.Thread, key) -> bool:
    """Start a loading or compiling ``thread`` for ``key`` (already marked in
    _loading_in_background); False, the mark taken back, where no thread can be started."""
    with _lock:
        _threads.add(thread)
    try:
        thread.start()
    except RuntimeError:  # "can't start new thread": the caller loads the kernel itself
        with _lock:
            _threads.discard(thread)
            _loading_in_background.discard(key)
        return False
    return True


def _compile_quietly(key, arch: str) -> None:
    spec = key[0]
    try:
        compiled = kernel_cache.load(spec, arch)
        from_disk = compiled is not None
        if compiled is None:
            compiled = compile_cubin(spec, arch)
            kernel_cache.store(spec, arch, compiled)
        _compiled_in_background[key] = (compiled, from_disk)
    except Exception as error:  # noqa: BLE001 - kept for the caller's own load to raise
        _failed_in_background[key] = error
        _compile_failed.add(key)
        log.debug("fgcupy: background compile of %s failed", spec.name, exc_info=True)
    finally:
        with _lock:
            _loading_in_background.discard(key)
            _threads.discard(threading.current_thread())


def _get_kernel(device, spec, background: bool, compile_missing: bool = True):
    key = (spec, device_index(device))
    kernel = _kernels.get(key)
    if kernel is not None:
        return kernel
    with _lock:
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:  # one load per kernel; loads of different kernels run side by side
        kernel = _kernels.get(key)
        if kernel is None:
            failed = _failed_in_background.pop(key, None)
            if failed is not None:  # raised as it was, not compiled again to raise it (a later call retries)
                raise failed
            handed_over, from_disk = _compiled_in_background.pop(key, (None, False))
            try:
                kernel = _load(spec, key[1], compile_missing=compile_missing, compiled=handed_over,
                               compiled_from_disk=from_disk)
            except Exception as error:
                if background:  # kept before the lock is let go: a caller waiting on it raises this
                    _failed_in_background[key] = error
                if handed_over is not None:  # the driver refused a background compile's binary
                    _compile_failed.add(key)
                raise
            if kernel is None:  # not cached, and not to be compiled here
                return None
            _kernels[key] = kernel
    return kernel


def load_in_background(device, spec) -> None:
    """Start loading ``spec``'s kernel on a thread unless it is loaded, so that a cold compile
    overlaps the caller's own (NVRTC runs without the GIL); ``get_kernel_on`` then waits for it,
    and raises the load's own error if it failed. Nothing starts while a CUDA graph is captured."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    key = (spec, device_index(device))  # here: a thread's current device is its own
    if key in _kernels or key in _failed_in_background:
        return
    with _lock:  # one thread per kernel, however many predictions ask for it meanwhile
        if key in _loading_in_background:
            return
        _loading_in_background.add(key)
    thread = threading.Thread(target=_load_quietly, args=(torch.device("cuda", key[1]), spec), daemon=True,
                              name="fgcupy-load")
    _start(thread, key)  # where none starts, get_kernel_on loads it in the caller's thread


def wait_for_background(timeout_s: float = 120.0) -> bool:
    """Wait (at most ``timeout_s``) for the loads and compiles running on threads: before timing
    kernels (a stand-in would otherwise be timed for the kernel it stands in for) and at exit.
    Whether there were any."""
    deadline = time.monotonic() + timeout_s
    with _lock:
        threads = [thread for thread in _threads if thread.is_alive()]
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return bool(threads)


@atexit.register
def _join_loads(timeout_s: float = 120.0) -> None:
    """At exit, wait for loads still compiling: NVRTC torn down under a running compile aborts
    the process."""
    wait_for_background(timeout_s)


def _load_quietly(device, spec) -> None:
    key = (spec, device_index(device))
    try:
        _get_kernel(device, spec, background=True)
    except Exception:  # noqa: BLE001 - kept for the caller's own get_kernel_on to raise
        log.debug("fgcupy: background load of %s failed", spec.name, exc_info=True)
    finally:
        with _lock:
            _loading_in_background.discard(key)
            _threads.discard(threading.current_thread())


def device_index(device) -> int:
    """A torch CUDA device's index (torch's current device where it names none)."""
    return device.index if device.index is not None else torch.cuda.current_device()


@lru_cache(maxsize=None)
def is_hopper(index: int) -> bool:
    """Whether device ``index`` is sm_90, the GPU the wgmma and e4m3 kernels are built for. The
    one place fgcupy asks (called through this module, so a test patches it here alone)."""
    return torch.cuda.get_device_capability(index) == (9, 0)


def device_arch(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


#: Driver errors that say a cubin itself is unusable (others, such as out of memory or an
#: earlier kernel's fault, say nothing about the file).
_BAD_IMAGE_ERRORS = ("CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_PTX",
                     "CUDA_ERROR_UNSUPPORTED_PTX_VERSION", "CUDA_ERROR_INVALID_SOURCE")


def _load(spec, index: int, from_cache: bool = True, compile_missing: bool = True, compiled=None,
          compiled_from_disk: bool = False):
    """The kernel of ``compiled`` (a binary a thread compiled, or read from the disk cache where
    ``compiled_from_disk``), else from the disk cache, else compiled (None where it is not cached
    and ``compile_missing`` is off). A cached binary the driver refuses is deleted and compiled
    again."""
    if not driver.available():
        return _load_with_cupy(spec, index)
    started = time.perf_counter()
    if spec.smem_bytes > 48 * 1024:  # refused before a compile (and a cache file) it could not use
        driver.check_shared_memory(index, spec.smem_bytes, spec.name)
    arch = getattr(spec, "arch", None) or device_arch(index)
    source = "a background compile" if compiled is not None and not compiled_from_disk else "the disk cache"
    if compiled is None and from_cache:
        compiled = kernel_cache.load(spec, arch)
    if compiled is None and not compile_missing:
        return None
    if compiled is None:
        try:
            compiled = compile_cubin(spec, arch)
        except ImportError:
            return _load_with_cupy(spec, index)
        kernel_cache.store(spec, arch, compiled)
        source = "NVRTC"
    try:
        function = driver.Function(compiled.cubin, compiled.lowered_name, index, spec.smem_bytes)
    except driver.CudaDriverError as err:
        if source != "the disk cache" or not any(name in str(err) for name in _BAD_IMAGE_ERRORS):
            raise
        log.warning("fgcupy: the driver refused the cached %s (%s); deleting it%s", spec.name, err,
                    " and compiling" if compile_missing else "")
        kernel_cache.discard(spec, arch)
        return _load(spec, index, from_cache=False, compile_missing=compile_missing)
    log.info("fgcupy: loaded %s from %s in %.3f s", spec.name, source, time.perf_counter() - started)
    return DriverKernel(function)


def module_options(spec) -> tuple[str, ...]:
    """cupy.RawModule's NVRTC options for ``spec`` (``source.spec_defines`` makes the module the
    spec's own: cupy keeps one module per source and options)."""
    return nvrtc_options() + tuple(spec.extra_options) + spec_defines(spec)


def _load_with_cupy(spec, index: int):
    try:
        import cupy
    except ImportError as err:
        from .nvrtc import NvrtcUnavailable, library

        try:
            library()
        except NvrtcUnavailable as missing:  # the cause worth naming: neither way to compile exists
            raise NvrtcUnavailable(f"{missing}\nand cupy, the other way to compile, is not installed ({err})") from err
        raise

    from .source import kernel_source

    started = time.perf_counter()
    if spec.smem_bytes > 48 * 1024:  # refused before a compile it could not use, as on the driver path
        granted = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMaxSharedMemoryPerBlockOptin, index)
        driver.check_shared_memory(index, spec.smem_bytes, spec.name, granted)
    with cupy.cuda.Device(index):
        module = cupy.RawModule(code=kernel_source(spec), options=module_options(spec),
                                name_expressions=[spec.name_expression])
        try:
            raw = module.get_function(spec.name_expression)
        except cupy.cuda.compiler.CompileException as err:
            raise KernelCompileError(spec, err.get_message() if hasattr(err, "get_message") else str(err)) from err
        if spec.smem_bytes > 48 * 1024:
            raw.max_dynamic_shared_size_bytes = spec.smem_bytes
    log.info("fgcupy: loaded %s with cupy in %.2f s", spec.name, time.perf_counter() - started)
    return CupyKernel(raw)
