"""fgcupy.integrations.diffusers on CPU: wiring, schedule, fallbacks and the processors' math.

The kernel needs a GPU, so the math is checked with ``attention_fn`` set to fgcupy's exact
reference: the processors must then reproduce the stock diffusers processors (full mask), or the
stock processors given the same slice mask as a dense boolean mask (sparse masks)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install 'fgcupy[diffusers]'")

import fgcupy  # noqa: E402
from fgcupy import SliceMask, relative_l2  # noqa: E402
from fgcupy.integrations import diffusers as fd  # noqa: E402
from fgcupy.local_search import search_offsets  # noqa: E402
from fgcupy.mask_algebra import drop_keys, union_reference  # noqa: E402
from fgcupy.oracle import exact_lse  # noqa: E402

from .tiny_diffusers import (  # noqa: E402
    CountingPredictor,
    cogvideox_inputs,
    cpu_config,
    expand_mask,
    full_predictor,
    hunyuan_attention_call,
    hunyuan_inputs,
    random_predictor,
    reference_attention_fn,
    run_wan,
    tiny_cogvideox,
    tiny_hunyuan,
    tiny_wan,
    wan_inputs,
)


def run_hunyuan(model, inputs, t=500):
    latents, text, text_mask, pooled = inputs
    with torch.no_grad():
        return model(latents, torch.tensor([t]), text, text_mask, pooled).sample


# ---------------------------------------------------------------------------------------------
# wiring
# ---------------------------------------------------------------------------------------------
def test_apply_patches_wan_self_attention_only_and_remove_restores():
    model = tiny_wan()
    before = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    handle = fd.apply(model, cpu_config())

    assert list(handle.layers) == ["blocks.0.attn1", "blocks.1.attn1"]
    for i, block in enumerate(model.blocks):
        assert isinstance(block.attn1.processor, fd.WanSparseProcessor)
        assert block.attn1.processor.stock is before[f"blocks.{i}.attn1"]
        assert block.attn2.processor is before[f"blocks.{i}.attn2"]  # cross-attention untouched
    assert len(model._forward_pre_hooks) == 1
    assert fd.handle_of(model) is handle

    assert fd.remove(model) is handle
    after = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    assert all(after[name] is before[name] for name in before)
    assert len(model._forward_pre_hooks) == 0
    assert fd.handle_of(model) is None
    with pytest.raises(ValueError, match="not applied"):
        fd.remove(model)


def test_apply_patches_hunyuan_joint_attention_not_the_text_refiner():
    model = tiny_hunyuan()
    handle = fd.apply(model, cpu_config())
    assert list(handle.layers) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
    assert isinstance(model.transformer_blocks[0].attn.processor, fd.HunyuanVideoSparseProcessor)
    refiner = model.context_embedder.token_refiner.refiner_blocks[0].attn
    assert not isinstance(refiner.processor, fd._Processor)
    fd.remove(model)
    assert not any(isinstance(getattr(m, "processor", None), fd._Processor) for m in model.modules())


def test_apply_twice_replaces_the_first_installation():
    model = tiny_wan()
    stock = model.blocks[0].attn1.processor
    first = fd.apply(model, cpu_config())
    second = fd.apply(model, cpu_config(dense_steps=3))
    assert second is not first and second.config.dense_steps == 3
    assert model.blocks[0].attn1.processor.stock is stock  # wraps the original, not the first wrapper
    assert len(model._forward_pre_hooks) == 1
    fd.remove(model)
    assert model.blocks[0].attn1.processor is stock


def test_a_patched_model_refuses_deep_copies_and_pickling_with_what_to_do():
    """A copy would keep reaching the original's layers (remove() on it could not restore it):
    refused, naming the way round; after remove() the model copies and pickles as any."""
    import copy
    import io

    model = tiny_wan()
    fd.apply(model, cpu_config())
    with pytest.raises(TypeError, match="cannot be deep-copied: copy it before apply"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="cannot be pickled .* save its state_dict"):
        torch.save(model, io.BytesIO())
    fd.remove(model)
    twin = copy.deepcopy(model)
    fd.apply(twin, cpu_config())
    torch.save(model, io.BytesIO())


def test_remove_keeps_a_processor_set_after_apply():
    model = tiny_wan()
    fd.apply(model, cpu_config())
    replacement = type(fd.handle_of(model).layers["blocks.0.attn1"].stock)()
    model.blocks[0].attn1.set_processor(replacement)
    fd.remove(model)
    assert model.blocks[0].attn1.processor is replacement
    assert not isinstance(model.blocks[1].attn1.processor, fd._Processor)


def test_apply_rejects_models_without_supported_layers_and_bad_dense_layers():
    with pytest.raises(TypeError, match="no self-attention layer"):
        fd.apply(torch.nn.Linear(4, 4), cpu_config())
    with pytest.raises(ValueError, match=r"dense_layers \[2\] out of range"):
        fd.apply(tiny_wan(), cpu_config(dense_layers=(2,)))
    with pytest.raises(TypeError, match="SparseAttentionConfig"):
        fd.apply(tiny_wan(), {"density": 0.1})


def test_attention_backend_setting_reaches_the_stock_processor():
    model = tiny_wan()
    latents, text = wan_inputs()
    expected = run_wan(model, latents, text)
    fd.apply(model, cpu_config(dense_steps=10))  # dense: every call goes through the stock processor
    model.set_attention_backend("native")
    proc = model.blocks[0].attn1.processor
    assert proc._attention_backend is not None
    assert proc.stock._attention_backend is proc._attention_backend
    torch.testing.assert_close(run_wan(model, latents, text), expected, rtol=0, atol=0)
    model.reset_attention_backend()


# ---------------------------------------------------------------------------------------------
# the processors' math
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_wan_full_mask_equals_stock(fused):
    model = tiny_wan()
    if fused:
        model.fuse_qkv_projections()
    latents, text = wan_inputs()
    expected = run_wan(model, latents, text)
    handle = fd.apply(model, cpu_config())
    out = run_wan(model, latents, text)
    assert relative_l2(out, expected) < 1e-5
    assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())


def test_hunyuan_full_mask_with_text_padding_equals_stock():
    model = tiny_hunyuan()
    inputs = hunyuan_inputs(valid_text=9)
    expected = run_hunyuan(model, inputs)
    handle = fd.apply(model, cpu_config())
    out = run_hunyuan(model, inputs)
    assert relative_l2(out, expected) < 1e-5
    assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())
    # The padding was folded into the mask: padded text keys are gone from every row.
    for name in handle.layers:
        kept = handle.mask(name).to_dense()
        assert not kept[..., -3:].any() and kept[..., :-3].all()


def run_cogvideox(model, inputs, t=500):
    latents, text, rotary = inputs
    with torch.no_grad():
        return model(latents, text, torch.tensor([t]), image_rotary_emb=rotary).sample


def test_cogvideox_full_mask_equals_stock():
    """CogVideoX's joint attention (text first, rotary embedding on the video tokens only)."""
    model = tiny_cogvideox()
    inputs = cogvideox_inputs()
    expected = run_cogvideox(model, inputs)
    handle = fd.apply(model, cpu_config())
    out = run_cogvideox(model, inputs)
    assert relative_l2(out, expected) < 1e-5
    assert len(handle.layers) == 2
    assert all(s.sparse_calls == 1 and s.stock_calls == 0 for s in handle.stats().values())
    assert handle.mask("transformer_blocks.0.attn1").kv_len == 7 + 3 * 8 * 8


def test_cogvideox_sparse_mask_equals_stock_attention_through_the_same_mask():
    """A sparse mask changes the result exactly as attention through that mask does: the stock
    processor's math with SDPA given the mask as a dense boolean mask."""
    model = tiny_cogvideox()
    latents, text, rotary = cogvideox_inputs()
    handle = fd.apply(model, cpu_config(predictor=random_predictor(0.3)))
    attn = model.transformer_blocks[0].attn1
    video = torch.randn(1, 3 * 8 * 8, attn.to_q.in_features)
    context = torch.randn(1, 7, attn.to_q.in_features)
    with torch.no_grad():
        out_video, out_text = attn(video, context, image_rotary_emb=rotary)
        mask = handle.mask("transformer_blocks.0.attn1")
        assert 0.2 < mask.density() < 0.5
        stock = handle.layers["transformer_blocks.0.attn1"].stock
        seen = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def masked_sdpa(q, k, v, attn_mask=None, **kwargs):
            seen.append(q.shape)
            return sdpa(q, k, v, attn_mask=expand_mask(mask), **kwargs)

        torch.nn.functional.scaled_dot_product_attention = masked_sdpa
        try:
            expected_video, expected_text = stock(attn, video, context, image_rotary_emb=rotary)
        finally:
            torch.nn.functional.scaled_dot_product_attention = sdpa
        dense_video, _ = stock(attn, video, context, image_rotary_emb=rotary)
    assert seen  # the stock processor went through the masked call
    assert relative_l2(out_video, expected_video) < 1e-5 and relative_l2(out_text, expected_text) < 1e-5
    assert relative_l2(out_video, dense_video) > 1e-2  # the mask did change the result


def test_cogvideox_positional_timestep_and_grid():
    """CogVideoX takes the timestep third (after the text states) and latents frame-first: a
    positional call still counts steps, and the local search reads the right token grid."""
    model = tiny_cogvideox()
    inputs = cogvideox_inputs()
    handle = fd.apply(model, cpu_config(predictor="topk", density=0.3, sparse_refresh=True, local_search=True,
                                        refresh_every=1))
    for step in range(3):
        run_cogvideox(model, inputs, t=900 - 100 * step)
    assert handle.step == 2 and handle.grid == (3, 8, 8)
    assert handle.stats()["transformer_blocks.0.attn1"].refresh_steps == [0, 1, 2]
    assert fd.token_grid(model.config, inputs[0], frames_first=True) == (3, 8, 8)


def test_default_schedules_through_apply():
    """The defaults as a pipeline meets them: one dense step whose exact mask serves the sparse
    steps until the refresh 20 sparse steps on; with dense_steps=0, a predicted first mask and
    searching refreshes on the ramp (sparse steps 1, 2, 4, 8, ...)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(predictor="topk", density=0.3, slice_m=64, dense_steps=None))
    for step in range(23):
        run_wan(model, latents, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.dense_calls, stats.sparse_calls) == (1, 22)
    assert stats.refresh_steps == [0, 21]  # the warm-up's mask, then the first sparse refresh
    handle = fd.apply(model, cpu_config(predictor="topk", density=0.3, slice_m=64))
    for step in range(10):
        run_wan(model, latents, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.dense_calls, stats.sparse_calls) == (0, 10)
    assert stats.refresh_steps == [0, 1, 2, 4, 8]
    assert handle.layers["blocks.0.attn1"].slots[0].searches == 4


def test_wan_sparse_mask_equals_stock_with_the_same_dense_mask():
    model = tiny_wan()
    latents, _ = wan_inputs()
    handle = fd.apply(model, cpu_config(predictor=random_predictor(0.3)))
    attn = model.blocks[0].attn1
    rotary = model.rope(latents)
    hidden = torch.randn(1, rotary[0].shape[1], attn.to_q.in_features)
    with torch.no_grad():
        out = attn(hidden, None, None, rotary)
        mask = handle.mask("blocks.0.attn1")
        assert 0.2 < mask.density() < 0.5
        expected = handle.layers["blocks.0.attn1"].stock(attn, hidden, None, expand_mask(mask), rotary)
        dense = handle.layers["blocks.0.attn1"].stock(attn, hidden, None, None, rotary)
    assert relative_l2(out, expected) < 1e-5
    assert relative_l2(out, dense) > 1e-2  # the mask did change the result


@pytest.mark.parametrize("block", ["transformer_blocks", "single_transformer_blocks"])
def test_hunyuan_sparse_mask_with_padding_equals_stock_with_the_same_dense_mask(block):
    model = tiny_hunyuan()
    latents, _, _, _ = hunyuan_inputs()
    handle = fd.apply(model, cpu_config(predictor=random_predictor(0.5)))
    name = f"{block}.0.attn"
    attn = getattr(model, block)[0].attn
    rotary = model.rope(latents)
    video, text, dim = rotary[0].shape[0], 12, attn.to_q.in_features
    hidden, text_states = torch.randn(1, video, dim), torch.randn(1, text, dim)
    key_valid = torch.ones(1, video + text, dtype=torch.bool)
    key_valid[:, -4:] = False
    padding = key_valid[:, None, None, :]
    with torch.no_grad():
        out = attn(hidden, encoder_hidden_states=text_states, attention_mask=padding, image_rotary_emb=rotary)
        mask = handle.mask(name)
        assert not mask.to_dense()[..., -4:].any()
        expected = handle.layers[name].stock(attn, hidden, encoder_hidden_states=text_states,
                                             attention_mask=expand_mask(mask, key_valid), image_rotary_emb=rotary)
    for got, want in zip(out, expected):
        assert relative_l2(got, want) < 1e-5


# ---------------------------------------------------------------------------------------------
# steps and the refresh schedule
# ---------------------------------------------------------------------------------------------
def test_schedule_with_guidance_branches_and_a_dense_layer():
    model = tiny_wan()
    latents, text = wan_inputs()
    counter = CountingPredictor(full_predictor)
    handle = fd.apply(model, cpu_config(predictor=counter, dense_steps=2, refresh_every=3, dense_layers=(1,)))
    for step in range(9):
        for _ in range(2):  # conditional and unconditional pass of classifier-free guidance
            run_wan(model, latents, text, t=1000 - 100 * step)
        assert (handle.step, handle.branch) == (step, 1)
    sparse, dense = handle.stats()["blocks.0.attn1"], handle.stats()["blocks.1.attn1"]
    assert sparse.refresh_steps == [2, 2, 5, 5, 8, 8]
    assert (sparse.dense_calls, sparse.sparse_calls, sparse.stock_calls) == (4, 14, 0)
    assert (dense.dense_calls, dense.sparse_calls, dense.refreshes) == (18, 0, 0)
    assert counter.calls == 6
    assert handle.refresh_counts() == {"blocks.0.attn1": 6, "blocks.1.attn1": 0}


def test_step_lists_cover_one_generation_and_counts_every_one():
    """A long-running pipeline's statistics do not grow with its generations: the step lists
    start anew with each generation, ``refreshes`` and the call counts keep them all."""
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config(refresh_every=2, dense_steps=0))
    latents, text = wan_inputs()
    for generation in range(3):
        for step in range(4):
            run_wan(model, latents, text, t=1000 - 100 * step)  # back to 1000: a new generation
        stats = handle.stats()["blocks.0.attn1"]
        assert handle.generation == generation
        assert stats.refresh_steps == [0, 2] and stats.refreshes == 2 * (generation + 1)
        assert stats.sparse_calls == 4 * (generation + 1)
    assert handle.refresh_counts() == {"blocks.0.attn1": 6}
    handle.reset(clear_stats=True)
    assert handle.stats()["blocks.0.attn1"].refreshes == 0


def test_explicit_refresh_steps_and_shared_branches():
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(dense_steps=1, refresh_steps=(4, 6)))
    for step in range(8):
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [1, 4, 6]  # first sparse step, then the list

    counter = CountingPredictor(full_predictor)
    handle = fd.apply(model, cpu_config(predictor=counter, refresh_every=2, share_branches=True))
    for step in range(4):
        run_wan(model, latents, text, t=1000 - 100 * step)
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0, 2]
    assert handle.stats()["blocks.0.attn1"].sparse_calls == 8
    assert counter.calls == 2
    shared = handle.mask("blocks.0.attn1", 1)  # the second branch attends through the first's mask
    assert shared is not None and torch.equal(shared.indices, handle.mask("blocks.0.attn1").indices)


@pytest.mark.parametrize("predictor", ["topk", "colmax"])
def test_refresh_on_drift(predictor):
    """refresh_on_drift re-predicts a layer's mask on the step its inputs moved (new latents), not
    on steps that barely moved, besides the schedule (here: only the first sparse step)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    moved = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    density = dict(density=0.5) if predictor == "topk" else {}
    handle = fd.apply(model, cpu_config(predictor=predictor, refresh_every=100, refresh_on_drift=0.05, **density))
    for step, x in enumerate([latents, latents, moved, moved]):
        run_wan(model, x, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 2] and stats.drift_refresh_steps == [2]
    assert stats.dense_calls == (2 if predictor == "colmax" else 0)


