"""CPU checks of e4m3 head scales from a largest magnitude, of what the e4m3 conversion kernels
take (on stand-ins of CUDA tensors on a Hopper GPU) and their spec, of the LSE estimate's skip
ranges and kernel-path composition, and of the stats pass's checks of its skip argument."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import device_constants, e4m3_kernels
from fgcupy.e4m3 import E4M3_MAX, E4M3_NONFINITE_CLAMP, E4M3_ROW_SUMSQ, heads_as_e4m3, scales_for
from fgcupy.e4m3_kernels import gpu_heads_as_e4m3, kernels_take
from fgcupy.jit import runtime as jit_runtime
from fgcupy.jit.e4m3_spec import CONVERT_THREADS, CONVERT_UNROLL, E4m3ConvertSpec
from fgcupy.jit.score_spec import Sm90ScoreSpec
from fgcupy.lse_estimate import _band_sample_ranges, estimate_lse, lse_parts_from_stats, sample_positions
from fgcupy.mask import num_blocks
from fgcupy.mask_kernels import _checked_skip

# --- fgcupy.e4m3.scales_for ------------------------------------------------------------------


def test_a_sum_of_squares_of_exactly_the_bound_keeps_scale_one():
    """2^15 is the bound as it is: its scale is 1, not 1/2; a quarter of it gets 2, four times it
    1/2, and odd powers of two round the square root down."""
    assert E4M3_ROW_SUMSQ == 2.0**15
    sumsq = torch.tensor([2.0**15, 2.0**13, 2.0**17, 2.0**14, 2.0**16, 2.0**15 * (1 + 2**-52)], dtype=torch.float64)
    assert scales_for(sumsq).tolist() == [1.0, 2.0, 0.5, 1.0, 0.5, 0.5]


def test_the_float32_range_of_powers_of_two_is_used_to_its_ends():
    """The largest power a float32 holds, 2^127, is taken where it fits; past either end the
    scale falls back to 1."""
    sumsq = torch.tensor([2.0**15 / 2.0**254, 2.0**15 / 2.0**256, 2.0**15 * 2.0**252, 2.0**15 * 2.0**254],
                         dtype=torch.float64)
    assert scales_for(sumsq).tolist() == [2.0**127, 1.0, 2.0**-126, 1.0]


def test_scales_for_sums_of_zero_infinite_or_nan_are_one():
    """Heads of zeros or with a non-finite element keep scale 1."""
    sumsq = torch.tensor([0.0, -0.0, math.inf, math.nan, 5e-324], dtype=torch.float64)
    assert scales_for(sumsq).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0]


def _scale_by_definition(sumsq: float) -> float:
    """The largest power of two s with s^2 x sumsq <= E4M3_ROW_SUMSQ, by exact float64 products
    (rescaled where s^2 would overflow); 1 where sumsq is not positive and finite or s is not a
    normal float32."""
    if not (math.isfinite(sumsq) and sumsq > 0):
        return 1.0
    power = (15 - math.frexp(sumsq)[1]) // 2 + 2  # 4**power x sumsq > 2^15, by a power or two
    while math.ldexp(sumsq, 2 * power) > E4M3_ROW_SUMSQ:
        power -= 1
    return 2.0**power if -126 <= power <= 127 else 1.0


#: float64 bits next to the bound times powers of four (where the scale steps) and of two, and
#: next to where the power leaves float32's normal range.
_SUMSQ_EDGES = [int(np.float64(E4M3_ROW_SUMSQ * 2.0**p).view(np.int64)) + d
                for p in range(-260, 270) for d in (-1, 0, 1)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 0x7FFFFFFFFFFFFFFF), min_size=1, max_size=32))
def test_scales_for_is_the_largest_power_of_two_that_fits(bits):
    """On any non-negative float64 (NaN, infinity and subnormals included), above all next to the
    bound times powers of two: the largest power of two whose square keeps sumsq within the
    bound, or 1."""
    sumsq = np.array(bits + _SUMSQ_EDGES, dtype=np.uint64).view(np.float64)
    got = scales_for(torch.from_numpy(sumsq.copy())).tolist()
    assert got == [_scale_by_definition(float(x)) for x in sumsq]


# --- fgcupy.e4m3_kernels --------------------------------------------------------------------


class _CudaStandIn:
    """What kernels_take reads of a CUDA tensor (device, dtype, shape, strides, address), with no
    GPU behind it."""

    def __init__(self, shape, stride=None, dtype=torch.bfloat16, ptr=0):
        self.shape = torch.Size(shape)
        self._stride = tuple(stride) if stride is not None else _contiguous_strides(shape)
        self.dtype = dtype
        self.device = torch.device("cuda", 0)
        self._ptr = ptr

    def dim(self):
        return len(self.shape)

    def stride(self, i=None):
        return self._stride if i is None else self._stride[i]

    def data_ptr(self):
        return self._ptr


def _contiguous_strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


@pytest.fixture
def hopper(monkeypatch):
    """The stand-ins' device counts as a Hopper GPU without one."""
    monkeypatch.setattr(jit_runtime, "is_hopper", lambda index: index == 0)


