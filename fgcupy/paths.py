"""Where fgcupy keeps files between processes (autotune results, compiled kernels)."""

from __future__ import annotations

import os
import stat
import tempfile
import time
from pathlib import Path

CACHE_ENV = "FGCUPY_CACHE_DIR"
#: A temporary file this old was left by a writer that died before renaming it (a write takes
#: well under a second).
STALE_TEMPORARY_S = 3600


def cache_root() -> Path:
    """$FGCUPY_CACHE_DIR (made absolute), else $XDG_CACHE_HOME/fgcupy (an absolute one, as the
    XDG rules say), else ~/.cache/fgcupy; where no home directory is known (a user id without a
    passwd entry and no $HOME, also where a variable starts with ~), fgcupy-cache-<uid> in the
    temporary folder."""
    try:
        folder = os.environ.get(CACHE_ENV)
        if folder:
            return Path(folder).expanduser().absolute()
        xdg = Path(os.environ.get("XDG_CACHE_HOME", "")).expanduser()
        if xdg.is_absolute():
            return xdg / "fgcupy"
        return Path.home() / ".cache" / "fgcupy"
    except RuntimeError:  # ~ with no home directory to expand it to
        return Path(tempfile.gettempdir()) / f"fgcupy-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def sweep_stale_temporaries(folder: Path, pattern: str, age_s: float = STALE_TEMPORARY_S) -> None:
    """Delete files matching ``pattern`` in ``folder`` older than ``age_s`` seconds: what writers
    killed between creating a temporary file and renaming it into place left behind."""
    now = time.time()
    try:
        for path in folder.glob(pattern):
            try:
                if now - path.stat().st_mtime > age_s:
                    path.unlink()
            except OSError:
                pass  # gone already, or another user's
    except OSError:
        pass


def read_own_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``max_bytes``, not reached
    through a symlink, owned by this user (or root) and writable by no other; OSError otherwise.
    A FIFO or a device planted there would block or never end, and a file another user could
    write would run their code (a kernel) or steer this process's choices (a tuning table)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        if hasattr(os, "getuid"):
            if st.st_uid not in (os.getuid(), 0):
                raise PermissionError(f"owned by user {st.st_uid}, not by this one ({os.getuid()})")
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PermissionError(f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})")
        if st.st_size > max_bytes:
            raise FileTooLarge(f"larger than {max_bytes} bytes ({st.st_size})")
        data = file.read(st.st_size + 1)
        if len(data) > max_bytes:  # it grew meanwhile
            raise FileTooLarge(f"larger than {max_bytes} bytes")
        return data


class FileTooLarge(OSError):
    """A file of ours, larger than its reader takes."""