def test_refresh_on_drift_with_shared_branches_judges_the_first_branch():
    """With share_branches the second branch (other inputs, the same mask) never counts as drift."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    other = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    handle = fd.apply(model, cpu_config(refresh_every=100, refresh_on_drift=0.05, share_branches=True))
    for step in range(3):
        run_wan(model, latents, text, t=1000 - step)
        run_wan(model, other, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0] and stats.drift_refresh_steps == []
    assert stats.sparse_calls == 6


def test_refresh_on_missed_mass_refreshes_the_step_after_the_mask_lost_mass():
    """New latents at step 2 move the attention off the mask: its reading of that step misses more
    mass and the next step refreshes; the same inputs again read the same (no refresh)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    moved = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    config = dict(predictor="topk", density=0.3, slice_m=64, refresh_every=100, refresh_on_missed_mass=1.01)
    handle = fd.apply(model, cpu_config(**config))
    for step, x in enumerate([latents, latents, moved, moved, moved]):
        run_wan(model, x, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 3] and stats.missed_mass_refresh_steps == [3]
    handle = fd.apply(model, cpu_config(**config))
    for step in range(5):
        run_wan(model, latents, text, t=1000 - step)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0]


def test_a_recall_reading_still_on_its_way_is_read_before_the_next():
    """A reading whose copy to the host has not landed (its event not done) is kept, not replaced
    by the next step's; once it lands, a fallen reading refreshes the mask."""

    class Event:
        done = False

        def query(self):
            return self.done

    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(predictor="topk", density=0.3, slice_m=64, refresh_every=100,
                                        refresh_on_missed_mass=2.0))
    for step in range(2):
        run_wan(model, latents, text, t=1000 - step)
    slot = handle.layers["blocks.0.attn1"].slots[0]
    pending = (torch.tensor(True), Event())
    slot.missed_more = pending
    run_wan(model, latents, text, t=998)
    assert slot.missed_more is pending and handle.stats()["blocks.0.attn1"].refresh_steps == [0]
    pending[1].done = True
    run_wan(model, latents, text, t=997)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 3] and stats.missed_mass_refresh_steps == [3]
    snapshot = handle.stats()["blocks.0.attn1"]
    handle.layers["blocks.0.attn1"].stats.missed_mass_refresh_steps.append(99)
    assert snapshot.missed_mass_refresh_steps == [3]  # stats() copies


def test_refresh_on_missed_mass_with_shared_branches_judges_the_first_branch():
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    other = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    handle = fd.apply(model, cpu_config(predictor="topk", density=0.3, slice_m=64, refresh_every=100,
                                        refresh_on_missed_mass=1.01, share_branches=True))
    for step in range(4):
        run_wan(model, latents, text, t=1000 - step)
        run_wan(model, other, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0] and stats.missed_mass_refresh_steps == []


@pytest.mark.parametrize("bad", [0, 1, 0.5, -2.0, True, "2", float("inf"), float("nan")])
def test_refresh_on_missed_mass_is_a_factor_above_1(bad):
    with pytest.raises(ValueError, match="refresh_on_missed_mass must be a number in"):
        cpu_config(refresh_on_missed_mass=bad)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_mask_recall_is_the_mass_the_mask_keeps_on_sampled_queries(device, dtype):
    """exp(sparse LSE - exact LSE) of the sampled rows equals the exact probability they put on the
    kept keys (float64), padded keys left out of both; q and k as the integration hands them
    ([B, S, H, D] seen as [B, H, S, D])."""
    from fgcupy.cache import mask_recall

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 200, 3, 64, generator=gen).to(device, dtype).transpose(1, 2) for _ in range(3))
    key_valid = torch.ones(2, 200, dtype=torch.bool, device=device)
    key_valid[1, 150:] = False
    mask = drop_keys(fgcupy.predict_mask(q, k, 64, "topk", density=0.3), key_valid)
    _, lse = fgcupy.reference_attention(q, k, v, mask)
    got = mask_recall(q, k, lse, 0.125, key_valid, samples=7)
    rows = torch.linspace(0, 199, 7).round().long().to(device)
    logits = (q[:, :, rows].double() @ k.double().transpose(-1, -2)) * 0.125
    logits.masked_fill_(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, -1)
    kept = mask.to_dense()[:, :, rows // 64]
    expected = (probs * kept).sum(-1).mean(-1)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    full = fgcupy.SliceMask.full(2, 3, 200, 200, 64, device=device)
    got_full = mask_recall(q, k, fgcupy.reference_attention(q, k, v, full)[1], 0.125)
    torch.testing.assert_close(got_full, torch.ones(2, 3, device=device), rtol=0, atol=1e-5)


def test_block_means_drift():
    from fgcupy.cache import block_means, means_drift

    x = torch.randn(1, 2, 300, 16, generator=torch.Generator().manual_seed(0))
    means = block_means(x, 128)
    assert means.shape == (1, 2, 3, 16)
    torch.testing.assert_close(means[0, 1, 2], x[0, 1, 256:].mean(0))
    assert abs(float(means_drift(means, means))) < 1e-6
    assert float(means_drift(means, -means)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different shapes"):
        means_drift(means, means[:, :1])


def test_masks_live_in_the_mask_cache_and_reuse_is_the_same_object():
    """Reuse steps hand the very mask of the refresh step to attention (no per-step conversion)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    seen = []

    def recording(q, k, v, mask, scale):
        seen.append(mask)
        return reference_attention_fn(q, k, v, mask, scale)

    handle = fd.apply(model, cpu_config(attention_fn=recording, dense_steps=1, refresh_every=3))
    assert isinstance(handle.cache, fgcupy.MaskCache) and handle.cache.expanded
    for step in range(5):
        for _ in range(2):
            run_wan(model, latents, text, t=1000 - 100 * step)
    # sparse calls: steps 1..4, two branches each; refresh on steps 1 and 4
    assert len(seen) == 8 and seen[0] is not seen[1]  # branch 1 holds its own mask
    assert seen[2] is seen[4] is seen[0] and seen[3] is seen[5] is seen[1]  # steps 2, 3 reuse
    assert seen[6] is not seen[0] and seen[7] is not seen[1]  # step 4 refreshes
    assert sorted(handle.cache.layers()) == [("blocks.0.attn1", 0), ("blocks.0.attn1", 1)]
    held = handle.mask("blocks.0.attn1", 1)  # a copy: a later refresh in place leaves it as it is
    assert held is not seen[7] and torch.equal(held.indices, seen[7].indices)
    assert held.indices.data_ptr() != seen[7].indices.data_ptr()
    assert handle.mask_memory_bytes() == handle.cache.memory_bytes() > 0
    assert "refresh every 3 steps from step 1" in handle.describe()
    assert (handle.cache.predictions, handle.cache.reuses) == (4, 4)


def _recording(seen):
    def attention_fn(q, k, v, mask, scale):
        seen.append((q, k, mask))
        return reference_attention_fn(q, k, v, mask, scale)
    return attention_fn


def test_exact_schedule_refreshes_densely_with_column_max_masks():
    """predictor="colmax": refresh calls return dense attention and keep the exact column-max
    mask of their LSE; the steps between run sparse on it."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    dense = [run_wan(model, latents, text, t=1000 - 100 * step) for step in range(4)]
    seen = []
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor="colmax", density=0.3, slice_m=64, refresh_every=2,
                                                      attention_fn=_recording(seen)))
    outs = [run_wan(model, latents, text, t=1000 - 100 * step) for step in range(4)]
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 2] and (stats.dense_calls, stats.sparse_calls) == (2, 2)
    assert relative_l2(outs[0], dense[0]) < 1e-5  # a refresh step is exact
    assert relative_l2(outs[1], dense[1]) > 1e-4  # the next one is sparse
    q, k, full = seen[0]
    assert full.density() == 1.0
    lse = exact_lse(q.transpose(1, 2), k.transpose(1, 2))
    expected = fgcupy.predict_mask(q.transpose(1, 2), k.transpose(1, 2), 64, method="colmax", lse=lse, rule="topk",
                                   density=0.3)
    assert torch.equal(seen[1][2].to_dense(), expected.to_dense())
    assert abs(expected.density() - 0.3) < 0.01


