"""The column max from q and k rounded to e4m3 on Hopper's tensor cores against the torch
reference on the same rounding (GPU only; the kernel needs sm_90)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import mask_kernels, predict_mask
from fgcupy import mask_reference as ref
from fgcupy.e4m3 import e4m3_rounded
from fgcupy.lse_estimate import estimate_lse
from fgcupy.mask import num_blocks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                       reason="the e4m3 column-max pass runs on Hopper (sm_90) GPUs"),
]

DEVICE = "cuda"
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
# Scores stored as bfloat16 from float32 sums in another order: one rounding step apart at most.
PROB_RTOL = 2**-7
#: Hopper's e4m3 products are summed in float16 accumulators (groups of 16 rows or more: 11
#: significant bits, a rounding per k32 step) or in float32 ones of about 14 bits: a logit may be
#: off by about this share of its sum of |q_i k_i| (a few additions' rounding, with room).
ACCUMULATION_SLACK = 2**-8
#: The float16 epilogue rounds each row's -LSE (log2), the logit scale and their fused sum to 11
#: bits: a log2 probability off by at most this share of |LSE| + |logit| (in any base).
EPILOGUE_SLACK = 2**-10


def _logit_slack(qr, kr, scale, lse):
    """float32 [B * H, 1, 1]: per head, the largest error of a log probability the e4m3 pass may
    make on rounded q, k (``qr``, ``kr``, float32 [B, H, S, D]) with rows' LSE ``lse`` [B, H, S]."""
    worst = torch.matmul(qr.abs(), kr.abs().transpose(-1, -2)).amax(dim=(2, 3))
    largest_lse = lse.abs().masked_fill(~torch.isfinite(lse), 0.0).amax(-1)
    return (scale * ACCUMULATION_SLACK * worst + EPILOGUE_SLACK * (largest_lse + scale * worst)).reshape(-1, 1, 1)


def _inputs(seed, batch, heads, q_len, kv_len, dtype, layout, head_gain):
    """q, k [B, H, S, 128] on the GPU (NHD: a strided view); head h's q times head_gain ** h."""
    gen = torch.Generator().manual_seed(seed)

    def make(n, gain):
        x = torch.randn(batch, heads, n, 128, generator=gen) * gain ** torch.arange(heads).view(1, -1, 1, 1)
        x = x.to(DEVICE, dtype)
        return x if layout == "HND" else x.transpose(1, 2).contiguous().transpose(1, 2)

    return make(q_len, head_gain), make(kv_len, 1.0)


@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3),
       q_len=st.one_of(st.integers(1, 200), st.integers(200, 1500)), kv_len=st.one_of(st.integers(1, 200), st.integers(200, 1500)),
       group=st.sampled_from([2, 16, 64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       layout=st.sampled_from(["HND", "NHD"]), head_gain=st.sampled_from([1.0, 30.0, 0.03]))
@SETTINGS
def test_e4m3_column_max_is_the_rounded_inputs_column_max(seed, batch, heads, q_len, kv_len, group, dtype, layout,
                                                          head_gain):
    """Each head rounded under its own power of two (heads whose q differ by factors of 30 get
    different scales), the scales undone in the kernel: the stored maxima are those of the
    rounded inputs, for every head chunk."""
    q, k = _inputs(seed, batch, heads, q_len, kv_len, dtype, layout, head_gain)
    scale = 1 / math.sqrt(128)
    qr, kr = e4m3_rounded(q), e4m3_rounded(k)
    # The rounded inputs' LSE keeps every probability near or below 1 (the inputs' LSE, off by
    # e4m3's rounding on heads of large logits, could take both sides past bfloat16's range).
    _, lse = ref.logits_and_lse(qr, kr, scale)
    lse[..., ::7] = -math.inf  # rows without mass give 0
    bh = batch * heads
    expected = ref.maxprob_scores(qr, kr, lse, group, scale)
    slack = _logit_slack(qr, kr, scale, lse)
    out_rows = num_blocks(q_len, group)
    got = mask_kernels.gpu_colmax_e4m3(q, k, scale, lse.reshape(bh, -1), group)
    assert got.dtype == ref.PROB_DTYPE and got.shape == (bh, out_rows, mask_kernels.row_stride(kv_len, 2))
    _close(got[..., :kv_len].float(), expected.reshape(bh, out_rows, -1), slack)
    if bh > 1:  # heads from the middle, across a batch boundary where there is one
        part = mask_kernels.gpu_colmax_e4m3(q, k, scale, lse.reshape(bh, -1)[1:], group, bh0=1, nbh=bh - 1)
        _close(part[..., :kv_len].float(), expected.reshape(bh, out_rows, -1)[1:], slack[1:])


def _close(got, expected, slack):
    """Within a bfloat16 step and the accumulator's slack (``slack``: logit error per head)."""
    err = (got - expected).abs()
    assert torch.isfinite(got).all()
    bound = 1e-6 + (PROB_RTOL + torch.expm1(slack)) * expected.abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3e}, largest excess {(err - bound).max().item():.3e}"


