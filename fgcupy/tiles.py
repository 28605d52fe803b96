"""Default tile choices of the attention kernels, in one place (what runs when nothing is tuned)."""

from __future__ import annotations

from .jit import AttentionSpec, Sm90AttentionSpec


def default_config(head_dim: int, slice_m: int) -> dict:
    """Heuristic tile parameters of the mma.sync kernel (any sm_80+ GPU): 32-key tiles, three
    stages and two 16-row m-tiles per warp for 128-query slices (the fastest measured on an
    H100, notes/PERF.md); 64-key tiles, two stages, one m-tile per warp for 64-query slices."""
    if slice_m == 128:
        return {"key_tile": 32, "stages": 3, "rows_per_warp": 32}
    return {"key_tile": 64, "stages": 2, "rows_per_warp": 16}


def default_spec(dtype: str, head_dim: int, slice_m: int, arch: str | None = None):
    """The kernel used when nothing is tuned. On Hopper (``arch`` "sm_90"): the wgmma kernel with
    64-key tiles; two CTAs per SM for 128-wide heads and 128-query slices, one CTA (three stages
    for 64-wide heads) otherwise, the winners of the H100 tuning tables in notes/results.
    Elsewhere the mma.sync kernel of ``default_config``."""
    if arch == "sm_90":
        if head_dim == 128 and slice_m == 128:
            return Sm90AttentionSpec(dtype, head_dim, slice_m, key_tile=64, stages=2, pv=1, ctas_per_sm=2)
        stages = 3 if head_dim == 64 and slice_m == 128 else 2
        return Sm90AttentionSpec(dtype, head_dim, slice_m, key_tile=64, stages=stages, pv=1, ctas_per_sm=1)
    return AttentionSpec(dtype, head_dim, slice_m, **default_config(head_dim, slice_m))
