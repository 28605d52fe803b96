"""Edges of the diffusers integration, its config, the local search and the sequence-parallel
handshake: what a mask is made for (dtype, padding refilled in place, a new sequence length),
drift in the keys alone, stock routes, refusals at config time and in the header (CPU only: the
exact reference stands in for the kernel, as in test_integration_diffusers.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install 'fgcupy[diffusers]'")

from fgcupy import relative_l2  # noqa: E402
from fgcupy.integrations import diffusers as fd  # noqa: E402

from .tiny_diffusers import (  # noqa: E402
    cpu_config,
    hunyuan_attention_call,
    full_predictor,
    hunyuan_inputs,
    oracle_topk,
    reference_attention_fn,
    run_wan,
    tiny_hunyuan,
    tiny_wan,
    wan_inputs,
)


# ---------------------------------------------------------------------------------------------
# what a mask was made for
# ---------------------------------------------------------------------------------------------
def test_a_new_dtype_makes_a_new_mask():
    """A mask (and, on a GPU, its kernel plan) is made for one dtype: a model cast to another
    between steps refreshes at that step instead of reusing it."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(refresh_every=100))
    run_wan(model, latents, text, t=900)
    run_wan(model, latents, text, t=800)  # the same inputs: reuse
    model.to(torch.bfloat16)
    run_wan(model, latents.bfloat16(), text.bfloat16(), t=700)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [0, 2]


def test_a_padding_mask_refilled_in_place_within_one_step_is_read_again():
    """Direct attention calls of one step (no set_step between them) that refill one padding
    buffer in place: the second call attends with the new padding (the tensor's version tells)."""
    handle, attn, stock, hidden, text_states, rotary = hunyuan_attention_call(cpu_config())
    video = hidden.shape[1]
    handle.set_step(0)
    with torch.no_grad():
        padding = torch.ones(1, 1, 1, video + 12, dtype=torch.bool)
        for valid_text in (12, 6):
            padding.fill_(True)
            padding[..., video + valid_text:] = False
            got = attn(hidden, encoder_hidden_states=text_states, attention_mask=padding, image_rotary_emb=rotary)[0]
            want = stock(attn, hidden, encoder_hidden_states=text_states, attention_mask=padding,
                         image_rotary_emb=rotary)[0]
            assert relative_l2(got, want) < 1e-5, valid_text


def test_refresh_on_drift_sees_keys_that_moved_alone():
    """refresh_on_drift judges the keys too: new key projections (queries unchanged) at step 2
    refresh the layer's mask there."""
    model = tiny_wan(layers=1)
    latents, text = wan_inputs()
    handle = fd.apply(model, cpu_config(refresh_every=100, refresh_on_drift=0.05))
    for step in range(4):
        if step == 2:
            with torch.no_grad():
                to_k = model.blocks[0].attn1.to_k
                to_k.weight.copy_(torch.randn(to_k.weight.shape, generator=torch.Generator().manual_seed(5)))
        run_wan(model, latents, text, t=1000 - step)
    stats = handle.stats()["blocks.0.attn1"]
    assert stats.refresh_steps == [0, 2] and stats.drift_refresh_steps == [2]


def test_sequence_parallel_refreshes_on_a_new_length_at_a_reuse_step(tmp_path):
    """process_group: a step the schedule reuses on, but with a longer sequence than the mask was
    made for, makes a new mask (one rank here; its shard is the whole sequence)."""
    import torch.distributed as dist

    def steps(model, handle, hidden, rotary):
        outs = []
        with torch.no_grad():
            for step, tokens in ((1, 74), (2, 75)):  # refresh on step 1, reuse by the schedule on 2
                handle.set_step(step)
                outs.append(model.blocks[0].attn1(hidden[:, :tokens], None, None,
                                                  tuple(t[:, :tokens] for t in rotary)))
        return outs

    schedule = dict(predictor=oracle_topk(0.3), slice_m=64, dense_steps=1, refresh_every=100)
    model = tiny_wan(heads=2, layers=1)
    latents, _ = wan_inputs(frames=3, size=10)
    rotary = model.rope(latents)
    hidden = torch.randn(1, 75, model.blocks[0].attn1.to_q.in_features, generator=torch.Generator().manual_seed(7))
    expected = steps(model, fd.apply(model, fd.SparseAttentionConfig(attention_fn=reference_attention_fn,
                                                                     **schedule)), hidden, rotary)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        handle = fd.apply(model, fd.SparseAttentionConfig(process_group=dist.group.WORLD, **schedule))
        got = steps(model, handle, hidden, rotary)
        refreshes = handle.stats()["blocks.0.attn1"].refresh_steps
    finally:
        dist.destroy_process_group()
    assert refreshes == [1, 2]
    for g, w in zip(got, expected):
        assert relative_l2(g, w) < 1e-5


