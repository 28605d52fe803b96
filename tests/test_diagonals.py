"""find_diagonals: offsets where a head attends whatever the query, found from sampled rows (CPU)."""

import pytest
import torch

from fgcupy import find_diagonals, predict_mask
from fgcupy.diagonals import PEAK_WIDTH, offset_mass
from fgcupy.head_families import family_qkv, family_shape
from fgcupy.oracle import Judge

GRID = (4, 16, 24)  # frames of 384 tokens, more than a block and its band
FRAME = GRID[1] * GRID[2]


def _planted(shift: int, seq: int = 1200, dim: int = 32, seed: int = 0):
    """Query i's best key is i + shift (modulo the sequence), all others random."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, seq, dim, generator=gen)
    k = torch.randn(1, 2, seq, dim, generator=gen)
    k = 0.5 * k + 3.0 * q.roll(shift, dims=2)
    return q, k


def test_offset_mass_sums_to_one_and_peaks_at_the_planted_offset():
    q, k = _planted(300)
    mass = offset_mass(q, k)
    assert mass.sum().item() == pytest.approx(1.0, rel=1e-5)
    assert mass.shape == (2 * 1200 - 1,)
    assert int(mass.argmax()) - (1200 - 1) in (300, 300 - 1200)


def test_a_planted_diagonal_is_found_and_random_heads_have_none():
    q, k = _planted(500)
    found = find_diagonals(q, k, 64, exact_band=16, count=2)
    assert set(found) & {500, 500 - 1200}, found  # the planted offset itself, not its window's edge
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 1200, 32, generator=gen), torch.randn(1, 2, 1200, 32, generator=gen)
    assert find_diagonals(q, k, 64, exact_band=16) == ()
    assert find_diagonals(q, k, count=0) == ()


def test_the_layout_and_argument_checks():
    q, k = _planted(300)
    assert find_diagonals(q, k, 64, exact_band=16) == find_diagonals(q.transpose(1, 2), k.transpose(1, 2), 64,
                                                                      exact_band=16, layout="NHD")
    with pytest.raises(ValueError, match="count must be a non-negative int"):
        find_diagonals(q, k, count=-1)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        find_diagonals(q, k, samples=0)
    with pytest.raises(ValueError, match="exact_band must be a non-negative int"):
        find_diagonals(q, k, exact_band=None)
    with pytest.raises(ValueError, match="q and k must agree on B, H and D"):
        find_diagonals(q, k[:, :1])
    with pytest.raises(TypeError, match="k has dtype"):
        find_diagonals(q, k.double())
    with pytest.raises(ValueError, match="no peak can stand 10.0 times"):  # not an empty answer whatever q, k hold
        find_diagonals(q, k, 16, exact_band=8)


@pytest.mark.parametrize("family, frames", [("temporal-strided", True), ("window3d", True), ("window2d", False),
                                            ("sinks-text", False)])
def test_head_families_get_diagonals_at_whole_frames_or_none(family, frames):
    """Heads that look at other frames get diagonals near multiples of the frame size; heads
    within their own frame, or broad ones leaning on sinks and text, get none."""
    q, k, _ = family_qkv(family_shape("wan14b-480p", grid=GRID), family, heads=2)
    found = find_diagonals(q, k, 128, count=4)
    if not frames:
        assert found == ()
        return
    assert found
    for d in found:
        nearest = round(d / FRAME) * FRAME
        assert nearest != 0 and abs(d - nearest) <= PEAK_WIDTH, (d, FRAME)


def test_diagonals_bring_strided_temporal_heads_nearer_the_oracle():
    q, k, v = family_qkv(family_shape("wan14b-480p", grid=GRID), "temporal-strided", heads=2)
    judge = Judge(q, k, v)
    plain = judge.error(predict_mask(q, k, 128, "topk", density=0.1, pooling="mean"))
    diagonals = find_diagonals(q, k, 128)
    better = judge.error(predict_mask(q, k, 128, "topk", density=0.1, pooling="mean", diagonals=diagonals))
    assert better < 0.8 * plain, (plain, better, diagonals)


def test_a_key_every_query_looks_at_is_no_diagonal():
    """A sink seen from each sampled query is one spike per query, at a different offset each:
    too few queries hold any one of them (min_support)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 16000, 32, generator=gen), torch.randn(1, 2, 16000, 32, generator=gen)
    u = torch.randn(32, generator=gen)
    u /= u.norm()
    q += 8 * u
    k[:, :, 0] = 8 * u
    assert find_diagonals(q, k, 64, exact_band=16, count=4, min_support=0.0) != ()  # what the support rules out
    assert find_diagonals(q, k, 64, exact_band=16, count=4) == ()