@pytest.mark.parametrize("share_branches", [False, True])
def test_mask_from_warmup_serves_the_first_sparse_step(share_branches):
    """mask_from_warmup: the last warm-up step returns dense attention through fgcupy's path and
    keeps the exact column-max mask of its LSE, which the first sparse step uses without
    predicting; with sparse_refresh=False the schedule's later refreshes predict (guidance branches: one mask per branch,
    or one in all with share_branches)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    steps, branches = 5, 2
    dense = [run_wan(model, latents, text, t=1000 - 100 * step) for step in range(steps)]
    seen = []
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.3, slice_m=64, dense_steps=2, refresh_every=2,
                                                      mask_from_warmup=True, sparse_refresh=False,
                                                      share_branches=share_branches, attention_fn=_recording(seen)))
    outs = [[run_wan(model, latents, text, t=1000 - 100 * step) for _ in range(branches)] for step in range(steps)]
    stats = handle.stats()["blocks.0.attn1"]
    made = 1 if share_branches else branches
    # step 0: stock; step 1: the warm-up mask(s); steps 2, 3: that mask; step 4: the predictor.
    assert stats.refresh_steps == [1] * made + [4] * made
    assert (stats.dense_calls, stats.sparse_calls) == (2 * branches, 3 * branches)
    assert all(relative_l2(out, dense[step]) < 1e-5 for step in (0, 1) for out in outs[step])
    assert relative_l2(outs[2][0], dense[2]) > 1e-4  # sparse from step 2
    q, k, full = seen[0]
    assert full.density() == 1.0 and len(seen) == made + 3 * branches
    lse = exact_lse(q.transpose(1, 2), k.transpose(1, 2))
    expected = fgcupy.predict_mask(q.transpose(1, 2), k.transpose(1, 2), 64, method="colmax", lse=lse, rule="topk",
                                   density=0.3)
    first_sparse = seen[made]
    assert torch.equal(first_sparse[2].to_dense(), expected.to_dense())
    assert seen[made + branches][2] is first_sparse[2]  # step 3 reuses it
    assert seen[made + 2 * branches][2] is not first_sparse[2]  # step 4 predicts
    assert handle.cache.predictions == 2 * made


@pytest.mark.parametrize("warmup", [False, True], ids=["predicted_first", "mask_from_warmup"])
def test_sparse_refresh_attends_through_the_old_mask_and_keeps_the_exact_one_over_candidates(warmup):
    """sparse_refresh: a refresh step with a mask attends through it, and the mask it keeps for the
    next steps is the exact column max, with that call's LSE over the old mask's keys, over the
    old mask's and the predictor's keys."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    seen = []
    schedule = dict(dense_steps=1, mask_from_warmup=True) if warmup else dict(dense_steps=0)
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.25, slice_m=64, refresh_every=2, sparse_refresh=True,
                                                      local_search=False, attention_fn=_recording(seen), **schedule))
    first = 1 if warmup else 0
    for step in range(first + 5):
        run_wan(model, latents, text, t=1000 - 100 * step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, first + 2, first + 4]
    assert stats.dense_calls == (1 if warmup else 0) and stats.sparse_calls == 5
    sparse = seen[1:] if warmup else seen  # (q, k, mask) of each sparse call
    assert sparse[2][2] is sparse[1][2] is sparse[0][2]  # the refresh step attends through the old mask
    assert sparse[3][2] is not sparse[2][2] and sparse[4][2] is sparse[3][2]
    q, k, old = (x.transpose(1, 2) if i < 2 else x for i, x in enumerate(sparse[2]))
    _, lse = fgcupy.sparse_attention(q, k, k, old, return_lse=True)
    predicted = fgcupy.predict_mask(q, k, 64, "topk", density=0.25)
    expected = fgcupy.predict_mask(q, k, 64, "colmax", rule="topk", density=0.25, lse=lse, candidates=[old, predicted])
    assert torch.equal(sparse[3][2].to_dense(), expected.to_dense())
    assert not (expected.to_dense() & ~(old.to_dense() | predicted.to_dense())).any()
    assert not torch.equal(expected.to_dense(), predicted.to_dense())


def test_estimate_first_mask_makes_the_first_mask_from_estimated_lses_and_searches_after():
    """estimate_first_mask: no dense step by default; the first sparse step's mask is the exact
    column max with estimated LSEs, and the refreshes after it search around it (no estimate)."""
    config = fd.SparseAttentionConfig(density=0.25, slice_m=64, estimate_first_mask=True, attention_fn=None)
    assert (config.dense_steps, config.mask_from_warmup, config.sparse_refresh, config.local_search,
            config.predict_on_refresh) == (0, False, True, True, False)
    assert config.mask_making().startswith("masks: first the exact column max with estimated LSEs; refreshes sparse")
    warmed = fd.SparseAttentionConfig(density=0.25, estimate_first_mask=True, dense_steps=1)
    assert (warmed.dense_steps, warmed.mask_from_warmup) == (1, False)  # the warm-up does not make the first mask
    model = tiny_wan(layers=1)
    latents, text = wan_inputs(frames=3, size=16)
    seen, estimates = [], []
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.25, slice_m=64, estimate_first_mask=True,
                                                      attention_fn=_recording(seen)))
    predict = handle._predict
    handle._predict = lambda layer, q, k, lse=None, *a: estimates.append(lse) or predict(layer, q, k, lse, *a)
    for step in range(3):
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert estimates == ["estimate"]  # the first mask; sparse steps 1 and 2 refresh by searching
    q, k, first = (x.transpose(1, 2) if i < 2 else x for i, x in enumerate(seen[0]))
    expected = fgcupy.predict_mask(q, k, 64, "colmax", rule="topk", density=0.25, lse="estimate")
    assert torch.equal(first.to_dense(), expected.to_dense())
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0, 1, 2]
    assert not torch.equal(first.to_dense(), fgcupy.predict_mask(q, k, 64, "topk", density=0.25).to_dense())


@pytest.mark.parametrize("dense_steps", [0, 1])
def test_the_auto_predictor_makes_the_masks_predict_mask_auto_makes(dense_steps):
    """predictor="auto": predicted masks are predict_mask(method="auto")'s; with a warm-up step
    the first is the warm-up's exact mask and refreshes add auto's keys as candidates."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs(frames=3, size=16)
    seen = []
    config = fd.SparseAttentionConfig(predictor="auto", density=0.25, slice_m=64, dense_steps=dense_steps,
                                      refresh_every=1, sparse_refresh=False if dense_steps == 0 else None,
                                      attention_fn=_recording(seen))
    assert config.exact_arguments() == {"rule": "topk", "density": 0.25}
    handle = fd.apply(model, config)
    for step in range(3):
        run_wan(model, latents, text, t=1000 - 100 * step)
    q, k, mask = (x.transpose(1, 2) if i < 2 else x for i, x in enumerate(seen[-1]))
    if dense_steps == 0:
        assert torch.equal(mask.to_dense(), fgcupy.predict_mask(q, k, 64, "auto", density=0.25).to_dense())
    else:
        assert config.mask_from_warmup and config.sparse_refresh
    # Without warm-up every step predicts; with it, step 0 makes the exact mask, which serves step 1.
    assert handle.stats()["blocks.0.attn1"].refresh_steps == ([0, 1, 2] if dense_steps == 0 else [0, 2])


@pytest.mark.parametrize("grid, predicts", [(None, True), ((3, 8, 8), True), (None, False)],
                         ids=["grid_from_the_model", "grid_given", "no_prediction"])
def test_local_search_scores_the_old_keys_moved_along_the_grid(grid, predicts):
    """local_search: each refresh's candidates are the old mask's keys moved by a token, a row,
    then a frame of the token grid (read from hidden_states and patch_size unless given), joined
    with the predictor's keys (none with predict_on_refresh=False); the new mask is the exact
    column max over them."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs(frames=3, size=16)
    seen = []
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1,
                                                      sparse_refresh=True,
                                                      local_search=True, grid=grid, predict_on_refresh=predicts,
                                                      attention_fn=_recording(seen)))
    predictions = []
    predict = handle._predict
    handle._predict = lambda *a, **kw: predictions.append(1) or predict(*a, **kw)
    for step in range(5):
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert len(predictions) == (5 if predicts else 1)  # the first mask, then one per refresh
    expected_grid = (3, 8, 8) if grid is None else grid
    assert handle.grid == expected_grid
    for refresh in range(3):  # step refresh + 1 attends through step refresh's mask and makes the next
        q, k, old = (x.transpose(1, 2) if i < 2 else x for i, x in enumerate(seen[refresh + 1]))
        _, lse = fgcupy.sparse_attention(q, k, k, old, return_lse=True)
        predicted = fgcupy.predict_mask(q, k, 64, "topk", density=0.2)
        candidates = union_reference(old, search_offsets(expected_grid, refresh), predicted if predicts else None)
        expected = fgcupy.predict_mask(q, k, 64, "colmax", rule="topk", density=0.2, lse=lse, candidates=[candidates])
        assert torch.equal(seen[refresh + 2][2].to_dense(), expected.to_dense())
    moved = union_reference(old, search_offsets(expected_grid, 2)).to_dense()
    assert (moved & ~(old.to_dense() | predicted.to_dense())).any()  # the search adds keys


def test_local_search_refuses_a_grid_larger_than_the_sequence():
    model = tiny_wan(layers=1)
    latents, text = wan_inputs(frames=3, size=16)  # 3 x 8 x 8 = 192 tokens
    fd.apply(model, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1, sparse_refresh=True,
                                             local_search=True, grid=(3, 8, 9), attention_fn=reference_attention_fn))
    with pytest.raises(ValueError, match=r"grid=\(3, 8, 9\) is not this call's latent token grid \(3, 8, 8\)"):
        run_wan(model, latents, text, t=1000)


def test_a_given_grid_must_be_the_calls_grid():
    """A grid given for one video size is refused at a call of another, and so is one of as many
    tokens laid out otherwise (its search offsets would move keys by the wrong rows and frames)."""
    model = tiny_wan(layers=1)
    fd.apply(model, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1, sparse_refresh=True,
                                             local_search=True, grid=(3, 8, 8), attention_fn=reference_attention_fn))
    run_wan(model, *wan_inputs(frames=3, size=16), t=1000)
    with pytest.raises(ValueError, match=r"grid=\(3, 8, 8\) is not this call's latent token grid \(3, 12, 12\)"):
        run_wan(model, *wan_inputs(frames=3, size=24), t=900)
    transposed = tiny_wan(layers=1)
    fd.apply(transposed, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1,
                                                  sparse_refresh=True, local_search=True, grid=(6, 4, 8),
                                                  attention_fn=reference_attention_fn))
    with pytest.raises(ValueError, match=r"grid=\(6, 4, 8\) is not this call's latent token grid \(3, 8, 8\)"):
        run_wan(transposed, *wan_inputs(frames=3, size=16), t=1000)


def test_a_padding_mask_refilled_in_place_is_read_again():
    """Direct attention calls that reuse one padding buffer: its new contents count (the host copy
    had aliased the caller's CPU mask, so no change was seen and padded keys stayed in)."""
    handle, attn, stock, hidden, text_states, rotary = hunyuan_attention_call(cpu_config())
    video = hidden.shape[1]
    for mode in (torch.no_grad, torch.inference_mode):  # inference tensors have no version counter
        with mode():
            padding = torch.ones(1, 1, 1, video + 12, dtype=torch.bool)
            for valid_text in (12, 6):
                padding.fill_(True)
                padding[..., video + valid_text:] = False
                handle.set_step(0)
                got = attn(hidden, encoder_hidden_states=text_states, attention_mask=padding,
                           image_rotary_emb=rotary)[0]
                want = stock(attn, hidden, encoder_hidden_states=text_states, attention_mask=padding,
                             image_rotary_emb=rotary)[0]
                assert relative_l2(got, want) < 1e-5, (mode.__name__, valid_text)


def test_config_names_predictor_options_the_integration_sets():
    for kwargs in ({"slice_m": 64}, {"candidates": None}, {"method": "tau"}):
        with pytest.raises(ValueError, match="the integration gives the predictor these"):
            fd.SparseAttentionConfig(density=0.1, predictor_kwargs=kwargs)


def test_config_keeps_its_own_predictor_kwargs():
    kwargs = {"min_keys": 4}
    config = fd.SparseAttentionConfig(density=0.2, predictor_kwargs=kwargs)
    kwargs["layout"] = "NHD"
    assert config.predictor_kwargs == {"min_keys": 4}


def test_refresh_steps_inside_the_warm_up_are_refused():
    with pytest.raises(ValueError, match=r"refresh_steps \[0, 3, 7\] lists steps of the warm-up \(\[0, 3\] < dense_steps=5\)"):
        fd.SparseAttentionConfig(density=0.3, dense_steps=5, refresh_steps=(0, 3, 7))


def test_refresh_on_drift_refuses_a_threshold_no_drift_reaches():
    with pytest.raises(ValueError, match=r"refresh_on_drift must be a number in \(0, 2\)"):
        fd.SparseAttentionConfig(density=0.3, refresh_on_drift=2.0)


def test_token_grid_of_wan_and_hunyuan_inputs():
    latents = torch.zeros(1, 4, 5, 16, 12)
    assert fd.token_grid(tiny_wan(layers=1).config, latents) == (5, 8, 6)
    assert fd.token_grid(tiny_hunyuan().config, latents) == (5, 8, 6)
    assert fd.token_grid(tiny_wan(layers=1).config, latents[0]) is None
    assert fd.token_grid(None, latents) is None


@pytest.mark.parametrize("share_branches, local_search", [(False, False), (True, False), (False, True)])
def test_sparse_refresh_with_text_padding_and_guidance_branches(share_branches, local_search):
    """HunyuanVideo's padded text keys stay out of every sparse-refreshed mask (the candidates
    drop them too, moved keys included), with each guidance branch refreshing its own mask or
    sharing the first's."""
    model = tiny_hunyuan()
    inputs = hunyuan_inputs(valid_text=9)
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.5, slice_m=64, dense_steps=0, refresh_every=1,
                                                      sparse_refresh=True,
                                                      share_branches=share_branches, local_search=local_search,
                                                      attention_fn=reference_attention_fn))
    for step in range(3):
        for _ in range(2):
            out = run_hunyuan(model, inputs, t=1000 - 100 * step)
            assert torch.isfinite(out).all()
    made = 1 if share_branches else 2
    for name, stats in handle.stats().items():
        assert stats.refresh_steps == [step for step in range(3) for _ in range(made)]
        assert stats.sparse_calls == 6 and stats.dense_calls == 0
        for branch in range(made):
            mask = handle.mask(name, branch)
            assert not mask.to_dense()[..., -3:].any() and abs(mask.density() - 0.5) < 0.05
    assert handle.grid == ((3, 8, 8) if local_search else None)


