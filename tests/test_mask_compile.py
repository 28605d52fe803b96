"""Every mask-prediction kernel specialization (scoring, selection, emission) compiles with NVRTC
for sm_80, sm_90 and sm_90a with the runtime's options; ptxas shows no spills and resources in
budget for the launch shape the spec declares."""

import pytest
import torch

from fgcupy import mask_kernels
from fgcupy.jit import report as report_mod
from fgcupy.jit.score_spec import (
    SELECT_FIXED_SMEM, SELECT_LARGE_SMEM, SELECT_MAX_SMEM, ColmaxSpec, EmitSpec, ScoreSpec, SelectSpec, Sm90ScoreSpec,
    all_mask_specs,
    all_sm90_mask_specs,
)
from fgcupy.jit.spec import MAX_SMEM_BYTES_SM90_PER_SM

from .needs import needs_nvrtc

pytestmark = needs_nvrtc

SPECS = all_mask_specs()
SM80_SMEM = 163 * 1024


def test_every_axis_is_shipped():
    scores = [s for s in SPECS if type(s) is ScoreSpec]
    assert {(s.dtype, s.head_dim) for s in scores} == {(d, h) for d in ("bfloat16", "float16") for h in (64, 128)}
    assert {(s.mode, s.warps) for s in scores} == {("logits", 4), ("logits", 8), ("logits_f16", 4), ("logits_f16", 8),
                                                   ("stats", 4), ("stats", 8), ("maxprob", 4), ("maxprob", 8)}
    colmax = {(s.dtype, s.head_dim, s.mode, s.warps) for s in SPECS if isinstance(s, ColmaxSpec)}
    assert colmax == {(d, h, m, w) for d in ("bfloat16", "float16") for h in (64, 128) for m in ("maxprob", "listmax")
                      for w in (4, 8)}
    selects = {(s.staged, s.scores, s.rule) for s in SPECS if isinstance(s, SelectSpec)}
    assert selects == {(staged, scores, rule) for staged in (True, False) for scores in ("float32", "float16", "bfloat16")
                       for rule in ("any", "topk")}
    assert EmitSpec() in SPECS
    assert len({s.name for s in SPECS}) == len(SPECS)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_compiles_without_spills(spec, arch):
    rep = report_mod.compile_report(spec, arch)
    assert rep.lowered_name.startswith("_Z"), rep.lowered_name
    assert spec.template.split("::")[-1] in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0, rep.log
    assert rep.stack_bytes == 0, rep.log
    assert rep.registers * spec.threads <= 65536, f"{rep.registers} registers x {spec.threads} threads"
    assert rep.static_smem_bytes + spec.smem_bytes <= SM80_SMEM
    assert rep.cubin_bytes > 1000


def test_score_spec_names_and_shared_memory():
    spec = ScoreSpec("float16", 64, "maxprob", 8)
    assert spec.name == "mask_score_maxprob_fp16_d64_w8"
    assert spec.name_expression == "fg::mask_score<fg::fp16_t, 64, 2, 8>"
    assert spec.rows_per_cta == 128 and spec.threads == 256
    # Q tile (128 rows) + two 64-key K stages, 2 bytes each, + the cross-warp max buffer.
    assert spec.smem_bytes == (128 + 128) * 64 * 2 + 8 * 64 * 4
    assert ScoreSpec().smem_bytes == (64 + 128) * 128 * 2


def test_colmax_spec_names_and_shared_memory():
    spec = ColmaxSpec("float16", 64, "listmax", 4)
    assert spec.name == "mask_colmax_listmax_fp16_d64_w4"
    assert spec.name_expression == "fg::mask_colmax<fg::fp16_t, 64, 5, 4>"
    assert spec.rows_per_cta == spec.key_tile == 64 and spec.threads == 128
    # The block's 64 rows + two 64-key stages, 2 bytes each, + the rows' lse.
    assert spec.smem_bytes == (64 + 128) * 64 * 2 + 64 * 4
    with pytest.raises(ValueError, match="mode must be one of"):
        ColmaxSpec(mode="stats")


