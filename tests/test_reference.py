import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, dense_attention, reference_attention, relative_l2

from .strategies import dense_masks, mask_from


def _sdpa_with_slice_mask(q, k, v, dense, slice_m, scale):
    """torch's own masked SDPA, float64, with the slice map expanded to every query row."""
    q_len = q.shape[2]
    attn_mask = dense.repeat_interleave(slice_m, dim=2)[:, :, :q_len]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    return torch.nan_to_num(out, nan=0.0)  # SDPA gives NaN for rows with no key


@given(dense_masks(max_q=200, max_kv=200), st.sampled_from([16, 32]), st.booleans(), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_reference_matches_masked_sdpa(case, head_dim, custom_scale, seed):
    dense, slice_m, q_len = case
    batch, heads, _, kv_len = dense.shape
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64) for n in (q_len, kv_len, kv_len))
    scale = 0.3 if custom_scale else None
    out, lse = reference_attention(q, k, v, mask_from(dense, slice_m, q_len), scale=scale, dtype=torch.float64,
                                   rows_per_chunk=50)
    expected = _sdpa_with_slice_mask(q, k, v, dense, slice_m, scale)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    # LSE against a direct log-sum-exp; empty rows give -inf, never NaN.
    s = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(head_dim))
    s = s.masked_fill(~dense.repeat_interleave(slice_m, dim=2)[:, :, :q_len], -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_empty_rows_give_zero_and_minus_inf():
    dense = torch.zeros(1, 1, 2, 10, dtype=torch.bool)
    dense[0, 0, 1, 3] = True
    q, k, v = (torch.randn(1, 1, n, 8) for n in (100, 10, 10))
    out, lse = reference_attention(q, k, v, SliceMask.from_dense(dense, 64, 100))
    assert (out[:, :, :64] == 0).all() and torch.isinf(lse[:, :, :64]).all() and (lse[:, :, :64] < 0).all()
    torch.testing.assert_close(out[0, 0, 64:], v[0, 0, 3].expand(36, 8))


def test_nhd_layout_matches_hnd():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 90, 16, generator=gen) for _ in range(3))
    mask = SliceMask.from_dense(torch.rand(2, 3, 2, 90, generator=gen) < 0.5, 64, 90)
    out_hnd, lse_hnd = reference_attention(q, k, v, mask)
    out_nhd, lse_nhd = reference_attention(*(t.transpose(1, 2) for t in (q, k, v)), mask, layout="NHD")
    torch.testing.assert_close(out_nhd.transpose(1, 2), out_hnd)
    torch.testing.assert_close(lse_nhd, lse_hnd)


def test_full_mask_equals_dense_attention():
    q, k, v = (torch.randn(1, 2, 77, 16, dtype=torch.float64) for _ in range(3))
    out, _ = reference_attention(q, k, v, SliceMask.full(1, 2, 77, 77, 64), dtype=torch.float64)
    torch.testing.assert_close(out, dense_attention(q, k, v, dtype=torch.float64, rows_per_chunk=10))


def test_reference_rejects_mismatched_mask():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(ValueError, match=r"mask is for \(B, H, q_len, kv_len\)=\(1, 2, 64, 50\), inputs are \(1, 2, 64, 64\)"):
        reference_attention(q, q, q, SliceMask.full(1, 2, 64, 50, 64))


