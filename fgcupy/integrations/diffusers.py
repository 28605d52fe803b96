"""fgcupy in diffusers' video transformers: one call switches Wan 2.1 / HunyuanVideo / CogVideoX to
slice-sparse self-attention, another switches back.

>>> handle = apply(pipe.transformer, SparseAttentionConfig(predictor="topk", density=0.1))
>>> video = pipe(prompt).frames            # the pipeline itself is unchanged
>>> remove(pipe.transformer)

``apply`` swaps the processor of every self-attention layer (modules whose processor is diffusers'
stock ``WanAttnProcessor`` on a self-attention ``WanAttention``, ``HunyuanVideoAttnProcessor2_0`` or
``CogVideoXAttnProcessor2_0``, whose joint attention puts the text tokens first)
for one that repeats the stock math (projections, q/k norms, rotary embeddings, output projection)
and replaces only the attention call with fgcupy's kernel. What the kernel cannot express goes to
the stock processor unchanged: cross-attention, head dims without a kernel, context parallelism,
attention masks other than a boolean key-padding mask (HunyuanVideo's text padding is folded into
the slice mask instead, so its layers stay sparse).

The denoising step reaches the processors through a forward pre-hook on the transformer: a call
with a smaller timestep than the last starts a new step, a call with the same timestep is another
branch of the same step (classifier-free guidance runs the model twice per step; each branch keeps
its own masks), a larger timestep starts a new generation (masks are dropped). Reading the timestep
costs one host synchronisation per transformer call, not per layer. Calls with one timestep past
``MAX_BRANCHES`` branches start a new generation too. Back-to-back one-step generations cannot be
told from guidance branches by the count: ``step_callback`` (a pipeline's callback_on_step_end)
ends a generation after the pipeline's last step, or ``reset()`` between them says so.
``set_step`` takes the count over until ``reset()`` (manual counting: it starts a new generation
at a step before the current one, with ``new_generation=True``, or after ``step_callback`` saw a
generation end). The schedule and the masks are
fgcupy's ``MaskCache`` (one entry per layer and guidance branch): masks are predicted on refresh
steps and reused in between; warm-up steps and chosen layers run dense through the stock processor.
With ``predictor="colmax"`` (the exact schedule) a refresh call runs dense attention through
fgcupy's kernel, returns that exact output, and keeps the exact column-max mask its LSE gives.
With ``mask_from_warmup`` the last warm-up step does the same (its output is dense anyway), and its
exact mask serves the first sparse step (the default with dense warm-up steps, paired with
``sparse_refresh`` so that later refreshes keep its keys; without it they use the predictor).
With ``sparse_refresh`` a refresh of a layer that has a mask attends through it, and the next mask is
the exact column max (with that call's LSE) over the keys it kept and the keys the predictor adds.
With ``local_search`` the candidates also hold the old mask's keys moved by a token, a row or a frame
of the token grid (read from the transformer call's ``hidden_states`` and the model's patch size).
With ``refresh_on_drift`` a layer also refreshes on a step where the block means of its queries or
keys moved past the threshold since its mask was made (one host synchronisation per layer); with
``refresh_on_missed_mass``, on the step after the share of attention mass its mask misses grew by a
factor (read from the sparse call's LSE and 64 sampled queries' exact LSE per head, without a
synchronisation).

Sequence parallel (``process_group``, Wan only): each rank's processor gets its contiguous shard of
the sequence (and the matching rows of the rotary tables) and attends through
``fgcupy.distributed.SequenceParallelAttention``; masks are predicted per rank for the heads it
owns. Sharding the model's inputs and gathering its output is the caller's job (diffusers' own
context parallelism, ``_parallel_config``, still routes to the stock processor).
"""

from __future__ import annotations

import dataclasses
import warnings
import logging
import math
import operator
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import bridge
from ..attention import SparseAttention, dense_attention_with_lse, sparse_attention
from ..cache import block_means, mask_recall, means_drift, missed_more
from ..calibration import calibrate
from ..diagonals import find_diagonals
from ..mask import SliceMask, is_int, num_blocks
from ..local_search import search_offsets, union_keys
from ..gpu_prediction import attention_kernels_ahead, colmax_kernels
from ..jit.runtime import kernels_can_run, load_in_background
from ..mask_algebra import drop_keys
from ..mask_reference import default_scale
from .diffusers_config import COMPACT_SHARE, SparseAttentionConfig
from .diffusers_processors import (  # noqa: F401
    CogVideoXSparseProcessor,
    HunyuanVideoSparseProcessor,
    WanSparseProcessor,
    _Processor,
)

log = logging.getLogger("fgcupy")

__all__ = [
    "CogVideoXSparseProcessor",
    "HunyuanVideoSparseProcessor",
    "LayerStats",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "WanSparseProcessor",
    "apply",
    "drop_keys",
    "handle_of",
    "kernel_available",
    "remove",
    "token_grid",
]

#: Guidance branches one step may have; a further call with the same timestep starts a new
#: generation (bounding the masks kept when one-step generations run back to back).
MAX_BRANCHES = 4
_HANDLE_ATTR = "_fgcupy_sparse_attention"


def kernel_available() -> bool:
    """True when fgcupy's CUDA kernel can run in this process (fgcupy.jit.runtime.kernels_can_run)."""
    return kernels_can_run()


# ----------------------------------------------------------------------------------------------
# per-layer state and statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """What one self-attention layer did: calls by path over every generation, and the steps of
    the current generation (the last one, once it ended) on which it predicted masks (one entry
    per prediction, so two guidance branches refreshing on step 5 give [5, 5]). The step lists
    start empty with each generation, so a long-running pipeline's statistics do not grow;
    ``refreshes`` counts every generation's."""

    name: str
    index: int
    sparse_calls: int = 0
    dense_calls: int = 0
    stock_calls: int = 0
    stock_reasons: dict = field(default_factory=dict)
    refresh_steps: list = field(default_factory=list)
    drift_refresh_steps: list = field(default_factory=list)  # refreshes that refresh_on_drift asked for
    missed_mass_refresh_steps: list = field(default_factory=list)  # refreshes that refresh_on_missed_mass asked for
    calibrations: int = 0  # per-head pooling choices made (calibrate_pooling)
    diagonals: tuple = ()  # the diagonals last found (find_diagonals)
    earlier_refreshes: int = 0  # predictions of the generations before the current one

    @property
    def refreshes(self) -> int:
        """Masks predicted over every generation."""
        return self.earlier_refreshes + len(self.refresh_steps)

    def start_generation(self) -> None:
        """Empties the step lists (their predictions stay counted in ``refreshes``)."""
        self.earlier_refreshes += len(self.refresh_steps)
        self.refresh_steps.clear()
        self.drift_refresh_steps.clear()
        self.missed_mass_refresh_steps.clear()

    def record_stock(self, reason: str) -> None:
        self.stock_calls += 1
        self.stock_reasons[reason] = self.stock_reasons.get(reason, 0) + 1


