"""Kernels loaded ahead on threads (jit.runtime.load_in_background): one thread per kernel
however many callers ask meanwhile, and a load that failed is not retried in the background
(the caller's own load raises it). No GPU needed: the load itself is replaced."""

import threading
import time
from dataclasses import dataclass

import torch

from fgcupy.jit import runtime


@dataclass(frozen=True)
class Spec:
    name: str


def test_one_thread_per_kernel_and_no_background_retry_of_a_failure(monkeypatch):
    started, release = [], threading.Event()

    def slow_load(device, spec):
        started.append(spec.name)
        release.wait(10)
        if spec.name == "broken":
            raise RuntimeError("does not compile")

    monkeypatch.setattr(runtime, "get_kernel_on", slow_load)
    monkeypatch.setattr(runtime, "_failed_in_background", set())
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
    runtime.load_in_background(device, broken)
    runtime.load_in_background(device, fine)  # not loaded (the stand-in keeps nothing): asked again
    deadline = time.monotonic() + 10
    while runtime._loading_in_background and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == ["broken", "fine", "fine"]
