"""Bad input gets a ValueError/TypeError naming expected and actual, before anything reaches
the GPU. These run without one: planning checks come before any CUDA call."""

import math

import numpy as np
import pytest
import torch

from fgcupy import SliceMask, SparseAttention, mask_kernels, reference_attention, scoring, sparse_attention
from fgcupy.attention import check_inputs, check_strides
from fgcupy.jit import AttentionSpec
from fgcupy.layout import query_key_views, to_bhsd
from fgcupy.mask_reference import dilate_keys

MASK = SliceMask.full(1, 2, 100, 80, 64)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(mask="nope"), TypeError, "mask must be a fgcupy.SliceMask, got str"),
        (dict(dtype=torch.float32), TypeError, r"dtype must be torch.bfloat16 or torch.float16, got torch.float32"),
        (dict(dtype=[torch.bfloat16]), TypeError, r"dtype must be torch.bfloat16 or torch.float16, got \[torch"),
        (dict(dtype=np.dtype("float16")), TypeError, r"dtype must be torch.bfloat16 or torch.float16, got float16"),
        (dict(head_dim=80), ValueError, r"head_dim 80 has no attention kernel; available: \(64, 96, 128, 256\)"),
        (dict(mask=SliceMask.full(1, 1, 64, 64, 16)), ValueError, r"mask.slice_m=16 has no compiled kernel"),
        (dict(key_tile=48), ValueError, r"key_tile must be one of \(32, 64, 128\), got 48"),
        (dict(schedule="random"), ValueError, r"schedule must be one of \('longest_first', 'index'\)"),
        (dict(spec=AttentionSpec("bfloat16", 64, 64), stages=3), ValueError,
         r"give either spec or tile parameters, not both \(spec=sparse_attn_fwd_bf16_d64_m64_n64_s2_w4, \{'stages': 3\}\)"),
    ],
)
def test_plan_errors(kwargs, error, message):
    args = dict(mask=MASK, head_dim=64, dtype=torch.bfloat16)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        SparseAttention().plan(**args)


@pytest.mark.parametrize("tiles, rows_per_warp", [
    (dict(key_tile=64, stages=3), 16),  # two m-tiles per warp would not fit 64 keys x 128 columns
    (dict(key_tile=32), 32),
    (dict(key_tile=64, rows_per_warp=16), 16),
])
def test_a_plan_given_some_tile_parameters_fills_the_rest_so_it_runs(tiles, rows_per_warp):
    mask = SliceMask.full(1, 2, 256, 256, 128)
    spec = SparseAttention().plan(mask, head_dim=128, **tiles).spec
    assert spec.rows_per_warp == rows_per_warp and spec.key_tile == tiles["key_tile"]
    with pytest.raises(ValueError, match="rows_per_warp=32 needs"):
        SparseAttention().plan(mask, head_dim=128, key_tile=64, rows_per_warp=32)


def test_run_before_plan():
    x = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"run called before plan"):
        SparseAttention().run(x, x, x)


def _qkv(q_len=100, kv_len=80, d=64, dtype=torch.bfloat16, heads=2):
    return (torch.zeros(1, heads, q_len, d, dtype=dtype), torch.zeros(1, heads, kv_len, d, dtype=dtype),
            torch.zeros(1, heads, kv_len, d, dtype=dtype))


SPEC = AttentionSpec("bfloat16", 64, 64, 64, 2)


@pytest.mark.parametrize(
    "inputs, error, message",
    [
        (_qkv(dtype=torch.float16), TypeError, r"q has dtype torch.float16, the plan expects torch.bfloat16"),
        (_qkv(d=128), ValueError, r"q has head dim 128, the plan was made for 64"),
        (_qkv(q_len=99), ValueError, r"q has \[B, H, S, D\] shape \(1, 2, 99, 64\), the mask expects \(1, 2, 100, 64\)"),
        (_qkv(kv_len=81), ValueError, r"k has \[B, H, S, D\] shape \(1, 2, 81, 64\), the mask expects \(1, 2, 80, 64\)"),
        (_qkv(heads=3), ValueError, r"q has \[B, H, S, D\] shape \(1, 3, 100, 64\)"),
        (_qkv(dtype=torch.float32), TypeError, r"q has dtype torch.float32, the plan expects torch.bfloat16"),
    ],
)
def test_input_checks(inputs, error, message):
    with pytest.raises(error, match=message):
        check_inputs(*inputs, MASK, SPEC)


