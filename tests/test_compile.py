"""Every shipped kernel specialization compiles with NVRTC for sm_80, sm_90 and sm_90a, with the
options the runtime path uses, and ptxas' report shows no spills and shared memory in budget."""

import pytest

from fgcupy.jit import (AttentionSpec, KernelCompileError, Sm90WsAttentionSpec, all_attention_specs, all_sm90_specs,
                        all_sm90_ws_specs, source)
from fgcupy.jit import report as report_mod
from fgcupy.jit.spec import MAX_SMEM_BYTES_SM80, MAX_SMEM_BYTES_SM90

from .needs import needs_nvrtc

pytestmark = needs_nvrtc

SPECS = all_attention_specs()


def test_every_axis_is_shipped():
    assert {s.dtype for s in SPECS} == {"bfloat16", "float16"}
    assert {s.head_dim for s in SPECS} == {64, 96, 128, 256}
    assert {s.head_dim for s in all_sm90_specs()} == {64, 128}
    assert {s.head_dim for s in all_sm90_ws_specs()} == {64, 96, 128, 256}
    assert {s.slice_m for s in SPECS} == {64, 128}
    assert {s.key_tile for s in SPECS} >= {32, 64}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_compiles_without_spills(spec, arch):
    rep = report_mod.compile_report(spec, arch)
    assert rep.lowered_name.startswith("_Z"), rep.lowered_name
    assert "sparse_attn_fwd" in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0, rep.log
    assert rep.stack_bytes == 0, rep.log
    assert rep.registers * spec.threads <= 65536, f"{rep.registers} registers x {spec.threads} threads"
    assert rep.static_smem_bytes + spec.smem_bytes <= MAX_SMEM_BYTES_SM80
    assert rep.cubin_bytes > 1000


@pytest.mark.parametrize("spec", all_sm90_specs() + all_sm90_ws_specs(), ids=lambda s: s.name)
def test_wgmma_kernels_compile_for_sm90a_without_spills(spec):
    rep = report_mod.compile_report(spec, "sm_90a")
    assert "sparse_attn_fwd_sm90" in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0 and rep.stack_bytes == 0, rep.log
    assert rep.registers * spec.threads <= 65536
    assert spec.smem_bytes <= MAX_SMEM_BYTES_SM90
    # No wgmma serialisation and no waits injected: ptxas says so (C75xx) when registers move
    # between wgmmas or are read on a path where a wgmma may still write them.
    assert "serialized" not in rep.log and "C75" not in rep.log, rep.log


def test_wgmma_kernels_need_sm90a():
    from fgcupy.jit import Sm90AttentionSpec

    with pytest.raises(KernelCompileError, match="sparse_attn_fwd_sm90"):
        report_mod.compile_report(Sm90AttentionSpec(), "sm_90")


def test_names_are_readable_and_unique():
    names = [s.name for s in SPECS]
    assert len(set(names)) == len(names)
    spec = AttentionSpec("float16", 64, 128, 32, 3)
    assert spec.name == "sparse_attn_fwd_fp16_d64_m128_n32_s3_w8"
    assert spec.name_expression == "fg::sparse_attn_fwd<fg::fp16_t, 64, 128, 32, 3, 1>"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(head_dim=80), r"head_dim must be one of \(64, 96, 128, 256\), got 80"),
        (dict(head_dim=96, key_tile=128, slice_m=64), None),
        (dict(head_dim=256, key_tile=64), r"head_dim=256 needs key_tile=32 \(larger tiles spill\), got 64"),
        (dict(dtype="float32"), r"dtype must be one of \('bfloat16', 'float16'\), got 'float32'"),
        (dict(slice_m=32), r"slice_m must be one of"),
        (dict(key_tile=48), r"key_tile must be one of"),
        (dict(stages=1), r"stages must be one of"),
        (dict(head_dim=64, slice_m=128, key_tile=32, stages=2, dtype="bfloat16"), None),
        (dict(head_dim=128, key_tile=64, rows_per_warp=32), r"rows_per_warp=32 needs key_tile \* head_dim <= 4096"),
        (dict(head_dim=128, key_tile=32, rows_per_warp=32), None),
    ],
)
def test_spec_validation(kwargs, message):
    if message is None:
        AttentionSpec(**kwargs)
        return
    with pytest.raises(ValueError, match=message):
        AttentionSpec(**kwargs)


