"""Sequence-parallel attention on CPU: gloo ranks in spawned processes run the reference path and
must reproduce the single-process result; helpers and argument checks run in-process.

One spawn of three processes serves every case (starting processes is what costs time): the
two-rank cases and the error cases run in a process group of global ranks 1 and 2 (so group ranks
differ from global ones, as in a real sub-group), the three-rank cases in the whole world."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, reference_attention
from fgcupy.mask_algebra import take_heads
from fgcupy.distributed import (MaskPredictor, SequenceParallelAttention, concat_heads, head_ranges,
                                sequence_parallel_attention, shard_ranges, slice_heads)
from fgcupy.distributed import _group_ranges
from tests.dist_harness import Case, error_cases, run_world

CPU = dict(device="cpu", dtype="float32", compute="reference", tolerance=1e-5, tolerance_vs_single=1e-5,
           lse_tolerance=1e-5, pg_timeout_s=20, error_group="pair")

TWO_RANK_CASES = [Case(**{**c.__dict__, "group": "pair"}) if c.group == "world" else c for c in [
    Case("even_hnd"),
    Case("uneven_shards_nhd_groups", seq=45, layout="NHD", head_groups=2),  # 23 + 22, blocks straddle ranks
    Case("custom_shards_one_empty", seq=13, shards=(13, 0), slice_m=4),
    Case("heads_not_divisible", heads=3, seq=33, head_groups=2),  # rank 0: 2 heads, rank 1: 1
    Case("fewer_heads_than_ranks", heads=1, seq=20),  # rank 1 owns no head
    Case("p2p_exchange", heads=3, seq=37, exchange="p2p", head_groups=3, layout="NHD"),
    Case("auto_falls_back_to_p2p", heads=3, seq=37, hide_all_to_all=True, head_groups=2),
    Case("all_to_all_exchange", heads=3, seq=37, exchange="all_to_all", head_groups=3),
    Case("copy_exchange_falls_back_off_gpu", heads=3, seq=37, exchange="copy", head_groups=2, layout="NHD"),
    Case("local_masks", heads=5, seq=30, mask="local", head_groups=2),
    Case("mask_callable", heads=4, seq=40, mask="callable", head_groups=2),
    Case("mask_predictor", heads=3, seq=41, mask="predict", head_groups=2),  # fgcupy.predict_mask per rank
    Case("dense_no_mask", heads=2, seq=26, mask="none", return_lse=False),
    Case("seq_lens_given", seq=50, pass_seq_lens=True, head_groups=2),
    Case("kv_shards_differ", seq=21, kv_seq=34, head_groups=2, layout="NHD"),
    Case("batch_two", batch=2, heads=3, seq=29, head_groups=2, scale=0.3),
    Case("many_groups", heads=4, seq=24, head_groups=7, return_lse=False),
    Case("float64", seed=3, dtype="float64"),
    Case("reuse_then_new_mask", heads=3, seq=27, head_groups=2, reuse=True),
    Case("reuse_local_masks", heads=4, seq=22, mask="local", reuse=True, layout="NHD"),
    Case("alone_in_own_group", seq=19, group="self"),
]]
THREE_RANK_CASES = [  # splits no two-rank case has: 4 heads as 2+1+1, 31 tokens as 11+10+10
    Case("p3_uneven", heads=4, seq=31, head_groups=2, layout="NHD"),
    Case("p3_p2p", heads=5, seq=17, exchange="p2p", kv_seq=26),
]
ERRORS = list(error_cases(CPU))


@pytest.fixture(scope="module")
def ranks():
    results = run_world(3, "gloo", CPU, TWO_RANK_CASES + THREE_RANK_CASES, ERRORS, timeout_s=60)
    for rank, mine in enumerate(results):
        for key in ("__crash__", "__hung__"):
            assert key not in mine, f"rank {rank}: {mine[key]['detail']}"
    return results


def _verdicts(ranks, name, members):
    """Verdicts of the ranks that ran ``name``; the others must say they were not members."""
    verdicts = [r.get(name) for r in ranks]
    missing = [i for i, v in enumerate(verdicts) if v is None]
    assert not missing, f"ranks {missing} never finished {name}"
    ran = [i for i, v in enumerate(verdicts) if "skipped" not in v]
    assert len(ran) == members, f"{name} ran on ranks {ran}, expected {members} ranks"
    return [verdicts[i] for i in ran]


@pytest.mark.parametrize("case", [c.name for c in TWO_RANK_CASES])
def test_two_ranks_match_single_process(ranks, case):
    members = 1 if case == "alone_in_own_group" else 2
    for rank, verdict in enumerate(_verdicts(ranks, case, 3 if members == 1 else 2)):
        assert verdict["ok"], f"rank {rank}:\n{verdict.get('detail')}"


@pytest.mark.parametrize("case", [c.name for c in THREE_RANK_CASES])
def test_three_ranks_match_single_process(ranks, case):
    for rank, verdict in enumerate(_verdicts(ranks, case, 3)):
        assert verdict["ok"], f"rank {rank}:\n{verdict.get('detail')}"


def test_callable_called_per_head_group(ranks):
    # each of the two ranks owns 2 of the 4 heads, split in 2 groups -> 2 calls each
    assert [v["callable_calls"] for v in _verdicts(ranks, "mask_callable", 2)] == [2, 2]


@pytest.mark.parametrize("name", ERRORS)
def test_errors_raise_on_every_rank(ranks, name):
    _, error, pattern = error_cases(CPU)[name]
    for rank, verdict in enumerate(_verdicts(ranks, name, 2)):
        assert verdict["ok"], f"rank {rank} did not raise: {verdict.get('detail')}"
        want_error = error if isinstance(error, str) else error.get(rank, error["other"])
        assert verdict["error"] == want_error, (rank, verdict)
        want = pattern if isinstance(pattern, str) else pattern.get(rank, pattern["other"])
        assert re.search(want, verdict["message"]), f"rank {rank}: {verdict['message']!r} !~ {want!r}"


def test_all_ranks_finished(ranks):
    assert all("__finished__" in r for r in ranks)


# ---- in-process ----
@given(st.integers(0, 200), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_shard_ranges_partition(length, parts):
    ranges = shard_ranges(length, parts)
    assert len(ranges) == parts
    assert [i for r in ranges for i in r] == list(range(length))
    sizes = [len(r) for r in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert head_ranges(length, parts) == ranges


@given(st.integers(0, 50), st.integers(0, 60), st.integers(1, 9))
@settings(max_examples=60, deadline=None)
def test_head_groups_partition_the_owned_heads(start, count, groups):
    owned = range(start, start + count)
    ranges = _group_ranges(owned, groups)
    assert len(ranges) == groups
    assert [i for r in ranges for i in r] == list(owned)
    sizes = [len(r) for r in ranges]
    if groups > 1 and count >= 2 * groups:
        # The first group (whose exchange cannot hide) is about half a share; the rest even.
        assert 1 <= sizes[0] <= -(-count // groups) and max(sizes[1:]) - min(sizes[1:]) <= 1
        assert sizes[0] <= min(sizes[1:])
    else:
        assert sizes == [len(r) for r in shard_ranges(count, groups)]


@pytest.mark.parametrize("args", [(5, 0), (-1, 2), (3, 1.5)])
def test_shard_ranges_rejects(args):
    with pytest.raises(ValueError):
        shard_ranges(*args)


def _random_mask(seed, batch=2, heads=5, q_len=37, kv_len=29, slice_m=8):
    gen = torch.Generator().manual_seed(seed)
    qb = -(-q_len // slice_m)
    dense = torch.rand(batch, heads, qb, kv_len, generator=gen) < torch.rand(batch, heads, qb, 1, generator=gen)
    return SliceMask.from_dense(dense, slice_m, q_len), dense


@given(st.integers(0, 2**31 - 1), st.integers(0, 5), st.integers(0, 5))
@settings(max_examples=40, deadline=None)
def test_slice_heads_matches_dense(seed, a, b):
    mask, dense = _random_mask(seed)
    heads = range(min(a, b), max(a, b))
    part = slice_heads(mask, heads).validate()
    assert part.heads == len(heads) and (part.q_len, part.kv_len, part.slice_m) == (37, 29, 8)
    assert torch.equal(part.to_dense(), dense[:, heads.start:heads.stop])
    assert part.capacity == int(dense[:, heads.start:heads.stop].sum())


def test_slice_heads_is_a_view_for_back_to_back_rows():
    mask, _ = _random_mask(4, batch=1)
    part = slice_heads(mask, range(2, 4))
    assert part.indices.untyped_storage().data_ptr() == mask.indices.untyped_storage().data_ptr()


def test_slice_heads_gathers_heads_stored_out_of_order():
    """Each (b, h) stores its rows back to back (the format demands it), but heads may sit anywhere
    in the buffer: here in reverse order with junk between them, so the view shortcut must not apply."""
    mask, dense = _random_mask(7)
    counts = mask.row_lengths().to(torch.int64)  # [B, H, QB]
    pieces, indptr, position = [], torch.zeros(mask.batch, mask.heads, mask.q_blocks + 1, dtype=torch.int64), 0
    for b in reversed(range(mask.batch)):
        for h in reversed(range(mask.heads)):
            first = int(mask.indptr[b, h, 0])
            keys = mask.indices[first:int(mask.indptr[b, h, -1])]
            indptr[b, h, 0] = position
            indptr[b, h, 1:] = position + torch.cumsum(counts[b, h], 0)
            pieces += [keys, torch.full((3,), -7, dtype=torch.int32)]
            position += keys.numel() + 3
    shuffled = SliceMask(indptr.to(torch.int32), torch.cat(pieces), 8, 37, 29)
    assert torch.equal(shuffled.validate().to_dense(), dense)
    for heads in (range(0, 5), range(1, 3), range(4, 5)):
        part = slice_heads(shuffled, heads).validate()
        assert torch.equal(part.to_dense(), dense[:, heads.start:heads.stop])
        assert part.capacity == int(counts[:, heads.start:heads.stop].sum())


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 3), min_size=1, max_size=4))
@settings(max_examples=40, deadline=None)
def test_concat_heads_undoes_slice_heads(seed, sizes):
    """Joining per-group masks (as the diffusers integration does with head groups) gives the mask
    of all their heads, batch by batch."""
    mask, dense = _random_mask(seed, heads=sum(sizes))
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    parts = [slice_heads(mask, range(a, b)) for a, b in zip(bounds, bounds[1:])]
    joined = concat_heads(parts).validate()
    assert joined.heads == sum(sizes) and torch.equal(joined.to_dense(), dense)
    assert joined.capacity == int(dense.sum())


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 4), min_size=1, max_size=8))
@settings(max_examples=40, deadline=None)
def test_take_heads_reorders_and_repeats(seed, order):
    """Head i of take_heads(mask, order) is the mask's head order[i], from any storage order."""
    mask, dense = _random_mask(seed)
    taken = take_heads(mask, order).validate()
    assert torch.equal(taken.to_dense(), dense[:, order])
    with pytest.raises(ValueError, match="head indices"):
        take_heads(mask, [5])


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 3), min_size=1, max_size=4), st.data())
@settings(max_examples=40, deadline=None)
def test_concat_heads_in_a_given_order(seed, sizes, data):
    """concat_heads(parts, order) equals take_heads(concat_heads(parts), order) in one gather."""
    mask, dense = _random_mask(seed, heads=sum(sizes))
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    parts = [slice_heads(mask, range(a, b)) for a, b in zip(bounds, bounds[1:])]
    order = data.draw(st.permutations(range(sum(sizes))))
    joined = concat_heads(parts, order=order).validate()
    assert torch.equal(joined.to_dense(), dense[:, list(order)])
    with pytest.raises(ValueError, match="head indices"):
        concat_heads(parts, order=[sum(sizes)])


