"""Where fgcupy keeps files between processes (autotune results, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FGCUPY_CACHE_DIR"


def cache_root() -> Path:
    """$FGCUPY_CACHE_DIR, else $XDG_CACHE_HOME/fgcupy, else ~/.cache/fgcupy."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fgcupy"
