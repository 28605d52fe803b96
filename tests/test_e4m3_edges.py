"""Edges of the e4m3 column-max products (fgcupy.e4m3, predict_mask's ``products``): tiny and
strided heads, empty head ranges, how "auto" resolves, the op's own checks, and the GPU-only
argument checks reached on the CPU with a stand-in device (no GPU needed)."""

import types
from unittest import mock

import pytest
import torch

from fgcupy import SliceMask, gpu_prediction, mask_kernels, predict_mask
from fgcupy.e4m3 import e4m3_rounded, head_scales, heads_as_e4m3, to_e4m3
from fgcupy.jit import runtime as jit_runtime
from fgcupy.jit.score_spec import E4M3, Sm90ScoreSpec, all_sm90_mask_specs
from fgcupy.mask_request import check_products, make_request
from fgcupy.predict_op import request_token

CUDA0 = torch.device("cuda:0")


def _fake_cuda_q(shape):
    """What check_products and uses_e4m3 read of q: its device and shape."""
    return types.SimpleNamespace(device=CUDA0, shape=shape)


# ---- fgcupy.e4m3 ----

def test_a_head_too_small_for_any_float32_power_of_two_rounds_to_zeros_not_nan():
    """A row norm below about 5e-37 would need a scale past 2^127: such a head keeps scale 1 (no
    infinite scale, whose products with its zeros would be NaN)."""
    x = torch.zeros(1, 2, 4, 16)
    x[0, 0, 1, 3] = 1e-38
    x[0, 1] = 1.0
    scales = head_scales(x)
    assert torch.isfinite(scales).all() and scales.tolist() == [[1.0, 32.0]]  # rows of 16 ones: 32^2 x 16 <= 2^15
    rounded = e4m3_rounded(x)
    assert not rounded.isnan().any()
    assert rounded[0, 0].eq(0).all() and rounded[0, 1].eq(1).all()


def test_strided_heads_come_out_contiguous():
    """q and k in the NHD layout reach the e4m3 copies as permuted views: the copies the kernel
    reads are contiguous all the same."""
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        nhd = (torch.randn(2, 40, 3, 16, generator=gen) * 9).to(dtype)
        x = nhd.transpose(1, 2)  # [B, H, S, D] view
        assert not x.is_contiguous()
        as_e4m3 = to_e4m3(x, head_scales(x))
        assert as_e4m3.is_contiguous() and as_e4m3.shape == x.shape
        assert torch.equal(as_e4m3.float(), to_e4m3(x.contiguous(), head_scales(x)).float())
        q8, k8, _ = heads_as_e4m3(x, x, 1, 4)  # across both batch entries
        assert q8.is_contiguous() and k8.is_contiguous() and q8.shape == (1, 4, 40, 16)
        q8, _, _ = heads_as_e4m3(x, x, 1, 2)  # within one batch entry: a view of it
        assert q8.is_contiguous()


@pytest.mark.parametrize("bh0", [0, 3, 6])
def test_an_empty_range_of_heads_gives_empty_e4m3_copies(bh0):
    q, k = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 50, 16)
    q8, k8, factor = heads_as_e4m3(q, k, bh0, 0)
    assert q8.shape == (1, 0, 40, 16) and k8.shape == (1, 0, 50, 16) and factor.shape == (0,)
    assert q8.dtype == k8.dtype == torch.float8_e4m3fn


# ---- predict_mask's products ----

def _requests_reaching_the_reference(**kwargs):
    """The requests predict_mask hands the CPU prediction."""
    seen = []
    real = gpu_prediction.predict_reference

    def spy(qh, kh, req, lse, candidates=()):
        seen.append(req)
        return real(qh, kh, req, lse, candidates)

    with mock.patch.object(gpu_prediction, "predict_reference", spy):
        predict_mask(**kwargs)
    return seen


def test_products_default_to_auto_only_for_the_estimated_column_max():
    """By default the estimated column max asks for "auto" (e4m3 where its kernel runs); a column
    max from a given LSE and the mean-query methods multiply the inputs."""
    gen = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 2, 300, 64, generator=gen), torch.randn(1, 2, 300, 64, generator=gen)
    lse = torch.zeros(1, 2, 300)
    base = dict(q=q, k=k, slice_m=128, density=0.1)
    assert [r.products for r in _requests_reaching_the_reference(**base, method="colmax", lse="estimate")] == ["auto"]
    assert [r.products for r in _requests_reaching_the_reference(**base, method="colmax", lse=lse)] == ["input"]
    assert [r.products for r in _requests_reaching_the_reference(**base, method="colmax", lse=lse,
                                                                 products="auto")] == ["input"]
    assert [r.products for r in _requests_reaching_the_reference(**base, method="topk")] == ["input"]
    assert [r.products for r in _requests_reaching_the_reference(**base, method="colmax", lse=lse,
                                                                 products="e4m3")] == ["e4m3"]


