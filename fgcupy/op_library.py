"""The ``fgcupy`` namespace of torch operators, defined through ``torch.library.Library``.

Each op is a schema plus a CPU and a CUDA kernel and a fake implementation (shapes only), which
torch.compile traces through. ``torch.library.custom_op`` would do the same but costs ~10 ms per op at import (it reads
its caller's source for error messages), which a process's first call pays.
"""

from __future__ import annotations

from typing import Callable

import torch

LIBRARY = torch.library.Library("fgcupy", "DEF")


def define(schema: str, *, cpu: Callable, cuda: Callable, fake: Callable) -> None:
    """Define ``fgcupy::<schema>`` with a kernel per device type and its fake implementation."""
    name = LIBRARY.define(schema)
    for kernel, key in ((cpu, "CPU"), (cuda, "CUDA")):
        LIBRARY.impl(name, kernel, key)
    torch.library.register_fake(f"fgcupy::{name}", fake, lib=LIBRARY)