def test_mask_from_warmup_in_the_schedule_counts():
    cfg = fd.SparseAttentionConfig(dense_steps=5, refresh_every=5, mask_from_warmup=True)
    assert [s for s in range(20) if cfg.is_refresh_step(s)] == [10, 15]
    assert fd.SparseAttentionConfig(dense_steps=5, refresh_every=5, mask_from_warmup=False).is_refresh_step(5)
    # The exact mask takes the predictor's selection, not its scoring options.
    kwargs = {"pool": 32, "exact_band": 64, "min_keys": 4, "local": 0}
    assert fd.SparseAttentionConfig(dense_steps=1, mask_from_warmup=True, predictor_kwargs=kwargs
                                    ).exact_arguments() == {"rule": "topk", "density": 0.1, "min_keys": 4, "local": 0}
    assert fd.SparseAttentionConfig(predictor="tau", tau=0.8).exact_arguments() == {"rule": "tau", "tau": 0.8}
    assert fd.SparseAttentionConfig(predictor="colmax", tau=0.8).exact_arguments() == {"rule": "tau", "tau": 0.8}


def test_calibrated_schedule_chooses_poolings_once_per_layer():
    """calibrate_pooling: the first refresh picks per-head poolings from sampled queries (no
    dense call) and uses their mask; later refreshes predict with them."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    seen = []
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, dense_steps=0,
                                                      refresh_every=2,
                                                      calibrate_pooling=True, attention_fn=_recording(seen)))
    for step in range(4):
        run_wan(model, latents, text, t=1000 - 100 * step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 2] and (stats.dense_calls, stats.sparse_calls, stats.calibrations) == (0, 4, 1)
    poolings = next(iter(handle.layers["blocks.0.attn1"].poolings.values()))
    assert len(poolings) == seen[0][0].shape[2] and set(poolings) <= {"mean", "both"}
    q, k, mask = seen[0]
    chosen = fgcupy.predict_mask(q.transpose(1, 2), k.transpose(1, 2), 64, "topk", density=0.3, pooling=poolings)
    assert torch.equal(mask.to_dense(), chosen.to_dense())  # step 0: the calibrated mask
    assert torch.equal(seen[1][2].to_dense(), chosen.to_dense())  # step 1 reuses it
    q2, k2, mask2 = seen[2]  # step 2: a refresh with the calibrated poolings
    expected = fgcupy.predict_mask(q2.transpose(1, 2), k2.transpose(1, 2), 64, "topk", density=0.3, pooling=poolings)
    assert torch.equal(mask2.to_dense(), expected.to_dense())


def test_found_diagonals_are_scored_on_every_refresh_of_their_layer(monkeypatch):
    """find_diagonals: a layer's first refresh finds them (once per layer and shape), and every
    refresh predicts with them; reset(recalibrate=True) finds them again."""
    found = []

    def finder(q, k, slice_m, *, count, layout):
        found.append((tuple(q.shape), slice_m, count, layout))
        return (-96, 96)

    monkeypatch.setattr(fd, "find_diagonals", finder)
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    seen = []
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, dense_steps=0,
                                                      refresh_every=2,
                                                      find_diagonals=3, attention_fn=_recording(seen)))
    for step in range(4):
        run_wan(model, latents, text, t=1000 - 100 * step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 2] and stats.diagonals == (-96, 96)
    assert len(found) == 1 and found[0][1:] == (64, 3, "NHD")
    for index in (0, 2):
        q, k, mask = seen[index]
        expected = fgcupy.predict_mask(q.transpose(1, 2), k.transpose(1, 2), 64, "topk", density=0.3,
                                       diagonals=(-96, 96))
        assert torch.equal(mask.to_dense(), expected.to_dense())
    handle.reset(recalibrate=True)
    run_wan(model, latents, text, t=1000)
    assert len(found) == 2


def test_diagonals_are_spaced_by_the_predictors_band_and_scale(monkeypatch):
    """find_diagonals gets the exact_band and scale the predictor uses (it spaced diagonals for the
    default band of 64 whatever the predictor's)."""
    found = []

    def finder(q, k, slice_m, **kwargs):
        found.append(kwargs)
        return ()

    monkeypatch.setattr(fd, "find_diagonals", finder)
    model = tiny_wan(layers=1)
    fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, dense_steps=0, find_diagonals=2,
                                             predictor_kwargs={"exact_band": 16, "scale": 0.1},
                                             attention_fn=reference_attention_fn))
    run_wan(model, *wan_inputs())
    assert found == [dict(count=2, layout="NHD", exact_band=16, scale=0.1)]


def test_the_workspace_bound_reaches_the_column_max_masks(monkeypatch):
    """predictor_kwargs' workspace_bytes bounds every prediction, the exact masks of the warm-up
    and of sparse refreshes included (they had run with the default workspace)."""
    calls = []
    predict = fgcupy.predict_mask

    def spy(*args, **kwargs):
        calls.append((kwargs.get("method"), kwargs.get("workspace_bytes")))
        return predict(*args, **kwargs)

    monkeypatch.setattr(fgcupy, "predict_mask", spy)
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, refresh_every=1,
                                             predictor_kwargs={"workspace_bytes": 1 << 20},
                                             attention_fn=reference_attention_fn))
    for step in range(3):
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert {method for method, _ in calls} >= {"colmax", "topk"}
    assert all(bound == 1 << 20 for _, bound in calls), calls


def test_calibration_is_kept_across_generations_until_asked_again():
    """A head's kind belongs to the model: a new generation keeps the chosen poolings,
    reset(recalibrate=True) chooses again, and a new input shape does too."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, dense_steps=0,
                                                      refresh_every=2,
                                                      calibrate_pooling=True, attention_fn=reference_attention_fn))
    layer = handle.layers["blocks.0.attn1"]

    def generation(inputs=latents):
        handle.reset(clear_stats=True)
        for step in range(3):
            run_wan(model, inputs, text, t=1000 - 100 * step)
        return handle.stats()["blocks.0.attn1"].calibrations

    assert generation() == 1 and len(layer.poolings) == 1
    chosen = dict(layer.poolings)
    assert generation() == 0 and layer.poolings == chosen
    handle.reset(recalibrate=True)
    assert not layer.poolings
    assert generation() == 1 and layer.poolings == chosen  # same inputs, same choice
    assert generation(latents[:, :, :2]) == 1 and len(layer.poolings) == 2  # fewer frames: chosen for them
    wide = latents[:, :, :, :8].contiguous()  # 4 x 8 tokens a frame, then 8 x 4: as many tokens, other rows
    assert generation(wide) == 1 and generation(wide.transpose(-1, -2).contiguous()) == 1
    assert len(layer.poolings) == 4


@pytest.mark.parametrize("schedule", [dict(predictor="colmax"), dict(dense_steps=1, mask_from_warmup=True)],
                         ids=["exact", "mask_from_warmup"])
def test_dense_call_making_the_mask_with_text_padding(schedule):
    """HunyuanVideo: the dense call that makes an exact mask (the exact schedule's refresh, or the
    last warm-up step with mask_from_warmup) drops the padded text keys like the stock processor,
    and so does the mask it keeps."""
    model = tiny_hunyuan()
    inputs = hunyuan_inputs(valid_text=9)
    expected = run_hunyuan(model, inputs)
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.5, slice_m=64, attention_fn=reference_attention_fn,
                                                      **schedule))
    out = run_hunyuan(model, inputs)
    assert relative_l2(out, expected) < 1e-5
    for name, stats in handle.stats().items():
        assert stats.dense_calls == 1 and stats.refresh_steps == [0]
        assert not handle.mask(name).to_dense()[..., -3:].any()


def test_step_tracking_from_timesteps():
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    seen = []
    for t in (900, 900, 800, 800, 700):
        handle.begin_forward(torch.tensor([t]))
        seen.append((handle.step, handle.branch))
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]

    latents, text = wan_inputs()
    run_wan(model, latents, text, t=600)  # through the real pre-hook
    assert (handle.step, handle.branch) == (3, 0)
    assert handle.mask("blocks.0.attn1") is not None
    generation = handle.generation
    run_wan(model, latents, text, t=999)  # a larger timestep: a new generation
    assert (handle.step, handle.branch, handle.generation) == (0, 0, generation + 1)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0] and stats.refreshes == 2  # masks were dropped, predicted anew

    for expected in range(1, 4):  # no timestep: every call is a step
        handle.begin_forward(None)
        assert (handle.step, handle.branch) == (expected, 0)
    # Wan 2.2 gives a timestep per token: the step is read from its largest value.
    handle.begin_forward(torch.tensor([[500, 500, 0]]))
    handle.begin_forward(torch.tensor([[400, 400, 0]]))
    assert (handle.step, handle.branch) == (5, 0)

    handle.set_step(7, branch=1)
    assert (handle.step, handle.branch) == (7, 1)
    handle.reset()
    handle.begin_forward(torch.tensor([100]))
    assert (handle.step, handle.branch) == (0, 0) and handle.mask("blocks.0.attn1") is None
    with pytest.raises(ValueError):
        handle.set_step(-1)
    for step, branch in ((2.7, 0), (True, 0), ("1", 0), (None, 0), (3, 0.9)):  # a float step is no step
        with pytest.raises(ValueError, match="must be ints >= 0"):
            handle.set_step(step, branch=branch)


def test_a_repeated_timestep_after_end_step_is_the_next_step():
    """Timesteps rounded to ints can repeat (999, 999): after end_step (the pipeline callback) the
    same timestep starts the next step instead of another guidance branch."""
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    seen = []
    for t in (999, 999, 999, 999, 998, 998):
        handle.begin_forward(torch.tensor([t]))
        seen.append((handle.step, handle.branch))
        if len(seen) % 2 == 0:  # each step runs two branches, then the pipeline calls back
            kwargs = {"latents": torch.zeros(1)}
            assert handle.step_callback(None, len(seen) // 2 - 1, torch.tensor(t), kwargs) is kwargs
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    handle.reset()
    handle.begin_forward(torch.tensor([999]))
    handle.begin_forward(torch.tensor([999]))
    assert (handle.step, handle.branch) == (0, 1)  # without end_step: a second branch


class _Pipe:
    """What step_callback reads of a diffusers pipeline."""

    def __init__(self, num_timesteps, interrupt=False):
        self.num_timesteps, self.interrupt = num_timesteps, interrupt


@pytest.mark.parametrize("case", ["one-step model", "interrupted", "refining pass"])
def test_the_step_callback_ends_a_generation_so_the_next_starts_at_step_0(case):
    """After a pipeline's last step (or an interrupted one) the next call is step 0 of a new
    generation, though its timestep is the same as (or lower than) the last one's: the
    count alone would make it a later step, reusing the old generation's masks."""
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    first, second = {"one-step model": ([999], [999]), "interrupted": ([999, 800], [700]),
                     "refining pass": ([999, 750, 500, 250], [200, 100])}[case]
    steps = len(first) if case != "interrupted" else 4
    for index, t in enumerate(first):
        for _ in range(2):  # two guidance branches
            handle.begin_forward(torch.tensor([t]))
        pipe = _Pipe(steps, interrupt=case == "interrupted" and index == len(first) - 1)
        handle.step_callback(pipe, index, torch.tensor(t), {})
    generation = handle.generation
    handle.begin_forward(torch.tensor([second[0]]))
    assert (handle.step, handle.branch, handle.generation) == (0, 0, generation + 1)
    handle.begin_forward(torch.tensor([second[0]]))
    assert (handle.step, handle.branch) == (0, 1)


@pytest.mark.parametrize("pipe", [_Pipe(np.int64(1)), _Pipe(torch.tensor(1)), _Pipe(5, interrupt=np.bool_(True)),
                                  _Pipe(5, interrupt=torch.tensor(True))])
def test_the_step_callback_reads_numpy_and_tensor_attributes(pipe):
    handle = fd.apply(tiny_wan(layers=1), cpu_config())
    handle.begin_forward(torch.tensor([999]))
    handle.step_callback(pipe, 0, torch.tensor(999), {})
    handle.begin_forward(torch.tensor([999]))
    assert (handle.step, handle.generation) == (0, 1)


def test_the_step_callback_keeps_a_generation_until_its_last_step():
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    for index, t in enumerate((999, 999, 998)):  # a repeated int timestep, as before
        handle.begin_forward(torch.tensor([t]))
        assert (handle.step, handle.generation) == (index, 0)
        handle.step_callback(_Pipe(3), index, torch.tensor(t), {})
    handle.reset()
    for index, t in enumerate((999, 998)):  # no pipeline: end_step alone, the generation goes on
        handle.begin_forward(torch.tensor([t]))
        handle.step_callback(None, index, torch.tensor(t), {})
    handle.begin_forward(torch.tensor([998]))
    assert (handle.step, handle.generation) == (2, 1)


def test_set_step_at_the_same_step_for_another_branch_keeps_the_generation():
    """Manual counting: each branch of a step sets the step again; only a step before the current
    one starts a new generation (its masks dropped and predicted anew)."""
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config(refresh_every=10**9))
    latents, text = wan_inputs()
    generation = handle.generation
    for step in range(3):
        for branch in (0, 1):
            handle.set_step(step, branch=branch)
            run_wan(model, latents, text)
    assert handle.generation == generation and handle.stats()["blocks.0.attn1"].refresh_steps == [0, 0]