def test_an_estimated_lse_for_a_mean_query_method_is_refused_as_the_lse():
    """The default products never name themselves in a refusal the caller's lse causes."""
    q = torch.randn(1, 2, 300, 64)
    with pytest.raises(ValueError, match="lse applies to method='colmax'"):
        predict_mask(q, q, 128, "topk", density=0.1, lse="estimate")


def test_the_estimated_column_max_takes_candidates_with_the_default_products():
    """"auto" never refuses: candidates are scored with the inputs' products."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(1, 2, 300, 64, generator=gen), torch.randn(1, 2, 300, 64, generator=gen)
    old = predict_mask(q, k, 128, "topk", top_k=20)
    got = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1, candidates=old)
    same = predict_mask(q, k, 128, "colmax", lse="estimate", density=0.1, candidates=old, products="input")
    assert torch.equal(got.indptr, same.indptr) and torch.equal(got.indices, same.indices)


def test_the_op_called_directly_refuses_e4m3_products_with_candidates():
    q, k = torch.randn(1, 2, 256, 64), torch.randn(1, 2, 256, 64)
    lse = torch.zeros(1, 2, 256)
    token = request_token(make_request(64, 256, 128, "colmax", density=0.1, products="e4m3"))
    old = SliceMask.full(1, 2, 256, 256, 128)
    op = torch.ops.fgcupy.predict_mask
    with pytest.raises(ValueError, match="candidates"):
        op(q, k, lse, [old.indptr], [old.indices], token, 25, -1.0, 0.125, 1 << 30)
    assert op(q, k, lse, [], [], token, 25, -1.0, 0.125, 1 << 30).numel() > 0


def test_e4m3_products_on_a_gpu_need_hopper_and_head_dim_128():
    req = make_request(128, 300, 128, "colmax", rule="topk", top_k=30, products="e4m3")
    with mock.patch.object(jit_runtime, "is_hopper", return_value=True):
        check_products(req, _fake_cuda_q((1, 2, 300, 128)), ())
        with pytest.raises(ValueError, match=r"head dim 64 on cuda:0"):
            check_products(req, _fake_cuda_q((1, 2, 128, 64)), ())  # 128 queries: the dim is the last axis
    with mock.patch.object(jit_runtime, "is_hopper", return_value=False):
        with pytest.raises(ValueError, match=r"runs on Hopper \(sm_90\) GPUs"):
            check_products(req, _fake_cuda_q((1, 2, 300, 128)), ())
        auto = make_request(128, 300, 128, "colmax", rule="topk", top_k=30, products="auto")
        check_products(auto, _fake_cuda_q((1, 2, 300, 128)), ())  # "auto" falls back instead


# ---- gpu_prediction.uses_e4m3 ----

@pytest.mark.parametrize("products, head_dim, expected", [
    ("e4m3", 128, True), ("auto", 128, True), ("auto", 64, False), ("input", 128, False), ("input", 64, False),
])
def test_which_gpu_column_max_multiplies_e4m3(products, head_dim, expected):
    req = make_request(head_dim, 300, 128, "colmax", rule="topk", top_k=30, products=products)
    runs = mock.Mock(side_effect=lambda device, dim: device.type == "cuda" and dim == 128)
    with mock.patch.object(mask_kernels, "e4m3_runs", runs):
        assert gpu_prediction.uses_e4m3(req, _fake_cuda_q((1, 2, 300, head_dim))) is expected


# ---- mask_kernels: where the e4m3 pass runs and what it takes ----

def test_e4m3_runs_on_hopper_cuda_devices_at_head_dim_128():
    with mock.patch.object(jit_runtime, "is_hopper", return_value=True):
        assert mask_kernels.e4m3_runs(CUDA0, 128)
        assert not mask_kernels.e4m3_runs(CUDA0, 64)
        assert not mask_kernels.e4m3_runs(torch.device("cpu"), 128)
    with mock.patch.object(jit_runtime, "is_hopper", return_value=False):
        assert not mask_kernels.e4m3_runs(CUDA0, 128)


def test_e4m3_spec_takes_the_wgmma_max_probability_pass_alone():
    with mock.patch.object(jit_runtime, "is_hopper", return_value=True):
        for kernel in ("auto", "wgmma"):
            assert mask_kernels.e4m3_spec("maxprob", 128, 64, None, CUDA0, kernel) == Sm90ScoreSpec(E4M3, 128,
                                                                                                    "maxprob", 64)
        for mode, group, band, kernel in (("stats", 1, None, "auto"), ("maxprob", 64, (0, 128), "auto"),
                                          ("maxprob", 64, None, "mma"), ("maxprob", 256, None, "auto"),
                                          ("maxprob", 1, None, "auto"), ("band", 128, None, "auto"),
                                          ("listmax", 128, None, "auto")):
            with pytest.raises(ValueError, match="e4m3 rows and keys take modes"):
                mask_kernels.e4m3_spec(mode, 128, group, band, CUDA0, kernel)
        with pytest.raises(ValueError, match="e4m3 scoring runs on Hopper"):
            mask_kernels.e4m3_spec("maxprob", 64, 64, None, CUDA0)
    with pytest.raises(ValueError, match="e4m3 scoring runs on Hopper"):
        mask_kernels.e4m3_spec("maxprob", 128, 64, None, torch.device("cpu"))


def _e4m3_inputs(batch=2, heads=3, q_len=130, kv_len=200):
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(batch, heads, q_len, 128, generator=gen)
    k = torch.randn(batch, heads, kv_len, 128, generator=gen)
    q8, k8, factor = heads_as_e4m3(q, k, 0, batch * heads)
    lse = torch.zeros(batch * heads, q_len)
    return q8.view(batch, heads, q_len, 128), k8.view(batch, heads, kv_len, 128), factor, lse


def _on_a_stand_in_hopper():
    """gpu_scores up to its launch on CPU tensors: e4m3 "runs", the launch's parameters and the
    launch itself are recorded (they take CUDA pointers)."""
    params, launch = mock.Mock(return_value="params"), mock.Mock()
    patches = (mock.patch.object(mask_kernels, "e4m3_runs", return_value=True),
               mock.patch.object(mask_kernels, "_score_params", params),
               mock.patch.object(mask_kernels, "launch", launch))
    return patches, params, launch


def test_the_e4m3_pass_checks_its_keys_and_head_scales():
    q8, k8, factor, lse = _e4m3_inputs()
    patches, _, launch = _on_a_stand_in_hopper()
    with patches[0], patches[1], patches[2]:
        out = mask_kernels.gpu_scores("maxprob", q8, k8, 0.1, lse=lse, group=64, head_scale=factor)
        assert out.shape[:2] == (6, 3) and launch.call_count == 1
        bad = {
            "16-bit keys": (k8.float().to(torch.bfloat16), factor),
            "no head scales": (k8, None),
            "float64 head scales": (k8, factor.double()),
            "a head scale per head of one batch entry": (k8, factor[:3].contiguous()),
            "head scales on another device": (k8, torch.empty(6, device="meta")),
        }
        for what, (keys, head_scale) in bad.items():
            with pytest.raises(ValueError, match="e4m3 rows need e4m3 keys|needs head_scale"):
                mask_kernels.gpu_scores("maxprob", q8, keys, 0.1, lse=lse, group=64, head_scale=head_scale)
            assert launch.call_count == 1, what


def test_the_e4m3_pass_hands_the_kernel_contiguous_head_scales():
    q8, k8, factor, lse = _e4m3_inputs()
    strided = torch.stack([factor, factor], dim=1)[:, 0]
    assert not strided.is_contiguous()
    patches, params, _ = _on_a_stand_in_hopper()
    with patches[0], patches[1], patches[2]:
        mask_kernels.gpu_scores("maxprob", q8, k8, 0.1, lse=lse, group=64, head_scale=strided)
    given = params.call_args.kwargs["head_scale"]
    assert given.is_contiguous() and torch.equal(given, factor)
    # the kernel reads e4m3 pairs as 16-bit columns
    assert params.call_args.args[0].dtype == torch.int16 and params.call_args.args[0].shape == (2, 3, 130, 64)


@pytest.mark.parametrize("bh0, nbh, expected_heads", [(1, 4, 4), (2, None, 4), (0, None, 6)])
def test_the_e4m3_column_max_scores_its_chunk_of_heads(bh0, nbh, expected_heads):
    """gpu_colmax_e4m3 copies heads [bh0, bh0 + nbh) and scores that copy from its first head."""
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 3, 130, 128, generator=gen) * torch.arange(1, 7).view(2, 3, 1, 1)
    k = torch.randn(2, 3, 200, 128, generator=gen)
    lse = torch.zeros(expected_heads, 130)
    patches, params, launch = _on_a_stand_in_hopper()
    with patches[0], patches[1], patches[2]:
        out = mask_kernels.gpu_colmax_e4m3(q, k, 0.1, lse, 64, bh0=bh0, nbh=nbh)
    assert out.shape[:2] == (expected_heads, 3) and launch.call_count == 1
    rows, keys = params.call_args.args[:2]
    assert rows.shape == (1, expected_heads, 130, 64) and keys.shape == (1, expected_heads, 200, 64)
    kwargs = params.call_args.kwargs
    assert kwargs["bh0"] == 0 and kwargs["group"] == 64
    q8, k8, factor = heads_as_e4m3(q, k, bh0, expected_heads)
    assert torch.equal(kwargs["head_scale"], factor)
    assert torch.equal(rows.view(torch.float8_e4m3fn).float(), q8.float())
    assert torch.equal(keys.view(torch.float8_e4m3fn).float(), k8.float())


def test_sixteen_bit_rows_refuse_head_scales():
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, 2, 130, 128, generator=gen).to(torch.bfloat16)
    patches, _, launch = _on_a_stand_in_hopper()
    with patches[0], patches[1], patches[2]:
        with pytest.raises(ValueError, match="head_scale applies to float8_e4m3fn"):
            mask_kernels.gpu_scores("maxprob", q, q, 0.1, lse=torch.zeros(2, 130), group=64, kernel="mma",
                                    head_scale=torch.ones(2))
    assert launch.call_count == 0


# ---- the shipped kernels ----

def test_every_hopper_scoring_kernel_has_its_own_name():
    """Kernels are cached by name: the e4m3 ones must not share a 16-bit one's."""
    specs = all_sm90_mask_specs()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    e4m3 = [s.name for s in specs if s.dtype == E4M3]
    assert e4m3 and all("e4m3" in name for name in e4m3)



