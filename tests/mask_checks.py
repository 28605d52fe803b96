"""Independent checks of mask selections, shared by the CPU and GPU tests."""

import math

import numpy as np
import torch
from hypothesis import strategies as st

from fgcupy.mask_reference import TAU_SLACK, order_keys

KINDS = ("gauss", "ties", "equal", "narrow", "special", "probs")


def score_rows(kind: str, rows: int, kv_len: int, seed: int) -> torch.Tensor:
    """float32 [rows, kv_len] scores of a kind that stresses selection (ties, NaN, +-inf, -0)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":
        return torch.randint(-3, 3, (rows, kv_len), generator=gen).float()
    if kind == "equal":
        return torch.full((rows, kv_len), 0.25)
    if kind == "narrow":
        return 1.0 + torch.rand(rows, kv_len, generator=gen) * 1e-5
    if kind == "probs":
        return torch.rand(rows, kv_len, generator=gen) ** 6
    values = torch.randn(rows, kv_len, generator=gen) * 4
    if kind == "special":
        pick = torch.randint(0, 8, (rows, kv_len), generator=gen)
        for code, value in ((0, math.nan), (1, math.inf), (2, -math.inf), (3, -0.0), (4, 0.0), (5, 1e-40)):
            values[pick == code] = value
    return values


@st.composite
def selection_cases(draw, max_kv=300):
    """A score matrix, whether it holds logits (with a row lse), a rule and its options."""
    kind = draw(st.sampled_from(KINDS))
    rows, kv_len = draw(st.integers(1, 3)), draw(st.integers(1, max_kv))
    values = score_rows(kind, rows, kv_len, draw(st.integers(0, 2**31 - 1)))
    logits = kind in ("gauss", "ties", "equal", "narrow") and draw(st.booleans())
    rule = draw(st.sampled_from(["topk", "threshold"] + (["tau"] if kind != "special" else [])))
    opts = {}
    if rule == "topk":
        opts["k"] = draw(st.integers(0, kv_len))
    elif rule == "tau":
        opts["tau"] = draw(st.sampled_from([0.2, 0.5, 0.9, 0.999, 1.0]))
    else:
        opts["threshold"] = draw(st.sampled_from([1e-4, 0.01, 0.5 / kv_len, 0.3]))
    slice_m = draw(st.sampled_from([1, 4, 16]))
    local = draw(st.one_of(st.none(), st.integers(0, 8)))
    band_width = min(slice_m + 2 * local, kv_len) if local is not None else 0
    opts["min_keys"] = draw(st.sampled_from([0, 0, 3, kv_len]))
    if draw(st.booleans()):
        opts["max_keys"] = max(1, opts["min_keys"], band_width, draw(st.integers(1, kv_len)))
    return dict(values=values, lse=torch.logsumexp(values, -1) if logits else None, rule=rule, opts=opts,
                slice_m=slice_m, local=local)


def ranked(values_row, band_row) -> list:
    """Key indices of one row in selection order, by plain Python sorting (band, score, index)."""
    vals = values_row.tolist()

    def key(i):
        v = vals[i]
        return (0 if band_row[i] else 1, 1 if math.isnan(v) else 0, 0.0 if math.isnan(v) else -v, i)

    return sorted(range(len(vals)), key=key)


def masses(values, lse):
    """float64 mass of every key (NaN -> 0)."""
    if lse is not None:
        mass = torch.exp(values.double() - lse.double().unsqueeze(-1))
    else:
        mass = values.double().clamp_min(0.0)
    return torch.nan_to_num(mass, nan=0.0)


def smallest_tau_set_ok(values, kept, tau, lse=None, band=None, rel=TAU_SLACK * 4) -> torch.Tensor:
    """bool per row: ``kept`` holds >= tau of the row's mass (up to ``rel``) and, without its
    lowest-ranked non-band key, it would not: the smallest non-empty set reaching tau."""
    values = values.float().reshape(-1, values.shape[-1])
    kept = kept.reshape(values.shape)
    mass = masses(values, lse.reshape(-1) if lse is not None else None)
    total, held = mass.sum(1), (mass * kept).sum(1)
    band = torch.zeros_like(kept) if band is None else band.expand(kept.shape).to(kept.device)
    free = kept & ~band
    big = 2**40
    keys = torch.where(free, order_keys(values), torch.full(values.shape, big, dtype=torch.int64, device=values.device))
    lowest = keys.argmin(1)
    has_free = keys.min(1).values < big
    lowest_mass = torch.where(has_free, mass.gather(1, lowest[:, None])[:, 0], torch.zeros_like(total))
    enough = held >= tau * total * (1 - rel)
    # At least one key is kept (tau > 0), even when the row has no mass at all.
    minimal = ~has_free | (kept.sum(1) <= 1) | (held - lowest_mass < tau * total * (1 + rel))
    return enough & minimal


def is_prefix_of_ranking(values, kept, band=None) -> torch.Tensor:
    """bool per row: every kept key outranks every dropped key (band, score, index order)."""
    values = values.float().reshape(-1, values.shape[-1])
    kept = kept.reshape(values.shape)
    band = torch.zeros_like(kept) if band is None else band.expand(kept.shape).to(kept.device)
    ok = []
    for r in range(values.shape[0]):
        order = ranked(values[r].cpu(), band[r].cpu().tolist())
        flags = kept[r].cpu()[order]
        n = int(flags.sum())
        ok.append(bool(flags[:n].all()))
    return torch.tensor(ok)


def float32(x: float) -> float:
    return float(np.float32(x))


def tau_rows_agree(values, got, expected, tau, lse=None, band=None, rel=TAU_SLACK) -> torch.Tensor:
    """bool per row: ``got`` equals ``expected``, or both are prefixes of the ranking one key
    apart and the shorter prefix's mass is within ``rel`` of the tau target, so float32 sums
    may fairly land on either side of it."""
    values = values.float().reshape(-1, values.shape[-1]).cpu()
    got, expected = got.reshape(values.shape).cpu(), expected.reshape(values.shape).cpu()
    band = torch.zeros_like(got) if band is None else band.expand(got.shape).reshape(got.shape).cpu()
    mass = masses(values, None if lse is None else lse.reshape(-1).cpu())
    ok = []
    for r in range(values.shape[0]):
        if torch.equal(got[r], expected[r]):
            ok.append(True)
            continue
        order = ranked(values[r], band[r].tolist())
        n_got, n_exp = int(got[r].sum()), int(expected[r].sum())
        prefixes = bool(got[r][order][:n_got].all()) and bool(expected[r][order][:n_exp].all())
        shorter = min(n_got, n_exp)
        held = float(mass[r][order][:shorter].sum())
        target = tau * float(mass[r].sum()) * (1 - TAU_SLACK)
        ok.append(prefixes and abs(n_got - n_exp) == 1 and abs(held - target) <= rel * max(target, 1e-300))
    return torch.tensor(ok)
