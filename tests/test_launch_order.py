"""The plan's launch order: most key tiles first, ties in index order; the GPU kernel
(cuda_src/launch_order.cu) against the torch reference, corrupt masks included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask
import fgcupy.attention_kernel as attention_kernel
from fgcupy.attention_kernel import block_order, order_buckets
from fgcupy.jit.plan_spec import ORDER_BUCKETS, ORDER_SEGMENT, ORDER_TILE_KEYS, LaunchOrderSpec, order_shift

from .needs import needs_nvrtc


def _mask_of_lengths(lengths, q_blocks: int, kv_len: int, device="cpu") -> SliceMask:
    """A mask whose rows hold ``lengths`` ([B, H, QB]) keys (sums within int32); its one index is
    never read by the order."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    batch, heads = lengths.shape[:2]
    rows = lengths.reshape(batch * heads, q_blocks)
    indptr = torch.zeros(batch * heads, q_blocks + 1, dtype=torch.int64)
    indptr[:, 1:] = rows.cumsum(1)  # a negative length makes indptr go down (a corrupt mask)
    return SliceMask(indptr.to(torch.int32).reshape(batch, heads, q_blocks + 1).to(device),
                     torch.zeros(1, dtype=torch.int32, device=device), 128, q_blocks * 128, kv_len)


@pytest.mark.parametrize("schedule, loads_order", [("longest_first", True), ("index", False)])
def test_plan_loads_the_order_kernel_only_for_its_schedule(monkeypatch, schedule, loads_order):
    loaded = []
    monkeypatch.setattr(attention_kernel, "get_kernel_on", lambda device, spec: loaded.append(spec))
    monkeypatch.setattr(attention_kernel, "load_in_background", lambda device, spec: loaded.append(spec))
    attention_kernel.load_kernels("cuda:0", "attention spec", schedule)
    assert "attention spec" in loaded
    assert any(isinstance(spec, LaunchOrderSpec) for spec in loaded) == loads_order


def test_shift_puts_every_possible_row_in_a_bucket():
    for kv_len in (0, 1, 64, 65, ORDER_BUCKETS * ORDER_TILE_KEYS - 1, ORDER_BUCKETS * ORDER_TILE_KEYS,
                   118_800, 2**31 - 1):
        shift = order_shift(kv_len)
        tiles = -(-kv_len // ORDER_TILE_KEYS)
        assert tiles >> shift < ORDER_BUCKETS
        assert shift == 0 or tiles >> (shift - 1) >= ORDER_BUCKETS


def test_reference_order_is_most_tiles_first_with_ties_in_index_order():
    lengths = torch.tensor([[[0, 64, 65, 128, 1, 200, 64, -5]]])
    order = block_order(_mask_of_lengths(lengths, 8, 256)).tolist()
    # tiles: 0, 1, 2, 2, 1, 4, 1, 0
    assert order == [5, 2, 3, 1, 4, 6, 0, 7]
    assert block_order(_mask_of_lengths(lengths, 8, 256), "index").tolist() == list(range(8))


def test_reference_order_reads_lengths_without_int32_wrap():
    """indptr entries far apart (a corrupt mask) give their true distance, as in the kernel."""
    indptr = torch.tensor([[[0, 2**31 - 1, -(2**31), 0]]], dtype=torch.int32)
    mask = SliceMask(indptr, torch.zeros(1, dtype=torch.int32), 128, 3 * 128, 2**31 - 1)
    assert block_order(mask).tolist() == [0, 2, 1]  # lengths 2^31 - 1, -2^32 + 1 (none), 2^31


@given(st.lists(st.integers(-3, 600), min_size=1, max_size=60), st.integers(1, 4))
@settings(max_examples=50, deadline=None)
def test_reference_order_is_a_stable_descending_sort_of_the_buckets(lengths, heads):
    q_blocks = len(lengths)
    flat = torch.tensor(lengths * heads).reshape(1, heads, q_blocks)
    mask = _mask_of_lengths(flat, q_blocks, 512)
    order = block_order(mask)
    assert sorted(order.tolist()) == list(range(heads * q_blocks))
    keys = order_buckets(flat.reshape(-1), 512)[order.long()]
    assert bool((keys[:-1] >= keys[1:]).all())
    ties = keys[:-1] == keys[1:]
    assert bool((order[:-1][ties] < order[1:][ties]).all())


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@needs_nvrtc
def test_order_kernel_compiles_without_spills(arch):
    from fgcupy.jit import report as report_mod

    rep = report_mod.compile_report(LaunchOrderSpec(), arch)
    assert "launch_order" in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0 and rep.stack_bytes == 0, rep.log
    assert rep.static_smem_bytes <= 48 * 1024


@pytest.mark.gpu
@pytest.mark.parametrize("rows_shape,kv_len", [((1, 1, 1), 64), ((1, 40, 256), 32_760), ((2, 24, 929), 118_800),
                                                ((1, 3, ORDER_SEGMENT + 77), 1_000), ((1, 2, 900), 2**20 * 300)])
def test_order_kernel_matches_the_reference(rows_shape, kv_len):
    gen = torch.Generator().manual_seed(sum(rows_shape) + kv_len)
    lengths = torch.randint(-4, min(kv_len, 2**20) + 300, rows_shape, generator=gen)  # corrupt rows included
    lengths[..., ::7] = min(kv_len, 2**20)  # many ties
    mask = _mask_of_lengths(lengths, rows_shape[2], kv_len)
    expected = block_order(mask)
    got = block_order(SliceMask(mask.indptr.cuda(), mask.indices.cuda(), 128, mask.q_len, kv_len))
    assert got.dtype == torch.int32 and got.device.type == "cuda"
    assert torch.equal(got.cpu(), expected)


@pytest.mark.gpu
def test_order_kernel_reads_lengths_without_int32_wrap():
    indptr = torch.tensor([[[0, 2**31 - 1, -(2**31), 0]]], dtype=torch.int32, device="cuda")
    mask = SliceMask(indptr, torch.zeros(1, dtype=torch.int32, device="cuda"), 128, 3 * 128, 2**31 - 1)
    assert block_order(mask).tolist() == [0, 2, 1]
