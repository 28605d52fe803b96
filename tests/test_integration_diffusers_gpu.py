"""fgcupy.integrations.diffusers on the GPU: the real kernel inside tiny Wan / HunyuanVideo / CogVideoX models.

bf16 tolerance is measured, not guessed: the stock processor in bf16 against the same model in
float32 sets the noise floor, and fgcupy in bf16 must stay within a small multiple of it."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install 'fgcupy[diffusers]'")

import fgcupy  # noqa: E402
from fgcupy import attention_kernel, relative_l2  # noqa: E402
from fgcupy.integrations import diffusers as fd  # noqa: E402

from .tiny_diffusers import (  # noqa: E402
    CountingPredictor,
    cogvideox_inputs,
    expand_mask,
    full_predictor,
    hunyuan_inputs,
    random_predictor,
    reference_attention_fn,
    tiny_cogvideox,
    tiny_hunyuan,
    tiny_wan,
    wan_inputs,
)

pytestmark = pytest.mark.gpu
CUDA = "cuda"


def wan_trajectory(model, latents, text, steps: int, dtype=torch.bfloat16):
    """A few simulated denoising steps (Euler-like update with decreasing timesteps): outputs per step."""
    x, outs = latents.to(dtype), []
    with torch.no_grad():
        for step in range(steps):
            out = model(x, torch.tensor([1000 - 150 * step], device=CUDA), text.to(dtype)).sample
            outs.append(out.float())
            x = x - 0.15 * out
    return outs


def bf16_pair(model):
    return model.to(CUDA), copy.deepcopy(model).to(CUDA, torch.bfloat16)


@pytest.mark.parametrize("head_dim, slice_m", [(64, 64), (128, 128), (128, 64)])
def test_wan_full_mask_matches_stock(head_dim, slice_m):
    fp32, bf16 = bf16_pair(tiny_wan(head_dim=head_dim))
    latents, text = wan_inputs(frames=3, size=32, device=CUDA)  # 768 tokens
    truth = wan_trajectory(fp32, latents, text, 1, torch.float32)[0]
    stock = wan_trajectory(bf16, latents, text, 1)[0]
    handle = fd.apply(bf16, fd.SparseAttentionConfig(predictor=full_predictor, slice_m=slice_m))
    ours = wan_trajectory(bf16, latents, text, 1)[0]
    floor = relative_l2(stock, truth)
    assert relative_l2(ours, truth) <= 2 * floor + 1e-3, (relative_l2(ours, truth), floor)
    assert relative_l2(ours, stock) <= 2 * floor + 1e-3
    assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())


@pytest.mark.parametrize("schedule", ["full", "default_exact_start"])
def test_cogvideox_on_the_kernel_matches_stock(schedule):
    """CogVideoX (head dim 64, text first): the full mask within the bf16 noise floor of the stock
    processor; the default schedule with a warm-up step (its exact mask, then sparse refreshes)
    close to dense over a few steps."""
    fp32, bf16 = bf16_pair(tiny_cogvideox())
    latents, text, rotary = cogvideox_inputs(frames=3, size=32, device=CUDA)  # 7 + 768 tokens

    def trajectory(model, dtype, steps):
        x, outs = latents.to(dtype), []
        with torch.no_grad():
            for step in range(steps):
                t = torch.tensor([1000 - 150 * step], device=CUDA)
                out = model(x, text.to(dtype), t, image_rotary_emb=rotary).sample
                outs.append(out.float())
                x = x - 0.15 * out
        return outs

    steps = 1 if schedule == "full" else 4
    truth = trajectory(fp32, torch.float32, steps)
    stock = trajectory(bf16, torch.bfloat16, steps)
    config = (fd.SparseAttentionConfig(predictor=full_predictor) if schedule == "full"
              else fd.SparseAttentionConfig(density=0.5, slice_m=64, dense_steps=1, refresh_every=2))
    handle = fd.apply(bf16, config)
    ours = trajectory(bf16, torch.bfloat16, steps)
    floor = max(relative_l2(s, t) for s, t in zip(stock, truth))
    if schedule == "full":
        assert relative_l2(ours[0], truth[0]) <= 2 * floor + 1e-3, (relative_l2(ours[0], truth[0]), floor)
        assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())
    else:
        for step, (o, t) in enumerate(zip(ours, truth)):
            assert relative_l2(o, t) < 5e-2, step
        assert all(s.refresh_steps == [0, 3] for s in handle.stats().values())


def test_hunyuan_full_mask_with_text_padding_matches_stock():
    fp32, bf16 = bf16_pair(tiny_hunyuan(head_dim=128))
    latents, text, text_mask, pooled = hunyuan_inputs(frames=3, size=32, device=CUDA)
    t = torch.tensor([500], device=CUDA)
    with torch.no_grad():
        truth = fp32(latents, t, text, text_mask, pooled).sample.float()
        args = (latents.bfloat16(), t, text.bfloat16(), text_mask, pooled.bfloat16())
        stock = bf16(*args).sample.float()
        handle = fd.apply(bf16, fd.SparseAttentionConfig(predictor=full_predictor))
        ours = bf16(*args).sample.float()
    floor = relative_l2(stock, truth)
    assert relative_l2(ours, truth) <= 2 * floor + 1e-3, (relative_l2(ours, truth), floor)
    assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())


def test_kernel_layer_matches_stock_given_the_same_dense_mask():
    model = tiny_hunyuan(head_dim=128).to(CUDA, torch.bfloat16)
    latents, _, _, _ = hunyuan_inputs(frames=3, size=32, device=CUDA)
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor=random_predictor(0.3)))
    handle.set_step(0)
    attn = model.transformer_blocks[0].attn
    rotary = model.rope(latents)
    video, text, dim = rotary[0].shape[0], 12, attn.to_q.in_features
    hidden = torch.randn(1, video, dim, device=CUDA, dtype=torch.bfloat16)
    text_states = torch.randn(1, text, dim, device=CUDA, dtype=torch.bfloat16)
    key_valid = torch.ones(1, video + text, dtype=torch.bool, device=CUDA)
    key_valid[:, -4:] = False
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=text_states, attention_mask=key_valid[:, None, None, :],
                   image_rotary_emb=rotary)
        mask = handle.mask("transformer_blocks.0.attn")
        want = handle.layers["transformer_blocks.0.attn"].stock(
            attn, hidden, encoder_hidden_states=text_states, attention_mask=expand_mask(mask, key_valid),
            image_rotary_emb=rotary)
    assert not mask.to_dense()[..., -4:].any()
    for got, expected in zip(out, want):
        assert relative_l2(got.float(), expected.float()) < 2e-2


def test_sparse_schedule_follows_the_reference_and_refreshes_on_schedule():
    """Several steps with a reused, periodically refreshed mask: the kernel's trajectory stays on
    the exact-reference trajectory with the same masks, near the dense one, and predicts exactly
    on the scheduled steps."""
    _, model = bf16_pair(tiny_wan(head_dim=128))
    latents, text = wan_inputs(frames=3, size=32, device=CUDA)
    dense = wan_trajectory(model, latents, text, 6)

    schedule = dict(dense_steps=1, refresh_every=2)
    counter = CountingPredictor(random_predictor(0.4))
    fd.apply(model, fd.SparseAttentionConfig(predictor=counter, attention_fn=reference_attention_fn, **schedule))
    exact = wan_trajectory(model, latents, text, 6)
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor=counter, **schedule))
    ours = wan_trajectory(model, latents, text, 6)

    for step, (o, e, d) in enumerate(zip(ours, exact, dense)):
        assert relative_l2(o, e) < 2e-2, step
        assert relative_l2(o, d) < 5e-2, step
    stats = handle.stats()
    assert all(s.refresh_steps == [1, 3, 5] for s in stats.values())
    assert all((s.dense_calls, s.sparse_calls) == (1, 5) for s in stats.values())
    assert counter.calls == 2 * 2 * 3  # two runs x two layers x three refreshes
    assert 0.3 < handle.mask("blocks.0.attn1").density() < 0.5


@pytest.mark.skipif(not hasattr(fgcupy, "predict_mask"), reason="fgcupy.predict_mask is not in this fgcupy yet")
@pytest.mark.parametrize("method, params", [("topk", {"density": 0.3}), ("tau", {"tau": 0.9})])
@pytest.mark.parametrize("from_warmup, refresh_steps", [(None, [0, 3]), (False, [1, 3])],
                         ids=["default_exact_start", "predicted_start"])
def test_predict_mask_schedule_stays_close_to_dense(method, params, from_warmup, refresh_steps):
    """Default (the warm-up's exact mask, refreshed sparsely) and predicted schedules."""
    _, model = bf16_pair(tiny_wan(head_dim=128))
    latents, text = wan_inputs(frames=3, size=32, device=CUDA)
    dense = wan_trajectory(model, latents, text, 5)
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor=method, dense_steps=1, refresh_every=2,
                                                      mask_from_warmup=from_warmup, **{"density": None, **params}))
    ours = wan_trajectory(model, latents, text, 5)
    for step, (o, d) in enumerate(zip(ours, dense)):
        assert relative_l2(o, d) < 5e-2, step
    assert all(s.refresh_steps == refresh_steps for s in handle.stats().values())
    assert handle.mask("blocks.0.attn1").density() < 1.0