def test_concat_heads_rejects_masks_that_do_not_match():
    a, _ = _random_mask(1)
    b, _ = _random_mask(2, q_len=40)
    with pytest.raises(ValueError, match="must agree on"):
        concat_heads([a, b])
    with pytest.raises(TypeError, match="one or more fgcupy.SliceMask"):
        concat_heads([])


@pytest.mark.parametrize("heads, error", [(range(0, 6), ValueError), (range(3, 1, -1), TypeError),
                                          (slice(0, 2), TypeError), (range(-1, 2), ValueError)])
def test_slice_heads_rejects(heads, error):
    mask, _ = _random_mask(1)
    with pytest.raises(error):
        slice_heads(mask, heads)


@pytest.mark.parametrize("kwargs, message", [
    (dict(head_groups=0), r"head_groups must be a positive int, got 0"),
    (dict(compute="triton"), r"compute must be one of \('auto', 'fgcupy', 'reference'\)"),
    (dict(exchange="ring"), r"exchange must be one of \('auto', 'all_to_all', 'p2p', 'copy'\)"),
])
def test_constructor_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceParallelAttention(**kwargs)


def test_needs_initialised_process_group():
    x = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        sequence_parallel_attention(x, x, x)


def test_mask_predictor_forwards_to_scoring(monkeypatch):
    seen = {}

    def predict_mask(q, k, slice_m, **options):
        seen.update(q=q, k=k, slice_m=slice_m, options=options)
        return "mask"

    from fgcupy import sp_masks

    monkeypatch.setattr(sp_masks, "predict_mask", predict_mask)
    predictor = MaskPredictor(slice_m=64, method="topk", density=0.3)
    q = torch.zeros(4, 1, 3, 8).permute(1, 2, 0, 3)  # strided, as exchanged heads are
    k = torch.zeros(1, 3, 4, 8)
    assert predictor(q, k, range(2, 5)) == "mask"
    assert seen["slice_m"] == 64 and seen["options"] == dict(method="topk", density=0.3)
    assert seen["q"].is_contiguous() and torch.equal(seen["q"], q)
    assert "method='topk'" in repr(predictor)