def test_strides_checked_before_launch():
    q, _, _ = _qkv()
    with pytest.raises(ValueError, match=r"q must be contiguous along the head dim"):
        check_strides(q.transpose(2, 3).contiguous().transpose(2, 3), "q")
    with pytest.raises(ValueError, match=r"q rows must start on 16-byte boundaries"):
        check_strides(torch.zeros(1, 2, 100, 68, dtype=torch.bfloat16)[..., :64], "q")


def test_one_shot_rejects_bad_layout_and_types():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"layout must be one of \('HND', 'NHD'\)"):
        sparse_attention(q, k, v, MASK, layout="BSHD")
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor or a cupy.ndarray, got list"):
        sparse_attention([1, 2], k, v, MASK)
    with pytest.raises(TypeError, match=r"mask must be a fgcupy.SliceMask, got str"):
        sparse_attention(q, k, v, "mask")
    with pytest.raises(TypeError, match=r"q must have one of the dtypes .*, got torch.int32"):
        sparse_attention(*(t.to(torch.int32) for t in (q, k, v)), MASK)


def test_cpu_plans_and_one_shot_calls_run_the_reference():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 64, generator=gen) for n in (100, 80, 80))
    expected, lse = reference_attention(q, k, v, MASK)
    torch.testing.assert_close(sparse_attention(q, k, v, MASK), expected)
    attn = SparseAttention().plan(MASK, head_dim=64, dtype=torch.bfloat16)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    out, got_lse = attn.run(qb, kb, vb, return_lse=True)
    ref_b, ref_lse = reference_attention(qb, kb, vb, MASK)
    torch.testing.assert_close(out, ref_b.bfloat16())
    torch.testing.assert_close(got_lse, ref_lse)


def test_numpy_ints_are_ints_and_a_spec_must_be_a_spec():
    import numpy as np

    assert AttentionSpec("bfloat16", np.int64(64), np.int64(64)).head_dim == 64
    with pytest.raises(TypeError, match="spec must be one of AttentionSpec, Sm90AttentionSpec, Sm90WsAttentionSpec; got str"):
        SparseAttention().plan(MASK, head_dim=64, spec="abc")
    with pytest.raises(ValueError, match="key_tile must be one of"):
        AttentionSpec("bfloat16", 64, 64, 64.0)


