"""MaskCache: the dense / refresh / reuse schedule, compact storage round trips, shape errors."""

import math
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import MaskCache, SliceMask, mask_drift, mask_recall, predict_mask

from .strategies import dense_masks


def _qk(seq=300, kv=260, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, seq, 16, generator=gen), torch.randn(1, 2, kv, 16, generator=gen)


@given(st.integers(0, 5), st.integers(1, 6), st.integers(0, 40))
@settings(max_examples=60, deadline=None)
def test_every_r_schedule(warmup, every, step):
    cache = MaskCache(warmup=warmup, refresh_every=every)
    # The layer's mask is from the schedule's last refresh before this step, as in a run.
    last = step - 1 - max(0, step - 1 - warmup) % every if step - 1 >= warmup else 0
    cache.put("layer", SliceMask.full(1, 1, 64, 64, 64), last)
    action = cache.action(step, "layer")
    if step < warmup:
        assert action == "dense"
    elif (step - warmup) % every == 0:
        assert action == "refresh"
    else:
        assert action == "reuse"
    # A layer with nothing cached refreshes on any non-dense step.
    assert cache.action(step, "other") == ("dense" if step < warmup else "refresh")


@given(st.integers(0, 5), st.integers(1, 40), st.integers(0, 200))
@settings(max_examples=80, deadline=None)
def test_ramp_adds_the_powers_of_two_below_the_interval(warmup, every, step):
    ramped, plain = MaskCache(warmup=warmup, refresh_every=every, ramp=True), MaskCache(warmup=warmup, refresh_every=every)
    sparse_step = step - warmup
    early = 0 < sparse_step < every and sparse_step in {2**i for i in range(8)}
    expected = "refresh" if early else plain.action(step)
    assert ramped.action(step) == expected


def test_ramp_schedule():
    cache = MaskCache(warmup=1, refresh_every=16, ramp=True)
    assert [s for s in range(60) if cache.action(s) == "refresh"] == [1, 2, 3, 5, 9, 17, 33, 49]
    assert "on steps [2, 3, 5, 9] (ramp)" in cache.describe()
    assert "ramp" not in MaskCache(refresh_every=1, ramp=True).describe()
    assert "on steps [1, 2, 4" in MaskCache(refresh_every=10**12, ramp=True).describe()  # no walk to 10**12
    with pytest.raises(ValueError, match=r"ramp spaces the refreshes of refresh_every"):
        MaskCache(refresh_steps=[3], ramp=True)
    with pytest.raises(TypeError, match=r"ramp must be a bool"):
        MaskCache(refresh_every=4, ramp=1)


def test_explicit_refresh_steps():
    cache = MaskCache(warmup=2, refresh_steps=[2, 3, 10])
    assert [cache.action(s) for s in range(12)] == (
        ["dense"] * 2 + ["refresh", "refresh"] + ["reuse"] * 6 + ["refresh", "reuse"])
    with pytest.raises(ValueError, match=r"refresh_steps \[1, 4\] must be steps after the warm-up \(>= warmup=2\)"):
        MaskCache(warmup=2, refresh_steps=[4, 1])
    with pytest.raises(ValueError, match=r"refresh_every must be a positive int"):
        MaskCache(refresh_every=0)
    with pytest.raises(ValueError, match=r"refresh_every and refresh_steps both say when to refresh"):
        MaskCache(refresh_every=3, refresh_steps=[10])
    with pytest.raises(ValueError, match=r"storage must be one of \('auto', 'index', 'bits'\), got 'zip'"):
        MaskCache(storage="zip")


def test_mask_for_predicts_on_refresh_and_reuses_in_between():
    q, k = _qk()
    cache = MaskCache(warmup=1, refresh_every=3, method="topk", slice_m=64, density=0.2)
    seen = [cache.mask_for("attn.0", step, q, k) for step in range(7)]
    assert seen[0] is None
    assert (cache.predictions, cache.reuses) == (2, 4)  # refresh at 1 and 4
    expected = predict_mask(q, k, 64, "topk", density=0.2).to_dense()
    for mask in seen[1:]:
        assert torch.equal(mask.to_dense(), expected)
    # The step's own options win over the cache's.
    fresh = cache.mask_for("attn.1", 1, q, k, density=0.5)
    assert fresh.density() == pytest.approx(0.5, abs=0.01)


