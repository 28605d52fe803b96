"""Where fgcupy keeps files between processes (autotune results, compiled kernels)."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from functools import lru_cache
from pathlib import Path

log = logging.getLogger("fgcupy")

CACHE_ENV = "FGCUPY_CACHE_DIR"
#: A temporary file this old was left by a writer that died before renaming it (a write takes
#: well under a second).
STALE_TEMPORARY_S = 3600


def cache_root() -> Path:
    """$FGCUPY_CACHE_DIR, else $XDG_CACHE_HOME/fgcupy (an absolute one, as the XDG rules say),
    else ~/.cache/fgcupy; where no home directory is known (a user id without a passwd entry and
    no $HOME), fgcupy-cache-<uid> in the temporary folder. A relative $FGCUPY_CACHE_DIR is taken
    from the working folder of the first use (a later chdir does not move the cache); one whose
    ~ cannot be expanded is warned about once."""
    folder = os.environ.get(CACHE_ENV) or ""
    if folder:  # pinned by its own value (and $HOME where it starts with ~), whatever else changes
        return _given_root(folder, os.environ.get("HOME") if folder.startswith("~") else None)
    return _default_root(os.environ.get("XDG_CACHE_HOME", ""), os.environ.get("HOME"))


@lru_cache(maxsize=None)
def _given_root(folder: str, home: str | None) -> Path:
    """$FGCUPY_CACHE_DIR's folder, absolute (``home``: $HOME, which expanduser reads)."""
    try:
        return Path(folder).expanduser().absolute()
    except RuntimeError:
        log.warning("fgcupy: %s=%r names a home folder that does not exist; caching in %s", CACHE_ENV, folder,
                    _temporary_root())
        return _temporary_root()


@lru_cache(maxsize=16)
def _default_root(xdg: str, home: str | None) -> Path:
    """cache_root without $FGCUPY_CACHE_DIR for these values of the variables (``home``: $HOME,
    which Path.home reads)."""
    try:
        xdg_path = Path(xdg).expanduser() if xdg else None
    except RuntimeError:  # an XDG value that cannot be expanded is ignored, as any relative one
        xdg_path = None
    if xdg_path is not None and xdg_path.is_absolute():
        return xdg_path / "fgcupy"
    try:
        return Path.home() / ".cache" / "fgcupy"
    except RuntimeError:  # no home directory
        return _temporary_root()


def _temporary_root() -> Path:
    return Path(tempfile.gettempdir()) / f"fgcupy-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def untrusted_folder(folder: Path) -> str | None:
    """Why files should not be written to or deleted from ``folder`` (None: they may). A folder
    reached through a symlink, or owned by another user (not root) without the sticky bit,
    could send this user's writes and deletions wherever its owner points it; the temporary
    fallback, whose name is predictable, must be this user's own. A missing folder is made,
    private when it is the temporary fallback's."""
    try:
        fallback = _temporary_root()
        under_fallback = fallback in folder.parents
        if not folder.exists() and not folder.is_symlink():
            if folder == fallback or under_fallback:
                fallback.mkdir(mode=0o700, exist_ok=True)  # the parents of a mkdir get the default mode
            # The fallback is checked before anything is made inside it: a planted symlink there
            # would have this user make folders wherever it points.
            if under_fallback and (why := _unsafe_fallback(fallback)):
                return why
            _make_folders(folder)
        if why := _unsafe_folder(folder):
            return why
        if (folder == fallback or under_fallback) and (why := _unsafe_fallback(fallback)):
            return why
    except OSError as err:
        return str(err)
    return None


def _make_folders(folder: Path) -> None:
    """Make ``folder`` and its missing parents. One made in a folder several users share
    (sticky and writable by all: a team's cache folder, /tmp) is shared the same way, so that
    every user of the cache can keep files of their own in it (each loads only its own)."""
    missing = []
    for path in (folder, *folder.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another process: its maker chose its mode
        parent = os.stat(path.parent)
        if parent.st_mode & stat.S_ISVTX and parent.st_mode & stat.S_IWOTH:
            os.chmod(path, 0o1777)


def shared_by_others(folder: Path) -> bool:
    """Whether ``folder`` exists and another user owns it (a cache folder shared with them)."""
    try:
        return hasattr(os, "getuid") and os.stat(folder).st_uid != os.getuid()
    except OSError:
        return False


def _unsafe_fallback(fallback: Path) -> str | None:
    """Why the temporary fallback is not to be used, or None. Its name is predictable: made by
    another user, sticky or not, it is theirs to empty or swap."""
    if why := _unsafe_folder(fallback):
        return why
    owner = os.lstat(fallback).st_uid
    if hasattr(os, "getuid") and owner != os.getuid():
        return f"{fallback} is owned by user {owner}, not by this one ({os.getuid()})"
    return None


def _unsafe_folder(path: Path) -> str | None:
    """Why ``path`` itself (not followed) is no folder to trust, or None."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symlink"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if hasattr(os, "getuid") and st.st_uid not in (os.getuid(), 0) and not st.st_mode & stat.S_ISVTX:
        return f"{path} is owned by user {st.st_uid}, not by this one ({os.getuid()})"
    return None


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
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("not a regular file")
        file = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with file:
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

