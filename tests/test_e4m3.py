"""q and k rounded to e4m3 for the column max (fgcupy.e4m3), and predict_mask's ``products``."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, predict_mask
from fgcupy import mask_reference as ref
from fgcupy.e4m3 import (E4M3_NONFINITE_CLAMP, E4M3_ROW_SUMSQ, e4m3_rounded, head_scales, heads_as_e4m3,
                         row_sumsq, to_e4m3)
from fgcupy.jit.score_spec import E4M3, Sm90ScoreSpec, all_sm90_mask_specs
from fgcupy.lse_estimate import estimate_lse
from fgcupy.predict_op import _fields, request_token
from fgcupy.scoring import make_request


@given(st.integers(0, 2**31 - 1), st.sampled_from([1e-6, 0.01, 1.0, 100.0, 3e3]),
       st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.sampled_from([1.0, 1e2, 1e4]))
@settings(max_examples=40, deadline=None)
def test_each_head_gets_the_largest_power_of_two_that_fits(seed, magnitude, dtype, wide):
    """Rows' norms within 2^7.5 once scaled, twice that past it; the elements keep e4m3's 3 bits
    down to 2^-6 (its subnormals start there), however far below the largest (``wide``: one
    channel that many times the rest)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 50, 16, generator=gen) * magnitude * torch.rand(2, 3, 1, 1, generator=gen)
    x[..., 0] *= wide
    x = x.to(dtype)
    assume(x.isfinite().all())  # float16 overflows past 65,504
    scales = head_scales(x)
    norms2 = x.double().square().sum(3).amax(2)
    assert scales.dtype == torch.float32 and scales.shape == (2, 3)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two
    assert (norms2 * scales.double() ** 2 <= E4M3_ROW_SUMSQ).all()
    fits = norms2 > 0  # a float16 head of magnitude 1e-6 may underflow to zeros: scale 1
    assert (norms2 * (2 * scales.double()) ** 2 > E4M3_ROW_SUMSQ)[fits].all() and (scales[~fits] == 1).all()
    rounded = e4m3_rounded(x)
    # e4m3 keeps 3 mantissa bits: within half a step (2^-4 relative) of each normal value, and
    # the largest magnitude survives the rounding.
    big = x.float().abs() * scales[:, :, None, None] >= 2**-6
    assert ((rounded - x.float()).abs()[big] <= 2**-4 * x.float().abs()[big]).all()
    amax = x.float().abs().amax(dim=(2, 3))
    assert torch.equal(rounded.abs().amax(dim=(2, 3)) > 0, amax > 0)


