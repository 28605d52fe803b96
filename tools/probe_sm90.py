"""Which PV mode of the wgmma kernel computes the right answer on this GPU (one line each)."""

import torch

from fgcupy import SparseAttention, reference_attention, relative_l2
from fgcupy.jit import Sm90AttentionSpec
from tests.test_attention_gpu import random_mask, random_qkv

for pv in (0, 1):
    for d, m, n in ((128, 128, 64), (64, 64, 128), (128, 64, 128)):
        spec = Sm90AttentionSpec("bfloat16", d, m, n, 2, pv)
        gen = torch.Generator().manual_seed(0)
        q, k, v = random_qkv(gen, 1, 2, 700, 900, d, torch.bfloat16, "HND")
        mask = random_mask(gen, 1, 2, 700, 900, m)
        try:
            out = SparseAttention().plan(mask, head_dim=d, dtype=torch.bfloat16, spec=spec).run(q, k, v)
            torch.cuda.synchronize()
            ref, _ = reference_attention(q, k, v, mask)
            print(f"{spec.name}: relative L2 {relative_l2(out.float(), ref):.2e}", flush=True)
        except Exception as err:  # noqa: BLE001 - report and go on to the next variant
            print(f"{spec.name}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
