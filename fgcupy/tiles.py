"""Default tile choices of the attention kernels, in one place (what runs when nothing is tuned)."""

from __future__ import annotations

from .jit import AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec


def default_config(head_dim: int, slice_m: int) -> dict:
    """Heuristic tile parameters of the mma.sync kernel (any sm_80+ GPU): 32-key tiles, three
    stages and two 16-row m-tiles per warp for 128-query slices (the fastest measured on an
    H100, notes/PERF.md); 64-key tiles, two stages, one m-tile per warp for 64-query slices.
    Heads of 256 take 32-key tiles, two stages and one m-tile per warp (anything larger spills
    or passes sm_80's shared memory)."""
    if head_dim > 128:
        return {"key_tile": 32, "stages": 2, "rows_per_warp": 16}
    if slice_m == 128:
        return {"key_tile": 32, "stages": 3, "rows_per_warp": 32}
    return {"key_tile": 64, "stages": 2, "rows_per_warp": 16}


def config_with(head_dim: int, slice_m: int, key_tile: int | None = None, stages: int | None = None,
                rows_per_warp: int | None = None) -> dict:
    """``default_config`` with the given parameters in its place. A rows_per_warp left out takes
    one m-tile per warp where two would not fit the given key tile (two need key_tile x head_dim
    <= 4096), so key_tile=64 alone is a plan that runs at head dim 128."""
    config = default_config(head_dim, slice_m)
    given = {"key_tile": key_tile, "stages": stages, "rows_per_warp": rows_per_warp}
    config.update({name: value for name, value in given.items() if value is not None})
    if rows_per_warp is None and config["key_tile"] * head_dim > 4096:
        config["rows_per_warp"] = 16
    return config


def default_spec(dtype: str, head_dim: int, slice_m: int, arch: str | None = None):
    """The kernel used when nothing is tuned. On Hopper (``arch`` "sm_90"): the warp-specialised
    wgmma kernel with two stages (ping-pong with 128-query slices) and 128-key tiles for 96- and
    128-wide heads and for 64-wide heads with 128-query slices, the fastest measured on an H200
    (notes/PERF.md, sessions 10-12), 64-key tiles for 256-wide heads; the wgmma kernel (64-key
    tiles, one CTA per SM) for 64-wide heads with 64-query slices. Elsewhere the mma.sync kernel
    of ``default_config``."""
    if arch == "sm_90" and head_dim in Sm90WsAttentionSpec.head_dims:
        if head_dim != 64 or slice_m == 128:
            key_tile = 64 if head_dim > 128 else 128
            return Sm90WsAttentionSpec(dtype, head_dim, slice_m, key_tile=key_tile, stages=2,
                                       pingpong=int(slice_m == 128))
        return Sm90AttentionSpec(dtype, head_dim, slice_m, key_tile=64, stages=2, pv=1, ctas_per_sm=1)
    return AttentionSpec(dtype, head_dim, slice_m, **default_config(head_dim, slice_m))
