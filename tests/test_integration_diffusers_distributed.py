"""fgcupy.integrations.diffusers with ``process_group``: two gloo ranks on CPU, each running a tiny
Wan self-attention layer on its shard of the sequence (SequenceParallelAttention's reference path),
must give the rows of the single-process processor's output (the exact reference as attention_fn),
through dense, refresh and reuse steps of the schedule.

The test is at the processor level: the tiny model's patch embedding and output unpatchify work on
the whole sequence, and sharding a model's inputs is the caller's job (see the module docstring)."""

from __future__ import annotations

import os
import tempfile
import time

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is an optional extra: pip install 'fgcupy[diffusers]'")

from fgcupy import relative_l2  # noqa: E402
from fgcupy.distributed import shard_ranges  # noqa: E402
from fgcupy.integrations import diffusers as fd  # noqa: E402

from .dist_harness import free_port  # noqa: E402
from .tiny_diffusers import (  # noqa: E402
    oracle_topk,
    reference_attention_fn,
    tiny_hunyuan,
    tiny_wan,
    wan_inputs,
)

WORLD = 2
STEPS = 5
HEADS = 3  # uneven over two ranks: heads 0-1 on rank 0, head 2 on rank 1
SCHEDULE = dict(predictor=oracle_topk(0.3), slice_m=64, dense_steps=1, refresh_every=2, dense_layers=(1,))
# 3 frames of 10 x 10 latents: 75 tokens, shards 38 + 37, so a 64-query slice straddles the ranks.
FRAMES, SIZE = 3, 10


def _problem(heads=HEADS):
    """Model, rotary tables and one hidden state per step (identical on every process)."""
    model = tiny_wan(heads=heads)
    latents, _ = wan_inputs(frames=FRAMES, size=SIZE)
    rotary = model.rope(latents)
    gen = torch.Generator().manual_seed(7)
    hidden = [torch.randn(1, rotary[0].shape[1], model.blocks[0].attn1.to_q.in_features, generator=gen)
              for _ in range(STEPS)]
    return model, rotary, hidden


def _run_steps(model, handle, rotary, hidden, rows=None):
    """Each step: both self-attention layers (layer 1 is a dense layer) on ``rows`` of the sequence."""
    outs = []
    rows = slice(None) if rows is None else slice(rows.start, rows.stop)
    shard_rotary = tuple(t[:, rows] for t in rotary)
    with torch.no_grad():
        for step in range(STEPS):
            handle.set_step(step)
            outs.append(torch.stack([block.attn1(hidden[step][:, rows], None, None, shard_rotary)
                                     for block in model.blocks]))
    return torch.stack(outs)  # [steps, layers, B, S_r, dim]


# A later step on the first 74 tokens: shards 37 + 37, so rank 1's shard keeps its length while
# the whole sequence's changes (a refresh on every rank, or the ranks would disagree on the mask).
SHORT, SHORT_STEP = 74, 6  # refreshes either way: step 5's refresh never ran (a new length at a reuse
# step: test_integration_diffusers_edges.py)


def _run_short_step(model, handle, rotary, hidden, rows=None):
    """Both layers on ``rows`` of the first SHORT tokens at SHORT_STEP."""
    rows = slice(0, SHORT) if rows is None else slice(rows.start, rows.stop)
    with torch.no_grad():
        handle.set_step(SHORT_STEP)
        return torch.stack([block.attn1(hidden[-1][:, :SHORT][:, rows], None, None,
                                        tuple(t[:, :SHORT][:, rows] for t in rotary))
                            for block in model.blocks])


