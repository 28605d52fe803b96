"""Mask predictors on attention unlike the repository's generators (small problems): i.i.d.
heads of growing sharpness, sign-split rank-one heads, sink keys, duplicated tokens, rotary
locality whose keys extend the queries by appended tokens, attention within runs of 100 tokens
that slices straddle, a local window beside a global low-rank component, and two sharp segments
that the check's blocks can miss (where a key bias, along the axes or turned, makes other
blocks' queries spread most, or where the segments' queries spread least; where a group of keys
no query attends to varies along a direction the other queries spread along, or where the
segments read a few rare keys softly). For each, the oracle slice mask's error and each
predictor's error over it, at densities 0.1 and 0.3. The default length samples the estimated
LSE's far keys (from 4,096 keys on; below, it counts every key and is exact).

    PYTHONPATH=. python -m tools.probe_foreign_inputs [--seq 8192] [--heads 2] [--slice-m 64]
        [--dim 64] [--device cpu] [--kinds ...]

``--device cuda`` runs the kernels on bfloat16 copies of the inputs (the e4m3 column-max pass
on Hopper at ``--dim 128``); the oracle is judged on those copies.
"""

from __future__ import annotations

import argparse
import math

import torch

from fgcupy import predict_mask
from fgcupy.oracle import Judge

DIM = 64


def _gaussian(gen, heads, q_len, kv_len, logit_std, dim):
    """q, k whose scaled logits q.k / sqrt(D) have standard deviation ``logit_std``."""
    entry = math.sqrt(logit_std)
    return (torch.randn(1, heads, n, dim, generator=gen) * entry for n in (q_len, kv_len))


