"""Sequence parallelism's bookkeeping: how shards and heads are split, the header every rank
exchanges before data moves (and the checks all ranks make alike from it), and bounded waits on
collectives."""

from __future__ import annotations

import datetime
import os
import struct
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import bridge
from .attention_kernel import check_forward_only, check_has_kernel, check_scale, eager_scale
from .layout import LAYOUTS, check_layout, to_bhsd
from .mask import is_int, positive_int

COMPUTES = ("auto", "fgcupy", "reference")
EXCHANGES = ("auto", "all_to_all", "p2p", "copy")
DENSE_SLICE_M = 128  # slice size of the all-keys mask used when no mask is given

_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.bfloat16: 3, torch.float16: 4}
_HEADER = ("error", "batch", "heads", "head_dim", "q_len", "kv_len", "dtype", "head_groups", "attend",
           "return_lse", "mask", "mask_batch", "mask_heads", "mask_q_len", "mask_kv_len", "mask_slice_m", "layout",
           "scale", "exchange", "mask_kind", "seq_lens", "mask_digest", "ring")
#: Header fields every rank must have alike (seq_lens: a digest of the list, 0 when not given;
#: ring: 0 for Ulysses alone, else the ring size of Ulysses x ring: ranks calling different
#: engines would wait on each other's collectives until the timeout).
_AGREE = ("batch", "heads", "head_dim", "dtype", "head_groups", "attend", "return_lse", "layout", "scale", "exchange",
          "mask_kind", "seq_lens", "ring")