def without_padded_keys(k: torch.Tensor, key_valid) -> torch.Tensor:
    """k ``[B, S, H, D]`` as mask prediction is to see it: padded keys (``key_valid`` False) NaN,
    which adds no mass to any row and scores lowest, so a row's budget goes to real keys (ranked
    with the rest and dropped after, they would leave rows short, a small block empty)."""
    if key_valid is None:
        return k
    return k.masked_fill(~key_valid[:, :, None, None], float("nan"))


@dataclass
class _Slot:
    """What one layer keeps per guidance branch beside its mask (which is in the handle's
    MaskCache): the kernel plan, or the sequence-parallel attention object, and what the mask
    was predicted for."""

    plan: SparseAttention | None = None  # its own (compact_masks: the handle's, shared by a shape)
    parallel: object = None  # fgcupy.distributed.SequenceParallelAttention
    key: tuple | None = None  # what the mask was made for (shapes, dtype, device): a change forces a refresh
    key_version: int = 0
    means: tuple | None = None  # block means of (q, k) the mask was made from (refresh_on_drift)
    recall: torch.Tensor | None = None  # [B, H] mask_recall on the mask's first sparse step (refresh_on_missed_mass)
    missed_more: tuple | None = None  # (host bool, CUDA event or None) of the last reading (refresh_on_missed_mass)
    searches: int = 0  # local searches run (which grid step the next one moves keys by)
    # process_group: the mask of each head group (by its (first, stop) heads) and the whole sequence's
    # (q_len, kv_len) they were predicted for
    parallel_parts: dict = field(default_factory=dict)
    parallel_lengths: tuple | None = None


class _Layer:
    def __init__(self, name: str, index: int, module, stock, dense: bool):
        self.name = name
        self.index = index
        # weak: the module holds the processor, which holds the handle, which holds this; a strong
        # reference back would keep a deleted model (weights, masks) alive until a garbage collection
        self._module = weakref.ref(module)
        self.stock = stock
        self.dense = dense
        self.slots: dict[int, _Slot] = {}
        self.stats = LayerStats(name, index)
        # calibrate_pooling: per-head poolings per (branch, shapes), kept across generations (a
        # head's kind is the model's, not the prompt's); reset(recalibrate=True) forgets them.
        self.poolings: dict[tuple, list] = {}
        # find_diagonals: the key offsets scored exactly too, per (branch, shapes), kept likewise.
        self.diagonals: dict[tuple, tuple] = {}

    @property
    def module(self):
        """The attention module (None once the model is gone)."""
        return self._module()