@given(dense_masks(max_kv=200), st.sampled_from(["index", "bits", "auto"]), st.integers(0, 300))
@settings(max_examples=40, deadline=None)
def test_storage_round_trips(case, storage, spare):
    """The keys, and the capacity: a mask with room to spare (a prediction with max_keys) comes
    back with the same buffer size, so a plan sized to it sees the same shapes on reuse steps."""
    dense, slice_m, q_len = case
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    mask = SliceMask.from_dense(dense, slice_m, q_len, capacity=mask.capacity + spare)
    cache = MaskCache(storage=storage)
    cache.put(0, mask, step=3)
    back = cache.get(0).validate()
    assert torch.equal(back.to_dense(), dense)
    assert back.indices.dtype == torch.int32 and (back.slice_m, back.q_len, back.kv_len) == (slice_m, q_len, dense.shape[-1])
    assert back.capacity == mask.capacity


def test_storage_is_compact():
    dense = torch.rand(1, 4, 8, 1000, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = SliceMask.from_dense(dense, 64, 500)
    int32_bytes = mask.memory_bytes()
    auto = MaskCache()
    auto.put("half", mask)
    assert auto.memory_bytes() == 4 * 8 * 4 * 32 + 4 * 4 * 9  # bits win at density 0.5: 32 words a row, and offsets
    sparse = SliceMask.from_dense(torch.rand(1, 4, 8, 1000) < 0.01, 64, 500)
    auto.put("sparse", sparse)
    index = MaskCache(storage="index")
    index.put("sparse", sparse)
    assert index.memory_bytes() < sparse.memory_bytes()  # int16 indices for kv_len <= 32768
    assert auto.memory_bytes() < int32_bytes + sparse.memory_bytes()
    text = auto.describe()
    assert "2 layers" in text and "half" in text and "bits uint8" in text and "index int16" in text


def test_shape_mismatch_names_both_shapes():
    q, k = _qk()
    cache = MaskCache(refresh_every=10, method="tau", slice_m=64, tau=0.8)
    cache.mask_for("l", 0, q, k)
    with pytest.raises(ValueError, match=r"layer 'l': the cached mask \(from step 0\) is for \(B, H, q_len, kv_len, "
                                          r"slice_m\)=\(1, 2, 300, 260, 64\), but this step asks for "
                                          r"\(1, 2, 300, 200, 64\) \(kv_len differs\)"):
        cache.mask_for("l", 1, q, k[:, :, :200])
    with pytest.raises(KeyError, match=r"no mask cached for layer 'x'"):
        cache.get("x")
    cache.clear()
    assert cache.layers() == [] and cache.memory_bytes() == 0


def test_mask_drift():
    a = torch.zeros(1, 1, 2, 10, dtype=torch.bool)
    a[..., :4] = True
    b = a.clone()
    b[0, 0, 0, 3] = False
    b[0, 0, 0, 7] = True
    old, new = SliceMask.from_dense(a, 64, 100), SliceMask.from_dense(b, 64, 100)
    drift = mask_drift(old, new)
    assert drift["changed"] == pytest.approx(1 / 8)
    assert drift["jaccard"] == pytest.approx(1 - 7 / 9)
    assert mask_drift(old, old) == {"changed": 0.0, "jaccard": 0.0}


def test_expanded_storage_returns_the_stored_mask_itself():
    """Reuse in a hot loop: no conversion, no copy, so the object (and a plan built on it) stays valid."""
    q, k = _qk()
    cache = MaskCache(refresh_every=2, expanded=True)
    mask = predict_mask(q, k, 64, "topk", density=0.2)
    assert "attn" not in cache and cache.step_of("attn") is None
    cache.put("attn", mask, step=3)
    assert "attn" in cache and cache.step_of("attn") == 3
    assert cache.get("attn", 1, 2, 300, 260, 64) is mask
    assert cache.memory_bytes() == mask.indptr.numel() * 4 + mask.indices.numel() * 4
    assert "expanded int32" in cache.describe()
    with pytest.raises(ValueError, match="kv_len differs"):
        cache.get("attn", kv_len=261)
    with pytest.raises(ValueError, match="cannot be combined with storage='bits'"):
        MaskCache(storage="bits", expanded=True)


def test_auto_storage_keeps_the_smaller_form_counting_offsets_and_whole_bytes():
    dense = torch.zeros(1, 8, 4, 256, dtype=torch.bool)
    dense[..., :15] = True  # 15 of 256 keys: indices 960 B against 1024 B of bits, each plus 132 B of offsets
    mask = SliceMask.from_dense(dense, 64, 256)
    sizes = {}
    for storage in ("auto", "index", "bits"):
        cache = MaskCache(storage=storage)
        cache.put("m", mask)
        sizes[storage] = cache.memory_bytes()
        assert torch.equal(cache.get("m").to_dense(), mask.to_dense())
    assert sizes["auto"] == min(sizes["index"], sizes["bits"])


def test_a_mask_whose_rows_share_entries_comes_back_in_its_own_buffer_size():
    """Every row reads the same two keys from a buffer of 2: as bits (64 bytes, against 260 of
    indices) it would come back in a buffer of 128 (its kept slices), and a plan sized to the
    stored mask would not see the same shapes."""
    shared = SliceMask(torch.zeros(1, 64, 2, dtype=torch.int32).add_(torch.tensor([0, 2], dtype=torch.int32)),
                       torch.tensor([1, 3], dtype=torch.int32), 4, 4, 8)
    auto, bits = MaskCache(), MaskCache(storage="bits")
    for cache in (auto, bits):
        cache.put("m", shared)
        assert torch.equal(cache.get("m").to_dense(), shared.to_dense())
    assert auto.get("m").capacity == 2 and "index" in auto.describe()
    assert bits.get("m").capacity == 128  # asked for bits: the buffer holds every kept slice


def test_get_takes_a_device_without_its_index():
    cache = MaskCache()
    cache.put("m", SliceMask.full(1, 1, 8, 8, 4))
    for device in ("cpu", "cpu:0", torch.device("cpu")):
        cache.get("m", device=device)
    with pytest.raises(ValueError, match="is on cpu, but this step's inputs are on meta"):
        cache.get("m", device="meta")


@pytest.mark.parametrize("options, error, match", [
    (dict(expanded="no"), TypeError, "expanded must be a bool, got 'no'"),
    (dict(method="foo", warmup=10), ValueError, "method must be one of"),
])
def test_settings_that_cannot_work_are_refused_when_the_cache_is_made(options, error, match):
    with pytest.raises(error, match=match):
        MaskCache(**options)


def test_mask_for_checks_its_overrides_on_every_step():
    """A misspelt or impossible override fails on the call that passes it, a reuse step included
    (it had failed only at the layer's next refresh, steps later)."""
    q, k = torch.randn(1, 1, 256, 16), torch.randn(1, 1, 256, 16)
    cache = MaskCache(refresh_every=5, method="topk", density=0.1)
    cache.mask_for("l", 0, q, k)
    with pytest.raises(TypeError, match=r"mask_for got options predict_mask does not take: \['densty'\]"):
        cache.mask_for("l", 1, q, k, densty=0.5)
    with pytest.raises(ValueError, match="needs exactly one of density"):
        cache.mask_for("l", 2, q, k, top_k=9)  # with the cache's density: two selections
    assert cache.mask_for("l", 3, q, k, density=0.5).density() == cache.mask_for("l", 4, q, k).density()
    tau = MaskCache(refresh_every=2, method="tau", tau=0.9)  # an override checked with the cache's method
    assert torch.equal(tau.mask_for("l", 0, q, k, tau=0.8).to_dense(),
                       predict_mask(q, k, 128, "tau", tau=0.8).to_dense())


def test_an_index_mask_is_copied_at_any_key_count():
    """Past 32,768 keys the cache stored the caller's own key tensor: a plan refilled in place
    rewrote the cached mask."""
    for kv_len in (1000, 40_000):
        mask = SliceMask.from_topk(torch.arange(8, dtype=torch.int32).expand(1, 1, 2, 8).contiguous(), 64, 128,
                                   kv_len)
        cache = MaskCache(storage="index")
        cache.put("layer", mask)
        mask.indices.add_(1)
        assert cache.get("layer").indices.tolist() == list(range(8)) * 2


@pytest.mark.parametrize("refresh_steps", [[8], []])
def test_a_second_run_without_clear_predicts_anew(refresh_steps):
    """Steps 0..9 twice without clear(): the second run's first sparse step does not reuse the
    first run's mask, whatever the listed refresh steps (none: the mask of the first sparse step)."""
    cache = MaskCache(warmup=2, refresh_steps=refresh_steps, method="topk", density=0.25, slice_m=64)
    gen = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(2):
        q, k = (torch.randn(1, 1, 128, 64, generator=gen) for _ in range(2))
        before = cache.predictions
        for step in range(10):
            cache.mask_for("layer", step, q, k)
        runs.append(cache.predictions - before)
    assert runs == [1 + len(refresh_steps)] * 2


@pytest.mark.parametrize("storage", ["index", "auto", "bits"])
def test_keys_outside_the_sequence_stay_dropped_in_storage(storage):
    """Narrowed to int16, a key past kv_len had wrapped into a real key (65541 came back as 5)."""
    i32 = lambda x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    mask = SliceMask(i32([[[0, 4]]]), i32([3, 65541, -65531, 100]), 4, 4, 100)
    cache = MaskCache(storage=storage)
    cache.put("l", mask)
    assert torch.equal(cache.get("l").to_dense(), mask.to_dense())
    # ... and moved by union_keys they land where the original's land (outside, or as it moves them)
    from fgcupy import union_keys

    for kv_len in (100, 40_000):
        mask = SliceMask(i32([[[0, 3]]]), i32([3, 10, kv_len + 5]), 4, 4, kv_len)
        cache.put("l", mask)
        assert torch.equal(union_keys(cache.get("l"), (0, 1)).to_dense(), union_keys(mask, (0, 1)).to_dense())


def test_a_reading_above_one_misses_nothing():
    from fgcupy.cache import missed_more

    assert not bool(missed_more(torch.tensor([[1.0001]]), torch.tensor([[1.0001]]), 1.5))
    assert not bool(missed_more(torch.tensor([[1.0]]), torch.tensor([[1 + 2e-6]]), 10.0))
    assert bool(missed_more(torch.tensor([[0.9]]), torch.tensor([[1.0]]), 1.5))


def test_blocks_of_zeros_have_not_moved():
    from fgcupy.cache import block_means, means_drift

    x = torch.randn(1, 2, 10, 4)
    x[:, :, 4:] = 0
    means = block_means(x, 4)
    assert float(means_drift(means, means)) == pytest.approx(0.0, abs=1e-6)
    nothing = block_means(x[:, :, :0], 4)
    assert float(means_drift(nothing, nothing)) == 0.0
    assert means_drift(nothing.double(), nothing.double()).dtype == means_drift(means.double(), means.double()).dtype
    with pytest.raises(ValueError, match="slice_m must be a positive int"):
        block_means(x, 0)


def test_mask_recall_checks_its_arguments():
    from fgcupy.cache import mask_recall

    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 12, 8)
    lse = torch.zeros(1, 2, 10)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        mask_recall(q, k, lse, 0.3, samples=0)
    with pytest.raises(ValueError, match=r"lse must be \[B, H, S\]"):
        mask_recall(q, k, lse[:, :, :5], 0.3)
    with pytest.raises(ValueError, match="k must be"):
        mask_recall(q, k[:, :1], lse, 0.3)
    with pytest.raises(ValueError, match="scale"):
        mask_recall(q, k, lse, 0.0)
    with pytest.raises(ValueError, match="layout must be one of"):
        mask_recall(q, k, lse, layout="BHSD")
    for bad in (lse.long(), lse > 0, lse.half()):  # read as an LSE they would give a plausible share
        with pytest.raises(ValueError, match="lse must be float32"):
            mask_recall(q, k, bad, 0.3)
    for key_valid in (torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 12, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"key_valid must be bool \[B, KV\]"):
            mask_recall(q, k, lse, 0.3, key_valid)


