"""The e4m3 conversion kernels (cuda_src/e4m3_convert.cu): their specs compile for Hopper with no
spills, and what they take or leave to torch (CPU); on a Hopper GPU their bytes and scales are
torch's (fgcupy.e4m3) on fresh inputs, special values and strided layouts included."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import e4m3_kernels
from fgcupy.e4m3 import E4M3_ROW_SUMSQ, head_scales, heads_as_e4m3, to_e4m3
from fgcupy.e4m3_kernels import gpu_heads_as_e4m3, kernels_take
from fgcupy.jit import report as report_mod
from fgcupy.jit.e4m3_spec import CONVERT_THREADS, CONVERT_UNROLL, E4m3ConvertSpec, all_e4m3_convert_specs

from .needs import needs_nvrtc

ON_HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
needs_hopper = pytest.mark.skipif(not ON_HOPPER, reason="the e4m3 conversion kernels run on Hopper (sm_90) GPUs")


def test_specs_cover_both_dtypes_and_steps():
    specs = all_e4m3_convert_specs()
    assert {(s.dtype, s.head_dim, s.step) for s in specs} == {
        (d, 128, step) for d in ("bfloat16", "float16") for step in ("sumsq", "round")}
    spec = E4m3ConvertSpec("float16", 128, "round")
    assert spec.name == "e4m3_round_fp16_d128"
    assert spec.name_expression == "fg::e4m3_round<fg::fp16_t, 128>"
    assert spec.shared_params == (E4m3ConvertSpec().params,)
    for bad in (dict(dtype="float32"), dict(head_dim=64), dict(step="scale")):
        with pytest.raises(ValueError, match="must be one of"):
            E4m3ConvertSpec(**bad)


def test_grid_covers_every_vector_of_a_head():
    per_cta = CONVERT_THREADS * CONVERT_UNROLL
    assert E4m3ConvertSpec.grid(1, 128, 3) == (1, 3)
    assert E4m3ConvertSpec.grid(per_cta // 16, 128, 2) == (1, 2)
    assert E4m3ConvertSpec.grid(per_cta // 16 + 1, 128, 2) == (2, 2)


@needs_nvrtc
@pytest.mark.parametrize("arch", ["sm_90", "sm_90a"])
@pytest.mark.parametrize("spec", all_e4m3_convert_specs(), ids=lambda s: s.name)
def test_compiles_for_hopper_without_spills(spec, arch):
    rep = report_mod.compile_report(spec, arch)
    assert spec.template.split("::")[-1] in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0 and rep.stack_bytes == 0, rep.log
    assert rep.registers <= 64, rep.registers  # a memory-bound kernel: full occupancy


def test_cpu_tensors_are_left_to_torch():
    assert not kernels_take(torch.zeros(2, 3, 40, 128, dtype=torch.bfloat16), 6)


@pytest.mark.gpu
@needs_hopper
def test_kernels_take_only_what_they_can_read():
    gpu = torch.zeros(2, 3, 40, 128, dtype=torch.bfloat16, device="cuda")
    assert kernels_take(gpu, 6)
    assert kernels_take(gpu.transpose(1, 2).contiguous().transpose(1, 2), 6)  # NHD view
    assert kernels_take(gpu[:1], 3)  # one batch entry: its batch stride is never used
    assert not kernels_take(gpu.float(), 6)
    assert not kernels_take(torch.zeros(2, 3, 40, 64, device="cuda", dtype=torch.bfloat16), 6)
    assert kernels_take(torch.zeros(2, 3, 40, 136, dtype=torch.bfloat16, device="cuda")[..., 8:], 6)  # 272-byte rows
    assert not kernels_take(torch.zeros(2, 3, 40, 129, dtype=torch.bfloat16, device="cuda")[..., 1:], 6)  # 258-byte rows
    flat = torch.zeros(2 * 3 * 40 * 128 + 1, dtype=torch.bfloat16, device="cuda")
    assert not kernels_take(flat[1:].view(2, 3, 40, 128), 6)  # a start 2 bytes past 16-byte alignment
    assert not kernels_take(gpu, 0) and not kernels_take(gpu, 70000)


def test_the_torch_way_gives_each_heads_rounding_and_refuses_heads_out_of_range():
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 50, 128, generator=gen).bfloat16() * 10 ** torch.arange(3.0).view(1, 3, 1, 1)
            for _ in range(2))
    q8, k8, factor = gpu_heads_as_e4m3(q, k, 1, 4)  # heads 1, 2 of batch 0 and 0, 1 of batch 1
    heads = torch.cat([q[0, 1:], q[1, :2]]).unsqueeze(0)
    scales = head_scales(heads)
    assert torch.equal(q8.view(torch.uint8), to_e4m3(heads, head_scales(heads)).view(torch.uint8))
    assert torch.equal(factor, 1.0 / (scales * head_scales(torch.cat([k[0, 1:], k[1, :2]]).unsqueeze(0))).reshape(-1))
    assert k8.shape == (1, 4, 50, 128)
    for bh0, nbh in ((-1, 2), (5, 2), (0, 7)):
        with pytest.raises(ValueError, match="are not within q's 6"):
            gpu_heads_as_e4m3(q, k, bh0, nbh)


def _same_e4m3(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where the other is NaN (a NaN's sign and a zero's are not compared)."""
    a, b = a.float(), b.float()
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all()) and torch.equal(a.isnan(), b.isnan())