_MASK_KINDS = {"none": 0, "static": 1, "callable": 2}
COLLECTIVE_TIMEOUT_ENV = "FGCUPY_COLLECTIVE_TIMEOUT_S"
MAX_COLLECTIVE_TIMEOUT_S = 2**31 // 1000  # ~24.8 days: gloo's wait takes int32 milliseconds


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits on a collective of a gloo group before raising (default 60 s)."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV, "60")
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    # gloo takes the wait in int milliseconds, and 0 ms means no timeout at all
    if not 0.001 <= seconds <= MAX_COLLECTIVE_TIMEOUT_S:
        raise ValueError(f"{COLLECTIVE_TIMEOUT_ENV} must be a number of seconds from 0.001 up to "
                         f"{MAX_COLLECTIVE_TIMEOUT_S}, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _scale_code(scale) -> int:
    """The scale's float64 bits as an int64 (0 for None, the default), for the header; a scale
    the attention would refuse raises here, before the header, so every rank hears of it."""
    if scale is None:
        return 0
    scale = eager_scale(scale)
    check_scale(scale)
    return struct.unpack("<q", struct.pack("<d", float(scale)))[0]


def _scale_of(code: int):
    return None if code == 0 else struct.unpack("<d", struct.pack("<q", code))[0]


def _lens_digest(seq_lens) -> int:
    """A nonzero int63 digest of a seq_lens list (0: not given)."""
    digest = 1469598103934665603
    for n in [len(seq_lens), *seq_lens]:
        digest = ((digest ^ (int(n) & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return digest or 1


# ---- partitions ----
def check_attention_inputs(q, k, v, uses_kernel: bool) -> None:
    """Before the header, what this rank's attention would refuse only after the exchanges had
    started (the other ranks would wait in them): inputs that need gradients, and for the
    kernels a dtype or head dim they do not take."""
    check_forward_only(q, k, v)
    if q.shape[-1] < 1:
        raise ValueError(f"head_dim must be at least 1, got {q.shape[-1]}")
    if uses_kernel:
        bridge.dtype_name(q.dtype, "q")
        check_has_kernel(q.shape[-1], DENSE_SLICE_M)


def shard_ranges(length: int, parts: int) -> list[range]:
    """Contiguous near-equal pieces, the first ``length % parts`` one longer (torch.tensor_split's
    rule): every rank computes every rank's piece without communicating."""
    parts = positive_int("parts", parts)
    if not is_int(length) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    length = int(length)
    base, extra = divmod(length, parts)
    ranges, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def head_ranges(heads: int, world_size: int) -> list[range]:
    """Heads owned by each rank: ``shard_ranges`` over heads (uneven when P does not divide H)."""
    return shard_ranges(heads, world_size)


def _group_ranges(owned: range, head_groups: int) -> list[range]:
    """Split a rank's heads into pipeline groups. The first group's exchange is the one no
    attention can hide, so where there are heads enough (two per group) it gets about half a
    share and the others split the rest evenly."""
    n = len(owned)
    if head_groups > 1 and n >= 2 * head_groups:
        first = max(1, round(n / (2 * head_groups - 1)))
        sizes = [first] + [len(r) for r in shard_ranges(n - first, head_groups - 1)]
    else:
        sizes = [len(r) for r in shard_ranges(n, head_groups)]
    ranges, start = [], owned.start
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


# ---- backends and waits ----
def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


def _uses_nccl(group, device: torch.device) -> bool:
    backend = _backend(group)
    if device.type != "cuda" or "nccl" not in backend:
        return False
    return "cuda:nccl" in backend or ":" not in backend


def _header_device(group, device: torch.device) -> torch.device:
    if _uses_nccl(group, device):
        return device
    if "nccl" in _backend(group) and "gloo" not in _backend(group):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class Pending:
    """Works of one exchange plus the buffers they use (kept alive until ``wait``)."""

    def __init__(self, works, buffers, group, pollable=True):
        self.works, self.buffers, self.group, self.pollable = works, buffers, group, pollable

    def wait(self):
        for work in self.works:
            _wait(work, self.group, self.pollable)
        self.works = []


def _wait(work, group, pollable: bool = True) -> None:
    """Wait for one collective of ``group``; on gloo at most collective_timeout(), then
    TimeoutError (the work is polled: gloo's own wait ignores a timeout here). Gloo's
    point-to-point works never report completion to a poll (``pollable=False``): their own wait
    takes the timeout (its RuntimeError past it is raised as the same TimeoutError)."""
    if "gloo" not in _backend(group):
        work.wait()
        return
    timeout = collective_timeout()
    message = (f"a sequence-parallel collective did not finish within {timeout.total_seconds():.0f} s "
               f"({COLLECTIVE_TIMEOUT_ENV}); another rank probably failed or stopped")
    if not pollable:
        try:
            work.wait(timeout)
        except RuntimeError as err:
            if "timed out" in str(err).lower():
                raise TimeoutError(message) from err
            raise
        return
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 0.0
    while not work.is_completed():
        if time.monotonic() >= deadline:
            raise TimeoutError(message)
        time.sleep(pause)
        pause = min(0.001, pause + 0.0001)
    work.wait()  # raises the collective's own error, if it failed


# ---- the header ----
#: The header's "error" of a rank constructing HybridSequenceParallelAttention (whose ring
#: agreement is a header too, so that a rank calling attention meanwhile meets a collective of
#: its own size, and both raise, instead of gloo aborting on a size mismatch).
CONSTRUCTING = 2


def gather_headers(group, local, device, world: int):
    """Every rank's header (dicts in rank order); ValueError where another rank is constructing a
    HybridSequenceParallelAttention while this one calls attention."""
    values = torch.tensor([int(local[name]) for name in _HEADER], dtype=torch.int64)
    values = values.to(_header_device(group, device))
    gathered = [torch.empty_like(values) for _ in range(world)]
    _wait(dist.all_gather(gathered, values, group=group, async_op=True), group)
    headers = [dict(zip(_HEADER, row)) for row in torch.stack(gathered).tolist()]
    building = [rank for rank, h in enumerate(headers) if h["error"] == CONSTRUCTING]
    if building and local["error"] != CONSTRUCTING:
        raise ValueError(f"rank(s) {building} are constructing a HybridSequenceParallelAttention (a collective of "
                         "the group) while this rank calls sequence-parallel attention: construct the engines on "
                         "every rank before calling them")
    return headers

def check_agreement(headers):
    """Checks every rank makes alike from the same headers, so all raise or none does."""
    for name in _AGREE:
        values = [h[name] for h in headers]
        if len(set(values)) > 1:
            shown = {"dtype": lambda: [_dtype_of(c) for c in values],
                     "layout": lambda: [LAYOUTS[c] for c in values],
                     "scale": lambda: [_scale_of(c) for c in values],
                     "exchange": lambda: [EXCHANGES[c] for c in values],
                     "mask_kind": lambda: [next(k for k, v in _MASK_KINDS.items() if v == c) for c in values],
                     "seq_lens": lambda: ["given" if c else "not given" for c in values],
                     "ring": lambda: ["Ulysses" if c == 0 else f"Ulysses x ring of {c}" for c in values],
                     }.get(name, lambda: values)()
            if name == "seq_lens" and all(values):
                shown = "different lists"
            raise ValueError(f"ranks disagree on {name.replace('_', ' ')}: {shown} (rank order)")
    q_lens = [h["q_len"] for h in headers]
    kv_lens = [h["kv_len"] for h in headers]
    _check_mask_totals(headers, q_lens, kv_lens)
    _check_mask_digests(headers)
    return q_lens, kv_lens


def _check_mask_digests(headers):
    """Static masks over every head are one mask (each rank attends its own heads or rows of it):
    ranks whose copies differ (SliceMask.digest) would attend a mix of them."""
    full = [(i, h["mask_digest"]) for i, h in enumerate(headers) if h["mask"] and h["mask_heads"] == h["heads"]]
    if len({headers[i]["mask_slice_m"] for i, _ in full}) > 1:
        return  # slice sizes that differ have their own message (ring attention)
    if len({digest for _, digest in full}) > 1:
        groups: dict = {}
        for i, digest in full:
            groups.setdefault(digest, []).append(i)
        raise ValueError(f"the ranks' masks over all heads differ (ranks {sorted(groups.values())} hold alike "
                         "copies): pass every rank the same mask, or each rank the mask of its own heads")


def _dtype_of(code):
    return next((dtype for dtype, c in _DTYPE_CODES.items() if c == code), code)


def _check_mask_totals(headers, q_lens, kv_lens):
    q_total, kv_total = sum(q_lens), sum(kv_lens)
    for i, h in enumerate(headers):
        if not h["mask"]:
            continue  # no static mask on that rank
        if (h["mask_q_len"], h["mask_kv_len"]) != (q_total, kv_total):
            who = f"rank {i}'s" if len(headers) > 1 else "the"
            raise ValueError(
                f"{who} mask is for q_len={h['mask_q_len']}, kv_len={h['mask_kv_len']}; the shards add up to "
                f"q_len={q_total}, kv_len={kv_total} (masks use positions in the whole sequence)")


def check_seq_lens(seq_lens, world: int, rank: int, local: dict) -> list:
    """``seq_lens`` as ints, checked against this rank's own shard (self-attention only)."""
    seq_lens = [int(n) for n in seq_lens]
    if len(seq_lens) != world or any(n < 0 for n in seq_lens):
        raise ValueError(f"seq_lens must list {world} non-negative shard lengths (one per rank), got {seq_lens}")
    if seq_lens[rank] != local["q_len"] or local["kv_len"] != local["q_len"]:
        raise ValueError(
            f"seq_lens[{rank}]={seq_lens[rank]}, but this rank's q shard has {local['q_len']} tokens and "
            f"k/v {local['kv_len']} (seq_lens is for self-attention shards of equal length)")
    return seq_lens


@dataclass(frozen=True)
class _Call:
    """One call's inputs ([B, H, S_r, D] views and q as given) and what the ranks agreed on."""

    qh: torch.Tensor
    kh: torch.Tensor
    vh: torch.Tensor
    q: torch.Tensor
    layout: str
    mask: object
    compute: str
    method: str
    q_lens: list
    kv_lens: list
    scale: float | None
    return_lse: bool
    attend: bool
    world: int
    rank: int


def shard_views(q, k, v, layout: str) -> tuple:
    """[B, H, S, D] views of this rank's q, k, v shards, checked to be torch tensors of a dtype
    the header can name."""
    check_layout(layout)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    qh, kh, vh = (to_bhsd(t, layout) for t in (q, k, v))
    if qh.dtype not in _DTYPE_CODES:
        raise TypeError(f"q has dtype {qh.dtype}; expected one of {tuple(_DTYPE_CODES)}")
    return qh, kh, vh
