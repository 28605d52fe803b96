"""The autotune file: read (memoised, every problem a warning), merged and written under a
private, bounded lock; the newest KEEP_VERSIONS tables of other library versions are kept beside
this version's (a warning names any table that gives way)."""

from __future__ import annotations


import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Iterable


from ..jit import AttentionSpec
from ..paths import (CACHE_ENV, FileTooLarge, cache_root, read_own_file, shared_by_others,  # noqa: F401 - CACHE_ENV: autotune API
                     sweep_stale_temporaries, untrusted_folder)
from .candidates import candidate_specs
from .keys import DeviceInfo, ProblemKey, _SPEC_CLASSES
from .selection import TuneResult

AUTOTUNE_ENV = "FGCUPY_AUTOTUNE"
CACHE_FILE = "autotune.json"
FORMAT = 2
#: Tables of other library versions kept in the file (each version reads only its own).
KEEP_VERSIONS = 8
#: Seconds a writer waits for the cache lock before giving up (with a warning, no store).
LOCK_TIMEOUT_S = 10.0


class AutotuneCacheWarning(UserWarning):
    """The autotune file could not be used or written; fgcupy carries on without it."""




# Persistence
# ---------------------------------------------------------------------------------------------
def cache_path() -> Path:
    """$FGCUPY_CACHE_DIR/autotune.json, else $XDG_CACHE_HOME/fgcupy/..., else ~/.cache/fgcupy/...;
    in a cache folder another user owns, autotune-u<uid>.json (only its owner may write or read
    a user's table)."""
    root = cache_root()
    return root / (f"autotune-u{os.getuid()}.json" if shared_by_others(root) else CACHE_FILE)


#: The modules that decide a key's candidates and its default (``candidates_hash``).
CANDIDATE_MODULES = ("jit/spec.py", "tiles.py", "autotune/candidates.py")


def library_stamp() -> dict:
    """What makes stored timings stale: the library version, the kernel sources, the code that
    decides which kernels are candidates and which is the default (a winner no longer offered
    must not be used, a new candidate must get its chance), and the libnvrtc that compiles them
    (another compiler's binaries rank differently)."""
    from .. import __version__
    from ..jit.nvrtc import library_identity
    from ..jit.source import source_hash

    return {"version": __version__, "kernel_hash": source_hash(), "candidates_hash": candidates_hash(),
            "nvrtc": library_identity()}


@functools.lru_cache(maxsize=None)
def candidates_hash() -> str:
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in CANDIDATE_MODULES:
        try:
            source = (package / name).read_bytes()
        except OSError:  # an install without sources: the version alone tells
            source = b"?"
        digest.update(name.encode() + b"\0" + source)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float | None = None):
    """Exclusive lock on ``path`` (a side file) for the read-merge-write of the cache: created
    0600, never through a symlink, waited on for at most ``timeout`` seconds (TimeoutError)."""
    timeout = LOCK_TIMEOUT_S if timeout is None else timeout
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        deadline = time.monotonic() + timeout
        try:
            import fcntl

            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"{path} stayed locked for {timeout:.0f} s") from None
                    time.sleep(0.05)
        except ImportError:  # Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _stamp_id(stamp: dict) -> str:
    return f"{stamp.get('version')}|{stamp.get('kernel_hash')}|{stamp.get('candidates_hash')}|{stamp.get('nvrtc')}"


#: The largest tuning file read or written (an entry with its candidate table takes about 6 KB;
#: older versions' tables are dropped, oldest first, to stay within it).
MAX_FILE_BYTES = 16 << 20