def test_a_wide_channel_leaves_the_rest_above_e4m3s_subnormals():
    """One channel 1,000 times the rest: the norm bound puts it near 2^7.5, which leaves the rest
    above 2^-6, where e4m3 keeps all its bits (a largest element of 16 would put them below)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 256, 128, generator=gen)
    x[..., 0] = 1e3
    scale = head_scales(x)[0, 0]
    assert (x[..., 0] * scale <= 2**7.5).all() and (x[..., 0] * scale > 2**6.5).all()
    rest = x[..., 1:].abs() * scale
    assert rest.median() > 2**-6 and (rest * 16 / (1e3 * scale)).median() < 2**-6


def test_row_sums_of_squares_are_each_heads_largest_in_float64():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 70, 16, generator=gen).bfloat16()
    x[1, 2, 33] = 300.0
    got = row_sumsq(x)
    assert got.dtype == torch.float64 and torch.equal(got, x.double().square().sum(3).amax(2))
    assert got[1, 2] == 16 * 300.0**2 and row_sumsq(x[:, :, :0]).eq(0).all()


def test_heads_scale_by_their_finite_rows_and_zero_heads_keep_scale_one():
    x = torch.ones(1, 4, 8, 16)
    x[0, 0] = 0.0
    x[0, 1, 3, 3] = float("inf")
    x[0, 2, 5, 1] = float("nan")
    x[0, 3] *= 1000.0
    # rows of 16 ones: 32^2 x 16 = 2^14 <= 2^15; rows of 16 x 1000^2 = 2^23.9: 2^-5
    assert head_scales(x).tolist() == [[1.0, 32.0, 32.0, 2.0**-5]]
    as_e4m3 = to_e4m3(x, head_scales(x)).float()
    assert as_e4m3[0, 1, 3, 3] == E4M3_NONFINITE_CLAMP and as_e4m3[0, 1, 3, 0] == E4M3_NONFINITE_CLAMP  # its row
    assert as_e4m3[0, 1, 2].eq(32.0).all() and as_e4m3[0, 2, 4].eq(32.0).all()  # the head's other rows
    assert math.isnan(as_e4m3[0, 2, 5, 1]) and as_e4m3[0, 2, 5, 0] == E4M3_NONFINITE_CLAMP
    assert as_e4m3[0, 3].eq(32.0).all()  # 1000 / 32 = 31.25: e4m3 steps by 2 from 16 to 32, 32 is nearest
    assert head_scales(torch.zeros(0, 2, 0, 16)).shape == (0, 2)
    just_past = torch.tensor(2.0**7.5 * (1 + 2**-23) / 2**10).reshape(1, 1, 1, 1)  # its square rounds across 2^15 / 4^10
    assert (just_past.double() * head_scales(just_past).double()) ** 2 <= E4M3_ROW_SUMSQ


def test_bfloat16_and_float32_scaling_round_alike():
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 2, 64, 32, generator=gen) * 7).to(torch.bfloat16)
    scales = head_scales(x)
    assert torch.equal(to_e4m3(x, scales).float(), to_e4m3(x.float(), scales).float())
    wide = (torch.randn(1, 2, 64, 32, generator=gen) * 1e-3).to(torch.float16)  # scale 2^17: past float16's range
    assert torch.equal(to_e4m3(wide, head_scales(wide)).float(), to_e4m3(wide.float(), head_scales(wide)).float())


@pytest.mark.parametrize("bh0, nbh", [(0, 6), (1, 4), (2, 1), (3, 3), (5, 0)])
def test_heads_as_e4m3_takes_heads_batch_major(bh0, nbh):
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 40, 16, generator=gen) * torch.arange(1, 7).view(2, 3, 1, 1)
    k = torch.randn(2, 3, 50, 16, generator=gen)
    q8, k8, factor = heads_as_e4m3(q, k, bh0, nbh)
    flat_q, flat_k = q.reshape(6, 1, 40, 16)[bh0 : bh0 + nbh], k.reshape(6, 1, 50, 16)[bh0 : bh0 + nbh]
    assert q8.shape == (1, nbh, 40, 16) and k8.shape == (1, nbh, 50, 16) and factor.shape == (nbh,)
    assert q8.dtype == torch.float8_e4m3fn and q8.is_contiguous()
    for i in range(nbh):
        sq, sk = head_scales(flat_q[i : i + 1]), head_scales(flat_k[i : i + 1])
        assert factor[i] == 1.0 / (sq * sk).item()
        assert torch.equal(q8[0, i].float() / sq.item(), e4m3_rounded(flat_q[i : i + 1])[0, 0])
        assert torch.equal(k8[0, i].float() / sk.item(), e4m3_rounded(flat_k[i : i + 1])[0, 0])


def test_e4m3_products_on_the_cpu_are_the_rounded_inputs_column_max():
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 2, 500, 128, generator=gen) * 3, torch.randn(1, 2, 600, 128, generator=gen) * 3
    lse = estimate_lse(q, k, 128)
    got = predict_mask(q, k, 128, "colmax", lse=lse, density=0.1, products="e4m3")
    expected = ref.predict_mask_reference(e4m3_rounded(q), e4m3_rounded(k), 128, "colmax", top_k=60, lse=lse)
    assert torch.equal(got.indices, expected.indices)
    plain = predict_mask(q, k, 128, "colmax", lse=lse, density=0.1)
    assert not torch.equal(got.indices, plain.indices)  # the rounding moves some keys at this size
    # on the CPU "auto" keeps the inputs' products (the e4m3 kernel is a GPU's)
    estimated = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1)
    assert torch.equal(estimated.indices, plain.indices)


def test_products_refusals():
    q = torch.randn(1, 2, 300, 128)
    lse = torch.zeros(1, 2, 300)
    with pytest.raises(ValueError, match="products must be one of"):
        predict_mask(q, q, 128, "colmax", lse=lse, density=0.1, products="fp8")
    with pytest.raises(ValueError, match="applies to method='colmax'"):
        predict_mask(q, q, 128, "topk", density=0.1, products="e4m3")
    with pytest.raises(ValueError, match=r"method='auto' \(predict_mask's default\) takes"):
        predict_mask(q, q, 128, "auto", density=0.1, products="e4m3")
    old = predict_mask(q, q, 128, "topk", top_k=20)
    with pytest.raises(ValueError, match="candidates"):
        predict_mask(q, q, 128, "colmax", lse=lse, density=0.1, candidates=old, products="e4m3")
    assert isinstance(predict_mask(q, q, 128, "colmax", lse=lse, density=0.1, candidates=old, products="input"),
                      SliceMask)


def test_the_op_token_carries_products():
    req = make_request(128, 300, 128, "colmax", rule="topk", top_k=30, products="e4m3")
    assert _fields(request_token(req))["products"] == "e4m3"
    assert make_request(128, 300, 128, "colmax", rule="topk", top_k=30).products == "input"


def test_e4m3_kernels_are_the_hopper_max_probability_pass_at_head_dim_128():
    e4m3 = [s for s in all_sm90_mask_specs() if s.dtype == E4M3]
    assert {s.mode for s in e4m3} == {"maxprob"} and {s.head_dim for s in e4m3} == {128}
    assert {s.group for s in e4m3} == {2, 4, 8, 16, 32, 64, 128}
    spec = Sm90ScoreSpec(E4M3, 128, "maxprob", 128)
    assert spec.name_expression == "fg::mask_score_sm90<fg::e4m3_t, 128, 2, 128>"
    assert spec.smem_bytes == (128 + 256) * 128 + 128 * 4 + 1024  # one byte a value
    for bad in (dict(head_dim=64), dict(mode="stats", group=1), dict(mode="band")):
        with pytest.raises(ValueError):
            Sm90ScoreSpec(**{**dict(dtype=E4M3, head_dim=128, mode="maxprob", group=128), **bad})


@given(st.integers(0, 2**31 - 1), st.sampled_from([1.0, 1e2, 1e4]), st.sampled_from([1, 4, 128]),
       st.sampled_from([torch.bfloat16, torch.float16]))
@settings(max_examples=40, deadline=None)
def test_every_partial_sum_of_a_logit_fits_float16(seed, wide, n_wide, dtype):
    """What lets the pass sum e4m3 products in float16: once scaled and rounded, any q row and
    any k row have sum |q_c k_c| within (1 + 2^-4)^2 x E4M3_ROW_SUMSQ (Cauchy-Schwarz; e4m3
    moves a normal element by at most 2^-4 of it, a subnormal one by 2^-10), which bounds every
    partial sum in any order, and that stays below float16's largest, 65,504. Rows of q and k
    alike are the worst case (every product positive)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 64, 128, generator=gen) * torch.rand(1, 2, 1, 1, generator=gen) * 10
    x[..., :n_wide] *= wide
    x = x.to(dtype)
    assume(x.isfinite().all())
    scaled = to_e4m3(x, head_scales(x)).double()  # q and k alike: the scale and the rounding are per tensor
    largest = (scaled.abs() @ scaled.abs().transpose(-1, -2)).amax()
    bound = (1 + 2**-4) ** 2 * E4M3_ROW_SUMSQ + 2 * 128 * 2**-10 * 2**7.5
    assert largest <= bound < 65504


