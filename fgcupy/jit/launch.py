"""One launch ABI: a kernel takes a single parameter struct whose layout is written once, here.

A :class:`ParamStruct` lists its fields as (name, kind). From that one list come the C++
definition (prepended to the kernel source at compile time, so the kernel reads
``const __grid_constant__ Name p``) and the numpy structured dtype the host packs; the two
layouts cannot drift (``source.kernel_source`` puts it ahead of the kernel's source for both
compile paths). :func:`launch` runs a spec on torch's current stream.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from functools import cached_property

import numpy as np


#: Field kinds: C++ type and numpy type (pointers travel as 64-bit integers). "tmap" is a
#: tensor-memory-accelerator descriptor (CUtensorMap: 128 opaque bytes, 64-byte aligned).
KINDS = {
    "in": ("const void*", np.uint64),
    "out": ("void*", np.uint64),
    "i64": ("long long", np.int64),
    "i32": ("int", np.int32),
    "f32": ("float", np.float32),
    "tmap": ("TensorMap", np.dtype("V128")),
}
_ALIGN = {"tmap": 64}  # numpy aligns a void field to 1 byte; C++ to alignas(64)


def _field_alignment(kind: str) -> int:
    return _ALIGN.get(kind, np.dtype(KINDS[kind][1]).alignment)

_TENSOR_MAP_CPP = ("#ifndef FGCUPY_TENSOR_MAP\n#define FGCUPY_TENSOR_MAP\n"
                   "struct alignas(64) TensorMap { unsigned long long bits[16]; };\n#endif\n")


@dataclass(frozen=True)
class ParamStruct:
    """A kernel's parameter struct: C++ name and ((field, kind), ...) in declaration order."""

    name: str
    fields: tuple

    def __post_init__(self):
        for field, kind in self.fields:
            if kind not in KINDS:
                raise ValueError(f"{self.name}.{field}: kind must be one of {tuple(KINDS)}, got {kind!r}")

    @cached_property
    def dtype(self) -> np.dtype:
        """C's layout: each field at the next multiple of its alignment, the size a multiple of
        the largest one."""
        offsets, formats, end = [], [], 0
        for _, kind in self.fields:
            fmt, align = np.dtype(KINDS[kind][1]), _field_alignment(kind)
            end = -(-end // align) * align
            offsets.append(end)
            formats.append(fmt)
            end += fmt.itemsize
        return np.dtype({"names": [f for f, _ in self.fields], "formats": formats, "offsets": offsets,
                         "itemsize": -(-end // self.alignment) * self.alignment, "aligned": True})

    @property
    def alignment(self) -> int:
        return max(_field_alignment(kind) for _, kind in self.fields)

    def cpp(self) -> str:
        body = "".join(f"  {KINDS[kind][0]} {field};\n" for field, kind in self.fields)
        maps = _TENSOR_MAP_CPP if any(kind == "tmap" for _, kind in self.fields) else ""
        return f"{maps}struct {self.name} {{\n{body}}};\n"

    def layout_checks(self) -> str:
        """C++ static_asserts that the compiler gives the struct numpy's size and alignment
        (NVRTC has no constant offsetof; :meth:`offsets_kernel` checks each field on a GPU)."""
        return (f"static_assert(sizeof({self.name}) == {self.dtype.itemsize}, \"{self.name} size\");\n"
                f"static_assert(alignof({self.name}) == {self.alignment}, \"{self.name} alignment\");\n")

    def offsets_kernel(self) -> str:
        """Source of ``extern "C" __global__ void offsets(long long* out)`` writing the C++
        offset of every field, in order (compared with numpy's on a GPU)."""
        lines = "".join(f"  out[{i}] = reinterpret_cast<const char*>(&s.{field}) - base;\n"
                        for i, (field, _) in enumerate(self.fields))
        return (self.cpp() + "extern \"C\" __global__ void offsets(long long* out) {\n"
                f"  {self.name} s;\n  const char* base = reinterpret_cast<const char*>(&s);\n{lines}}}\n")

    @property
    def offsets(self) -> list:
        return [self.dtype.fields[field][1] for field, _ in self.fields]

    @cached_property
    def _names(self) -> frozenset:
        return frozenset(field for field, _ in self.fields)

    def pack(self, **values) -> np.void:
        """One struct value; every field must be given (tensors and None become pointers). Filled
        from one tuple: a third of the time of setting each field alone, on every launch."""
        if values.keys() != self._names:
            missing, extra = self._names - values.keys(), values.keys() - self._names
            raise TypeError(f"{self.name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
        devices = set()
        row = []
        for field, kind in self.fields:
            value = values[field]
            if kind in ("in", "out"):
                value = 0 if value is None else _device_pointer(f"{self.name}.{field}", value, devices)
            elif kind == "tmap":
                value = bytes(128) if value is None else bytes(memoryview(value).cast("B"))  # None: a zero descriptor
                if len(value) != 128:
                    raise ValueError(f"{self.name}.{field}: a tensor map is 128 bytes, got {len(value)}")
            else:
                value = _number(f"{self.name}.{field}", kind, value)
            row.append(value)
        packed = np.zeros((), dtype=self.dtype)  # zeros: the padding between fields too
        packed[()] = tuple(row)
        return packed[()]


_F32_MAX = float(np.finfo(np.float32).max)
#: (min, max) of each integer field kind.
_INT_RANGES = {kind: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for kind, (_, t) in KINDS.items()
               if kind not in ("in", "out") and np.issubdtype(t, np.integer)}


def _device_pointer(where: str, value, devices: set) -> int:
    """The address of a tensor on the one CUDA device every pointer field of a struct is on (a
    host address or another GPU's would be read by the kernel as this GPU's memory)."""
    device = getattr(value, "device", None)
    if getattr(device, "type", None) != "cuda" or not hasattr(value, "data_ptr"):
        raise TypeError(f"{where} must be a CUDA tensor (or None), got "
                        f"{'a tensor on ' + str(device) if device is not None else type(value).__name__}")
    devices.add(device.index)
    if len(devices) > 1:
        raise ValueError(f"{where} is on cuda:{device.index}; the struct's other tensors are on "
                         f"{', '.join(f'cuda:{d}' for d in sorted(devices - {device.index}))}")
    return value.data_ptr()


def _number(where: str, kind: str, value):
    """``value`` for an int or float field, refused where numpy would wrap, truncate or round it
    to infinity (an integral float is taken as its int)."""
    if kind == "f32":
        if isinstance(value, (bool, str, bytes)) or value is None:
            raise TypeError(f"{where} must be a number, got {value!r}")
        number = float(value)
        if math.isnan(number) or (math.isfinite(number) and abs(number) > _F32_MAX):
            raise ValueError(f"{where} must be a float32 number (not NaN, within its range), got {value!r}")
        return number
    try:
        number = operator.index(value)
    except TypeError:
        number = float(value) if isinstance(value, (float, np.floating)) else None
        if number is None or not number.is_integer():
            raise TypeError(f"{where} must be an int, got {value!r}") from None
        number = int(number)
    low, high = _INT_RANGES[kind]
    if not low <= number <= high:
        raise ValueError(f"{where} = {number} is outside {kind}'s range [{low}, {high}]")
    return number


def _is_index(value) -> bool:
    """An int the driver takes as a grid size (numpy and one-element int tensors too), not a bool."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


#: CUDA's grid limits: x, y, z.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch(spec, device, grid, params: np.void, shared_mem: int | None = None) -> None:
    """Run ``spec`` with one packed parameter struct on torch's current stream of ``device``;
    TypeError for a struct that is not the kernel's (the driver would copy the kernel's size of
    parameters from it), ValueError for a grid that is not one to three ints within CUDA's limits
    (the driver's "invalid configuration" names none)."""
    from .runtime import get_kernel_on

    if not isinstance(params, np.void) or params.dtype != spec.params.dtype:
        raise TypeError(f"{spec.name}: params must be a {spec.params.name} packed by spec.params.pack, got "
                        f"{getattr(params, 'dtype', type(params).__name__)}")
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or not all(_is_index(n) for n in grid):
        raise ValueError(f"{spec.name}: grid must be a tuple of one to three ints, got {grid!r}")
    if any(n > limit for n, limit in zip(grid, GRID_LIMITS)):
        raise ValueError(f"{spec.name}: grid {tuple(grid)} exceeds CUDA's limits {GRID_LIMITS} (x, y, z); "
                         "the problem is too large for one launch of this kernel")
    if any(n < 1 for n in grid) or (shared_mem is not None and shared_mem < 0):
        raise ValueError(f"{spec.name}: grid {tuple(grid)} and shared memory {shared_mem} must be positive "
                         "(a launch with nothing to do is the caller's to skip)")

    get_kernel_on(device, spec).launch(device, grid, spec.threads, params,
                                       spec.smem_bytes if shared_mem is None else shared_mem)
