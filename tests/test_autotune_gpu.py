"""Autotuning on a real GPU: a small tune completes and its winner is a valid, correct spec that
plan() then uses; first-use tuning through FGCUPY_AUTOTUNE=1; slice tuning with the real kernel
and event timer (the predictor is a test-local oracle, so this does not depend on scoring.py)."""

import json
import math

import pytest
import torch

from fgcupy import SliceMask, SparseAttention, autotune, dense_attention, reference_attention, relative_l2
from fgcupy.mask import random_topk_mask

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.AUTOTUNE_ENV, raising=False)
    autotune.TuneCache._memo.clear()
    autotune._session.clear()
    yield tmp_path / "cache" / autotune.CACHE_FILE
    autotune._session.clear()


def test_small_real_tune_completes_with_a_valid_winner():
    info = autotune.DeviceInfo.of(DEVICE)
    assert info.smem_per_block_optin >= 48 * 1024 and info.regs_per_block >= 32768
    key = autotune.ProblemKey.make(info, "float16", 64, 64, 4096, 4096, 0.3)
    lines = []
    result = autotune.tune_on_device(key, DEVICE, 4096, 4096, 4, progress=lines.append)
    assert result.measured, result.table()
    assert result.winner in autotune.candidate_specs("float16", 64, 64, info.arch)
    by_spec = {c.spec: c for c in result.candidates}
    assert by_spec[result.default].status == "ok", result.table()
    assert by_spec[result.winner].status == "ok" and by_spec[result.winner].ms > 0
    if result.winner != result.default:  # never slower than the default beyond the margin
        assert by_spec[result.winner].ms < by_spec[result.default].ms * (1 - autotune.NOISE_MARGIN)
    ok = [c for c in result.candidates if c.status == "ok"]
    assert len(ok) >= 2, result.table()
    assert all(c.tflops > 0 and c.registers for c in ok)
    assert any("round" in line for line in lines)

    assert autotune.TuneCache().store([result], info)
    autotune.TuneCache._memo.clear()
    autotune._session.clear()
    mask = random_topk_mask(1, 2, 4096, 4096, 64, 0.3, DEVICE)
    plan = SparseAttention().plan(mask, head_dim=64, dtype=torch.float16)
    assert plan.spec == result.winner
    q, k, v = (torch.randn(1, 2, 4096, 64, device=DEVICE, dtype=torch.float16) for _ in range(3))
    ref, _ = reference_attention(q, k, v, mask)
    assert relative_l2(plan.run(q, k, v).float(), ref) < 3e-3


def test_first_use_tuning_through_plan(isolated_cache, monkeypatch):
    monkeypatch.setenv(autotune.AUTOTUNE_ENV, "1")
    calls = []
    real = autotune.tune_on_device

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(autotune.choice, "tune_on_device", counting)
    mask = random_topk_mask(1, 3, 2000, 3000, 128, 1.0, DEVICE)
    plan = SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16)
    assert len(calls) == 1
    (entry,) = json.loads(isolated_cache.read_text())["entries"].values()
    assert entry["spec_name"] == plan.spec.name
    SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16)
    assert len(calls) == 1, "a second plan of the same key must not re-tune"
    explicit = SparseAttention().plan(mask, head_dim=128, dtype=torch.bfloat16, key_tile=32)
    assert explicit.spec.key_tile == 32 and len(calls) == 1
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q = torch.randn(1, 3, 2000, 128, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, 3000, 128, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ref, _ = reference_attention(q, k, v, mask)
    assert relative_l2(plan.run(q, k, v).float(), ref) < 1e-2


def oracle_predictor(q, k, *, slice_m, method, density):
    """Top-k keys by the block's maximum softmax probability, computed exactly."""
    assert method == "topk"
    probs = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    b, h, s, kv = probs.shape
    block_max = probs.reshape(b, h, s // slice_m, slice_m, kv).amax(dim=3)
    keep = max(1, round(density * kv))
    return SliceMask.from_topk(torch.topk(block_max, keep, dim=-1).indices, slice_m, s, kv)


def test_tune_slice_with_the_real_kernel():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    seq, d = 2048, 64
    k = torch.randn(1, 2, seq, d, generator=gen, device=DEVICE)
    q = (8 * k + 0.5 * torch.randn(1, 2, seq, d, generator=gen, device=DEVICE)).to(torch.bfloat16)
    k = k.to(torch.bfloat16)
    v = torch.randn(1, 2, seq, d, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    target = 3e-2
    choice = autotune.tune_slice(q, k, v, target, predictor=oracle_predictor, heads=2)
    assert choice.met_target and choice.rel_l2 <= target
    assert choice.slice_m in (64, 128) and choice.density < 0.2  # a query needs only its own key
    assert choice.scoring_ms > 0 and choice.attention_ms > 0
    mask = oracle_predictor(q, k, slice_m=choice.slice_m, method="topk", density=choice.density)
    out = SparseAttention().plan(mask, head_dim=d, dtype=torch.bfloat16).run(q, k, v)
    assert relative_l2(out.float(), dense_attention(q, k, v)) <= target
