"""Spec of the plan's launch-order kernel (cuda_src/launch_order.cu)."""

from __future__ import annotations

from dataclasses import dataclass

from .launch import ParamStruct
from .plain_spec import PlainKernelSpec

ORDER_THREADS = 1024
#: Buckets of the order: a row's key tiles (of ORDER_TILE_KEYS keys), shifted right until the
#: longest possible row fits (``order_shift``); rows beyond the last bucket share it.
ORDER_BUCKETS = 4096
ORDER_TILE_KEYS = 64
#: Rows whose buckets are staged in shared memory at a time (16-bit each).
ORDER_SEGMENT = 8192
ORDER_CONSTANTS = {"kOrderThreads": ORDER_THREADS, "kOrderBuckets": ORDER_BUCKETS,
                   "kOrderSegment": ORDER_SEGMENT, "kOrderTileKeys": ORDER_TILE_KEYS}
#: fg::launch_order's one argument: the mask's indptr [B, H, QB + 1], the int32 order it writes
#: (B * H * QB rows), QB, and the bucket shift.
ORDER_PARAMS = ParamStruct("OrderParams", (
    ("indptr", "in"), ("order", "out"), ("rows", "i32"), ("q_blocks", "i32"), ("shift", "i32"),
))


def order_shift(kv_len: int) -> int:
    """The smallest right shift that puts a row of kv_len keys (its tile count) in a bucket."""
    tiles, shift = -(-max(kv_len, 0) // ORDER_TILE_KEYS), 0
    while tiles >> shift >= ORDER_BUCKETS:
        shift += 1
    return shift


@dataclass(frozen=True)
class LaunchOrderSpec(PlainKernelSpec):
    """``fg::launch_order``: one CTA writes the rows of a mask longest first (see the source)."""

    source = "launch_order.cu"
    template = "fg::launch_order"
    threads = ORDER_THREADS
    params = ORDER_PARAMS
    constants = ORDER_CONSTANTS