def test_numpy_ints_and_a_fully_padded_batch_entry():
    """numpy ints are ints; a batch entry whose keys are all padding (NaN) adds nothing, so the
    other entry's diagonal is still found."""
    import numpy as np

    q, k = _planted(500)
    q, k = torch.cat([q, q]), torch.cat([k, k])
    expected = find_diagonals(q, k, 64, exact_band=16, count=2)
    assert set(expected) & {500, 500 - 1200}
    assert find_diagonals(q, k, np.int64(64), exact_band=np.int32(16), count=np.int64(2), samples=np.int64(64)) == expected
    k[1] = float("nan")
    assert find_diagonals(q, k, 64, exact_band=16, count=2) == expected
    assert offset_mass(q, k).sum().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="min_support"):
        find_diagonals(q, k, min_support=1.5)


def test_box_sums_match_brute_force_at_any_width():
    from fgcupy.diagonals import _box

    x = torch.rand(2, 301)
    for width in (1, 3, 31, 301, 603, 10**7):
        half = width // 2
        want = torch.stack([x[:, max(0, i - half): i + half + 1].double().sum(-1) for i in range(301)], -1)
        assert torch.allclose(_box(x, width).double(), want, rtol=1e-6, atol=1e-6), width


def test_a_band_wider_than_the_sequence_costs_what_the_sequence_does():
    """The box sums were a convolution as wide as the bands: a band of 10^6 keys on 1,000 tokens
    asked for 32 GB; no offset is eligible there, and none is found."""
    q, k = torch.randn(1, 1, 1000, 16), torch.randn(1, 1, 1000, 16)
    assert find_diagonals(q, k, 128, exact_band=10**6) == ()


def test_found_offsets_as_a_tensor_are_taken_as_diagonals_and_inputs_needing_grad_are_fine():
    q, k = torch.randn(1, 1, 512, 32, requires_grad=True), torch.randn(1, 1, 512, 32)
    assert isinstance(find_diagonals(q, k, 128), tuple)
    q = q.detach()
    as_tensor = predict_mask(q, k, 128, "topk", density=0.2, diagonals=torch.tensor([300, -300]))
    as_ints = predict_mask(q, k, 128, "topk", density=0.2, diagonals=(300, -300))
    assert torch.equal(as_tensor.indices, as_ints.indices) and torch.equal(as_tensor.indptr, as_ints.indptr)


def _repeated_queries(shifts, weight=3.0, noise=0.5, seq=1200, dim=32):
    """Keys that repeat the queries ``shifts`` tokens away (plus noise): diagonals at those offsets."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, seq, dim, generator=gen)
    k = noise * torch.randn(1, 1, seq, dim, generator=gen)
    for s in shifts:
        k += weight * q.roll(s, dims=2)
    return q, k


def test_diagonals_at_the_edges_of_eligibility_and_of_a_peak():
    """One band width (slice_m + 2 x exact_band = 96) away is eligible, closer is not; a sharp
    peak is found at its own offset; support is measured over the queries that reach it."""
    assert find_diagonals(*_repeated_queries([96]), 64, exact_band=16, count=1) == (96,)
    assert find_diagonals(*_repeated_queries([88]), 64, exact_band=16, count=1) == ()
    assert find_diagonals(*_repeated_queries([500], weight=20.0, noise=0.0), 64, exact_band=16, count=1) == (500,)
    assert 900 in find_diagonals(*_repeated_queries([900]), 64, exact_band=16, count=2, min_support=0.5)


def test_min_support_also_sets_how_many_sampled_queries_must_reach_an_offset():
    """A diagonal only a fifth of the queries can reach (offset 960 of 1,200 tokens), held by every
    one of them: found with min_support 0.1, not with the default 0.25 (the reach floor was the
    default whatever min_support said)."""
    seq, dim, offset = 1200, 32, 960
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, seq, dim, generator=gen)
    k = 0.5 * torch.randn(1, 2, seq, dim, generator=gen)
    k[:, :, offset:] += 3.0 * q[:, :, : seq - offset]  # query i's best key is i + offset where it exists
    assert find_diagonals(q, k, 64, exact_band=16) == ()
    assert find_diagonals(q, k, 64, exact_band=16, min_support=0.1) == (offset,)
