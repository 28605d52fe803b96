"""The slice-sparse kernel against the float32 reference on fresh random inputs (GPU only)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, SparseAttention, reference_attention, relative_l2, sparse_attention
from fgcupy.jit import Sm90WsAttentionSpec, all_attention_specs
from fgcupy.jit.spec import ATTENTION_HEAD_DIMS
from fgcupy.mask_algebra import drop_keys
from fgcupy.mask import num_blocks

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 3e-3}
DEVICE = "cuda"
# The default kernel, and the warp-specialised one with key tiles shorter and longer than a list.
CORRUPT_MASK_SPECS = (None, Sm90WsAttentionSpec("bfloat16", 64, 64, 64, 2, 0), Sm90WsAttentionSpec("bfloat16", 64, 64, 128, 3, 0))


def random_mask(gen, batch, heads, q_len, kv_len, slice_m, device=DEVICE):
    """Per-block random key subsets; densities from empty to full, some rows empty or full."""
    q_blocks = num_blocks(q_len, slice_m)
    density = torch.rand(batch, heads, q_blocks, 1, generator=gen)
    density[torch.rand(density.shape, generator=gen) < 0.1] = 0.0
    density[torch.rand(density.shape, generator=gen) < 0.1] = 1.0
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < density
    return SliceMask.from_dense(dense.to(device), slice_m, q_len)


def random_qkv(gen, batch, heads, q_len, kv_len, head_dim, dtype, layout):
    def make(n):
        shape = (batch, heads, n, head_dim) if layout == "HND" else (batch, n, heads, head_dim)
        return torch.randn(shape, generator=gen).to(DEVICE, dtype)

    return make(q_len), make(kv_len), make(kv_len)


def check_against_reference(q, k, v, mask, out, lse, layout, dtype, scale=None):
    ref_out, ref_lse = reference_attention(q, k, v, mask, scale=scale, layout=layout)
    assert not torch.isnan(out).any(), "NaN (or an unwritten poisoned element) in the output"
    err = relative_l2(out.float(), ref_out)
    assert err < TOLERANCE[dtype], f"relative L2 error {err:.3e}"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE is -inf exactly where a block keeps no key"
    assert (lse[~finite] == -math.inf).all()
    if finite.any():
        assert (lse[finite] - ref_lse[finite]).abs().max().item() < 1e-3 * max(1.0, ref_lse[finite].abs().max().item() / 10)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    head_dim = draw(st.sampled_from(ATTENTION_HEAD_DIMS))
    slice_m = draw(st.sampled_from([64, 128]))
    name = "bfloat16" if dtype == torch.bfloat16 else "float16"
    spec = draw(st.sampled_from([s for s in all_attention_specs()
                                 if (s.dtype, s.head_dim, s.slice_m) == (name, head_dim, slice_m)]))
    size = st.one_of(st.integers(1, 300), st.integers(300, 3000))
    return dict(
        dtype=dtype, head_dim=head_dim, slice_m=slice_m,
        tile=dict(key_tile=spec.key_tile, stages=spec.stages, rows_per_warp=spec.rows_per_warp),
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)),
        q_len=draw(size), kv_len=draw(size), layout=draw(st.sampled_from(["HND", "NHD"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(problems())
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
def test_matches_reference(p):
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = random_qkv(gen, p["batch"], p["heads"], p["q_len"], p["kv_len"], p["head_dim"], p["dtype"], p["layout"])
    mask = random_mask(gen, p["batch"], p["heads"], p["q_len"], p["kv_len"], p["slice_m"])
    out = torch.full_like(q, float("nan"))  # poisoned: unwritten elements fail
    lse = torch.full((p["batch"], p["heads"], p["q_len"]), float("nan"), device=DEVICE)
    plan = SparseAttention().plan(mask, head_dim=p["head_dim"], dtype=p["dtype"], **p["tile"])
    plan.run(q, k, v, layout=p["layout"], out=out, lse=lse)
    check_against_reference(q, k, v, mask, out, lse, p["layout"], p["dtype"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", ATTENTION_HEAD_DIMS)
def test_full_mask_matches_sdpa(dtype, head_dim):
    gen = torch.Generator().manual_seed(7)
    q, k, v = random_qkv(gen, 1, 4, 1500, 1500, head_dim, dtype, "HND")
    out = sparse_attention(q, k, v, SliceMask.full(1, 4, 1500, 1500, 128, device=DEVICE))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert relative_l2(out.float(), expected) < TOLERANCE[dtype]


def test_empty_mask_gives_zeros_and_minus_inf_lse():
    q = torch.randn(2, 2, 200, 64, device=DEVICE, dtype=torch.bfloat16)
    mask = SliceMask.from_dense(torch.zeros(2, 2, 4, 200, dtype=torch.bool, device=DEVICE), 64, 200)
    out, lse = sparse_attention(q, q, q, mask, return_lse=True)
    assert (out == 0).all() and (lse == -math.inf).all()


def test_custom_scale():
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, 1, 2, 333, 444, 64, torch.float16, "HND")
    mask = random_mask(gen, 1, 2, 333, 444, 64)
    out, lse = sparse_attention(q, k, v, mask, scale=0.05, return_lse=True)
    check_against_reference(q, k, v, mask, out, lse, "HND", torch.float16, scale=0.05)


def test_runs_on_torch_current_stream():
    """A delay queued on a side stream before q is written: a launch on any other stream
    would read q too early."""
    gen = torch.Generator().manual_seed(4)
    q_real, k, v = random_qkv(gen, 1, 2, 1000, 1000, 128, torch.bfloat16, "HND")
    mask = random_mask(gen, 1, 2, 1000, 1000, 128)
    plan = SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16)
    expected = plan.run(q_real, k, v)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    q = torch.zeros_like(q_real)
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        q.copy_(q_real)
        out = plan.run(q, k, v)
    side.synchronize()
    assert torch.equal(out, expected)


def test_cupy_in_cupy_out_zero_copy():
    cupy = pytest.importorskip("cupy")
    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, 1, 2, 300, 300, 64, torch.bfloat16, "NHD")
    mask = random_mask(gen, 1, 2, 300, 300, 64)
    qc, kc, vc = (cupy.from_dlpack(t) for t in (q, k, v))
    out = sparse_attention(qc, kc, vc, mask, layout="NHD")
    assert isinstance(out, cupy.ndarray)
    assert torch.equal(torch.from_dlpack(out), sparse_attention(q, k, v, mask, layout="NHD"))


def test_out_argument_is_written_in_place_for_strided_views():
    gen = torch.Generator().manual_seed(6)
    q, k, v = random_qkv(gen, 2, 3, 257, 300, 128, torch.bfloat16, "NHD")
    mask = random_mask(gen, 2, 3, 257, 300, 128)
    out = torch.full_like(q, float("nan"))
    result = sparse_attention(q, k, v, mask, layout="NHD", out=out)
    assert result.data_ptr() == out.data_ptr()
    ref, _ = reference_attention(q, k, v, mask, layout="NHD")
    assert relative_l2(out.float(), ref) < 1e-2


def test_replan_same_shape_reuses_buffers():
    gen = torch.Generator().manual_seed(8)
    q, k, v = random_qkv(gen, 1, 2, 500, 500, 64, torch.float16, "HND")
    first = SliceMask.from_topk(torch.topk(torch.rand(1, 2, 4, 500, generator=gen), 100).indices.to(DEVICE), 128, 500, 500)
    second = SliceMask.from_topk(torch.topk(torch.rand(1, 2, 4, 500, generator=gen), 100).indices.to(DEVICE), 128, 500, 500)
    plan = SparseAttention().plan(first, head_dim=64, dtype=torch.float16)
    pointers = (plan.mask.indptr.data_ptr(), plan.mask.indices.data_ptr())
    plan.plan(second, head_dim=64, dtype=torch.float16)
    assert (plan.mask.indptr.data_ptr(), plan.mask.indices.data_ptr()) == pointers
    out, lse = plan.run(q, k, v, return_lse=True)
    check_against_reference(q, k, v, second, out, lse, "HND", torch.float16)


@pytest.mark.parametrize("spec", CORRUPT_MASK_SPECS, ids=lambda s: s.name if s else "default")
def test_corrupt_mask_never_reads_out_of_bounds(spec):
    """Indices past kv_len and offsets past capacity are dropped by the kernel (and reported by
    validate), never an illegal address."""
    if spec is not None and spec.arch == "sm_90a" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("a Hopper kernel")
    gen = torch.Generator().manual_seed(9)
    q, k, v = random_qkv(gen, 1, 1, 200, 100, 64, torch.bfloat16, "HND")
    good = SliceMask.from_dense(torch.ones(1, 1, 4, 100, dtype=torch.bool, device=DEVICE), 64, 200)
    indices = good.indices.clone()
    indices[5] = 10_000_000
    indices[6] = -3
    indptr = good.indptr.clone()
    indptr[0, 0, -1] = 1_000_000_000
    bad = SliceMask(indptr, indices, 64, 200, 100)
    with pytest.raises(ValueError):
        bad.validate()
    out = sparse_attention(q, k, v, bad, spec=spec)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    # Row block 0 lost keys 5 and 6 (the corrupted entries); the other blocks are intact.
    keep = torch.ones(100, dtype=torch.bool)
    keep[[5, 6]] = False
    dense = torch.ones(1, 1, 4, 100, dtype=torch.bool)
    dense[0, 0, 0] = keep
    ref, _ = reference_attention(q, k, v, SliceMask.from_dense(dense.to(DEVICE), 64, 200))
    assert relative_l2(out.float(), ref) < 1e-2


def test_zero_copy_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(10)
    q, k, v = random_qkv(gen, 1, 2, 128, 128, 64, torch.bfloat16, "HND")
    copies = [t.clone() for t in (q, k, v)]
    sparse_attention(q, k, v, SliceMask.full(1, 2, 128, 128, 64, device=DEVICE))
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


def test_schedules_give_identical_results():
    gen = torch.Generator().manual_seed(11)
    q, k, v = random_qkv(gen, 1, 3, 700, 600, 128, torch.bfloat16, "HND")
    mask = random_mask(gen, 1, 3, 700, 600, 128)
    outs = [SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16, schedule=s).run(q, k, v)
            for s in ("longest_first", "index")]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_dense_attention_with_lse_matches_reference(layout):
    """The exact schedule's refresh call on the kernel: head groups, padded keys dropped."""
    from fgcupy.attention import dense_attention_with_lse

    gen = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(gen, 2, 5, 700, 900, 128, torch.bfloat16, layout)
    key_valid = torch.rand(2, 900, generator=gen).to(DEVICE) > 0.2
    out, lse = dense_attention_with_lse(q, k, v, 128, key_valid=key_valid, layout=layout, index_budget=2 * 6 * 900)
    full = SliceMask.full(2, 5, 700, 900, 128, device=DEVICE)
    check_against_reference(q, k, v, drop_keys(full, key_valid), out, lse, layout, torch.bfloat16)


