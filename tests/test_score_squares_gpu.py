"""The stats pass's LSE of twice the logits (``gpu_scores("stats", ..., squares=True)``): each
row's log sum_j exp(2 s_j) beside its LSE from one pass, on the mma.sync kernel and the default
(the wgmma kernel on Hopper), against float64 torch (GPU); the host side up to the launch and
the refusal of squares with another mode (CPU)."""

import math
from unittest import mock

import pytest
import torch

from fgcupy import mask_kernels
from fgcupy import mask_reference as ref
from fgcupy.mask import num_blocks

DEVICE = "cuda"
#: (kernel, warps): the mma.sync kernel at both CTA sizes, and the default (wgmma on Hopper).
KERNELS = [("mma", 4), ("mma", 8), ("auto", 8)]
DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _expected(q, k, scale):
    """float64 [B * H, R] each: every row's LSE of its logits and of twice them (NaN: no mass)."""
    logits = (q.double() @ k.double().transpose(-1, -2) * scale).flatten(0, 1)
    return ref.nan_free_logsumexp(logits), ref.nan_free_logsumexp(2 * logits)


def _chunks(q, k, kernel, warps) -> int:
    """Key chunks of the launch (gpu_scores' choice)."""
    batch, heads, q_len, dim = q.shape
    spec = mask_kernels.scores_spec("stats", DTYPES[q.dtype], dim, warps=warps, device=q.device, kernel=kernel)
    return mask_kernels._key_chunking(k.shape[2], num_blocks(q_len, spec.rows_per_cta) * batch * heads,
                                      spec.key_tile)[1]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, warps", KERNELS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("dim", [64, 128])
def test_stats_give_the_lse_of_twice_the_logits(dim, dtype, kernel, warps):
    gen = torch.Generator().manual_seed(dim)
    scale = dim**-0.5
    chunks = set()
    # Keys: one, one 64-key tile, counts no tile divides, up to dozens of key chunks.
    for batch, heads, q_len, kv_len in ((1, 2, 77, 1), (1, 1, 130, 64), (2, 2, 200, 301), (1, 1, 33, 3001),
                                        (1, 3, 513, 1000)):
        # Logits of standard deviation 2: rows from flat to sharp.
        q, k = (torch.randn(batch, heads, n, dim, generator=gen).mul(2**0.5).to(DEVICE, dtype) for n in (q_len, kv_len))
        lse, twice = mask_kernels.gpu_scores("stats", q, k, scale, warps=warps, kernel=kernel, squares=True)
        want, want_twice = _expected(q, k, scale)
        assert lse.dtype == twice.dtype == torch.float32 and lse.shape == twice.shape == (batch * heads, q_len)
        torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=2e-4)
        torch.testing.assert_close(twice.double(), want_twice, rtol=1e-5, atol=4e-4)
        # sum_j p_j^2, what callers take from the two
        torch.testing.assert_close((twice.double() - 2 * lse.double()).exp(), (want_twice - 2 * want).exp(),
                                   rtol=1e-3, atol=0)
        # the squares leave the LSE as the plain pass gives it
        assert torch.equal(lse, mask_kernels.gpu_scores("stats", q, k, scale, warps=warps, kernel=kernel))
        chunks.add(_chunks(q, k, kernel, warps) > 1)
    assert chunks == {False, True}  # one key chunk and several


@pytest.mark.gpu
@pytest.mark.parametrize("kernel, warps", KERNELS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_a_nan_key_adds_no_mass_to_either_lse(dtype, kernel, warps):
    """NaN keys (in a first and a last, partial tile) add nothing; a NaN query's row has no mass
    (-inf) and a row with +inf logits gets +inf, as the LSE does."""
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, n, 128, generator=gen).to(DEVICE, dtype) for n in (200, 700))
    k[0, 0, 3] = math.nan
    k[0, 1, 650] = math.nan
    q[0, 1, 9] = math.nan
    q[0, 0, 17, 5] = math.inf
    scale = 128**-0.5
    lse, twice = mask_kernels.gpu_scores("stats", q, k, scale, warps=warps, kernel=kernel, squares=True)
    want, want_twice = _expected(q, k, scale)
    assert twice[1, 9] == -math.inf and twice[0, 17] == math.inf
    torch.testing.assert_close(lse.double(), want, rtol=1e-5, atol=2e-4)
    torch.testing.assert_close(twice.double(), want_twice, rtol=1e-5, atol=4e-4)


def test_squares_pass_a_second_partial_whose_chunks_combine():
    """On CPU tensors up to the launch: squares hands the kernel partial_sq beside partial (None
    without squares), and each row's chunks of both combine by logsumexp."""
    q = torch.zeros(1, 2, 100, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 1000, 64, dtype=torch.bfloat16)
    params, launch = mock.Mock(return_value="params"), mock.Mock()

    def fill(*_):
        for name, factor in (("partial", 1.0), ("partial_sq", 2.0)):
            out = params.call_args.kwargs[name]
            if out is not None:
                out.copy_(torch.linspace(-3, 3, out.numel()).view_as(out) * factor)

    launch.side_effect = fill
    with mock.patch.object(mask_kernels, "_score_params", params), mock.patch.object(mask_kernels, "launch", launch):
        lse, twice = mask_kernels.gpu_scores("stats", q, k, 0.1, kernel="mma", squares=True)
        partial, partial_sq = params.call_args.kwargs["partial"], params.call_args.kwargs["partial_sq"]
        assert partial_sq.shape == partial.shape and partial.shape[-1] > 1  # several key chunks
        assert torch.equal(lse, torch.logsumexp(partial, -1)) and torch.equal(twice, torch.logsumexp(partial_sq, -1))
        plain = mask_kernels.gpu_scores("stats", q, k, 0.1, kernel="mma")
        assert params.call_args.kwargs["partial_sq"] is None and torch.equal(plain, lse)


@pytest.mark.parametrize("mode", ["logits", "logits_f16", "maxprob"])
def test_squares_with_another_mode_are_refused(mode):
    q = torch.zeros(1, 1, 16, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"squares applies to mode 'stats', got mode '{mode}'"):
        mask_kernels.gpu_scores(mode, q, q, 0.1, lse=torch.zeros(1, 16), squares=True)
