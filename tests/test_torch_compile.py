"""torch.compile(fullgraph=True) over fgcupy's attention and mask prediction: custom ops, no
graph breaks, results equal to eager mode and to the reference."""

import pytest
import torch

import fgcupy
from fgcupy import SliceMask, SparseAttention, predict_mask, predict_op, reference_attention, sparse_attention
from fgcupy.local_search import refresh_topk, union_keys
from fgcupy.mask_request import make_request
from fgcupy.op_library import pack_csr, unpack_csr


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


def test_documented_submodules_are_reachable_after_importing_fgcupy():
    """fgcupy.cache.mask_recall and the like, which the README names, load on first use."""
    import subprocess
    import sys

    code = ("import fgcupy; fgcupy.cache.mask_recall, fgcupy.cache.means_drift, fgcupy.gpu_prediction.colmax_kernels, "
            "fgcupy.reference.relative_l2, fgcupy.scoring.predict_mask, fgcupy.lse_estimate.estimate_lse, "
            "fgcupy.mask_kernels.gpu_scores; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "ok"


def test_ops_are_registered_by_importing_fgcupy():
    """A graph loaded in a fresh process names the ops before any fgcupy function is touched."""
    import subprocess
    import sys

    names = ("sparse_attention_", "predict_mask", "union_keys")
    code = f"import torch, fgcupy; print([hasattr(torch.ops.fgcupy, n) for n in {names!r}])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([True] * len(names))
    # "auto"'s op registers with fgcupy.predict_mask (the prediction modules load with their first use).
    code = "import torch, fgcupy; fgcupy.predict_mask; print(hasattr(torch.ops.fgcupy, 'predict_auto'))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_the_ops_pass_torch_opcheck():
    """torch.library.opcheck: schemas, fakes against real outputs, and the same outputs through
    AOTDispatch (the packed masks' alignment gap had been left unwritten, so two calls differed)."""
    q, k, v = _qkv(seq=130)
    mask = predict_mask(q, k, 64, "topk", density=0.25)
    token = predict_op.request_token(make_request(64, 130, 64, "tau", tau=0.5))
    torch.library.opcheck(torch.ops.fgcupy.predict_mask.default, (q, k, None, [], [], token, -1, -1.0, 0.125, 1 << 20))
    torch.library.opcheck(torch.ops.fgcupy.predict_auto.default, (q, k, 64, 32, 0.125, 1 << 20))
    torch.library.opcheck(torch.ops.fgcupy.union_keys.default,
                          (mask.indptr, mask.indices, [0, 1], None, None, 64, 130, 130))
    for _ in range(5):  # the gap is written, whatever the memory held before
        garbage = torch.full((32 + mask.indices.numel(),), 7, dtype=torch.int32)
        del garbage
        assert not pack_csr(mask.indptr, mask.indices)[mask.indptr.numel() : 32].any()


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
    q, k, v = _qkv(dtype=torch.bfloat16)  # a plan's dtype
    mask = SliceMask.from_topk(torch.arange(64, dtype=torch.int32).expand(1, 2, 4, 64).contiguous(), 64, 256, 256)
    attn = SparseAttention().plan(mask, head_dim=64)

    def step(q, k, v):
        out, lse = attn.run(q, k, v, return_lse=True)
        return out * 2, lse

    compiled = torch.compile(step, fullgraph=True)
    out, lse = compiled(q, k, v)
    ref, ref_lse = reference_attention(q, k, v, mask)
    torch.testing.assert_close(out, (ref * 2).to(out.dtype))
    torch.testing.assert_close(lse, ref_lse)


#: Predictions whose sizes depend on the scores (and top-k ones outside the default path): each
#: compiles with fullgraph, with a data-dependent index count where the sizes follow from the data.
DATA_DEPENDENT = {
    "tau": lambda q, k, lse: predict_mask(q, k, 64, "tau", tau=0.8),
    "threshold": lambda q, k, lse: predict_mask(q, k, 64, "threshold", threshold=0.02, pool=None, exact_band=None),
    "union": lambda q, k, lse: predict_mask(q, k, 64, "tau", tau=0.7, pool=16, combine="union"),
    "tau capped": lambda q, k, lse: predict_mask(q, k, 64, "tau", tau=0.95, max_keys=80, local=4),
    "colmax top-k": lambda q, k, lse: predict_mask(q, k, 64, "colmax", density=0.2, lse=lse),
    "colmax threshold": lambda q, k, lse: predict_mask(q, k, 64, "colmax", lse=lse),
    "colmax estimated": lambda q, k, lse: predict_mask(q, k, 64, "colmax", density=0.2, lse="estimate"),
    "colmax candidates": lambda q, k, lse: predict_mask(
        q, k, 64, "colmax", rule="tau", tau=0.9, lse=lse,
        candidates=[predict_mask(q, k, 64, "topk", density=0.1), predict_mask(q, k, 64, "tau", tau=0.5)]),
    "per-head pooling": lambda q, k, lse: predict_mask(q, k, 64, "topk", density=0.2, pooling=["mean", "sample"]),
    "per-head pooling tau": lambda q, k, lse: predict_mask(q, k, 64, "tau", tau=0.8, pooling=["both", "adaptive"]),
    "small workspace": lambda q, k, lse: predict_mask(q, k, 64, "topk", density=0.2, workspace_bytes=1),
    "auto": lambda q, k, lse: predict_mask(q, k, 64, "auto", density=0.2),
}


def test_a_graph_that_breaks_at_an_op_runs_its_kernel_untraced(monkeypatch):
    """Without fullgraph, a prediction whose graph breaks calls the op's kernel eagerly; dynamo
    must not trace the frames inside it (on a GPU they pack launch structs with numpy, which
    dynamo cannot fake: the candidates' prediction failed so)."""
    seen = []
    predict_mask_of_op = predict_op._predict_mask

    def spy(*args):
        seen.append(torch.compiler.is_compiling())
        return predict_mask_of_op(*args)

    monkeypatch.setattr(predict_op, "_predict_mask", spy)
    q, k, v = _qkv("cpu", torch.float32)
    lse = reference_attention(q, k, v, SliceMask.full(1, 2, 256, 256, 64))[1]
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, lse: DATA_DEPENDENT["colmax candidates"](q, k, lse).indices.sum())(q, k, lse)
    assert int(out) == int(DATA_DEPENDENT["colmax candidates"](q, k, lse).indices.sum())
    assert len(seen) >= 3 and not any(seen)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", sorted(DATA_DEPENDENT))