def _pass_and_reference(q, k, scale):
    """(q and k rounded as the pass sees them, each row's NaN-free LSE over their products, the
    pass's scores and the reference's, both [heads, query blocks, kv_len]) of q, k [1, H, S, 128]
    (float32, on the CPU) as bfloat16 on the GPU."""
    q, k = q.to(DEVICE, torch.bfloat16), k.to(DEVICE, torch.bfloat16)
    heads, kv_len = q.shape[1], k.shape[2]
    qr, kr = e4m3_rounded(q), e4m3_rounded(k)
    lse = ref.nan_free_logsumexp(torch.matmul(qr, kr.transpose(-1, -2)) * scale)
    got = mask_kernels.gpu_colmax_e4m3(q, k, scale, lse.reshape(heads, -1), 128)[..., :kv_len].float()
    expected = ref.maxprob_scores(qr, kr, lse, 128, scale).reshape(heads, -1, kv_len)
    return qr, kr, lse, got, expected


def test_e4m3_inputs_out_of_the_plain_range():
    """Heads far outside e4m3's range (1e4 and 1e-4 per element), a NaN key and an infinite
    query element: the maxima of the rounded inputs (the NaN key scores 0, the clamped element
    counts as the largest finite value)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 3, 300, 128, generator=gen) * torch.tensor([1e4, 1e-4, 1.0]).view(1, 3, 1, 1)
    k = torch.randn(1, 3, 500, 128, generator=gen) * torch.tensor([1e-4, 1e4, 1.0]).view(1, 3, 1, 1)
    k[0, 2, 17, 5] = float("nan")
    q[0, 2, 40, 9] = float("inf")
    scale = 1 / math.sqrt(128)
    qr, kr, lse, got, expected = _pass_and_reference(q, k, scale)
    assert (got[2, :, 17].nan_to_num(0.0) == 0).all()  # NaN scores rank lowest, as 0 does
    finite = torch.isfinite(expected) & (torch.arange(500, device=DEVICE) != 17)
    slack = _logit_slack(qr.nan_to_num(0.0), kr.nan_to_num(0.0), scale, lse)
    err = (got - expected.nan_to_num(0.0)).abs()
    bound = 1e-6 + (PROB_RTOL + torch.expm1(slack)) * expected.nan_to_num(0.0).abs()
    assert (err <= bound)[finite].all(), f"max error {err[finite].max():.3e}"


def test_a_large_head_with_an_infinite_element_keeps_its_other_blocks_finite():
    """A head of magnitude 300 with one infinite query element: the head scales by its other
    rows and that row is clamped at E4M3_NONFINITE_CLAMP, so the float16 sums still fit and query
    blocks without that row score as the reference does, with no infinity or NaN."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 1, 256, 128, generator=gen) * 300
    q[0, 0, 3, 5] = float("inf")  # in block 0
    k = torch.randn(1, 1, 512, 128, generator=gen)
    scale = 1 / math.sqrt(128)
    qr, kr, lse, got, expected = _pass_and_reference(q, k, scale)
    assert torch.isfinite(got[:, 1]).all() and torch.isfinite(expected[:, 1]).all()
    _close(got[:, 1:], expected[:, 1:], _logit_slack(qr[..., 128:, :], kr, scale, lse[..., 128:]))