def test_relative_l2():
    ref = torch.tensor([3.0, 4.0])
    assert relative_l2(ref, ref) == 0.0
    assert relative_l2(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    for out in (torch.tensor([3.0, math.inf]), torch.tensor([math.nan, 4.0])):  # no error can be read
        assert math.isnan(relative_l2(out, ref))
    assert math.isnan(relative_l2(torch.tensor([math.inf, 0.0]), torch.zeros(2)))


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("budget", [1, 10_000])
def test_dense_attention_with_lse_in_head_groups(layout, budget):
    """Dense output and row LSE of the exact schedule's refresh call, any head grouping, with
    padded keys dropped (CPU tensors: the reference path)."""
    from fgcupy.attention import dense_attention_with_lse
    from fgcupy.oracle import exact_lse

    gen = torch.Generator().manual_seed(budget)
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen) for n in (150, 170, 170))
    key_valid = torch.ones(2, 170, dtype=torch.bool)
    key_valid[0, -30:] = False
    key_valid[1, :5] = False
    arranged = [x if layout == "HND" else x.transpose(1, 2) for x in (q, k, v)]
    out, lse = dense_attention_with_lse(*arranged, slice_m=64, key_valid=key_valid, layout=layout,
                                        index_budget=budget)
    out = out if layout == "HND" else out.transpose(1, 2)
    for b in range(2):
        keep = key_valid[b]
        expected = dense_attention(q[b : b + 1], k[b : b + 1, :, keep], v[b : b + 1, :, keep])
        assert relative_l2(out[b : b + 1], expected) < 1e-5
        torch.testing.assert_close(lse[b : b + 1], exact_lse(q[b : b + 1], k[b : b + 1, :, keep]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call", ["reference", "dense"])
@pytest.mark.parametrize("kwargs, error, message", [
    (dict(scale=math.nan), ValueError, r"scale must be a positive finite number"),
    (dict(scale="a"), ValueError, r"scale must be a positive finite number"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be one of"),
    (dict(dtype=torch.float8_e4m3fn), TypeError, r"dtype must be one of"),
    (dict(q_dtype=torch.complex64), TypeError, r"q must have one of the dtypes"),
    (dict(q_dtype=torch.int64), TypeError, r"q must have one of the dtypes"),
    (dict(v_dtype=torch.float64), TypeError, r"q, k and v must share one dtype"),
])
def test_the_references_refuse_what_the_kernels_refuse(call, kwargs, error, message):
    """Complex inputs would lose their imaginary parts, integers and float8 are no attention's."""
    q, kwargs = torch.randn(1, 2, 64, 16), dict(kwargs)
    qq, v = q.to(kwargs.pop("q_dtype", q.dtype)), q.to(kwargs.pop("v_dtype", q.dtype))
    mask = SliceMask.full(1, 2, 64, 64, 32)
    with pytest.raises(error, match=message):
        if call == "reference":
            reference_attention(qq, qq, v, mask, **kwargs)
        else:
            dense_attention(qq, qq, v, **kwargs)


def test_relative_l2_counts_imaginary_parts():
    assert relative_l2(torch.tensor([1j]), torch.tensor([1 + 0j])) == pytest.approx(math.sqrt(2))
    assert relative_l2(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(math.sqrt(0.5))


def test_the_reference_names_a_mask_that_is_not_one():
    q = torch.randn(1, 2, 64, 16)
    with pytest.raises(TypeError, match=r"mask must be a fgcupy.SliceMask, got NoneType"):
        reference_attention(q, q, q, None)


def test_a_one_element_tensor_scale_is_taken_as_its_number_by_every_entry_point():
    """Attention takes a tensor scale eagerly; prediction, recall, the oracle and the references
    take it the same way, and give what its float gives."""
    import fgcupy
    from fgcupy.lse_estimate import estimate_lse
    from fgcupy.oracle import Judge, exact_lse

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    number, tensor = 0.3, torch.tensor(0.3)
    mask = fgcupy.predict_mask(q, k, 64, "topk", density=0.25, scale=number)
    assert torch.equal(fgcupy.predict_mask(q, k, 64, "topk", density=0.25, scale=tensor).indices, mask.indices)
    out, lse = reference_attention(q, k, k, mask, scale=number)
    assert torch.equal(reference_attention(q, k, k, mask, scale=tensor)[0], out)
    assert torch.equal(dense_attention(q, k, k, scale=tensor), dense_attention(q, k, k, scale=number))
    assert torch.equal(fgcupy.mask_recall(q, k, lse, scale=tensor), fgcupy.mask_recall(q, k, lse, scale=number))
    assert torch.equal(exact_lse(q, k, tensor), exact_lse(q, k, number))
    assert Judge(q, k, k, 64, scale=tensor).scale == pytest.approx(number)
    assert torch.equal(estimate_lse(q, k, 64, scale=tensor), estimate_lse(q, k, 64, scale=number))


def test_a_tensor_scale_traces_through_the_dense_reference():
    q = torch.randn(1, 2, 64, 16)
    compiled = torch.compile(lambda q, s: dense_attention(q, q, q, scale=s), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, torch.tensor(0.2)), dense_attention(q, q, q, scale=0.2))


@pytest.mark.parametrize("attend", [lambda q, k, v: dense_attention(q, k, v),
                                    lambda q, k, v: reference_attention(q, k, v, SliceMask.full(1, 1, 4, 4, 4))])
def test_the_references_name_inputs_that_are_not_tensors_or_not_on_one_device(attend):
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor .* got ndarray"):
        attend(q.numpy(), q, q)
    with pytest.raises(ValueError, match="q, k and v must be on one device, got cpu, meta, cpu"):
        attend(q, q.to("meta"), q)


def test_passes_shrink_to_the_score_budget_and_give_the_same_result(monkeypatch):
    import fgcupy.reference as reference

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (200, 90, 90))
    mask = SliceMask.from_dense(torch.rand(2, 3, 4, 90, generator=gen) < 0.5, 64, 200)
    whole = reference_attention(q, k, v, mask), dense_attention(q, k, v)
    seen = []
    real = reference._rows_per_pass
    monkeypatch.setattr(reference, "SCORE_BYTES", 2 * 3 * 90 * 4 * 70 * reference._PASS_TEMPORARIES)  # 70 rows
    monkeypatch.setattr(reference, "_rows_per_pass", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    chunked = reference_attention(q, k, v, mask), dense_attention(q, k, v)
    assert seen == [64, 70]  # whole blocks of 64 for the masked reference, 70 rows for the dense one
    torch.testing.assert_close(chunked[0][0], whole[0][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[0][1], whole[0][1], rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked[1], whole[1], rtol=0, atol=1e-6)


def test_a_slice_far_larger_than_the_sequence():
    """One block of 2**22 queries over 3 real ones reads as smaller blocks do (its keep map spans
    the real rows only; it was expanded to the whole block, 335 MB here, before being cut)."""
    q, k, v = (torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(n)) for n in (3, 40, 40))
    huge = SliceMask.full(1, 2, 3, 40, 1 << 22)
    out, lse = reference_attention(q, k, v, huge)
    expected, expected_lse = reference_attention(q, k, v, SliceMask.full(1, 2, 3, 40, 4))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