# ---------------------------------------------------------------------------------------------
# routing: what goes to the stock processor
# ---------------------------------------------------------------------------------------------
def test_fallback_keeps_the_warmup_mask_step_stock(monkeypatch):
    """fallback=True without a usable kernel: the last warm-up step, which would make the exact
    mask through fgcupy, runs the stock processor like every other call (bfloat16, exactly)."""
    monkeypatch.setattr(fd, "kernel_available", lambda: False)
    model = tiny_wan(layers=1).to(torch.bfloat16)
    latents, text = (x.bfloat16() for x in wan_inputs())
    expected = [run_wan(model, latents, text, t=t) for t in (900, 800)]
    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.3, slice_m=64, fallback=True))
    assert handle.config.mask_from_warmup and handle.config.dense_steps == 1
    outs = [run_wan(model, latents, text, t=t) for t in (900, 800)]
    assert all(torch.equal(out, want) for out, want in zip(outs, expected))
    stats = handle.stats()["blocks.0.attn1"]
    assert (stats.dense_calls, stats.stock_reasons, stats.refresh_steps) == (1, {"no_gpu": 1}, [])


def test_a_broadcast_boolean_mask_that_is_no_key_padding_runs_stock():
    """A boolean [1, 1, 1, 1] attention mask broadcasts over every key: not a key-padding mask of
    the call's keys, so the stock processor takes it."""
    model = tiny_hunyuan()
    handle = fd.apply(model, cpu_config())
    handle.set_step(0)
    attn = model.transformer_blocks[0].attn
    stock = handle.layers["transformer_blocks.0.attn"].stock
    rotary = model.rope(hunyuan_inputs()[0])
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(1, rotary[0].shape[0], attn.to_q.in_features, generator=gen)
    text_states = torch.randn(1, 6, attn.to_q.in_features, generator=gen)
    everything = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=text_states, attention_mask=everything, image_rotary_emb=rotary)
        want = stock(attn, hidden, encoder_hidden_states=text_states, attention_mask=everything,
                     image_rotary_emb=rotary)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert handle.stats()["transformer_blocks.0.attn"].stock_reasons == {"attention_mask": 1}


def test_sequence_parallel_lets_cross_attention_calls_through_to_stock(tmp_path):
    """process_group: a patched layer called with encoder states (cross-attention: every rank's
    queries over the whole context) runs the stock processor; only self-attention calls that the
    kernel cannot take are refused."""
    import torch.distributed as dist

    model = tiny_wan(layers=1)
    attn = model.blocks[0].attn1
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(1, 40, attn.to_q.in_features, generator=gen)
    context = torch.randn(1, 5, attn.to_q.in_features, generator=gen)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        handle = fd.apply(model, fd.SparseAttentionConfig(process_group=dist.group.WORLD, predictor=full_predictor,
                                                          dense_steps=0))
        handle.set_step(0)
        with torch.no_grad():
            got = attn(hidden, context, None, None)
            want = handle.layers["blocks.0.attn1"].stock(attn, hidden, context, None, None)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert handle.stats()["blocks.0.attn1"].stock_reasons == {"cross_attention": 1}


# ---------------------------------------------------------------------------------------------
# the sequence-parallel header checks (every rank makes them alike from the gathered headers)
# ---------------------------------------------------------------------------------------------
def _headers(*ranks):
    """Two or more ranks' headers: 4 heads, 12 queries and keys each, alike but for ``ranks``'
    fields."""
    from fgcupy.sp_handshake import _HEADER

    base = dict.fromkeys(_HEADER, 0)
    base.update(batch=1, heads=4, head_dim=16, q_len=12, kv_len=12, dtype=1, head_groups=1, attend=1)
    return [{**base, **fields} for fields in ranks]


