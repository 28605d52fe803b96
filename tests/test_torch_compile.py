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


def test_a_scale_from_the_shapes_compiles_without_breaks():
    """A scale the caller computes from q's (symbolic) head dim is checked inside the graph."""
    mask = SliceMask.full(1, 2, 256, 256, 64)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, mask, scale=q.shape[-1] ** -0.5) * 2,
                             fullgraph=True, dynamic=True)
    q, k, v = _qkv()
    out = compiled(q, k, v)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask, scale=64 ** -0.5)[0] * 2)


@pytest.mark.parametrize("compiled", [False, True])
def test_attention_refuses_to_run_where_autograd_records(compiled):
    """No backward pass: a call whose inputs need gradients raises instead of leaving q.grad
    unset; under no_grad the same call runs."""
    q, k, v = _qkv()
    q.requires_grad_(True)
    mask = SliceMask.full(1, 2, 256, 256, 64)
    call = lambda q, k, v: sparse_attention(q, k, v, mask)  # noqa: E731
    call = torch.compile(call, fullgraph=True) if compiled else call
    with pytest.raises(Exception, match="no backward pass"):
        call(q, k, v)
    with torch.no_grad():
        torch.testing.assert_close(call(q, k, v), reference_attention(q, k, v, mask)[0])


def test_the_op_refuses_a_spec_it_cannot_read():
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = SliceMask.full(1, 2, 256, 256, 64)
    with pytest.raises(ValueError, match="not a kernel spec token"):
        torch.ops.fgcupy.sparse_attention_(q, k, v, torch.empty_like(q), None, mask.indptr, mask.indices, None, 64,
                                           0.125, "sparse_attn_fwd_bf16_d64_m64_n64_s2_w4")


@pytest.mark.gpu
def test_a_planned_run_compiles_on_cuda_before_any_eager_call():
    """The op reads its kernel from its own argument: a graph's first call needs nothing an eager
    call would have left behind."""
    q, k, v = _qkv("cuda", torch.bfloat16, seq=512, dim=128)
    mask = SliceMask.from_topk(torch.arange(128, dtype=torch.int32, device="cuda").expand(1, 2, 4, 128).contiguous(),
                               128, 512, 512)
    attn = SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16, key_tile=64, stages=3)
    out = torch.compile(lambda q, k, v: attn.run(q, k, v) * 2, fullgraph=True)(q, k, v)
    ref, _ = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out.float(), ref * 2, rtol=2e-2, atol=2e-2)


def test_prediction_takes_inputs_that_need_gradients():
    """A mask is integer indices: q that needs gradients predicts as any q (the CPU reference's
    pooling had refused it)."""
    q, k, _ = _qkv()
    q.requires_grad_(True)
    expected = predict_mask(q.detach(), k, 64, "topk", density=0.25)
    for call in (predict_mask, torch.compile(predict_mask, fullgraph=True)):
        got = call(q, k, 64, "topk", density=0.25)
        assert torch.equal(got.indices, expected.indices) and torch.equal(got.indptr, expected.indptr)


def test_a_prediction_scale_that_changes_compiles_without_breaks():
    """A scale that differs from the first call's (symbolic then) is checked inside the graph."""
    q, k, _ = _qkv()
    compiled = torch.compile(lambda q, k, s: predict_mask(q, k, 64, "topk", density=0.25, scale=s).indices,
                             fullgraph=True)
    for scale in (0.125, 0.01, 0.3):
        assert torch.equal(compiled(q, k, scale), predict_mask(q, k, 64, "topk", density=0.25, scale=scale).indices)
