"""Video-like q, k, v: seeded inputs whose attention looks like a video DiT's.

Random Gaussian q, k, v give nearly uniform attention, so no sparse method can be judged on
them. Here tokens sit on a T x H x W latent grid (flattened frame by frame, row by row, as Wan
and HunyuanVideo flatten them) and each head is built from four parts, all in logit units of
the default softmax scale 1/sqrt(D):

* **position** (3-D rotary embedding, Wan's split of the head dim into t / y / x parts, theta
  10000): q and k share a per-head vector placed on the rotary pairs whose frequency is at
  least 1/reach of that axis, so q.k depends on the offset between the tokens and peaks at
  zero offset; ``strength`` is that peak per axis. ``reach=inf`` leaves an axis free. At
  least the three fastest pairs of an axis carry it (one pair alone would repeat every 2 pi).
* **sinks**: a few key positions per batch (shared by the heads, as attention sinks are) that
  every query likes by about ``sink_strength`` logits.
* **objects**: moving ellipsoids in the video; tokens of one object share a content direction,
  so they attend to each other wherever they are (``object_strength`` logits).
* **content noise** of standard deviation ``noise`` per element (about ``noise**2`` logits),
  which makes the kept set irregular at fine grain; ``drift`` rotates it slowly with ``step``,
  as q and k change slowly along a diffusion trajectory.

v is a smooth rotary field plus noise. Heads follow a ``pattern`` ("spatial", "temporal",
"mixed"); knobs are in :class:`VideoKnobs`. Generation runs head by head in float32 and is
written into the output dtype, so a 40-head 32,760-token problem needs little more than its
outputs (about 1 GB in bf16). The same seed gives the same tensors on the same device type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

#: Derived generator seeds are kept to 63 bits (torch refuses larger).
_SEED_MASK = (1 << 63) - 1
#: Seeds a workload takes: within [0, 2**31) different seeds draw differently (each generator's
#: seed is the seed times an odd number plus the head's offsets, and torch's CPU generator reads
#: its low 32 bits), where 2**32 would draw what 0 does.
SEED_LIMIT = 1 << 31


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")


def check_grid(grid) -> None:
    if not isinstance(grid, tuple) or len(grid) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1
                                                             for n in grid):
        raise ValueError(f"grid must be a tuple of three positive ints (frames, height, width), got {grid!r}")


@dataclass(frozen=True)
class VideoShape:
    """A model's attention problem: batch, heads, head dim and the latent (T, H, W) grid."""

    name: str
    batch: int
    heads: int
    head_dim: int
    grid: tuple

    @property
    def seq(self) -> int:
        t, h, w = self.grid
        return t * h * w


#: The video workloads the benchmarks run (bench/presets.py builds its presets from these).
SHAPES = {
    s.name: s
    for s in (
        VideoShape("wan14b-480p", 1, 40, 128, (21, 30, 52)),
        VideoShape("wan14b-720p", 1, 40, 128, (21, 45, 80)),
        VideoShape("wan1.3b-480p", 1, 12, 128, (21, 30, 52)),
        VideoShape("hunyuan-720p", 1, 24, 128, (33, 45, 80)),
        VideoShape("cogvideox5b", 1, 48, 64, (13, 30, 45)),
    )
}


@dataclass(frozen=True)
class HeadStyle:
    """How one kind of head attends: locality reach per axis (t, y, x) in tokens (inf = free
    axis) and the positional logit peak per axis."""

    name: str
    reach: tuple
    strength: tuple


STYLES = {
    s.name: s
    for s in (
        HeadStyle("spatial", (1.0, 4.0, 4.0), (12.0, 5.0, 5.0)),              # own frame, near in space
        HeadStyle("temporal", (math.inf, 1.5, 1.5), (0.0, 6.0, 6.0)),         # same place, every frame
        HeadStyle("local3d", (3.0, 6.0, 6.0), (4.0, 4.0, 4.0)),               # a space-time neighbourhood
        HeadStyle("broad", (math.inf, 16.0, 16.0), (0.0, 2.5, 2.5)),          # wide, leans on sinks/objects
    )
}