def test_mask_algebra_refuses_what_is_not_a_mask():
    from fgcupy.mask_algebra import drop_keys, restrict_keys, slice_rows

    with pytest.raises(TypeError, match="mask must be a fgcupy.SliceMask, got list"):
        drop_keys([], torch.ones(1, 80, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_valid must be a bool torch.Tensor"):
        drop_keys(MASK, [[True] * 80])
    with pytest.raises(ValueError, match="start must be a non-negative int, got 10.0"):
        restrict_keys(MASK, 10.0, 20)
    with pytest.raises(ValueError, match="first_block must be a non-negative int"):
        slice_rows(MASK, -1, 10)
    short = SliceMask.full(1, 1, 300, 10, 128)
    for first, q_len in ((2, 128), (1, 300)):
        with pytest.raises(ValueError, match="reach past the mask's q_len=300"):
            slice_rows(short, first, q_len)
    assert slice_rows(short, 2, 44).q_len == 44


def test_dilation_kernel_refuses_rows_it_cannot_read():
    rows = dict(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.bfloat16 of one shape .* got shape \\(2, 16\\), torch.float32"):
        mask_kernels.gpu_dilate(torch.zeros(2, 16), 1, 16)
    with pytest.raises(ValueError, match=f"multiple of {mask_kernels.DILATE_RUN}"):
        mask_kernels.gpu_dilate(torch.zeros(2, 24, **rows), 1, 24)
    with pytest.raises(ValueError, match="radius"):
        mask_kernels.gpu_dilate(torch.zeros(2, 16, **rows), -1, 16)
    with pytest.raises(ValueError, match="kv_len"):
        mask_kernels.gpu_dilate(torch.zeros(2, 16, **rows), 1, 17)


def test_dilation_past_the_kernel_radius_runs_the_reference():
    radius = mask_kernels.DILATE_MAX_RADIUS + 1
    scores = torch.rand(3, 200).to(torch.bfloat16)
    got = mask_kernels.gpu_dilate(scores, radius, 150)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:, :150], dilate_keys(scores[:, :150], radius))


def test_selection_refuses_score_rows_it_cannot_rank():
    """float16 rows hold logits (an LSE is needed), bfloat16 rows max-probability scores (none)."""
    req = scoring.make_request(64, 64, 64, "topk", top_k=3)
    with pytest.raises(TypeError, match=r"bfloat16 probabilities \(no lse\); got torch.bfloat16 with lse"):
        mask_kernels.gpu_select(torch.zeros(1, 2, 64, dtype=torch.bfloat16), 64, req, lse=torch.zeros(1, 2))
    with pytest.raises(TypeError, match="got torch.float16 without lse"):
        mask_kernels.gpu_select(torch.zeros(1, 2, 64, dtype=torch.float16), 64, req)
    with pytest.raises(TypeError, match="got torch.float64 without lse"):
        mask_kernels.gpu_select(torch.zeros(1, 2, 64, dtype=torch.float64), 64, req)


def test_a_plan_made_under_inference_mode_plans_again_outside_it():
    keys = torch.arange(32, dtype=torch.int32).expand(1, 2, 2, 32)
    with torch.inference_mode():
        attn = SparseAttention().plan(SliceMask.from_topk(keys.contiguous(), 64, 128, 128), head_dim=64)
    other = SliceMask.from_topk((keys + 64).contiguous(), 64, 128, 128)
    buffers = attn.mask.indptr.data_ptr(), attn.mask.indices.data_ptr()
    attn.plan(other, head_dim=64)  # same shape of offsets: the same buffers, refilled
    assert (attn.mask.indptr.data_ptr(), attn.mask.indices.data_ptr()) == buffers
    q, k, v = (torch.randn(1, 2, 128, 64, dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        torch.testing.assert_close(attn.run(q, k, v).float(), reference_attention(q, k, v, other)[0].float(),
                                   rtol=2e-2, atol=2e-2)


def test_masks_compare_by_identity():
    a, b = SliceMask.full(1, 2, 128, 128, 64), SliceMask.full(1, 2, 128, 128, 64)
    assert a == a and a != b and len({a, b}) == 2


def test_a_launch_order_the_kernel_cannot_read_is_refused():
    from fgcupy.attention_kernel import check_order

    check_order(torch.arange(8, dtype=torch.int32), 8, torch.device("cpu"))
    for bad in (torch.arange(8), torch.arange(7, dtype=torch.int32), torch.arange(16, dtype=torch.int32)[::2], None):
        with pytest.raises(ValueError, match="order must be a contiguous int32 tensor of 8 items"):
            check_order(bad, 8, torch.device("cpu"))


def test_the_cpu_op_refuses_a_launch_order_the_gpu_op_refuses():
    """A graph or a direct call reaches the op unchecked: the CPU reference ignores the order, but
    the same call on a GPU would fail, so it fails here too."""
    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    mask = SliceMask.full(1, 2, 100, 100, 64)
    op = torch.ops.fgcupy.sparse_attention_
    op(q, k, v, torch.empty_like(q), None, mask.indptr, mask.indices, torch.arange(4, dtype=torch.int32), 64, 0.125, "")
    with pytest.raises(ValueError, match="order must be a contiguous int32 tensor of 4 items"):
        op(q, k, v, torch.empty_like(q), None, mask.indptr, mask.indices, torch.zeros(3, dtype=torch.int32), 64, 0.125, "")


def test_queued_timing_without_warm_up_needs_the_host_time():
    """Its lead would cover a millisecond of host work, and the rest would land between the events."""
    from fgcupy.timing import cuda_time_ms

    with pytest.raises(ValueError, match="needs host_ms"):
        cuda_time_ms(lambda: None, warmup=0, reps=1, queued=True)


def test_benchmark_kernel_tokens_take_every_field_of_their_family_and_no_other():
    from bench.report_attention import parse_tile

    assert parse_tile("sm90-m128n64s2pv1c2", 128).name == "sparse_attn_fwd_sm90_bf16_d128_m128_n64_s2_pv1_c2"
    assert parse_tile("m128n32s3w4", 128).name == "sparse_attn_fwd_bf16_d128_m128_n32_s3_w4"
    for token in ("sm90-m128n64s2w4", "m128n64s2pv1c2", "ws-m128n128s2"):
        with pytest.raises(ValueError, match="cannot parse kernel"):
            parse_tile(token, 128)


@pytest.mark.parametrize("scale", [-1.0, 0.0, math.nan, "x"])
def test_diagonals_and_the_judge_refuse_a_scale_attention_refuses(scale):
    from fgcupy import find_diagonals
    from fgcupy.oracle import Judge

    q = torch.randn(1, 1, 256, 16)
    with pytest.raises((ValueError, TypeError), match="scale"):
        find_diagonals(q, q, scale=scale)
    with pytest.raises((ValueError, TypeError), match="scale"):
        Judge(q, q, q, 64, scale=scale)


def test_calibrate_with_an_lse_refuses_per_block():
    from fgcupy.calibration import calibrate

    q = torch.randn(1, 1, 256, 16)
    with pytest.raises(ValueError, match="per_block sets the sampled queries"):
        calibrate(q, q, torch.zeros(1, 1, 256), 64, per_block=4, density=0.2)


def test_a_three_dimensional_key_is_named():
    from fgcupy import predict_mask

    with pytest.raises(ValueError, match="k must be a 4-D tensor"):
        predict_mask(torch.randn(1, 1, 256, 16), torch.randn(1, 256, 16), 64, density=0.2)


def test_dense_attention_with_lse_refuses_an_index_budget_below_one():
    from fgcupy.attention import dense_attention_with_lse

    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="index_budget must be a positive int, got 0"):
        dense_attention_with_lse(q, q, q, index_budget=0)


def test_from_topk_names_a_query_block_count_that_does_not_fit_q_len():
    with pytest.raises(ValueError, match="top-k indices have 5 query blocks .* needs 12"):
        SliceMask.from_topk(torch.zeros(1, 2, 5, 4, dtype=torch.int32), 128, 1536, 1536)


def test_relative_l2_names_the_tuple_reference_attention_returns():
    q = torch.randn(1, 1, 8, 4)
    with pytest.raises(TypeError, match=r"reference_attention returns \(out, lse\)"):
        from fgcupy import relative_l2
        relative_l2(q, reference_attention(q, q, q, SliceMask.full(1, 1, 8, 8, 4)))



def test_counts_take_numpy_ints_and_refuse_bools():
    """Counts checked through mask.positive_int: a numpy integer (what a config file or a numpy
    loop gives) counts, a bool does not."""
    import numpy as np

    from fgcupy.distributed import check_options
    from fgcupy.head_families import family_qkv, family_shape
    from fgcupy.sp_handshake import shard_ranges

    assert shard_ranges(np.int64(10), np.int32(3)) == [range(0, 4), range(4, 7), range(7, 10)]
    check_options(head_groups=np.int64(2))
    q, _, _ = family_qkv(family_shape("wan14b-480p", grid=(1, 4, 8)), "window2d", heads=np.int64(2))
    assert q.shape[1] == 2
    for call in (lambda: shard_ranges(10, True), lambda: check_options(head_groups=True),
                 lambda: family_qkv(family_shape("wan14b-480p", grid=(1, 4, 8)), "window2d", heads=False)):
        with pytest.raises(ValueError, match="must be a positive int"):
            call()


def test_the_sequence_parallel_header_takes_a_tensor_scale_as_its_number():
    """Every rank hears the scale through the header: a one-element tensor travels as its float."""
    from fgcupy.sp_handshake import _scale_code, _scale_of

    assert _scale_code(torch.tensor(0.1)) == _scale_code(torch.tensor(0.1).item())
    assert _scale_of(_scale_code(torch.tensor(0.25))) == 0.25
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        _scale_code(torch.tensor(-1.0))


def test_cuda_time_ms_times_the_kernel_a_first_call_started_compiling_not_its_stand_in(monkeypatch):
    """fn's own first call may start a Hopper compile and run the stand-in meanwhile: the
    compile is waited for and loaded before the timed calls. Events and the GPU are mocked."""
    import threading
    import time

    from fgcupy import timing
    from fgcupy.jit import runtime

    class Event:
        def __init__(self, **options):
            self.at = 0.0

        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.at - self.at) * 1e3

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    ran = []

    def fn():
        if not ran:  # the first call starts the real kernel's compile on a thread
            runtime._start(threading.Thread(target=time.sleep, args=(0.3,), daemon=True), ("spec", 0))
        ran.append("stand-in" if any(t.is_alive() for t in runtime._threads) else "kernel")

    timing.cuda_time_ms(fn, warmup=2, reps=5)
    assert ran[-5:] == ["kernel"] * 5


# ---------------------------------------------------------------------------------------------
# plans, overlaps, devices, scales and layouts that must be named
# ---------------------------------------------------------------------------------------------
def _random_qkv(q_len=128, kv_len=128, d=64, heads=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, d, generator=gen) for n in (q_len, kv_len, kv_len))


