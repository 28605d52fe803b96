"""Copy-engine exchange for sequence-parallel attention on GPUs of one host.

NCCL's all-to-all runs as kernels: while it moves a head group, it takes SMs from the attention
kernel working on the previous group, so pipelining hides little. Here every rank instead exposes
one buffer to its peers (CUDA IPC) and each rank writes its pieces straight into the peers'
buffers with ``cudaMemcpyAsync`` on side streams (one for inbound, one for outbound copies): the
GPUs' copy engines move the data and no SM is used. A one-element NCCL all-reduce queued behind
the copies is the barrier that tells every rank its inbound copies are complete. Copies issued
while attention runs are slow (~10x on an H100) but finish long before they are needed.

Layout: every region is head-major, ``[B, h, S, D]`` received and ``[B, H, S_r, D]`` returned, so
each copy moves whole rows of one head's ``S_r * D`` elements (megabytes). Token-major ("NHD")
inputs are made head-major by one local copy first, and the output is copied back into q's layout.

Memory: each rank keeps one workspace per process group (its heads' q, k, v over the whole
sequence plus its output shard; about 1.5 GB per rank for wan14b-720p on two GPUs), reused by
every call and grown when a call needs more. ``release(group)``, called on every rank, frees it.
"""

from __future__ import annotations

import hashlib
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

_WORKSPACES: dict = {}  # (id(process group), device) -> PeerWorkspace (which holds the group)


def _group_id(group) -> int:
    """The id of ``group``, None being the default group it stands for now: a default group made
    again after destroy_process_group is another object, so it never finds the old workspace."""
    return id(dist.distributed_c10d._get_default_group() if group is None else group)

#: What each rank tells its peers about its buffer, as raw bytes in a uint8 tensor (never a
#: pickle): the CUDA IPC handle, the buffer's size, a digest of (host name, boot id) and the
#: device's UUID.
_HANDLE_BYTES = 64
_ADVERT = struct.Struct(f"<{_HANDLE_BYTES}sq32s16s")


def host_identity() -> bytes:
    """32 bytes naming this boot of this machine: a digest of the host name and the kernel's
    boot id (a host name alone can repeat across machines)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{socket.gethostname()}|{boot}".encode()).digest()


def device_identity(device: torch.device) -> bytes:
    """16 bytes naming the GPU (its UUID)."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    raw = getattr(uuid, "bytes", None)
    return bytes(raw)[:16] if raw else hashlib.md5(str(uuid).encode()).digest()


def pack_advert(handle: bytes, nbytes: int, host: bytes, device_uuid: bytes) -> torch.Tensor:
    """uint8 tensor of one rank's advertisement (see _ADVERT)."""
    if len(handle) != _HANDLE_BYTES:
        raise ValueError(f"a CUDA IPC handle has {_HANDLE_BYTES} bytes, got {len(handle)}")
    raw = _ADVERT.pack(bytes(handle), int(nbytes), bytes(host)[:32], bytes(device_uuid)[:16])
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def unpack_adverts(rows: list) -> list:
    """[(handle, nbytes, host, device_uuid)] of every rank, checked: one host, distinct devices,
    positive sizes. Every rank sees the same rows, so every rank raises alike."""
    adverts = [_ADVERT.unpack(bytes(row.cpu().numpy().tobytes())) for row in rows]
    hosts = {host for _, _, host, _ in adverts}
    if len(hosts) > 1:
        raise ValueError(f"exchange='copy' needs the GPUs of one host (same boot); the group's ranks are on "
                         f"{len(hosts)} machines")
    devices = [dev for _, _, _, dev in adverts]
    if len(set(devices)) != len(devices):
        raise ValueError("exchange='copy' needs one GPU per rank; two ranks reported the same device")
    if any(n <= 0 for _, n, _, _ in adverts):
        raise ValueError(f"a rank advertised a buffer of {[n for _, n, _, _ in adverts]} bytes")
    return adverts


def check_within(dst: "Rows", ptrs: list, sizes: list) -> None:
    """ValueError unless every row of ``dst`` lies inside one rank's advertised buffer."""
    if dst.width == 0 or dst.height == 0:
        return
    end = dst.ptr + (dst.height - 1) * dst.pitch + dst.width
    for base, size in zip(ptrs, sizes):
        if base <= dst.ptr and end <= base + size:
            return
    raise ValueError(f"a peer copy of {dst.height} rows x {dst.width} bytes at {dst.ptr:#x} falls outside "
                     f"every rank's advertised buffer")


@dataclass(frozen=True)
class Rows:
    """``height`` rows of ``width`` bytes, ``pitch`` bytes apart, from address ``ptr``."""

    ptr: int
    pitch: int
    width: int
    height: int