def test_set_step_after_a_finished_generation_starts_one_new_generation_only():
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config(refresh_every=10**9))
    latents, text = wan_inputs()
    handle.begin_forward(torch.tensor([1000]))
    handle.step_callback(_Pipe(1), 0, torch.tensor(1000), {})
    generation = handle.generation
    for step in range(3):
        handle.set_step(step)
        run_wan(model, latents, text)
    assert handle.generation == generation + 1 and handle.stats()["blocks.0.attn1"].refresh_steps[-1:] == [0]
    assert handle.stats()["blocks.0.attn1"].refresh_steps.count(0) == len(handle.stats()["blocks.0.attn1"].refresh_steps)


def test_the_step_callback_frees_the_masks_at_a_generations_end():
    """An idle pipeline held every (layer, branch) mask and plan of its last generation until the
    next call: 10 GiB for Wan-14B at 480p."""
    model = tiny_wan()
    handle = fd.apply(model, cpu_config(dense_steps=0))
    latents, text = wan_inputs()
    for index, t in enumerate((999, 500)):
        for _ in range(2):  # two guidance branches
            run_wan(model, latents, text, t=t)
        assert handle.mask_memory_bytes() > 0
        handle.step_callback(_Pipe(2), index, torch.tensor(t), {})
    assert handle.mask_memory_bytes() == 0 and not any(layer.slots for layer in handle.layers.values())
    run_wan(model, latents, text, t=999)  # the next generation predicts anew
    assert (handle.step, handle.generation) == (0, 1) and handle.mask_memory_bytes() > 0


def test_a_patched_model_is_freed_when_the_last_reference_goes():
    """model -> processor -> handle -> model was a reference cycle: a deleted pipeline's weights and
    masks stayed until a garbage collection happened to run."""
    import gc
    import weakref

    model = tiny_wan()
    handle = fd.apply(model, cpu_config(dense_steps=0))
    latents, text = wan_inputs()
    run_wan(model, latents, text)
    gone = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert gone() is None and handle.transformer is None
    finally:
        gc.enable()


@pytest.mark.parametrize("compact_masks", [False, True])
def test_a_compiled_patched_model_does_not_recompile_per_layer_and_step(compact_masks):
    """Traced, the schedule's state (layer, step, cached masks) became guards: each layer and step
    compiled the processor again, up to torch's recompile limit."""
    import torch._dynamo

    torch._dynamo.reset()
    model = torch.compile(tiny_wan(), backend="eager")
    eager = tiny_wan()
    config = cpu_config(refresh_every=2, compact_masks=compact_masks)
    handle, _ = fd.apply(model, config), fd.apply(eager, config)
    latents, text = wan_inputs()
    same = []
    try:
        for step in range(5):
            t = 1000 - 100 * step
            expected = run_wan(eager, latents, text, t=t)
            if step == 0:
                same.append(torch.equal(run_wan(model, latents, text, t=t), expected))
                continue
            with torch._dynamo.config.patch(error_on_recompile=True):  # every graph exists once each layer ran
                same.append(torch.equal(run_wan(model, latents, text, t=t), expected))
    finally:
        torch._dynamo.reset()
    assert all(same) and handle.stats()["blocks.0.attn1"].refresh_steps == [0, 2, 4]


def test_changed_text_padding_forces_a_refresh():
    model = tiny_hunyuan()
    handle = fd.apply(model, cpu_config(refresh_every=100))
    run_hunyuan(model, hunyuan_inputs(valid_text=9), t=900)
    run_hunyuan(model, hunyuan_inputs(valid_text=9), t=800)  # same padding: reuse
    out = run_hunyuan(model, hunyuan_inputs(valid_text=5), t=700)  # new padding: predict again
    expected_model = tiny_hunyuan()
    expected = run_hunyuan(expected_model, hunyuan_inputs(valid_text=5), t=700)
    assert relative_l2(out, expected) < 1e-5
    assert all(s.refresh_steps == [0, 2] for s in handle.stats().values())


# ---------------------------------------------------------------------------------------------
# fallbacks and errors
# ---------------------------------------------------------------------------------------------
def test_unsupported_head_dim_runs_stock():
    model = tiny_wan(head_dim=32)
    latents, text = wan_inputs()
    expected = run_wan(model, latents, text)
    handle = fd.apply(model, cpu_config())
    torch.testing.assert_close(run_wan(model, latents, text), expected, rtol=0, atol=0)
    for stats in handle.stats().values():
        assert (stats.sparse_calls, stats.stock_calls, stats.stock_reasons) == (0, 1, {"head_dim_32": 1})


def test_cross_attention_and_masked_calls_run_stock():
    model = tiny_wan()
    latents, _ = wan_inputs()
    handle = fd.apply(model, cpu_config())
    handle.set_step(0)
    attn = model.blocks[0].attn1
    stock = handle.layers["blocks.0.attn1"].stock
    rotary = model.rope(latents)
    hidden = torch.randn(1, rotary[0].shape[1], attn.to_q.in_features)
    context = torch.randn(1, 5, attn.to_q.in_features)
    keep = torch.rand(1, 1, hidden.shape[1], hidden.shape[1]) < 0.5
    keep[..., 0] = True
    with torch.no_grad():
        torch.testing.assert_close(attn(hidden, context, None, None), stock(attn, hidden, context, None, None),
                                   rtol=0, atol=0)
        torch.testing.assert_close(attn(hidden, None, keep, rotary), stock(attn, hidden, None, keep, rotary),
                                   rtol=0, atol=0)
    assert handle.stats()["blocks.0.attn1"].stock_reasons == {"cross_attention": 1, "attention_mask": 1}

    model = tiny_hunyuan()
    handle = fd.apply(model, cpu_config())
    attn = model.transformer_blocks[0].attn
    stock = handle.layers["transformer_blocks.0.attn"].stock
    latents, _, _, _ = hunyuan_inputs()
    rotary = model.rope(latents)
    hidden = torch.randn(1, rotary[0].shape[0], attn.to_q.in_features)
    text = torch.randn(1, 6, attn.to_q.in_features)
    full = torch.rand(1, 1, hidden.shape[1] + 6, hidden.shape[1] + 6) < 0.5  # not a key-padding mask
    full[..., 0] = True
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=text, attention_mask=full, image_rotary_emb=rotary)
        want = stock(attn, hidden, encoder_hidden_states=text, attention_mask=full, image_rotary_emb=rotary)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert handle.stats()["transformer_blocks.0.attn"].stock_reasons == {"attention_mask": 1}


def test_context_parallel_runs_stock():
    model = tiny_wan()
    fd.apply(model, cpu_config())
    proc = model.blocks[0].attn1.processor
    sentinel = object()
    proc._parallel_config = sentinel
    assert proc.stock._parallel_config is sentinel
    assert proc._route(model.blocks[0].attn1, torch.device("cpu"), None) == "stock"
    assert proc._layer.stats.stock_reasons == {"context_parallel": 1}


def test_no_gpu_is_a_clear_error_unless_fallback(monkeypatch):
    monkeypatch.setattr(fd, "kernel_available", lambda: False)
    model = tiny_wan()
    latents, text = wan_inputs()
    expected = run_wan(model, latents, text)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU.*fallback=True"):
        fd.apply(model, fd.SparseAttentionConfig(predictor=full_predictor))
    assert fd.handle_of(model) is None and not isinstance(model.blocks[0].attn1.processor, fd._Processor)

    handle = fd.apply(model, fd.SparseAttentionConfig(predictor=full_predictor, fallback=True))
    torch.testing.assert_close(run_wan(model, latents, text), expected, rtol=0, atol=0)
    for stats in handle.stats().values():
        assert (stats.sparse_calls, stats.stock_reasons) == (0, {"no_gpu": 1})


def test_cpu_tensors_are_a_clear_error_where_a_gpu_exists(monkeypatch):
    monkeypatch.setattr(fd, "kernel_available", lambda: True)
    model = tiny_wan()
    latents, text = wan_inputs()
    fd.apply(model, fd.SparseAttentionConfig(predictor=full_predictor))
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1.*on cpu.*Move the transformer to the GPU"):
        run_wan(model, latents, text)


def test_named_predictor_needs_fgcupy_predict_mask():
    config = fd.SparseAttentionConfig(predictor="topk", density=0.2, attention_fn=reference_attention_fn)
    if hasattr(fgcupy, "predict_mask"):
        assert fd.apply(tiny_wan(), config).config.predictor == "topk"
    else:
        with pytest.raises(ImportError, match="predict_mask"):
            fd.apply(tiny_wan(), config)


def test_predictor_with_the_wrong_shape_is_named():
    def wrong(q, k, slice_m):
        return full_predictor(q[:, :1], k[:, :1], slice_m)

    model = tiny_wan()
    latents, text = wan_inputs()
    fd.apply(model, cpu_config(predictor=wrong))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn1 has \(B, H, q_len, kv_len, slice_m\)=\(1, 1,"):
        run_wan(model, latents, text)

    fd.apply(model, cpu_config(predictor=lambda q, k, slice_m: None))
    with pytest.raises(TypeError, match="returned NoneType"):
        run_wan(model, latents, text)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(density=0.0), "density must be in"),
        (dict(density=1.5), "density must be in"),
        (dict(predictor="tau", tau=None), "needs tau"),
        (dict(predictor=3), "method name or a callable"),
        (dict(slice_m=32), "slice_m must be one of"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(dense_steps=-1), "dense_steps"),
        (dict(dense_layers=(-1,)), "dense_layers"),
        (dict(refresh_steps=[1.5]), "refresh_steps"),
        (dict(threshold=0.0), "threshold"),
        (dict(sparse_refresh=1), "sparse_refresh must be a bool"),
        (dict(sparse_refresh=True, predictor="colmax"), "sparse_refresh adds the keys of a named predictor"),
        (dict(sparse_refresh=True, predictor=full_predictor), "sparse_refresh adds the keys"),
        (dict(sparse_refresh=True, process_group=object()), "sparse_refresh needs each layer's full-sequence"),
        (dict(sparse_refresh=True, local_search=1), "local_search must be a bool"),
        (dict(local_search=True, sparse_refresh=False), "set sparse_refresh=True too"),
        (dict(grid=(3, 8, 8), local_search=False), "grid is read by local_search only"),
        (dict(sparse_refresh=True, local_search=True, grid=(8, 8)), "three positive ints"),
        (dict(sparse_refresh=True, local_search=False, predict_on_refresh=False), "needs local_search=True"),
        (dict(sparse_refresh=True, local_search=True, predict_on_refresh=0), "predict_on_refresh must be a bool"),
        (dict(predictor=full_predictor, density=0.2), "density would not reach it"),
        (dict(predictor=full_predictor, predictor_kwargs={"pool": 8}), "predictor_kwargs would not reach it"),
        (dict(refresh_every=5, refresh_steps=(3, 30)), "give one of them"),
        (dict(find_diagonals=2, mask_from_warmup=True, predict_on_refresh=False), "it would not be used"),
        (dict(estimate_first_mask=1), "estimate_first_mask must be a bool"),
        (dict(estimate_first_mask=True, predictor=full_predictor), "named predictor"),
        (dict(estimate_first_mask=True, predictor="colmax"), "named predictor"),
        (dict(estimate_first_mask=True, mask_from_warmup=True), "give one"),
        (dict(estimate_first_mask=True, calibrate_pooling=True), "not with estimate_first_mask"),
    ],
)
def test_config_validation(kwargs, error):
    with pytest.raises((ValueError, TypeError), match=error):
        fd.SparseAttentionConfig(**kwargs)


def test_a_config_with_listed_refresh_steps_copies_with_replace():
    import dataclasses

    config = fd.SparseAttentionConfig(refresh_steps=(3, 6, 9))
    assert config.refresh_every is None
    assert dataclasses.replace(config, dense_layers=(0,)).refresh_steps == (3, 6, 9)


def test_an_attention_fn_answer_of_another_shape_names_the_layer():
    """attention_fn's output goes to the layer's projection: a wrong layout or length is refused
    there, naming the layer and attention_fn, instead of failing inside a matmul."""
    latents, text = wan_inputs()
    for wrong in (lambda q, k, v, mask, scale: torch.zeros_like(q).transpose(1, 2),
                  lambda q, k, v, mask, scale: torch.zeros_like(q)[:, 1:],
                  lambda q, k, v, mask, scale: None):
        model = tiny_wan()
        fd.apply(model, cpu_config(attention_fn=wrong, dense_steps=0))
        with torch.no_grad(), pytest.raises(ValueError, match=r"attention_fn returned .* for layer blocks\.0\.attn1"):
            model(latents, torch.tensor([999]), text)


def test_config_takes_numpy_integers_as_ints():
    """Counts and step lists from numpy (np.arange, an array's items) are ints like any other,
    stored as Python ints."""
    config = fd.SparseAttentionConfig(dense_layers=np.array([1, 0]), refresh_steps=np.arange(2, 10, 2),
                                      dense_steps=np.int64(2), find_diagonals=np.int32(0))
    assert config.dense_layers == (0, 1) and config.refresh_steps == (2, 4, 6, 8)
    assert type(config.dense_steps) is int and type(config.find_diagonals) is int
    assert all(type(v) is int for v in config.dense_layers + config.refresh_steps)
    assert type(fd.SparseAttentionConfig(refresh_every=np.int64(5)).refresh_every) is int
    with pytest.raises(ValueError, match="dense_steps must be an int >= 0"):
        fd.SparseAttentionConfig(dense_steps=np.float64(2))