def test_mask_recall_of_a_batch_entry_with_no_valid_key_is_one():
    """All of entry 1's keys are padding: its queries miss nothing (not a huge reading from
    exp(lse - -inf))."""
    from fgcupy.cache import mask_recall

    q, k = torch.randn(2, 2, 10, 8), torch.randn(2, 2, 12, 8)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1] = False
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.3, -1)
    recall = mask_recall(q, k, lse, 0.3, key_valid=valid)
    assert torch.allclose(recall, torch.ones(2, 2), atol=1e-5), recall
    recall = mask_recall(q, k, torch.full_like(lse, -math.inf), 0.3, key_valid=valid)
    assert recall[0].tolist() == [0.0, 0.0] and recall[1].tolist() == [1.0, 1.0]


def test_schedules_take_numpy_ints_and_refuse_a_layout_option():
    import numpy as np

    cache = MaskCache(warmup=1, refresh_steps=np.arange(10, 50, 10))
    assert cache.action(np.int64(10)) == "refresh" and cache.action(np.int64(11)) == "reuse"
    with pytest.raises(ValueError, match="layout is an argument of mask_for"):
        MaskCache(layout="NHD", method="topk", density=0.1)


def test_a_reuse_that_raises_is_not_counted():
    cache = MaskCache(refresh_every=10, method="topk", density=0.5, slice_m=64)
    q = torch.randn(1, 2, 128, 64)
    cache.mask_for("l", 0, q, q)
    cache.mask_for("l", 1, q, q)
    with pytest.raises(ValueError, match="differs"):
        cache.mask_for("l", 2, q[:, :1], q[:, :1])
    assert cache.reuses == 1