class PeerWorkspace:
    """A byte buffer on every rank of ``group`` that every rank can write (CUDA IPC), the streams
    the inbound and outbound copies run on and the barrier tensor. Collective: every rank builds
    it in the same call."""

    def __init__(self, group, device: torch.device, nbytes: int):
        import cupy

        runtime = cupy.cuda.runtime
        self.group, self.device, self.nbytes = group, device, nbytes
        rank = dist.get_rank(group)
        with cupy.cuda.Device(device.index):
            # A plain cudaMalloc (not torch's pool): the IPC handle then covers exactly this buffer.
            self._base = runtime.malloc(nbytes)
            # No owner: this object frees the buffer (an owner would make a reference cycle and
            # leave a replaced workspace to the garbage collector).
            memory = cupy.cuda.UnownedMemory(self._base, nbytes, None, device.index)
            array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
            self.local = torch.from_dlpack(array)
            advert = pack_advert(runtime.ipcGetMemHandle(self._base), nbytes, host_identity(),
                                 device_identity(device)).to(device)
            rows = [torch.empty_like(advert) for _ in range(dist.get_world_size(group))]
            dist.all_gather(rows, advert, group=group)
            try:
                adverts = unpack_adverts(rows)
            except ValueError:
                runtime.free(self._base)
                self._base, self._opened = None, []
                raise
            handles = [handle for handle, _, _, _ in adverts]
            self._sizes = [size for _, size, _, _ in adverts]
            # Opened on this rank's own device: its copy engines then write the peers' memory
            # over NVLink (a handle opened on the owner's device index ran at ~33 GB/s, staged).
            # One by one: where a peer's handle fails to open, __del__ closes those opened before
            # it and frees the buffer.
            self._opened = []
            for r, h in enumerate(handles):
                if r != rank:
                    self._opened.append(runtime.ipcOpenMemHandle(h, runtime.cudaIpcMemLazyEnablePeerAccess))
        opened = iter(self._opened)
        self._ptrs = [self._base if r == rank else next(opened) for r in range(len(handles))]
        # Inbound copies run on one stream, outbound on another: an outbound copy waits for its
        # group's attention, and the next groups' inbound copies must not queue behind it.
        self.stream = torch.cuda.Stream(device=device)
        self.out_stream = torch.cuda.Stream(device=device)
        # Each rank's receive bytes of the last call (where its return area began): a call whose
        # receive areas reach further must wait until every rank has copied its output out.
        self.last_recv_bytes: list | None = None
        self._flag = torch.zeros(1, dtype=torch.int32, device=device)

    def __del__(self):
        if getattr(self, "_base", None) is None:
            return
        try:
            import cupy

            with cupy.cuda.Device(self.device.index):
                for ptr in getattr(self, "_opened", ()):  # absent where the build failed before any opened
                    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
                cupy.cuda.runtime.free(self._base)  # synchronises the device first
        except Exception:  # noqa: BLE001 - interpreter shutdown: the driver reclaims it
            pass

    @classmethod
    def get(cls, group, device: torch.device, nbytes: int) -> PeerWorkspace:
        """The cached workspace, rebuilt (collectively) when a call needs more bytes; ``nbytes``
        must be the same on every rank so all rebuild together."""
        key = (_group_id(group), device)
        ws = _WORKSPACES.get(key)
        if ws is None or ws.nbytes < nbytes:
            if ws is not None:
                release(group)  # peers stop using the old buffers before any is freed
            ws = cls(group, device, nbytes)
            _WORKSPACES[key] = ws
        return ws

    def ptr(self, rank: int) -> int:
        """Address of ``rank``'s buffer, valid on this rank's device."""
        return self._ptrs[rank]

    def barrier(self) -> None:
        """On the current stream: returns (to the stream) once every rank's earlier work on its
        stream, copies into this rank's buffer included, is complete."""
        dist.all_reduce(self._flag, group=self.group, async_op=True).wait()

    def copy(self, dst: Rows, src: Rows) -> None:
        """Queue a copy-engine copy on the current stream: one ``cudaMemcpyAsync`` per row
        (rows are long: a head's run of tokens), or one for all rows when both sides are dense."""
        import cupy

        if dst.width != src.width or dst.height != src.height:
            raise ValueError(f"a peer copy needs source and target of one shape, got {src} and {dst}")
        if src.width == 0 or src.height == 0:
            return
        check_within(dst, self._ptrs, self._sizes)
        runtime = cupy.cuda.runtime
        stream = torch.cuda.current_stream(self.device).cuda_stream
        with cupy.cuda.Device(self.device.index):
            if src.pitch == src.width and dst.pitch == dst.width:
                runtime.memcpyAsync(dst.ptr, src.ptr, src.width * src.height, runtime.memcpyDefault, stream)
                return
            for r in range(src.height):
                runtime.memcpyAsync(dst.ptr + r * dst.pitch, src.ptr + r * src.pitch, src.width,
                                    runtime.memcpyDefault, stream)


