"""A/B on Hopper: the pooled max-probability pass storing float16 natural-log probabilities
instead of float32 probabilities, and the selection reading either row format.

    PYTHONPATH=. python -m tools.ab_log_scores

wan14b-480p (40 heads, "mixed" pattern), SDPA cuDNN and the cheap top-k prediction in the same run,
queued CUDA-event medians. The float16 variant is the current wgmma scoring source with its
max-probability store replaced (built here, launched through tools.compare_scoring); its rows
are not read back (their layout differs), the selection is timed on the float32 scores rounded
to float16 log-probabilities (logit rows with an LSE of zero), and on how many rows the two
selections keep the same keys.
"""

import math
import tempfile

import torch

from fgcupy import mask_kernels, predict_mask
from fgcupy.jit import source as src
from fgcupy.mask_request import make_request
from tools.compare_scoring import EarlierKernel
from tools.scoring_setup import queued_ms, scoring_setup

FLOAT32_STORE = """                const float m = fast_exp2(run[i]);
                if (band) dst[8 * i] = fmaxf(dst[8 * i], m);
                else __stcs(dst + 8 * i, m);  // streamed: keep L2 for the key tiles other CTAs read"""
FLOAT16_LOG_STORE = """                if (band) dst[8 * i] = fmaxf(dst[8 * i], fast_exp2(run[i]));
                else {
                  unsigned short h;
                  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(run[i] * FG_LN2));
                  unsigned short* d16 = reinterpret_cast<unsigned short*>(out) + (dst - out) + 8 * i;
                  asm volatile("st.global.cs.u16 [%0], %1;" :: "l"(d16), "h"(h));
                }"""


def log_store_source() -> str:
    """The current wgmma scoring source with the max-probability pass storing float16
    natural-log probabilities (half the bytes of float32 probabilities)."""
    code = src.read_source("mask_score_sm90.cu")
    if FLOAT32_STORE not in code:
        raise SystemExit("mask_score_sm90.cu's max-probability store changed; update FLOAT32_STORE")
    return code.replace(FLOAT32_STORE, FLOAT16_LOG_STORE)


def main():
    setup = scoring_setup()
    q, k, scale, pooled, plse, dense = setup.q, setup.k, setup.scale, setup.pooled, setup.pooled_lse, setup.dense_ms
    heads, seq, dim = setup.shape.heads, setup.shape.seq, setup.shape.head_dim
    ms = queued_ms
    with tempfile.NamedTemporaryFile("w", suffix=".cu") as variant_file:
        variant_file.write(log_store_source())
        variant_file.flush()
        variant = EarlierKernel(variant_file.name, k, scale)

        def current():
            return mask_kernels.gpu_scores("maxprob", pooled, k, scale, lse=plse, group=4, warps=8, kernel="wgmma")

        probs = current()
        for rep in range(3):
            print(f"[{rep}] max-probability pass: float32 probabilities {ms(current):.3f} ms, float16 "
                  f"log-probabilities {ms(lambda: variant('maxprob', pooled, plse, 4)):.3f} ms", flush=True)
    blocks = probs.shape[1]
    logs = torch.full((heads, blocks, mask_kernels.row_stride(seq, 2)), -math.inf, dtype=torch.float16, device="cuda")
    logs[..., :seq] = torch.log(probs[..., :seq]).to(torch.float16)
    zero_lse = torch.zeros(heads, blocks, device="cuda")
    for density in (0.1, 0.3):
        req = make_request(dim, seq, 128, "topk", density=density)
        offsets = torch.arange(heads * blocks, device="cuda", dtype=torch.int32) * req.top_k
        kept32, kept16 = (torch.empty(heads * blocks * req.top_k, dtype=torch.int32, device="cuda") for _ in range(2))

        def select32():
            mask_kernels.gpu_select(probs, seq, req, offsets=offsets, out=kept32)

        def select16():
            mask_kernels.gpu_select(logs, seq, req, lse=zero_lse, offsets=offsets, out=kept16)

        select32()
        select16()
        same = (kept32.view(heads * blocks, -1) == kept16.view(heads * blocks, -1)).all(1).float().mean().item()
        for rep in range(2):
            print(f"d={density} [{rep}] selection: float32 probabilities {ms(select32):.3f} ms, float16 "
                  f"log-probabilities {ms(select16):.3f} ms (rows keeping the same keys: {same:.3f})", flush=True)
    for density in (0.1, 0.3):
        t = ms(lambda: predict_mask(q, k, 128, "topk", density=density))
        print(f"default prediction, d={density}: {t:.3f} ms = {100 * t / dense:.2f} % of cuDNN dense")


if __name__ == "__main__":
    main()
