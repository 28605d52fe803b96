"""What each pooling costs where it matters: predictions (top-k 0.1) with pooling "mean",
"adaptive", "sample" and "both" (pool 32, band 64) on wan14b-480p (40 heads, 32,760 tokens),
on the video-like "mixed" inputs (coherent blocks) and on head families whose blocks are
incoherent (every block sampled) or not, plus mask_reference.block_coherence (the torch measure
the judge prints; a prediction takes it from fg::adaptive_rows); queued
medians beside SDPA cuDNN in the same run (GPU):

    PYTHONPATH=. python -m tools.profile_poolings
"""

import torch

from fgcupy import mask_reference as ref
from fgcupy import predict_mask
from fgcupy.head_families import family_qkv
from tools.scoring_setup import queued_ms, scoring_setup

POOLINGS = ("mean", "adaptive", "sample", "both")
FAMILIES = ("temporal-strided", "mixture")


def report(name, q, k, dense_ms) -> None:
    sampled = ref.adaptive_rows(q, 32, 128)[1].float().mean().item()
    coherence = queued_ms(lambda: ref.block_coherence(q, 128))
    cells = [f"coherence {coherence:.3f} ms"]
    for pooling in POOLINGS:
        ms = queued_ms(lambda: predict_mask(q, k, 128, "topk", density=0.1, pool=32, exact_band=64, pooling=pooling))
        cells.append(f"{pooling} {ms:.3f} ms = {100 * ms / dense_ms:.1f} %")
    print(f"{name:17s} ({100 * sampled:.0f} % of blocks sampled): " + " | ".join(cells), flush=True)


def main() -> None:
    setup = scoring_setup()
    report("workload-mixed", setup.q, setup.k, setup.dense_ms)
    shape = setup.shape
    del setup.q, setup.k, setup.v
    for family in FAMILIES:
        q, k, _ = family_qkv(shape, family, heads=shape.heads, device="cuda")
        report(family, q, k, setup.dense_ms)
        del q, k
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