def test_float32_model_falls_back_to_stock_attention():
    model = tiny_wan(head_dim=64).to(CUDA)
    latents, text = wan_inputs(device=CUDA)
    stock = wan_trajectory(model, latents, text, 1, torch.float32)[0]
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor=full_predictor))
    ours = wan_trajectory(model, latents, text, 1, torch.float32)[0]
    assert relative_l2(ours, stock) < 1e-6
    assert all(s.stock_reasons == {"dtype_float32": 1} for s in handle.stats().values())


def test_cpu_model_on_a_gpu_machine_is_a_clear_error():
    model = tiny_wan()
    latents, text = wan_inputs()
    fd.apply(model, fd.SparseAttentionConfig(predictor=full_predictor))
    with pytest.raises(RuntimeError, match="Move the transformer to the GPU"):
        with torch.no_grad():
            model(latents, torch.tensor([500]), text)


def run_schedule(**config):
    """(handle, our trajectory, the stock one) of five steps of a tiny bf16 Wan under ``config``;
    every step stays near dense."""
    _, model = bf16_pair(tiny_wan(head_dim=128))
    latents, text = wan_inputs(frames=3, size=32, device=CUDA)
    dense = wan_trajectory(model, latents, text, 5)
    handle = fd.apply(model, fd.SparseAttentionConfig(**config))
    ours = wan_trajectory(model, latents, text, 5)
    for step, (o, d) in enumerate(zip(ours, dense)):
        assert relative_l2(o, d) < 5e-2, step
    return handle, ours, dense