# ----------------------------------------------------------------------------------------------
# the handle: step tracking, mask prediction, statistics
# ----------------------------------------------------------------------------------------------
class SparseAttentionHandle:
    """Returned by ``apply``; also at ``transformer._fgcupy_sparse_attention``.

    ``step`` / ``branch`` say where the current transformer call sits in the denoising loop;
    ``stats()`` and ``refresh_counts()`` say what each layer did; ``set_step`` drives the schedule
    by hand (benchmarks, custom loops); ``reset`` forgets masks before an unrelated generation.
    """

    def __deepcopy__(self, memo):
        # A copy would still reach the original model's layers (weak references are shared), so
        # remove() on the copied model could not find its processors.
        raise TypeError("a model patched by fgcupy.integrations.diffusers cannot be deep-copied: copy it before "
                        "apply(), or remove() it, copy, and apply() to each copy")

    def __reduce_ex__(self, protocol):
        raise TypeError("a model patched by fgcupy.integrations.diffusers cannot be pickled (e.g. torch.save of the "
                        "whole module): save its state_dict, or remove() the patch first")

    def __init__(self, transformer, config: SparseAttentionConfig, layers: list[_Layer]):
        self._transformer = weakref.ref(transformer)  # weak, as _Layer's module
        self.config = config
        self.layers = {layer.name: layer for layer in layers}
        self.cache = config.mask_cache()  # keys: (layer name, guidance branch)
        self._shared_plans: dict[tuple, SparseAttention] = {}  # compact masks: one per input shapes
        self._compact = self._compact_choice()  # None: chosen at the generation's first mask
        self.step = 0
        self.branch = 0
        self.generation = 0
        self._last_timestep: float | None = None
        self._in_call = False  # set between a counted call's hooks: still set, the last call raised
        self._calls = 0
        self._manual = False  # set_step drives the schedule; the hook no longer counts calls
        self._step_over = False  # end_step: the next call starts a step even at the same timestep
        self._generation_over = False  # step_callback saw the last (or an interrupted) step: the next call starts anew
        self._hooks: list = []  # the transformer's forward pre- and post-hooks
        self._padding_host: dict[int, torch.Tensor] = {}
        self._padding_version: dict[int, int] = {}
        self._padding_seen: dict[int, tuple] = {}
        self._branch_padding: dict[int, torch.Tensor] = {}  # key padding of each guidance branch
        self._own_slots: set[int] = set()  # share_branches: branches whose padding is not branch 0's
        self.grid: tuple | None = config.grid  # the latent token grid (local_search, poolings, diagonals)
        model = compiled_model(transformer)
        self._timestep_position = _timestep_position(model)
        self._frames_first = type(model).__name__.startswith("CogVideoX")  # its latents [B, F, C, H, W]

    # ---- steps ----
    def _pre_hook(self, module, args, kwargs):
        at = self._timestep_position
        positional = args[at] if at is not None and len(args) > at else None
        timestep = kwargs.get("timestep", positional)
        # The grid: local_search's offsets, and part of what poolings and diagonals are kept for.
        cfg = self.config
        if cfg.local_search or cfg.calibrate_pooling or cfg.find_diagonals:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            read = token_grid(getattr(module, "config", None), hidden, self._frames_first)
            if cfg.grid is None:
                self.grid = read
            elif read is not None and tuple(read) != tuple(cfg.grid):
                raise ValueError(f"the config's grid={tuple(cfg.grid)} is not this call's latent token grid {tuple(read)} "
                                 "(another video size or orientation?): give grid=None to read it from each call")
        if self._manual or (at is None and "timestep" not in kwargs):
            self._padding_seen.clear()  # set_step or the caller's begin_forward counts the steps
        else:
            if self._in_call:  # the last call raised: this one starts over
                self._new_generation()
                self._calls, self._last_timestep = 0, None
            self._in_call = True
            self.begin_forward(timestep)

    def _post_hook(self, module, args, kwargs, output):
        self._in_call = False

    def begin_forward(self, timestep=None) -> None:
        """Account one transformer call: a smaller timestep than the last is the next step, the
        same timestep another branch of this step, a larger one a new generation (masks dropped).
        Without a timestep every call is a new step."""
        value = None
        if timestep is not None:
            value = float(torch.as_tensor(timestep).detach().max())
        if self._generation_over:  # whatever its timestep: a pipeline's generation ended
            self._new_generation()
            self._calls, self._last_timestep, self._generation_over = 0, None, False
        if self._calls == 0:
            self.step, self.branch = 0, 0
        elif (value is None or self._last_timestep is None or value < self._last_timestep
              or (self._step_over and value == self._last_timestep)):
            self.step, self.branch = self.step + 1, 0
        elif value == self._last_timestep and self.branch + 1 < MAX_BRANCHES:
            self.branch += 1
        else:
            self._new_generation()
        self._calls += 1
        self._last_timestep = value
        self._step_over = False
        self._padding_seen.clear()

    def end_step(self) -> None:
        """The current denoising step is over: the next call starts the next step even at the same
        timestep. Schedulers that round timesteps to ints can repeat one (999, 999 at a high flow
        shift and many steps), which the count alone takes for another guidance branch."""
        self._step_over = True

    def step_callback(self, pipe, step_index: int, timestep, callback_kwargs: dict) -> dict:
        """``pipe(..., callback_on_step_end=handle.step_callback)``: ``end_step`` after each step
        of a diffusers pipeline, and after its last step (``pipe.num_timesteps``) or one where it
        was interrupted (``pipe.interrupt``) the next call starts a new generation, whatever its
        timestep, and the generation's masks and plans are freed now; returns the pipeline's
        tensors unchanged."""
        self.end_step()
        if _flag(getattr(pipe, "interrupt", False)) or step_index + 1 >= _count(getattr(pipe, "num_timesteps", None)):
            self._generation_over = True
            self._release_masks()  # no call of this generation needs them: an idle pipeline holds none
        return callback_kwargs

    def set_step(self, step: int, branch: int = 0, new_generation: bool = False) -> None:
        """Put the schedule at ``step`` (and guidance ``branch``) for the next calls, which stay
        there: from now until ``reset()`` the transformer's calls no longer move the count. A step
        before the current one, or ``new_generation=True`` (a one-step model's next generation, or
        one that starts at a later step than the last ended), starts a new generation (masks dropped)."""
        if not is_int(step) or step < 0 or not is_int(branch) or branch < 0:
            raise ValueError(f"step and branch must be ints >= 0, got step={step!r}, branch={branch!r}")
        if not isinstance(new_generation, bool):
            raise TypeError(f"new_generation must be a bool, got {new_generation!r}")
        if new_generation or self._generation_over or (self._calls and step < self.step):  # another generation
            self._new_generation()
            self._generation_over = False
        self._manual = True
        self.step, self.branch = int(step), int(branch)
        self._calls = max(self._calls, 1)
        self._padding_seen.clear()

    def reset(self, clear_stats: bool = False, recalibrate: bool = False) -> None:
        """Forget masks and the step count (the next call is step 0 of a new generation); with
        ``recalibrate`` also the calibrated poolings and found diagonals (calibrate_pooling and
        find_diagonals choose them again)."""
        self._new_generation()
        if recalibrate:
            for layer in self.layers.values():
                layer.poolings.clear()
                layer.diagonals.clear()
        self._calls = 0
        self._last_timestep = None
        self._manual = False
        self._step_over = False
        self._generation_over = False
        self._in_call = False
        if clear_stats:
            for layer in self.layers.values():
                layer.stats = LayerStats(layer.name, layer.index)

    @property
    def transformer(self):
        """The patched model (None once it is gone)."""
        return self._transformer()

    def _release_masks(self) -> None:
        for layer in self.layers.values():
            layer.slots.clear()
        self.cache.clear()
        self._shared_plans.clear()
        self._compact = self._compact_choice()

    def _new_generation(self) -> None:
        self.step, self.branch = 0, 0
        self.generation += 1
        self._release_masks()
        self._padding_host.clear()
        self._padding_version.clear()
        self._padding_seen.clear()
        self._branch_padding.clear()
        self._own_slots.clear()
        for layer in self.layers.values():
            layer.stats.start_generation()

    # ---- statistics ----
    def stats(self) -> dict[str, LayerStats]:
        """Copies of every patched layer's statistics, by module name, in model order."""
        return {name: dataclasses.replace(layer.stats, stock_reasons=dict(layer.stats.stock_reasons),
                                          refresh_steps=list(layer.stats.refresh_steps),
                                          drift_refresh_steps=list(layer.stats.drift_refresh_steps),
                                          missed_mass_refresh_steps=list(layer.stats.missed_mass_refresh_steps))
                for name, layer in self.layers.items()}

    def refresh_counts(self) -> dict[str, int]:
        return {name: layer.stats.refreshes for name, layer in self.layers.items()}

    def mask(self, name: str, branch: int = 0) -> SliceMask | None:
        """A copy of the mask layer ``name`` holds for ``branch`` (None before it has made one:
        at the warm-up step that makes the exact mask, or else its first sparse call; a refresh
        rewrites the held one in place); with share_branches, a branch that attends through the
        first branch's mask (its key padding the same) gets that one; with a process group, the
        mask of this rank's heads over the whole sequence."""
        if name not in self.layers:
            raise KeyError(f"no patched layer {name!r}; layers: {list(self.layers)}")
        if self.config.share_branches and branch not in self._own_slots and (name, branch) not in self.cache:
            branch = 0
        if (name, branch) not in self.cache:
            return None
        held = self.cache.get((name, branch))
        return SliceMask(held.indptr.clone(), held.indices.clone(), held.slice_m, held.q_len, held.kv_len)

    @property
    def compact_masks(self) -> bool | None:
        """Whether this generation holds its masks compactly (SparseAttentionConfig.compact_masks;
        None before its first mask where the config leaves the choice to it)."""
        return self._compact

    def mask_memory_bytes(self) -> int:
        """Bytes of the masks held: the cache's, and with compact masks the shared plans' keys."""
        shared = sum(plan.mask.memory_bytes() for plan in self._shared_plans.values() if plan.mask is not None)
        return self.cache.memory_bytes() + shared

    def describe(self) -> str:
        """How masks are made, then the MaskCache's summary: schedule, then every (layer, branch)
        mask held."""
        return self.config.mask_making() + "\n" + self.config.schedule_summary() + "\n" + self.cache.describe()

    # ---- routing ----
    def _slot_branch(self) -> int:
        """The branch whose masks this call uses: its own, or with share_branches the first's
        (unless this branch's key padding differs from it)."""
        shared = self.config.share_branches and self.branch not in self._own_slots
        return 0 if shared else self.branch

    def is_dense(self, layer: _Layer) -> bool:
        return layer.dense or self.cache.action(self.step) == "dense"

    def makes_warmup_mask(self, layer: _Layer) -> bool:
        """With mask_from_warmup: whether this call, on the last warm-up step, is to run dense
        through fgcupy and keep the exact mask of its LSE (once per step with shared branches)."""
        cfg = self.config
        if not cfg.mask_from_warmup or layer.dense or self.step != cfg.dense_steps - 1:
            return False
        entry = (layer.name, self._slot_branch())
        return not (entry in self.cache and self.cache.step_of(entry) == cfg.dense_steps)

    def key_padding(self, attention_mask: torch.Tensor, batch: int, kv_len: int):
        """(key_valid [B, KV] bool or None when every key is valid, version). The first layer of a
        transformer call that sees a new mask copies it to the host once; later layers of the call
        get the answer by identity (and the tensor's version: a mask refilled in place is read
        again). A changed padding bumps the version, so layers re-predict."""
        # An inference-mode tensor has no version counter: its identity alone tells.
        tensor_version = None if attention_mask.is_inference() else attention_mask._version
        seen = self._padding_seen.get(id(attention_mask))
        if seen is not None and seen[0] is attention_mask and seen[3] == tensor_version:
            return seen[1], seen[2]
        valid = attention_mask.reshape(attention_mask.shape[0], kv_len).expand(batch, kv_len)
        host = valid.to("cpu", torch.bool, copy=True)  # the caller may refill its mask in place
        self._branch_padding[self.branch] = host
        first = self._branch_padding.get(0)
        if self.config.share_branches and self.branch and first is not None and not _same(first, host):
            self._own_slots.add(self.branch)  # a shared mask would be re-made for each padding in turn
        branch = self._slot_branch()
        previous = self._padding_host.get(branch)
        if previous is None or previous.shape != host.shape or not torch.equal(previous, host):
            self._padding_host[branch] = host
            self._padding_version[branch] = self._padding_version.get(branch, 0) + 1
        version = self._padding_version[branch]
        key_valid = None if bool(host.all()) else valid.to(torch.bool).contiguous()
        self._padding_seen[id(attention_mask)] = (attention_mask, key_valid, version, tensor_version)
        return key_valid, version

    def _needs_refresh(self, entry: tuple, slot: _Slot, key: tuple, key_version: int) -> bool:
        """The cache's schedule says refresh (once per step, whatever the number of branches sharing
        the entry), or the mask was predicted for other shapes or another key padding."""
        if self._needs_new_shape(entry, slot, key, key_version):
            return True
        return self.cache.action(self.step, entry) == "refresh" and self.cache.step_of(entry) != self.step

    def _needs_new_shape(self, entry: tuple, slot: _Slot, key: tuple, key_version: int) -> bool:
        """Whether the slot has no mask for inputs of this shape and key padding."""
        return slot.key != key or slot.key_version != key_version or entry not in self.cache

    def _block_means(self, q, k) -> tuple | None:
        """With refresh_on_drift: the block means of q, k ``[B, S, H, D]``; else None."""
        if self.config.refresh_on_drift is None:
            return None
        return tuple(block_means(x.transpose(1, 2), self.config.slice_m) for x in (q, k))

    def _drifted(self, slot: _Slot, means: tuple) -> bool:
        """Whether q or k moved past refresh_on_drift since the slot's mask was made (one host sync)."""
        if slot.means is None or any(old.shape != new.shape for old, new in zip(slot.means, means)):
            return False
        drift = torch.maximum(means_drift(slot.means[0], means[0]), means_drift(slot.means[1], means[1]))
        return bool(drift.item() > self.config.refresh_on_drift)

    def _store(self, layer: _Layer, entry: tuple, slot: _Slot, mask: SliceMask, key: tuple, key_version: int,
               serves_step: int | None = None):
        """Cache ``mask`` as the one made for ``serves_step`` (default: this step)."""
        self.cache.put(entry, mask, self.step if serves_step is None else serves_step)
        self.cache.record_prediction()
        slot.key, slot.key_version = key, key_version
        slot.recall, slot.missed_more = None, None
        layer.stats.refresh_steps.append(self.step)

    def _missed_more(self, slot: _Slot) -> bool:
        """Whether the last recall reading of the slot's mask missed too much (refresh_on_missed_mass):
        False until the reading has reached the host."""
        if slot.missed_more is None:
            return False
        more, copied = slot.missed_more
        if copied is not None and not copied.query():
            return False
        slot.missed_more = None
        return bool(more)

    def _read_recall(self, slot: _Slot, q, k, lse, key_valid) -> None:
        """Queue the recall reading of the slot's mask from this sparse call's LSE: the first after
        a refresh is the reference; whether a later one misses more than refresh_on_missed_mass x
        the reference's missed mass is copied to the host without a sync, for the next step."""
        pending = slot.missed_more
        if pending is not None and pending[1] is not None and not pending[1].query():
            return  # the last reading has not reached the host: it is read first
        recall = mask_recall(q.transpose(1, 2), k.transpose(1, 2), lse, default_scale(q.shape[-1]), key_valid)
        if slot.recall is None or slot.recall.shape != recall.shape:
            slot.recall = recall
            return
        more = missed_more(recall, slot.recall, self.config.refresh_on_missed_mass)
        if more.is_cuda:
            copied = torch.cuda.Event()
            slot.missed_more = (more.to("cpu", non_blocking=True), copied)
            copied.record(torch.cuda.current_stream(more.device))  # the copy's stream
        else:
            slot.missed_more = (more, None)

    def attend(self, layer: _Layer, q, k, v, key_valid=None, key_version: int = 0):
        """Slice-sparse attention of q, k, v ``[B, S, H, D]``: refresh the layer's mask when the
        schedule (or a new shape / key padding) asks, then run the kernel on the cached plan."""
        cfg = self.config
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        branch = self._slot_branch()
        first = layer.slots.get(0)
        if branch != self.branch and first is not None and first.key is not None and first.key != key:
            self._own_slots.add(self.branch)  # inputs of other shapes: a shared mask would be re-made each call
            branch = self.branch
        entry = (layer.name, branch)
        slot = layer.slots.setdefault(branch, _Slot())
        warmup = self.cache.action(self.step) == "dense"  # routed here by makes_warmup_mask
        scheduled = warmup or self._needs_refresh(entry, slot, key, key_version)
        plan = None  # set where this call plans a new mask
        # Drift is judged on the branch that makes the slot's masks (the first, with shared branches).
        means = self._block_means(q, k) if branch == self.branch else None
        drifted = (not scheduled and means is not None and self.cache.step_of(entry) != self.step
                   and self._drifted(slot, means))
        reads_recall = cfg.refresh_on_missed_mass is not None and branch == self.branch
        lost_mass = (not (scheduled or drifted) and reads_recall and self.cache.step_of(entry) != self.step
                     and self._missed_more(slot))
        if scheduled or drifted or lost_mass:
            if drifted:
                layer.stats.drift_refresh_steps.append(self.step)
            if lost_mass:
                layer.stats.missed_mass_refresh_steps.append(self.step)
            if means is not None:
                slot.means = means
            # Poolings and diagonals are a head's kind on one token grid (a transposed grid of as many
            # tokens has other row and frame offsets).
            tuned = (branch, key, self.grid)
            poolings = layer.poolings.get(tuned)
            calibrating = cfg.calibrate_pooling and poolings is None and not warmup
            dense_out, lse = self._dense_call(layer, q, k, v, key_valid) if cfg.exact or warmup else (None, None)
            # sparse_refresh: a layer whose mask still fits these inputs attends through it
            # (calibration still runs first).
            old = None
            if cfg.sparse_refresh and not (warmup or calibrating) and not self._needs_new_shape(entry, slot, key,
                                                                                             key_version):
                held = None if cfg.attention_fn is not None else self._planned(slot, entry, key, q)
                old = self.cache.get(entry) if held is None else held.mask
                sparse_out, mask = self._refresh_from_sparse_call(layer, tuned, slot, held, old, q, k, v,
                                                                  key_valid, poolings)
            elif calibrating:  # from sampled queries: no dense step
                calibration = calibrate(q.transpose(1, 2), self._keys_seen(k, key_valid).transpose(1, 2), None,
                                        cfg.slice_m,
                                        method=cfg.predictor, **cfg.predictor_arguments())
                layer.poolings[tuned], mask = calibration.poolings, calibration.mask
                layer.stats.calibrations += 1
            elif warmup:
                mask = self._predict(layer, q.transpose(1, 2), self._keys_seen(k, key_valid).transpose(1, 2), lse)
            else:
                k_seen = self._keys_seen(k, key_valid)
                if lse is None and cfg.estimate_first_mask and self._needs_new_shape(entry, slot, key, key_version):
                    lse = "estimate"  # the exact column max with estimated LSEs: every key scored, no diagonals
                diagonals = () if lse is not None else self._diagonals(layer, tuned, q, k_seen)
                mask = self._predict(layer, q.transpose(1, 2), k_seen.transpose(1, 2), lse, poolings, diagonals)
            if key_valid is not None:
                mask = drop_keys(mask, key_valid)
            if self._compact is None:
                self._choose_compact(mask)
            if cfg.attention_fn is None:
                plan = self._plan_of(slot, key)
                plan.plan(_in_held_buffer(plan, mask) if self._compact else mask, head_dim=q.shape[-1], dtype=q.dtype)
                if not self._compact:
                    mask = plan.mask  # the cache holds the plan's own mask: no second copy
            # The warm-up's mask is the first sparse step's: that step need not predict.
            self._store(layer, entry, slot, mask, key, key_version, cfg.dense_steps if warmup else None)
            if dense_out is not None:
                layer.stats.dense_calls += 1
                return dense_out
            if old is not None:
                layer.stats.sparse_calls += 1
                return sparse_out
        else:
            self.cache.record_reuse()
        layer.stats.sparse_calls += 1
        if cfg.attention_fn is not None:
            mask = self.cache.get(entry)
            out = _user_attention(cfg, layer, q, k, v, mask)
            lse = sparse_attention(q, k, v, mask, layout="NHD", return_lse=True)[1] if reads_recall else None
        else:
            plan = plan if plan is not None else self._planned(slot, entry, key, q)
            if not reads_recall:
                return plan.run(q, k, v, layout="NHD")
            out, lse = plan.run(q, k, v, layout="NHD", return_lse=True)
        if lse is not None:
            self._read_recall(slot, q, k, lse, key_valid)
        return out

    def attend_parallel(self, layer: _Layer, q, k, v, dense: bool):
        """Sequence-parallel attention of this rank's shard q, k, v ``[B, S_r, H, D]``. The mask is a
        callable SequenceParallelAttention calls per head group on the exchanged full-sequence q, k:
        on refresh steps, or when the whole sequence's length changed, it predicts the group's mask;
        otherwise it hands back the group's mask of the last refresh (the same object, so the plan
        stays). Both tests read what every rank shares (the step, the whole sequence's length), not
        this rank's shard, so all ranks refresh together."""
        from ..distributed import SequenceParallelAttention, concat_heads

        branch = self._slot_branch()
        slot = layer.slots.setdefault(branch, _Slot())
        if slot.parallel is None:
            slot.parallel = SequenceParallelAttention(self.config.process_group, **self.config.parallel_options)
        if dense:
            return slot.parallel(q, k, v, None, layout="NHD")
        entry = (layer.name, branch)
        key = (q.shape[0], q.shape[2], q.shape[3], q.dtype, q.device)
        scheduled = self._needs_refresh(entry, slot, key, 0)
        layer.stats.sparse_calls += 1
        predicted = {}

        def refreshing() -> bool:
            return scheduled or slot.parallel.lengths != slot.parallel_lengths

        def group_mask(q_heads, k_heads, heads):
            span = (heads.start, heads.stop)
            if refreshing() or span not in slot.parallel_parts:
                predicted[span] = self._predict(layer, q_heads.contiguous(), k_heads.contiguous())
                return predicted[span]
            return slot.parallel_parts[span]

        out = slot.parallel(q, k, v, group_mask, layout="NHD")
        if not refreshing():
            slot.parallel_parts.update(predicted)
            self.cache.record_reuse()
            return out
        if predicted:
            mask = concat_heads([predicted[span] for span in sorted(predicted)])
        else:  # this rank owns no head: a mask of none
            q_len, kv_len = slot.parallel.lengths
            mask = SliceMask(torch.zeros(q.shape[0], 0, num_blocks(q_len, self.config.slice_m) + 1, dtype=torch.int32,
                                         device=q.device), torch.zeros(0, dtype=torch.int32, device=q.device),
                             self.config.slice_m, q_len, kv_len)
        slot.parallel_parts, slot.parallel_lengths = predicted, slot.parallel.lengths
        self._store(layer, entry, slot, mask, key, 0)
        return out

    def _compact_choice(self) -> bool | None:
        """compact_masks as given; None (choose at the first mask) only where it can be compact."""
        given = self.config.compact_masks
        return False if given is None and self.config.process_group is not None else given

    def _choose_compact(self, mask: SliceMask) -> None:
        """compact_masks=None: hold masks compactly where ``mask`` held expanded by every patched
        layer, for both guidance branches (one with share_branches), would take more than
        COMPACT_SHARE of its GPU's memory."""
        compact = False
        if mask.device.type == "cuda":
            layers = sum(not layer.dense for layer in self.layers.values())
            branches = 1 if self.config.share_branches else 2
            total = torch.cuda.get_device_properties(mask.device).total_memory
            compact = mask.memory_bytes() * layers * branches > COMPACT_SHARE * total
        self._compact = compact
        self.cache.keep_expanded(not compact)

    def _plan_of(self, slot: _Slot, key: tuple) -> SparseAttention:
        """The kernel plan a slot's calls run on: its own, or with compact masks the one the
        layers of its input shapes share."""
        if self._compact:
            return self._shared_plans.setdefault(key, SparseAttention())
        if slot.plan is None:
            slot.plan = SparseAttention()
        return slot.plan

    def _planned(self, slot: _Slot, entry: tuple, key: tuple, q) -> SparseAttention:
        """The plan holding ``entry``'s cached mask: the slot's own, or with compact masks the
        shared one, the mask expanded into its buffers now (where they hold its size: they grow to
        the largest mask of the layers sharing them)."""
        plan = self._plan_of(slot, key)
        if self._compact:
            held = _held_keys(plan, self.cache.stored_capacity(entry), q.device)
            plan.plan(self.cache.get(entry, out=held), head_dim=q.shape[-1], dtype=q.dtype)
        return plan

    def _dense_call(self, layer: _Layer, q, k, v, key_valid):
        """(exact output, row LSE) of q, k, v ``[B, S, H, D]``: the refresh call of the exact
        schedule. With ``attention_fn`` the output is its answer on the full mask."""
        cfg = self.config
        # The column-max prediction waiting for this call's LSE: its kernels compile beside the call's.
        _load_kernels_ahead(cfg, q.device, q.dtype, q.shape[-1], kv_len=k.shape[1])
        out, lse = dense_attention_with_lse(q, k, v, cfg.slice_m, key_valid, layout="NHD")
        if cfg.attention_fn is not None:
            batch, q_len, heads, _ = q.shape
            full = SliceMask.full(batch, heads, q_len, k.shape[1], cfg.slice_m, device=q.device)
            out = _user_attention(cfg, layer, q, k, v, full if key_valid is None else drop_keys(full, key_valid))
        return out, lse

    def _refresh_from_sparse_call(self, layer: _Layer, entry: tuple, slot: _Slot, plan: SparseAttention | None,
                                  old: SliceMask, q, k, v, key_valid, poolings) -> tuple:
        """sparse_refresh's refresh call of q, k, v ``[B, S, H, D]``: (its output through the
        layer's mask ``old``, which ``plan`` holds (None with ``attention_fn``), the next mask:
        the exact column max, with this call's LSE over ``old``'s keys, over those keys, the
        predictor's unless predict_on_refresh is False, and with local_search their moved
        copies). With ``attention_fn`` the output is its answer and the LSE fgcupy's (the
        reference on CPU tensors)."""
        cfg = self.config
        if plan is not None:
            out, lse = plan.run(q, k, v, layout="NHD", return_lse=True)
        else:
            _, lse = sparse_attention(q, k, v, old, layout="NHD", return_lse=True)
            out = _user_attention(cfg, layer, q, k, v, old)
        qh, kh = q.transpose(1, 2), k.transpose(1, 2)
        predicted = None
        if cfg.predict_on_refresh:
            k_seen = self._keys_seen(k, key_valid)
            predicted = self._predict(layer, qh, k_seen.transpose(1, 2), None, poolings,
                                      self._diagonals(layer, entry, q, k_seen))
        offsets = (0,)
        if cfg.local_search:
            if self.grid and math.prod(self.grid) > k.shape[1]:
                raise ValueError(f"local_search's grid {self.grid} holds {math.prod(self.grid)} tokens, more than "
                                 f"layer {layer.name}'s {k.shape[1]} keys: give the latent token grid")
            offsets = search_offsets(self.grid, slot.searches) if self.grid else (0, 1, -1)
            slot.searches += 1
        candidates = union_keys(old, offsets, predicted)
        if key_valid is not None:  # padded keys: the predictor's, and moved keys landing there
            candidates = drop_keys(candidates, key_valid)
        mask = _predict_mask()(qh, kh, slice_m=cfg.slice_m, method="colmax", lse=lse, candidates=(candidates,),
                               **cfg.exact_arguments())
        return out, mask

    def _keys_seen(self, k, key_valid):
        """k ``[B, S, H, D]`` as fgcupy's predictors see it (``without_padded_keys``: one copy of k,
        made only where a prediction runs); a callable predictor gets the model's own keys."""
        return k if callable(self.config.predictor) else without_padded_keys(k, key_valid)

    def _diagonals(self, layer: _Layer, entry: tuple, q, k) -> tuple:
        """The layer's diagonals (find_diagonals): found on its first refresh, then kept."""
        count = self.config.find_diagonals
        if not count:
            return ()
        if entry not in layer.diagonals:
            arguments = self.config.predictor_arguments()  # the predictor's band and scale space the diagonals
            spacing = {}
            if is_int(arguments.get("exact_band")):  # "auto" / None: find_diagonals' default band
                spacing["exact_band"] = int(arguments["exact_band"])
            if arguments.get("scale") is not None:
                spacing["scale"] = float(arguments["scale"])
            layer.diagonals[entry] = find_diagonals(q, k, self.config.slice_m, count=count, layout="NHD", **spacing)
            layer.stats.diagonals = layer.diagonals[entry]
        return layer.diagonals[entry]

    def _predict(self, layer: _Layer, q, k, lse=None, poolings=None, diagonals=()) -> SliceMask:
        """The layer's new mask: the exact column max where a dense call gave ``lse`` (or with
        ``lse="estimate"``, estimated LSEs), else the
        configured predictor (with per-head ``poolings`` once calibrated and the layer's
        ``diagonals``)."""
        cfg = self.config
        if callable(cfg.predictor):
            mask = cfg.predictor(q, k, slice_m=cfg.slice_m)
        elif lse is not None:
            mask = _predict_mask()(q, k, slice_m=cfg.slice_m, method="colmax", lse=lse, **cfg.exact_arguments())
        else:
            extra = {} if poolings is None else {"pooling": poolings}
            if diagonals:
                extra["diagonals"] = diagonals
            mask = _predict_mask()(q, k, slice_m=cfg.slice_m, method=cfg.predictor, **cfg.predictor_arguments(),
                                   **extra)
        if not isinstance(mask, SliceMask):
            raise TypeError(
                f"the predictor returned {type(mask).__name__} for layer {layer.name}, expected a SliceMask"
            )
        batch, heads, q_len, _ = q.shape
        expected = (batch, heads, q_len, k.shape[2], cfg.slice_m)
        actual = (mask.batch, mask.heads, mask.q_len, mask.kv_len, mask.slice_m)
        if actual != expected:
            raise ValueError(
                f"the predictor's mask for layer {layer.name} has (B, H, q_len, kv_len, slice_m)={actual}, "
                f"the layer needs {expected}"
            )
        return mask

    def device_ok(self, layer: _Layer, device: torch.device) -> bool:
        """True when fgcupy can take tensors on ``device``; False (stock path) or an error otherwise."""
        if self.config.attention_fn is not None or self.config.process_group is not None:
            return True
        if device.type == "cuda" and kernel_available():
            return True
        if self.config.fallback:
            return False
        raise RuntimeError(
            f"fgcupy cannot run layer {layer.name}: its tensors are on {device}, and the kernel needs a CUDA "
            f"device seen by torch (kernel_available()={kernel_available()}). Move the transformer to "
            "the GPU, or pass SparseAttentionConfig(fallback=True) to keep the stock attention here."
        )