def test_only_sm90_counts_as_hopper(monkeypatch):
    """is_hopper (uncached, so the stubbed capability is what it reads) is sm_90 alone."""
    for capability, hopper in (((9, 0), True), ((8, 0), False), ((8, 9), False), ((10, 0), False), ((9, 1), False)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=capability: c)
        assert jit_runtime.is_hopper.__wrapped__(0) is hopper


def test_kernels_take_nothing_on_other_gpus(monkeypatch):
    monkeypatch.setattr(jit_runtime, "is_hopper", lambda index: False)
    assert not kernels_take(_CudaStandIn((2, 3, 40, 128)), 6)


@pytest.mark.usefixtures("hopper")
def test_kernels_take_sixteen_bit_head_dim_128_inputs_only():
    """bfloat16 and float16 of head dim 128 are taken; float32 or head dim 64 are not."""
    assert kernels_take(_CudaStandIn((2, 3, 40, 128)), 6)
    assert kernels_take(_CudaStandIn((2, 3, 40, 128), dtype=torch.float16), 6)
    assert not kernels_take(_CudaStandIn((2, 3, 40, 128), dtype=torch.float32), 6)
    assert not kernels_take(_CudaStandIn((2, 3, 40, 64)), 6)


@pytest.mark.usefixtures("hopper")
def test_kernels_take_needs_16_byte_rows_and_contiguous_values():
    """Strides in multiples of 8 elements (16 bytes, not necessarily 32), a 16-byte aligned
    address, unit stride along D; a size-1 dimension's stride does not matter."""
    assert kernels_take(_CudaStandIn((2, 3, 40, 128), (3 * 40 * 136, 40 * 136, 136, 1)), 6)  # padded rows
    assert not kernels_take(_CudaStandIn((2, 3, 40, 128), (3 * 40 * 132, 40 * 132, 132, 1)), 6)
    assert not kernels_take(_CudaStandIn((2, 3, 40, 128), (3 * 40 * 128, 40 * 128, 128, 2)), 6)
    assert kernels_take(_CudaStandIn((1, 3, 40, 128), (5, 40 * 128, 128, 1)), 3)  # batch of one
    assert kernels_take(_CudaStandIn((2, 3, 1, 128), (3 * 136, 136, 7, 1)), 6)  # one row
    assert kernels_take(_CudaStandIn((2, 3, 40, 128), ptr=4096), 6)
    assert not kernels_take(_CudaStandIn((2, 3, 40, 128), ptr=4096 + 8), 6)


@pytest.mark.usefixtures("hopper")
def test_kernels_take_bounds_the_heads_and_a_heads_vectors():
    """1 to 65535 heads (a grid's y), and a head's 16-byte vectors with a CTA's reach past them
    (CONVERT_THREADS x CONVERT_UNROLL) below 2**31."""
    x = _CudaStandIn((2, 3, 40, 128))
    assert not kernels_take(x, 0)
    assert kernels_take(x, 1) and kernels_take(x, 65535)
    assert not kernels_take(x, 65536)
    reach_rows = CONVERT_THREADS * CONVERT_UNROLL // 16  # rows of 128 values: 16 vectors each
    assert kernels_take(_CudaStandIn((1, 1, 2**27 - reach_rows - 1, 128)), 1)
    assert not kernels_take(_CudaStandIn((1, 1, 2**27 - reach_rows, 128)), 1)


