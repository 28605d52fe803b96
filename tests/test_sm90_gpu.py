"""The wgmma (sm_90a) kernel against the float32 reference; needs a Hopper GPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SliceMask, SparseAttention, reference_attention, relative_l2, sparse_attention
from fgcupy.jit import Sm90WsAttentionSpec, all_sm90_specs, all_sm90_ws_specs

from .test_attention_gpu import check_against_reference, random_mask, random_qkv

pytestmark = pytest.mark.gpu

PV_MODES = (0, 1)


@pytest.fixture(autouse=True)
def _hopper_only():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma kernel needs compute capability 9.0 (Hopper)")


@st.composite
def problems(draw, specs):
    size = st.one_of(st.integers(1, 300), st.integers(300, 2500))
    spec = draw(st.sampled_from(specs))
    return dict(
        spec=spec,
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), q_len=draw(size), kv_len=draw(size),
        layout=draw(st.sampled_from(["HND", "NHD"])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def _check(p):
    spec = p["spec"]
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float16
    gen = torch.Generator().manual_seed(p["seed"])
    q, k, v = random_qkv(gen, p["batch"], p["heads"], p["q_len"], p["kv_len"], spec.head_dim, dtype, p["layout"])
    mask = random_mask(gen, p["batch"], p["heads"], p["q_len"], p["kv_len"], spec.slice_m)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((p["batch"], p["heads"], p["q_len"]), float("nan"), device="cuda")
    plan = SparseAttention().plan(mask, head_dim=spec.head_dim, dtype=dtype, spec=spec)
    plan.run(q, k, v, layout=p["layout"], out=out, lse=lse)
    check_against_reference(q, k, v, mask, out, lse, p["layout"], dtype)


#: Groups of Hopper specs, each a hypothesis test of its own: the wgmma kernel by P V mode, the
#: warp-specialised kernel with and without ping-pong.
SPEC_GROUPS = {
    **{f"wgmma-pv{pv}": [s for s in all_sm90_specs() if s.pv == pv] for pv in PV_MODES},
    **{f"warp-specialised-pp{pp}": [s for s in all_sm90_ws_specs() if s.pingpong == pp] for pp in (0, 1)},
}


@pytest.mark.parametrize("group", SPEC_GROUPS)
def test_hopper_kernels_match_reference(group):
    @given(problems(SPEC_GROUPS[group]))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    def run(p):
        _check(p)

    run()


def _runs_and_scatter(gen, batch, heads, q_len, kv_len, slice_m, window):
    """Each query block keeps a window of keys around its diagonal (whole key tiles that are one
    contiguous run, and ragged ends), every key in some blocks, and scattered keys elsewhere."""
    blocks = -(-q_len // slice_m)
    keep = torch.rand(batch, heads, blocks, kv_len, generator=gen) < 0.05
    keys = torch.arange(kv_len)
    for j in range(blocks):
        centre = min(j * slice_m * kv_len // max(q_len, 1), kv_len - 1)
        keep[:, :, j] |= (keys - centre).abs() <= window
    keep[:, :, ::3] = True
    return SliceMask.from_dense(keep.to("cuda"), slice_m, q_len)


@pytest.mark.parametrize("spec", [s for s in all_sm90_ws_specs() if s.dtype == "bfloat16" and s.stages == 2],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_contiguous_key_tiles_loaded_whole_match_reference(spec, layout):
    """Tiles that are one run of keys go through the tensor-memory accelerator, the rest are
    gathered; both in one list, with head dims that pad (96) and key counts no tile divides."""
    gen = torch.Generator().manual_seed(spec.head_dim + spec.key_tile + len(layout))
    q_len, kv_len = 700, 1000 + spec.key_tile // 2 + 3
    q, k, v = random_qkv(gen, 2, 3, q_len, kv_len, spec.head_dim, torch.bfloat16, layout)
    mask = _runs_and_scatter(gen, 2, 3, q_len, kv_len, spec.slice_m, window=3 * spec.key_tile)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((2, 3, q_len), float("nan"), device="cuda")
    SparseAttention().plan(mask, head_dim=spec.head_dim, dtype=torch.bfloat16, spec=spec).run(
        q, k, v, layout=layout, out=out, lse=lse)
    check_against_reference(q, k, v, mask, out, lse, layout, torch.bfloat16)


@pytest.mark.parametrize("head_dim", [64, 96, 128, 256])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_the_driver_encodes_tensor_maps_for_common_layouts(head_dim, layout):
    """Else every tile would quietly be gathered (correct, but not what the kernel is for)."""
    from fgcupy.attention_kernel import rows_tensor_map
    from fgcupy.layout import to_bhsd

    shape = (2, 3, 500, head_dim) if layout == "HND" else (2, 500, 3, head_dim)
    k = to_bhsd(torch.randn(shape, device="cuda", dtype=torch.bfloat16), layout)
    for rows in (64, 128):
        blob = rows_tensor_map(k, rows)
        assert blob is not None and len(blob) == 128


def test_a_run_with_a_corrupt_index_inside_is_gathered():
    """First and last keys of the tile 127 apart, but an index in between is out of range: the
    vote sends the tile to the gather, which drops that key (as for any corrupt list)."""
    spec = Sm90WsAttentionSpec("bfloat16", 128, 128, key_tile=128, stages=2, pingpong=1)
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, 1, 1, 200, 300, 128, torch.bfloat16, "HND")
    good = SliceMask.full(1, 1, 200, 300, 128, device="cuda")
    indices = good.indices.clone()
    indices[40] = 1_000_000
    bad = SliceMask(good.indptr, indices, 128, 200, 300)
    out = sparse_attention(q, k, v, bad, spec=spec)
    keep = torch.ones(1, 1, 2, 300, dtype=torch.bool)
    keep[0, 0, 0, 40] = False
    ref, _ = reference_attention(q, k, v, SliceMask.from_dense(keep.to("cuda"), 128, 200))
    assert relative_l2(out.float(), ref) < 1e-2