# ----------------------------------------------------------------------------------------------
# apply / remove
# ----------------------------------------------------------------------------------------------
def _predict_mask():
    """fgcupy's public mask predictor (looked up late: the integration does not need it when a
    callable predictor is configured)."""
    import fgcupy

    predict = getattr(fgcupy, "predict_mask", None)
    if predict is None:
        raise ImportError(
            "this fgcupy has no predict_mask: pass a callable predictor (q, k, slice_m=...) -> SliceMask"
        )
    return predict


def compiled_model(transformer: torch.nn.Module) -> torch.nn.Module:
    """The model a ``torch.compile``'d transformer wraps (its forward's signature, class and layer
    names are the model's); the transformer itself otherwise."""
    inner = getattr(transformer, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) and type(transformer).__name__ == "OptimizedModule" else transformer


def _timestep_position(transformer) -> int | None:
    """Where a positional call of ``transformer`` passes the timestep (Wan and HunyuanVideo: second;
    CogVideoX: third, after the text states); None where its forward takes no ``timestep``."""
    import inspect

    try:
        names = list(inspect.signature(transformer.forward).parameters)
    except (TypeError, ValueError):
        return 1
    return names.index("timestep") if "timestep" in names else None


def _user_attention(config: SparseAttentionConfig, layer: _Layer, q, k, v, mask: SliceMask) -> torch.Tensor:
    """``config.attention_fn``'s output for q, k, v ``[B, S, H, D]`` under ``mask``, checked to be
    what the layer's output projection takes: a tensor of q's shape on q's device (any floating
    dtype: the processor casts it to q's)."""
    out = config.attention_fn(q, k, v, mask, None)
    if (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.device != q.device
            or not out.is_floating_point()):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"attention_fn returned {got} for layer {layer.name}; expected a floating tensor of q's "
                         f"[B, S, H, D] = {tuple(q.shape)} on {q.device}")
    return out


