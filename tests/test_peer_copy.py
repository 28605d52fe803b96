"""The copy-engine exchange's address math (fgcupy.peer_copy.CopyPlan), on the CPU: every rank's
pieces are copied with memmove between real buffers, then each receiver's q, k, v regions must
equal the whole-sequence heads it owns, and each return buffer the output rows of its tokens."""

import ctypes

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy.distributed import _group_ranges, head_ranges
import pytest

from fgcupy import peer_copy
from fgcupy.peer_copy import CopyPlan, Rows, check_within, host_identity, pack_advert, unpack_adverts


class MemmoveWorkspace:
    """PeerWorkspace's interface over host buffers: copies are row-by-row memmoves."""

    def __init__(self, world: int, nbytes: int):
        self.buffers = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(world)]

    def ptr(self, rank: int) -> int:
        return self.buffers[rank].data_ptr()

    def copy(self, dst, src):
        assert dst.width == src.width and dst.height == src.height
        for r in range(src.height):
            ctypes.memmove(dst.ptr + r * dst.pitch, src.ptr + r * src.pitch, src.width)


@st.composite
def problems(draw):
    world = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 7))
    return dict(world=world, heads=heads, batch=draw(st.integers(1, 2)), head_dim=draw(st.sampled_from([4, 8])),
                lens=[draw(st.integers(0, 9)) for _ in range(world)], groups=draw(st.integers(1, 3)),
                token_major=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


@given(problems())
@settings(max_examples=60, deadline=None)
def test_pieces_land_where_attention_and_the_owners_read_them(p):
    world, heads, batch, dim = p["world"], p["heads"], p["batch"], p["head_dim"]
    lens, total = p["lens"], sum(p["lens"])
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v, out = (torch.randn(batch, heads, total, dim, generator=gen) for _ in range(4))
    owned = head_ranges(heads, world)
    groups = [[_group_ranges(r, p["groups"])[g] for r in owned] for g in range(p["groups"])]
    plan = CopyPlan(batch, heads, dim, lens, groups, q.element_size())
    ws = MemmoveWorkspace(world, plan.nbytes)
    shards = [range(sum(lens[:j]), sum(lens[: j + 1])) for j in range(world)]
    for r in range(world):
        def shard(x):
            piece = x[:, :, shards[r].start:shards[r].stop]
            # token-major storage viewed as [B, H, S_r, D], as an NHD caller passes it
            return piece.transpose(1, 2).contiguous().transpose(1, 2) if p["token_major"] else piece
        sources = [CopyPlan.source(shard(x)) for x in (q, k, v)]
        for g in range(p["groups"]):
            plan.inbound(ws, sources, r, g)
    for j in range(world):
        for g, subs in enumerate(groups):
            if len(subs[j]) == 0:
                continue
            for got, full in zip(plan.recv_views(ws.buffers[j], j, g, q.dtype), (q, k, v)):
                assert torch.equal(got, full[:, subs[j].start:subs[j].stop])
    for r in range(world):
        for g, subs in enumerate(groups):
            out_g = plan.new_out(r, g, out.dtype, "cpu")
            out_g.copy_(out[:, subs[r].start:subs[r].stop])
            plan.outbound(ws, out_g, r, g)
    for s in range(world):
        assert torch.equal(plan.returned(ws.buffers[s], s, out.dtype), out[:, :, shards[s].start:shards[s].stop])


def test_source_keeps_head_major_views_and_copies_token_major_ones():
    x = torch.randn(2, 5, 12, 8)
    piece = x[:, :, 3:9]  # head rows 12 * 8 apart, each a dense run of 6 tokens
    assert CopyPlan.source(piece) is piece
    token_major = torch.randn(2, 6, 5, 8).transpose(1, 2)
    made = CopyPlan.source(token_major)
    assert made is not token_major and made.is_contiguous() and torch.equal(made, token_major)


def test_adverts_are_raw_bytes_checked_for_one_host_and_distinct_devices():
    host = host_identity()
    rows = [pack_advert(bytes([r]) * 64, 1000 + r, host, bytes([r]) * 16) for r in range(3)]
    assert all(row.dtype == torch.uint8 and row.numel() == 64 + 8 + 32 + 16 for row in rows)
    adverts = unpack_adverts(rows)
    assert [a[1] for a in adverts] == [1000, 1001, 1002] and adverts[2][0] == bytes([2]) * 64
    other = pack_advert(bytes(64), 5, bytes(32), bytes([9]) * 16)
    with pytest.raises(ValueError, match="needs the GPUs of one host"):
        unpack_adverts(rows + [other])
    with pytest.raises(ValueError, match="one GPU per rank"):
        unpack_adverts([rows[0], pack_advert(bytes(64), 7, host, bytes([0]) * 16)])
    with pytest.raises(ValueError, match="advertised a buffer of"):
        unpack_adverts([pack_advert(bytes(64), 0, host, bytes(16))])
    with pytest.raises(ValueError, match="has 64 bytes, got 3"):
        pack_advert(b"abc", 1, host, bytes(16))


def test_peer_copies_stay_inside_the_advertised_buffers():
    ptrs, sizes = [1000, 5000], [100, 200]
    check_within(Rows(1000, 10, 10, 10), ptrs, sizes)          # exactly fills rank 0's buffer
    check_within(Rows(5140, 20, 20, 3), ptrs, sizes)           # ends at 5200
    for bad in (Rows(1000, 10, 10, 11), Rows(5190, 20, 20, 1), Rows(990, 0, 5, 1), Rows(3000, 1, 1, 1)):
        with pytest.raises(ValueError, match="outside every rank's advertised buffer"):
            check_within(bad, ptrs, sizes)


def test_none_is_keyed_as_the_default_group_it_stands_for(tmp_path):
    """group=None and the default group share one workspace; a default group made again is
    looked up as itself."""
    import torch.distributed as dist

    for run in ("first", "again"):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/{run}", rank=0, world_size=1)
        try:
            assert peer_copy._group_id(None) == peer_copy._group_id(dist.group.WORLD) == id(dist.group.WORLD)
        finally:
            dist.destroy_process_group()


def test_a_workspace_whose_build_failed_still_frees_its_buffer(monkeypatch):
    """Where a peer's handle failed to open (or anything failed before), the buffer is freed and
    the handles opened before it are closed."""
    cupy = pytest.importorskip("cupy")
    calls = []

    class Device:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(cupy.cuda, "Device", Device)
    monkeypatch.setattr(cupy.cuda.runtime, "free", lambda ptr: calls.append(("free", ptr)))
    monkeypatch.setattr(cupy.cuda.runtime, "ipcCloseMemHandle", lambda ptr: calls.append(("close", ptr)))
    for opened, closes in ((None, []), ([7], [("close", 7)])):
        ws = peer_copy.PeerWorkspace.__new__(peer_copy.PeerWorkspace)
        ws.device, ws._base = torch.device("cuda", 0), 1234
        if opened is not None:
            ws._opened = opened
        calls.clear()
        ws.__del__()
        assert calls == [*closes, ("free", 1234)]