#: Head styles per pattern; "mixed" cycles through its list, like the head zoo of a DiT.
PATTERNS = {
    "spatial": ("spatial",),
    "temporal": ("temporal",),
    "mixed": ("spatial", "local3d", "temporal", "spatial", "broad", "local3d", "temporal", "spatial"),
}


@dataclass(frozen=True)
class VideoKnobs:
    """Everything that shapes the attention pattern (see the module docstring)."""

    noise: float = 1.0            # content noise std per element (~noise**2 logits of jitter)
    sinks: int = 8                # globally attended key positions per batch
    sink_strength: float = 5.0    # logits every query gives a sink
    objects: int = 6              # moving ellipsoids sharing content
    object_strength: float = 3.0  # logits between tokens of one object
    jitter: float = 0.25          # per-head random scale of reach and strength (+- fraction)
    rope_theta: float = 10000.0
    value_noise: float = 0.5      # v = smooth rotary field + this much noise
    drift: float = 0.0            # radians of noise rotation per step (slow evolution)
    styles: dict = field(default_factory=lambda: dict(STYLES))


def _real(knobs: VideoKnobs, name: str) -> float:
    """A knob's value as a float (NaN, which no range check passes, where it is not a number)."""
    value = getattr(knobs, name)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def check_float_dtype(dtype) -> None:
    """TypeError unless ``dtype`` is a floating torch dtype (an integer one truncates the values)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")


def rotary_split(head_dim: int) -> tuple:
    """Wan's split of the head dim into (t, y, x) rotary parts: y and x get 2*(D//6) each."""
    side = 2 * (head_dim // 6)
    return head_dim - 2 * side, side, side


def grid_positions(grid, device=None) -> torch.Tensor:
    """int64 [S, 3] (t, y, x) of every token, frame-major then row-major."""
    t, h, w = grid
    tt, yy, xx = torch.meshgrid(
        torch.arange(t, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    return torch.stack([tt.reshape(-1), yy.reshape(-1), xx.reshape(-1)], dim=1)


def _frequencies(head_dim: int, theta: float) -> list:
    """Per axis, float64 frequencies of its rotary pairs (highest first)."""
    return [theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in rotary_split(head_dim)]


def _rotary_tables(grid, head_dim, theta, device):
    """cos, sin float32 [S, D/2] of every rotary pair at every token."""
    pos = grid_positions(grid, device).to(torch.float64)
    angles = torch.cat([pos[:, a : a + 1] * f.to(device)[None, :] for a, f in enumerate(_frequencies(head_dim, theta))], 1)
    return torch.cos(angles).float(), torch.sin(angles).float()


def _rotate(vec: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary rotation of one [D] vector at every token -> [S, D] (pairs (2i, 2i+1))."""
    a, b = vec[0::2], vec[1::2]
    out = torch.empty(cos.shape[0], vec.numel(), dtype=torch.float32, device=cos.device)
    out[:, 0::2] = a * cos - b * sin
    out[:, 1::2] = a * sin + b * cos
    return out


def _positional_vector(style: HeadStyle, head_dim, theta, scale, gen, jitter) -> torch.Tensor:
    """Per-head [D] vector: active pairs get equal energy so each finite axis peaks at strength."""
    vec = torch.zeros(head_dim, dtype=torch.float64)
    start = 0
    for reach, peak, freqs in zip(style.reach, style.strength, _frequencies(head_dim, theta)):
        pairs = freqs.numel()
        if math.isfinite(reach) and peak > 0:
            reach_h = reach * (1 + jitter * (2 * torch.rand((), generator=gen).item() - 1))
            strength = peak * (1 + jitter * (2 * torch.rand((), generator=gen).item() - 1))
            active = max(3, int((freqs >= 1.0 / reach_h).sum()))
            amp = math.sqrt(strength / (scale * active))
            phase = 2 * math.pi * torch.rand(active, generator=gen, dtype=torch.float64)
            vec[start : start + 2 * active : 2] = amp * torch.cos(phase)
            vec[start + 1 : start + 2 * active : 2] = amp * torch.sin(phase)
        start += 2 * pairs
    return vec.float()


def _unit(n, dim, gen) -> torch.Tensor:
    x = torch.randn(n, dim, generator=gen)
    return x / x.norm(dim=1, keepdim=True)


def _object_membership(grid, count, gen, device) -> torch.Tensor:
    """int64 [S]: object id of each token (-1 = background); ellipsoids drift across frames."""
    t, h, w = grid
    pos = grid_positions(grid, device).to(torch.float32)
    member = torch.full((t * h * w,), -1, dtype=torch.int64, device=device)
    for o in range(count):
        centre = torch.rand(2, generator=gen) * torch.tensor([h, w])
        velocity = (torch.rand(2, generator=gen) - 0.5) * torch.tensor([h, w]) / max(t, 1) * 0.6
        radius = (0.08 + 0.12 * torch.rand(2, generator=gen)) * torch.tensor([h, w])
        cy = centre[0] + velocity[0] * pos[:, 0]
        cx = centre[1] + velocity[1] * pos[:, 0]
        inside = ((pos[:, 1] - cy) / radius[0]) ** 2 + ((pos[:, 2] - cx) / radius[1]) ** 2 <= 1.0
        member[inside] = o
    return member


def head_styles(pattern: str, heads: int) -> list:
    """Style name of each head for ``pattern`` (cycled)."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {tuple(PATTERNS)}, got {pattern!r}")
    names = PATTERNS[pattern]
    return [names[h % len(names)] for h in range(heads)]


def video_qkv(shape, pattern: str = "mixed", *, head_ids=None, seed: int = 0, step: int = 0,
              device="cpu", dtype=torch.bfloat16, knobs: VideoKnobs | None = None, **overrides):
    """(q, k, v) of shape [B, len(head_ids), S, D] in ``dtype`` on ``device`` (layout HND).

    ``shape``: a :class:`VideoShape` or a name in :data:`SHAPES`. ``head_ids``: which heads of
    the shape to build (default all); a head's tensors depend only on (seed, batch, head id),
    so a subsample shows the same heads as the full problem. ``step`` with ``knobs.drift``
    evolves the content noise slowly. Keyword ``overrides`` replace fields of ``knobs``.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if not isinstance(shape, VideoShape):
        raise TypeError(f"shape must be a VideoShape or a name in {sorted(SHAPES)}, got {type(shape).__name__}")
    knobs = replace(knobs or VideoKnobs(), **overrides)
    check_seed(seed)
    check_grid(shape.grid)
    for name in ("sinks", "objects"):
        value = getattr(knobs, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    for name in ("noise", "sink_strength", "object_strength", "value_noise"):
        if not 0 <= _real(knobs, name) < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {getattr(knobs, name)!r}")
    if not 0 <= _real(knobs, "jitter") < 1:
        raise ValueError(f"jitter must be in [0, 1) (a head's reach and strength scale by 1 +- jitter), got {knobs.jitter!r}")
    if not 0 < _real(knobs, "rope_theta") < math.inf:
        raise ValueError(f"rope_theta must be a finite number > 0, got {knobs.rope_theta!r}")
    if not math.isfinite(_real(knobs, "drift")):
        raise ValueError(f"drift must be a finite number of radians, got {knobs.drift!r}")
    check_float_dtype(dtype)
    if head_ids is None:
        head_ids = list(range(shape.heads))
    elif isinstance(head_ids, (str, bytes)) or not hasattr(head_ids, "__iter__") or any(
            isinstance(h, bool) or not isinstance(h, int) for h in head_ids):
        raise TypeError(f"head_ids must be a sequence of ints, got {head_ids!r}")
    else:
        head_ids = [int(h) for h in head_ids]
    if shape.head_dim % 2 or shape.head_dim < 18:
        raise ValueError(f"head_dim must be even and at least 18 (rotary pairs on three axes), got {shape.head_dim}")
    if any(not 0 <= h < shape.heads for h in head_ids):
        raise ValueError(f"head_ids must lie in [0, {shape.heads}) for shape {shape.name!r}, got {head_ids}")
    styles = head_styles(pattern, max(head_ids) + 1 if head_ids else 0)
    for name in sorted({styles[h] for h in head_ids}):
        style = knobs.styles.get(name) if isinstance(knobs.styles, dict) else None
        if not isinstance(style, HeadStyle):
            raise ValueError(f"knobs.styles must map pattern {pattern!r}'s style {name!r} to a HeadStyle, got {style!r}")
        if not all(r > 0 for r in style.reach) or not all(0 <= x < math.inf for x in style.strength):
            raise ValueError(f"style {name!r} needs reaches > 0 (inf: none) and finite strengths >= 0, got {style}")
    device = torch.device(device)
    seq, dim = shape.seq, shape.head_dim
    scale = 1.0 / math.sqrt(dim)
    cos, sin = _rotary_tables(shape.grid, dim, knobs.rope_theta, device)
    out = [torch.empty(shape.batch, len(head_ids), seq, dim, dtype=dtype, device=device) for _ in range(3)]
    for b in range(shape.batch):
        scene = torch.Generator().manual_seed((seed * 7919 + b) & _SEED_MASK)
        sink_pos = torch.randperm(seq, generator=scene)[: knobs.sinks].to(device)
        member = _object_membership(shape.grid, knobs.objects, scene, device)
        for slot, h in enumerate(head_ids):
            q, k, v = _one_head(knobs, knobs.styles[styles[h]], dim, seq, scale, cos, sin, sink_pos, member,
                                seed, b, h, step, device)
            for dst, src in zip(out, (q, k, v)):
                dst[b, slot] = src.to(dtype)
    return tuple(out)


def _one_head(knobs, style, dim, seq, scale, cos, sin, sink_pos, member, seed, b, h, step, device):
    """float32 [S, D] q, k, v of one (batch, head)."""
    small = torch.Generator().manual_seed(((seed * 1_000_003 + b) * 65_537 + h) & 0x7FFF_FFFF)
    pos_vec = _positional_vector(style, dim, knobs.rope_theta, scale, small, knobs.jitter).to(device)
    positional = _rotate(pos_vec, cos, sin)
    q = positional.clone()
    k = positional
    del positional
    # Sinks: one direction every query leans on and the sink keys carry.
    sink_dir = _unit(1, dim, small)[0].to(device)  # drawn either way: later draws stay the same
    if knobs.sinks:  # the queries' lean also tilts every other key's logit a little
        amp = math.sqrt(knobs.sink_strength / scale)
        q += amp * sink_dir
        k[sink_pos] += amp * sink_dir
    # Objects: shared content direction inside each ellipsoid.
    if knobs.objects:
        dirs = _unit(knobs.objects, dim, small).to(device) * math.sqrt(knobs.object_strength / scale)
        inside = member >= 0
        shared = dirs[member[inside]]
        q[inside] += shared
        k[inside] += shared
    # Content noise, rotated slowly by drift * step between two fixed draws.
    noise = torch.Generator(device=device).manual_seed((((seed * 1_000_003 + b) * 65_537 + h) * 2 + 1) & _SEED_MASK)
    angle = knobs.drift * step
    c, s = math.cos(angle), math.sin(angle)
    for t in (q, k):
        for weight in (c, s):  # two fixed draws, added one at a time (one [S, D] buffer at once)
            t.add_(torch.randn(seq, dim, generator=noise, device=device), alpha=knobs.noise * weight)
    value_vec = torch.randn(dim, generator=small).to(device)
    v = _rotate(value_vec, cos, sin)
    v += knobs.value_noise * torch.randn(seq, dim, generator=noise, device=device)
    return q, k, v