def test_mask_predictor_gives_each_head_group_its_own_poolings(monkeypatch):
    """A per-head pooling list (what fgcupy.calibration chooses) is the model's heads; a rank's
    call gets the entries of the heads it owns."""
    seen = {}

    def predict_mask(q, k, slice_m, **options):
        seen.update(options)
        return "mask"

    from fgcupy import sp_masks

    monkeypatch.setattr(sp_masks, "predict_mask", predict_mask)
    predictor = MaskPredictor(slice_m=64, method="topk", density=0.3, pooling=["mean", "sample", "both", "mean"])
    q = torch.zeros(1, 2, 4, 8)
    assert predictor(q, q, range(1, 3)) == "mask"
    assert seen["pooling"] == ["sample", "both"] and predictor.options["pooling"] == ["mean", "sample", "both", "mean"]


@pytest.mark.parametrize("options, error, match", [
    (dict(density=0.3, pooling=["mean", "sample"]), ValueError, r"got \['pooling'\]\. Name the method"),
    (dict(method="mean", density=0.3), ValueError, "method must be one of"),
    (dict(method="topk", densty=0.3), TypeError, r"MaskPredictor got options predict_mask does not take: \['densty'\]"),
    (dict(method="topk", density=3.0), ValueError, "density must be a number in"),
])
def test_mask_predictor_refuses_when_made_what_every_call_would(options, error, match):
    with pytest.raises(error, match=match):
        MaskPredictor(slice_m=64, **options)