def test_mask_drift_names_what_it_cannot_compare():
    from fgcupy import mask_drift

    a, b = SliceMask.full(1, 2, 8, 8, 4), SliceMask.full(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match=r"\(1, 2, 8, 8, 4\) and \(1, 1, 8, 8, 4\)"):
        mask_drift(a, b)
    with pytest.raises(TypeError, match="two SliceMasks"):
        mask_drift(a, a.indptr)


def test_put_checks_its_step():
    cache = MaskCache()
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        cache.put(0, SliceMask.full(1, 1, 8, 8, 4), step="3")
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        cache.put(0, SliceMask.full(1, 1, 8, 8, 4), step=-1)


def test_padding_written_as_nan_leaves_drift_readable():
    """Rows that are not all finite are left out of the block means, so two steps of the same
    keys read no drift and different keys read some (a NaN drift would never fire a refresh)."""
    from fgcupy.cache import block_means, means_drift

    gen = torch.Generator().manual_seed(0)
    k0, k1 = torch.randn(1, 2, 300, 8, generator=gen), torch.randn(1, 2, 300, 8, generator=gen)
    k0[:, :, -5:] = math.nan
    k1[:, :, -5:] = math.nan
    same = means_drift(block_means(k0, 128), block_means(k0.clone(), 128))
    moved = means_drift(block_means(k0, 128), block_means(k1, 128))
    assert float(same) == pytest.approx(0.0, abs=1e-6) and float(moved) > 0.1
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert float(means_drift(reference, torch.tensor([[1.0, 0.0], [math.nan, 1.0]]))) == pytest.approx(0.5)


