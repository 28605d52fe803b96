"""Kernels loaded ahead on threads (jit.runtime.load_in_background): one thread per kernel
however many callers ask meanwhile, and a load that failed is not retried in the background
(the caller's own load raises it). No GPU needed: the load itself is replaced."""

import threading
import time
from dataclasses import dataclass

import pytest
import torch

from fgcupy.jit import runtime


@dataclass(frozen=True)
class Spec:
    name: str


def test_one_thread_per_kernel_and_no_background_retry_of_a_failure(monkeypatch):
    started, release = [], threading.Event()

    def slow_load(spec, index, from_cache=True, compile_missing=True, compiled=None, **_):
        started.append(spec.name)
        release.wait(10)
        if spec.name == "broken":
            raise RuntimeError("does not compile")
        return object()

    monkeypatch.setattr(runtime, "_load", slow_load)
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_failed_in_background", {})
    monkeypatch.setattr(runtime, "_loading_in_background", set())
    device = torch.device("cuda", 0)
    fine, broken = Spec("fine"), Spec("broken")
    for _ in range(5):
        runtime.load_in_background(device, fine)
        runtime.load_in_background(device, broken)
    release.set()
    deadline = time.monotonic() + 10
    while runtime._loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == ["broken", "fine"]
    runtime.load_in_background(device, broken)  # failed: not retried in the background
    runtime.load_in_background(device, fine)  # loaded: nothing to do
    deadline = time.monotonic() + 10
    while runtime._loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == ["broken", "fine"]


def test_a_failed_background_load_raises_its_own_error_once_without_compiling_again(monkeypatch):
    """The caller's get_kernel_on raises what the thread's load raised (no second compile to find
    it); the call after that loads again."""
    loads = []

    def failing_load(spec, index, from_cache=True, compile_missing=True, compiled=None, **_):
        loads.append(spec.name)
        raise RuntimeError(f"{spec.name} does not compile ({len(loads)})")

    monkeypatch.setattr(runtime, "_load", failing_load)
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_failed_in_background", {})
    monkeypatch.setattr(runtime, "_loading_in_background", set())
    device, broken = torch.device("cuda", 0), Spec("broken")
    runtime.load_in_background(device, broken)
    deadline = time.monotonic() + 10
    while runtime._loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match=r"broken does not compile \(1\)"):
        runtime.get_kernel_on(device, broken)
    assert loads == ["broken"]
    with pytest.raises(RuntimeError, match=r"broken does not compile \(2\)"):
        runtime.get_kernel_on(device, broken)


def test_a_ready_kernel_comes_from_memory_or_disk_never_from_a_compile(monkeypatch):
    """ready_kernel_on: None while a thread compiles the kernel or where only NVRTC could make it;
    a cached kernel is loaded there and then."""
    on_disk, loads = {"cached"}, []

    def load(spec, index, from_cache=True, compile_missing=True, compiled=None, **_):
        loads.append((spec.name, compile_missing))
        return object() if spec.name in on_disk else None if not compile_missing else object()

    monkeypatch.setattr(runtime, "_load", load)
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_failed_in_background", {})
    monkeypatch.setattr(runtime, "_loading_in_background", {(Spec("compiling"), 0)})
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    device = torch.device("cuda", 0)
    assert runtime.ready_kernel_on(device, Spec("compiling")) is None
    assert runtime.ready_kernel_on(device, Spec("missing")) is None and (Spec("missing"), 0) not in runtime._kernels
    cached = runtime.ready_kernel_on(device, Spec("cached"))
    assert cached is not None and runtime.ready_kernel_on(device, Spec("cached")) is cached
    assert loads == [("missing", False), ("cached", False)]
    runtime._failed_in_background[(Spec("broken"), 0)] = RuntimeError("broken does not compile")
    with pytest.raises(RuntimeError, match="broken does not compile"):
        runtime.ready_kernel_on(device, Spec("broken"))