def release(group=None) -> None:
    """Free this group's workspace on every rank (collective: call it on all ranks, with no
    exchange in flight): peers unmap their views, wait for each other, then each frees its own.
    Views of it handed out earlier (the q, k, v a mask callable received) must not be used after."""
    ws = next((w for key, w in _WORKSPACES.items() if key[0] == _group_id(group)), None)
    if ws is None:
        return
    import cupy

    torch.cuda.synchronize(ws.device)
    with cupy.cuda.Device(ws.device.index):
        for ptr in ws._opened:
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
    ws._opened = []
    dist.barrier(group=group)
    for key in [key for key in _WORKSPACES if key[0] == _group_id(group)]:
        del _WORKSPACES[key]
    del ws  # the last reference: __del__ frees the buffer


class CopyPlan:
    """Addresses of every piece of one call's exchange, computed alike on every rank.

    ``groups[g][j]``: the heads rank j owns in head group g; ``lens[j]``: rank j's tokens.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, lens, groups, itemsize: int):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.lens, self.groups, self.es = list(lens), groups, itemsize
        self.total = sum(self.lens)
        self.starts = [sum(self.lens[:j]) for j in range(len(self.lens))]
        world = len(self.lens)
        owned = [sum(len(g[j]) for g in groups) for j in range(world)]
        self.recv_bytes = [3 * batch * owned[j] * self.total * head_dim * itemsize for j in range(world)]
        self.ret_bytes = [batch * heads * n * head_dim * itemsize for n in self.lens]
        self.nbytes = max(r + t for r, t in zip(self.recv_bytes, self.ret_bytes))

    @staticmethod
    def source(x: torch.Tensor) -> torch.Tensor:
        """``x`` ([B, H, S_r, D] view) if each head's tokens are one dense run, else a head-major copy."""
        dense = x.stride(3) == 1 and (x.stride(2) == x.shape[3] or x.shape[2] <= 1)
        return x if dense else x.contiguous()

    # ---- receive regions: rank j's buffer, group g, tensor t (q, k, v), [B, h, S, D] ----
    def _recv_offset(self, j: int, g: int, t: int) -> int:
        per = self.batch * self.total * self.head_dim
        before = sum(3 * len(self.groups[gg][j]) for gg in range(g))
        return (before + t * len(self.groups[g][j])) * per * self.es

    def recv_views(self, buffer: torch.Tensor, j: int, g: int, dtype) -> list:
        """[B, h, S, D] views of rank j's q, k, v regions of group g."""
        h = len(self.groups[g][j])
        n = self.batch * h * self.total * self.head_dim
        return [buffer[off: off + n * self.es].view(dtype).view(self.batch, h, self.total, self.head_dim)
                for off in (self._recv_offset(j, g, t) for t in range(3))]

    def inbound(self, ws: PeerWorkspace, sources, rank: int, g: int) -> None:
        """Queue this rank's pieces of group g (q, k, v ``sources``) into every rank's buffer."""
        D, es, S, n = self.head_dim, self.es, self.total, self.lens[rank]
        row = n * D * es
        for j, sub in enumerate(self.groups[g]):
            h = len(sub)
            if h == 0 or n == 0:
                continue
            for t, x in enumerate(sources):
                base = ws.ptr(j) + self._recv_offset(j, g, t)
                for b in range(self.batch):
                    first = x.data_ptr() + (b * x.stride(0) + sub.start * x.stride(1)) * es
                    src = Rows(first, x.stride(1) * es, row, h)
                    dst = Rows(base + (b * h * S + self.starts[rank]) * D * es, S * D * es, row, h)
                    ws.copy(dst, src)

    # ---- outputs: rank r's heads of group g over all tokens, back to the token owners ----
    def new_out(self, rank: int, g: int, dtype, device) -> torch.Tensor:
        """[B, h, S, D]: where attention writes group g's output."""
        return torch.empty(self.batch, len(self.groups[g][rank]), self.total, self.head_dim, dtype=dtype,
                           device=device)

    def outbound(self, ws: PeerWorkspace, out_g: torch.Tensor, rank: int, g: int) -> None:
        """Queue group g's output rows of every rank's tokens into that rank's return buffer."""
        D, es, S, H = self.head_dim, self.es, self.total, self.heads
        mine = self.groups[g][rank]
        h = len(mine)
        if h == 0:
            return
        for s, n in enumerate(self.lens):
            if n == 0:
                continue
            base = ws.ptr(s) + self.recv_bytes[s]
            for b in range(self.batch):
                src = Rows(out_g.data_ptr() + (b * h * S + self.starts[s]) * D * es, S * D * es, n * D * es, h)
                dst = Rows(base + (b * H + mine.start) * n * D * es, n * D * es, n * D * es, h)
                ws.copy(dst, src)

    def returned(self, buffer: torch.Tensor, rank: int, dtype) -> torch.Tensor:
        """[B, H, S_r, D]: this rank's return buffer."""
        n = self.lens[rank]
        count = self.batch * self.heads * n * self.head_dim
        off = self.recv_bytes[rank]
        return buffer[off: off + count * self.es].view(dtype).view(self.batch, self.heads, n, self.head_dim)