def test_plan_refuses_a_spec_made_for_another_slice_size():
    """A kernel compiled for 128-query slices would read a 64-query-slice mask wrongly."""
    mask = SliceMask.full(1, 2, 128, 128, 64)
    with pytest.raises(ValueError, match=r"spec sparse_attn_fwd_bf16_d64_m128\S* is for .* the plan asks for"):
        SparseAttention().plan(mask, head_dim=64, spec=AttentionSpec("bfloat16", 64, 128))


def test_replanning_a_mask_with_fewer_kept_keys_takes_its_own_buffers():
    """Same [B, H, QB + 1] offsets, another capacity: the plan must not copy into the old buffers."""
    q, k, v = (t.bfloat16() for t in _random_qkv())
    attn = SparseAttention().plan(SliceMask.full(1, 2, 128, 128, 64), head_dim=64)
    topk = torch.tensor([[[[3, 70, 100], [0, 1, 127]], [[5, 6, 7], [64, 65, 66]]]])
    sparse = SliceMask.from_topk(topk, 64, 128, 128)
    attn.plan(sparse, head_dim=64)
    assert attn.mask.capacity == sparse.capacity == 12
    torch.testing.assert_close(attn.run(q, k, v), reference_attention(q, k, v, sparse)[0].bfloat16())


