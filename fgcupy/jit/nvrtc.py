"""libnvrtc through ctypes: the few NVRTC calls that turn a kernel's source into a cubin.

A Python binding package cost a cold process about 0.1 s to import and to search for the library
(notes/PERF.md, session 22); the pip wheel ``nvidia-cuda-nvrtc`` puts it at a known place, so it is loaded from
there directly (else found by ``cuda.pathfinder`` where that is installed, else by the system's
loader). NVRTC loads its builtins library by name when it first compiles, which the loader does
not find next to a wheel's libnvrtc, so the builtins of its version are loaded from the same
folder first. Compiles release the GIL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import sys
import threading

SUCCESS = 0
REQUIRED_MAJOR = 13
#: The name the system's loader is asked for last (a CUDA toolkit on its search path).
SYSTEM_NAME = "nvrtc64_130_0.dll" if sys.platform == "win32" else "libnvrtc.so.13"
_lib = None
_lib_lock = threading.Lock()


class NvrtcUnavailable(ImportError):
    """No libnvrtc could be loaded (the runtime then compiles through cupy)."""


class NvrtcError(RuntimeError):
    """An NVRTC call other than the compile itself failed."""


def _wheel_paths() -> list[str]:
    """Where the nvidia-cuda-nvrtc 13 wheel puts the library, in each ``nvidia`` folder found."""
    try:
        found = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(found.submodule_search_locations or ()) if found else []
    if sys.platform == "win32":
        return [os.path.join(r, "cu13", "bin", d, "nvrtc64_130_0.dll") for r in roots for d in ("x86_64", "")]
    return [os.path.join(r, "cu13", "lib", "libnvrtc.so.13") for r in roots]


@functools.lru_cache(maxsize=None)
def library_identity() -> str:
    """Which libnvrtc compiles, without loading it (a process whose kernels are cached loads
    none): the wheel's library by name and size (another release has another size), or "system"
    for any other (a system toolkit upgraded within one major version keeps its kernels: the
    binaries stay valid, the newer compiler's changes reach them once cuda_src/ changes)."""
    for path in _wheel_paths():
        try:
            return f"{os.path.basename(os.path.realpath(path))}:{os.stat(path).st_size}"
        except OSError:
            continue
    return "system"


def _pathfinder_path() -> str | None:
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib
    except ImportError:
        return None
    try:
        return load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # noqa: BLE001 - any failure means: not found this way
        return None


def _open(path: str):
    """libnvrtc at ``path``, its signatures declared and, where a file path names it, the builtins
    library of its own version (``libnvrtc-builtins.so.<major>.<minor>`` beside it) loaded."""
    lib = ctypes.CDLL(path)
    _declare(lib)
    major, minor = _version(lib)
    if major != REQUIRED_MAJOR:
        raise NvrtcError(f"NVRTC {major}.{minor}, not {REQUIRED_MAJOR}.x (the kernels' cache and options are "
                         f"for CUDA {REQUIRED_MAJOR})")
    folder = os.path.dirname(os.path.realpath(path)) if os.path.dirname(path) else ""
    if folder and sys.platform != "win32":
        builtins = os.path.join(folder, f"libnvrtc-builtins.so.{major}.{minor}")
        if os.path.isfile(builtins):
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    return lib


def _declare(lib) -> None:
    p, sz = ctypes.c_void_p, ctypes.c_size_t
    pp = ctypes.POINTER(p)
    signatures = {
        "nvrtcVersion": [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)],
        "nvrtcCreateProgram": [pp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, p, p],
        "nvrtcDestroyProgram": [pp],
        "nvrtcAddNameExpression": [p, ctypes.c_char_p],
        "nvrtcCompileProgram": [p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetProgramLogSize": [p, ctypes.POINTER(sz)],
        "nvrtcGetProgramLog": [p, ctypes.c_char_p],
        "nvrtcGetLoweredName": [p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)],
        "nvrtcGetCUBINSize": [p, ctypes.POINTER(sz)],
        "nvrtcGetCUBIN": [p, ctypes.c_char_p],
        "nvrtcGetErrorString": [ctypes.c_int],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_char_p if name == "nvrtcGetErrorString" else ctypes.c_int


def library():
    """libnvrtc, loaded once (under a lock: two threads' first compiles must not load it twice);
    NvrtcUnavailable names where it was looked for."""
    global _lib
    with _lib_lock:
        if _lib is None:
            tried = []
            candidates = [p for p in _wheel_paths() if os.path.isfile(p)] + [_pathfinder_path, lambda: SYSTEM_NAME]
            for candidate in candidates:
                path = candidate() if callable(candidate) else candidate
                if path is None:
                    continue
                try:
                    lib = _open(path)
                except (OSError, AttributeError, NvrtcError) as err:
                    tried.append(f"{path}: {err}")
                    continue
                _lib = lib
                break
            else:
                raise NvrtcUnavailable("libnvrtc (CUDA 13) not found; install nvidia-cuda-nvrtc==13.0.*"
                                       + "".join(f"\n  {t}" for t in tried))
    return _lib


def available() -> bool:
    """Whether libnvrtc can be loaded (the CPU tests that compile kernels skip without it)."""
    try:
        library()
    except NvrtcUnavailable:
        return False
    return True


def version() -> tuple[int, int]:
    return _version(library())


def _version(lib) -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(lib, result: int, call: str) -> None:
    if result != SUCCESS:
        raise NvrtcError(f"{call} failed: {lib.nvrtcGetErrorString(result).decode()}")


@contextlib.contextmanager
def _program(source: str, filename: str):
    lib = library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), filename.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        yield lib, prog
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _compile(lib, prog, options) -> tuple[bool, str]:
    encoded = [o.encode() for o in options]
    result = lib.nvrtcCompileProgram(prog, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded))
    size = ctypes.c_size_t()
    _check(lib, lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
    buf = ctypes.create_string_buffer(size.value)
    _check(lib, lib.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
    return result == SUCCESS, buf.value.decode(errors="replace").rstrip()


def accepts(source: str, options) -> tuple[bool, str]:
    """(whether NVRTC compiles ``source`` with ``options``, its log): for checks that need no
    binary, such as the parameter structs' layout asserts."""
    with _program(source, "check.cu") as (lib, prog):
        return _compile(lib, prog, options)


def compile_program(source: str, filename: str, name_expression: str, options) -> tuple[bool, str, str, bytes]:
    """Compile ``source``; (succeeded, log, lowered name of ``name_expression``, cubin), the last
    two empty when the compile failed."""
    with _program(source, filename) as (lib, prog):
        _check(lib, lib.nvrtcAddNameExpression(prog, name_expression.encode()), "nvrtcAddNameExpression")
        ok, log = _compile(lib, prog, options)
        if not ok:
            return False, log, "", b""
        lowered = ctypes.c_char_p()
        _check(lib, lib.nvrtcGetLoweredName(prog, name_expression.encode(), ctypes.byref(lowered)),
               "nvrtcGetLoweredName")
        lowered_name = lowered.value.decode()  # owned by the program: copied before it is destroyed
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
        if size.value == 0:  # a virtual architecture (compute_XX) gives PTX, no binary
            return False, log + "\nno binary for this architecture (a virtual one such as compute_80 gives none)", "", b""
        cubin = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return True, log, lowered_name, cubin.raw
