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

    def slow_load(spec, index, from_cache=True):
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

    def failing_load(spec, index, from_cache=True):
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
