"""The few CUDA driver calls that load a cubin and launch its kernel, through ctypes.

Nothing here imports a CUDA Python package: a process whose kernels are already compiled loads
and launches them without importing cupy (hundreds of milliseconds). Contexts are the devices'
primary contexts, the ones torch (and cupy) use.
"""

from __future__ import annotations

import ctypes
import sys
import threading

# CUfunction_attribute values (cuda.h).
_ATTR_NUM_REGS = 4
_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
# CUdevice_attribute values (cuda.h).
DEVICE_MAX_REGISTERS_PER_BLOCK = 12
DEVICE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97

_lib = None
_lib_lock = threading.Lock()


class CudaDriverError(RuntimeError):
    """A CUDA driver call failed; names the call and the driver's error."""


def _library():
    """libcuda, loaded once, with the signatures used here."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
            p, i, u = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint
            signatures = {
                "cuInit": [u],
                "cuDeviceGet": [ctypes.POINTER(i), i],
                "cuDeviceGetAttribute": [ctypes.POINTER(i), i, i],
                "cuDevicePrimaryCtxRetain": [ctypes.POINTER(p), i],
                "cuCtxGetCurrent": [ctypes.POINTER(p)],
                "cuCtxPushCurrent_v2": [p],
                "cuCtxPopCurrent_v2": [ctypes.POINTER(p)],
                "cuModuleLoadData": [ctypes.POINTER(p), ctypes.c_char_p],
                "cuModuleGetFunction": [ctypes.POINTER(p), p, ctypes.c_char_p],
                "cuFuncSetAttribute": [p, i, i],
                "cuFuncGetAttribute": [ctypes.POINTER(i), i, p],
                "cuLaunchKernel": [p, u, u, u, u, u, u, u, p, ctypes.POINTER(p), ctypes.POINTER(p)],
                "cuGetErrorName": [i, ctypes.POINTER(ctypes.c_char_p)],
                "cuTensorMapEncodeTiled": [p, i, u, p, ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                                           ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32), i, i, i, i],
            }
            for name, args in signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, i
            _lib = lib
    return _lib


def available() -> bool:
    """True when libcuda loads (a CUDA driver is installed)."""
    try:
        _library()
    except OSError:
        return False
    return True


def _check(result: int, call: str) -> None:
    if result != 0:
        name = ctypes.c_char_p()
        _lib.cuGetErrorName(result, ctypes.byref(name))
        raise CudaDriverError(f"CUDA driver call {call} failed: {(name.value or b'unknown').decode()} ({result})")


def _device(device_index: int) -> ctypes.c_int:
    lib = _library()
    _check(lib.cuInit(0), "cuInit")
    device = ctypes.c_int()
    _check(lib.cuDeviceGet(ctypes.byref(device), device_index), "cuDeviceGet")
    return device


def device_attribute(device_index: int, attribute: int) -> int:
    """One CUdevice_attribute of a device (e.g. DEVICE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)."""
    device = _device(device_index)
    value = ctypes.c_int()
    _check(_lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device), "cuDeviceGetAttribute")
    return value.value


def check_shared_memory(device_index: int, needed: int, kernel: str, granted: int | None = None) -> None:
    """ValueError naming both sizes where a kernel needs more shared memory per block than the
    device grants (GPUs with 99 KB, sm_86 / sm_89 / sm_120, against sm_80's 163 KB and
    Hopper's 227 KB): the driver's own refusal names neither. ``granted``: the opt-in size where
    the caller read it (the cupy path), else read through the driver."""
    if granted is None:
        granted = device_attribute(device_index, DEVICE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    if needed > granted:
        raise ValueError(f"{kernel} needs {needed:,} bytes of shared memory per block; GPU {device_index} grants "
                         f"{granted:,}. Smaller tiles or 64-query slices need less (head dim 256 with 128-query "
                         "slices has no kernel that fits such a GPU)")


def _primary_context(device_index: int) -> ctypes.c_void_p:
    lib = _library()
    device = _device(device_index)
    context = ctypes.c_void_p()
    _check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "cuDevicePrimaryCtxRetain")
    return context


class _InContext:
    """Make ``context`` current for a block (pushed only if another one is current)."""

    def __init__(self, context: ctypes.c_void_p):
        self.context, self.pushed = context, False

    def __enter__(self):
        current = ctypes.c_void_p()
        _check(_lib.cuCtxGetCurrent(ctypes.byref(current)), "cuCtxGetCurrent")
        if current.value != self.context.value:
            _check(_lib.cuCtxPushCurrent_v2(self.context), "cuCtxPushCurrent")
            self.pushed = True

    def __exit__(self, *exc):
        if self.pushed:
            _check(_lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p())), "cuCtxPopCurrent")


class Function:
    """One kernel of a loaded cubin on one device."""

    def __init__(self, cubin: bytes, lowered_name: str, device_index: int, max_dynamic_smem: int = 0):
        self.context = _primary_context(device_index)
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        with _InContext(self.context):
            _check(_lib.cuModuleLoadData(ctypes.byref(module), cubin), "cuModuleLoadData")
            _check(_lib.cuModuleGetFunction(ctypes.byref(function), module, lowered_name.encode()),
                   f"cuModuleGetFunction({lowered_name})")
            if max_dynamic_smem > 48 * 1024:
                check_shared_memory(device_index, max_dynamic_smem, lowered_name)
                _check(_lib.cuFuncSetAttribute(function, _ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES, max_dynamic_smem),
                       "cuFuncSetAttribute(max dynamic shared memory)")
        self.module, self.function = module, function

    @property
    def num_regs(self) -> int:
        value = ctypes.c_int()
        _check(_lib.cuFuncGetAttribute(ctypes.byref(value), _ATTR_NUM_REGS, self.function), "cuFuncGetAttribute")
        return value.value

    def launch(self, grid: tuple, block: int, shared_mem: int, stream: int, params: bytes) -> None:
        """Launch with one by-value parameter (the packed struct ``params``) on ``stream``."""
        grid = tuple(grid) + (1,) * (3 - len(grid))
        arg = ctypes.create_string_buffer(params, len(params))
        args = (ctypes.c_void_p * 1)(ctypes.cast(arg, ctypes.c_void_p))
        with _InContext(self.context):
            _check(_lib.cuLaunchKernel(self.function, grid[0], grid[1], grid[2], block, 1, 1, shared_mem,
                                       ctypes.c_void_p(stream), args, None), "cuLaunchKernel")


# CUtensorMap enums (cuda.h).
TENSOR_MAP_BFLOAT16, TENSOR_MAP_FLOAT16 = 9, 6
_SWIZZLE_128B, _L2_PROMOTION_256B = 3, 3


def encode_tensor_map(data_type: int, address: int, dims: tuple, strides_bytes: tuple, box: tuple) -> bytes | None:
    """A tiled CUtensorMap (128-byte swizzle, zero fill out of bounds) of a tensor at ``address``
    with ``dims`` (innermost first), byte ``strides_bytes`` of the outer dims and a ``box``; None
    where the driver refuses it (alignment, strides)."""
    lib = _library()
    rank = len(dims)
    out = ctypes.create_string_buffer(128 + 64)
    start = -ctypes.addressof(out) % 64  # the descriptor must be 64-byte aligned
    result = lib.cuTensorMapEncodeTiled(
        ctypes.c_void_p(ctypes.addressof(out) + start), data_type, rank, ctypes.c_void_p(address),
        (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides_bytes),
        (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)), 0, _SWIZZLE_128B,
        _L2_PROMOTION_256B, 0)
    return out.raw[start:start + 128] if result == 0 else None
