"""Compiled kernels on disk ($FGCUPY_CACHE_DIR/kernels): one file per (spec, architecture,
source and options), so a new process loads its kernels without compiling (or importing a
compiler). A file is the kernel's lowered name, a NUL, then the cubin; writes are atomic."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

from ..paths import cache_root
from .compile import CompiledKernel, compile_options
from .source import kernel_source

log = logging.getLogger("fgcupy")


def kernel_dir() -> Path:
    return cache_root() / "kernels"


def cache_file(spec, arch: str) -> Path:
    """The file of ``spec`` compiled for ``arch``: named by the spec and a hash of everything the
    binary depends on (the full source and every option, which carry a hash of cuda_src/)."""
    digest = hashlib.sha256()
    for part in (kernel_source(spec), *compile_options(spec, arch), spec.name_expression):
        digest.update(part.encode())
        digest.update(b"\0")
    return kernel_dir() / f"{spec.name}-{arch}-{digest.hexdigest()[:20]}.cubin"


def load(spec, arch: str) -> CompiledKernel | None:
    """The cached kernel, or None (absent or unreadable)."""
    path = cache_file(spec, arch)
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    name, sep, cubin = raw.partition(b"\0")
    if not sep or not cubin:
        log.warning("fgcupy: ignoring a damaged kernel cache file %s", path)
        return None
    return CompiledKernel(cubin, name.decode(), "")


def store(spec, arch: str, compiled: CompiledKernel) -> None:
    """Write the kernel (atomically); a cache that cannot be written is logged and skipped."""
    path = cache_file(spec, arch)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(compiled.lowered_name.encode() + b"\0" + compiled.cubin)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        log.warning("fgcupy: cannot write the kernel cache %s (%s); kernels will be compiled again", path, err)
