"""torch <-> cupy without copies (DLPack), on torch's current stream.

Kernels are launched through the CUDA driver (``fgcupy.jit``: ctypes, or cupy where the driver or
NVRTC cannot be loaded that way), but the tensors belong to torch: results are torch tensors allocated by
torch's caching allocator, and launches go on ``torch.cuda.current_stream()`` so fgcupy orders
correctly with the model around it (and inside CUDA graph capture). cupy arrays given as inputs
come in through DLPack here.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

_TORCH_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def is_cupy_array(x) -> bool:
    return type(x).__module__.startswith("cupy") and hasattr(x, "__cuda_array_interface__")


def to_torch(x, what: str) -> torch.Tensor:
    """A torch view of ``x`` (a torch tensor or a cupy array), sharing its memory."""
    if isinstance(x, torch.Tensor):
        return x
    if is_cupy_array(x):
        return torch.from_dlpack(x)
    raise TypeError(f"{what} must be a torch.Tensor or a cupy.ndarray, got {type(x).__name__}")


def to_cupy(t: torch.Tensor):
    """A cupy view of a CUDA torch tensor, sharing its memory (zero copies)."""
    import cupy

    return cupy.from_dlpack(t)


def dtype_name(dtype, what: str) -> str:
    """'bfloat16' / 'float16' for a torch dtype or one of those names; TypeError otherwise."""
    name = (_TORCH_DTYPES.get(dtype) if isinstance(dtype, torch.dtype)
            else dtype if isinstance(dtype, str) and dtype in _TORCH_DTYPES.values() else None)
    if name is None:
        raise TypeError(f"{what} must be torch.bfloat16 or torch.float16, got {dtype}")
    return name


@contextlib.contextmanager
def torch_stream(device: torch.device):
    """Make torch's current stream on ``device`` cupy's current stream for the block."""
    import cupy

    stream = torch.cuda.current_stream(device)
    with warnings.catch_warnings():
        # cupy 14 prefers Stream.from_external; ExternalStream keeps working with cupy 13 too.
        warnings.simplefilter("ignore", DeprecationWarning)
        external = cupy.cuda.ExternalStream(stream.cuda_stream, device.index)
    with cupy.cuda.Device(device.index):
        with external:
            yield


def cupy_available() -> bool:
    """True when cupy imports and sees a CUDA device."""
    try:
        import cupy

        return bool(cupy.is_available())
    except Exception:  # noqa: BLE001 - any import/driver failure means "no GPU path"
        return False