def test_dense_attention_head_groups_count_every_batch_against_the_index_budget(monkeypatch):
    """Each group's full mask (batch x blocks x keys x heads slices) stays within index_budget."""
    import fgcupy.attention as attention

    seen = []
    real = attention.sparse_attention

    def spy(q, k, v, mask, **kwargs):
        seen.append((q.shape[1], mask.capacity))
        return real(q, k, v, mask, **kwargs)

    monkeypatch.setattr(attention, "sparse_attention", spy)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=gen) for _ in range(3))
    attention.dense_attention_with_lse(q, k, v, slice_m=64, index_budget=256)  # 128 slices a head
    assert seen == [(2, 256), (2, 256)]


def test_predict_mask_on_meta_tensors_gives_a_top_k_masks_shape_and_refuses_the_rest():
    from fgcupy import predict_mask

    q, k = (torch.empty(1, 2, n, 64, dtype=torch.bfloat16, device="meta") for n in (300, 200))
    mask = predict_mask(q, k, 64, density=0.2)
    assert mask.indices.device.type == "meta" and tuple(mask.indptr.shape) == (1, 2, 6)
    assert mask.indices.numel() == 1 * 2 * 5 * 40  # 0.2 of 200 keys in each of 5 blocks
    with pytest.raises(ValueError, match="meta tensors: only a top-k mask's size follows from the shapes"):
        predict_mask(q, k, 64, "tau", tau=0.9)


def test_inputs_on_another_device_than_the_mask_are_named():
    mask = SliceMask.full(1, 2, 100, 80, 64)
    q, k, v = (torch.empty(1, 2, n, 64, dtype=torch.bfloat16, device="meta") for n in (100, 80, 80))
    with pytest.raises(ValueError, match=r"q is on meta, the mask is on cpu"):
        check_inputs(q, k, v, mask, AttentionSpec("bfloat16", 64, 64, 64, 2))