def test_a_hopper_kernel_not_yet_compiled_has_the_portable_kernel_stand_in(monkeypatch):
    """runnable_spec: the mma.sync kernel of the same shape while the Hopper kernel compiles on a
    thread; the Hopper kernel once ready or with FGCUPY_STAND_IN=0; under graph capture the one
    already loaded, nothing compiled."""
    from fgcupy import attention_kernel
    from fgcupy.jit import AttentionSpec, Sm90WsAttentionSpec

    ready, loaded, started, can_compile = set(), set(), [], [True]
    monkeypatch.setattr(attention_kernel, "ready_kernel_on", lambda device, spec: object() if spec in ready else None)
    monkeypatch.setattr(attention_kernel, "loaded_kernel_on", lambda device, spec: object() if spec in loaded else None)
    monkeypatch.setattr(attention_kernel, "compile_in_background",
                        lambda device, spec: started.append(spec) or can_compile[0])
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    monkeypatch.delenv(attention_kernel.STAND_IN_ENV, raising=False)
    device = torch.device("cuda", 0)
    hopper = Sm90WsAttentionSpec("float16", 96, 64, key_tile=128, stages=2, pingpong=0)
    portable = AttentionSpec("bfloat16", 128, 128)
    assert attention_kernel.runnable_spec(device, portable) is portable and not started
    stand_in = attention_kernel.runnable_spec(device, hopper)
    assert isinstance(stand_in, AttentionSpec) and started == [hopper]
    assert (stand_in.dtype, stand_in.head_dim, stand_in.slice_m) == ("float16", 96, 64)
    for off in ("0", "off", " False "):
        monkeypatch.setenv(attention_kernel.STAND_IN_ENV, off)
        assert attention_kernel.runnable_spec(device, hopper) is hopper
    monkeypatch.setenv(attention_kernel.STAND_IN_ENV, "1")
    assert attention_kernel.runnable_spec(device, hopper) == stand_in
    monkeypatch.setenv(attention_kernel.STAND_IN_ENV, "never")  # not a value it reads: said, and the stand-in runs
    with pytest.warns(RuntimeWarning, match=r"FGCUPY_STAND_IN='never' is not 0 or 1"):
        assert attention_kernel.runnable_spec(device, hopper) == stand_in
    monkeypatch.delenv(attention_kernel.STAND_IN_ENV)
    capturing[0] = True  # nothing loaded: the Hopper kernel (loaded as before); the stand-in once it is loaded
    assert attention_kernel.runnable_spec(device, hopper) is hopper
    loaded.add(stand_in)
    assert attention_kernel.runnable_spec(device, hopper) == stand_in
    loaded.add(hopper)
    assert attention_kernel.runnable_spec(device, hopper) is hopper
    capturing[0] = False
    can_compile[0] = False  # no thread can compile (cupy's path): the caller loads it
    assert attention_kernel.runnable_spec(device, hopper) is hopper
    ready.add(hopper)
    started.clear()
    assert attention_kernel.runnable_spec(device, hopper) is hopper and not started


def test_a_background_compile_is_loaded_by_the_caller_and_its_failure_raised(monkeypatch, tmp_path):
    """compile_in_background compiles on a thread (no CUDA call there); ready_kernel_on then loads
    that binary on the caller's thread, or raises the compile's own error."""
    from fgcupy.jit import kernel_cache

    compiled, loads = [], []
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_failed_in_background", {})
    monkeypatch.setattr(runtime, "_loading_in_background", set())
    monkeypatch.setattr(runtime, "_compiled_in_background", {})
    monkeypatch.setattr(runtime, "_compile_failed", set())
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    monkeypatch.setattr(runtime.nvrtc, "available", lambda: True)
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90")
    monkeypatch.setattr(kernel_cache, "load", lambda spec, arch: None)
    monkeypatch.setattr(kernel_cache, "store", lambda spec, arch, binary: None)

    def compile_cubin(spec, arch):
        if spec.name == "broken":
            raise RuntimeError("broken does not compile")
        compiled.append((spec.name, threading.current_thread().name))
        return f"binary of {spec.name}"

    def load(spec, index, from_cache=True, compile_missing=True, compiled=None, **_):
        loads.append((spec.name, compiled, threading.current_thread().name))
        return object() if compiled else None

    monkeypatch.setattr(runtime, "compile_cubin", compile_cubin)
    monkeypatch.setattr(runtime, "_load", load)
    device = torch.device("cuda", 0)
    for name in ("fine", "broken"):
        assert runtime.compile_in_background(device, Spec(name))
    deadline = time.monotonic() + 10
    while runtime._loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    assert compiled == [("fine", "fgcupy-compile")]
    kernel = runtime.ready_kernel_on(device, Spec("fine"))
    assert kernel is not None and loads == [("fine", "binary of fine", threading.current_thread().name)]
    assert runtime.ready_kernel_on(device, Spec("fine")) is kernel and len(loads) == 1
    with pytest.raises(RuntimeError, match="broken does not compile"):
        runtime.ready_kernel_on(device, Spec("broken"))
    # raised once; no second background compile: the caller compiles it itself (and meets the error)
    assert runtime.ready_kernel_on(device, Spec("broken")) is None
    assert not runtime.compile_in_background(device, Spec("broken")) and not runtime._loading_in_background
    monkeypatch.setattr(runtime.nvrtc, "available", lambda: False)
    assert not runtime.compile_in_background(device, Spec("other"))


