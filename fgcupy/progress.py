"""Progress bars for long runs (autotuning, benchmark reports): tqdm on stderr, silent when
stderr is not a terminal (logs and CI stay clean)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, *, total: int | None = None, desc: str = ""):
    """A tqdm bar over ``iterable`` (or ``total`` steps, advanced with ``.update()``)."""
    quiet = sys.stderr is None or not hasattr(sys.stderr, "isatty")  # closed (2>&-) or replaced by a bare object
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=True if quiet else None, leave=False,
                dynamic_ncols=True)
