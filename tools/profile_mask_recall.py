"""What the refresh_on_missed_mass reading costs per layer and step (GPU): ``fgcupy.cache.mask_recall``
at wan14b-480p sizes (40 heads of 128, q and k as the diffusers integration hands them), beside
the same reading formed from float32 copies of q and k (its reference, and the earlier way):

    python -m tools.profile_mask_recall
"""

import torch

from fgcupy.cache import RECALL_SAMPLES, mask_recall
from fgcupy.timing import cuda_time_ms

HEADS, DIM, SCALE = 40, 128, 128 ** -0.5


def float32_recall(q, k, lse, scale, samples=RECALL_SAMPLES):
    """mask_recall with every product in float32 (one float32 copy of the keys per chunk of heads)."""
    batch, heads, q_len, _ = q.shape
    rows = torch.linspace(0, q_len - 1, min(samples, q_len), device=q.device).round().long()
    exact = torch.empty(batch, heads, rows.numel(), dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 26) // (batch * k.shape[2] * (rows.numel() + k.shape[3])))
    for h0 in range(0, heads, chunk):
        h1 = min(heads, h0 + chunk)
        logits = torch.matmul(q[:, h0:h1, rows].float(), k[:, h0:h1].float().transpose(-1, -2)) * scale
        exact[:, h0:h1] = torch.logsumexp(logits, dim=-1)
    return torch.exp(lse[:, :, rows].float() - exact).nan_to_num(0.0).mean(-1)


def main() -> None:
    print(torch.cuda.get_device_name(), "| torch", torch.__version__)
    for seq in (32_760, 75_600):
        q, k = (torch.randn(1, seq, HEADS, DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        lse = torch.randn(1, HEADS, seq, device="cuda") + 12
        got, want = mask_recall(q, k, lse, SCALE), float32_recall(q, k, lse, SCALE)
        print(f"{seq} tokens: max |mask_recall - float32| {float((got - want).abs().max()):.2e}")
        for name, fn in (("mask_recall", lambda: mask_recall(q, k, lse, SCALE)),
                         ("float32 copies", lambda: float32_recall(q, k, lse, SCALE))):
            print(f"  {name}: {cuda_time_ms(fn, warmup=3, reps=20)['median_ms']:.3f} ms (median of 20)")


if __name__ == "__main__":
    main()
