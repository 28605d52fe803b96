"""Masks cached across diffusion steps: dense warm-up, refresh on a schedule, reuse in between.

Attention patterns of a video DiT change slowly along the sampling trajectory, so one
prediction can serve several steps. :class:`MaskCache` keeps one mask per layer:

* steps ``< warmup`` are "dense" (no mask: run full attention, perhaps to get the LSE for a
  column-max prediction);
* "refresh" steps predict a new mask: every ``refresh_every`` steps from the end of the
  warm-up (with ``ramp``, also 1, 2, 4, ... steps after it, the powers of two below
  ``refresh_every``: a mask that each refresh improves gets its first refreshes early), or exactly the steps
  listed in ``refresh_steps`` (a layer with nothing cached refreshes whatever the schedule says,
  and one that did not run on a refresh step, skipped by a caching hook, on the next step it runs);
* the steps in between "reuse" the layer's mask.

Storage is compact: kept indices as int16 when kv_len fits (else int32), or a bit map of all
slices, whichever is smaller ("auto"; a mask whose rows share index entries, so that it keeps
more slices than its buffer holds, stays indices: a bit map would come back in a larger
buffer); ``describe()`` and ``memory_bytes()`` say what is held. On a GPU a bit map is expanded
by one kernel (fg::emit_rows), and ``get(out=...)`` expands any form into a buffer of the
caller's (a kernel plan's own, so reuse costs one write of the keys).
``expanded=True`` keeps each SliceMask as given instead: ``get`` then returns that object with no
conversion and no host synchronisation, for loops that reuse a mask every step (a planned kernel
already holds the expanded mask, so a compact copy would only add memory).
A later step whose shapes differ from the cached mask's gets a ValueError naming both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import bridge
from . import mask_reference as ref
from .attention_kernel import check_scale, eager_scale
from .layout import check_layout, to_bhsd
from .mask import SliceMask, check_key_valid, indptr_from_counts, is_int, num_blocks, positive_int
from .scoring import check_predict_options, predict_mask

STORAGES = ("auto", "index", "bits")
_INT16_KEYS = 2**15


def _check_predict_options(options: dict, caller: str) -> None:
    """Refuse a layout (mask_for's) and what scoring.check_predict_options refuses."""
    if "layout" in options:
        raise ValueError("layout is an argument of mask_for (the layout of its q and k), not a prediction option")
    check_predict_options(options, caller)


def _same_device(asked: torch.device, held: torch.device) -> bool:
    """Whether ``asked`` names ``held``: a device without an index is its backend's current one
    ("cuda" the current CUDA device), and there is one CPU."""
    if asked.type != held.type:
        return False
    if asked.type == "cpu" or asked.index == held.index:
        return True
    if asked.index is None:
        backend = getattr(torch, asked.type, None)
        current = getattr(backend, "current_device", None)
        return held.index is None or (current is not None and held.index == current())
    return False


def refreshes_on(sparse_step: int, refresh_every: int, ramp: bool = False) -> bool:
    """Whether a schedule refreshing every ``refresh_every`` steps (with ``ramp``, also on the
    powers of two below it) refreshes ``sparse_step`` steps after its first mask was made."""
    if sparse_step % refresh_every == 0:
        return True
    return ramp and sparse_step < refresh_every and sparse_step & (sparse_step - 1) == 0


def last_refresh(sparse_step: int, refresh_every: int, ramp: bool = False) -> int:
    """The latest sparse step at or before ``sparse_step`` (>= 0) that :func:`refreshes_on`."""
    latest = sparse_step - sparse_step % refresh_every
    if ramp and sparse_step >= 1:
        power = 1 << (sparse_step.bit_length() - 1)
        if power < refresh_every:
            latest = max(latest, power)
    return latest


@dataclass
class _Entry:
    """One layer's mask in compact form."""

    shape: tuple  # (B, H, q_len, kv_len, slice_m)
    indptr: torch.Tensor
    payload: torch.Tensor  # int16/int32 indices, or uint8 packed bits [B, H, QB, 4 * ceil(S/32)] (32-bit words)
    form: str  # "index" or "bits"
    kept: int | None  # slices kept (known for bits; None when not counted, to avoid a sync)
    step: int
    mask: SliceMask | None = None  # the mask itself, for form "expanded"
    capacity: int = 0  # the stored mask's indices buffer: a "bits" mask comes back in one of this
    # size (a plan sized to it, or a captured graph, sees the same shapes on reuse steps), or of
    # the slices it keeps where they are more (rows sharing entries, with storage="bits")

    def memory_bytes(self) -> int:
        return self.indptr.numel() * self.indptr.element_size() + self.payload.numel() * self.payload.element_size()

    def expanded_size(self) -> int:
        """Index entries of the mask as ``get`` gives it: a bit map's come back in the stored
        mask's buffer size, or in its kept slices where they are more (rows sharing entries)."""
        return max(self.kept, self.capacity) if self.form == "bits" else self.payload.numel()

    @property
    def device(self) -> torch.device:
        return self.payload.device


class MaskCache:
    """Per-layer SliceMasks across diffusion steps (see the module docstring).

    >>> cache = MaskCache(warmup=2, refresh_every=5, method="topk", density=0.1)
    >>> mask = cache.mask_for("block.7", step, q, k)   # None on dense steps
    """

    def __init__(self, warmup: int = 0, refresh_every: int | None = None, refresh_steps=None, storage: str = "auto",
                 expanded: bool = False, ramp: bool = False, **predict_kwargs):
        if not is_int(warmup) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
        if refresh_every is not None and refresh_steps is not None:
            raise ValueError("refresh_every and refresh_steps both say when to refresh: give one of them "
                             "(refresh_steps lists every refresh step)")
        if refresh_steps is None:
            refresh_every = 1 if refresh_every is None else refresh_every
            if not is_int(refresh_every) or refresh_every < 1:
                raise ValueError(f"refresh_every must be a positive int (or give refresh_steps), got {refresh_every!r}")
            self.refresh_steps = None
        else:
            if isinstance(refresh_steps, (str, bytes)) or not hasattr(refresh_steps, "__iter__"):
                raise TypeError(f"refresh_steps must be a sequence of ints, got {refresh_steps!r}")
            refresh_steps = list(refresh_steps)
            if not all(is_int(s) for s in refresh_steps):
                raise TypeError(f"refresh_steps must hold ints, got {refresh_steps!r}")
            steps = sorted({int(s) for s in refresh_steps})
            if any(s < warmup for s in steps):
                raise ValueError(f"refresh_steps {steps} must be steps after the warm-up (>= warmup={warmup})")
            self.refresh_steps = frozenset(steps)
        for name, value in (("ramp", ramp), ("expanded", expanded)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if ramp and refresh_steps is not None:
            raise ValueError("ramp spaces the refreshes of refresh_every; refresh_steps lists them all: give one")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
        if expanded and storage != "auto":
            raise ValueError(f"expanded=True keeps masks as given; it cannot be combined with storage={storage!r}")
        _check_predict_options(predict_kwargs, "MaskCache")
        self.warmup = int(warmup)
        self.refresh_every = int(refresh_every) if is_int(refresh_every) else refresh_every
        self.ramp = ramp
        self.storage = storage
        self.expanded = bool(expanded)
        self.predict_kwargs = predict_kwargs
        self._entries: dict = {}
        self._last_step: dict = {}  # layer -> the last step asked about (a step back: a new run)
        self.predictions = 0
        self.reuses = 0

    # ---- schedule ----
    def action(self, step: int, layer=None) -> str:
        """"dense", "refresh" or "reuse" for ``step`` (and ``layer``: one with nothing cached
        refreshes, so does one asked about an earlier step than before (a new run began), and so
        does one whose mask is older than the schedule's last refresh: a layer that did not run
        on a refresh step, skipped by a caching hook, refreshes on the next step it runs)."""
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        if layer is not None:
            last = self._last_step.get(layer)
            self._last_step[layer] = step
            if last is not None and step < last:  # a new run: its masks are its own
                self._entries.pop(layer, None)
            if step >= self.warmup and (layer not in self._entries or step < self._entries[layer].step
                                        or self._last_refresh(step) > self._entries[layer].step):
                return "refresh"
        if step < self.warmup:
            return "dense"
        if self.refresh_steps is not None:
            return "refresh" if step in self.refresh_steps else "reuse"
        return "refresh" if refreshes_on(step - self.warmup, self.refresh_every, self.ramp) else "reuse"

    def _last_refresh(self, step: int) -> int:
        """The schedule's latest refresh step at or before ``step`` (>= warmup); -1 for none."""
        if self.refresh_steps is not None:
            return max((r for r in self.refresh_steps if r <= step), default=-1)
        return self.warmup + last_refresh(step - self.warmup, self.refresh_every, self.ramp)

    # ---- storage ----
    def keep_expanded(self, expanded: bool) -> None:
        """Whether masks stored from now on are kept as given (``expanded``) or compact; masks
        held keep their form."""
        if not isinstance(expanded, bool):
            raise TypeError(f"expanded must be a bool, got {expanded!r}")
        if expanded and self.storage != "auto":
            raise ValueError(f"expanded=True keeps masks as given; it cannot be combined with storage={self.storage!r}")
        self.expanded = expanded

    def put(self, layer, mask: SliceMask, step: int = 0) -> None:
        """Store ``mask`` as ``layer``'s mask (compactly)."""
        if not isinstance(mask, SliceMask):
            raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
        if not is_int(step) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        shape = (mask.batch, mask.heads, mask.q_len, mask.kv_len, mask.slice_m)
        if self.expanded:
            self._entries[layer] = _Entry(shape, mask.indptr, mask.indices, "expanded", None, step, mask)
            return
        rows = mask.batch * mask.heads * mask.q_blocks
        index_bytes = mask.capacity * (2 if mask.kv_len <= _INT16_KEYS else 4) + 4 * mask.indptr.numel()
        bits_bytes = rows * 4 * -(-mask.kv_len // 32) + 4 * mask.indptr.numel()  # whole 32-bit words, and offsets
        form = self.storage if self.storage != "auto" else ("bits" if bits_bytes < index_bytes else "index")
        packed = _bit_map(mask, dense_ok=self.storage == "bits") if form == "bits" else None
        if packed is None:
            form = "index"  # as chosen, or "auto" on rows too long for the packing kernel (no dense map on a GPU)
        else:
            payload, counts = packed
            kept = int(counts.sum(dtype=torch.int64).item())
            if kept > mask.capacity and self.storage == "auto":  # shared rows: keep the buffer's size
                form = "index"
        if form == "bits":
            indptr = indptr_from_counts(counts, mask.batch, mask.heads, mask.q_blocks)
        else:
            # A copy at any width: the caller's keys (a plan's buffers, refilled in place) stay theirs.
            if mask.kv_len <= _INT16_KEYS:  # keys outside [0, kv_len) would wrap into real keys in int16:
                # int16's lowest stays outside the keys however union_keys moves it (offsets < kv_len)
                outside = (mask.indices < 0) | (mask.indices >= mask.kv_len)
                payload = mask.indices.masked_fill(outside, -(2**15)).to(torch.int16)
            else:
                payload = mask.indices.clone()
            kept, indptr = None, mask.indptr.clone()
        self._entries[layer] = _Entry(shape, indptr, payload, form, kept, step, capacity=mask.capacity)

    def get(self, layer, batch=None, heads=None, q_len=None, kv_len=None, slice_m=None, device=None,
            out: torch.Tensor | None = None) -> SliceMask:
        """``layer``'s cached mask as a SliceMask; any shape or device given must match the cached
        one's. Its tensors may be the cache's own (reuse steps hand attention the mask of the
        refresh step, with no copy): treat it as read-only, or clone it. ``out`` (int32, contiguous,
        ``stored_capacity(layer)`` entries, on the mask's device): the keys are written there and
        the mask views it. A larger ``out`` is taken whole: the keys fill its first
        ``stored_capacity(layer)`` entries, the rest is left as it was (past the last row, so no
        row reads it), and the mask's capacity is ``out``'s size; one buffer serves masks of
        several sizes."""
        if layer not in self._entries:
            raise KeyError(f"no mask cached for layer {layer!r}; cached: {sorted(map(str, self._entries))}")
        entry = self._entries[layer]
        self._check(layer, entry, (batch, heads, q_len, kv_len, slice_m))
        if device is not None and not _same_device(torch.device(device), entry.device):
            raise ValueError(f"layer {layer!r}: the cached mask (from step {entry.step}) is on {entry.device}, but "
                             f"this step's inputs are on {torch.device(device)}")
        if out is not None:
            _check_out(layer, out, entry)
        batch, heads, q_len, kv_len, slice_m = entry.shape
        if entry.form == "bits":
            keys = _unpacked_keys(entry, out)
        elif out is not None:
            with torch.inference_mode(out.is_inference()):  # a plan's buffers made under inference mode
                out[: entry.payload.numel()].copy_(entry.payload)
            keys = out
        elif entry.mask is not None:
            return entry.mask
        else:
            keys = entry.payload.to(torch.int32)
        return SliceMask(entry.indptr, keys, slice_m, q_len, kv_len)

    def stored_capacity(self, layer) -> int:
        """Index entries ``get`` gives ``layer``'s mask (the least its ``out`` takes)."""
        return self._entries[layer].expanded_size()

    def _check(self, layer, entry: _Entry, wanted) -> None:
        names = ("B", "H", "q_len", "kv_len", "slice_m")
        for name, have, want in zip(names, entry.shape, wanted):
            if want is not None and want != have:
                raise ValueError(
                    f"layer {layer!r}: the cached mask (from step {entry.step}) is for (B, H, q_len, kv_len, "
                    f"slice_m)={entry.shape}, but this step asks for {tuple(w if w is not None else h for w, h in zip(wanted, entry.shape))} "
                    f"({name} differs)"
                )

    # ---- the per-step entry point ----
    def mask_for(self, layer, step: int, q, k, layout: str = "HND", **overrides):
        """The mask for ``layer`` at ``step``: None on dense steps, a fresh prediction (stored) on
        refresh steps, the cached one otherwise. ``overrides`` update the predict_mask options of
        this call's prediction: on a reuse step they are checked but the held mask is returned as
        it was predicted (they take effect at the layer's next refresh)."""
        options = {**self.predict_kwargs, **overrides}
        if overrides:
            _check_predict_options(options, "mask_for")
        action = self.action(step, layer)
        if action == "dense":
            return None
        slice_m = options.get("slice_m", 128)
        if action == "reuse":
            qh, kh = (to_bhsd(bridge.to_torch(x, name), layout) for x, name in ((q, "q"), (k, "k")))
            mask = self.get(layer, qh.shape[0], qh.shape[1], qh.shape[2], kh.shape[2], slice_m, qh.device)
            self.record_reuse()
            return mask
        mask = predict_mask(q, k, layout=layout, **options)
        self.record_prediction()
        self.put(layer, mask, step)
        return mask

    def record_prediction(self) -> None:
        """Count a mask predicted for this cache (callers that predict themselves say so here)."""
        self.predictions += 1

    def record_reuse(self) -> None:
        """Count a step that reused a cached mask."""
        self.reuses += 1

    # ---- what is held ----
    def layers(self) -> list:
        return list(self._entries)

    def __contains__(self, layer) -> bool:
        return layer in self._entries

    def step_of(self, layer) -> int | None:
        """The step ``layer``'s mask was stored on (None when nothing is cached): lets a caller
        that runs a layer more than once per step (guidance branches) refresh only once."""
        entry = self._entries.get(layer)
        return None if entry is None else entry.step

    def clear(self) -> None:
        self._entries.clear()
        self._last_step.clear()

    def memory_bytes(self) -> int:
        return sum(e.memory_bytes() for e in self._entries.values())

    def describe(self) -> str:
        """Schedule, then one line per layer: shape, storage form, bytes, step of the mask."""
        dense = f"dense steps 0..{self.warmup - 1}" if self.warmup else "no dense warm-up"
        if self.refresh_steps is not None:
            schedule = f"{dense}, refresh at {sorted(self.refresh_steps)}"
        else:
            schedule = f"{dense}, refresh every {self.refresh_every} steps from step {self.warmup}"
            if self.ramp:
                early = [self.warmup + 2**i for i in range(self.refresh_every.bit_length()) if 2**i < self.refresh_every]
                if early:
                    schedule += f", and on steps {early} (ramp)"
        lines = [f"MaskCache: {len(self._entries)} layers, {self.memory_bytes() / 2**20:.2f} MiB; {schedule}; "
                 f"{self.predictions} predictions, {self.reuses} reuses"]
        for layer, e in self._entries.items():
            kept = f", {e.kept} slices" if e.kept is not None else f", capacity {e.payload.numel()}"
            lines.append(f"  {layer}: (B, H, q_len, kv_len, slice_m)={e.shape}, {e.form} "
                         f"{str(e.payload.dtype).replace('torch.', '')}{kept}, {e.memory_bytes()} bytes, from step {e.step}")
        return "\n".join(lines)


def _check_out(layer, out: torch.Tensor, entry: _Entry) -> None:
    size = entry.expanded_size()
    if (not isinstance(out, torch.Tensor) or out.dtype != torch.int32 or not out.is_contiguous()
            or out.numel() < size or out.dim() != 1 or not _same_device(out.device, entry.device)):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise ValueError(f"layer {layer!r}: out must be a contiguous int32 tensor of at least {size} entries on "
                         f"{entry.device}, got {got}")


def _bit_map(mask: SliceMask, dense_ok: bool) -> tuple | None:
    """(uint8 [B, H, QB, 4 * ceil(kv_len / 32)] the mask's kept slices one bit a key, as
    ``_packed_bits`` lays them; int32 [B, H, QB] the keys each row keeps). fg::pack_rows on a GPU
    (no host sync), else from ``mask.to_dense()`` (a byte a slice: on a GPU only where
    ``dense_ok``, else None)."""
    shape = (mask.batch, mask.heads, mask.q_blocks)
    if mask.device.type == "cuda":
        from .mask_kernels import gpu_pack  # the kernels' module loads with its first use

        packed = gpu_pack(mask)
        if packed is not None:
            words, counts = packed
            return words.view(torch.uint8).reshape(*shape, -1), counts.reshape(shape)
        if not dense_ok:
            return None
    dense = mask.to_dense()
    return _packed_bits(dense), dense.sum(-1, dtype=torch.int32)


def _packed_bits(dense: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 4 * ceil(S / 32)]: the bool map ``dense`` [..., S] one bit a key, key j in bit j % 8
    of byte j // 8 (so each 4 bytes read as one little-endian 32-bit word hold keys 32w..32w+31,
    as fg::emit_rows reads them), zeros past S."""
    pad = (-dense.shape[-1]) % 32
    if pad:
        dense = torch.nn.functional.pad(dense, (0, pad))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=dense.device)
    return (dense.unflatten(-1, (-1, 8)).to(torch.uint8) * weights).sum(-1, dtype=torch.uint8)


def _unpacked_keys(entry: _Entry, out: torch.Tensor | None) -> torch.Tensor:
    """int32 keys of a bit-map entry, ascending per row at its indptr's offsets, into ``out`` (or a
    new tensor); entries past the last row, up to the entry's expanded size, hold key 0 (those of
    a larger ``out`` past that are left as they are). fg::emit_rows on a GPU, torch elsewhere."""
    batch, heads, q_len, kv_len, slice_m = entry.shape
    q_blocks = num_blocks(q_len, slice_m)
    rows = batch * heads * q_blocks
    size = entry.expanded_size()
    device = entry.payload.device
    if out is None:
        out = torch.zeros(size, dtype=torch.int32, device=device)
    else:
        with torch.inference_mode(out.is_inference()):  # a plan's buffers made under inference mode
            out[entry.kept : size].zero_()
    if device.type == "cuda" and rows and kv_len:
        from .mask_kernels import gpu_emit  # the kernels' module loads with its first use

        words = entry.payload.view(torch.int32).reshape(rows, -1)
        starts = entry.indptr[..., :-1].reshape(-1).contiguous()
        counts = (entry.indptr[..., 1:] - entry.indptr[..., :-1]).reshape(-1).contiguous()
        gpu_emit(words, kv_len, q_blocks, 1, slice_m, counts, offsets=starts, out=out)
        return out
    bits = (entry.payload.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=device)) & 1
    dense = bits.flatten(-2)[..., :kv_len].to(torch.bool)
    keys = torch.nonzero_static(dense.reshape(rows, kv_len), size=size, fill_value=0)[:, 1]
    with torch.inference_mode(out.is_inference()):
        out[:size].copy_(keys)
    return out


def mask_drift(old: SliceMask, new: SliceMask) -> dict:
    """How much a mask moved between two steps (synchronises): ``changed`` = fraction of the
    new mask's kept slices that the old one did not keep; ``jaccard`` = 1 - |old & new| /
    |old | new|."""
    if not isinstance(old, SliceMask) or not isinstance(new, SliceMask):
        raise TypeError(f"mask_drift compares two SliceMasks, got {type(old).__name__} and {type(new).__name__}")
    shapes = [(m.batch, m.heads, m.q_len, m.kv_len, m.slice_m) for m in (old, new)]
    if shapes[0] != shapes[1]:
        raise ValueError(f"masks of different (B, H, q_len, kv_len, slice_m) cannot be compared: {shapes[0]} and "
                         f"{shapes[1]}")
    a, b = old.to_dense(), new.to(old.device).to_dense()
    both = int((a & b).sum().item())
    either = int((a | b).sum().item())
    kept_new = int(b.sum().item())
    return {
        "changed": (kept_new - both) / kept_new if kept_new else 0.0,
        "jaccard": 1.0 - both / either if either else 0.0,
    }


def finite_block_means(q: torch.Tensor, slice_m: int) -> tuple:
    """(float32 [..., QB, D] mean of each block's queries whose entries are all finite, bool
    [..., QB] whether a block has any) for q [..., q_len, D]."""
    *lead, q_len, dim = q.shape
    blocks, whole = num_blocks(q_len, slice_m), q_len // slice_m
    used = torch.isfinite(q).all(-1)
    kept = torch.where(used.unsqueeze(-1), q, 0)  # in q's dtype: no float32 copy of the queries
    sums = torch.empty(*lead, blocks, dim, dtype=torch.float32, device=q.device)
    counts = torch.empty(*lead, blocks, dtype=torch.int64, device=q.device)
    sums[..., :whole, :] = kept[..., : whole * slice_m, :].unflatten(-2, (whole, slice_m)).sum(-2, dtype=torch.float32)
    counts[..., :whole] = used[..., : whole * slice_m].unflatten(-1, (whole, slice_m)).sum(-1)
    if whole < blocks:  # the last block, cut short
        sums[..., whole, :] = kept[..., whole * slice_m :, :].sum(-2, dtype=torch.float32)
        counts[..., whole] = used[..., whole * slice_m :].sum(-1)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts > 0


def block_means(x: torch.Tensor, slice_m: int) -> torch.Tensor:
    """float32 [B, H, QB, D]: the mean of each block of ``slice_m`` rows of x [B, H, S, D] (a
    layer's fingerprint for :func:`means_drift`: a few kilobytes per head), over the rows whose
    entries are all finite (padding written as NaN or inf does not make every drift NaN); zero
    for a block with none."""
    slice_m = positive_int("slice_m", slice_m)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a [B, H, S, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    return finite_block_means(x, slice_m)[0]


def means_drift(reference: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """1 - the mean cosine similarity of two :func:`block_means` (0-dim float32 on their device,
    no host sync): 0 when nothing moved. A cheap stand-in for how far a mask went stale
    (``bench.report_masks``' drift section prints it beside the share of kept slices a fresh
    mask changes)."""
    if reference.shape != current.shape:
        raise ValueError(f"block means of different shapes: {tuple(reference.shape)} and {tuple(current.shape)}")
    similarity = torch.nn.functional.cosine_similarity(reference, current, dim=-1)
    similarity = torch.nan_to_num(similarity, nan=0.0)  # a row that cannot be read counts as moved
    both_zero = (reference.norm(dim=-1) == 0) & (current.norm(dim=-1) == 0)  # zero rows (padding): unmoved
    unmoved = torch.where(both_zero, torch.ones_like(similarity), similarity)
    if unmoved.numel() == 0:  # no rows: nothing moved
        return torch.zeros((), dtype=unmoved.dtype, device=reference.device)
    return 1.0 - unmoved.mean()


#: Queries per head whose exact LSE ``mask_recall`` reads.
RECALL_SAMPLES = 64
#: Missed mass (1 - mask_recall) a reading may gain beyond a factor of another's before it counts
#: as more (rounding: a mask that keeps every key reads 1 give or take float32's last bits).
MISSED_MASS_FLOOR = 1e-5
#: float32 entries (logits, and keys where they are copied to float32) ``mask_recall`` forms at
#: once per batch entry (256 MB); heads in chunks.
_RECALL_CHUNK = 1 << 26


def mask_recall(q, k, lse, scale: float | None = None, key_valid=None, samples: int = RECALL_SAMPLES,
                layout: str = "HND") -> torch.Tensor:
    """float32 [B, H]: the share of the softmax mass a mask keeps, per head, averaged over
    ``samples`` evenly spaced queries: exp(their LSE over the kept keys - their exact LSE over
    every key). ``lse`` [B, H, S]: the row LSE of attention through the mask (a sparse call's
    ``return_lse``), so only the sampled rows' exact LSE is computed (samples / S of a dense
    Q K^T; no host sync). A check of any mask on one's own heads with no dense step (a head
    whose mask keeps 0.9 of the mass errs by at most about 2 x 0.1 of its values' spread), and a
    staleness signal that, unlike block means, reads where the attention went. q, k [B, H, S, D]
    (``layout`` "HND") or [B, S, H, D] ("NHD"); ``scale`` defaults to 1 / sqrt(D); ``key_valid``
    [B, S_k] bool leaves padded keys out of the exact LSE (a sampled query with no valid key
    reads 1); NaN logits (a NaN key or query) add no mass to the exact LSE. A query whose
    ``lse`` is NaN (its mask keeps a NaN key, which makes the sparse call's row NaN) tells
    nothing and is left out of its head's mean; a head with no other sampled query reads NaN,
    which ``missed_more`` does not count."""
    check_layout(layout)
    q, k, lse = (bridge.to_torch(x, name) for x, name in ((q, "q"), (k, "k"), (lse, "lse")))
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be a [B, H, S, D] tensor, got {tuple(x.shape)}")
    q, k = to_bhsd(q, layout, "q"), to_bhsd(k, layout, "k")
    if lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 (a sparse call's return_lse), got {lse.dtype}")
    batch, heads, q_len, _ = q.shape
    samples = positive_int("samples", samples)
    if k.dim() != 4 or tuple(k.shape[:2]) != (batch, heads) or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be [B, H, S_k, D] with q's B, H and D {(batch, heads, q.shape[3])}, "
                         f"got {tuple(k.shape)}")
    if tuple(lse.shape) != (batch, heads, q_len):
        raise ValueError(f"lse must be [B, H, S]={(batch, heads, q_len)}, got {tuple(lse.shape)}")
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else eager_scale(scale)
    check_scale(scale)
    if key_valid is not None:
        check_key_valid(key_valid, batch, k.shape[2])
        key_valid = key_valid.to(q.device)
    if q_len == 0 or heads == 0:
        return torch.ones(batch, heads, dtype=torch.float32, device=q.device)
    rows = torch.linspace(0, q_len - 1, min(samples, q_len), device=q.device).round().long()
    exact = torch.empty(batch, heads, rows.numel(), dtype=torch.float32, device=q.device)
    chunk = max(1, _RECALL_CHUNK // max(1, k.shape[2] * (rows.numel() + k.shape[3])))
    for b in range(batch):
        for h0 in range(0, heads, chunk):
            h1 = min(heads, h0 + chunk)
            logits = ref.float32_products(q[b, h0:h1, rows], k[b, h0:h1]).mul_(scale)
            if key_valid is not None:
                logits.masked_fill_(~key_valid[b, None, None, :], float("-inf"))
            exact[b, h0:h1] = ref.nan_free_logsumexp(logits)
    kept = torch.exp(lse[:, :, rows].float() - exact)
    return torch.where(exact == -math.inf, 1.0, kept).nanmean(-1)  # a query with no valid key misses nothing


def missed_more(recall: torch.Tensor, first: torch.Tensor, factor: float) -> torch.Tensor:
    """0-dim bool on their device, no host sync: whether any head of ``recall`` misses more than
    ``factor`` x the mass it missed in ``first`` (two ``mask_recall`` readings of one mask), beyond
    MISSED_MASS_FLOOR. An output's error grows with the mass its mask misses. A reading above 1
    (rounding; keys a padding mask leaves out) misses nothing; a NaN reading (no query could be
    read) counts as no more."""
    missed, missed_first = (1 - recall).clamp_min(0), (1 - first).clamp_min(0)
    return (missed > factor * missed_first + MISSED_MASS_FLOOR).any()
