"""The reference selectors and scorers (fgcupy.mask_reference) against brute-force definitions."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import mask_reference as ref

from .mask_checks import is_prefix_of_ranking, masses, ranked, selection_cases, smallest_tau_set_ok, tau_rows_agree

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True), min_size=2, max_size=40))
@SETTINGS
def test_order_keys_follow_the_float_order(xs):
    values = torch.tensor(xs, dtype=torch.float32)
    keys = order_keys = ref.order_keys(values)
    assert order_keys.min() >= 0 and order_keys.max() < 2**32 - 1  # the top key is the band's
    for i in range(len(xs)):
        for j in range(len(xs)):
            a, b = float(values[i]), float(values[j])
            if math.isnan(a) or math.isnan(b):
                expected = (0 if math.isnan(a) else 1) - (0 if math.isnan(b) else 1)
            else:
                expected = (a > b) - (a < b)  # -0.0 == 0.0
            got = int(keys[i]) - int(keys[j])
            assert (got > 0) - (got < 0) == expected, (a, b)


def _band(case, rows):
    if case["local"] is None:
        return None
    return ref.band_mask(rows, case["values"].shape[1], case["slice_m"], case["local"])


def _expected_count(case, band, n_rule):
    kv_len = case["values"].shape[1]
    band_count = 0 if band is None else band.sum(1)
    opts = case["opts"]
    lo = torch.clamp(torch.as_tensor(band_count).expand(n_rule.shape).clamp_min(opts["min_keys"]), max=kv_len)
    hi = torch.maximum(torch.full_like(lo, min(opts.get("max_keys", kv_len), kv_len)), lo)
    return torch.minimum(torch.maximum(n_rule, lo), hi)


@given(selection_cases())
@SETTINGS
def test_selection_is_a_prefix_of_the_ranking_of_the_right_size(case):
    values, rows = case["values"], case["values"].shape[0]
    band = _band(case, rows)
    kept = ref.select(values, case["rule"], lse=case["lse"], band=band, **case["opts"])
    assert kept.shape == values.shape
    assert is_prefix_of_ranking(values, kept, band).all()
    if band is not None:
        assert kept[band].all(), "the band is always kept"
    sizes = kept.sum(1)
    kv_len = values.shape[1]
    if case["rule"] == "topk":
        n_rule = torch.full((rows,), case["opts"]["k"])
    elif case["rule"] == "threshold":
        thr = case["opts"]["threshold"]
        if case["lse"] is not None:
            cut = case["lse"] + torch.tensor(math.log(thr), dtype=torch.float32)
        else:
            cut = torch.full((rows,), thr, dtype=torch.float32)
        above = torch.zeros(rows, dtype=torch.int64)
        for r in range(rows):
            for i in range(kv_len):
                v = float(values[r, i])
                in_band = band is not None and bool(band[r, i])
                above[r] += int(in_band or (not math.isnan(v) and np.float32(v) >= np.float32(cut[r])))
        n_rule = above
    else:
        n_rule = sizes  # checked below through minimality
    assert torch.equal(sizes, _expected_count(case, band, n_rule))


@given(selection_cases().filter(lambda c: c["rule"] == "tau"))
@SETTINGS
def test_tau_keeps_the_smallest_set_reaching_tau(case):
    values = case["values"]
    opts = dict(case["opts"], min_keys=0)
    opts.pop("max_keys", None)
    kept = ref.select(values, "tau", lse=case["lse"], **opts)
    assert smallest_tau_set_ok(values, kept, opts["tau"], lse=case["lse"]).all()
    # Brute force: walk the ranking in float64 until the mass reaches tau.
    mass = masses(values, case["lse"])
    for r in range(values.shape[0]):
        order = ranked(values[r], [False] * values.shape[1])
        running, n = 0.0, 0
        target = opts["tau"] * float(mass[r].sum()) * (1 - ref.TAU_SLACK)
        for i in order:
            running += float(mass[r, i])
            n += 1
            if running >= target:
                break
        assert int(kept[r].sum()) == n


@given(st.integers(1, 3), st.integers(1, 70), st.integers(1, 90), st.sampled_from([1, 2, 4, 16]),
       st.integers(0, 2**31 - 1))
@SETTINGS
def test_maxprob_and_colmax_scores_are_group_maxima_of_softmax(heads, n_rows, kv_len, group, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(1, heads, n_rows, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, heads, kv_len, 16, generator=gen, dtype=torch.float64)
    probs = torch.softmax(rows @ k.transpose(-1, -2) * 0.3, dim=-1)
    lse = torch.logsumexp(rows @ k.transpose(-1, -2) * 0.3, dim=-1)
    got = ref.maxprob_scores(rows, k, lse, group, 0.3, exact=True)
    assert got.shape == (1, heads, -(-n_rows // group), kv_len)
    for g in range(got.shape[2]):
        expected = probs[:, :, g * group : (g + 1) * group].amax(2)
        assert torch.allclose(got[:, :, g].double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(ref.colmax_scores(rows, k, lse, group, 0.3, exact=True), got)
    # As the kernels store them: bfloat16 rounded toward zero (monotone, within 2^-7 below).
    stored = ref.maxprob_scores(rows, k, lse, group, 0.3)
    assert torch.equal(stored, ref.stored_probs(got)) and torch.equal(stored, stored.to(torch.bfloat16).float())
    assert torch.equal(ref.colmax_scores(rows, k, lse, group, 0.3), stored)
    assert ((got - stored >= 0) & (got - stored <= got * 2**-7)).all()
    # Rows whose LSE is not finite (no key in a sparse step) contribute nothing.
    lse[:, :, 0] = -math.inf
    assert torch.isfinite(ref.maxprob_scores(rows, k, lse, group, 0.3)).all()


@given(st.integers(1, 300), st.sampled_from([1, 3, 16, 128]), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_pool_queries_is_the_mean_of_each_run(seq, pool, seed):
    q = torch.randn(1, 2, seq, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    got = ref.pool_queries(q, pool)
    assert got.dtype == torch.float32 and got.shape == (1, 2, -(-seq // pool), 8)
    for p in range(got.shape[2]):
        assert torch.allclose(got[:, :, p], q[:, :, p * pool : (p + 1) * pool].double().mean(2).float(), atol=1e-6)


def test_band_mask_is_the_diagonal_neighbourhood():
    band = ref.band_mask(3, 40, 16, 4)
    assert band[0].nonzero().flatten().tolist() == list(range(0, 20))
    assert band[1].nonzero().flatten().tolist() == list(range(12, 36))
    assert band[2].nonzero().flatten().tolist() == list(range(28, 40))
    assert not ref.band_mask(3, 40, 16, None).any()


def test_select_union_is_the_union_of_sub_block_selections():
    values = torch.randn(1, 1, 5, 30, generator=torch.Generator().manual_seed(0))
    lse = torch.logsumexp(values, -1)
    union = ref.select_union(values, "topk", 2, lse=lse, k=3)
    per_row = ref.select(values, "topk", lse=lse, k=3)[0, 0]
    assert union.shape == (1, 1, 3, 30)
    assert torch.equal(union[0, 0, 0], per_row[0] | per_row[1])
    assert torch.equal(union[0, 0, 2], per_row[4])
    with_band = ref.select_union(values, "topk", 2, lse=lse, k=3, band=ref.band_mask(3, 30, 4, 1))
    assert with_band[0, 0, 1, 3:9].all()


def test_select_rejects_unknown_rules():
    with pytest.raises(ValueError, match=r"rule must be one of \('topk', 'tau', 'threshold'\), got 'best'"):
        ref.select(torch.zeros(1, 4), "best")


def test_tau_agreement_check_forgives_only_a_one_key_cut_at_the_target():
    values = torch.tensor([[3.0, 2.0, 1.5, 0.5]])  # probabilities: masses 3, 2, 1.5, 0.5 of 7
    first = [torch.tensor([[True] * n + [False] * (4 - n)]) for n in range(5)]
    at_two = 5.0 / 7.0 / (1 - ref.TAU_SLACK)  # the target is exactly the first two keys' mass
    assert tau_rows_agree(values, first[3], first[2], at_two).all()
    assert tau_rows_agree(values, first[2], first[2], 0.3).all()
    assert not tau_rows_agree(values, first[3], first[2], 0.6).all()  # 5/7 is far from 0.6
    assert not tau_rows_agree(values, first[4], first[2], at_two).all()  # two keys apart
    shuffled = torch.tensor([[True, False, True, False]])
    assert not tau_rows_agree(values, shuffled, first[2], at_two).all()  # not a prefix


def test_a_threshold_keeps_scores_equal_to_it_and_tau_keeps_one_key_of_a_massless_row():
    """Ties are real with stored bfloat16 probabilities; a row with no mass (a colmax row whose
    candidates are all masked out) keeps one key, not all."""
    from fgcupy.mask_reference import select

    assert int(select(torch.tensor([[0.5, 0.25, 0.25, 0.0]]), "threshold", threshold=0.25).sum()) == 3
    assert select(torch.zeros(2, 6), "tau", tau=0.9).sum(-1).tolist() == [1, 1]


def test_the_candidate_scoring_launch_reads_offsets_clamped_into_the_list(monkeypatch):
    """The list mode of the column-max kernels read each block's offsets as given: a corrupt
    candidate mask sent them past its index buffer. The launch is captured on the CPU."""
    import fgcupy.jit.launch
    from fgcupy import SliceMask, mask_kernels

    captured = {}
    monkeypatch.setattr(fgcupy.jit.launch, "_device_pointer", lambda where, value, devices: captured.setdefault(
        where.split(".")[-1], value).data_ptr())
    monkeypatch.setattr(mask_kernels, "launch", lambda spec, device, grid, params: None)
    q, k = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16), torch.zeros(1, 2, 200, 64, dtype=torch.bfloat16)
    corrupt = SliceMask(torch.tensor([[[-5, 10**6]], [[3, 7]]], dtype=torch.int32).view(1, 2, 2),
                        torch.arange(16, dtype=torch.int32), 128, 128, 200)
    out = torch.zeros(2, 1, mask_kernels.row_stride(200, 2), dtype=torch.bfloat16)
    mask_kernels.gpu_candidate_colmax(q, k, 0.125, torch.zeros(2, 128), corrupt, out, kernel="mma")
    offsets = captured["list_indptr"]
    assert offsets.min() >= 0 and offsets.max() <= 16 and offsets.flatten().tolist() == [0, 16, 3, 7]


def test_scoring_with_no_keys_launches_nothing():
    from fgcupy import mask_kernels

    assert mask_kernels._key_chunking(0, 10)[1] == 0
