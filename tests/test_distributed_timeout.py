"""A rank that never joins cannot hang the others: on gloo every wait on a collective is bounded
by FGCUPY_COLLECTIVE_TIMEOUT_S. Its own two-process spawn, since a timed-out collective leaves
the process group unusable (as on NCCL)."""

import datetime
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from fgcupy.distributed import SequenceParallelAttention
from tests.dist_harness import free_port


def _worker(rank, port, path):
    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "2"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    verdict = {}
    if rank == 0:
        q = torch.randn(1, 2, 16, 8)
        started = time.monotonic()
        try:
            SequenceParallelAttention(compute="reference")(q, q, q)
            verdict = dict(error=None)
        except Exception as err:  # noqa: BLE001 - the verdict goes to the parent
            verdict = dict(error=type(err).__name__, message=str(err))
        verdict["seconds"] = time.monotonic() - started
    else:
        time.sleep(8)  # this rank never calls
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    os._exit(0)  # no teardown: the group is broken by design


def test_a_rank_that_never_calls_makes_the_others_time_out():
    path = tempfile.mktemp(prefix="fgcupy-timeout-")
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, path)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert not p.is_alive(), "a rank hung"
    with open(f"{path}.0") as f:
        verdict = json.load(f)
    assert verdict["error"] == "TimeoutError", verdict
    assert "did not finish within 2 s" in verdict["message"]
    assert verdict["seconds"] < 30