def test_one_input_the_kernels_cannot_read_sends_both_the_torch_way(monkeypatch):
    """Where q suits the kernels and k does not (or the other way), torch rounds both."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 30, 128, generator=gen).bfloat16() for _ in range(2))

    def no_kernels(*args):
        raise AssertionError("the kernels ran")

    monkeypatch.setattr(e4m3_kernels, "_rounded_heads", no_kernels)
    want = heads_as_e4m3(q, k, 0, 2)
    for taken in (q, k):
        monkeypatch.setattr(e4m3_kernels, "kernels_take", lambda x, nbh, taken=taken: x is taken)
        got = gpu_heads_as_e4m3(q, k, 0, 2)
        assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
        assert torch.equal(got[1].view(torch.uint8), want[1].view(torch.uint8))
        assert torch.equal(got[2], want[2])


# --- fgcupy.jit.e4m3_spec -------------------------------------------------------------------


def test_convert_constants_are_the_launch_threads_and_unroll():
    """The kernel's thread and unroll constants are the block size the launch uses and the unroll
    the grid divides by; its bounds are the reference's, and the scoring kernel's."""
    for step in ("sumsq", "round"):
        spec = E4m3ConvertSpec("bfloat16", 128, step)
        assert spec.constants == {"kConvertThreads": spec.threads, "kConvertUnroll": CONVERT_UNROLL,
                                  "kE4m3Max": E4M3_MAX, "kE4m3RowSumsq": E4M3_ROW_SUMSQ,
                                  "kE4m3NonfiniteClamp": E4M3_NONFINITE_CLAMP}
        assert Sm90ScoreSpec("float8_e4m3", 128, "maxprob", 128).constants["kE4m3RowSumsq"] == E4M3_ROW_SUMSQ
        assert spec.threads == CONVERT_THREADS


# --- fgcupy.lse_estimate --------------------------------------------------------------------


@pytest.mark.parametrize("kv_len", [100, 1000, 4500])
@pytest.mark.parametrize("slice_m", [64, 128])
def test_band_sample_ranges_are_the_sampled_keys_in_each_band(kv_len, slice_m):
    """int32 [blocks, 2]: for each query block, [first, end) places in the sample of the sampled
    keys at [j*M - band, (j+1)*M + band), keys on either edge included (first) or left out (end)."""
    positions = sample_positions(kv_len).tolist()
    hit_edge = False
    for band in range(0, 40):
        blocks = num_blocks(kv_len + 200, slice_m)
        ranges = _band_sample_ranges(blocks, slice_m, band, kv_len, torch.device("cpu"))
        assert ranges.dtype == torch.int32 and ranges.shape == (blocks, 2)
        for j in range(blocks):
            lo, hi = max(0, j * slice_m - band), min(kv_len, (j + 1) * slice_m + band)
            inside = [i for i, p in enumerate(positions) if lo <= p < hi]
            want = (inside[0], inside[-1] + 1) if inside else None
            first, end = ranges[j].tolist()
            if want is None:
                assert first == end
            else:
                assert (first, end) == want, (band, j)
            hit_edge |= lo in positions or hi in positions
    assert hit_edge


def test_the_kernel_path_asks_for_heads_that_exist():
    """Each stats call covers heads [bh0, bh0 + nbh) within B x H, the last call fewer; the band
    calls carry no skip, the sample calls a skip of the estimate's ranges and slice."""
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 3, 130, 16, generator=gen), torch.randn(2, 3, 900, 16, generator=gen)
    calls = []

    def stats(rows, keys, bh0, nbh, band_keys, skip):
        calls.append((bh0, nbh, band_keys, skip))
        return torch.zeros(nbh, rows.shape[2])

    lse_parts_from_stats(q, k, 64, 20, stats, 4)
    assert [(c[0], c[1]) for c in calls] == [(0, 4), (0, 4), (4, 2), (4, 2)]
    for bh0, nbh, band_keys, skip in calls:
        if band_keys is not None:
            assert band_keys == (-20, 64 + 40) and skip is None
        else:
            assert skip[1] == 64 and torch.equal(skip[0], _band_sample_ranges(3, 64, 20, 900, q.device))


def test_the_kernel_paths_sample_is_made_once_per_shape(monkeypatch):
    """The sampled keys' positions and skip ranges are made on the first call of a shape and
    reused (the same tensors) after, with the values of sample_positions and _band_sample_ranges;
    the stats see k's keys at those positions."""
    import fgcupy.lse_estimate as le

    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 2, 200, 16, generator=gen), torch.randn(1, 2, 5000, 16, generator=gen)
    seen = []

    def stats(rows, keys, bh0, nbh, band_keys, skip):
        if skip is not None:
            seen.append((keys, skip[0]))
        return torch.zeros(nbh, rows.shape[2])

    made = []
    monkeypatch.setattr(le, "sample_positions", lambda *a: made.append(a) or sample_positions(*a))
    monkeypatch.setattr(device_constants, "_KEPT", {})
    for _ in range(3):
        lse_parts_from_stats(q, k, 64, 20, stats, 4)
    assert len(made) == 2  # one plan: its positions and, within its ranges, the same positions again
    positions = sample_positions(5000)
    assert 1 < 5000 // positions.numel()  # a real sample, not every key
    assert all(s[1] is seen[0][1] for s in seen)
    assert torch.equal(seen[0][1], _band_sample_ranges(4, 64, 20, 5000, q.device))
    assert all(torch.equal(keys, k[:, :, positions]) for keys, _ in seen)