def test_mask_recall_counts_no_mass_for_a_nan_key_as_the_kernels_do():
    """A NaN key left in k (not named in key_valid) adds no mass to the exact LSE, as it adds
    none to the sparse call's: a full mask still reads 1 (it read 0)."""
    from fgcupy import reference_attention
    from fgcupy.cache import mask_recall
    from fgcupy.mask_algebra import drop_keys

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 256, 32, generator=gen) for _ in range(3))
    k[0, 0, 7] = math.nan
    full = drop_keys(SliceMask.full(1, 1, 256, 256, 128), torch.arange(256)[None] != 7)
    _, lse = reference_attention(q, k, v, full)
    torch.testing.assert_close(mask_recall(q, k, lse), torch.ones(1, 1))


def test_mask_recall_leaves_out_queries_whose_sparse_lse_is_nan():
    """A mask that keeps a NaN key makes those rows' sparse LSE NaN: they tell nothing, so they
    are left out of the head's mean (they read "kept nothing" before); a head with no other
    query reads NaN, and missed_more does not count it."""
    from fgcupy import reference_attention
    from fgcupy.cache import mask_recall, missed_more

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 256, 32, generator=gen) for _ in range(3))
    k[0, 0, 7] = math.nan
    full = SliceMask.full(1, 2, 256, 256, 128)
    first = mask_recall(q, k, reference_attention(q, k, v, full)[1])
    assert first[0, 0].isnan() and first[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert not missed_more(first, torch.ones(1, 2), 2.0)
    half = full.to_dense()
    half[0, 0, 1, 7] = False  # head 0's second block leaves the NaN key out: its queries are read again
    recall = mask_recall(q, k, reference_attention(q, k, v, SliceMask.from_dense(half, 128, 256))[1])
    torch.testing.assert_close(recall, torch.ones(1, 2), atol=1e-5, rtol=0)


def test_block_means_and_mask_recall_name_a_missing_batch_dimension():
    from fgcupy.cache import block_means, mask_recall

    x = torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match=r"x must be a \[B, H, S, D\] tensor"):
        block_means(x, 4)
    with pytest.raises(ValueError, match=r"q must be a \[B, H, S, D\] tensor"):
        mask_recall(x, x, torch.zeros(2, 10), 0.3)


def test_a_reuse_on_another_device_names_both():
    cache = MaskCache(refresh_every=10, method="topk", density=0.5, slice_m=64)
    q = torch.randn(1, 2, 128, 64)
    cache.mask_for("l", 0, q, q)
    with pytest.raises(ValueError, match="is on cpu, but this step's inputs are on meta"):
        cache.mask_for("l", 1, q.to("meta"), q.to("meta"))


def test_numpy_schedule_ints_describe():
    import numpy as np

    cache = MaskCache(warmup=np.int64(1), refresh_every=np.int64(8), ramp=True)
    assert "on steps [2, 3, 5] (ramp)" in cache.describe()
    assert type(cache.warmup) is int and type(cache.refresh_every) is int


@pytest.mark.parametrize("schedule", [dict(warmup=1, refresh_every=20), dict(warmup=0, refresh_every=32, ramp=True),
                                      dict(warmup=1, refresh_steps=[5, 21, 41])])
