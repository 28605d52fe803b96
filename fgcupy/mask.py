"""SliceMask: which M x 1 slices (query block x one key) attention keeps.

Format (CSR with a fixed-capacity buffer, so shapes stay static across diffusion steps):
  indptr  int32 [B, H, QB + 1]  offsets into ``indices``; row (b, h, j) owns
                                ``indices[indptr[b, h, j] : indptr[b, h, j + 1]]``
  indices int32 [capacity]      kept key positions, sorted ascending and unique within a row
QB = ceil(q_len / slice_m). Query block j covers queries [j * slice_m, (j + 1) * slice_m).
Tensors live on any torch device; nothing here synchronises the host except ``validate`` (the
full check), ``density``, ``to_dense``, ``flat_rows``, ``digest``, ``block_cover``, ``from_dense``,
``from_topk`` of non-int32 indices and the BlockMask converters.
"""

from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass

import numpy as np
import torch

#: ``SliceMask.digest``: its modulus (a Mersenne prime) and the entries it weighs at once.
_DIGEST_PRIME = 2**31 - 1
_DIGEST_CHUNK = 1 << 24


def _as_int32_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    elif not isinstance(x, torch.Tensor):
        if hasattr(x, "__dlpack__"):
            x = torch.from_dlpack(x)
        else:
            raise TypeError(f"{what} must be a torch tensor, numpy or cupy array, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{what} must be int32, got {x.dtype}")
    return x


INT32_MAX = 2**31 - 1


def is_int(value) -> bool:
    """A Python or numpy integer, not a bool (options that count things)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def positive_int(name: str, value) -> int:
    """``value`` as an int if it is a positive Python or numpy integer; else ValueError naming
    ``name``."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_key_valid(key_valid, batch: int, kv_len: int) -> None:
    """TypeError / ValueError unless ``key_valid`` is a bool tensor [batch, kv_len]."""
    if not isinstance(key_valid, torch.Tensor):
        raise TypeError(f"key_valid must be a bool torch.Tensor [B, KV], got {type(key_valid).__name__}")
    if tuple(key_valid.shape) != (batch, kv_len) or key_valid.dtype != torch.bool:
        raise ValueError(
            f"key_valid must be bool [B, KV]={(batch, kv_len)}, got {key_valid.dtype} {tuple(key_valid.shape)}"
        )


def num_blocks(length: int, slice_m: int) -> int:
    return (length + slice_m - 1) // slice_m


#: Full masks of at most this many slices are built on the host (SliceMask.full).
HOST_BUILT_FULL_MASK = 1 << 20
#: (row, key) pairs ``to_dense`` builds at once (16 bytes each, and temporaries of their size).
_PAIRS_PER_PASS = 1 << 22


