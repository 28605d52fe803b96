"""The ``fgcupy`` namespace of torch operators, defined through ``torch.library.Library``.

Each op is a schema plus a CPU, a CUDA and a Meta kernel; torch.compile traces through the Meta
kernel. ``torch.library.custom_op`` would do the same but costs ~10 ms per op at import (it reads
its caller's source for error messages), which a process's first call pays.
"""

from __future__ import annotations

from typing import Callable

import torch

LIBRARY = torch.library.Library("fgcupy", "DEF")


def define(schema: str, *, cpu: Callable, cuda: Callable, meta: Callable) -> None:
    """Define ``fgcupy::<schema>`` with a kernel per device type (meta: shapes only)."""
    name = LIBRARY.define(schema)
    for kernel, key in ((cpu, "CPU"), (cuda, "CUDA"), (meta, "Meta")):
        LIBRARY.impl(name, kernel, key)
