"""Two ranks on one host: the bandwidth of a copy into the peer's IPC buffer (fgcupy.peer_copy)
and the cost of its barrier, with CUDA events.

    PYTHONPATH=$PWD python3 -m tools.probe_peer_copy
"""

import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fgcupy.peer_copy import PeerWorkspace, Rows


def worker(rank, world, port):
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=2), device_id=torch.device("cuda", rank))
    device = torch.device("cuda", rank)
    nbytes = 512 << 20
    ws = PeerWorkspace.get(None, device, 2 * nbytes)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    peer = (rank + 1) % world
    if rank == 0:
        import cupy

        with cupy.cuda.Device(rank):
            try:
                cupy.cuda.runtime.deviceEnablePeerAccess(peer)
                print("peer access was off: enabled now", flush=True)
            except cupy.cuda.runtime.CUDARuntimeError as err:
                print("peer access:", err, flush=True)

    def timed(label, fn, reps=5):
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(ws.stream):
            start.record()
            for _ in range(reps):
                fn()
            stop.record()
        stop.synchronize()
        ms = start.elapsed_time(stop) / reps
        if rank == 0:
            print(f"{label}: {ms:.3f} ms", flush=True)
        return ms

    with torch.cuda.stream(ws.stream):
        ms = timed("copy 512 MiB to the peer", lambda: ws.copy(Rows(ws.ptr(peer), nbytes, nbytes, 1),
                                                               Rows(src.data_ptr(), nbytes, nbytes, 1)))
        if rank == 0:
            print(f"  {nbytes / ms / 1e6:.1f} GB/s", flush=True)
        timed("copy 512 MiB to itself", lambda: ws.copy(Rows(ws.ptr(rank), nbytes, nbytes, 1),
                                                        Rows(src.data_ptr(), nbytes, nbytes, 1)))
        timed("barrier", ws.barrier, reps=20)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(2, 29555 + os.getpid() % 1000), nprocs=2)