def test_config_replace_resolves_the_defaults_again():
    """replace() starts from the settings given, so a default density or warm-up schedule does
    not follow into a config where it cannot apply; dataclasses.replace's refusal says so."""
    config = fd.SparseAttentionConfig(predictor_kwargs={"pool": 16})
    assert (config.density, config.dense_steps, config.mask_from_warmup) == (0.1, 1, True)
    tau = config.replace(predictor="tau", tau=0.8, predictor_kwargs={})
    assert (tau.predictor, tau.tau, tau.density) == ("tau", 0.8, None)
    assert tau == fd.SparseAttentionConfig(predictor="tau", tau=0.8)
    no_warmup = config.replace(dense_steps=0)
    assert no_warmup == fd.SparseAttentionConfig(predictor_kwargs={"pool": 16}, dense_steps=0)
    assert no_warmup.mask_from_warmup is False and no_warmup.refresh_every != config.refresh_every
    assert config.replace() == config and config.predictor_kwargs == {"pool": 16}
    with pytest.raises(ValueError, match=r"config.replace"):
        dataclasses.replace(config, predictor="tau", tau=0.8, predictor_kwargs={})
    with pytest.raises(TypeError, match="no setting densty"):
        config.replace(densty=0.2)


def test_config_options_cannot_change_after_the_checks():
    """predictor_kwargs and parallel_options are checked when the config is made: changing them
    afterwards is refused (it would skip the checks and change the config's hash); the config
    still copies and pickles."""
    import copy
    import pickle

    config = fd.SparseAttentionConfig(predictor_kwargs={"pool": 16})
    for change in (lambda o: o.__setitem__("pool", 3), lambda o: o.update(pool=3), lambda o: o.pop("pool"),
                   lambda o: o.clear(), lambda o: o.setdefault("min_keys", 2), lambda o: o.__delitem__("pool")):
        with pytest.raises(TypeError, match="replace"):
            change(config.predictor_kwargs)
    assert config.predictor_kwargs == {"pool": 16}
    for again in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert again == config and hash(again) == hash(config) and again.predictor_kwargs == {"pool": 16}
    with pytest.raises(TypeError, match="replace"):
        config.parallel_options["head_groups"] = 2


def test_configs_hash_by_their_settings():
    """Equal configs hash alike, dicts of settings included; a config can key a dict."""
    first = fd.SparseAttentionConfig(predictor_kwargs={"pool": 16, "pooling": ["mean", "sample"]}, dense_layers=[2, 0])
    second = fd.SparseAttentionConfig(predictor_kwargs={"pooling": ["mean", "sample"], "pool": 16}, dense_layers=(0, 2))
    assert first == second and hash(first) == hash(second)
    assert {first: 1}[second] == 1
    assert hash(first) != hash(first.replace(density=0.2))


def test_config_defaults_start_exact_after_warmup_steps():
    """By default one dense step makes the first mask exact (the warm-up's column max) and sparse
    refreshes keep its keys as candidates every 20 sparse steps; with dense_steps=0 the first
    mask is predicted and refreshes search around it (no prediction) on sparse steps 1, 2, 4, 8,
    16 and then every 32 (the ramp); where sparse refreshes cannot work, nothing runs dense and
    masks are predicted every 5 sparse steps."""
    def resolved(**kwargs):
        config = fd.SparseAttentionConfig(**kwargs)
        return (config.dense_steps, config.mask_from_warmup, config.sparse_refresh, config.local_search,
                config.predict_on_refresh, config.refresh_every, config.refresh_ramp)

    exact_start, search, predicted = (1, True, True, False, True, 20, False), (0, False, True, True, False, 32, True), \
        (0, False, False, False, True, 5, False)
    assert resolved() == exact_start
    assert resolved(predictor="tau", tau=0.9) == exact_start
    assert resolved(dense_steps=0) == resolved(mask_from_warmup=False) == search
    assert resolved(dense_steps=0, predictor="tau", tau=0.9) == search
    assert resolved(dense_steps=5) == (5,) + exact_start[1:]
    assert [s for s in range(50) if fd.SparseAttentionConfig().is_refresh_step(s)] == [21, 41]
    warm = fd.SparseAttentionConfig(dense_steps=5)
    assert [s for s in range(50) if warm.is_refresh_step(s)] == [25, 45]
    searching = fd.SparseAttentionConfig(dense_steps=0)
    assert [s for s in range(50) if searching.is_refresh_step(s)] == [0, 1, 2, 4, 8, 16, 32]
    assert resolved(dense_steps=5, refresh_every=5) == (5, True, True, False, True, 5, False)
    assert resolved(dense_steps=5, mask_from_warmup=False) == (5,) + search[1:]
    # A dense step only where its exact mask is asked for or kept: options of the schedule without
    # dense steps, predicting refreshes that would replace it and listed steps (taken as given) leave it out.
    assert resolved(sparse_refresh=False) == predicted
    assert resolved(predict_on_refresh=False) == resolved(refresh_ramp=True) == search
    assert resolved(refresh_steps=(0, 10, 20))[:2] == (0, False)
    assert resolved(grid=(3, 8, 8)) == search  # the grid is the search's
    # Options of the search alone turn it on after a warm-up mask too.
    assert resolved(dense_steps=5, grid=(3, 8, 8)) == (5, True, True, True, True, 20, False)
    assert resolved(mask_from_warmup=True, predict_on_refresh=False) == (1, True, True, True, False, 20, False)
    assert resolved(mask_from_warmup=True) == exact_start
    with pytest.raises(ValueError, match="would replace the warm-up's exact mask"):  # calibration predicts anew
        resolved(mask_from_warmup=True, calibrate_pooling=True)
    assert resolved(dense_steps=1, sparse_refresh=False) == (1, True, False, False, True, 5, False)  # predicted refreshes
    assert resolved(dense_steps=0, sparse_refresh=False) == predicted
    assert resolved(dense_steps=0, local_search=False) == (0, False, True, False, True, 5, False)  # + predictor's keys
    assert resolved(dense_steps=0, local_search=True) == search
    assert resolved(dense_steps=0, predict_on_refresh=True) == (0, False, True, True, True, 5, False)
    assert resolved(local_search=True) == (1, True, True, True, True, 20, False)
    # An explicit interval or list of steps is taken as given; the ramp can be asked for or refused.
    assert resolved(dense_steps=0, refresh_every=10) == (0, False, True, True, False, 10, False)
    assert resolved(dense_steps=0, refresh_ramp=False) == (0, False, True, True, False, 10, False)
    assert fd.SparseAttentionConfig(dense_steps=0, refresh_steps=(3, 9)).refresh_ramp is False
    ramped = fd.SparseAttentionConfig(refresh_every=10, refresh_ramp=True, sparse_refresh=False, dense_steps=0)
    assert [s for s in range(30) if ramped.is_refresh_step(s)] == [0, 1, 2, 4, 8, 10, 20]
    assert "and on steps [1, 2, 4, 8, 16] (ramp)" in searching.mask_cache().describe()
    for kwargs in (dict(calibrate_pooling=True), dict(predictor="colmax"), dict(predictor=lambda q, k, slice_m: None),
                   dict(process_group=object()), dict(find_diagonals=2)):
        diagonals = bool(kwargs.get("find_diagonals"))  # predicting refreshes, after a dense step by default
        assert resolved(**kwargs) == (exact_start if diagonals else predicted), kwargs
        assert resolved(dense_steps=0, **kwargs) == predicted, kwargs
        assert resolved(dense_steps=5, **kwargs)[1:4] == (diagonals,) * 2 + (False,), kwargs
    assert warm.mask_making() == ("masks: first the exact column max of the last warm-up step; refreshes sparse: "
                                  "the exact column max over the old mask's keys, the topk predictor's")
    assert searching.mask_making() == ("masks: first predicted (topk); refreshes sparse: the exact "
                                                        "column max over the old mask's keys, their moves along the "
                                                        "token grid")
    assert fd.SparseAttentionConfig(dense_steps=0, sparse_refresh=False).mask_making() == (
        "masks: first predicted (topk); refreshes predicted (topk)")
    assert fd.SparseAttentionConfig().mask_making() == warm.mask_making()
    assert "dense call" in fd.SparseAttentionConfig(predictor="colmax").mask_making()


