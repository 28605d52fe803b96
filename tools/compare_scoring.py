"""Time an earlier version of the wgmma scoring kernel beside the current one, in one run.

    git show REV:cuda_src/mask_score_sm90.cu > /tmp/old.cu
    PYTHONPATH=. python -m tools.compare_scoring /tmp/old.cu

wan14b-480p (40 heads, "mixed" pattern), SDPA cuDNN in the same run: the column-max pass (every
query, groups of 128, LSE given) and the default's pooled passes (pool 32: stats, then
max-probability over groups of 4); first the largest difference of each output from the
current kernel's, then queued CUDA-event medians, twice in alternation.
"""

import math
import sys

import torch

from bench.cases import sdpa_call
from fgcupy import bridge, mask_kernels
from fgcupy import mask_reference as ref
from fgcupy.jit import source as src
from fgcupy.jit.score_spec import Sm90ScoreSpec
from fgcupy.oracle import exact_lse
from fgcupy.timing import cuda_time_ms
from fgcupy.workloads import SHAPES, video_qkv


class EarlierKernel:
    """The scoring kernel of another source file, launched with the current parameter struct
    (its template takes GROUP, or not if the file predates that)."""

    def __init__(self, path: str, k: torch.Tensor, scale: float):
        import cupy

        self.code = src.kernel_source(Sm90ScoreSpec("bfloat16", k.shape[-1], "stats")).replace(
            src.read_source("mask_score_sm90.cu"), "") + open(path).read()
        self.templated = "int GROUP" in self.code
        self.k, self.scale, self.cupy, self.functions = k, scale, cupy, {}

    def _function(self, mode: str, group: int):
        dim = self.k.shape[-1]
        name = f"fg::mask_score_sm90<fg::bf16_t, {dim}, {1 if mode == 'stats' else 2}"
        name += f", {group if mode == 'maxprob' else 1}>" if self.templated else ">"
        if name not in self.functions:
            module = self.cupy.RawModule(code=self.code, options=src.nvrtc_options() + ("-arch=sm_90a",),
                                         name_expressions=[name])
            function = module.get_function(name)
            function.max_dynamic_shared_size_bytes = Sm90ScoreSpec("bfloat16", dim, "stats").smem_bytes
            self.functions[name] = function
        return self.functions[name]

    def __call__(self, mode: str, rows: torch.Tensor, lse=None, group: int = 1):
        k = self.k
        heads, n_rows, kv_len = rows.shape[1], rows.shape[2], k.shape[2]
        ld = mask_kernels.row_stride(kv_len, 4)
        row_tiles = -(-n_rows // 128)
        key_chunk, chunks = mask_kernels._key_chunking(kv_len, row_tiles * heads, 128)
        out = torch.empty(heads, -(-n_rows // group), ld, dtype=torch.float32, device=k.device) \
            if mode == "maxprob" else None
        partial = torch.empty(heads, n_rows, chunks, dtype=torch.float32, device=k.device) if mode == "stats" else None
        params = mask_kernels._score_params(rows, k, self.scale, out=out, ld=ld, partial=partial, lse=lse, bh0=0,
                                            key_chunk=key_chunk, group=group, out_rows=-(-n_rows // group),
                                            band=(0, 0))
        function = self._function(mode, group)
        with bridge.torch_stream(k.device):
            function((row_tiles, chunks, heads), (256,), (params,), shared_mem=function.max_dynamic_shared_size_bytes)
        return out[..., :kv_len] if mode == "maxprob" else torch.logsumexp(partial, -1)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    shape = SHAPES["wan14b-480p"]
    q, k, v = video_qkv(shape, "mixed", seed=0, device="cuda")
    scale = 1 / math.sqrt(shape.head_dim)
    lse = exact_lse(q, k, scale).reshape(shape.heads, -1)
    pooled = ref.pool_queries(q, 32).to(q.dtype).contiguous()
    flops = 2 * shape.heads * shape.seq * shape.seq * shape.head_dim
    earlier = EarlierKernel(sys.argv[1], k, scale)

    def current(mode, rows, lse=None, group=1):
        out = mask_kernels.gpu_scores(mode, rows, k, scale, lse=lse, group=group, warps=8, kernel="wgmma")
        return out[..., : shape.seq] if mode == "maxprob" else out

    def ms(fn):
        return cuda_time_ms(fn, warmup=2, reps=10, queued=True)["median_ms"]

    print(torch.cuda.get_device_name())
    dense = ms(sdpa_call(q, k, v, "cudnn"))
    print(f"SDPA cuDNN dense: {dense:.3f} ms")
    plse = current("stats", pooled)
    diffs = {"column max": (current("maxprob", q, lse, 128) - earlier("maxprob", q, lse, 128)).abs().max(),
             "pooled stats": (plse - earlier("stats", pooled)).abs().max()}
    for group in (2, 4, 8, 16, 32):
        diffs[f"pooled max-probability, group {group}"] = (
            current("maxprob", pooled, plse, group) - earlier("maxprob", pooled, plse, group)).abs().max()
    print("largest difference from the current kernel: " + ", ".join(f"{n} {float(d):.2e}" for n, d in diffs.items()))
    for rep in range(2):
        for name, run in (("earlier", earlier), ("current", current)):
            column_max = ms(lambda: run("maxprob", q, lse, 128))
            stats = ms(lambda: run("stats", pooled))
            maxprob = ms(lambda: run("maxprob", pooled, plse, 4))
            print(f"[{rep}] {name:8s} column max {column_max:7.3f} ms ({column_max / dense:.3f} x cuDNN, "
                  f"{flops / column_max / 1e9:.0f} TFLOP/s), pool-32 stats {stats:.3f} ms, "
                  f"max-probability {maxprob:.3f} ms")


if __name__ == "__main__":
    main()
