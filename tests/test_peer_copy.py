"""The copy-engine exchange's address math (fgcupy.peer_copy.CopyPlan), on the CPU: every rank's
pieces are copied with memmove between real buffers, then each receiver's q, k, v regions must
equal the whole-sequence heads it owns, and each return buffer the output rows of its tokens."""

import ctypes

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fgcupy.distributed import _group_ranges, head_ranges
from fgcupy.peer_copy import CopyPlan


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