class TuneCache:
    """The JSON file of tuned winners. Reads are memoised by the file's stat signature (and
    ``choose_spec`` memoises per key), so planning rarely touches the disk; every problem with
    the file becomes a warning, never an exception."""

    _memo: dict = {}  # path -> (signature, entries)
    _warned: set = set()
    _lock = threading.Lock()

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_path()

    # ---- reading ----
    def entries(self) -> dict[str, dict]:
        """Entries valid for this library version and kernel sources ({} when unusable)."""
        try:
            st = self.path.stat()
        except OSError:
            return {}
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            memo = self._memo.get(str(self.path))
            if memo is not None and memo[0] == signature:
                return memo[1]
        entries, problem = self._read()
        if problem:
            self._warn(problem, signature)
        with self._lock:
            self._memo[str(self.path)] = (signature, entries)
        return entries

    def _read(self) -> tuple[dict, str | None]:
        """(entries, problem): entries are usable ones; problem says why the file was not."""
        try:
            raw = read_own_file(self.path, MAX_FILE_BYTES)
        except OSError as err:
            return {}, f"cannot read {self.path}: {err}"
        data, problem = self._parse(raw)
        if problem:
            return {}, problem
        stamp = library_stamp()
        tables = self._tables(data)
        entries = tables.get(_stamp_id(stamp), {}).get("entries")
        if entries is None and _stamp_id(data["header"]) == _stamp_id(stamp):
            return {}, (f"{self.path} has this version's table, but its entries are not an object (an edit?): "
                        "it is not read, and the next tune replaces it")
        if entries is None:
            theirs = {k: data["header"].get(k) for k in stamp}
            return {}, (f"{self.path} was written by fgcupy {theirs['version']} (kernels {theirs['kernel_hash']}, "
                        f"candidates {theirs['candidates_hash']}, NVRTC {theirs['nvrtc']}), this is "
                        f"{stamp['version']} (kernels {stamp['kernel_hash']}, candidates {stamp['candidates_hash']}, "
                        f"NVRTC {stamp['nvrtc']}): its results are stale and fresh tunes will be stored beside them")
        return entries, None

    def _parse(self, raw: bytes) -> tuple[dict | None, str | None]:
        """(data, problem): the parsed file if it is an fgcupy autotune file; both for a newer
        fgcupy's file (not to be read, nor overwritten)."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # ValueError includes UnicodeDecodeError
            return None, f"{self.path} is corrupt ({type(err).__name__}); it will be replaced by a fresh tune"
        header = data.get("header") if isinstance(data, dict) else None
        if _newer_format(header):
            return data, (f"{self.path} was written by a newer fgcupy (autotune format {header['format']}, this one "
                          f"reads {FORMAT}): it is left as it is and tuned results stay in this process")
        if not isinstance(header, dict) or header.get("library") != "fgcupy" or header.get("format") not in (1, FORMAT):
            return None, f"{self.path} is not an fgcupy autotune file (format {FORMAT}); it will be replaced"
        return data, None

    @staticmethod
    def _tables(data: dict) -> dict:
        """{version stamp id: {"header": ..., "entries": {...}}} of every well-formed table, newest
        written first: the file's own table, then the others as they were stored (newest first)."""
        tables = {}
        if isinstance(data.get("entries"), dict):
            tables[_stamp_id(data["header"])] = {"header": data["header"], "entries": data["entries"]}
        others = data.get("other_versions")
        if isinstance(others, dict):
            for stamp_id, table in others.items():
                if stamp_id not in tables and isinstance(table, dict) and isinstance(table.get("entries"), dict):
                    tables[stamp_id] = {"header": table.get("header") if isinstance(table.get("header"), dict) else {},
                                        "entries": table["entries"]}
        return tables

    def _warn(self, message: str, signature) -> None:
        with self._lock:
            if (str(self.path), signature, message) in self._warned:
                return
            self._warned.add((str(self.path), signature, message))
        warnings.warn(f"fgcupy autotune: {message}", AutotuneCacheWarning, stacklevel=3)

    def lookup(self, key: ProblemKey) -> AttentionSpec | None:
        entry = self.entries().get(key.id)
        if entry is None:
            return None
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("spec"), dict):
                raise TypeError("an entry must be an object with a spec object")
            fields = entry["spec"]
            bad = {k: v for k, v in fields.items() if not (type(v) is int or type(v) is str)}
            if bad:
                raise TypeError(f"spec fields must be ints or strings, got {bad}")
            kind = _SPEC_CLASSES[entry.get("kernel", "AttentionSpec")]
            missing = [f.name for f in dataclasses.fields(kind) if f.name not in fields]
            if missing:  # a field left out would take its default: a kernel nobody tuned
                raise ValueError(f"its spec lacks {missing}")
            spec = kind(**fields)
            if "spec_name" in entry and spec.name != entry["spec_name"]:
                raise ValueError(f"its spec fields make {spec.name}, its spec_name says {entry['spec_name']!r}")
        except (KeyError, TypeError, ValueError) as err:
            self._warn(f"ignoring unusable entry {key.id!r} in {self.path}: {err}", None)
            return None
        if (spec.dtype, spec.head_dim, spec.slice_m) != (key.dtype, key.head_dim, key.slice_m):
            self._warn(f"ignoring entry {key.id!r} in {self.path}: its spec {spec.name} is for another problem", None)
            return None
        if spec not in candidate_specs(key.dtype, key.head_dim, key.slice_m, key.arch):
            self._warn(f"ignoring entry {key.id!r} in {self.path}: {spec.name} is not a kernel for {key.arch}", None)
            return None
        return spec

    def entry(self, key: ProblemKey) -> dict | None:
        return self.entries().get(key.id)

    # ---- writing ----
    def store(self, results: Iterable[TuneResult], gpu: DeviceInfo | None = None) -> bool:
        """Merge ``results`` into the file under a lock and replace it atomically. Returns False
        (with a warning) when the folder or file cannot be written."""
        new = {r.key.id: r.to_entry() for r in results if r.storable}
        if not new:
            return True
        refused = untrusted_folder(self.path.parent)
        if refused:
            self._warn(f"not writing {self.path} ({refused}); tuned results stay in this process only", None)
            return False
        try:
            with _file_lock(self.path.with_name(self.path.name + ".lock")):
                tables = {}
                try:
                    raw = read_own_file(self.path, MAX_FILE_BYTES)
                except FileNotFoundError:
                    raw = None
                except FileTooLarge as err:  # ours (an earlier version wrote it unbounded): replaced
                    self._warn(f"{self.path} is {err}; it will be replaced by this version's table", None)
                    raw = None
                except OSError as err:  # left as it is: another user's, or not a file of ours
                    self._warn(f"not reading {self.path} ({err}); it is left as it is and tuned results stay in "
                               f"this process (remove it, or make it yours and writable by you alone)", None)
                    return False
                if raw is not None:
                    data, problem = self._parse(raw)
                    if problem:
                        self._warn(problem, None)
                        if data is not None:  # a newer fgcupy's file: its tables are never wiped
                            return False
                    else:
                        tables = self._tables(data)
                stamp = library_stamp()
                mine = tables.pop(_stamp_id(stamp), {"header": {}, "entries": {}})
                header = mine["header"]
                gpus = dict(header.get("gpus", {})) if isinstance(header.get("gpus"), dict) else {}
                if gpu is not None:
                    gpus[f"{gpu.name}|{gpu.arch}"] = {"name": gpu.name, "arch": gpu.arch, "sm_count": gpu.sm_count}
                merged = {**mine["entries"], **new}
                # by when written, newest first; a tie (one second) keeps _tables' order, newest first
                newest = sorted(tables.items(), key=lambda item: str(item[1]["header"].get("written", "")),
                                reverse=True)
                dropped = [stamp_id for stamp_id, _ in newest[KEEP_VERSIONS:]]
                newest = newest[:KEEP_VERSIONS]
                header = {"library": "fgcupy", "format": FORMAT, **stamp, "gpus": gpus,
                          "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                while True:  # older versions' tables give way to this one's within MAX_FILE_BYTES
                    text = json.dumps({"header": header, "entries": dict(sorted(merged.items())),
                                       "other_versions": dict(newest)}, indent=1)
                    if len(text.encode()) <= MAX_FILE_BYTES:
                        break
                    if not newest:
                        self._warn(f"this version's tuned table alone is larger than {MAX_FILE_BYTES} bytes; "
                                   f"{self.path} is left as it is and tuned results stay in this process", None)
                        return False
                    dropped.append(newest.pop()[0])
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".autotune-", suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        f.write(text)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                sweep_stale_temporaries(self.path.parent, ".autotune-*.tmp")
                if dropped:
                    self._warn(f"{self.path} keeps this version's table and the newest {KEEP_VERSIONS} others within "
                               f"{MAX_FILE_BYTES} bytes: the tables of {len(dropped)} older versions gave way "
                               f"({', '.join(dropped)})", None)
        except OSError as err:
            self._warn(f"cannot write {self.path}: {err}; tuned results stay in this process only", None)
            return False
        return True


def _newer_format(header) -> bool:
    """Whether ``header`` is a later fgcupy's (a format this version cannot read, not a foreign file)."""
    return (isinstance(header, dict) and header.get("library") == "fgcupy" and type(header.get("format")) is int
            and header["format"] > FORMAT)