def test_a_layer_that_misses_its_refresh_step_refreshes_on_its_next_call(schedule):
    """A caching hook may skip a layer on some steps: a refresh scheduled on a step the layer did
    not run happens on the next step it runs, not at the next scheduled step."""
    cache = MaskCache(**schedule)
    scheduled = [s for s in range(50) if cache.action(s) == "refresh"]
    runs = [s for s in range(cache.warmup, 50) if (s - cache.warmup) % 2 == 1]  # every other step
    refreshed = []
    for step in runs:
        if cache.action(step, "layer") == "refresh":
            refreshed.append(step)
            cache.put("layer", SliceMask.full(1, 1, 8, 8, 4), step)
    expected = {runs[0]} | {min(s for s in runs if s >= r) for r in scheduled if r <= runs[-1]}
    assert refreshed == sorted(expected), (scheduled, refreshed)
    assert len(refreshed) > 2


@pytest.mark.parametrize("options, message", [
    (dict(method="topk", density=5.0), r"density must be a number in \[0, 1\], got 5.0"),
    (dict(method="tau", tau=2.0), r"tau must be in \(0, 1\]"),
    (dict(method="auto", density=-0.1), r"density must be a number in \[0, 1\]"),
    (dict(method="topk", density=0.1, top_k=3), r"exactly one of density .* or top_k"),
    (dict(method="bogus", density=0.1), r"method must be one of"),
    (dict(method="topk", density=0.1, pooling=["mean", "bogus"]), r"pooling must be one of"),
    (dict(method="auto", density=0.2, pooling="sample"), r"method='auto' \(predict_mask's default\) takes .*; got \['pooling'\]"),
    (dict(method="auto", density=0.2, min_keys=4), r"method='auto' \(predict_mask's default\) takes .*; got \['min_keys'\]"),
    (dict(density=0.2, local=64), r"method='auto' \(predict_mask's default\) .*; got \['local'\]\. Name the method"),
    (dict(method="auto", density=0.2, scale=3e38), r"scale must be a positive finite number up to"),
])
def test_a_selection_that_cannot_work_is_refused_when_the_cache_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        MaskCache(warmup=3, **options)


def test_the_cache_passes_method_auto_each_option_it_takes(monkeypatch):
    import fgcupy.cache
    from fgcupy.mask_request import AUTO_OPTIONS

    q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    options = dict(top_k=9, scale=0.2, workspace_bytes=1 << 20)
    assert set(options) | {"density", "layout"} == set(AUTO_OPTIONS)  # layout: mask_for's
    seen = []
    real = fgcupy.cache.predict_mask

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fgcupy.cache, "predict_mask", spy)
    mask = MaskCache(method="auto", slice_m=128, **options).mask_for("L", 0, q, k)
    assert seen == [dict(layout="HND", method="auto", slice_m=128, **options)]
    assert mask.row_lengths().unique().tolist() == [9]
    assert MaskCache(method="auto", density=0.25, slice_m=128).mask_for("L", 0, q, k).density() == pytest.approx(0.25, abs=0.01)


def test_the_cache_takes_the_options_the_default_takes_at_their_defaults():
    q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 256, 32)
    for left in (dict(min_keys=0), dict(local=None), dict(combine="max"), dict(diagonals=()), dict(pool="auto")):
        mask = MaskCache(density=0.1, **left).mask_for("L", 0, q, k)
        assert torch.equal(mask.to_dense(), predict_mask(q, k, 128, density=0.1, **left).to_dense()), left


def test_a_slice_the_defaults_column_max_cannot_take_is_named_as_the_defaults():
    with pytest.raises(ValueError, match=r"method='auto' \(predict_mask's default\) predicts .*; method='topk' scores"):
        MaskCache(density=0.2, slice_m=100)
    MaskCache(method="topk", density=0.2, slice_m=100)


def test_counts_that_depend_on_the_keys_are_checked_when_the_keys_are_known():
    """min_keys and the band are clamped to kv_len, so a max_keys below them can run: it is
    not refused before q and k are known."""
    q, k = torch.randn(1, 2, 256, 32), torch.randn(1, 2, 300, 32)
    cache = MaskCache(method="topk", density=0.2, local=1000, max_keys=500, slice_m=128)
    assert cache.mask_for("L", 0, q, k).kv_len == 300


def test_a_selection_left_to_mask_for_is_checked_there():
    q = torch.randn(1, 1, 128, 32)
    cache = MaskCache(method="topk")
    assert cache.mask_for("L", 0, q, q, density=0.25).density() == pytest.approx(0.25)


def test_a_misspelt_prediction_option_is_refused_when_the_cache_is_made():
    with pytest.raises(TypeError, match=r"predict_mask does not take: \['methd'\]"):
        MaskCache(density=0.1, methd="topk")