def test_select_staging_limit():
    assert SelectSpec(True).name_expression == "fg::select_rows<true, fg::F32Scores, -1>"
    assert SelectSpec(False, "float16", rule="topk").name_expression == "fg::select_rows<false, fg::F16Scores, 0>"
    assert SelectSpec(False, "float16").name == "select_rows_global_f16"
    assert SelectSpec(False, "float16", rule="topk").name == "select_rows_global_f16_topk"
    assert SelectSpec(False).smem_bytes == SELECT_FIXED_SMEM
    wan_row = 32_760
    assert SelectSpec.fits(wan_row) and SelectSpec(True).launch_smem(wan_row) <= SELECT_MAX_SMEM
    # Staged 16-bit bins: two CTAs share an SM on Hopper (228 KB, 1 KB reserved per CTA).
    assert 2 * (SelectSpec(True).launch_smem(wan_row) + 1024) <= 228 * 1024
    assert not SelectSpec.fits(75_600)  # wan 720p rows: global memory within sm_80's 163 KB
    assert SelectSpec.fits(75_600, SELECT_LARGE_SMEM) and SelectSpec.fits(81_920, SELECT_LARGE_SMEM)
    assert not SelectSpec.fits(81_952, SELECT_LARGE_SMEM)
    assert SelectSpec(True, max_smem=SELECT_LARGE_SMEM).smem_bytes + 1024 <= 227 * 1024  # sm_90's opt-in
    with pytest.raises(ValueError, match="max_smem"):
        SelectSpec(True, max_smem=100_000)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(head_dim=96), r"head_dim must be one of \(64, 128\), got 96"),
        (dict(dtype="float32"), r"dtype must be one of \('bfloat16', 'float16'\), got 'float32'"),
        (dict(mode="probs"), r"mode must be one of \('logits', 'stats', 'maxprob', 'logits_f16'\), got 'probs'"),
        (dict(warps=2), r"warps must be one of \(4, 8\), got 2"),
        (dict(head_dim=128.0), r"head_dim must be one of \(64, 128\), got 128.0"),  # a float equal to one
        (dict(warps=True), r"warps must be one of"),
    ],
)
def test_score_spec_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScoreSpec(**kwargs)


def test_select_spec_validation():
    with pytest.raises(ValueError, match=r"scores must be one of \('float32', 'float16', 'bfloat16'\), got 'float64'"):
        SelectSpec(True, "float64")
    with pytest.raises(ValueError, match=r"rule must be one of \('any', 'topk'\), got 'tau'"):
        SelectSpec(True, rule="tau")
    with pytest.raises(ValueError, match="staged must be a bool, got 'false'"):
        SelectSpec("false")
    with pytest.raises(ValueError, match=r"group of mode 'stats' must be one of \(1,\), got True"):
        Sm90ScoreSpec(mode="stats", group=True)


@pytest.mark.parametrize("spec", all_sm90_mask_specs(), ids=lambda s: s.name)
def test_wgmma_scoring_compiles_for_two_ctas_per_sm(spec):
    """The wgmma scoring kernel runs two CTAs per SM: at most 128 registers, no spills, and two
    CTAs' shared memory within an SM's."""
    rep = report_mod.compile_report(spec, "sm_90a")
    assert "mask_score_sm90" in rep.lowered_name
    assert rep.spill_store_bytes == 0 and rep.spill_load_bytes == 0 and rep.stack_bytes == 0, rep.log
    assert rep.registers <= 128, rep.registers
    assert 2 * (rep.static_smem_bytes + spec.smem_bytes) <= MAX_SMEM_BYTES_SM90_PER_SM
    # No wgmma serialisation (ptxas' C75xx performance warnings), e.g. for lack of registers to
    # keep two products in flight.
    assert "serialized" not in rep.log and "C75" not in rep.log, rep.log


def test_wgmma_scoring_spec():
    groups = {"stats": (1,), "maxprob": (2, 4, 8, 16, 32, 64, 128), "band": (128,), "listmax": (128,)}
    assert {(s.dtype, s.head_dim, s.mode, s.group) for s in all_sm90_mask_specs()} == {
        (d, h, m, g) for d in ("bfloat16", "float16") for h in (64, 128) for m in groups for g in groups[m]} | {
        ("float8_e4m3", 128, "maxprob", g) for g in groups["maxprob"]}
    spec = Sm90ScoreSpec("float16", 64, "stats")
    assert spec.name == "mask_score_sm90_stats_fp16_d64"
    assert spec.name_expression == "fg::mask_score_sm90<fg::fp16_t, 64, 1, 1>"
    pooled = Sm90ScoreSpec("bfloat16", 128, "maxprob", 4)
    assert pooled.name == "mask_score_sm90_maxprob_g4_bf16_d128"
    assert pooled.name_expression == "fg::mask_score_sm90<fg::bf16_t, 128, 2, 4>"
    assert Sm90ScoreSpec("bfloat16", 64, "band", 128).name_expression == "fg::mask_score_sm90<fg::bf16_t, 64, 4, 128>"
    assert Sm90ScoreSpec("bfloat16", 64, "listmax", 128).name == "mask_score_sm90_listmax_bf16_d64"
    with pytest.raises(ValueError, match="mode must be one of"):
        ScoreSpec(mode="band")  # the mma.sync kernel has no band mode
    for mode, group in (("maxprob", 1), ("maxprob", 3), ("maxprob", 256), ("stats", 4), ("band", 64), ("listmax", 64)):
        with pytest.raises(ValueError, match=f"group of mode '{mode}' must be one of"):
            Sm90ScoreSpec(mode=mode, group=group)
    # Rows first: CTAs that run together share key tiles.
    assert spec.grid(3, 5, 7) == (5, 3, 7) and ScoreSpec().grid(3, 5, 7) == (3, 5, 7)
    with pytest.raises(ValueError, match=r"mode must be one of \('stats', 'maxprob', 'band', 'listmax'\), got 'logits'"):
        Sm90ScoreSpec(mode="logits")