def _rotary(positions, dim, scale=6.0, base=50.0):
    """Rotary features of constant vectors: logits that depend on the relative position only."""
    freqs = base ** (-torch.arange(dim // 2) / (dim // 2))
    angles = positions[:, None].float() * freqs[None]
    amplitude = scale * dim ** 0.25 / math.sqrt(dim // 2)
    return torch.cat([amplitude * torch.cos(angles), amplitude * torch.sin(angles)], -1)


def inputs(kind: str, heads: int, seq: int, gen: torch.Generator, dim: int = DIM):
    """(q, k) of ``kind``: [1, heads, S, D] float32."""
    if kind.startswith("i.i.d."):
        return tuple(_gaussian(gen, heads, seq, seq, float(kind.split("std ")[1]), dim))
    if kind == "rank one, signs split, std 8":
        u = torch.randn(1, heads, 1, dim, generator=gen)
        u = u / u.norm(dim=-1, keepdim=True)
        a, b = (torch.randn(1, heads, seq, 1, generator=gen) for _ in range(2))
        q, k = a * u, b * u
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(dim)
        gain = math.sqrt(8.0 / float(logits.std()))
        return q * gain, k * gain
    if kind == "4 sink keys (logit ~20) over i.i.d. std 2":
        q, k = _gaussian(gen, heads, seq, seq, 2.0, dim)
        shared = torch.randn(dim, generator=gen)
        shared = shared / shared.norm()
        q = q + 3.0 * shared
        k[:, :, torch.linspace(0, seq - 1, 4).long()] = shared * 20.0 * math.sqrt(dim) / 3.0
        return q, k
    if kind == "tokens repeated 4 times, i.i.d. std 3":
        q, k = _gaussian(gen, heads, seq // 4, seq // 4, 3.0, dim)
        return q.repeat_interleave(4, 2), k.repeat_interleave(4, 2)
    if kind == "rotary locality, 256 keys appended":
        q = _rotary(torch.arange(seq), dim).expand(1, heads, seq, dim)
        k = _rotary(torch.arange(seq + 256), dim).expand(1, heads, seq + 256, dim)
        noise = 0.05
        return (q + noise * torch.randn(q.shape, generator=gen), k + noise * torch.randn(k.shape, generator=gen))
    if kind == "segments of 100 tokens, strength 3.5":
        # Attention within runs of 100 tokens (a frame, a shot), which slices of 64 or 128 straddle:
        # each token is its run's direction plus i.i.d. noise of std 1 per entry.
        directions = torch.randn(1, heads, -(-seq // 100), dim, generator=gen)
        directions = directions / directions.norm(dim=-1, keepdim=True) * 3.5 * dim ** 0.25
        base = directions[:, :, torch.arange(seq) // 100]
        return tuple(base + torch.randn(base.shape, generator=gen) for _ in range(2))
    if kind == "window of 16 tokens + rank-4 component":
        # Half of each token: rotary locality over a window of about 16 tokens; the other half: a
        # global rank-4 component of std 1 that every query shares with every key.
        half, positions = dim // 2, torch.arange(seq).float() / 16.0
        local = _rotary(positions, half, scale=4.0).expand(1, heads, seq, half)
        basis = torch.randn(heads, 4, half, generator=gen)
        basis = basis / basis.norm(dim=-1, keepdim=True) * half ** 0.25
        return tuple(torch.cat([local, (torch.randn(heads, seq, 4, generator=gen) @ basis)[None]], -1)
                     for _ in range(2))
    if kind == "key bias decoys + 2 sharp segments":
        return _key_bias_segments(heads, seq, gen, dim)
    if kind == "key bias decoys + 2 sharp segments, rotated":
        return _rotated(_key_bias_segments(heads, seq, gen, dim), gen)
    if kind == "large-norm keys read by 2 segments' quiet queries":
        return _large_norm_key_segments(heads, seq, gen, dim)
    if kind == "an unread key group varying along a decoy + 2 sharp segments":
        return _unread_group_segments(heads, seq, gen, dim)
    if kind == "512 rare keys read softly by 2 segments":
        return _rare_key_segments(heads, seq, gen, dim)
    raise ValueError(kind)


def _jittered_window(heads, seq, gen, width):
    """q, k [1, heads, seq, width]: a local window (rotary, every 2 tokens), queries jittered by
    0.3, keys by 0.05."""
    local = _rotary(torch.arange(seq).float() / 2.0, width, scale=5.0).expand(1, heads, seq, width)
    return (local + 0.3 * torch.randn(local.shape, generator=gen), local + 0.05 * torch.randn(local.shape, generator=gen))


def _unread_group_segments(heads, seq, gen, dim):
    """A local window, and two 128-token segments of sharp i.i.d. queries (logit std 8); 30 % of
    the keys form a group at -80 along one more direction, which every query reads with a
    positive weight (the others spread over 0.5-10, the segments' constant): the group's logits
    stay low, so no query attends to it, yet keys vary most along that direction and the other
    blocks' queries spread most along it."""
    width = dim - 2
    q_local, k_local = _jittered_window(heads, seq, gen, width)
    hard = _two_segments(seq)
    q_local[:, :, hard] = torch.randn(1, heads, int(hard.sum()), width, generator=gen) * math.sqrt(8.0)
    k_decoy = -80.0 * (torch.rand(1, heads, seq, 1, generator=gen) < 0.3).float()
    q_decoy = torch.where(hard[:, None], 5.25, 0.5 + 9.5 * torch.rand(1, heads, seq, 1, generator=gen))
    return (torch.cat([q_local, q_decoy, torch.zeros_like(q_decoy)], -1),
            torch.cat([k_local, k_decoy, torch.zeros_like(k_decoy)], -1))


def _rare_key_segments(heads, seq, gen, dim):
    """A local window on all but 16 dimensions; on those 16, 512 keys of norm 20 in random
    directions (the rest 0), read by two 128-token segments whose queries are N(0, 1.6) there
    and 0 on the window: soft rows over the rare keys (logit std about 4), from queries that
    differ only along directions few keys vary along."""
    width, rare = dim - 16, 16
    q_local, k_local = _jittered_window(heads, seq, gen, width)
    hard = _two_segments(seq)
    q_local[:, :, hard] = 0.0
    directions = torch.randn(1, heads, 512, rare, generator=gen)
    k_rare = torch.zeros(1, heads, seq, rare)
    k_rare[:, :, torch.randperm(seq, generator=gen)[:512]] = directions / directions.norm(dim=-1, keepdim=True) * 20.0
    q_rare = torch.zeros(1, heads, seq, rare)
    q_rare[:, :, hard] = torch.randn(1, heads, int(hard.sum()), rare, generator=gen) * 1.6
    return torch.cat([q_local, q_rare], -1), torch.cat([k_local, k_rare], -1)


def _rotated(qk: tuple, gen: torch.Generator) -> tuple:
    """q and k turned by one random orthogonal matrix per head: the same logits, with no
    structure along the coordinate axes."""
    q, k = qk
    turn = torch.linalg.qr(torch.randn(q.shape[1], q.shape[3], q.shape[3], generator=gen))[0]
    return q @ turn, k @ turn


def _two_segments(seq: int) -> torch.Tensor:
    """bool [seq]: tokens 896-1023 and 1280-1407, which at 2,048 tokens fall in none of the
    check's evenly spread blocks with slices of 64 or 128."""
    hard = torch.zeros(seq, dtype=torch.bool)
    hard[896:1024] = True
    hard[1280:1408] = True
    return hard


def _key_bias_segments(heads, seq, gen, dim):
    """A local window, and two 128-token segments of sharp i.i.d. queries (logit std 8); every
    key carries a constant component (a key projection's bias), and the other queries vary
    along it (std 20): a shift of each row's logits, which softmax ignores, but which makes
    those blocks' queries spread the most."""
    width = dim - 2
    local = _rotary(torch.arange(seq).float() / 2.0, width, scale=5.0).expand(1, heads, seq, width)
    hard = _two_segments(seq)
    q_local = local.clone()
    q_local[:, :, hard] = torch.randn(1, heads, int(hard.sum()), width, generator=gen) * math.sqrt(8.0)
    k_local = local + 0.05 * torch.randn(local.shape, generator=gen)
    q_bias = torch.randn(1, heads, seq, 1, generator=gen) * 20.0 * (~hard).float()[:, None]
    k_bias = torch.tensor([1.0, 0.0]).expand(1, heads, seq, 2)
    return torch.cat([q_local, q_bias, torch.zeros_like(q_bias)], -1), torch.cat([k_local, k_bias], -1)


def _large_norm_key_segments(heads, seq, gen, dim):
    """A local window on half of each token (queries jittered, std 0.5); on the other half,
    keys of norm 120 in random directions, read only by two 128-token segments whose queries
    there are small (std 0.25) and whose positional half is halved: rows as sharp as the keys
    are strong, from queries that spread less than any other block's."""
    half = dim // 2
    local = _rotary(torch.arange(seq).float() / 4.0, half, scale=4.0).expand(1, heads, seq, half)
    hard = _two_segments(seq)
    k_far = torch.randn(1, heads, seq, half, generator=gen)
    k_far = k_far / k_far.norm(dim=-1, keepdim=True) * 120.0
    q_far = 0.25 * torch.randn(1, heads, seq, half, generator=gen) * hard.float()[:, None]
    k_local = local + 0.05 * torch.randn(local.shape, generator=gen)
    q_local = (local + 0.5 * torch.randn(local.shape, generator=gen)) * torch.where(hard, 0.5, 1.0)[:, None]
    return torch.cat([q_local, q_far], -1), torch.cat([k_local, k_far], -1)


KINDS = ("i.i.d. std 1", "i.i.d. std 3", "i.i.d. std 5", "i.i.d. std 10", "rank one, signs split, std 8",
         "4 sink keys (logit ~20) over i.i.d. std 2", "tokens repeated 4 times, i.i.d. std 3",
         "rotary locality, 256 keys appended", "segments of 100 tokens, strength 3.5",
         "window of 16 tokens + rank-4 component", "key bias decoys + 2 sharp segments",
         "key bias decoys + 2 sharp segments, rotated", "large-norm keys read by 2 segments' quiet queries",
         "an unread key group varying along a decoy + 2 sharp segments", "512 rare keys read softly by 2 segments")


def run_on(device: str) -> tuple:
    """(dtype, name) of a probe's run on ``device``: the float32 reference on the CPU, the
    kernels on bfloat16 copies on a GPU (named as the driver names it)."""
    if device == "cpu":
        return torch.float32, "CPU"
    return torch.bfloat16, torch.cuda.get_device_name(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--slice-m", type=int, default=64)
    parser.add_argument("--dim", type=int, default=DIM)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    dtype, where = run_on(args.device)
    print(f"{where}, {str(dtype).split('.')[1]}, 1 x {args.heads} heads x {args.seq} queries x {args.dim}, slice_m "
          f"{args.slice_m}; error / the oracle slice mask's error (absolute errors in brackets)")
    print("| input | d | oracle error | top-k | colmax, exact LSE | colmax, estimated LSE | auto (the default) |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        gen = torch.Generator().manual_seed(0)
        q, k = inputs(kind, args.heads, args.seq, gen, args.dim)
        v = torch.randn(k.shape, generator=gen)
        q, k, v = (t.to(args.device, dtype) for t in (q, k, v))
        judge = Judge(q, k, v, args.slice_m)
        for density in (0.1, 0.3):
            oracle = judge.oracle_error(density)
            cells = []
            for options in (dict(), dict(method="colmax", lse=judge.lse), dict(method="colmax", lse="estimate"),
                            dict(method="auto")):
                mask = predict_mask(q, k, args.slice_m, options.pop("method", "topk"), density=density, **options)
                error, ratio = judge.ratio(mask)
                cells.append(f"{ratio:.2f} ({error:.3g})")
            print(f"| {kind} | {density} | {oracle:.3g} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