def test_mask_recall_tells_a_mask_that_misses_a_heads_mass_on_any_input():
    """fgcupy.mask_recall from a sparse call's LSE alone: near 1 for the exact column-max mask,
    low for a mask that misses sharp unstructured heads' peaks; NHD views and the default scale
    read the same."""
    import fgcupy
    from fgcupy.oracle import exact_lse

    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, 2, 512, 32, generator=gen) * 3.0 for _ in range(2))  # logits of std ~9
    v = torch.randn(1, 2, 512, 32, generator=gen)
    exact_mask = fgcupy.predict_mask(q, k, 64, "colmax", density=0.1, lse=exact_lse(q, k))
    cheap_mask = fgcupy.predict_mask(q, k, 64, "topk", density=0.1)
    recalls = []
    for mask in (exact_mask, cheap_mask):
        _, lse = fgcupy.sparse_attention(q, k, v, mask, return_lse=True)
        recall = fgcupy.mask_recall(q, k, lse)
        torch.testing.assert_close(recall, fgcupy.mask_recall(q, k, lse, 1 / math.sqrt(32)))
        torch.testing.assert_close(recall, fgcupy.mask_recall(q.transpose(1, 2), k.transpose(1, 2), lse, layout="NHD"))
        recalls.append(recall)
    assert (recalls[0] > 0.75).all() and (recalls[1] < recalls[0] - 0.3).all(), recalls


def test_mask_recall_names_an_input_of_another_type():
    q = torch.randn(1, 2, 64, 16)
    lse = torch.zeros(1, 2, 64)
    with pytest.raises(TypeError, match=r"q must be a torch.Tensor or a cupy.ndarray, got ndarray"):
        mask_recall(q.numpy(), q, lse)


def test_auto_with_a_slice_its_column_max_cannot_take_is_refused_at_construction():
    """Its flagged heads take the column max (power-of-two slices up to 128): refused when the
    cache is made, not at the first refresh with an error about a method never asked for."""
    with pytest.raises(ValueError, match="colmax needs slice_m a power of two"):
        MaskCache(method="auto", density=0.1, slice_m=96)


def test_a_second_call_of_a_layer_in_one_step_does_not_start_a_new_run():
    cache = MaskCache(refresh_every=5, method="topk", density=0.2, slice_m=64)
    q, k = torch.randn(1, 2, 128, 16), torch.randn(1, 2, 128, 16)
    for step in (0, 0, 1, 1):
        cache.mask_for("layer", step, q, k)
    assert (cache.predictions, cache.reuses) == (2, 2)


def test_index_storage_keeps_keys_past_int16_exactly():
    """Keys of a sequence longer than 2^15 do not fit int16: stored so, they would wrap negative."""
    cache = MaskCache(storage="index")
    keys = torch.tensor([[[[3, 32767, 32768, 39999]]]])
    mask = SliceMask.from_topk(keys, 64, 64, 40000)
    cache.put("layer", mask)
    assert torch.equal(cache.get("layer").to_dense(), mask.to_dense())