@pytest.mark.parametrize("mode, group, band, warps, fits", [
    ("maxprob", 4, None, 8, True), ("maxprob", 128, None, 8, True), ("maxprob", 64, None, 4, True),
    ("stats", 1, None, 4, True), ("stats", 1, (-64, 256), 8, True), ("maxprob", 128, (-64, 256), 8, True),
    ("maxprob", 1, None, 4, False), ("logits", 1, None, 8, False), ("stats", 1, (-64, 192), 4, False),
])
def test_which_scoring_kernel_runs(mode, group, band, warps, fits):
    """Forced kernels: "mma" always; "wgmma" where it has the mode, group and band row tile."""
    portable = ScoreSpec("bfloat16", 128, mode, warps)
    assert mask_kernels._score_spec("mma", portable, group, band, None) is portable
    if fits:
        expected = Sm90ScoreSpec("bfloat16", 128, mode, group if mode == "maxprob" else 1)
        assert mask_kernels._score_spec("wgmma", portable, group, band, None) == expected
    else:
        with pytest.raises(ValueError, match="the wgmma scoring kernel has no mode"):
            mask_kernels._score_spec("wgmma", portable, group, band, None)
    with pytest.raises(ValueError, match="kernel must be one of"):
        mask_kernels._score_spec("fast", portable, group, band, None)


def test_score_passes_keep_no_tensors_alive():
    """A cache on a function of tensors would hold every call's inputs and outputs (a 1.3 GB
    score matrix per wan480p call) and hand back stale scores when a tensor is reused."""
    from fgcupy import mask_kernels

    for name in ("gpu_scores", "gpu_colmax", "gpu_select", "gpu_dilate"):
        assert not hasattr(getattr(mask_kernels, name), "cache_info"), name


@pytest.mark.parametrize("scale", [0.0, -0.1, float("nan"), float("inf")])
def test_score_passes_refuse_a_scale_they_cannot_fold(scale):
    """The kernels take maxima on unscaled products and fold the scale into the exponent."""
    rows = torch.zeros(1, 1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        mask_kernels.gpu_scores("stats", rows, rows, scale)


def test_band_refinement_checks_its_buffers():
    """The fused band launch writes into the caller's scores and reads the sub-blocks' LSE: both
    are checked against the shapes before anything runs."""
    q = torch.zeros(1, 2, 300, 64, dtype=torch.bfloat16)
    sub_lse = torch.zeros(2, 10)  # ceil(300 / 32)
    good = torch.zeros(2, 3, mask_kernels.row_stride(300, 2), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"out must be contiguous torch.bfloat16 \(2, 3, 320\), got \(2, 2, 320\)"):
        mask_kernels.gpu_refine_band(q, q, 0.125, sub_lse, 32, 128, (-64, 256), good[:, :2], kernel="wgmma")
    with pytest.raises(ValueError, match=r"out must be contiguous torch.bfloat16 .* torch.float32"):
        mask_kernels.gpu_refine_band(q, q, 0.125, sub_lse, 32, 128, (-64, 256), good.float(), kernel="wgmma")
    with pytest.raises(ValueError, match="sub_lse must be float32"):
        mask_kernels.gpu_refine_band(q, q, 0.125, sub_lse[:, :9], 32, 128, (-64, 256), good, kernel="wgmma")
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        mask_kernels.gpu_refine_band(q, q, -1.0, sub_lse, 32, 128, (-64, 256), good, kernel="wgmma")