#: float16 bits of a row whose sum of squares depends on the order of summation: 32 values near
#: 128 whose squares sum to 2^19 - 2^-8 and 96 near 0.005 whose squares sum to a little more
#: than 2^-8 (within 2^15 of each other, but float16 squares need 22 bits). Summed in
#: fg::e4m3_sumsq's order it is 2^19 exactly (scale 1/4); in one plain order a float64 step above.
ORDER_SENSITIVE_ROW = [
    7672, 22529, 7889, 7965, 7725, 7874, 7910, 7853, 22441, 7812, 7935, 7658, 7744, 22531, 7734, 7807,
    7971, 22532, 7296, 22531, 7959, 7809, 22531, 22565, 22528, 7896, 7687, 7763, 7948, 7781, 7762, 7800,
    22532, 22528, 7863, 7727, 7825, 7829, 7748, 7767, 22529, 7753, 7716, 22485, 7830, 22532, 7827, 7693,
    22530, 7945, 7879, 7950, 7755, 7700, 7691, 7845, 22530, 7716, 7853, 7692, 7838, 7679, 7732, 22532,
    7944, 22528, 7820, 7867, 7723, 7734, 7928, 7748, 7941, 7925, 22530, 7807, 7990, 7736, 22534, 22528,
    22528, 7914, 7651, 7955, 7794, 22532, 7830, 7970, 7755, 7765, 7741, 22531, 7960, 22531, 7649, 7749,
    22459, 7982, 7661, 22530, 7794, 7890, 7712, 22528, 7925, 7662, 22532, 7952, 7706, 7887, 7758, 7765,
    7876, 7935, 7919, 7792, 7951, 22528, 7798, 7824, 7883, 22531, 22529, 7786, 22529, 7989, 7755, 7809,
]