def test_warp_specialised_head_dim_256_takes_64_key_tiles_only():
    assert Sm90WsAttentionSpec("bfloat16", 256, 128, key_tile=64).name == "sparse_attn_fwd_sm90ws_bf16_d256_m128_n64_s2_pp1"
    with pytest.raises(ValueError, match=r"head_dim=256 needs key_tile=64 \(larger tiles spill\), got 128"):
        Sm90WsAttentionSpec("bfloat16", 256, 128, key_tile=128)
    assert {s.key_tile for s in all_sm90_ws_specs() if s.head_dim == 256} == {64}


def test_options_carry_a_hash_of_every_source(tmp_path, monkeypatch):
    options = source.nvrtc_options()
    assert any(o.startswith("-DFGCUPY_SRC_HASH=0x") for o in options)
    assert f"-I{source.SOURCE_DIR}" in options
    before = source.source_hash()
    # Editing a header (not the top-level .cu) must change the hash.
    for f in source.SOURCE_DIR.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "common.cuh").write_text((tmp_path / "common.cuh").read_text() + "\n// edited\n")
    monkeypatch.setattr(source, "SOURCE_DIR", tmp_path)
    source.source_hash.cache_clear()
    try:
        assert source.source_hash() != before
    finally:
        source.source_hash.cache_clear()


def test_compile_error_names_the_spec_and_carries_the_log(monkeypatch):
    from fgcupy.jit import compile as compile_mod

    monkeypatch.setattr(compile_mod, "kernel_source", lambda spec: "this is not C++;")
    spec = AttentionSpec()
    with pytest.raises(KernelCompileError) as info:
        report_mod.compile_report(spec, "sm_90")
    assert info.value.spec == spec
    assert spec.name in str(info.value)
    assert "error" in info.value.nvrtc_log


def test_specs_differing_only_in_shared_memory_get_their_own_module():
    """CuPy shares a module between equal (source, options); the opt-in size is set on its
    function, so a smaller spec compiled later would shrink the larger one's limit."""
    from fgcupy.jit.runtime import module_options
    from fgcupy.jit.score_spec import SELECT_LARGE_SMEM, SELECT_MAX_SMEM, SelectSpec

    small, large = SelectSpec(max_smem=SELECT_MAX_SMEM), SelectSpec(max_smem=SELECT_LARGE_SMEM)
    from fgcupy.jit.kernel_cache import cache_file

    assert source.kernel_source(small) == source.kernel_source(large)
    assert module_options(small) != module_options(large)
    assert cache_file(small, "sm_90") != cache_file(large, "sm_90")


def test_every_spec_travels_as_a_token_and_back():
    """The attention op carries its kernel as a string that names every template argument."""
    from fgcupy.jit.spec import spec_from_token, spec_token

    specs = all_attention_specs() + all_sm90_specs() + all_sm90_ws_specs()
    assert all(spec_from_token(spec_token(s)) == s for s in specs)
    assert len({spec_token(s) for s in specs}) == len(specs)
    for bad in ("", "AttentionSpec", "NoSuchSpec(dtype=bfloat16)", "AttentionSpec(dtype=bfloat16,colour=3)",
                "Sm90WsAttentionSpec(dtype=bfloat16,head_dim=256,slice_m=128,key_tile=128,stages=2,pingpong=1)"):
        with pytest.raises(ValueError):
            spec_from_token(bad)


def test_a_token_says_whether_plan_chose_its_kernel():
    """A plan's own choice travels marked (a stand-in may run while it compiles); a named spec
    does not, and the CPU op reads both."""
    import torch

    from fgcupy import SliceMask, SparseAttention, ops
    from fgcupy.jit import Sm90WsAttentionSpec

    spec = Sm90WsAttentionSpec("bfloat16", 128, 128, key_tile=128, stages=2, pingpong=1)
    assert ops._chosen_spec(ops.spec_token(spec, True)) == (spec, True)
    assert ops._chosen_spec(ops.spec_token(spec)) == (spec, False)
    assert ops._chosen_spec("") == (None, True)
    q = torch.randn(1, 1, 200, 64, dtype=torch.bfloat16)
    mask = SliceMask.full(1, 1, 200, 200, 64)
    expected = SparseAttention().plan(mask, 64, spec=None).run(q, q, q)
    for named in (False, True):
        attn = SparseAttention().plan(mask, 64, key_tile=64 if named else None)
        assert attn._chosen_for_caller is not named
        torch.testing.assert_close(attn.run(q, q, q), expected)
        out = torch.empty_like(q)
        token = ops.spec_token(attn.spec, not named)
        torch.ops.fgcupy.sparse_attention_(q, q, q, out, None, mask.indptr, mask.indices, None, 64, 0.125, token)
        torch.testing.assert_close(out, expected)