def test_a_band_of_zero_is_the_blocks_own_keys():
    """band=0 is accepted: each block's own keys exactly, the rest sampled."""
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 128, 16, generator=gen), torch.randn(1, 2, 128, 16, generator=gen)
    got = estimate_lse(q, k, 64, band=0, scale=0.25)
    logits = q @ k.transpose(-1, -2) * 0.25  # 128 keys: every key sampled
    torch.testing.assert_close(got, torch.logsumexp(logits, -1), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="band must be a non-negative int"):
        estimate_lse(q, k, 64, band=-1)


# --- fgcupy.mask_kernels._checked_skip ------------------------------------------------------

CPU = torch.device("cpu")


def _ranges(blocks, dtype=torch.int32):
    return torch.zeros(blocks, 2, dtype=dtype)


def test_skip_is_taken_in_stats_mode_without_a_band():
    """Valid ranges and block come back (ranges contiguous, block an int); any other mode, or a
    band, is refused."""
    ranges = torch.zeros(2, 2, dtype=torch.int32).t()  # non-contiguous [2, 2]
    got_ranges, got_block = _checked_skip((ranges, np.int64(64)), "stats", None, 100, CPU)
    assert got_ranges.is_contiguous() and torch.equal(got_ranges, ranges) and got_block == 64
    for mode, band in (("maxprob", None), ("logits", None), ("stats", (0, 64))):
        with pytest.raises(ValueError, match="skip applies to mode 'stats' without a band"):
            _checked_skip((_ranges(2), 64), mode, band, 100, CPU)


@pytest.mark.parametrize("block", [0, -16, 8, 24, 64.0, True])
def test_skip_block_must_be_a_positive_multiple_of_16(block):
    """Blocks that are zero, negative, not a multiple of 16, or not an int are refused."""
    with pytest.raises(ValueError, match="positive multiple of 16"):
        _checked_skip((_ranges(7), block), "stats", None, 100, CPU)


def test_skip_ranges_must_be_int32_blocks_by_2_on_the_rows_device():
    """One [first, end) pair per block of rows (a partial last block counted), int32, on the
    rows' device."""
    assert _checked_skip((_ranges(2), 64), "stats", None, 65, CPU)[1] == 64  # 65 rows: 2 blocks
    bad = [_ranges(1), _ranges(3), _ranges(2, torch.int64), torch.zeros(2, 3, dtype=torch.int32),
           torch.zeros(2, 2, dtype=torch.int32, device="meta"), [[0, 0], [0, 0]]]
    for ranges in bad:
        with pytest.raises(ValueError, match="skip's ranges must be int32"):
            _checked_skip((ranges, 64), "stats", None, 65, CPU)


def test_a_band_past_the_keys_still_reaches_back_from_late_query_blocks():
    """With more queries than keys, a band wider than the keys but short of the queries' blocks
    is kept as asked: the last block's band reaches back over the keys it covers (not cut to
    kv_len, which would leave those keys to the sample)."""
    from .test_lse_estimate import brute_force_lse

    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 4300, 8, generator=gen), torch.randn(1, 1, 4100, 8, generator=gen)
    got = estimate_lse(q, k, 128, band=4200, scale=0.5)
    expected = brute_force_lse(q, k, 128, 4200, 0.5)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_the_kernel_paths_band_part_keeps_an_infinite_logit():
    """A key with an infinite entry in a block's band gives that block's queries +inf (or -inf)
    logits: the kernel path's band part stays +inf where torch's does, as the torch estimate."""
    from .test_lse_estimate import _stats_reference

    gen = torch.Generator().manual_seed(8)
    q, k = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 4500, 16, generator=gen)
    k[0, 1, 100, 0] = math.inf  # in the bands of blocks 0 to 2 (64 rows, band 64)
    near, far = lse_parts_from_stats(q, k, 64, 64, _stats_reference(64, 0.3), 4)
    got = torch.logaddexp(near, far)
    expected = estimate_lse(q, k, 64, band=64, scale=0.3)
    rows = q[0, 1, :192, 0] > 0
    assert rows.any() and torch.isposinf(near[0, 1, :192][rows]).all() and torch.isposinf(got[0, 1, :192][rows]).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, equal_nan=True)