def _held_keys(plan: SparseAttention, size: int, device: torch.device) -> torch.Tensor | None:
    """``plan``'s key buffer where it holds ``size`` entries on ``device`` (compact masks expand
    and plan into it: it grows to the largest mask of the layers sharing it), else None."""
    held = None if plan.mask is None else plan.mask.indices
    return held if held is not None and held.numel() >= size and held.device == device else None


def _in_held_buffer(plan: SparseAttention, mask: SliceMask) -> SliceMask:
    """``mask`` with its keys copied into the first entries of ``plan``'s key buffer, where that
    holds them (compact masks: the plan shared by layers keeps the largest buffer any needed),
    else ``mask``; entries past its keys are left as they are."""
    held = _held_keys(plan, mask.indices.numel(), mask.device)
    if held is None:
        return mask
    with torch.inference_mode(held.is_inference()):  # a plan's buffers made under inference mode
        held[: mask.indices.numel()].copy_(mask.indices)
    return SliceMask(mask.indptr, held, mask.slice_m, mask.q_len, mask.kv_len)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def token_grid(model_config, hidden_states, frames_first: bool = False) -> tuple | None:
    """(frames, height, width) of the tokens a video transformer makes of ``hidden_states``
    [B, C, F, H, W] ([B, F, C, H, W] with ``frames_first``, as CogVideoX takes them): its sizes
    over the model's ``patch_size`` (Wan: a triple; HunyuanVideo and CogVideoX: an int beside
    ``patch_size_t``). None where either is missing."""
    patch = getattr(model_config, "patch_size", None)
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    if frames_first:
        hidden_states = hidden_states.transpose(1, 2)
    if isinstance(patch, (tuple, list)) and len(patch) == 3:
        steps = tuple(patch)
    elif isinstance(patch, int):
        steps = (getattr(model_config, "patch_size_t", None) or 1, patch, patch)
    else:
        return None
    grid = tuple(int(n) // int(s) for n, s in zip(hidden_states.shape[2:], steps))
    return grid if min(grid) >= 1 else None


def _stock_processor_kinds():
    try:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    except ImportError as exc:  # the extra is optional
        raise ImportError(
            "fgcupy.integrations.diffusers needs diffusers (pip install 'fgcupy[diffusers]')"
        ) from exc
    return {WanAttnProcessor: WanSparseProcessor, HunyuanVideoAttnProcessor2_0: HunyuanVideoSparseProcessor,
            CogVideoXAttnProcessor2_0: CogVideoXSparseProcessor}


def _flag(value) -> bool:
    """A pipeline's bool attribute (a bool, numpy bool or one-element tensor) as a bool."""
    if isinstance(value, (bool, np.bool_)) or (torch.is_tensor(value) and value.numel() == 1):
        return bool(value)
    return False


def _count(value) -> float:
    """A pipeline's step count (an int, numpy int or one-element int tensor); inf where it has none."""
    try:
        return operator.index(value.item() if torch.is_tensor(value) and value.numel() == 1 else value)
    except TypeError:
        return math.inf


def _check_poolings_per_head(config: SparseAttentionConfig, found: list) -> None:
    """A per-head pooling list in predictor_kwargs must name one pooling for each head of every
    layer that predicts (the config cannot know the heads; the first prediction would fail)."""
    poolings = config.predictor_arguments().get("pooling") if isinstance(config.predictor, str) else None
    if not isinstance(poolings, (list, tuple)):
        return
    for i, (name, module, *_) in enumerate(found):
        heads = getattr(module, "heads", None)
        if i not in config.dense_layers and isinstance(heads, int) and heads != len(poolings):
            raise ValueError(f"predictor_kwargs' pooling lists {len(poolings)} poolings, but layer {name} has "
                             f"{heads} heads: give one per head")


def apply(transformer: torch.nn.Module, config: SparseAttentionConfig | None = None) -> SparseAttentionHandle:
    """Install fgcupy on every self-attention layer of ``transformer`` (a diffusers
    WanTransformer3DModel, HunyuanVideoTransformer3DModel or CogVideoXTransformer3DModel, or a
    module holding their layers).
    Applying again replaces the earlier installation. Raises RuntimeError when fgcupy's kernel
    cannot run here, unless ``config.fallback`` or ``config.attention_fn`` says what to do instead."""
    config = SparseAttentionConfig() if config is None else config
    if not isinstance(config, SparseAttentionConfig):
        raise TypeError(f"config must be a SparseAttentionConfig, got {type(config).__name__}")
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
    parallel = config.process_group is not None  # SequenceParallelAttention has a CPU reference path
    if config.attention_fn is None and not config.fallback and not parallel and not kernel_available():
        raise RuntimeError(
            "fgcupy cannot run here: its kernel needs a CUDA GPU visible to torch and either libnvrtc with "
            f"libcuda or cupy (torch.cuda.is_available()={torch.cuda.is_available()}). "
            "Pass SparseAttentionConfig(fallback=True) to keep the stock attention where fgcupy cannot run."
        )
    if isinstance(config.predictor, str):
        _predict_mask()
    kinds = _stock_processor_kinds()
    installed = getattr(transformer, _HANDLE_ATTR, None)  # replaced only once the new config is found to fit

    found = []
    for name, module in compiled_model(transformer).named_modules():
        processor = getattr(module, "processor", None)
        if installed is not None and isinstance(processor, _Processor) and processor._handle is installed:
            processor = processor.stock  # what remove() puts back
        sparse_kind = kinds.get(type(processor))
        if sparse_kind is None or getattr(module, "is_cross_attention", False):
            continue
        found.append((name, module, processor, sparse_kind))
    if not found:
        raise TypeError(
            f"{type(compiled_model(transformer)).__name__} has no self-attention layer with a stock WanAttnProcessor, "
            "HunyuanVideoAttnProcessor2_0 or CogVideoXAttnProcessor2_0 (already patched, or not a Wan / "
            "HunyuanVideo / CogVideoX transformer?)"
        )
    if parallel and any(kind is not WanSparseProcessor for *_, kind in found):
        raise ValueError("process_group (sequence parallel) is supported for Wan transformers only")
    bad = [i for i in config.dense_layers if i >= len(found)]
    if bad:
        raise ValueError(f"dense_layers {bad} out of range: the model has {len(found)} self-attention layers")
    _check_poolings_per_head(config, found)
    if installed is not None:
        remove(transformer)

    layers = [_Layer(name, i, module, processor, i in config.dense_layers)
              for i, (name, module, processor, _) in enumerate(found)]
    handle = SparseAttentionHandle(transformer, config, layers)
    for layer, (_, module, _, sparse_kind) in zip(layers, found):
        _set_processor(module, sparse_kind(handle, layer))
    if handle._timestep_position is None:
        warnings.warn(f"fgcupy: {type(compiled_model(transformer)).__name__}.forward takes no timestep, so the schedule cannot see "
                      "the denoising steps from its calls; call handle.begin_forward(timestep) before each call "
                      "of the model (or handle.set_step(step)), or apply fgcupy to the transformer itself",
                      stacklevel=2)
    handle._hooks = [transformer.register_forward_pre_hook(handle._pre_hook, with_kwargs=True),
                     transformer.register_forward_hook(handle._post_hook, with_kwargs=True)]
    setattr(transformer, _HANDLE_ATTR, handle)
    sparse_layers = [layer for layer in layers if not layer.dense]
    if config.attention_fn is None and not parallel and sparse_layers:
        # The first steps' kernels compile while the pipeline encodes its prompt. The dtype and
        # device are an attention layer's (a model may keep other parameters in float32).
        param = next(sparse_layers[0].module.parameters(), None)
        head_dim = getattr(getattr(transformer, "config", None), "attention_head_dim", None)
        if param is not None and isinstance(head_dim, int):
            try:
                _load_kernels_ahead(config, param.device, param.dtype, head_dim, attention=True)
            except Exception:  # noqa: BLE001 - loading ahead only saves time; the first call loads what it needs
                log.debug("fgcupy: loading kernels ahead at apply() failed", exc_info=True)
    return handle


def _load_kernels_ahead(config: SparseAttentionConfig, device: torch.device, dtype: torch.dtype, head_dim: int,
                        kv_len: int | None = None, attention: bool = False) -> None:
    """Start loading, on threads, kernels of ``dtype`` and ``head_dim`` on ``device`` (a GPU;
    bfloat16 or float16) that a later call will launch: with ``attention`` the attention kernels,
    and where the schedule makes exact masks the column-max prediction's (its selection where
    ``kv_len`` is known)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not kernels_can_run():
        return
    name = bridge.dtype_name(dtype, "the attention inputs")
    specs = attention_kernels_ahead(name, head_dim, config.slice_m, device) if attention else []
    if config.exact or config.mask_from_warmup or config.estimate_first_mask:
        specs += colmax_kernels(name, head_dim, config.slice_m, kv_len, config.exact_arguments()["rule"], device)
    for spec in specs:
        load_in_background(device, spec)


def remove(transformer: torch.nn.Module) -> SparseAttentionHandle:
    """Put the original processors back and detach the step hook; returns the handle (its stats
    stay readable). Layers whose processor was replaced by someone else since ``apply`` keep it."""
    handle = getattr(transformer, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"fgcupy is not applied to this {type(transformer).__name__}")
    for layer in handle.layers.values():
        module = layer.module
        current = getattr(module, "processor", None)
        if isinstance(current, _Processor) and current._handle is handle:
            _set_processor(module, layer.stock)
    handle._release_masks()
    for hook in handle._hooks:
        hook.remove()
    handle._hooks = []
    delattr(transformer, _HANDLE_ATTR)
    return handle


def handle_of(transformer: torch.nn.Module) -> SparseAttentionHandle | None:
    """The handle of an applied transformer, or None."""
    return getattr(transformer, _HANDLE_ATTR, None)


def _set_processor(module, processor) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor

