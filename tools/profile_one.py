"""Launch one fgcupy kernel a few times on a wan-like problem (random key lists of a density,
dense by default), for ncu to profile.

    ncu --kernel-name regex:sparse_attn --launch-skip 2 --launch-count 1 python3 -m tools.profile_one sm90-m128n64s2pv1c1 [HEADS [DENSITY]]
"""

import sys

import torch

from bench.cases import fgcupy_call, random_inputs, random_topk_mask
from bench.report_attention import parse_tile

token = sys.argv[1] if len(sys.argv) > 1 else "sm90-m128n64s2pv1c1"
heads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
density = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
spec = parse_tile(token, 128)
q, k, v = random_inputs(1, heads, 32_760, 128)
call = fgcupy_call(q, k, v, random_topk_mask(1, heads, 32_760, 32_760, spec.slice_m, density), spec=spec)
for _ in range(4):
    call()
torch.cuda.synchronize()
