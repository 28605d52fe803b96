"""The wgmma (sm_90a) kernel against the float32 reference; needs a Hopper GPU."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import SparseAttention
from fgcupy.jit import all_sm90_specs, all_sm90_ws_specs

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