def test_every_prediction_compiles_with_fullgraph_and_attends(name, device):
    """Every prediction runs inside one graph, and attention through its mask after it."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = _qkv(device, dtype)
    lse = reference_attention(q, k, v, SliceMask.full(1, 2, 256, 256, 64, device=device))[1]  # a dense step's
    predict = DATA_DEPENDENT[name]

    def step(q, k, v, lse):
        mask = predict(q, k, lse)
        return sparse_attention(q, k, v, mask) * 2, mask.indptr, mask.indices

    mask = predict(q, k, lse)
    expected = reference_attention(q, k, v, mask)[0].to(dtype) * 2
    tolerance = {} if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
    # fullgraph=True raises at any break. Without it, torch (by default) breaks the graph at an op
    # of data-dependent size and runs it eagerly: the same answer.
    for fullgraph in (True, False) if name in ("tau", "colmax candidates") else (True,):
        torch._dynamo.reset()
        out, indptr, indices = torch.compile(step, fullgraph=fullgraph)(q, k, v, lse)
        torch.testing.assert_close(indptr, mask.indptr)
        torch.testing.assert_close(indices, mask.indices)
        torch.testing.assert_close(out, expected, **tolerance)


@pytest.mark.gpu
@pytest.mark.parametrize("method, option", [("tau", dict(tau=0.9)), ("auto", dict(density=0.2))])
def test_cuda_graphs_leave_out_a_prediction_that_syncs_the_host(method, option):
    """reduce-overhead over a tau prediction (an index count known only at run time, a host sync
    in the op) or an "auto" one (host syncs inside the op): torch runs that op without a CUDA
    graph, and the answer is right."""
    q, k, v = _qkv("cuda", torch.bfloat16, seq=1024, dim=128)

    def step(q, k, v):
        return sparse_attention(q, k, v, predict_mask(q, k, 128, method, **option)) * 2

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):
        got = compiled(q, k, v)
    torch.testing.assert_close(got.float(), step(q, k, v).float(), rtol=2e-2, atol=2e-2)


def test_a_sparse_refresh_compiles_with_fullgraph():
    """A refresh without a dense step in one graph: attention through the old mask for its LSE,
    the old keys moved along the sequence as candidates, their exact column max."""
    q, k, v = _qkv()
    old = predict_mask(q, k, 64, "topk", density=0.1)

    def refresh(q, k, v, indptr, indices):
        mask = SliceMask(indptr, indices, 64, 256, 256)
        candidates = union_keys(mask, (0, 1, -16), extra=predict_mask(q, k, 64, "tau", tau=0.5))
        new = refresh_topk(q, k, v, mask, candidates, 0.2)
        return candidates.indptr, candidates.indices, new.indptr, new.indices

    got = torch.compile(refresh, fullgraph=True)(q, k, v, old.indptr, old.indices)
    candidates = union_keys(old, (0, 1, -16), extra=predict_mask(q, k, 64, "tau", tau=0.5))
    new = refresh_topk(q, k, v, old, candidates, 0.2)
    for a, b in zip(got, (candidates.indptr, candidates.indices, new.indptr, new.indices)):
        torch.testing.assert_close(a, b)


def test_a_data_dependent_mask_compiles_once_for_masks_of_other_sizes():
    """The index count is a run-time value of the graph: a tau mask that keeps more keys on other
    inputs reuses the graph (and is still exact)."""
    compiled = torch.compile(lambda q, k: predict_mask(q, k, 64, "tau", tau=0.9).indices, fullgraph=True)
    torch._dynamo.utils.counters.clear()
    sizes = set()
    for seed in range(3):
        q, k, _ = _qkv()
        q = q * (seed + 1) * 0.5  # sharper or flatter rows: other counts
        got = compiled(q, k)
        torch.testing.assert_close(got, predict_mask(q, k, 64, "tau", tau=0.9).indices)
        sizes.add(got.numel())
    assert len(sizes) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_top_k_compiles_once_for_every_sequence_length():
    """With dynamic shapes the top-k mask's size is one expression of the lengths, not one graph per
    count of query blocks."""
    compiled = torch.compile(lambda q, k: predict_mask(q, k, 64, "topk", density=0.2).indices, fullgraph=True,
                             dynamic=True)
    torch._dynamo.utils.counters.clear()
    for seq in (300, 400, 520, 700):
        q, k, _ = _qkv(seq=seq)
        torch.testing.assert_close(compiled(q, k), predict_mask(q, k, 64, "topk", density=0.2).indices)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("dynamic", [None, True])
def test_data_dependent_masks_compile_for_new_sequence_lengths(dynamic):
    """A new length recompiles with symbolic shapes (dynamic=None) or runs the one dynamic graph:
    the packed output's size must not depend on the symbolic lengths."""
    def step(q, k):
        mask = predict_mask(q, k, 64, "tau", tau=0.9)
        return mask.indptr, mask.indices, union_keys(mask, (0, 1, -1)).indices

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for seq in (256, 320, 448):
        q, k, _ = _qkv(seq=seq)
        mask = predict_mask(q, k, 64, "tau", tau=0.9)
        for got, want in zip(compiled(q, k), (mask.indptr, mask.indices, union_keys(mask, (0, 1, -1)).indices)):
            torch.testing.assert_close(got, want)