def test_the_header_check_refuses_a_mask_whose_kv_len_is_not_the_whole_sequences():
    """A rank whose static mask has the right q_len but another kv_len is refused by every rank at
    the header (not by that rank alone, after the exchange started)."""
    from fgcupy.sp_handshake import check_agreement

    mask = dict(mask=1, mask_batch=1, mask_heads=4, mask_q_len=24, mask_slice_m=8, mask_kind=1, mask_digest=5)
    assert check_agreement(_headers({**mask, "mask_kv_len": 24}, {**mask, "mask_kv_len": 24})) == ([12, 12], [12, 12])
    with pytest.raises(ValueError, match=r"rank 1's mask is for q_len=24, kv_len=30; the shards add up to q_len=24, "
                                         r"kv_len=24"):
        check_agreement(_headers({**mask, "mask_kv_len": 24}, {**mask, "mask_kv_len": 30}))


def test_one_rank_with_the_whole_mask_and_one_with_its_own_heads_agree():
    """Masks are compared only where they cover every head: a rank passing the mask of its own
    heads (digest 0) beside one passing the whole mask is no disagreement; two whole masks that
    differ are."""
    from fgcupy.sp_handshake import check_agreement

    mask = dict(mask=1, mask_batch=1, mask_q_len=24, mask_kv_len=24, mask_slice_m=8, mask_kind=1)
    whole, own = dict(mask, mask_heads=4, mask_digest=77), dict(mask, mask_heads=2, mask_digest=0)
    assert check_agreement(_headers(whole, own)) == ([12, 12], [12, 12])
    with pytest.raises(ValueError, match=r"the ranks' masks over all heads differ"):
        check_agreement(_headers(whole, dict(whole, mask_digest=78)))


def _one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    return dist.group.WORLD


def test_seq_lens_with_longer_key_shards_and_a_zero_head_dim_are_refused_before_the_header(tmp_path):
    """SequenceParallelAttention refuses, before any exchange, seq_lens with k/v shards longer than
    the q shard (seq_lens is for self-attention) and q, k, v with no channels."""
    import torch.distributed as dist

    from fgcupy.distributed import SequenceParallelAttention

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for n in (24, 30, 30))
    group = _one_rank_group(tmp_path)
    try:
        attention = SequenceParallelAttention(group, compute="reference")
        with pytest.raises(ValueError, match=r"seq_lens\[0\]=24, but this rank's q shard has 24 tokens and k/v 30"):
            attention(q, k, v, seq_lens=[24])
        empty = torch.zeros(1, 2, 24, 0)
        with pytest.raises(ValueError, match=r"head_dim must be at least 1, got 0"):
            attention(empty, empty, empty)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# config checks and the search without a token grid
# ---------------------------------------------------------------------------------------------
def test_refresh_steps_on_the_last_warmup_step_are_refused():
    with pytest.raises(ValueError, match=r"refresh_steps \[4, 7\] lists steps of the warm-up \(\[4\] < dense_steps=5\)"):
        fd.SparseAttentionConfig(density=0.3, dense_steps=5, refresh_steps=(4, 7))


def test_local_search_without_a_grid_moves_keys_a_token_either_way():
    """Direct layer calls (no transformer call to read the token grid from): each searching
    refresh's candidates are the old mask's keys moved by one token both ways."""
    import fgcupy
    from fgcupy.mask_algebra import union_reference

    model = tiny_wan(layers=1)
    latents, _ = wan_inputs()
    seen = []

    def recording(q, k, v, mask, scale):
        seen.append((q, k, mask))
        return reference_attention_fn(q, k, v, mask, scale)

    handle = fd.apply(model, fd.SparseAttentionConfig(density=0.2, slice_m=64, dense_steps=0, refresh_every=1,
                                                      sparse_refresh=True, local_search=True,
                                                      predict_on_refresh=False, attention_fn=recording))
    attn = model.blocks[0].attn1
    rotary = model.rope(latents)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, rotary[0].shape[1], attn.to_q.in_features, generator=gen)
    with torch.no_grad():
        for step in range(3):
            handle.set_step(step)
            attn(hidden, None, None, rotary)
    assert handle.grid is None
    for refresh in (1, 2):  # step `refresh` attends through the last mask and makes the next
        q, k, old = (x.transpose(1, 2) if i < 2 else x for i, x in enumerate(seen[refresh]))
        _, lse = fgcupy.sparse_attention(q, k, k, old, return_lse=True)
        candidates = union_reference(old, (0, 1, -1))
        expected = fgcupy.predict_mask(q, k, 64, "colmax", rule="topk", density=0.2, lse=lse, candidates=[candidates])
        assert torch.equal(handle.mask("blocks.0.attn1").to_dense() if refresh == 2 else seen[2][2].to_dense(),
                           expected.to_dense()), refresh