def test_masks_holding_expanded_views_read_their_logical_rows():
    """A mask whose offsets are an expanded view (one row per head shared across a batch) and an
    out computed in place over q give the reference's answer through the one-shot call and a plan."""
    gen = torch.Generator().manual_seed(11)
    one = random_mask(gen, 1, 3, 256, 256, 128)
    mask = SliceMask(one.indptr.expand(2, 3, one.indptr.shape[-1]), one.indices, 128, 256, 256)
    q, k, v = random_qkv(gen, 2, 3, 256, 256, 128, torch.bfloat16, "HND")
    expected, expected_lse = reference_attention(q, k, v, mask)
    for out, lse in (sparse_attention(q, k, v, mask, return_lse=True),
                     SparseAttention().plan(mask, head_dim=128).run(q, k, v, return_lse=True)):
        assert relative_l2(out, expected) < TOLERANCE[torch.bfloat16]
        finite = torch.isfinite(expected_lse)
        torch.testing.assert_close(lse[finite], expected_lse[finite], atol=2e-2, rtol=0)
    q_in_place = q.clone()
    sparse_attention(q_in_place, k, v, mask, out=q_in_place)
    assert relative_l2(q_in_place, expected) < TOLERANCE[torch.bfloat16]


def test_the_op_called_directly_refuses_inputs_that_need_gradients():
    q, k, v = (torch.randn(1, 2, 130, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    mask = SliceMask.full(1, 2, 130, 130, 64, device="cuda")
    with pytest.raises(RuntimeError, match="no backward pass"):
        torch.ops.fgcupy.sparse_attention_(q, k, v, torch.empty_like(q), None, mask.indptr, mask.indices, None, 64,
                                           0.125, "")


def test_whole_block_masks_attend_as_their_block_cover_in_compiled_flex_attention():
    """to_block_mask(exact=False) lists full blocks (the benchmarks' FlexAttention baseline runs no
    mask_mod in them); compiled FlexAttention over it attends exactly the cover's keys."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    gen = torch.Generator(device="cuda").manual_seed(3)
    keep = torch.rand(1, 2, 6, 700, generator=gen, device="cuda") < 0.002
    mask = SliceMask.from_dense(keep, 128, 700)
    q, k, v = (torch.randn(1, 2, 700, 64, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    got = torch.compile(flex.flex_attention)(q, k, v, block_mask=mask.to_block_mask(128, exact=False))
    cover = SliceMask.from_block_mask(mask.to_block_mask(128, exact=False), 128)
    expected = reference_attention(q, k, v, cover)[0]
    rows = cover.to_dense().any(-1).repeat_interleave(128, -1)[..., :700]  # FlexAttention leaves empty rows unset
    assert relative_l2(got.float()[rows], expected.float()[rows]) < 1e-2