def test_config_schedule():
    config = fd.SparseAttentionConfig(dense_steps=2, refresh_every=3, dense_layers=[3, 1, 3], mask_from_warmup=False)
    assert config.dense_layers == (1, 3)
    assert [s for s in range(10) if config.is_dense_step(s)] == [0, 1]
    assert [s for s in range(10) if config.is_refresh_step(s)] == [2, 5, 8]
    listed = fd.SparseAttentionConfig(dense_steps=2, refresh_steps=(4, 9))
    assert [s for s in range(10) if listed.is_refresh_step(s)] == [4, 9]
    # Listed refreshes after no warm-up: every layer still makes its first mask on step 0.
    unlisted_first = fd.SparseAttentionConfig(dense_steps=0, refresh_steps=(3, 7))
    assert [s for s in range(10) if unlisted_first.is_refresh_step(s)] == [0, 3, 7]
    assert "new masks on [0, 3, 7]" in unlisted_first.schedule_summary(10)
    assert fd.SparseAttentionConfig(predictor_kwargs={"min_keys": 4}).predictor_arguments() == {
        "density": 0.1, "min_keys": 4}
    assert fd.SparseAttentionConfig(predictor="tau", tau=0.9).predictor_arguments() == {"tau": 0.9}
    assert fd.SparseAttentionConfig(predictor_kwargs={"top_k": 512}).predictor_arguments() == {"top_k": 512}
    # The exact schedule: the rule follows from the one parameter given (top-k at 0.1 by default).
    exact = fd.SparseAttentionConfig(predictor="colmax")
    assert exact.exact and not fd.SparseAttentionConfig().exact
    assert exact.predictor_arguments() == {"rule": "topk", "density": 0.1}
    assert fd.SparseAttentionConfig(predictor="colmax", tau=0.9).predictor_arguments() == {"rule": "tau", "tau": 0.9}
    assert fd.SparseAttentionConfig(predictor="colmax", threshold=1e-3, predictor_kwargs={"min_keys": 2}
                                    ).predictor_arguments() == {"rule": "threshold", "threshold": 1e-3, "min_keys": 2}
    assert fd.SparseAttentionConfig(predictor="colmax", predictor_kwargs={"top_k": 8}).predictor_arguments() == {
        "rule": "topk", "top_k": 8}


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(predictor="bogus"), ValueError, r"predictor must be one of \('topk', 'tau', 'threshold', 'auto'\)"),
    (dict(predictor="colmax", tau=0.9, density=0.2), ValueError, r"selects by one rule: give one of density"),
    (dict(predictor="colmax", predictor_kwargs={"rule": "tau"}), ValueError, r"may not set 'rule', 'lse' or 'scale'"),
    (dict(predictor="colmax", grid=(3, 8, 8)), ValueError, r"^grid: a local search refreshes the masks of a named predictor"),
    (dict(density=0.3, predictor_kwargs={"density": 0.05}), ValueError, r"predictor_kwargs may not set density"),
    (dict(dense_steps=0, slice_m=64, predictor_kwargs={"local": 2048, "max_keys": 4096}), ValueError,
     r"max_keys must be an int >= max\(1, min_keys=0, band width 4160\)"),
    (dict(predictor_kwargs={"workspace_bytes": -1}), ValueError, r"workspace_bytes must be a non-negative number"),
    (dict(share_branches="False"), TypeError, r"share_branches must be a bool, got 'False'"),
    (dict(fallback=1), TypeError, r"fallback must be a bool"),
    (dict(calibrate_pooling="yes"), TypeError, r"calibrate_pooling must be a bool"),
    (dict(predictor="colmax", threshold=0.01, predictor_kwargs={"scale": 0.02}), ValueError,
     r"at the model's attention scale"),
    (dict(predictor="colmax", process_group=object()), ValueError, r"not with process_group"),
    (dict(predictor="colmax", predictor_kwargs={"pool": 32}), ValueError, r"pool applies to mean-query methods"),
    (dict(predictor="colmax", slice_m=64, threshold=0.0), ValueError, r"threshold must be > 0"),
    (dict(predictor="tau"), ValueError, r"predictor='tau' needs tau=..., got None"),
    (dict(predictor="tau", tau=0.9, density=0.2), ValueError, r"density=0.2 does not apply to predictor='tau'"),
    (dict(tau=0.9), ValueError, r"tau=0.9 does not apply to predictor='topk'"),
    (dict(predictor_kwargs={"pool": 24}), ValueError, r"pool must divide slice_m=128"),
    (dict(predictor_kwargs={"bogus": 1}), ValueError, r"predict_mask does not take: \['bogus'\]"),
    (dict(predictor_kwargs={"layout": "NHD"}), ValueError, r"may not set .layout.: the processors give"),
    (dict(predictor="threshold", threshold=1e-3, predictor_kwargs={"top_k": 3}), ValueError,
     r"density/top_k apply to top-k selection"),
    (dict(predictor="tau", tau=0.9, calibrate_pooling=True), ValueError, r"predictor='topk' only"),
    (dict(predictor="colmax", calibrate_pooling=True), ValueError, r"predictor='topk' only"),
    (dict(calibrate_pooling=True, process_group=object()), ValueError, r"calibrate_pooling needs each layer"),
    (dict(calibrate_pooling=True, predictor_kwargs={"pooling": "both"}), ValueError, r"may not set it"),
    (dict(find_diagonals=-1), ValueError, r"find_diagonals must be an int >= 0"),
    (dict(find_diagonals=True), ValueError, r"find_diagonals must be an int >= 0"),
    (dict(predictor="colmax", find_diagonals=2), ValueError, r"moves the exact band of the mean-query predictors"),
    (dict(find_diagonals=2, process_group=object()), ValueError, r"find_diagonals needs each layer"),
    (dict(find_diagonals=2, predictor_kwargs={"diagonals": (300,)}), ValueError, r"may not set them"),
    (dict(mask_from_warmup=True, dense_steps=0), ValueError, r"mask_from_warmup .* needs dense_steps >= 1, got 0"),
    (dict(mask_from_warmup=1, dense_steps=1), TypeError, r"mask_from_warmup must be a bool"),
    (dict(mask_from_warmup=True, dense_steps=1, predictor=lambda q, k, slice_m: None), ValueError,
     r"a callable predictor has none"),
    (dict(mask_from_warmup=True, predictor=lambda q, k, slice_m: None), ValueError, r"a callable predictor has none"),
    (dict(mask_from_warmup=True, process_group=object()), ValueError, r"mask_from_warmup needs each layer's full"),
    (dict(mask_from_warmup=True, dense_steps=1, process_group=object()), ValueError,
     r"mask_from_warmup needs each layer's full-sequence LSE"),
    (dict(refresh_ramp=1), TypeError, r"refresh_ramp must be a bool"),
    (dict(refresh_ramp=True, refresh_steps=(2, 5)), ValueError, r"refresh_steps lists every refresh step"),
    (dict(refresh_on_drift=0.0), ValueError, r"refresh_on_drift must be a number in \(0, 2\)"),
    (dict(refresh_on_drift=2.5), ValueError, r"refresh_on_drift must be a number in \(0, 2\)"),
    (dict(refresh_on_drift=True), ValueError, r"refresh_on_drift must be a number in \(0, 2\)"),
    (dict(refresh_on_drift=0.1, process_group=object()), ValueError, r"refresh_on_drift decides per rank"),
    (dict(refresh_on_missed_mass=2.0, process_group=object()), ValueError, r"refresh_on_missed_mass decides per rank"),
    (dict(calibrate_pooling=True, predictor_kwargs={"combine": "union", "pool": 32}), ValueError,
     r"calibrate_pooling tries pooling='both', which predictor_kwargs do not allow"),
    (dict(find_diagonals=2, predictor_kwargs={"exact_band": None}), ValueError,
     r"find_diagonals adds diagonals=\(128,\), which predictor_kwargs do not allow: diagonals move the exact band"),
    (dict(find_diagonals=2, predictor_kwargs={"combine": "union", "pool": 32}), ValueError,
     r"find_diagonals adds diagonals"),
    (dict(calibrate_pooling=True, dense_steps=1, mask_from_warmup=True), ValueError,
     r"would replace the warm-up's exact mask"),
    (dict(calibrate_pooling=True, dense_steps=0, sparse_refresh=True, local_search=True, predict_on_refresh=False),
     ValueError, r"calibrate_pooling serves the refreshes that predict"),
    (dict(find_diagonals=2, dense_steps=0, sparse_refresh=True, local_search=True, predict_on_refresh=False),
     ValueError, r"find_diagonals serves the refreshes that predict"),
    (dict(find_diagonals=2, dense_steps=1, mask_from_warmup=True, local_search=True, predict_on_refresh=False),
     ValueError, r"find_diagonals serves the refreshes that predict"),
    (dict(predictor_kwargs={"top_k": 0}), ValueError, r"top_k must be an int >= 1 \(an empty mask gives zeros\), got 0"),
    (dict(predictor="colmax", predictor_kwargs={"top_k": 0}), ValueError, r"top_k must be an int >= 1"),
    (dict(predictor_kwargs=None), TypeError, r"predictor_kwargs must be a dict, got NoneType"),
    (dict(parallel_options=[]), TypeError, r"parallel_options must be a dict, got list"),
    (dict(density="0.1"), TypeError, r"density must be a finite number, got '0.1'"),
    (dict(predictor="tau", tau=math.nan), TypeError, r"tau must be a finite number, got nan"),
    (dict(slice_m="128"), ValueError, r"slice_m must be one of .*, got '128'"),
    (dict(predictor_kwargs={"lse": "estimate"}), ValueError, r"may not set \['lse'\]: the integration gives"),
    (dict(predictor_kwargs={"pooling": []}), ValueError, r"needs one pooling per head, got an empty list"),
    (dict(predictor_kwargs={"pooling": ["mean", "bogus"]}), ValueError, r"pooling must be one of"),
    (dict(predictor_kwargs={"pooling": ["mean", "both"]}, process_group=object()), ValueError,
     r"a pooling per head does not apply with process_group"),
    (dict(predictor_kwargs={"pooling": ["mean", "both"], "combine": "union", "pool": 32}), ValueError, r"pooling"),
    (dict(predictor="auto", predictor_kwargs={"pool": 16}), ValueError,
     r"predictor='auto' takes \['top_k', 'scale', 'workspace_bytes'\] in predictor_kwargs, got \['pool'\]"),
    (dict(predictor="auto", find_diagonals=2), ValueError, r"find_diagonals moves the exact band"),
    (dict(predictor="auto", predictor_kwargs={"scale": 3e38}), ValueError, r"scale must be a positive finite number up to"),
    (dict(predictor="auto", process_group=object()), ValueError, r"not with process_group"),
    (dict(predictor="auto", tau=0.9), ValueError, r"tau=0.9 does not apply to predictor='auto'"),
])
def test_config_refuses_what_cannot_work(kwargs, error, message):
    with pytest.raises(error, match=message):
        fd.SparseAttentionConfig(**kwargs)


def test_auto_takes_in_predictor_kwargs_what_predict_mask_auto_takes(monkeypatch):
    from fgcupy.mask_request import AUTO_OPTIONS

    values = {"top_k": 8, "scale": 0.1, "workspace_bytes": 1 << 20}
    assert set(values) == set(AUTO_OPTIONS) - {"density", "layout"}  # the config gives density and the layout
    seen = []
    real = fgcupy.predict_mask

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fgcupy, "predict_mask", spy)
    for name, value in values.items():
        model = tiny_wan(layers=1)
        fd.apply(model, fd.SparseAttentionConfig(predictor="auto", density=None if name == "top_k" else 0.2,
                                                 slice_m=64, dense_steps=0, refresh_every=1, sparse_refresh=False,
                                                 predictor_kwargs={name: value}, attention_fn=reference_attention_fn))
        seen.clear()
        run_wan(model, *wan_inputs(frames=3, size=16), t=1000)
        assert seen and all(kw.get("method") == "auto" and kw.get(name) == value for kw in seen), (name, seen)


def test_predictor_kwargs_take_numpy_counts():
    config = fd.SparseAttentionConfig(predictor_kwargs={"top_k": np.int64(32), "min_keys": np.int32(4)})
    assert config.predictor_arguments()["top_k"] == 32


def test_a_pooling_per_head_in_predictor_kwargs_reaches_the_predictor(monkeypatch):
    """predict_mask takes one pooling per head; so does the config, which predicts with it."""
    model = tiny_wan(layers=1)
    poolings = ["mean", "both"]  # the tiny model's two heads
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1,
                                                      sparse_refresh=False, predictor_kwargs={"pooling": poolings},
                                                      attention_fn=reference_attention_fn))
    seen = []
    real = fgcupy.predict_mask

    def spy(*args, **kwargs):
        seen.append(kwargs.get("pooling"))
        return real(*args, **kwargs)

    monkeypatch.setattr(fgcupy, "predict_mask", spy)
    run_wan(model, *wan_inputs(frames=3, size=16), t=1000)
    assert seen and all(list(p) == poolings for p in seen)
    assert handle.mask("blocks.0.attn1") is not None


@pytest.mark.parametrize("option", [dict(find_diagonals=2), dict(calibrate_pooling=True)])
def test_a_search_schedule_with_predictor_tuning_keeps_predicting(option):
    """Diagonals and calibrated poolings only serve predictions: a searching schedule given one of
    them predicts on its refreshes too (without it, predict_on_refresh would default to False)."""
    config = fd.SparseAttentionConfig(dense_steps=0, sparse_refresh=True, local_search=True, **option)
    assert config.predict_on_refresh is True
    assert fd.SparseAttentionConfig(dense_steps=0, sparse_refresh=True, local_search=True).predict_on_refresh is False


# ---------------------------------------------------------------------------------------------
# drop_keys: the key-padding restriction of a slice mask
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_drop_keys_matches_the_dense_restriction(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, q_blocks, kv_len, slice_m = 2, 3, 4, 37, 64
    dense = torch.rand(batch, heads, q_blocks, kv_len, generator=gen) < 0.4
    dense[0, 1, 2] = False  # an empty row
    mask = SliceMask.from_dense(dense, slice_m, q_blocks * slice_m - 5, capacity=int(dense.sum()) + 11)
    key_valid = torch.rand(batch, kv_len, generator=gen) < 0.7
    out = drop_keys(mask, key_valid).validate()
    assert out.capacity == mask.capacity
    assert torch.equal(out.to_dense(), dense & key_valid[:, None, None, :])


def test_drop_keys_with_gaps_between_rows():
    """Rows (b=0) [0, 2), [2, 5); (b=1) [8, 8), [8, 12): positions 5..7 belong to no row and hold
    out-of-range garbage that must be ignored."""
    indptr = torch.tensor([[[0, 2, 5]], [[8, 8, 12]]], dtype=torch.int32)
    indices = torch.tensor([1, 3, 0, 2, 4, 9, 9, 9, 0, 2, 3, 4], dtype=torch.int32)
    mask = SliceMask(indptr, indices, 64, 128, 5).validate()
    key_valid = torch.tensor([[True, False, True, True, True], [False, True, True, False, True]])
    out = drop_keys(mask, key_valid).validate()
    assert torch.equal(out.to_dense(), mask.to_dense() & key_valid[:, None, None, :])
    assert out.indptr.tolist() == [[[0, 1, 4]], [[4, 4, 6]]]
    assert out.indices[:6].tolist() == [3, 0, 2, 4, 2, 4]


# ---------------------------------------------------------------------------------------------
# step counting the caller takes over, and its limits
# ---------------------------------------------------------------------------------------------
def test_set_step_holds_the_schedule_until_reset():
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    latents, text = wan_inputs()
    handle.set_step(5)
    for t in (900, 900, 800, 999):  # the hook no longer counts: no branch, step or generation moves
        run_wan(model, latents, text, t=t)
        assert (handle.step, handle.branch, handle.generation) == (5, 0, 0)
    handle.reset()
    run_wan(model, latents, text, t=900)
    run_wan(model, latents, text, t=800)
    assert (handle.step, handle.branch) == (1, 0)


def test_set_step_back_to_an_earlier_step_starts_a_new_generation():
    """A loop driven by set_step that runs twice: the second run predicts its own masks (it had
    reused the first run's, dated at the same first sparse step)."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(refresh_every=10**9))
    generation = handle.generation
    for _ in range(2):
        for step in range(4):
            handle.set_step(step)
            run_wan(model, latents, text)
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.refresh_steps, stats.refreshes, handle.generation) == ([0], 2, generation + 1)


def test_set_step_with_new_generation_drops_the_masks_of_the_last():
    """One-step generations driven by set_step(0): each predicts its own masks."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(dense_steps=0, refresh_every=10**9))
    generation = handle.generation
    for _ in range(3):
        handle.set_step(0, new_generation=True)
        run_wan(model, latents, text)
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.refresh_steps, stats.refreshes, handle.generation) == ([0], 3, generation + 3)
    handle.step_callback(_Pipe(1), 0, torch.tensor(1000), {})  # the pipeline's last step
    for _ in range(2):  # then set_step(0) alone starts the next generation
        handle.set_step(0)
        run_wan(model, latents, text)
        handle.step_callback(_Pipe(1), 0, torch.tensor(1000), {})
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.refresh_steps, stats.refreshes, handle.generation) == ([0], 5, generation + 5)
    with pytest.raises(TypeError, match="new_generation must be a bool"):
        handle.set_step(0, new_generation=1)