def test_the_predictor_cuts_a_per_head_lse_and_candidates_to_the_group():
    """lse and candidates are given for every head of the model, as a pooling list is: each head
    group predicts with its own (the model's whole tensors were refused as the wrong shape)."""
    from fgcupy import predict_mask
    from fgcupy.mask_algebra import slice_heads

    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, 96, 16, generator=gen) for _ in range(2))
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1)
    candidates = predict_mask(q, k, 32, density=0.5)
    heads = range(1, 3)
    for options in (dict(lse=lse), dict(lse="estimate", candidates=candidates), dict(lse=lse, candidates=[candidates])):
        got = MaskPredictor(slice_m=32, method="colmax", rule="topk", density=0.2, scale=0.25, **options)(
            q[:, 1:3], k[:, 1:3], heads)
        own = {name: (value[:, 1:3] if name == "lse" and isinstance(value, torch.Tensor) else value)
               for name, value in options.items()}
        if "candidates" in own:
            cands = own["candidates"]
            own["candidates"] = ([slice_heads(c, heads) for c in cands] if isinstance(cands, list)
                                 else slice_heads(cands, heads))
        expected = predict_mask(q[:, 1:3], k[:, 1:3], 32, "colmax", rule="topk", density=0.2, scale=0.25, **own)
        assert torch.equal(got.to_dense(), expected.to_dense())


def test_dense_head_groups_keep_no_list_of_every_key(monkeypatch):
    """With no mask, a head group runs dense attention (the kernel in head groups within the dense
    index budget), keeping nothing: a cached list of every key was 3.6 GB per object at 75,600
    tokens and passed int32 offsets with a batch of 3."""
    from fgcupy import attention, distributed

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 150, 64, generator=gen) for _ in range(3))
    attn = SequenceParallelAttention()
    assert attn._group_mask(0, None, q, k, range(3), "reference", 150, 150) == (None, None)
    out, lse = torch.empty_like(q), torch.empty(1, 3, 150)
    attn._attend("reference", q, k, v, None, None, out, lse, 0.125)
    expected, expected_lse = reference_attention(q, k, v, SliceMask.full(1, 3, 150, 150, 128), scale=0.125)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)
    assert not attn._dynamic_plans
    budgets = []
    monkeypatch.setattr(attention, "dense_attention_with_lse",
                        lambda *args, **kwargs: budgets.append(kwargs.get("index_budget")) or (q, lse))
    distributed._dense(q, k, v, torch.empty_like(q), None, 0.125)
    assert budgets == [None]  # the default budget applies