def test_exact_schedule_on_the_kernel():
    """predictor="colmax" on CUDA: each refresh step runs dense attention through the kernel (its
    output matches the stock trajectory to bf16 noise) and keeps the exact column-max mask; the
    sparse steps between stay near dense."""
    handle, ours, dense = run_schedule(predictor="colmax", density=0.3, dense_steps=1, refresh_every=2)
    assert relative_l2(ours[1], dense[1]) < 2e-2  # refresh: dense through the kernel
    assert all(s.refresh_steps == [1, 3] for s in handle.stats().values())
    assert abs(handle.mask("blocks.0.attn1").density() - 0.3) < 0.02


def test_mask_from_warmup_on_the_kernel():
    """mask_from_warmup on CUDA: the last warm-up step runs dense through the kernel (bf16 noise
    from stock) and makes the mask of the first sparse steps; the predictor refreshes after."""
    handle, ours, dense = run_schedule(density=0.3, dense_steps=2, refresh_every=2, mask_from_warmup=True)
    assert relative_l2(ours[1], dense[1]) < 2e-2  # the warm-up mask's step: dense through the kernel
    stats = handle.stats().values()
    assert all(s.refresh_steps == [1, 4] and s.dense_calls == 2 and s.sparse_calls == 3 for s in stats)
    assert abs(handle.mask("blocks.0.attn1").density() - 0.3) < 0.02


@pytest.mark.parametrize("local_search", [False, True])
def test_sparse_refresh_on_the_kernel(local_search):
    """sparse_refresh on CUDA: after the warm-up's exact mask, each refresh attends through the
    layer's mask (the plan's LSE) and keeps the exact column max over its keys and the
    predictor's (and, with local_search, the old keys moved along the grid, joined by the union
    kernel); the trajectory stays near dense and the masks keep the density."""
    handle, ours, dense = run_schedule(density=0.3, dense_steps=1, refresh_every=2, mask_from_warmup=True,
                                       sparse_refresh=True, local_search=local_search)
    assert handle.grid == ((3, 16, 16) if local_search else None)
    stats = handle.stats().values()
    assert all(s.refresh_steps == [0, 3] and s.dense_calls == 1 and s.sparse_calls == 4 for s in stats)
    assert abs(handle.mask("blocks.0.attn1").density() - 0.3) < 0.02


def test_estimated_first_mask_on_the_kernel():
    """estimate_first_mask on CUDA: no dense call; the first mask is the column max with
    estimated LSEs (kernels' scoring), the searches after it keep the density and the trajectory
    stays near dense (run_schedule checks every step)."""
    handle, _, _ = run_schedule(density=0.3, estimate_first_mask=True)
    assert all(s.refresh_steps == [0, 1, 2, 4] and s.dense_calls == 0 for s in handle.stats().values())
    assert abs(handle.mask("blocks.0.attn1").density() - 0.3) < 0.02


def test_default_schedules_on_the_kernel():
    """The defaults on CUDA: one dense step through the kernel makes the exact first mask, which
    serves the sparse steps after it; with dense_steps=0 the predicted mask is refreshed by
    searches along the grid on the ramp (sparse steps 1, 2, 4)."""
    handle, ours, dense = run_schedule(density=0.3)
    assert relative_l2(ours[0], dense[0]) < 2e-2  # the warm-up step: dense through the kernel
    stats = handle.stats().values()
    assert all(s.refresh_steps == [0] and s.dense_calls == 1 and s.sparse_calls == 4 for s in stats)
    handle, _, _ = run_schedule(density=0.3, dense_steps=0)
    assert handle.grid == (3, 16, 16)
    assert all(s.refresh_steps == [0, 1, 2, 4] and s.dense_calls == 0 for s in handle.stats().values())
    assert abs(handle.mask("blocks.0.attn1").density() - 0.3) < 0.02


def test_apply_loads_the_first_steps_kernels_ahead():
    """apply() on a bf16 model already on the GPU starts loading the kernels its first steps launch
    (the dense step's attention and launch order, its column-max scoring pass; the dense call adds
    the selection); each is one that those steps launch."""
    from unittest import mock

    from fgcupy import attention_kernel, mask_kernels
    from fgcupy.jit import runtime

    _, model = bf16_pair(tiny_wan(head_dim=128))
    model.scale_shift_table.data = model.scale_shift_table.data.float()  # as diffusers keeps it
    latents, text = wan_inputs(frames=3, size=32, device=CUDA)
    at_apply, ahead, launched = [], [], []
    real_masks, real_attention = mask_kernels.launch, attention_kernel.launch

    def recording(real):
        def launch(spec, *args, **kw):
            launched.append(spec)
            return real(spec, *args, **kw)
        return launch

    with mock.patch.object(fd, "load_in_background", lambda device, spec: ahead.append(spec)), \
            mock.patch.object(mask_kernels, "launch", recording(real_masks)), \
            mock.patch.object(attention_kernel, "launch", recording(real_attention)):
        fd.apply(model, fd.SparseAttentionConfig(density=0.3))
        at_apply = list(ahead)
        wan_trajectory(model, latents, text, 2)
        runtime.wait_for_background()  # a Hopper kernel a stand-in ran for: in from here on
        wan_trajectory(model, latents, text, 1)
    # 3, and the stand-in of a Hopper attention kernel that is not compiled yet
    assert len(at_apply) in (3, 4) and set(ahead) <= set(launched), (at_apply, ahead, launched)


def test_calibrated_schedule_on_the_kernel():
    """calibrate_pooling on CUDA: the first refresh picks the poolings from sampled queries, they
    drive later refreshes, and the trajectory stays near dense."""
    handle, _, _ = run_schedule(density=0.3, dense_steps=1, refresh_every=2, calibrate_pooling=True)
    stats = handle.stats()
    assert all(s.refresh_steps == [1, 3] and s.dense_calls == 1 and s.calibrations == 1 for s in stats.values())
    poolings = next(iter(handle.layers["blocks.0.attn1"].poolings.values()))
    assert poolings is not None and set(poolings) <= {"mean", "both"}


def test_refresh_on_missed_mass_on_the_kernel():
    """refresh_on_missed_mass on CUDA: the plan's LSE gives each sparse step's recall reading, copied
    to the host without a sync; new latents at step 2 refresh the mask on a later step (step 3
    once the copy has landed), the same latents never."""
    model = tiny_wan(layers=1).to(CUDA, torch.bfloat16)
    latents, text = wan_inputs(device=CUDA, dtype=torch.bfloat16)
    moved = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7)).to(CUDA, torch.bfloat16)
    config = dict(predictor="topk", density=0.3, slice_m=64, dense_steps=0, refresh_every=100,
                  refresh_on_missed_mass=1.01)
    handle = fd.apply(model, fd.SparseAttentionConfig(**config))
    with torch.no_grad():
        for step, x in enumerate([latents, latents, moved, moved, moved, moved]):
            model(x, torch.tensor([1000 - step], device=CUDA), text)
            torch.cuda.synchronize()  # the reading has landed by the next step
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 3] and stats.missed_mass_refresh_steps == [3]
    handle = fd.apply(model, fd.SparseAttentionConfig(**config))
    with torch.no_grad():
        for step in range(5):
            model(latents, torch.tensor([1000 - step], device=CUDA), text)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0]


@pytest.fixture
def hopper_kernel_from_the_start(monkeypatch):
    """No mma.sync stand-in while the Hopper kernel compiles (attention_kernel.runnable_spec): runs
    compared bit for bit must each run one kernel, also when the first of them is a cold start's."""
    monkeypatch.setenv(attention_kernel.STAND_IN_ENV, "0")


@pytest.mark.usefixtures("hopper_kernel_from_the_start")
@pytest.mark.parametrize("options", [dict(density=0.3), dict(density=0.3, dense_steps=0),
                                     dict(density=0.3, refresh_on_missed_mass=1.5, refresh_every=2)],
                         ids=["default", "searches", "recall"])
def test_compact_masks_give_the_expanded_trajectory(options):
    """compact_masks on CUDA: the layers' masks held compactly and expanded into one shared plan
    on each call give the same outputs, bit for bit, and the same masks as each layer's own
    plan (the dense warm-up and its exact mask, searches from sparse calls, recall readings);
    the cache holds bit maps (d = 0.3 of 768 keys: fewer bytes than int16 keys)."""
    expanded, ours, _ = run_schedule(**options)
    compact, theirs, _ = run_schedule(compact_masks=True, **options)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), step
    for name in expanded.layers:
        held, kept = expanded.mask(name), compact.mask(name)
        assert torch.equal(held.indptr, kept.indptr) and torch.equal(held.indices, kept.indices)
    assert "bits uint8" in compact.describe() and "expanded int32" in expanded.describe()
    assert compact.cache.memory_bytes() < expanded.cache.memory_bytes()
    assert [s.refresh_steps for s in compact.stats().values()] == [s.refresh_steps for s in expanded.stats().values()]


@pytest.mark.usefixtures("hopper_kernel_from_the_start")
def test_compact_masks_of_sizes_that_differ_share_one_buffer():
    """The tau rule keeps a different number of keys per layer: compact masks expand (and fresh
    ones are planned) into the shared plan's buffer, grown to the largest layer's mask, with the
    expanded run's outputs."""
    options = dict(predictor="tau", tau=0.9, mask_from_warmup=False, sparse_refresh=False, refresh_every=2)
    expanded, ours, _ = run_schedule(**options)
    compact, theirs, _ = run_schedule(compact_masks=True, **options)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), step
    sizes = {name: expanded.mask(name).indices.numel() for name in expanded.layers}
    assert len(set(sizes.values())) > 1, sizes  # the case this test is for
    (plan,) = compact._shared_plans.values()
    assert plan.mask.indices.numel() >= max(sizes.values())  # grown to the largest it held


@pytest.mark.usefixtures("hopper_kernel_from_the_start")
def test_compact_masks_none_chooses_compact_past_its_share_of_the_gpu(monkeypatch):
    """compact_masks=None (the default) on CUDA: tiny masks stay expanded; with the share set to
    0 every mask passes it, and the schedule runs compact with the expanded one's outputs."""
    expanded, ours, _ = run_schedule(density=0.3)
    assert expanded.compact_masks is False and "expanded int32" in expanded.describe()
    monkeypatch.setattr(fd, "COMPACT_SHARE", 0.0)
    compact, theirs, _ = run_schedule(density=0.3)
    assert compact.compact_masks is True and "bits uint8" in compact.describe()
    for step, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), step
