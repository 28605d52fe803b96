"""The benchmarks' workload shapes (bf16, head dim 128 unless said), from fgcupy.workloads."""

from dataclasses import dataclass

from fgcupy.workloads import SHAPES


@dataclass(frozen=True)
class Preset:
    name: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    grid: tuple  # latent (T, H, W) token grid

    @property
    def shape(self):
        return (self.batch, self.heads, self.seq, self.head_dim)


PRESETS = {s.name: Preset(s.name, s.batch, s.heads, s.seq, s.head_dim, s.grid) for s in SHAPES.values()}