def test_a_pooling_list_of_the_wrong_length_is_refused_when_applied():
    """The config cannot know the heads; apply can (the first prediction would fail mid-run)."""
    config = fd.SparseAttentionConfig(slice_m=64, predictor_kwargs={"pooling": ["mean", "sample", "both"]},
                                      attention_fn=reference_attention_fn)
    with pytest.raises(ValueError, match="pooling lists 3 poolings, but layer .* has 2 heads: give one per head"):
        fd.apply(tiny_wan(layers=1), config)
    fd.apply(tiny_wan(layers=1), dataclasses.replace(config, dense_layers=(0,)))  # no layer predicts


def test_a_call_that_raised_starts_the_next_call_over():
    """A generation retried after an exception (out of memory at its first step) starts from step
    0 with no mask of the failed attempt (its calls had become later branches of step 0)."""
    model = tiny_wan(layers=2)
    latents, text = wan_inputs()
    failures = [2]

    def fails_once(q, k, v, mask, scale):
        failures[0] -= 1
        if failures[0] == 0:
            raise torch.OutOfMemoryError("simulated")
        return reference_attention_fn(q, k, v, mask, scale)

    handle = fd.apply(model, cpu_config(attention_fn=fails_once))
    with pytest.raises(torch.OutOfMemoryError):
        run_wan(model, latents, text, t=1000)
    generation = handle.generation
    seen = []
    for t in (1000, 1000, 900):
        run_wan(model, latents, text, t=t)
        seen.append((handle.step, handle.branch, handle.generation))
    assert seen == [(0, 0, generation + 1), (0, 1, generation + 1), (1, 0, generation + 1)]
    # set_step's count stays the caller's, whatever raised before
    handle.set_step(5)
    failures[0] = 1
    with pytest.raises(torch.OutOfMemoryError):
        run_wan(model, latents, text, t=800)
    handle.set_step(6)
    run_wan(model, latents, text, t=800)
    assert (handle.step, handle.generation) == (6, generation + 1)


def test_calls_with_one_timestep_past_the_branch_limit_start_a_new_generation():
    model = tiny_wan(layers=1)
    handle = fd.apply(model, cpu_config())
    latents, text = wan_inputs()
    seen = []
    for _ in range(2 * fd.MAX_BRANCHES + 1):  # one-step generations back to back
        run_wan(model, latents, text, t=999)
        seen.append((handle.branch, handle.generation))
    assert seen[: fd.MAX_BRANCHES] == [(b, 0) for b in range(fd.MAX_BRANCHES)]
    assert seen[fd.MAX_BRANCHES] == (0, 1) and seen[-1] == (0, 2)
    assert len(handle.cache.layers()) <= fd.MAX_BRANCHES


def test_shared_branches_with_different_text_padding_keep_their_masks():
    """Guidance whose negative prompt pads its text differently: each padding keeps its own mask
    (a shared one would be re-made for each in turn, every call)."""
    model = tiny_hunyuan()
    handle = fd.apply(model, cpu_config(refresh_every=100, share_branches=True))
    for t in (900, 800, 700, 600):
        run_hunyuan(model, hunyuan_inputs(valid_text=9), t=t)
        out = run_hunyuan(model, hunyuan_inputs(valid_text=5), t=t)
    expected = run_hunyuan(tiny_hunyuan(), hunyuan_inputs(valid_text=5), t=600)
    assert relative_l2(out, expected) < 1e-5
    assert all(s.refresh_steps == [0, 0] for s in handle.stats().values())  # one per padding, then reuse


def test_shared_branches_of_different_shapes_keep_their_masks():
    """A custom loop whose branches differ in shape (here the video's size): each keeps its own
    mask, predicted once, and attends as it would alone."""
    model = tiny_wan(layers=1)
    counter = CountingPredictor(full_predictor)
    handle = fd.apply(model, cpu_config(predictor=counter, refresh_every=100, share_branches=True))
    small = wan_inputs(size=12, seed=2)
    for t in (900, 800, 700):
        run_wan(model, *wan_inputs(), t=t)
        out = run_wan(model, *small, t=t)
    expected = run_wan(tiny_wan(layers=1), *small, t=700)
    assert relative_l2(out, expected) < 1e-5
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0, 0] and counter.calls == 2
    assert handle.mask("blocks.0.attn1", 1).kv_len < handle.mask("blocks.0.attn1", 0).kv_len


def test_shared_branches_with_different_text_padding_each_get_the_warmup_mask():
    """With the dense warm-up, a branch whose padding keeps it apart makes its own exact mask on
    that step (it had been routed as if it shared the first branch's, and predicted later)."""
    model = tiny_hunyuan()
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.3, slice_m=64, share_branches=True,
                                                      attention_fn=reference_attention_fn))
    for t in (1000, 900, 800):
        run_hunyuan(model, hunyuan_inputs(valid_text=9), t=t)
        run_hunyuan(model, hunyuan_inputs(valid_text=5, seed=2), t=t)
    assert all(s.refresh_steps == [0, 0] for s in handle.stats().values()), handle.stats()


def test_a_model_whose_forward_takes_no_timestep_warns_and_leaves_the_count_to_the_caller():
    class Holder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, latents, t, text):  # the timestep under another name
            return self.inner(latents, t, text).sample

    model = Holder(tiny_wan(layers=1))
    with pytest.warns(UserWarning, match="takes no timestep"):
        handle = fd.apply(model, cpu_config())
    latents, text = wan_inputs()
    with torch.no_grad():
        for t in (900, 900, 800):
            handle.begin_forward(torch.tensor([t]))
            model(latents, torch.tensor([t]), text)
    assert (handle.step, handle.branch) == (1, 0)


@pytest.mark.parametrize("density", [0.3, 0.02])
def test_padded_text_keys_take_none_of_a_rows_budget(density):
    """HunyuanVideo's padded text keys are left out before selecting, not after: each row of the
    warm-up's exact mask and of sparse refreshes keeps its count of real keys, and predicted masks
    nearly so (a sampled pooling's dilation may reach a padded key). They had been ranked with the
    rest and dropped after, leaving 46 of 77 keys per row, and at density 0.02 a block with none."""
    inputs = hunyuan_inputs(text=64, valid_text=4)
    schedules = {"exact": {}, "predicted": dict(dense_steps=0, sparse_refresh=False),
                 "calibrated": dict(dense_steps=0, sparse_refresh=False, calibrate_pooling=True)}
    for name, options in schedules.items():
        model = tiny_hunyuan()
        handle = fd.apply(model, fd.SparseAttentionConfig(density=density, slice_m=64, refresh_every=1,
                                                          attention_fn=reference_attention_fn, **options))
        for step in range(3):
            run_hunyuan(model, inputs, t=1000 - 100 * step)
            for layer in handle.layers:
                mask = handle.mask(layer)
                if mask is None:
                    continue
                kept = mask.row_lengths().flatten().float()
                target = max(1, round(density * mask.kv_len))
                assert not mask.to_dense()[..., -60:].any()
                assert kept.max() <= target and kept.min() >= (target if name != "predicted" else 0.8 * target), \
                    (name, step, layer, kept.tolist(), target)


def test_a_re_apply_that_fails_leaves_the_installed_config():
    """apply() on an applied model checks the new config against the model before replacing the
    old installation (a failing one had removed it and left the stock processors)."""
    model = tiny_wan()
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config())
    with pytest.raises(ValueError, match="dense_layers"):
        fd.apply(model, cpu_config(dense_layers=(5,)))
    assert fd.handle_of(model) is handle
    run_wan(model, latents, text)
    assert all(stats.sparse_calls + stats.dense_calls == 1 for stats in handle.stats().values())
    again = fd.apply(model, cpu_config(dense_layers=(1,)))
    assert fd.handle_of(model) is again and again is not handle
    run_wan(model, latents, text)
    assert [stats.dense_calls for stats in again.stats().values()] == [0, 1]


def test_apply_to_a_compiled_transformer_reads_the_model_it_wraps(recwarn):
    """torch.compile's wrapper forwards *args: apply() reads the timestep's position, the class and
    the layer names from the model inside (it had warned that the forward takes no timestep, so
    the schedule never moved, and named every layer "_orig_mod....")."""
    model = torch.compile(tiny_wan(), backend="eager")
    handle = fd.apply(model, cpu_config(refresh_every=2))
    assert not [w for w in recwarn if "takes no timestep" in str(w.message)]
    assert list(handle.layers) == ["blocks.0.attn1", "blocks.1.attn1"]
    latents, text = wan_inputs()
    for step in range(3):
        run_wan(model, latents, text, t=1000 - 100 * step)
    assert all(stats.refresh_steps == [0, 2] for stats in handle.stats().values())
    assert fd.handle_of(model) is handle
    fd.remove(model)
    assert fd.handle_of(model) is None


def test_a_callable_predictor_sees_the_models_own_keys():
    """Padded text keys are NaN only to fgcupy's own predictors: a callable gets k as the model
    made it (a top-k of its own had picked the NaN keys first, and every row came out empty)."""
    seen = []

    def predictor(q, k, slice_m):
        seen.append(bool(torch.isnan(k).any()))
        return fgcupy.predict_mask(q, k, slice_m, "topk", density=0.3)

    model = tiny_hunyuan()
    fd.apply(model, fd.SparseAttentionConfig(predictor=predictor, slice_m=64, dense_steps=0,
                                             attention_fn=reference_attention_fn))
    run_hunyuan(model, hunyuan_inputs(text=64, valid_text=4))
    assert seen and not any(seen)


@pytest.mark.parametrize("band", ["auto", np.int64(32)])
def test_diagonals_take_the_bands_predict_mask_takes(band):
    model = tiny_wan(layers=1)
    handle = fd.apply(model, fd.SparseAttentionConfig(predictor="topk", density=0.3, slice_m=64, dense_steps=0,
                                                      find_diagonals=2, predictor_kwargs={"exact_band": band},
                                                      attention_fn=reference_attention_fn))
    run_wan(model, *wan_inputs())
    assert all(stats.sparse_calls == 1 for stats in handle.stats().values())


@pytest.mark.parametrize("share_branches", [False, True])
def test_compact_masks_give_the_expanded_schedules_outputs_and_masks(share_branches):
    """compact_masks holds each layer's mask compactly (here bit maps) and gives attention_fn
    the same masks, so the same outputs, through sparse refreshes, padded text keys and guidance
    branches; it is refused with process_group."""
    runs = {}
    for compact in (False, True):
        model = tiny_hunyuan()
        inputs = hunyuan_inputs(valid_text=9)
        handle = fd.apply(model, fd.SparseAttentionConfig(density=0.5, slice_m=64, dense_steps=0, refresh_every=2,
                                                          sparse_refresh=True, share_branches=share_branches,
                                                          compact_masks=compact, attention_fn=reference_attention_fn))
        outs = [run_hunyuan(model, inputs, t=1000 - 100 * step) for step in range(4) for _ in range(2)]
        runs[compact] = handle, outs
    (expanded, want), (compact, got) = runs[False], runs[True]
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for name in expanded.layers:
        for branch in (0, 1):
            assert torch.equal(expanded.mask(name, branch).indices, compact.mask(name, branch).indices)
    assert "bits uint8" in compact.describe() and compact.mask_memory_bytes() < expanded.mask_memory_bytes()
    plan = fgcupy.SparseAttention().plan(compact.mask(next(iter(compact.layers))), head_dim=64, dtype=torch.bfloat16)
    compact._shared_plans["shape"] = plan  # what a CUDA run holds beside the cache
    assert compact.mask_memory_bytes() > compact.cache.memory_bytes()
    fd.remove(model)
    assert compact.mask_memory_bytes() == 0  # remove frees the cache and the shared plans
    with pytest.raises(ValueError, match="compact_masks holds the masks of whole layers"):
        fd.SparseAttentionConfig(compact_masks=True, process_group=object())
    with pytest.raises(TypeError, match="compact_masks must be a bool"):
        fd.SparseAttentionConfig(compact_masks="yes")


def test_compact_masks_none_chooses_by_the_masks_share_of_the_gpu(monkeypatch):
    """compact_masks=None: compact where the first mask, held expanded by every patched layer for
    both guidance branches (one with share_branches), would pass COMPACT_SHARE of the GPU's
    memory; chosen again after a generation's masks are freed; expanded with process_group."""
    import types

    from fgcupy.integrations import diffusers_config

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=1000))
    mask = types.SimpleNamespace(device=torch.device("cuda", 0), memory_bytes=lambda: 70)
    for share_branches, dense_layers, compact in ((False, (), True), (True, (), False), (False, (1,), False)):
        handle = fd.apply(tiny_wan(), cpu_config(share_branches=share_branches, dense_layers=dense_layers))
        assert handle.compact_masks is None and handle.cache.expanded
        handle._choose_compact(mask)  # 70 x 2 layers x 2 branches = 280 > 250; one branch or one layer: 140
        assert handle.compact_masks is compact and handle.cache.expanded is not compact
        handle.reset()
        assert handle.compact_masks is None
    assert diffusers_config.COMPACT_SHARE == 0.25
    cpu_mask = types.SimpleNamespace(device=torch.device("cpu"), memory_bytes=lambda: 10**12)
    handle = fd.apply(tiny_wan(), cpu_config())
    handle._choose_compact(cpu_mask)
    assert handle.compact_masks is False and handle.cache.expanded
    assert fd.apply(tiny_wan(), cpu_config(compact_masks=True)).compact_masks is True
