"""fgcupy in diffusers' video transformers: one call switches Wan 2.1 / HunyuanVideo to slice-sparse
self-attention, another switches back.

>>> handle = apply(pipe.transformer, SparseAttentionConfig(predictor="topk", density=0.1))
>>> video = pipe(prompt).frames            # the pipeline itself is unchanged
>>> remove(pipe.transformer)

``apply`` swaps the processor of every self-attention layer (modules whose processor is diffusers'
stock ``WanAttnProcessor`` on a self-attention ``WanAttention``, or ``HunyuanVideoAttnProcessor2_0``)
for one that repeats the stock math (projections, q/k norms, rotary embeddings, output projection)
and replaces only the attention call with fgcupy's kernel. What the kernel cannot express goes to
the stock processor unchanged: cross-attention, head dims without a kernel, context parallelism,
attention masks other than a boolean key-padding mask (HunyuanVideo's text padding is folded into
the slice mask instead, so its layers stay sparse).

The denoising step reaches the processors through a forward pre-hook on the transformer: a call
with a smaller timestep than the last starts a new step, a call with the same timestep is another
branch of the same step (classifier-free guidance runs the model twice per step; each branch keeps
its own masks), a larger timestep starts a new generation (masks are dropped). Reading the timestep
costs one host synchronisation per transformer call, not per layer. The schedule and the masks are
fgcupy's ``MaskCache`` (one entry per layer and guidance branch): masks are predicted on refresh
steps and reused in between; warm-up steps and chosen layers run dense through the stock processor.

Sequence parallel (``process_group``, Wan only): each rank's processor gets its contiguous shard of
the sequence (and the matching rows of the rotary tables) and attends through
``fgcupy.distributed.SequenceParallelAttention``; masks are predicted per rank for the heads it
owns. Sharding the model's inputs and gathering its output is the caller's job (diffusers' own
context parallelism, ``_parallel_config``, still routes to the stock processor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..attention import SparseAttention
from ..bridge import cupy_available
from ..cache import MaskCache
from ..jit.spec import HEAD_DIMS, SLICE_SIZES
from ..mask import SliceMask

__all__ = [
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
]

_HANDLE_ATTR = "_fgcupy_sparse_attention"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# The parameter each named predictor method is tuned by (checked at config time, so a missing
# density fails at apply() rather than on the first refresh step deep inside a pipeline).
_METHOD_PARAMETER = {"topk": "density", "tau": "tau", "threshold": "threshold"}
DEFAULT_DENSITY = 0.1


def kernel_available() -> bool:
    """True when fgcupy's CUDA kernel can run in this process (torch and cupy both see a GPU)."""
    return torch.cuda.is_available() and cupy_available()


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SparseAttentionConfig:
    """What ``apply`` installs.

    predictor: a ``fgcupy.predict_mask`` method name ("topk", "tau", "threshold") tuned by its
        own ``density`` (default 0.1) / ``tau`` / ``threshold`` (+ ``predictor_kwargs``), or a callable
        ``predictor(q, k, slice_m=...) -> SliceMask`` with q, k ``[B, H, S, D]`` views.
    slice_m: queries per slice (a kernel size, 64 or 128).
    dense_steps: the first denoising steps run dense (stock processor): early steps set the layout.
    dense_layers: indices (in model order) of self-attention layers that always run dense.
    refresh_every / refresh_steps: masks are re-predicted every ``refresh_every`` sparse steps
        (counted from the first sparse step), or exactly on the steps listed in ``refresh_steps``
        (the first sparse step always predicts); other steps reuse the layer's cached mask.
    share_branches: later calls of the same step (classifier-free guidance's second pass) reuse the
        first call's masks instead of predicting their own: half the mask memory.
    fallback: where fgcupy's kernel cannot run (no GPU, CPU tensors), use the stock processor
        instead of raising.
    attention_fn: replaces fgcupy's kernel: ``attention_fn(q, k, v, mask, scale) -> out`` with
        q, k, v, out ``[B, S, H, D]``; for other backends, comparisons and CPU tests.
    process_group: a torch.distributed group whose ranks each hold a contiguous sequence shard
        (rank order = sequence order): self-attention then runs through SequenceParallelAttention
        (fgcupy's kernel on CUDA tensors, its float32 reference elsewhere), dense steps and layers
        included. Wan only; excludes ``attention_fn``.
    parallel_options: keyword arguments of SequenceParallelAttention for ``process_group``:
        ``head_groups``, ``exchange`` (``"copy"``: copy-engine transfers on one host), ``key_tile``.
    """

    predictor: str | Callable = "topk"
    density: float | None = None  # "topk" without one keeps 0.1
    tau: float | None = None
    threshold: float | None = None
    predictor_kwargs: dict = field(default_factory=dict)
    slice_m: int = 128
    dense_steps: int = 0
    dense_layers: tuple[int, ...] = ()
    refresh_every: int = 5
    refresh_steps: tuple[int, ...] | None = None
    share_branches: bool = False
    fallback: bool = False
    attention_fn: Callable | None = None
    process_group: object = None
    parallel_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.predictor, str):
            if self.predictor not in _METHOD_PARAMETER:
                raise ValueError(f"predictor must be one of {tuple(_METHOD_PARAMETER)} (fgcupy.predict_mask methods "
                                 f"that need no dense step) or a callable, got {self.predictor!r}")
            needed = _METHOD_PARAMETER[self.predictor]
            if self.predictor == "topk" and self.density is None:
                object.__setattr__(self, "density", DEFAULT_DENSITY)
            if getattr(self, needed) is None:
                raise ValueError(f"predictor={self.predictor!r} needs {needed}=..., got None")
            for other in set(_METHOD_PARAMETER.values()) - {needed}:
                if getattr(self, other) is not None:
                    raise ValueError(f"{other}={getattr(self, other)!r} does not apply to predictor={self.predictor!r} "
                                     f"(it takes {needed})")
        elif not callable(self.predictor):
            raise TypeError(f"predictor must be a method name or a callable, got {type(self.predictor).__name__}")
        for name in ("density", "tau"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if self.threshold is not None and not self.threshold > 0:
            raise ValueError(f"threshold must be > 0, got {self.threshold}")
        if self.slice_m not in SLICE_SIZES:
            raise ValueError(f"slice_m must be one of {SLICE_SIZES} (sizes with a kernel), got {self.slice_m}")
        if isinstance(self.dense_steps, bool) or not isinstance(self.dense_steps, int) or self.dense_steps < 0:
            raise ValueError(f"dense_steps must be an int >= 0, got {self.dense_steps!r}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"refresh_every must be an int >= 1, got {self.refresh_every!r}")
        object.__setattr__(self, "dense_layers", _int_tuple(self.dense_layers, "dense_layers"))
        if self.refresh_steps is not None:
            object.__setattr__(self, "refresh_steps", _int_tuple(self.refresh_steps, "refresh_steps"))
        if not isinstance(self.predictor_kwargs, dict):
            raise TypeError(f"predictor_kwargs must be a dict, got {type(self.predictor_kwargs).__name__}")
        if self.attention_fn is not None and not callable(self.attention_fn):
            raise TypeError(f"attention_fn must be callable, got {type(self.attention_fn).__name__}")
        if self.process_group is not None and self.attention_fn is not None:
            raise ValueError("attention_fn and process_group exclude each other: with a process group attention "
                             "runs in fgcupy.distributed.SequenceParallelAttention")
        if not isinstance(self.parallel_options, dict):
            raise TypeError(f"parallel_options must be a dict, got {type(self.parallel_options).__name__}")
        unknown = set(self.parallel_options) - {"head_groups", "exchange", "key_tile"}
        if unknown:
            raise ValueError(f"parallel_options accepts head_groups, exchange and key_tile, got {sorted(unknown)}")
        if self.parallel_options and self.process_group is None:
            raise ValueError("parallel_options apply to sequence parallelism: give process_group too")
        if isinstance(self.predictor, str):
            self._check_predictor_arguments()

    def _check_predictor_arguments(self) -> None:
        """Refuse now what predict_mask would refuse at the first sparse step."""
        import inspect

        from ..mask_request import make_request

        kwargs = self.predictor_arguments()
        allowed = set(inspect.signature(make_request).parameters) - {"head_dim", "kv_len", "slice_m", "method"}
        allowed |= {"layout", "workspace_bytes"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise ValueError(f"predictor_kwargs holds options predict_mask does not take: {sorted(unknown)}")
        checked = {name: value for name, value in kwargs.items() if name not in ("layout", "workspace_bytes")}
        make_request(128, 4096, self.slice_m, self.predictor, **checked)
    def mask_cache(self) -> MaskCache:
        """An empty MaskCache with this schedule. Listed refresh steps inside the warm-up are dropped
        (they would run dense anyway); masks are kept expanded, so reuse costs no conversion."""
        steps = self.refresh_steps
        if steps is not None:
            steps = [s for s in steps if s >= self.dense_steps]
        return MaskCache(warmup=self.dense_steps, refresh_every=self.refresh_every, refresh_steps=steps,
                         expanded=True)

    def is_dense_step(self, step: int) -> bool:
        return self.mask_cache().action(step) == "dense"

    def is_refresh_step(self, step: int) -> bool:
        """Whether the schedule predicts new masks on ``step`` (a layer with no mask yet always does)."""
        return self.mask_cache().action(step) == "refresh"

    def predictor_arguments(self) -> dict:
        """predict_mask's keyword arguments: the chosen method's own parameter (density for
        "topk", tau for "tau", threshold for "threshold") and ``predictor_kwargs``."""
        args = {}
        if isinstance(self.predictor, str):
            name = _METHOD_PARAMETER[self.predictor]
            args[name] = getattr(self, name)
        args.update(self.predictor_kwargs)
        return args


def _int_tuple(values, what: str) -> tuple[int, ...]:
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, Iterable):
        raise TypeError(f"{what} must be a sequence of ints, got {type(values).__name__}")
    out = tuple(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in out):
        raise ValueError(f"{what} must hold ints >= 0, got {out}")
    return tuple(sorted(set(out)))


# ----------------------------------------------------------------------------------------------
# per-layer state and statistics
# ----------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """What one self-attention layer did: calls by path and the steps on which it predicted masks
    (one entry per prediction, so two guidance branches refreshing on step 5 give [5, 5])."""

    name: str
    index: int
    sparse_calls: int = 0
    dense_calls: int = 0
    stock_calls: int = 0
    stock_reasons: dict = field(default_factory=dict)
    refresh_steps: list = field(default_factory=list)

    @property
    def refreshes(self) -> int:
        return len(self.refresh_steps)

    def _stock(self, reason: str) -> None:
        self.stock_calls += 1
        self.stock_reasons[reason] = self.stock_reasons.get(reason, 0) + 1


@dataclass
class _Slot:
    """What one layer keeps per guidance branch beside its mask (which is in the handle's
    MaskCache): the kernel plan, or the sequence-parallel attention object, and what the mask
    was predicted for."""

    plan: SparseAttention | None = None
    parallel: object = None  # fgcupy.distributed.SequenceParallelAttention
    key: tuple | None = None  # (shape of q, shape of k, dtype, device): a change forces a refresh
    key_version: int = 0


class _Layer:
    def __init__(self, name: str, index: int, module, stock, dense: bool):
        self.name = name
        self.index = index
        self.module = module
        self.stock = stock
        self.dense = dense
        self.slots: dict[int, _Slot] = {}
        self.stats = LayerStats(name, index)


# ----------------------------------------------------------------------------------------------
# the handle: step tracking, mask prediction, statistics
# ----------------------------------------------------------------------------------------------
class SparseAttentionHandle:
    """Returned by ``apply``; also at ``transformer._fgcupy_sparse_attention``.

    ``step`` / ``branch`` say where the current transformer call sits in the denoising loop;
    ``stats()`` and ``refresh_counts()`` say what each layer did; ``set_step`` drives the schedule
    by hand (benchmarks, custom loops); ``reset`` forgets masks before an unrelated generation.
    """

    def __init__(self, transformer, config: SparseAttentionConfig, layers: list[_Layer]):
        self.transformer = transformer
        self.config = config
        self.layers = {layer.name: layer for layer in layers}
        self.cache = config.mask_cache()  # keys: (layer name, guidance branch)
        self.step = 0
        self.branch = 0
        self.generation = 0
        self._last_timestep: float | None = None
        self._calls = 0
        self._hook = None
        self._padding_host: dict[int, torch.Tensor] = {}
        self._padding_version: dict[int, int] = {}
        self._padding_seen: dict[int, tuple] = {}

    # ---- steps ----
    def _pre_hook(self, module, args, kwargs):
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.begin_forward(timestep)

    def begin_forward(self, timestep=None) -> None:
        """Account one transformer call: a smaller timestep than the last is the next step, the
        same timestep another branch of this step, a larger one a new generation (masks dropped).
        Without a timestep every call is a new step."""
        value = None
        if timestep is not None:
            value = float(torch.as_tensor(timestep).detach().max())
        if self._calls == 0:
            self.step, self.branch = 0, 0
        elif value is None or self._last_timestep is None or value < self._last_timestep:
            self.step, self.branch = self.step + 1, 0
        elif value == self._last_timestep:
            self.branch += 1
        else:
            self._new_generation()
        self._calls += 1
        self._last_timestep = value
        self._padding_seen.clear()

    def set_step(self, step: int, branch: int = 0) -> None:
        """Put the schedule at ``step`` (and guidance ``branch``) for the next calls."""
        if step < 0 or branch < 0:
            raise ValueError(f"step and branch must be >= 0, got step={step}, branch={branch}")
        self.step, self.branch = int(step), int(branch)
        self._calls = max(self._calls, 1)
        self._padding_seen.clear()

    def reset(self, clear_stats: bool = False) -> None:
        """Forget masks and the step count (the next call is step 0 of a new generation)."""
        self._new_generation()
        self._calls = 0
        self._last_timestep = None
        if clear_stats:
            for layer in self.layers.values():
                layer.stats = LayerStats(layer.name, layer.index)

    def _new_generation(self) -> None:
        self.step, self.branch = 0, 0
        self.generation += 1
        for layer in self.layers.values():
            layer.slots.clear()
        self.cache.clear()
        self._padding_host.clear()
        self._padding_version.clear()
        self._padding_seen.clear()

    # ---- statistics ----
    def stats(self) -> dict[str, LayerStats]:
        """Copies of every patched layer's statistics, by module name, in model order."""
        return {name: dataclasses.replace(layer.stats, stock_reasons=dict(layer.stats.stock_reasons),
                                          refresh_steps=list(layer.stats.refresh_steps))
                for name, layer in self.layers.items()}

    def refresh_counts(self) -> dict[str, int]:
        return {name: layer.stats.refreshes for name, layer in self.layers.items()}

    def mask(self, name: str, branch: int = 0) -> SliceMask | None:
        """The mask layer ``name`` holds for ``branch`` (None before its first sparse call); with a
        process group, the mask of this rank's heads over the whole sequence."""
        if name not in self.layers:
            raise KeyError(f"no patched layer {name!r}; layers: {list(self.layers)}")
        return self.cache.get((name, branch)) if (name, branch) in self.cache else None

    def mask_memory_bytes(self) -> int:
        return self.cache.memory_bytes()

    def describe(self) -> str:
        """The MaskCache's summary: schedule, then every (layer, branch) mask held."""
        return self.cache.describe()

    # ---- routing ----
    def _slot_branch(self) -> int:
        return 0 if self.config.share_branches else self.branch

    def _dense(self, layer: _Layer) -> bool:
        return layer.dense or self.cache.action(self.step) == "dense"

    def _key_padding(self, attention_mask: torch.Tensor, batch: int, kv_len: int):
        """(key_valid [B, KV] bool or None when every key is valid, version). The first layer of a
        transformer call that sees a new mask copies it to the host once; later layers of the call
        get the answer by identity. A changed padding bumps the version, so layers re-predict."""
        seen = self._padding_seen.get(id(attention_mask))
        if seen is not None and seen[0] is attention_mask:
            return seen[1], seen[2]
        branch = self._slot_branch()
        valid = attention_mask.reshape(attention_mask.shape[0], kv_len).expand(batch, kv_len)
        host = valid.to("cpu", torch.bool)
        previous = self._padding_host.get(branch)
        if previous is None or previous.shape != host.shape or not torch.equal(previous, host):
            self._padding_host[branch] = host
            self._padding_version[branch] = self._padding_version.get(branch, 0) + 1
        version = self._padding_version[branch]
        key_valid = None if bool(host.all()) else valid.to(torch.bool).contiguous()
        self._padding_seen[id(attention_mask)] = (attention_mask, key_valid, version)
        return key_valid, version

    def _needs_refresh(self, entry: tuple, slot: _Slot, key: tuple, key_version: int) -> bool:
        """The cache's schedule says refresh (once per step, whatever the number of branches sharing
        the entry), or the mask was predicted for other shapes or another key padding."""
        if slot.key != key or slot.key_version != key_version or entry not in self.cache:
            return True
        return self.cache.action(self.step, entry) == "refresh" and self.cache.step_of(entry) != self.step

    def _store(self, layer: _Layer, entry: tuple, slot: _Slot, mask: SliceMask, key: tuple, key_version: int):
        self.cache.put(entry, mask, self.step)
        self.cache.predictions += 1
        slot.key, slot.key_version = key, key_version
        layer.stats.refresh_steps.append(self.step)

    def _attend(self, layer: _Layer, q, k, v, key_valid=None, key_version: int = 0):
        """Slice-sparse attention of q, k, v ``[B, S, H, D]``: refresh the layer's mask when the
        schedule (or a new shape / key padding) asks, then run the kernel on the cached plan."""
        cfg = self.config
        branch = self._slot_branch()
        entry = (layer.name, branch)
        slot = layer.slots.setdefault(branch, _Slot())
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        if self._needs_refresh(entry, slot, key, key_version):
            mask = self._predict(layer, q.transpose(1, 2), k.transpose(1, 2))
            if key_valid is not None:
                mask = drop_keys(mask, key_valid)
            if cfg.attention_fn is None:
                slot.plan = (slot.plan or SparseAttention()).plan(mask, head_dim=q.shape[-1], dtype=q.dtype)
                mask = slot.plan.mask  # the cache holds the plan's own mask: no second copy
            self._store(layer, entry, slot, mask, key, key_version)
        else:
            self.cache.reuses += 1
        layer.stats.sparse_calls += 1
        if cfg.attention_fn is not None:
            return cfg.attention_fn(q, k, v, self.cache.get(entry), None)
        return slot.plan.run(q, k, v, layout="NHD")

    def _attend_parallel(self, layer: _Layer, q, k, v, dense: bool):
        """Sequence-parallel attention of this rank's shard q, k, v ``[B, S_r, H, D]``. Refresh steps
        pass a callable that predicts (and caches) the mask of the heads this rank owns from the
        exchanged full-sequence q, k; other steps pass the cached mask itself, so
        SequenceParallelAttention slices and plans it once per refresh, not per step."""
        from ..distributed import SequenceParallelAttention, concat_heads

        branch = self._slot_branch()
        slot = layer.slots.setdefault(branch, _Slot())
        if slot.parallel is None:
            slot.parallel = SequenceParallelAttention(self.config.process_group, **self.config.parallel_options)
        if dense:
            return slot.parallel(q, k, v, None, layout="NHD")
        entry = (layer.name, branch)
        key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device)
        refresh = self._needs_refresh(entry, slot, key, 0)
        layer.stats.sparse_calls += 1
        if not refresh:
            self.cache.reuses += 1
            return slot.parallel(q, k, v, self.cache.get(entry), layout="NHD")
        parts = []  # one mask per head group; joined into the mask of this rank's heads

        def predict(q_heads, k_heads, heads):
            parts.append(self._predict(layer, q_heads.contiguous(), k_heads.contiguous()))
            return parts[-1]

        out = slot.parallel(q, k, v, predict, layout="NHD")
        if parts:
            self._store(layer, entry, slot, concat_heads(parts), key, 0)
        return out

    def _predict(self, layer: _Layer, q, k) -> SliceMask:
        cfg = self.config
        if callable(cfg.predictor):
            mask = cfg.predictor(q, k, slice_m=cfg.slice_m)
        else:
            mask = _predict_mask()(q, k, slice_m=cfg.slice_m, method=cfg.predictor, **cfg.predictor_arguments())
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

    def _check_device(self, layer: _Layer, device: torch.device) -> bool:
        """True when fgcupy can take tensors on ``device``; False (stock path) or an error otherwise."""
        if self.config.attention_fn is not None or self.config.process_group is not None:
            return True
        if device.type == "cuda" and kernel_available():
            return True
        if self.config.fallback:
            return False
        raise RuntimeError(
            f"fgcupy cannot run layer {layer.name}: its tensors are on {device}, and the kernel needs a CUDA "
            f"device seen by torch and cupy (kernel_available()={kernel_available()}). Move the transformer to "
            "the GPU, or pass SparseAttentionConfig(fallback=True) to keep the stock attention here."
        )


# ----------------------------------------------------------------------------------------------
# processors
# ----------------------------------------------------------------------------------------------
class _Processor:
    """Shared routing of both processors; the stock processor is kept for every call that fgcupy
    does not take, so those calls give exactly the stock result."""

    def __init__(self, handle: SparseAttentionHandle, layer: _Layer):
        self._handle = handle
        self._layer = layer
        self.stock = layer.stock

    # diffusers sets the attention backend and context-parallel config on processors: keep them on
    # the stock processor, which runs the dense and fallback calls.
    @property
    def _attention_backend(self):
        return getattr(self.stock, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self.stock._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.stock, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self.stock._parallel_config = value

    def _route(self, attn, device: torch.device, structural: str | None) -> str:
        """'stock', 'dense' or 'sparse' for this call (and count the stock/dense ones)."""
        layer, handle = self._layer, self._handle
        head_dim = attn.to_q.out_features // attn.heads
        reason = structural
        if reason is None and self._parallel_config is not None:
            reason = "context_parallel"
        if reason is None and head_dim not in HEAD_DIMS:
            reason = f"head_dim_{head_dim}"
        if reason is not None and handle.config.process_group is not None and reason != "cross_attention":
            # the stock processor would attend within this rank's shard only: a silently wrong answer
            raise ValueError(f"layer {layer.name}: sequence-parallel attention cannot take this call ({reason})")
        if reason is not None:
            layer.stats._stock(reason)
            return "stock"
        if handle._dense(layer):
            layer.stats.dense_calls += 1
            return "dense"
        if not handle._check_device(layer, device):
            layer.stats._stock("no_gpu")
            return "stock"
        return "sparse"

    def _attention(self, q, k, v, key_valid=None, key_version=0, attention_mask=None, dense=False):
        """fgcupy on q, k, v ``[B, S, H, D]``; the stock attention call for dtypes without a kernel."""
        handle = self._handle
        if handle.config.process_group is not None:
            return handle._attend_parallel(self._layer, q, k, v, dense)
        if handle.config.attention_fn is None and q.dtype not in _KERNEL_DTYPES:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            self._layer.stats._stock(f"dtype_{str(q.dtype).removeprefix('torch.')}")
            return dispatch_attention_fn(q, k, v, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                         backend=self._attention_backend, parallel_config=None)
        return handle._attend(self._layer, q, k, v, key_valid, key_version)


def _rotate_pairs_wan(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each (even, odd) channel pair of x ``[B, S, H, D]`` turned by its
    angle, in the frequencies' precision (float64), rounded once to x's dtype."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).type_as(x)


def _rotate_pairs_hunyuan(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """HunyuanVideo's rotary embedding: x ``[B, S, H, D]``, cos/sin ``[S, D]`` (already repeated per
    pair), computed in float32: x * cos + (-odd, even) * sin."""
    cos, sin = (f.to(x.device)[None, :, None, :] for f in freqs)
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((-odd, even), dim=-1).flatten(-2)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


class WanSparseProcessor(_Processor):
    """Wan self-attention with fgcupy: the stock WanAttnProcessor's math, attention replaced."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        structural = None
        if encoder_hidden_states is not None or attn.is_cross_attention:
            structural = "cross_attention"
        elif attention_mask is not None:
            structural = "attention_mask"
        elif getattr(attn, "add_k_proj", None) is not None:
            structural = "image_context"
        route = self._route(attn, hidden_states.device, structural)
        parallel = self._handle.config.process_group is not None
        if route == "stock" or (route == "dense" and not parallel):  # parallel dense steps need the exchange
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)

        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query = _rotate_pairs_wan(query, *rotary_emb)
            key = _rotate_pairs_wan(key, *rotary_emb)

        out = self._attention(query, key, value, dense=route == "dense")
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class HunyuanVideoSparseProcessor(_Processor):
    """HunyuanVideo joint (video + text) self-attention with fgcupy: the stock
    HunyuanVideoAttnProcessor2_0's math, attention replaced; the text padding mask becomes part of
    the slice mask."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        in_stream = attn.add_q_proj is None and encoder_hidden_states is not None  # single-stream blocks
        text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        kv_len = hidden_states.shape[1] + text_len
        structural = None
        if attention_mask is not None and not _is_key_padding(attention_mask, hidden_states.shape[0], kv_len):
            structural = "attention_mask"
        route = self._route(attn, hidden_states.device, structural)
        if route != "sparse":
            return self.stock(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
        key_valid, key_version = None, 0
        if attention_mask is not None:
            key_valid, key_version = self._handle._key_padding(attention_mask, hidden_states.shape[0], kv_len)

        tokens = torch.cat([hidden_states, encoder_hidden_states], dim=1) if in_stream else hidden_states
        query, key, value = (proj(tokens).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            video = tokens.shape[1] - (text_len if in_stream else 0)
            query = torch.cat([_rotate_pairs_hunyuan(query[:, :video], image_rotary_emb), query[:, video:]], dim=1)
            key = torch.cat([_rotate_pairs_hunyuan(key[:, :video], image_rotary_emb), key[:, video:]], dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual-stream blocks
            text_q, text_k, text_v = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                      for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, dim=1) for pair in ((query, text_q), (key, text_k), (value, text_v)))

        out = self._attention(query, key, value, key_valid, key_version, attention_mask)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        video_out, text_out = out[:, : out.shape[1] - text_len], out[:, out.shape[1] - text_len:]
        if getattr(attn, "to_out", None) is not None:
            video_out = attn.to_out[1](attn.to_out[0](video_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _is_key_padding(mask: torch.Tensor, batch: int, kv_len: int) -> bool:
    """A boolean ``[B or 1, 1, 1, KV]`` mask (True = attend): one flag per key, the same for every
    query and head, which a slice mask can absorb exactly."""
    return (
        isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
        and mask.shape[0] in (1, batch) and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == kv_len
    )


# ----------------------------------------------------------------------------------------------
# slice-mask helper
# ----------------------------------------------------------------------------------------------
def drop_keys(mask: SliceMask, key_valid: torch.Tensor) -> SliceMask:
    """``mask`` without the keys where ``key_valid`` (bool ``[B, KV]``) is False, on the GPU and
    without a host synchronisation (same capacity; rows stay sorted). Rows may sit anywhere in
    the buffer as long as they do not overlap."""
    batch, heads, q_blocks, kv_len = mask.batch, mask.heads, mask.q_blocks, mask.kv_len
    if tuple(key_valid.shape) != (batch, kv_len) or key_valid.dtype != torch.bool:
        raise ValueError(
            f"key_valid must be bool [B, KV]={(batch, kv_len)}, got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
    device, capacity = mask.device, mask.capacity
    key_valid = key_valid.to(device)
    starts = mask.indptr[..., :-1].reshape(-1).to(torch.int64)
    ends = mask.indptr[..., 1:].reshape(-1).to(torch.int64)
    if capacity == 0 or starts.numel() == 0:
        return mask
    # batch + 1 at every position a row covers, 0 in gaps: +tag at a row's start, -tag at its end.
    tag = (torch.arange(starts.numel(), device=device) // (heads * q_blocks) + 1).to(torch.int64)
    marks = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
    marks.index_add_(0, starts, tag).index_add_(0, ends, -tag)
    owner = torch.cumsum(marks, 0)[:capacity]
    keys = mask.indices.to(torch.int64).clamp(0, max(kv_len - 1, 0))
    keep = (owner > 0) & key_valid[(owner - 1).clamp_min(0), keys]
    before = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
    torch.cumsum(keep, 0, out=before[1:])
    target = torch.where(keep, before[:-1], capacity)  # dropped entries land in a spare slot
    indices = torch.zeros(capacity + 1, dtype=torch.int32, device=device).scatter_(0, target, mask.indices)
    indptr = before[mask.indptr.to(torch.int64)].to(torch.int32)
    return SliceMask(indptr, indices[:capacity], mask.slice_m, mask.q_len, kv_len)


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


def _stock_processor_kinds():
    try:
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    except ImportError as exc:  # the extra is optional
        raise ImportError(
            "fgcupy.integrations.diffusers needs diffusers (pip install 'fgcupy[diffusers]')"
        ) from exc
    return {WanAttnProcessor: WanSparseProcessor, HunyuanVideoAttnProcessor2_0: HunyuanVideoSparseProcessor}


def apply(transformer: torch.nn.Module, config: SparseAttentionConfig | None = None) -> SparseAttentionHandle:
    """Install fgcupy on every self-attention layer of ``transformer`` (a diffusers
    WanTransformer3DModel or HunyuanVideoTransformer3DModel, or a module holding their layers).
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
            "fgcupy cannot run here: its kernel needs a CUDA GPU visible to torch and cupy "
            f"(torch.cuda.is_available()={torch.cuda.is_available()}, cupy sees a GPU={cupy_available()}). "
            "Pass SparseAttentionConfig(fallback=True) to keep the stock attention where fgcupy cannot run."
        )
    if isinstance(config.predictor, str):
        _predict_mask()
    kinds = _stock_processor_kinds()
    if getattr(transformer, _HANDLE_ATTR, None) is not None:
        remove(transformer)

    found = []
    for name, module in transformer.named_modules():
        processor = getattr(module, "processor", None)
        sparse_kind = kinds.get(type(processor))
        if sparse_kind is None or getattr(module, "is_cross_attention", False):
            continue
        found.append((name, module, processor, sparse_kind))
    if not found:
        raise TypeError(
            f"{type(transformer).__name__} has no self-attention layer with a stock WanAttnProcessor or "
            "HunyuanVideoAttnProcessor2_0 (already patched, or not a Wan / HunyuanVideo transformer?)"
        )
    if parallel and any(kind is not WanSparseProcessor for *_, kind in found):
        raise ValueError("process_group (sequence parallel) is supported for Wan transformers only")
    bad = [i for i in config.dense_layers if i >= len(found)]
    if bad:
        raise ValueError(f"dense_layers {bad} out of range: the model has {len(found)} self-attention layers")

    layers = [_Layer(name, i, module, processor, i in config.dense_layers)
              for i, (name, module, processor, _) in enumerate(found)]
    handle = SparseAttentionHandle(transformer, config, layers)
    for layer, (_, module, _, sparse_kind) in zip(layers, found):
        _set_processor(module, sparse_kind(handle, layer))
    handle._hook = transformer.register_forward_pre_hook(handle._pre_hook, with_kwargs=True)
    setattr(transformer, _HANDLE_ATTR, handle)
    return handle


def remove(transformer: torch.nn.Module) -> SparseAttentionHandle:
    """Put the original processors back and detach the step hook; returns the handle (its stats
    stay readable). Layers whose processor was replaced by someone else since ``apply`` keep it."""
    handle = getattr(transformer, _HANDLE_ATTR, None)
    if handle is None:
        raise ValueError(f"fgcupy is not applied to this {type(transformer).__name__}")
    for layer in handle.layers.values():
        current = getattr(layer.module, "processor", None)
        if isinstance(current, _Processor) and current._handle is handle:
            _set_processor(layer.module, layer.stock)
        layer.slots.clear()
    handle.cache.clear()
    if handle._hook is not None:
        handle._hook.remove()
        handle._hook = None
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

