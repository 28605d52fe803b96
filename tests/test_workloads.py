"""Video-like workloads: shapes, seeding, head subsamples, drift, and attention that is sparse."""

import math
from dataclasses import replace

import pytest
import torch

from bench.presets import PRESETS
from fgcupy import workloads
from fgcupy.head_families import family_qkv, family_shape
from fgcupy.workloads import SHAPES, VideoShape, grid_positions, head_styles, rotary_split, video_qkv

SMALL = VideoShape("small", 1, 8, 64, (4, 10, 12))


def test_presets_come_from_the_package_shapes():
    assert set(PRESETS) == set(SHAPES)
    for name, shape in SHAPES.items():
        preset = PRESETS[name]
        assert preset.shape == (shape.batch, shape.heads, shape.seq, shape.head_dim)
        assert preset.grid == shape.grid
    assert SHAPES["wan14b-480p"].seq == 32_760 and SHAPES["hunyuan-720p"].seq == 118_800


def test_rotary_split_and_positions():
    assert rotary_split(128) == (44, 42, 42)  # Wan 2.1's t / h / w split
    assert sum(rotary_split(64)) == 64
    pos = grid_positions((2, 3, 4))
    assert pos.shape == (24, 3)
    assert pos[5].tolist() == [0, 1, 1] and pos[12].tolist() == [1, 0, 0]


def test_shapes_dtype_and_seeding():
    q, k, v = video_qkv(SMALL, "mixed", seed=3)
    assert q.shape == k.shape == v.shape == (1, 8, 480, 64) and q.dtype == torch.bfloat16
    again = video_qkv(SMALL, "mixed", seed=3)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), again))
    other = video_qkv(SMALL, "mixed", seed=4)
    assert not torch.equal(q, other[0])
    # A head subsample is the same heads as in the full problem.
    sub = video_qkv(SMALL, "mixed", seed=3, head_ids=[5, 2])
    assert torch.equal(sub[1][:, 0], k[:, 5]) and torch.equal(sub[1][:, 1], k[:, 2])
    # Seeds in [0, 2**31) draw differently; others are refused (2**32 drew what 0 does).
    assert video_qkv(SMALL, "mixed", seed=2**31 - 1)[0].isfinite().all()
    for seed in (2**31, 2**32, -1, 2**70, 1.0):
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*31\)"):
            video_qkv(SMALL, "mixed", seed=seed)


def test_drift_moves_q_and_k_slowly():
    base = video_qkv(SMALL, "spatial", seed=0, drift=0.05, step=0, dtype=torch.float32)
    near = video_qkv(SMALL, "spatial", seed=0, drift=0.05, step=1, dtype=torch.float32)
    far = video_qkv(SMALL, "spatial", seed=0, drift=0.05, step=20, dtype=torch.float32)
    d_near = (base[0] - near[0]).norm() / base[0].norm()
    d_far = (base[0] - far[0]).norm() / base[0].norm()
    assert 0 < d_near < 0.1 < d_far
    assert torch.equal(base[2], near[2])  # v does not drift


def _attention_mass_in_top(shape, pattern, fraction, heads):
    q, k, _ = video_qkv(shape, pattern, seed=0, head_ids=heads, dtype=torch.float32)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(shape.head_dim), dim=-1)
    top = probs.topk(max(1, int(fraction * shape.seq)), dim=-1).values.sum(-1)
    return top.mean().item()


@pytest.mark.parametrize("pattern", ["spatial", "temporal"])
def test_attention_is_concentrated(pattern):
    shape = VideoShape("mid", 1, 4, 128, (6, 16, 20))
    # 5 % of the keys hold most of the attention; random inputs would hold about 5 %.
    assert _attention_mass_in_top(shape, pattern, 0.05, [0, 1]) > 0.6
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, shape.seq, 128, generator=gen) for _ in range(2))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), -1)
    assert probs.topk(int(0.05 * shape.seq), dim=-1).values.sum(-1).mean() < 0.3


@pytest.mark.parametrize("seed", [0, 1])
def test_spatial_heads_look_near_in_their_own_frame_temporal_heads_along_time(seed):
    shape = VideoShape("mid", 1, 1, 128, (6, 16, 20))
    pos = grid_positions(shape.grid).float()
    query = 3 * 320 + 8 * 20 + 10  # frame 3, row 8, column 10
    near = (pos[:, 1:] - pos[query, 1:]).abs().amax(1)
    for pattern in ("spatial", "temporal"):
        q, k, _ = video_qkv(shape, pattern, seed=seed, dtype=torch.float32, noise=0.0, objects=0, sinks=0)
        p = torch.softmax(q[0, 0] @ k[0, 0].T / math.sqrt(128), -1)[query]
        own_frame = p[pos[:, 0] == 3].sum()
        assert p[near <= 3].sum() > 0.9
        if pattern == "spatial":
            assert own_frame > 0.8
        else:  # the same place in every frame, about equally
            per_frame = torch.stack([p[(pos[:, 0] == t) & (near <= 1)].sum() for t in range(6)])
            assert per_frame.min() > 0.1 and own_frame < 0.3


def test_head_styles_and_errors():
    assert head_styles("spatial", 3) == ["spatial"] * 3
    assert head_styles("mixed", 3) == list(workloads.PATTERNS["mixed"][:3])
    with pytest.raises(ValueError, match=r"pattern must be one of \('spatial', 'temporal', 'mixed'\), got 'noise'"):
        video_qkv(SMALL, "noise")
    with pytest.raises(ValueError, match=r"unknown shape 'wan99'"):
        video_qkv("wan99")


def test_video_qkv_refuses_heads_and_head_dims_the_shape_has_not():
    shape = VideoShape("tiny", 1, 4, 64, (2, 4, 4))
    for head_ids in ([4], [-1], [0, 100]):
        with pytest.raises(ValueError, match="head_ids must lie in"):
            video_qkv(shape, "mixed", head_ids=head_ids)
    for head_dim in (16, 33):
        with pytest.raises(ValueError, match="head_dim must be even and at least 18"):
            video_qkv(VideoShape("tiny", 1, 1, head_dim, (2, 4, 4)), "mixed")
    for head_ids in ([1.7], [True], "12", 3):  # not quietly other heads
        with pytest.raises(TypeError, match="head_ids must be a sequence of ints"):
            video_qkv(shape, "mixed", head_ids=head_ids)
    with pytest.raises(TypeError, match="shape must be a VideoShape"):
        video_qkv((1, 4, 64, (2, 4, 4)), "mixed")
    no_spatial = {name: style for name, style in workloads.STYLES.items() if name != "spatial"}
    with pytest.raises(ValueError, match="style 'spatial'"):
        video_qkv(shape, "mixed", styles=no_spatial)
    reach_zero = dict(workloads.STYLES, spatial=workloads.HeadStyle("spatial", (0.0, 4.0, 4.0), (12.0, 5.0, 5.0)))
    with pytest.raises(ValueError, match="reaches > 0"):
        video_qkv(shape, "spatial", styles=reach_zero)


def test_mass_fraction_is_a_fraction_of_the_keys():
    from fgcupy.head_families import mass_fraction

    q, k, _ = video_qkv(VideoShape("tiny", 1, 2, 64, (2, 4, 4)), "mixed", dtype=torch.float32)
    assert 0 < mass_fraction(q, k, 1.0) <= 1.0
    for mass in (0.0, -1.0, 2.0):
        with pytest.raises(ValueError, match="mass must be in"):
            mass_fraction(q, k, mass)


@pytest.mark.parametrize("knob, value", [("sink_strength", -1.0), ("jitter", 3.0), ("jitter", 1.0), ("rope_theta", 0.0),
                                         ("noise", float("nan")), ("object_strength", float("inf")),
                                         ("drift", float("nan")), ("value_noise", "0.5")])
def test_a_knob_out_of_its_range_is_named(knob, value):
    """Negative strengths and jitter past 1 reached a square root of a negative number; a zero
    rotary base or a NaN noise gave non-finite q and k without a word."""
    with pytest.raises(ValueError, match=knob):
        video_qkv(VideoShape("t", 1, 2, 64, (2, 4, 4)), **{knob: value})


def test_the_generators_take_floating_dtypes_only():
    from fgcupy.head_families import family_qkv, family_shape

    with pytest.raises(TypeError, match="dtype must be a floating torch dtype"):
        video_qkv(VideoShape("t", 1, 2, 64, (2, 4, 4)), dtype=torch.int32)
    with pytest.raises(TypeError, match="dtype must be a floating torch dtype"):
        family_qkv(family_shape("wan1.3b-480p", (2, 4, 4)), "window2d", heads=1, dtype=torch.int32)


def test_mass_fraction_needs_a_query():
    from fgcupy.head_families import family_qkv, family_shape, mass_fraction

    q, k, _ = family_qkv(family_shape("wan1.3b-480p", (2, 4, 4)), "window2d", heads=1)
    with pytest.raises(ValueError, match="queries"):
        mass_fraction(q, k, queries=0)
    k[..., 3, :] = math.nan  # not read as the sharpest head there is
    with pytest.raises(ValueError, match="NaN or infinite logit"):
        mass_fraction(q, k)


TINY = VideoShape("tiny", 1, 2, 64, (2, 6, 8))


# ---------------------------------------------------------------------------------------------
# every knob shows in the tensors; head families as documented
# ---------------------------------------------------------------------------------------------

def test_value_noise_is_the_std_of_the_noise_added_to_v():
    quiet = video_qkv(TINY, "mixed", seed=2, dtype=torch.float32, value_noise=0.0)
    loud = video_qkv(TINY, "mixed", seed=2, dtype=torch.float32, value_noise=1.0)
    assert torch.equal(quiet[0], loud[0]) and torch.equal(quiet[1], loud[1])  # q and k do not depend on it
    assert abs(float((loud[2] - quiet[2]).std()) - 1.0) < 0.1


def _sink_rows(shape, seed=0, **knobs):
    """Per batch, the key rows that sink_strength moves (the sinks)."""
    weak = video_qkv(shape, "spatial", seed=seed, dtype=torch.float32, sink_strength=0.0, **knobs)[1]
    strong = video_qkv(shape, "spatial", seed=seed, dtype=torch.float32, sink_strength=20.0, **knobs)[1]
    moved = (strong - weak).abs().amax(dim=(1, 3)) > 1e-3  # [B, S]
    return [set(torch.nonzero(row).flatten().tolist()) for row in moved]


def test_sink_strength_moves_the_sink_keys_alone():
    rows = _sink_rows(TINY, sinks=5)
    assert len(rows[0]) == 5
    q_weak = video_qkv(TINY, "spatial", dtype=torch.float32, sink_strength=0.0)[0]
    q_strong = video_qkv(TINY, "spatial", dtype=torch.float32, sink_strength=20.0)[0]
    assert (q_strong - q_weak).abs().amax(-1).gt(1e-3).all()  # every query leans on the sinks


def test_sink_strength_does_nothing_without_sinks():
    """sinks=0: no key carries the sink direction, so the queries do not lean on it either."""
    weak = video_qkv(TINY, "mixed", dtype=torch.float32, sinks=0, sink_strength=0.0)
    strong = video_qkv(TINY, "mixed", dtype=torch.float32, sinks=0, sink_strength=20.0)
    for a, b in zip(weak, strong):
        assert torch.equal(a, b)


def test_each_batch_element_has_its_own_sinks():
    rows = _sink_rows(VideoShape("two", 2, 1, 64, (2, 6, 8)), seed=1, sinks=6)
    assert len(rows[0]) == len(rows[1]) == 6 and rows[0] != rows[1]


def test_family_qkv_refuses_head_dims_below_32():
    for head_dim in (16, 24, 30):
        shape = replace_head_dim(family_shape("wan1.3b-480p", (2, 4, 4)), head_dim)
        with pytest.raises(ValueError, match="head families need head_dim >= 32"):
            family_qkv(shape, "window2d", heads=1)
    assert family_qkv(replace_head_dim(family_shape("wan1.3b-480p", (2, 4, 4)), 32), "window2d", heads=1)[0].shape[-1] == 32


def replace_head_dim(shape, head_dim):
    return VideoShape(shape.name, shape.batch, shape.heads, head_dim, shape.grid)


def _logits(q, k):
    return q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])