def test_a_refused_background_binary_or_a_thread_that_cannot_start_ends_the_background_tries(monkeypatch):
    """A binary the driver refuses after a background compile is raised and not compiled on a
    thread again; where no thread starts, the key is not left marked (the caller loads it)."""
    monkeypatch.setattr(runtime, "_kernels", {})
    monkeypatch.setattr(runtime, "_failed_in_background", {})
    monkeypatch.setattr(runtime, "_loading_in_background", set())
    monkeypatch.setattr(runtime, "_compiled_in_background", {(Spec("refused"), 0): ("binary", False)})
    monkeypatch.setattr(runtime, "_compile_failed", set())
    monkeypatch.setattr(runtime, "_threads", set())
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    monkeypatch.setattr(runtime.nvrtc, "available", lambda: True)
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90")

    def load(spec, index, from_cache=True, compile_missing=True, compiled=None, **_):
        raise runtime.driver.CudaDriverError("cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE")

    monkeypatch.setattr(runtime, "_load", load)
    device = torch.device("cuda", 0)
    with pytest.raises(runtime.driver.CudaDriverError):
        runtime.ready_kernel_on(device, Spec("refused"))
    assert not runtime.compile_in_background(device, Spec("refused"))

    class Unstartable(threading.Thread):
        def start(self):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(runtime.threading, "Thread", Unstartable)
    assert not runtime.compile_in_background(device, Spec("other"))
    runtime.load_in_background(device, Spec("other"))
    assert not runtime._loading_in_background and not runtime._threads
    runtime.wait_for_background(1.0)  # nothing left to join


def test_a_cached_binary_the_driver_refuses_is_compiled_again_also_when_a_thread_read_it(monkeypatch, tmp_path):
    """A thread that found the kernel in the disk cache hands over a cached binary, not a fresh
    compile: refused by the driver (built by another toolkit, in a cache that cannot be
    deleted), it is not raised but left to a compile, as the caller's own load does."""
    from fgcupy.jit import AttentionSpec, kernel_cache
    from fgcupy.jit.compile import CompiledKernel

    monkeypatch.setenv("FGCUPY_CACHE_DIR", str(tmp_path))
    for name, value in (("_kernels", {}), ("_failed_in_background", {}), ("_loading_in_background", set()),
                        ("_compiled_in_background", {}), ("_compile_failed", set())):
        monkeypatch.setattr(runtime, name, value)
    spec = AttentionSpec("bfloat16", 128, 128)
    kernel_cache.store(spec, "sm_80", CompiledKernel(b"other toolkit", "kernel", ""))

    class Function:
        num_regs = 1

        def __init__(self, cubin, name, index, smem):
            if cubin == b"other toolkit":
                raise runtime.driver.CudaDriverError("cuModuleLoadData failed: CUDA_ERROR_INVALID_IMAGE (200)")

    monkeypatch.setattr(runtime.driver, "Function", Function)
    monkeypatch.setattr(runtime.driver, "available", lambda: True)
    monkeypatch.setattr(runtime.driver, "check_shared_memory", lambda *args: None)
    monkeypatch.setattr(runtime.nvrtc, "available", lambda: True)
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_80")
    monkeypatch.setattr(runtime, "compile_cubin", lambda spec, arch: CompiledKernel(b"fresh", "kernel", ""))
    monkeypatch.setattr(kernel_cache, "discard", lambda spec, arch: None)  # a read-only cache folder
    device = torch.device("cuda", 0)
    assert runtime.compile_in_background(device, spec)
    runtime.wait_for_background(10)  # (says whether a thread was still running: it may be done)
    assert runtime._compiled_in_background[(spec, 0)] == (CompiledKernel(b"other toolkit", "kernel", ""), True)
    assert runtime.ready_kernel_on(device, spec) is None  # it needs NVRTC now
    kernel = runtime.get_kernel_on(device, spec)
    assert isinstance(kernel, runtime.DriverKernel) and isinstance(kernel.function, Function)


def test_a_prediction_loads_the_stand_in_of_a_hopper_default_ahead_while_it_is_not_compiled(monkeypatch):
    from fgcupy import gpu_prediction
    from fgcupy.jit import AttentionSpec, Sm90WsAttentionSpec
    from fgcupy.jit.plan_spec import LaunchOrderSpec

    monkeypatch.setattr(gpu_prediction, "device_index", lambda device: 0)
    at_hand = [False]
    monkeypatch.setattr(gpu_prediction, "kernel_at_hand", lambda device, spec: at_hand[0])
    for arch, hand, expected in (("sm_90", False, [Sm90WsAttentionSpec, AttentionSpec, LaunchOrderSpec]),
                                 ("sm_90", True, [Sm90WsAttentionSpec, LaunchOrderSpec]),
                                 ("sm_80", False, [AttentionSpec, LaunchOrderSpec])):
        at_hand[0] = hand
        monkeypatch.setattr(gpu_prediction, "device_arch", lambda index, arch=arch: arch)
        specs = gpu_prediction.attention_kernels_ahead("bfloat16", 128, 128, torch.device("cuda", 0))
        assert [type(s) for s in specs] == expected