def test_a_packed_mask_unpacks_to_itself_with_aligned_indices():
    mask = predict_mask(*_qkv(seq=320)[:2], 64, "tau", tau=0.7)
    packed = pack_csr(mask.indptr, mask.indices)
    indptr, indices = unpack_csr(packed, mask.indptr.shape)
    assert torch.equal(indptr, mask.indptr) and torch.equal(indices, mask.indices)
    assert indices.storage_offset() * 4 % 128 == 0


def test_a_packed_mask_is_unpacked_only_from_the_start_of_its_storage():
    """unpack_csr reads the indices at their offset in the storage, so a view that starts later
    is refused rather than read from the wrong place."""
    mask = predict_mask(*_qkv(seq=320)[:2], 64, "tau", tau=0.7)
    packed = torch.cat([torch.zeros(1, dtype=torch.int32), pack_csr(mask.indptr, mask.indices)])
    with pytest.raises(ValueError, match="starts 1 elements in"):
        unpack_csr(packed[1:], mask.indptr.shape)


def test_the_op_checks_a_request_it_is_handed():
    q, k, _ = _qkv()
    token = predict_op.request_token(make_request(64, 256, 64, "tau", tau=0.5))
    packed = torch.ops.fgcupy.predict_mask(q, k, None, [], [], token, -1, -1.0, 0.125, 1 << 20)
    expected = predict_mask(q, k, 64, "tau", tau=0.5, scale=0.125)
    indptr, indices = unpack_csr(packed, expected.indptr.shape)
    assert torch.equal(indptr, expected.indptr) and torch.equal(indices, expected.indices)
    with pytest.raises(ValueError, match="not a prediction request token"):
        torch.ops.fgcupy.predict_mask(q, k, None, [], [], "method=tau", -1, -1.0, 0.125, 1 << 20)
    with pytest.raises(ValueError, match="tau must be in"):
        torch.ops.fgcupy.predict_mask(q, k, None, [], [], token.replace("tau=0.5", "tau=7.0"), -1, -1.0, 0.125,
                                      1 << 20)
    with pytest.raises(ValueError, match="scale must be a positive"):
        torch.ops.fgcupy.predict_mask(q, k, None, [], [], token, -1, -1.0, -1.0, 1 << 20)


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


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("index_budget", [1 << 26, 1])
def test_dense_attention_with_lse_compiles_with_dynamic_shapes(index_budget, device):
    """The head-group size follows from the (symbolic) lengths; one group and one group per head
    (index_budget=1) both compile and match the reference at lengths the graph was not traced at."""
    from fgcupy.attention import dense_attention_with_lse
    compiled = torch.compile(lambda q, k, v: dense_attention_with_lse(q, k, v, 64, index_budget=index_budget),
                             fullgraph=True, dynamic=True)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    for seq in (256, 300, 130):
        q, k, v = _qkv(device, dtype, seq=seq)
        out, lse = compiled(q, k, v)
        full = SliceMask.full(1, 2, seq, seq, 64, device=device)
        ref, ref_lse = reference_attention(q.float(), k.float(), v.float(), full)
        tol = {} if device == "cpu" else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out.float(), ref, **tol)
        torch.testing.assert_close(lse, ref_lse, **tol)


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

