"""torch.compile(fullgraph=True) over fgcupy's attention and mask prediction: custom ops, no
graph breaks, results equal to eager mode and to the reference."""

import pytest
import torch

import fgcupy
from fgcupy import SliceMask, SparseAttention, predict_mask, reference_attention, sparse_attention


def _qkv(device="cpu", dtype=torch.float32, seq=256, dim=64, layout="HND"):
    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, seq, dim) if layout == "HND" else (1, seq, 2, dim)
    return tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))


class Block(torch.nn.Module):
    """A model's attention step: predict a top-k mask, attend through it, project."""

    def __init__(self, dim=64, layout="HND", **predict):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)
        self.layout, self.predict = layout, predict

    def forward(self, q, k, v):
        mask = predict_mask(q, k, 64, "topk", density=0.25, layout=self.layout, **self.predict)
        return self.proj(sparse_attention(q, k, v, mask, layout=self.layout))


def test_ops_are_registered():
    assert hasattr(torch.ops.fgcupy, "sparse_attention_")
    assert hasattr(torch.ops.fgcupy, "predict_topk")


@pytest.mark.parametrize("layout", ["HND", "NHD"])
@pytest.mark.parametrize("predict", [{}, dict(pool=None, exact_band=None), dict(local=8, min_keys=4)])
def test_fullgraph_compile_matches_eager_and_the_reference(layout, predict):
    q, k, v = _qkv(layout=layout)
    block = Block(layout=layout, **predict)
    explained = torch._dynamo.explain(block)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(block, fullgraph=True)
    eager = block(q, k, v)
    torch.testing.assert_close(compiled(q, k, v), eager)
    mask = predict_mask(q, k, 64, "topk", density=0.25, layout=layout, **predict)
    expected, _ = reference_attention(q, k, v, mask, layout=layout)
    torch.testing.assert_close(eager, block.proj(expected))


def test_planned_run_and_lse_compile_without_breaks():
    q, k, v = _qkv()
    mask = SliceMask.from_topk(torch.arange(64, dtype=torch.int32).expand(1, 2, 4, 64).contiguous(), 64, 256, 256)
    attn = SparseAttention().plan(mask, head_dim=64)

    def step(q, k, v):
        out, lse = attn.run(q, k, v, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True)
    out, lse = compiled(q, k, v)
    ref, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, ref * 2)
    torch.testing.assert_close(lse, ref_lse)


def test_dynamic_selections_are_refused_by_fullgraph_not_silently_wrong():
    q, k, _ = _qkv()
    with pytest.raises(Exception):  # noqa: B017 - torch raises its own graph-break error
        torch.compile(lambda q, k: predict_mask(q, k, 64, "tau", tau=0.9).indices, fullgraph=True)(q, k)


@pytest.mark.gpu
def test_cuda_graphs_reduce_overhead_match_eager():
    q, k, v = _qkv("cuda", torch.bfloat16, seq=1024, dim=128)
    block = Block(dim=128).cuda().to(torch.bfloat16)
    eager = block(q, k, v)
    compiled = torch.compile(block, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        got = compiled(q, k, v)
    torch.testing.assert_close(got.float(), eager.float(), rtol=2e-2, atol=2e-2)
    assert fgcupy.ops is not None


def test_dynamic_shapes_compile_without_breaks():
    """With dynamic shapes the head dim, and so the default scale, is symbolic while tracing."""
    mask = SliceMask.full(1, 2, 256, 256, 64)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, mask) * 2, fullgraph=True, dynamic=True)
    q, k, v = _qkv()
    out = compiled(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask)[0] * 2)