def _sumsq_in_the_kernels_order(row: list) -> float:
    """fg::e4m3_sumsq's sum for one row of 128 values: 16 lanes of 8 squares each in turn, then
    XOR-butterfly adds (distances 8, 4, 2, 1), in Python floats (float64)."""
    lanes = []
    for lane in range(16):
        total = 0.0
        for x in row[8 * lane : 8 * lane + 8]:
            total = x * x + total
        lanes.append(total)
    for d in (8, 4, 2, 1):
        lanes = [lanes[i] + lanes[i ^ d] for i in range(16)]
    return lanes[0]


def test_row_sums_of_squares_are_summed_in_the_kernels_order():
    """The reference picks the kernel's power of two on a row whose sum depends on the order."""
    x = torch.tensor(ORDER_SENSITIVE_ROW, dtype=torch.int16).view(torch.float16).view(1, 1, 1, 128)
    row = x.flatten().double().tolist()
    kernel_sum = _sumsq_in_the_kernels_order(row)
    assert kernel_sum == 2.0**19 and row_sumsq(x).item() == kernel_sum and head_scales(x).item() == 0.25
    plain = torch.linalg.vecdot(x.double(), x.double()).item()
    assert plain != kernel_sum  # another order rounds across the power: the order matters here
    gen = torch.Generator().manual_seed(6)
    many = torch.randn(2, 3, 40, 128, generator=gen).half() * torch.logspace(-3, 3, 128).half()
    want = [[max(_sumsq_in_the_kernels_order(r) for r in head.double().tolist()) for head in b] for b in many]
    assert row_sumsq(many).tolist() == want


def test_a_row_with_a_non_finite_element_is_clamped_and_its_head_keeps_its_scale():
    """A NaN or infinite element (a padded key, say) leaves its head's scale to the other rows, so
    they keep their precision; its own row is clamped at E4M3_NONFINITE_CLAMP, within
    E4M3_ROW_SUMSQ whatever its finite elements."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(1, 2, 64, 128, generator=gen) * 300).bfloat16()
    clean = x.clone()
    x[0, 0, 3, 5] = float("inf")
    x[0, 0, 9] = float("nan")
    scales = head_scales(x)
    assert torch.equal(scales[0, 0], head_scales(torch.cat([clean[:, :, :3], clean[:, :, 4:9], clean[:, :, 10:]], 2))[0, 0])
    rounded = to_e4m3(x, scales).float()
    assert rounded[0, 0, 3].abs().amax() == E4M3_NONFINITE_CLAMP and rounded[0, 0, 3, 5] == E4M3_NONFINITE_CLAMP
    assert rounded[0, 0, 9].isnan().all()
    others = torch.ones(64, dtype=torch.bool)
    others[[3, 9]] = False
    assert torch.equal(rounded[0, 0, others], to_e4m3(clean, scales).float()[0, 0, others])
    assert rounded[0, 0, 3].square().sum(-1) <= E4M3_ROW_SUMSQ
    assert rounded[0, 1].square().sum(-1).amax() <= E4M3_ROW_SUMSQ * (1 + 2**-4) ** 2