def test_out_and_lse_right_after_the_inputs_in_one_buffer_are_taken():
    """Tensors that touch end to end share no byte: nothing overlaps."""
    size = 1 * 2 * 128 * 64
    buffer = torch.randn(4 * size + 2 * 128, generator=torch.Generator().manual_seed(2))
    q, k, v, out = (buffer[i * size : (i + 1) * size].view(1, 2, 128, 64) for i in range(4))
    lse = buffer[4 * size :].view(1, 2, 128)
    mask = SliceMask.full(1, 2, 128, 128, 64)
    expected, expected_lse = reference_attention(q.clone(), k.clone(), v.clone(), mask)
    got, got_lse = sparse_attention(q, k, v, mask, out=out, lse=lse)
    assert got is out and got_lse is lse
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


def test_out_over_q_with_other_strides_is_not_taken_as_in_place():
    """out at q's address but transposed writes q's elements other blocks still read."""
    q, k, v = _random_qkv(q_len=64, kv_len=64, d=64, heads=1)
    mask = SliceMask.full(1, 1, 64, 64, 64)
    with pytest.raises(ValueError, match="out overlaps q"):
        sparse_attention(q, k, v, mask, out=q.transpose(2, 3))


def test_a_tensor_scale_of_several_elements_is_refused_as_a_scale():
    q, k, v = _random_qkv()
    mask = SliceMask.full(1, 2, 128, 128, 64)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        sparse_attention(q, k, v, mask, scale=torch.tensor([0.125, 0.25]))


def test_query_key_views_names_a_head_dim_mismatch():
    with pytest.raises(ValueError, match=r"q and k must agree on B, H and D"):
        query_key_views(torch.zeros(1, 2, 8, 64), torch.zeros(1, 2, 8, 32))


def test_query_key_views_names_a_dtype_mismatch():
    with pytest.raises(TypeError, match=r"k has dtype torch.float16, q has torch.float32"):
        query_key_views(torch.zeros(1, 2, 8, 64), torch.zeros(1, 2, 8, 64, dtype=torch.float16))


def test_to_bhsd_refuses_a_five_dimensional_tensor():
    for layout in ("HND", "NHD"):
        with pytest.raises(ValueError, match=r"q must be a 4-D tensor"):
            to_bhsd(torch.zeros(1, 2, 3, 4, 5), layout, "q")


def test_cpu_attention_refuses_dtypes_the_reference_does_not_compute_in():
    """float8 (e8m0 holds no sign or mantissa) would come back in its own dtype, silently coarse."""
    q = torch.randn(1, 2, 100, 16).to(torch.float8_e4m3fn)
    k = torch.randn(1, 2, 80, 16).to(torch.float8_e4m3fn)
    with pytest.raises(TypeError, match=r"q must have one of the dtypes .*got torch.float8_e4m3fn"):
        sparse_attention(q, k, k, MASK)


def test_misleading_arguments_are_named():
    import fgcupy

    q = torch.randn(1, 2, 100, 16)
    with pytest.raises(TypeError, match="extra must be a fgcupy.SliceMask, got str"):
        fgcupy.union_keys(MASK, (0,), "x")
    with pytest.raises(TypeError, match=r"use mask.to\(tensor.device\)"):
        MASK.to(q)
    with pytest.raises(ValueError, match="scale is a meta tensor"):
        sparse_attention(q, q[:, :, :80], q[:, :, :80], MASK, scale=torch.tensor(0.5, device="meta"))


def test_row_lengths_clamp_offsets_as_the_kernels_do():
    """Offsets outside the list read as the kernels read them: an empty or clamped row, never a
    negative count."""
    mask = SliceMask(torch.tensor([[[-2**31 + 5, 2**31 - 1]]], dtype=torch.int32), torch.arange(3, dtype=torch.int32),
                     4, 4, 8)
    assert mask.row_lengths().tolist() == [[[3]]]
    backwards = SliceMask(torch.tensor([[[2, 1]]], dtype=torch.int32), torch.arange(3, dtype=torch.int32), 4, 4, 8)
    assert backwards.row_lengths().tolist() == [[[0]]]
