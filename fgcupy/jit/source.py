"""Where the CUDA sources live and the NVRTC options every compile path shares."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def _source_dir() -> Path:
    """cuda_src/ inside the installed package, else the repository's top-level cuda_src/ (a work
    tree on PYTHONPATH)."""
    for candidate in (_PACKAGE / "cuda_src", _PACKAGE.parent / "cuda_src"):
        if (candidate / "common.cuh").is_file():
            return candidate
    return _PACKAGE / "cuda_src"  # read_source names it in its error


SOURCE_DIR = _source_dir()


@lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    path = SOURCE_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"fgcupy kernel source {path} is missing (broken install?)")
    return path.read_text()


@lru_cache(maxsize=None)
def source_hash() -> str:
    """Hash of every file in cuda_src/.

    Disk caches key on the top-level source and the options, not on headers pulled in with -I;
    putting this hash into the options means an edited header never reuses a stale binary.
    """
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*")):
        if path.suffix in (".cu", ".cuh"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sources_unchanged() -> bool:
    """Whether cuda_src/ still hashes as it did when this process first hashed it: a header edited
    since (a checkout or an upgrade under a running process) reached NVRTC through -I, so what it
    compiled does not belong under the old hash."""
    return source_hash.__wrapped__() == source_hash()


def nvrtc_options() -> tuple[str, ...]:
    """Options for every fgcupy kernel, without the target architecture (each path adds its own)."""
    return (
        "-std=c++17",
        f"-I{SOURCE_DIR}",
        f"-DFGCUPY_SRC_HASH=0x{source_hash()}ULL",
    )


def spec_defines(spec) -> tuple[str, ...]:
    """Defines that make ``spec``'s module its own: the opt-in shared memory size. CuPy keeps one
    module per (source, options) and the size is set on that module's function, so specs that
    differ only in it must not share a module."""
    return (f"-DFGCUPY_SMEM_OPTIN={int(spec.smem_bytes)}",)


def kernel_source(spec) -> str:
    """The code NVRTC compiles for ``spec``: the constants and parameter structs the Python side
    owns (``spec.constants``; ``spec.params`` and any ``spec.shared_params`` of kernels in the
    same file), then the kernel's source."""
    constants = getattr(spec, "constants", {})
    prefix = "".join(f"constexpr int {name} = {int(value)};\n" for name, value in constants.items())
    for params in (getattr(spec, "params", None), *getattr(spec, "shared_params", ())):
        if params is not None and params.name + " {" not in prefix:
            prefix += params.cpp()
    return prefix + read_source(spec.source)