def test_strided_temporal_heads_prefer_frames_a_stride_apart():
    """temporal-strided: keys 2-4 frames apart look alike, the next frame less so (a free time
    axis would like every frame alike)."""
    grid = (8, 6, 6)
    q, k, _ = family_qkv(family_shape("wan1.3b-480p", grid), "temporal-strided", heads=4, dtype=torch.float32)
    pos = grid_positions(grid)
    same_place = (pos[:, None, 1:] == pos[None, :, 1:]).all(-1)
    dt = pos[None, :, 0] - pos[:, None, 0]
    logits = _logits(q, k)[0]  # [H, S, S]
    for h in range(q.shape[1]):
        own = logits[h][same_place & (dt == 0)].mean()
        next_frame = logits[h][same_place & (dt == 1)].mean()
        assert own - next_frame > 2.0, (h, float(own), float(next_frame))


def test_every_text_token_is_liked_by_every_query(monkeypatch):
    """Without content noise, every video query gives every text token text_strength logits."""
    from fgcupy import head_families

    quiet = replace(head_families.FAMILIES["sinks-text"], name="quiet-text", noise=0.0)
    monkeypatch.setitem(head_families.FAMILIES, "quiet-text", quiet)
    grid = (2, 4, 4)
    q, k, _ = family_qkv(family_shape("wan1.3b-480p", grid), "quiet-text", heads=2, dtype=torch.float32)
    video = 2 * 4 * 4
    assert q.shape[2] == video + quiet.text
    to_text = _logits(q, k)[0, :, :video, video:]
    torch.testing.assert_close(to_text, torch.full_like(to_text, quiet.text_strength), rtol=0, atol=1e-4)


def test_mixture_queries_use_one_kernel_each():
    """A mixture head's query uses its region's kernel or the other, never both nor neither: its
    logit to its own key is about one kernel's peak (8-14 logits)."""
    grid = (4, 8, 8)
    q, k, _ = family_qkv(family_shape("wan1.3b-480p", grid), "mixture", heads=2, dtype=torch.float32)
    video = 4 * 8 * 8
    own = torch.diagonal(_logits(q, k)[0, :, :video, :video], dim1=-2, dim2=-1)  # [H, video]
    inside = ((own > 4.0) & (own < 19.0)).float().mean()
    assert inside > 0.85, float(inside)


def test_family_batch_elements_differ_and_keep_their_heads():
    """Each (batch, head) draws its own head; a batch element is the same in any batch size."""
    two = family_qkv(replace(family_shape("wan1.3b-480p", (2, 4, 4)), batch=2), "window3d", heads=2,
                     dtype=torch.float32)
    one = family_qkv(family_shape("wan1.3b-480p", (2, 4, 4)), "window3d", heads=2, dtype=torch.float32)
    for a, b in zip(two, one):
        assert torch.equal(a[:1], b) and not torch.equal(a[0], a[1])


def test_mass_fraction_counts_the_key_that_reaches_the_mass():
    """Uniform attention over 16 keys holds half its mass in 8 of them; one-hot attention holds
    any mass in its one key."""
    from fgcupy.head_families import mass_fraction

    zeros = torch.zeros(1, 1, 4, 8)
    keys = torch.zeros(1, 1, 16, 8)
    assert mass_fraction(zeros, keys, 0.5) == 0.5
    sharp = torch.eye(16)[None, None, :, :8] * 1000.0  # query i likes key i alone (i < 8)
    assert mass_fraction(sharp[:, :, :8], sharp, 0.9) == 1 / 16


def test_a_judges_family_name_gives_a_head_family_or_a_workload_patterns_heads():
    from fgcupy.head_families import WORKLOAD_FAMILIES, family_or_workload_qkv, family_qkv, family_shape

    shape = family_shape("wan14b-480p", (2, 8, 8))
    for got, expected in ((family_or_workload_qkv(shape, "window2d", heads=2, seed=3),
                           family_qkv(shape, "window2d", heads=2, seed=3)),
                          (family_or_workload_qkv(shape, "workload-mixed", heads=2, seed=3),
                           video_qkv(shape, "mixed", head_ids=range(2), seed=3))):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "workload-mixed" in WORKLOAD_FAMILIES