@given(dense_masks(max_kv=200), st.sampled_from(["index", "bits", "auto", "expanded"]), st.integers(0, 40))
@settings(max_examples=40, deadline=None)
def test_get_writes_the_keys_into_a_buffer_of_the_callers(case, storage, spare):
    """``out`` receives the keys ``get`` gives, entries past the last row included (key 0 for a
    bit map, whatever the buffer held before), and the mask views it."""
    dense, slice_m, q_len = case
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    mask = SliceMask.from_dense(dense, slice_m, q_len, capacity=mask.capacity + spare)
    cache = MaskCache(expanded=True) if storage == "expanded" else MaskCache(storage=storage)
    cache.put(0, mask)
    plain = cache.get(0)
    out = torch.full((cache.stored_capacity(0),), 7, dtype=torch.int32)
    into = cache.get(0, out=out)
    assert into.indices.data_ptr() == out.data_ptr() and torch.equal(into.indices, plain.indices)
    assert torch.equal(into.indptr, plain.indptr) and into.capacity == plain.capacity
    with torch.inference_mode():  # a plan's buffers made under inference mode, refilled outside it
        held = torch.full((cache.stored_capacity(0),), 7, dtype=torch.int32)
    assert torch.equal(cache.get(0, out=held).indices, plain.indices)
    too_small = [torch.zeros(out.numel() - 1, dtype=torch.int32)] if out.numel() else []
    for bad in (*too_small, out.to(torch.int64), torch.zeros(2, out.numel() // 2 + 1, dtype=torch.int32)):
        with pytest.raises(ValueError, match="out must be a contiguous int32 tensor of at least"):
            cache.get(0, out=bad)


@given(dense_masks(max_kv=200), st.sampled_from(["index", "bits", "auto", "expanded"]), st.integers(1, 40))
@settings(max_examples=40, deadline=None)
def test_a_larger_buffer_takes_the_keys_in_its_first_entries(case, storage, extra):
    """A larger ``out`` (a plan's buffer sized for another layer's mask) gets the keys in its
    first stored_capacity entries and keeps the rest; the mask views all of it, with the cached
    mask's rows."""
    dense, slice_m, q_len = case
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    cache = MaskCache(expanded=True) if storage == "expanded" else MaskCache(storage=storage)
    cache.put(0, mask)
    plain, size = cache.get(0), cache.stored_capacity(0)
    out = torch.full((size + extra,), 7, dtype=torch.int32)
    into = cache.get(0, out=out)
    assert into.indices.data_ptr() == out.data_ptr() and into.capacity == size + extra
    assert torch.equal(out[:size], plain.indices) and bool((out[size:] == 7).all())
    assert torch.equal(into.indptr, plain.indptr) and torch.equal(into.to_dense(), mask.to_dense())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda sees no device on this machine")
@given(dense_masks(max_kv=300), st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_a_bit_map_expands_on_the_gpu_as_on_the_cpu(case, seed):
    """fg::emit_rows expands a CUDA bit map to the keys torch's path gives on the CPU."""
    dense, slice_m, q_len = case
    mask = SliceMask.from_dense(dense, slice_m, q_len)
    cpu, gpu = MaskCache(storage="bits"), MaskCache(storage="bits")
    cpu.put(0, mask)
    gpu.put(0, SliceMask(mask.indptr.cuda(), mask.indices.cuda(), slice_m, q_len, mask.kv_len))
    want = cpu.get(0)
    stale = torch.randint(-5, 5, (gpu.stored_capacity(0),), dtype=torch.int32,
                          generator=torch.Generator().manual_seed(seed)).cuda()
    for got in (gpu.get(0), gpu.get(0, out=stale)):
        assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.indptr.cpu(), want.indptr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda sees no device on this machine")
def test_a_gpu_bit_map_keeps_what_the_kernels_keep_of_a_loose_mask():
    """fg::pack_rows on keys listed twice, out of order, outside [0, kv_len), and rows that
    share entries: the bit map (and the keys it expands to) are the CPU's, from to_dense."""
    indptr = torch.tensor([[[0, 5, 9, 9, 12]]], dtype=torch.int32)  # row 2 empty
    indices = torch.tensor([7, 3, 7, -1, 40, 0, 39, 39, 2, 5, 1, 100, 4], dtype=torch.int32)  # 13: one spare
    loose = SliceMask(indptr, indices, 16, 64, 40)
    shared = SliceMask(torch.tensor([[[0, 3]]] * 3, dtype=torch.int32).view(1, 3, 2),  # three heads, one row each
                       torch.tensor([2, 9, 2], dtype=torch.int32), 64, 64, 40)
    for mask in (loose, shared):
        cpu, gpu = MaskCache(storage="bits"), MaskCache(storage="bits")
        cpu.put(0, mask)
        gpu.put(0, SliceMask(mask.indptr.cuda(), mask.indices.cuda(), mask.slice_m, mask.q_len, mask.kv_len))
        want, got = cpu.get(0), gpu.get(0)
        assert torch.equal(got.indices.cpu(), want.indices) and torch.equal(got.indptr.cpu(), want.indptr)
        assert torch.equal(gpu._entries[0].payload.cpu(), cpu._entries[0].payload)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda sees no device on this machine")
def test_rows_too_long_to_pack_on_the_gpu_stay_indices_unless_bits_are_asked_for(monkeypatch):
    """Past fg::pack_rows' reach "auto" keeps the keys (no dense map of every slice on the GPU);
    storage="bits" still gets its bit map."""
    from fgcupy import mask_kernels

    monkeypatch.setattr(mask_kernels, "PACK_MAX_WORDS", 4)  # rows up to 128 keys
    dense = torch.rand(1, 2, 3, 200, generator=torch.Generator().manual_seed(1)) < 0.5
    mask = SliceMask.from_dense(dense, 64, 150).to("cuda")
    auto, bits = MaskCache(), MaskCache(storage="bits")
    for cache in (auto, bits):
        cache.put(0, mask)
        assert torch.equal(cache.get(0).to_dense().cpu(), dense)
    assert "index int16" in auto.describe() and "bits uint8" in bits.describe()