@dataclass(frozen=True, eq=False)
class SliceMask:
    indptr: torch.Tensor
    indices: torch.Tensor
    slice_m: int
    q_len: int
    kv_len: int

    def __post_init__(self):
        indptr = _as_int32_tensor(self.indptr, "indptr")
        indices = _as_int32_tensor(self.indices, "indices")
        object.__setattr__(self, "indptr", indptr)
        object.__setattr__(self, "indices", indices)
        for name, least in (("slice_m", 1), ("q_len", 0), ("kv_len", 0)):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
            if value > INT32_MAX:
                raise ValueError(f"{name} must be < 2**31 (kernels index with int32), got {value}")
            object.__setattr__(self, name, int(value))  # numpy ints would not trace under torch.compile
        if indptr.dim() != 3:
            raise ValueError(f"indptr must have shape [B, H, QB + 1], got {tuple(indptr.shape)}")
        expected_qb = num_blocks(self.q_len, self.slice_m)
        if indptr.shape[2] != expected_qb + 1:
            raise ValueError(
                f"indptr has {indptr.shape[2] - 1} query blocks, expected {expected_qb} "
                f"(q_len={self.q_len}, slice_m={self.slice_m})"
            )
        if indices.dim() != 1:
            raise ValueError(f"indices must be 1-D, got shape {tuple(indices.shape)}")
        if indices.shape[0] > INT32_MAX:
            raise ValueError(f"indices holds {indices.shape[0]} entries, more than int32 offsets address")
        if indptr.device != indices.device:
            raise ValueError(f"indptr is on {indptr.device} but indices on {indices.device}")

    # ---- shape ----
    @property
    def batch(self) -> int:
        return self.indptr.shape[0]

    @property
    def heads(self) -> int:
        return self.indptr.shape[1]

    @property
    def q_blocks(self) -> int:
        return self.indptr.shape[2] - 1

    @property
    def capacity(self) -> int:
        return self.indices.shape[0]

    @property
    def device(self) -> torch.device:
        return self.indptr.device

    def row_lengths(self) -> torch.Tensor:
        """int32 [B, H, QB]: the entries each query block's row lists, its offsets clamped as
        ``row_bounds`` clamps them (padding and keys outside [0, kv_len) counted: ``kept_pairs``
        drops those). No sync."""
        starts, ends = self.row_bounds()
        return (ends - starts).to(torch.int32).view(self.batch, self.heads, self.q_blocks)

    def density(self) -> float:
        """Kept slices / all slices: the entries the kernels attend to, rows bounded as they bound
        them and keys outside [0, kv_len) left out as they leave them out (a key listed twice
        counts twice). Synchronises."""
        total = self.batch * self.heads * self.q_blocks * self.kv_len
        if total == 0:
            return 0.0
        starts, ends = self.row_bounds()  # rows as the kernels read them
        kept = (ends - starts).sum()
        outside = (self.indices < 0) | (self.indices >= self.kv_len)
        if bool(outside.any()):  # rare (padded top-k lists): subtract what each row lists outside
            before = torch.zeros(self.capacity + 1, dtype=torch.int32, device=self.indices.device)
            torch.cumsum(outside, 0, dtype=torch.int32, out=before[1:])
            kept = kept - (before[ends] - before[starts]).sum()
        return float(kept.item()) / total

    def to(self, device) -> "SliceMask":
        """The mask on ``device`` (a device, not a dtype: the offsets and keys stay int32)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"SliceMask.to takes a device, got the dtype {device}: a mask's tensors stay int32")
        if isinstance(device, torch.Tensor):
            raise TypeError("SliceMask.to takes a device, got a tensor: use mask.to(tensor.device)")
        return SliceMask(self.indptr.to(device), self.indices.to(device), self.slice_m, self.q_len, self.kv_len)

    def memory_bytes(self) -> int:
        return (self.indptr.numel() + self.indices.numel()) * 4

    # ---- constructors ----
    @classmethod
    def from_dense(cls, dense, slice_m: int, q_len: int, capacity: int | None = None) -> "SliceMask":
        """From a boolean map ``[B, H, QB, KV]`` (True = keep). Synchronises (counts the keys)."""
        if not isinstance(dense, torch.Tensor):
            dense = torch.as_tensor(dense)
        if dense.dim() != 4:
            raise ValueError(f"dense mask must have shape [B, H, QB, KV], got {tuple(dense.shape)}")
        if dense.dtype != torch.bool:
            if dense.dtype.is_floating_point or dense.dtype.is_complex:
                raise TypeError(f"dense mask must be boolean (or integer 0/1), got {dense.dtype}")
            if dense.numel() and ((dense != 0) & (dense != 1)).any():
                raise ValueError("dense mask must hold only 0 and 1 (or booleans)")
            dense = dense.to(torch.bool)
        batch, heads, q_blocks, kv_len = dense.shape
        if is_int(q_len) and is_int(slice_m) and q_len >= 0 and slice_m >= 1 and q_blocks != num_blocks(q_len, slice_m):
            raise ValueError(f"dense mask has {q_blocks} query blocks ([B, H, QB, KV] = {tuple(dense.shape)}); "
                             f"q_len={q_len} in blocks of slice_m={slice_m} needs {num_blocks(q_len, slice_m)}")
        counts = dense.sum(dim=-1, dtype=torch.int32).reshape(-1)
        indptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=indptr[1:])
        total = int(indptr[-1].item())
        if total > torch.iinfo(torch.int32).max:
            raise ValueError(f"mask keeps {total} slices, more than int32 offsets can address")
        if capacity is None:
            capacity = total
        elif not is_int(capacity) or capacity < 0:
            raise ValueError(f"capacity must be a non-negative int or None, got {capacity!r}")
        elif capacity < total:
            raise ValueError(f"capacity={capacity} is smaller than the {total} kept slices")
        if capacity > INT32_MAX:
            raise ValueError(f"capacity={capacity} is more than int32 offsets address")
        indices = torch.zeros(capacity, dtype=torch.int32, device=dense.device)
        if total:
            indices[:total] = dense.reshape(-1, kv_len).nonzero()[:, 1].to(torch.int32)
        return cls(indptr_from_offsets(indptr.to(torch.int32), batch, heads, q_blocks), indices, slice_m, q_len, kv_len)

    @classmethod
    def from_topk(cls, topk, slice_m: int, q_len: int, kv_len: int) -> "SliceMask":
        """From key indices ``[B, H, QB, k]`` (each row's k keys, any order, unique). No sync for
        int32 indices (``validate`` checks them); other integer dtypes are range-checked and
        checked for repeats first (one sync), so a value beyond int32 never wraps into a valid key."""
        if not isinstance(topk, torch.Tensor):
            topk = torch.as_tensor(topk)
        if topk.dtype == torch.bool or topk.dtype.is_floating_point or topk.dtype.is_complex:
            raise TypeError(f"top-k indices must be an integer tensor, got {topk.dtype}")
        if topk.dim() != 4:
            raise ValueError(f"top-k indices must have shape [B, H, QB, k], got {tuple(topk.shape)}")
        if not is_int(kv_len) or kv_len < 0:
            raise ValueError(f"kv_len must be a non-negative int, got {kv_len!r}")
        batch, heads, q_blocks, k = topk.shape
        if is_int(q_len) and is_int(slice_m) and q_len >= 0 and slice_m >= 1 and q_blocks != num_blocks(q_len, slice_m):
            raise ValueError(f"top-k indices have {q_blocks} query blocks ([B, H, QB, k] = {tuple(topk.shape)}); "
                             f"q_len={q_len} in blocks of slice_m={slice_m} needs {num_blocks(q_len, slice_m)}")
        rows = batch * heads * q_blocks
        if rows * k > torch.iinfo(torch.int32).max:
            raise ValueError(f"{rows} rows x k={k} exceed int32 offsets")
        if topk.dtype != torch.int32 and topk.numel():
            _check_topk(topk, kv_len)
        indices = torch.sort(topk.to(torch.int32), dim=-1).values.reshape(-1)
        return cls(even_indptr(batch, heads, q_blocks, k, topk.device), indices, slice_m, q_len, kv_len)

    @classmethod
    def full(cls, batch: int, heads: int, q_len: int, kv_len: int, slice_m: int, device=None) -> "SliceMask":
        """Every key for every query block: dense attention through the sparse kernel."""
        _check_sizes(batch, heads, q_len, kv_len, slice_m)
        q_blocks = num_blocks(q_len, slice_m)
        rows = batch * heads * q_blocks
        if rows * kv_len > torch.iinfo(torch.int32).max or rows > INT32_MAX or kv_len > INT32_MAX:
            raise ValueError(f"{rows} rows x {kv_len} keys exceed int32 offsets")
        # Small masks are built on the host and copied in one transfer: in a new process each
        # first use of a torch CUDA operation loads its kernels (milliseconds apiece).
        build = "cpu" if rows * kv_len <= HOST_BUILT_FULL_MASK else device
        indices = (torch.arange(kv_len, dtype=torch.int32, device=build).repeat(rows) if rows  # sorted already
                   else torch.empty(0, dtype=torch.int32, device=build))
        indptr = even_indptr(batch, heads, q_blocks, kv_len, build)
        return cls(indptr.to(device), indices.to(device), slice_m, q_len, kv_len)

    # ---- views ----
    def row_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 [B * H * QB] (start, end) of each row's entries, clamped as the kernels clamp
        them (work_item): start into [0, capacity], end into [start, capacity], so a row whose
        offsets lie outside the list is empty. No sync."""
        starts = self.indptr[..., :-1].reshape(-1).to(torch.int64).clamp(0, self.capacity)
        ends = torch.maximum(self.indptr[..., 1:].reshape(-1).to(torch.int64).clamp_max(self.capacity), starts)
        return starts, ends

    def digest(self) -> int:
        """A fingerprint (non-negative int below 2^62) of the shape (batch, heads, query blocks,
        slice_m, q_len, kv_len), the offsets and the index entries some row covers (spare
        capacity is ignored): equal for masks laid out alike, different for others but by a
        chance of about 2^-31. Sequence-parallel ranks compare it to catch masks
        that should be one and are not. Synchronises once; reads the mask in chunks."""
        starts, ends = self.row_bounds()
        cover = torch.zeros(self.capacity + 1, dtype=torch.int32, device=self.device)
        ones = torch.ones_like(starts, dtype=torch.int32)
        cover.index_add_(0, starts, ones).index_add_(0, ends, -ones)
        covered = cover.cumsum(0, dtype=torch.int32)[:-1] > 0
        # Each int32 as its two 16-bit halves, summed apart: every half is below the prime, so a
        # change of one entry changes a sum (a residue of the whole value would equate some pairs).
        sums = torch.zeros(4, dtype=torch.int64, device=self.device)
        for slot, (values, keep) in enumerate(((self.indptr.reshape(-1), None), (self.indices, covered))):
            for lo in range(0, values.numel(), _DIGEST_CHUNK):
                shifted = values[lo : lo + _DIGEST_CHUNK].to(torch.int64) + 2**31
                at = torch.arange(lo, lo + shifted.numel(), dtype=torch.int64, device=self.device)
                weight = (at * 1_000_003 + 12_345) % _DIGEST_PRIME + 1
                for half, part in enumerate((shifted >> 16, shifted & 0xFFFF)):
                    term = part * weight % _DIGEST_PRIME  # < 2^31 each
                    if keep is not None:
                        term = torch.where(keep[lo : lo + part.numel()], term, 0)
                    sums[2 * slot + half] = (sums[2 * slot + half] + term.sum()) % _DIGEST_PRIME  # 2^24 terms a chunk
        sizes = (self.batch, self.heads, self.q_blocks, self.slice_m, self.q_len, self.kv_len)
        text = ",".join(str(n) for n in (*sums.tolist(), *sizes))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 2

    def flat_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, key) int64 pairs of every kept slice, row = (b * H + h) * QB + j. Synchronises."""
        starts, ends = self.row_bounds()
        return self._pairs(starts, ends, int((ends - starts).sum().item()))

    def _pairs(self, starts: torch.Tensor, ends: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, key) int64 pairs of the rows with these bounds (``total`` entries), rows counted
        from the first given."""
        lengths = ends - starts
        row_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=self.device), lengths,
                                         output_size=total)
        first = torch.cumsum(lengths, 0) - lengths
        positions = starts[row_of] + torch.arange(total, device=self.device) - first[row_of]
        return row_of, self.indices[positions].to(torch.int64)

    def kept_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``flat_rows`` without keys outside [0, kv_len): the slices the kernels attend to (they
        drop such keys; ``validate`` names them)."""
        return self._inside(*self.flat_rows())

    def _inside(self, row_of: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (row, key) pairs whose key lies in [0, kv_len)."""
        inside = (keys >= 0) & (keys < self.kv_len)
        return row_of[inside], keys[inside]

    def to_dense(self) -> torch.Tensor:
        """Boolean map ``[B, H, QB, KV]`` of the kept slices (keys outside [0, kv_len) are dropped,
        as the kernels drop them; ``validate`` refuses them). Built from groups of rows of at most
        _PAIRS_PER_PASS entries: the (row, key) pairs take 16 bytes each, the map one. Synchronises."""
        starts, ends = self.row_bounds()
        rows = starts.numel()
        dense = torch.zeros(rows, self.kv_len, dtype=torch.bool, device=self.device)
        reached = torch.cumsum(ends - starts, 0).cpu()  # entries up to and including each row
        first, done = 0, 0
        while first < rows:
            last = max(first + 1, int(torch.searchsorted(reached, done + _PAIRS_PER_PASS, right=True)))
            total = int(reached[last - 1]) - done
            row_of, keys = self._inside(*self._pairs(starts[first:last], ends[first:last], total))
            dense[row_of + first, keys] = True
            first, done = last, done + total
        return dense.reshape(self.batch, self.heads, self.q_blocks, self.kv_len)

    def validate(self) -> "SliceMask":
        """Check offsets and indices (synchronises); names the bad row."""
        starts = self.indptr[..., :-1].reshape(-1).cpu().to(torch.int64)
        ends = self.indptr[..., 1:].reshape(-1).cpu().to(torch.int64)
        for name, offsets in (("start", starts), ("end", ends)):
            bad = (offsets < 0) | (offsets > self.capacity)
            if bad.any():
                row = int(torch.nonzero(bad)[0, 0])
                raise ValueError(
                    f"indptr {name} of {self._row_name(row)} is {int(offsets[row])}, "
                    f"outside [0, capacity={self.capacity}]"
                )
        shrinking = ends < starts
        if shrinking.any():
            row = int(torch.nonzero(shrinking)[0, 0])
            raise ValueError(
                f"indptr decreases at {self._row_name(row)} (start {int(starts[row])} > end {int(ends[row])})"
            )
        row_of, keys = self.to("cpu").flat_rows()
        out_of_range = (keys < 0) | (keys >= self.kv_len)
        if out_of_range.any():
            pos = int(torch.nonzero(out_of_range)[0, 0])
            raise ValueError(
                f"key index {int(keys[pos])} at {self._row_name(int(row_of[pos]))} is outside "
                f"[0, kv_len={self.kv_len})"
            )
        if keys.numel() > 1:
            not_increasing = (row_of[1:] == row_of[:-1]) & (keys[1:] <= keys[:-1])
            if not_increasing.any():
                pos = int(torch.nonzero(not_increasing)[0, 0])
                raise ValueError(
                    f"keys of {self._row_name(int(row_of[pos]))} are not sorted and unique "
                    f"({int(keys[pos])} then {int(keys[pos + 1])})"
                )
        return self

    def _row_name(self, row: int) -> str:
        b, rest = divmod(row, self.heads * self.q_blocks)
        h, j = divmod(rest, self.q_blocks)
        return f"(b={b}, h={h}, row={j})"

    # ---- FlexAttention ----
    def block_cover(self, block_size: int = 128) -> torch.Tensor:
        """Boolean ``[B, H, ceil(q_len/bs), ceil(kv_len/bs)]``: blocks holding any kept slice."""
        block_size = positive_int("block_size", block_size)
        if block_size % self.slice_m:
            raise ValueError(f"block_size={block_size} must be a multiple of slice_m={self.slice_m}")
        row_of, keys = self.kept_pairs()
        q_blocks_big = num_blocks(self.q_len, block_size)
        kv_blocks_big = num_blocks(self.kv_len, block_size)
        bh, j = torch.div(row_of, self.q_blocks, rounding_mode="floor"), row_of % self.q_blocks
        big_row = bh * q_blocks_big + j * self.slice_m // block_size
        cover = torch.zeros(self.batch * self.heads * q_blocks_big, kv_blocks_big, dtype=torch.bool, device=self.device)
        cover[big_row, keys // block_size] = True
        return cover.reshape(self.batch, self.heads, q_blocks_big, kv_blocks_big)

    def to_block_mask(self, block_size: int = 128, exact: bool = True):
        """FlexAttention ``BlockMask`` over the block cover (every block holding any kept slice).

        With ``exact=True`` a ``mask_mod`` keeps only the kept slices inside each block, so
        FlexAttention computes the same function as fgcupy; with ``exact=False`` whole blocks are
        computed (the work a block-sparse kernel does for this mask), listed as full blocks, which
        FlexAttention runs without evaluating a mask_mod per element. Synchronises.
        """
        from torch.nn.attention.flex_attention import BlockMask

        cover = self.block_cover(block_size)
        block_size = int(block_size)
        counts = cover.sum(-1, dtype=torch.int32)
        order = torch.argsort((~cover).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        if not exact:  # every block whole: no partial blocks, so no per-element mask_mod
            return BlockMask.from_kv_blocks(torch.zeros_like(counts), order, full_kv_num_blocks=counts,
                                            full_kv_indices=order, BLOCK_SIZE=block_size,
                                            seq_lengths=(self.q_len, self.kv_len))
        slice_map = self.to_dense()
        slice_m = self.slice_m

        def mask_mod(b, h, q_idx, kv_idx):
            return slice_map[b, h, q_idx // slice_m, kv_idx]

        return BlockMask.from_kv_blocks(
            counts, order, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(self.q_len, self.kv_len)
        )

    @classmethod
    def from_block_mask(cls, block_mask, slice_m: int, q_len: int | None = None, kv_len: int | None = None):
        """Every slice inside the blocks a FlexAttention ``BlockMask`` visits (its mask_mod is
        not applied: partial blocks count as full). Synchronises."""
        from torch.nn.attention.flex_attention import BlockMask

        if not isinstance(block_mask, BlockMask):
            raise TypeError(f"block_mask must be a FlexAttention BlockMask, got {type(block_mask).__name__}")
        slice_m = positive_int("slice_m", slice_m)
        for name, value in (("q_len", q_len), ("kv_len", kv_len)):
            if value is not None and (not is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
        q_block, kv_block = block_mask.BLOCK_SIZE
        seq_q, seq_kv = block_mask.seq_lengths
        q_len = seq_q if q_len is None else q_len
        kv_len = seq_kv if kv_len is None else kv_len
        if q_len > seq_q or kv_len > seq_kv:
            raise ValueError(f"(q_len, kv_len)=({q_len}, {kv_len}) exceed the BlockMask's sequence lengths "
                             f"({seq_q}, {seq_kv})")
        if q_block % slice_m:
            raise ValueError(f"BlockMask query block {q_block} is not a multiple of slice_m={slice_m}")
        blocks = block_mask.to_dense().to(torch.bool)  # [B, H, QBlocks, KVBlocks]
        held = (blocks.shape[2] * q_block, blocks.shape[3] * kv_block)
        if q_len > held[0] or kv_len > held[1]:  # a sliced BlockMask keeps its sequence lengths
            raise ValueError(f"the BlockMask's blocks cover (q_len, kv_len)={held}, fewer than ({q_len}, {kv_len}) "
                             "(a sliced BlockMask keeps the lengths of the whole): pass q_len and kv_len")
        q_blocks = num_blocks(q_len, slice_m)
        row_block = torch.arange(q_blocks, device=blocks.device) * slice_m // q_block
        key_block = torch.arange(kv_len, device=blocks.device) // kv_block
        dense = blocks[:, :, row_block][..., key_block]
        return cls.from_dense(dense, slice_m, q_len)


def _check_sizes(batch, heads, q_len, kv_len, slice_m) -> None:
    """ValueError naming the first of a mask's sizes that is not an int (slice_m >= 1, the rest >= 0)."""
    for name, value, least in (("batch", batch, 0), ("heads", heads, 0), ("q_len", q_len, 0), ("kv_len", kv_len, 0),
                               ("slice_m", slice_m, 1)):
        if not is_int(value) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def random_topk_mask(batch: int, heads: int, q_len: int, kv_len: int, slice_m: int, density: float,
                     device=None, generator: torch.Generator | None = None) -> SliceMask:
    """Each query block keeps round(density * kv_len) distinct keys drawn uniformly (at least
    one, where there are keys); density >= 1 keeps all. For benchmarks and tuning: random keys
    carry no structure."""
    if not isinstance(density, numbers.Real) or isinstance(density, bool) or not density >= 0:
        raise ValueError(f"density must be a non-negative number, got {density!r}")
    _check_sizes(batch, heads, q_len, kv_len, slice_m)
    if density >= 1.0 or kv_len == 0:
        return SliceMask.full(batch, heads, q_len, kv_len, slice_m, device=device)
    keep = max(1, round(density * kv_len))
    scores = torch.rand(batch, heads, num_blocks(q_len, slice_m), kv_len, generator=generator, device=device)
    topk = torch.topk(scores, keep, dim=-1, sorted=False).indices
    del scores
    return SliceMask.from_topk(topk, slice_m, q_len, kv_len)


def _check_topk(topk: torch.Tensor, kv_len: int) -> None:
    """ValueError for a top-k index outside [0, kv_len) or listed twice in its row (one sync)."""
    topk = topk.long()  # kv_len in a narrow dtype would wrap
    outside = (topk < 0) | (topk >= kv_len)
    ordered = torch.sort(topk, dim=-1).values
    repeated = ordered[..., 1:] == ordered[..., :-1]
    any_outside, any_repeated = torch.stack([outside.any(), repeated.any()]).tolist()
    if any_outside:
        where = tuple(int(i) for i in torch.nonzero(outside)[0])
        raise ValueError(f"top-k index {int(topk[where])} at {where} is outside [0, kv_len={kv_len})")
    if any_repeated:
        where = tuple(int(i) for i in torch.nonzero(repeated)[0])
        raise ValueError(f"top-k index {int(ordered[where])} is listed twice in row {where[:3]}")


def even_indptr(batch: int, heads: int, q_blocks: int, per_row: int, device) -> torch.Tensor:
    """int32 [B, H, QB + 1] of rows that each hold ``per_row`` keys, back to back (no host sync)."""
    flat = torch.arange(batch * heads * q_blocks + 1, dtype=torch.int32, device=device) * per_row
    return indptr_from_offsets(flat, batch, heads, q_blocks)


def indptr_from_offsets(flat: torch.Tensor, batch: int, heads: int, q_blocks: int) -> torch.Tensor:
    """The one indptr builder: flat row offsets [R + 1] (rows back to back, R = B * H * QB) ->
    int32 [B, H, QB + 1], each (b, h) ending where the next begins (no host sync)."""
    starts = flat[:-1].reshape(batch, heads, q_blocks)
    ends = flat[1:].reshape(batch, heads, q_blocks)[..., -1:] if q_blocks else flat[:1].expand(batch, heads, 1)
    return torch.cat([starts, ends], dim=-1).contiguous()


def indptr_from_counts(counts: torch.Tensor, batch: int, heads: int, q_blocks: int) -> torch.Tensor:
    """int32 [B, H, QB + 1] of rows holding ``counts`` (any shape of B * H * QB) keys each, back to
    back from offset 0 (no host sync)."""
    flat = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts.reshape(-1).to(torch.int64), 0, out=flat[1:])
    return indptr_from_offsets(flat.to(torch.int32), batch, heads, q_blocks)