def _worker(rank, port, path):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model, rotary, hidden = _problem()
        # two head groups and the copy exchange, which off the GPU falls back to what "auto" picks
        handle = fd.apply(model, fd.SparseAttentionConfig(process_group=dist.group.WORLD, **SCHEDULE,
                                                          parallel_options=dict(head_groups=2, exchange="copy")))
        rows = shard_ranges(rotary[0].shape[1], WORLD)[rank]
        out = _run_steps(model, handle, rotary, hidden, rows)
        stats = {name: (s.refresh_steps, s.sparse_calls, s.dense_calls, s.stock_calls)
                 for name, s in handle.stats().items()}
        mask = handle.mask("blocks.0.attn1")
        short_out = _run_short_step(model, handle, rotary, hidden, shard_ranges(SHORT, WORLD)[rank])
        short_refreshes = handle.stats()["blocks.0.attn1"].refresh_steps
        # one head over two ranks: rank 1 owns none, and must still reuse when rank 0 does
        few, _, few_hidden = _problem(heads=1)
        few_handle = fd.apply(few, fd.SparseAttentionConfig(process_group=dist.group.WORLD, **SCHEDULE))
        few_out = _run_steps(few, few_handle, rotary, few_hidden, rows)
        torch.save(dict(out=out, stats=stats, mask_heads=mask.heads, mask_q_len=mask.q_len, few_out=few_out,
                        short_out=short_out, short_refreshes=short_refreshes), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fgcupy-sp-diffusers-") as folder:
        path = os.path.join(folder, "rank")
        port = free_port()
        procs = [ctx.Process(target=_worker, args=(r, port, path), daemon=True) for r in range(WORLD)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + 120
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                pytest.fail(f"rank {r} hung")
            assert p.exitcode == 0, f"rank {r} failed (exit code {p.exitcode})"
        return [torch.load(f"{path}.{r}") for r in range(WORLD)]


def test_sequence_parallel_processor_matches_single_process(ranks):
    model, rotary, hidden = _problem()
    handle = fd.apply(model, fd.SparseAttentionConfig(attention_fn=reference_attention_fn, **SCHEDULE))
    expected = _run_steps(model, handle, rotary, hidden)
    want_stats = {name: (s.refresh_steps, s.sparse_calls, s.dense_calls, s.stock_calls)
                  for name, s in handle.stats().items()}
    assert want_stats["blocks.0.attn1"] == ([1, 3], 4, 1, 0)  # dense step 0, refresh 1 and 3, reuse 2 and 4

    pieces = shard_ranges(expected.shape[3], WORLD)
    for rank, result in enumerate(ranks):
        got, want = result["out"], expected[:, :, :, pieces[rank].start:pieces[rank].stop]
        assert got.shape == want.shape
        for step in range(STEPS):
            for layer in range(2):
                err = relative_l2(got[step, layer], want[step, layer])
                assert err < 1e-5, f"rank {rank}, step {step}, layer {layer}: relative L2 {err}"
        assert result["stats"] == want_stats
        # each rank holds the mask of its own heads over the whole sequence
        assert (result["mask_heads"], result["mask_q_len"]) == ([2, 1][rank], expected.shape[3])


def test_a_new_sequence_length_refreshes_every_rank_even_one_whose_shard_kept_its_length(ranks):
    model, rotary, hidden = _problem()
    handle = fd.apply(model, fd.SparseAttentionConfig(attention_fn=reference_attention_fn, **SCHEDULE))
    _run_steps(model, handle, rotary, hidden)
    expected = _run_short_step(model, handle, rotary, hidden)
    assert handle.stats()["blocks.0.attn1"].refresh_steps == [1, 3, SHORT_STEP]
    pieces = shard_ranges(SHORT, WORLD)
    assert [len(p) for p in pieces] == [37, 37]  # rank 1's shard: 37 tokens before and after
    for rank, result in enumerate(ranks):
        want = expected[:, :, pieces[rank].start:pieces[rank].stop]
        assert relative_l2(result["short_out"], want) < 1e-5, rank
        assert result["short_refreshes"] == [1, 3, SHORT_STEP], rank


def test_a_rank_owning_no_head_keeps_step_with_the_others(ranks):
    model, rotary, hidden = _problem(heads=1)
    handle = fd.apply(model, fd.SparseAttentionConfig(attention_fn=reference_attention_fn, **SCHEDULE))
    expected = _run_steps(model, handle, rotary, hidden)
    pieces = shard_ranges(expected.shape[3], WORLD)
    for rank, result in enumerate(ranks):
        want = expected[:, :, :, pieces[rank].start:pieces[rank].stop]
        assert relative_l2(result["few_out"], want) < 1e-5, rank


def test_reused_masks_matter():
    """The sparse steps differ from dense attention, so a reuse step with the wrong mask would show."""
    model, rotary, hidden = _problem()
    handle = fd.apply(model, fd.SparseAttentionConfig(attention_fn=reference_attention_fn, **SCHEDULE))
    sparse = _run_steps(model, handle, rotary, hidden)
    fd.remove(model)
    dense = _run_steps(model, fd.apply(model, fd.SparseAttentionConfig(
        attention_fn=reference_attention_fn, **{**SCHEDULE, "dense_steps": STEPS})), rotary, hidden)
    assert relative_l2(sparse[2, 0], dense[2, 0]) > 1e-2
    torch.testing.assert_close(sparse[:, 1], dense[:, 1])  # the dense layer


def test_parallel_options_checks():
    with pytest.raises(ValueError, match=r"parallel_options accepts head_groups, exchange and key_tile, got \['groups'\]"):
        fd.SparseAttentionConfig(process_group=object(), parallel_options=dict(groups=2))
    with pytest.raises(ValueError, match="parallel_options apply to sequence parallelism: give process_group too"):
        fd.SparseAttentionConfig(parallel_options=dict(head_groups=2))
    with pytest.raises(TypeError, match="parallel_options must be a dict, got list"):
        fd.SparseAttentionConfig(process_group=object(), parallel_options=["copy"])
    # values too, when the config is made (they had failed at the first call)
    for options, message in ((dict(head_groups=0), "head_groups must be a positive int"),
                             (dict(exchange="bogus"), "exchange must be one of"),
                             (dict(key_tile=48), "key_tile must be None or one of")):
        with pytest.raises(ValueError, match=message):
            fd.SparseAttentionConfig(process_group=object(), parallel_options=options)


def test_process_group_config_checks():
    with pytest.raises(ValueError, match="attention_fn and process_group exclude each other"):
        fd.SparseAttentionConfig(process_group=object(), attention_fn=reference_attention_fn)
    with pytest.raises(ValueError, match="Wan transformers only"):
        fd.apply(tiny_hunyuan(), fd.SparseAttentionConfig(process_group=object()))
