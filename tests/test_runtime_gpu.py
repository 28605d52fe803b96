"""A new process loads its kernels from fgcupy's disk cache, with no compiler and no cupy (GPU)."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu

CHILD = r"""
import io, json, logging, sys
import torch
log = io.StringIO()
logging.basicConfig(stream=log, level=logging.INFO)
import fgcupy
q, k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
mask = fgcupy.SliceMask.full(1, 2, 300, 300, 64, device="cuda")
out = fgcupy.sparse_attention(q, k, v, mask)
expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
print(json.dumps({"err": fgcupy.relative_l2(out.float(), expected), "log": log.getvalue(),
                  "imported": sorted(m for m in ("cupy", "cuda.bindings") if m in sys.modules),
                  "nvrtc_loaded": sys.modules["fgcupy.jit.nvrtc"]._lib is not None}))
"""


def _run(cache_dir) -> dict:
    env = dict(os.environ, FGCUPY_CACHE_DIR=str(cache_dir))
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_loads_kernels_from_disk_without_a_compiler_or_cupy(tmp_path):
    first, second = _run(tmp_path), _run(tmp_path)
    assert first["err"] < 1e-2 and second["err"] < 1e-2
    assert "from NVRTC" in first["log"], first["log"]
    assert "from the disk cache" in second["log"] and "from NVRTC" not in second["log"], second["log"]
    assert second["imported"] == [] and not second["nvrtc_loaded"], second
    assert list((tmp_path / "kernels").glob("*.cubin"))