def test_a_block_whose_lse_float16_would_not_hold_is_scored_in_float32():
    """A row whose LSE passes 2^14 in log2 sends its query block's CTA to the float32 epilogue
    (float16 holds it, but no longer to a useful share of a logit of that size): that block's
    maxima are still its other rows', as the reference's, within the accumulator's slack alone;
    the other block takes float16 as before."""
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 1, 256, 128, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    k = (torch.randn(1, 1, 300, 128, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    scale = 1 / math.sqrt(128)
    qr, kr = e4m3_rounded(q), e4m3_rounded(k)
    _, lse = ref.logits_and_lse(qr, kr, scale)
    lse[..., 130] = 20000.0  # 28,854 in log2: block 1 runs in float32, its row 130 gives nothing
    got = mask_kernels.gpu_colmax_e4m3(q, k, scale, lse.reshape(1, -1), 128)[..., :300].float()
    expected = ref.maxprob_scores(qr, kr, lse, 128, scale).reshape(1, 2, -1)
    worst = torch.matmul(qr.abs(), kr.abs().transpose(-1, -2)).amax()
    _close(got[:, 1:], expected[:, 1:], (scale * ACCUMULATION_SLACK * worst).reshape(1, 1, 1))
    _close(got[:, :1], expected[:, :1], _logit_slack(qr, kr, scale, lse[..., :128]))


@pytest.mark.parametrize("shape", [(1, 2, 300, 400, 64), (2, 3, 1000, 777, 128), (1, 2, 5000, 5000, 128)])
@pytest.mark.parametrize("workspace_bytes", [1 << 30, 1])
def test_e4m3_prediction_keeps_the_keys_the_reference_ranks_highest(shape, workspace_bytes):
    """predict_mask(method="colmax", products="e4m3") on the GPU (heads in chunks or at once):
    each block keeps top-k keys of the CPU reference's scores on the same rounded inputs, up to
    the accumulator's slack; and lse="estimate" takes e4m3 products by default on Hopper."""
    batch, heads, q_len, kv_len, slice_m = shape
    gen = torch.Generator().manual_seed(11)
    q = (torch.randn(batch, heads, q_len, 128, generator=gen) * 2).to(torch.bfloat16)
    k = (torch.randn(batch, heads, kv_len, 128, generator=gen) * 2).to(torch.bfloat16)
    lse = estimate_lse(q, k, slice_m)
    got = predict_mask(q.to(DEVICE), k.to(DEVICE), slice_m, "colmax", lse=lse.to(DEVICE), products="e4m3",
                       density=0.1, workspace_bytes=workspace_bytes).validate()
    qr, kr = e4m3_rounded(q.float()), e4m3_rounded(k.float())
    scores = ref.maxprob_scores(qr, kr, lse, slice_m, 1 / math.sqrt(128), exact=True)  # [B, H, QB, S]
    top_k = max(1, round(0.1 * kv_len))
    kth = scores.topk(top_k, dim=-1).values[..., -1:]
    slack = _logit_slack(qr, kr, 1 / math.sqrt(128), lse).reshape(batch, heads, 1, 1)
    kept = got.to_dense().cpu()
    assert (kept.sum(-1) == top_k).all()
    floor = kth * torch.exp(-2 * slack) * (1 - PROB_RTOL) - 1e-6  # stored scores round toward zero
    assert (scores[kept] >= floor.expand_as(scores)[kept]).all()
    by_default = predict_mask(q.to(DEVICE), k.to(DEVICE), slice_m, "colmax", lse="estimate", density=0.1)
    estimated = predict_mask(q.to(DEVICE), k.to(DEVICE), slice_m, "colmax", lse=estimate_lse(
        q.to(DEVICE), k.to(DEVICE), slice_m), products="e4m3", density=0.1)
    assert torch.equal(by_default.indices, estimated.indices)


def test_e4m3_refusals_on_the_gpu():
    q = torch.randn(1, 2, 300, 64, device=DEVICE, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 300, device=DEVICE)
    with pytest.raises(ValueError, match="head dims"):
        predict_mask(q, q, 128, "colmax", lse=lse, density=0.1, products="e4m3")
    # head dim 64 has no e4m3 kernel: "auto" keeps the inputs' products
    auto = predict_mask(q, q, 128, "colmax", lse="estimate", density=0.1)
    plain = predict_mask(q, q, 128, "colmax", lse="estimate", density=0.1, products="input")
    assert torch.equal(auto.indices, plain.indices)
    q8 = torch.randn(1, 2, 300, 128, device=DEVICE).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="head_scale"):
        mask_kernels.gpu_scores("maxprob", q8, q8, 0.1, lse=torch.zeros(2, 300, device=DEVICE), group=128)
    with pytest.raises(ValueError, match="modes"):
        mask_kernels.gpu_scores("stats", q8, q8, 0.1, head_scale=torch.ones(2, device=DEVICE))
