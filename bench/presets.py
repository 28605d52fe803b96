"""Workload shapes of DESIGN.md §4 (bf16, head dim 128 unless said)."""

from dataclasses import dataclass


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


PRESETS = {
    p.name: p
    for p in (
        Preset("wan14b-480p", 1, 40, 32_760, 128, (21, 30, 52)),
        Preset("wan14b-720p", 1, 40, 75_600, 128, (21, 45, 80)),
        Preset("wan1.3b-480p", 1, 12, 32_760, 128, (21, 30, 52)),
        Preset("hunyuan-720p", 1, 24, 118_800, 128, (33, 45, 80)),
        Preset("cogvideox5b", 1, 48, 17_550, 64, (13, 30, 45)),
    )
}
