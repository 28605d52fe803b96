"""Compiled kernels on disk ($FGCUPY_CACHE_DIR/kernels): one file per (spec, architecture,
source, options and compiler), so a new process loads its kernels without compiling (or
importing a compiler).

A file is a magic tag, the SHA-256 of the rest, the file's full key (the hash its name is cut
from), a NUL, the kernel's lowered name, a NUL, then the cubin: a file cut short or filled with
zeros by a crash fails the hash, and one copied or renamed from another kernel's file fails the
key; either is deleted (the kernel is compiled again). A file is loaded only if this user (or
root) owns it and no other user may write it: a cubin is code the process runs. Writes are
flushed to disk and renamed into place, mode 0644 (less as the umask says), under a name that
carries the user id: in a cache folder shared by several users each keeps and loads the kernels
it compiled itself (a file of an older version that others may write is compiled anew and
rewritten)."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path

from ..paths import cache_root, read_own_file, sweep_stale_temporaries, untrusted_folder
from .compile import CompiledKernel, compile_options
from .nvrtc import library_identity
from .source import kernel_source, sources_unchanged

log = logging.getLogger("fgcupy")

MAGIC = b"fgcupy-cubin-3\n"
_DIGEST_BYTES = 32


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    log.warning(message)


def kernel_dir() -> Path:
    return cache_root() / "kernels"


def cache_key(spec, arch: str) -> str:
    """A hash of everything ``spec``'s binary for ``arch`` depends on (the full source and every
    option, which carry a hash of cuda_src/, and which libnvrtc compiles it)."""
    digest = hashlib.sha256()
    for part in (MAGIC.decode(), library_identity(), kernel_source(spec), *compile_options(spec, arch),
                 spec.name_expression, arch):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def cache_file(spec, arch: str, key: str | None = None) -> Path:
    """The file of ``spec`` compiled for ``arch``: named by the spec, its ``cache_key`` and the
    user (users sharing a cache folder keep a file each: each loads only its own)."""
    key = cache_key(spec, arch) if key is None else key
    user = f"-u{os.getuid()}" if hasattr(os, "getuid") else ""
    return kernel_dir() / f"{spec.name}-{arch}-{key[:20]}{user}.cubin"


#: No kernel file is larger (cubins here are a few hundred KB).
MAX_FILE_BYTES = 64 << 20


def load(spec, arch: str) -> CompiledKernel | None:
    """The cached kernel, or None (absent, unreadable, damaged or another kernel's: then deleted)."""
    key = cache_key(spec, arch)
    path = cache_file(spec, arch, key)
    try:
        raw = read_own_file(path, MAX_FILE_BYTES)
    except FileNotFoundError:
        return None
    except OSError as err:
        log.warning("fgcupy: cannot read the kernel cache file %s (%s); compiling", path, err)
        return None
    body = raw[len(MAGIC) + _DIGEST_BYTES:]
    stored_key, sep, rest = body.partition(b"\0")
    name, sep2, cubin = rest.partition(b"\0")
    intact = (raw.startswith(MAGIC) and hashlib.sha256(body).digest() == raw[len(MAGIC):len(MAGIC) + _DIGEST_BYTES]
              and sep and sep2 and cubin)
    try:
        lowered = name.decode() if intact else ""
    except UnicodeDecodeError:
        intact = False
    if not intact:
        log.warning("fgcupy: deleting a damaged kernel cache file %s; compiling", path)
        discard(spec, arch)
        return None
    if stored_key != key.encode():
        log.warning("fgcupy: deleting %s: it holds another kernel's binary (copied or renamed); compiling", path)
        discard(spec, arch)
        return None
    return CompiledKernel(cubin, lowered, "")


def discard(spec, arch: str) -> None:
    """Delete the cached kernel (damaged, or refused by the driver); a missing file is fine."""
    try:
        cache_file(spec, arch).unlink()
    except OSError:
        pass


def store(spec, arch: str, compiled: CompiledKernel) -> None:
    """Write the kernel (flushed, then renamed into place); a cache that cannot be written is
    logged and skipped."""
    key = cache_key(spec, arch)
    path = cache_file(spec, arch, key)
    body = key.encode() + b"\0" + compiled.lowered_name.encode() + b"\0" + compiled.cubin
    if not sources_unchanged():
        _warn_once("fgcupy: cuda_src/ changed since this process read it; kernels compiled now are not "
                   "cached (a new process compiles and caches the new sources)")
        return
    refused = untrusted_folder(path.parent.parent) or untrusted_folder(path.parent)  # the cache folder, then kernels/
    if refused:
        _warn_once(f"fgcupy: not writing kernels to {path.parent} ({refused}); they will be compiled again")
        return
    try:
        tmp = path.parent / f".tmp-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # never writable by others: see load
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(body).digest() + body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        sweep_stale_temporaries(path.parent, ".tmp-*")
    except OSError as err:
        log.warning("fgcupy: cannot write the kernel cache %s (%s); kernels will be compiled again", path, err)
