"""Problem keys: which tuned result applies (GPU, dtype, head dim, slice size, length and
density buckets)."""

from __future__ import annotations


import math
from dataclasses import dataclass

import torch

from ..jit.spec import ATTENTION_SPEC_CLASSES
from ..mask import SliceMask

DENSITY_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# Problem key
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    """What tuning needs to know about a GPU: identity for the key, limits for the fit check."""

    name: str
    capability: tuple[int, int]
    sm_count: int
    smem_per_block_optin: int
    regs_per_block: int

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @classmethod
    def of(cls, device) -> "DeviceInfo":
        return _device_info(_device_index(device))


def _device_index(device) -> int:
    device = torch.device(device) if device is not None else torch.device("cuda")
    return device.index if device.index is not None else torch.cuda.current_device()


_device_infos: dict[int, DeviceInfo] = {}


def _device_info(index: int) -> DeviceInfo:
    info = _device_infos.get(index)
    if info is None:
        from ..jit import driver

        props = torch.cuda.get_device_properties(index)
        info = DeviceInfo(
            name=props.name,
            capability=(props.major, props.minor),
            sm_count=props.multi_processor_count,
            smem_per_block_optin=driver.device_attribute(index, driver.DEVICE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            regs_per_block=driver.device_attribute(index, driver.DEVICE_MAX_REGISTERS_PER_BLOCK),
        )
        _device_infos[index] = info
    return info


def length_bucket(length: int) -> int:
    """Nearest power of two in log scale (32,760 -> 32,768; 17,550 -> 16,384), at least 128."""
    return 2 ** max(7, round(math.log2(max(length, 1))))


def density_bucket(density: float) -> float:
    """Nearest of DENSITY_BUCKETS in log scale (tile choice follows keys per row, a ratio)."""
    density = min(max(float(density), DENSITY_BUCKETS[0]), 1.0)
    return min(DENSITY_BUCKETS, key=lambda b: abs(math.log(density / b)))


@dataclass(frozen=True)
class ProblemKey:
    gpu: str
    arch: str
    dtype: str
    head_dim: int
    slice_m: int
    q_bucket: int
    kv_bucket: int
    density: float

    @classmethod
    def make(cls, info: DeviceInfo, dtype: str, head_dim: int, slice_m: int, q_len: int, kv_len: int,
             density: float) -> "ProblemKey":
        return cls(info.name, info.arch, dtype, int(head_dim), int(slice_m), length_bucket(q_len),
                   length_bucket(kv_len), density_bucket(density))

    @property
    def id(self) -> str:
        return (f"{self.gpu}|{self.arch}|{self.dtype}|d{self.head_dim}|m{self.slice_m}"
                f"|q{self.q_bucket}|kv{self.kv_bucket}|p{self.density:g}")


_SPEC_CLASSES = ATTENTION_SPEC_CLASSES


def mask_density_estimate(mask: SliceMask) -> float:
    """Capacity / all slices: exact for top-k and from_dense masks, an upper bound otherwise;
    reads shapes only, so planning stays free of host synchronisation."""
    total = mask.batch * mask.heads * mask.q_blocks * mask.kv_len
    return min(1.0, mask.capacity / total) if total else 1.0