def test_products_auto_is_taken_wherever_predict_mask_takes_it():
    """A mask cache of a mean-query method takes products="auto" (the default, a no-op there) as
    predict_mask does; "e4m3" stays refused for it."""
    from fgcupy import MaskCache

    MaskCache(method="topk", density=0.1, products="auto")
    assert make_request(64, 300, 128, "topk", top_k=30, products="auto").products == "input"
    with pytest.raises(ValueError, match="applies to method='colmax'"):
        MaskCache(method="topk", density=0.1, products="e4m3")


def test_the_e4m3_column_max_refuses_before_converting():
    """Where no e4m3 pass runs (no Hopper GPU, another head dim), gpu_colmax_e4m3 says so before
    any copy is made."""
    q = torch.zeros(1, 2, 130, 128)
    convert = mock.Mock()
    with mock.patch.object(mask_kernels, "gpu_heads_as_e4m3", convert):
        with pytest.raises(ValueError, match="e4m3 scoring runs on Hopper"):
            mask_kernels.gpu_colmax_e4m3(q, q, 0.1, torch.zeros(2, 130), 128)
        with mock.patch.object(mask_kernels, "e4m3_runs", return_value=True):
            with pytest.raises(ValueError, match="groups"):
                mask_kernels.gpu_colmax_e4m3(q, q, 0.1, torch.zeros(2, 130), 96)
    assert convert.call_count == 0


def test_a_nan_padding_key_leaves_the_other_keys_products_as_they_were():
    """The diffusers integration shows padded keys as NaN: such a key scores nothing and the
    head's other keys keep their scale, so the e4m3 column max stays as near the oracle as on
    the clean keys (a NaN had set the whole head to scale 1 and a clamp of 16: 9x the oracle)."""
    from fgcupy import predict_mask
    from fgcupy.oracle import Judge

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 512, 64, generator=gen) for _ in range(3))
    q[..., :4] *= 40  # a few wide channels: a clamp at 16 would flatten them
    k[..., :4] *= 40
    scale = 1 / 320
    padded = k.clone()
    padded[0, 0, -1] = float("nan")
    judge = Judge(q, k, v, 128, scale=scale)
    ratios = [judge.ratio(predict_mask(q, keys, 128, "colmax", lse="estimate", density=0.1, products="e4m3",
                                       scale=scale))[1] for keys in (k, padded)]
    assert ratios[1] <= ratios[0] * 1.05 + 0.01, ratios