def _special(x: torch.Tensor, kind: str, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """x (float32, to be rounded to ``dtype``) with one head changed: zeros of both signs, an
    infinity, a NaN of either sign, tiny values (subnormal in ``dtype``, some past e4m3's range
    below the head's largest), or magnitudes past e4m3's range."""
    h = int(torch.randint(x.shape[1], (1,), generator=gen))
    if kind == "zeros":
        x[:, h] = 0
        x[:, h, :, ::2] = -0.0
    elif kind in ("inf", "nan", "-nan"):
        x[0, h, 0, 5] = {"inf": float("inf"), "nan": float("nan"), "-nan": -float("nan")}[kind]
    elif kind == "tiny":
        x[:, h] *= 1e-33 if dtype == torch.bfloat16 else 1e-6
        x[:, h, :, ::3] *= 1e-5
    elif kind == "large":
        x[:, h] *= 3e4
    return x


@pytest.mark.gpu
@needs_hopper
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), heads=st.integers(1, 4),
       rows=st.one_of(st.integers(1, 70), st.integers(70, 2100)),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), layout=st.sampled_from(["HND", "NHD"]),
       special=st.sampled_from(["none", "zeros", "inf", "nan", "-nan", "tiny", "large"]),
       data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_kernels_give_torchs_bytes_and_scales(seed, batch, heads, rows, dtype, layout, special, data):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, rows, 128, generator=gen) * 4 ** torch.randn(1, heads, 1, 1, generator=gen)
            for _ in range(2))
    if dtype == torch.float16 and special == "large":
        special = "none"  # past float16's range
    q = _special(q, special, gen, dtype)
    q, k = (x.to("cuda", dtype) for x in (q, k))
    if layout == "NHD":
        q, k = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k))
    total = batch * heads
    bh0 = data.draw(st.integers(0, total - 1), label="bh0")
    nbh = data.draw(st.integers(1, total - bh0), label="nbh")
    assert kernels_take(q, nbh) and kernels_take(k, nbh)
    q8, k8, factor = gpu_heads_as_e4m3(q, k, bh0, nbh)
    q8_ref, k8_ref, factor_ref = heads_as_e4m3(q, k, bh0, nbh)
    assert q8.is_contiguous() and q8.shape == (1, nbh, rows, 128) and q8.dtype == torch.float8_e4m3fn
    assert _same_e4m3(q8, q8_ref) and _same_e4m3(k8, k8_ref)
    assert torch.equal(factor, factor_ref)


@pytest.mark.gpu
@needs_hopper
def test_scales_match_torch_on_a_head_of_one_value():
    """A head whose every value is its largest (one vector per thread, every CTA the same
    atomic): the kernel's largest magnitude is exact."""
    x = torch.full((1, 2, 3000, 128), 0.8125, device="cuda", dtype=torch.bfloat16)  # 13/16: e4m3 holds it
    x[0, 1] = -1e-3
    q8, _, factor = gpu_heads_as_e4m3(x, x, 0, 2)
    scales = head_scales(x).reshape(-1)
    assert float(scales[0]) == 16.0 and E4M3_ROW_SUMSQ == 2.0**15  # 128 x 13^2 <= 2^15 < 128 x 26^2
    assert torch.equal(factor, 1.0 / (scales * scales))
    assert bool((q8[0, 0].float() == 13.0).all())


@pytest.mark.gpu
@needs_hopper
def test_scales_match_torch_next_to_powers_of_two_and_the_overflow_edge():
    """Heads of one value each, that value next to 16 x 2**p (rows of 128 such values square-sum
    to E4M3_ROW_SUMSQ x 4**p: where the scale steps), next to 2**p (odd powers of two: the
    square root rounds down), next to where the scale would pass 2**127, or subnormal: the
    rounding kernel's scale from the exponent bits is scales_for's."""
    bits = torch.tensor([16 * 2.0**p for p in (-127, -126, -20, -3, 0, 5, 30, 123)] + [2.0**p for p in (-100, -1, 0, 7, 100)]
                        + [1e-39, 3e38], dtype=torch.bfloat16).view(torch.int16)
    values = torch.cat([bits - 1, bits, bits + 1]).view(torch.bfloat16)
    values = values[values.float().isfinite() & (values.float() > 0)]
    x = values.float().view(1, -1, 1, 1).expand(1, values.numel(), 48, 128).to("cuda", torch.bfloat16)
    sumsq = torch.zeros(values.numel(), dtype=torch.float64, device="cuda")
    scales = torch.full((values.numel(),), -1.0, dtype=torch.float32, device="cuda")
    q8 = e4m3_kernels._rounded_heads(x, 0, values.numel(), sumsq, scales)
    assert torch.equal(scales, head_scales(x).reshape(-1))  # the scales themselves: their product can overflow
    assert _same_e4m3(q8, to_e4m3(x, head_scales(x)))


@pytest.mark.gpu
@needs_hopper
def test_the_kernels_sum_of_squares_is_the_references_where_the_order_matters():
    """A float16 row whose sum of squares rounds across a power of two in other orders: the
    kernel's scale is the reference's (tests/test_e4m3.py, ORDER_SENSITIVE_ROW)."""
    from .test_e4m3 import ORDER_SENSITIVE_ROW

    row = torch.tensor(ORDER_SENSITIVE_ROW, dtype=torch.int16).view(torch.float16)
    x = torch.zeros(1, 2, 50, 128, dtype=torch.float16)
    x[0, :, 7] = row
    x = x.cuda()
    q8, k8, factor = gpu_heads_as_e4m3(x, x, 0, 2)
    assert head_scales(x.cpu()).tolist() == [[0.25, 0.25]]
    assert torch.equal(factor.cpu(), torch.tensor([16.0, 16.0]))
    assert _same_e4m3(q8, heads_as_e4m3(x.cpu(), x.cpu(), 0, 2)[0].cuda())
