"""A rank that never joins cannot hang the others: on gloo every wait (collectives and
point-to-point receives) is bounded by FGCUPY_COLLECTIVE_TIMEOUT_S. Its own two-process spawn, since a timed-out collective leaves
the process group unusable (as on NCCL)."""

import datetime
import json
import os
import tempfile
import time

import torch
import torch.distributed as dist

from fgcupy.distributed import SequenceParallelAttention
from fgcupy.sp_handshake import _wait
from tests.dist_harness import free_port


def _worker(rank, port, path, what="attention"):
    os.environ["FGCUPY_COLLECTIVE_TIMEOUT_S"] = "2"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    verdict = {}
    if rank == 0:
        q = torch.randn(1, 2, 16, 8)
        started = time.monotonic()
        try:
            if what == "attention":
                SequenceParallelAttention(compute="reference")(q, q, q)
            else:  # a point-to-point exchange's receive (gloo's works of those cannot be polled)
                _wait(dist.irecv(q, 1), None, pollable=False)
            verdict = dict(error=None)
        except Exception as err:  # noqa: BLE001 - the verdict goes to the parent
            verdict = dict(error=type(err).__name__, message=str(err))
        verdict["seconds"] = time.monotonic() - started
    else:
        time.sleep(8)  # this rank never calls
    with open(f"{path}.{rank}", "w") as f:
        json.dump(verdict, f)
    os._exit(0)  # no teardown: the group is broken by design


def _run(what):
    path = tempfile.mktemp(prefix="fgcupy-timeout-")
    ctx = torch.multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, path, what)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert not p.is_alive(), "a rank hung"
    with open(f"{path}.0") as f:
        return json.load(f)


def test_a_rank_that_never_calls_makes_the_others_time_out():
    verdict = _run("attention")
    assert verdict["error"] == "TimeoutError", verdict
    assert "did not finish within 2 s" in verdict["message"]
    assert verdict["seconds"] < 30


def test_a_point_to_point_receive_times_out_too():
    """As the same TimeoutError, naming its cause (gloo's own RuntimeError had come through)."""
    verdict = _run("p2p")
    assert verdict["error"] == "TimeoutError" and "did not finish within 2 s" in verdict["message"], verdict
    assert verdict["seconds"] < 6


def test_the_timeout_must_be_a_wait_gloo_can_take(monkeypatch):
    import pytest

    from fgcupy.sp_handshake import collective_timeout

    for raw in ("inf", "1e300", "0", "-3", "nan", "0.0004"):  # under 1 ms: gloo's 0 ms, no timeout at all
        monkeypatch.setenv("FGCUPY_COLLECTIVE_TIMEOUT_S", raw)
        with pytest.raises(ValueError, match="must be a number of seconds from 0.001 up to"):
            collective_timeout()
    monkeypatch.setenv("FGCUPY_COLLECTIVE_TIMEOUT_S", "3600")
    assert collective_timeout().total_seconds() == 3600
    monkeypatch.setenv("FGCUPY_COLLECTIVE_TIMEOUT_S", "0.001")
    assert collective_timeout().total_seconds() == 0.001
