"""The stats pass with skipped keys (``gpu_scores(..., skip=(ranges, block))``): each block of
rows leaves its range of keys out of its LSE, on the wgmma kernel and the mma.sync one, against
torch on fresh inputs (GPU); bad ranges are refused (CPU)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fgcupy import mask_kernels
from fgcupy.mask import num_blocks

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DEVICE = "cuda"


def _expected(q, k, scale, ranges, block):
    """float32 [B * H, R]: each row's LSE over its keys less its block's range."""
    logits = (q.double() @ k.double().transpose(-1, -2) * scale).flatten(0, 1)
    cols = torch.arange(k.shape[2], device=q.device)
    row_range = ranges.long()[torch.arange(q.shape[2], device=q.device) // block]
    skipped = (cols >= row_range[:, :1]) & (cols < row_range[:, 1:])
    return torch.logsumexp(logits.masked_fill(skipped, -math.inf), -1).float()


@pytest.mark.gpu
@needs_gpu
@given(seed=st.integers(0, 2**31 - 1), heads=st.integers(1, 3), q_len=st.integers(1, 700),
       kv_len=st.one_of(st.integers(1, 300), st.integers(300, 3000)), block=st.sampled_from([64, 128]),
       dim=st.sampled_from([64, 128]), dtype=st.sampled_from([torch.bfloat16, torch.float16]),
       kernel=st.sampled_from(["auto", "mma"]), data=st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_stats_leave_each_blocks_range_out(seed, heads, q_len, kv_len, block, dim, dtype, kernel, data):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, n, dim, generator=gen).to(DEVICE, dtype) for n in (q_len, kv_len))
    blocks = num_blocks(q_len, block)
    # Ranges anywhere in the keys: empty, whole, partial, one block's covering every key.
    first = torch.randint(0, kv_len + 1, (blocks,), generator=gen)
    end = torch.minimum(first + torch.randint(0, kv_len + 1, (blocks,), generator=gen), torch.tensor(kv_len))
    if data.draw(st.booleans(), label="one block skips every key"):
        first[0], end[0] = 0, kv_len
    ranges = torch.stack([first, end], 1).to(DEVICE, torch.int32)
    scale = dim**-0.5
    warps = data.draw(st.sampled_from([4, 8]), label="warps") if kernel == "mma" else 8
    got = mask_kernels.gpu_scores("stats", q, k, scale, warps=warps, kernel=kernel, skip=(ranges, block))
    want = _expected(q, k, scale, ranges, block)
    assert torch.equal(got.isneginf(), want.isneginf())  # a row with every key skipped has no mass
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=2e-3)


def test_bad_skips_are_refused():
    """200 rows in blocks of 128: two ranges."""
    check = mask_kernels._checked_skip
    cpu = torch.device("cpu")
    ok = torch.zeros(2, 2, dtype=torch.int32)
    for skip, match in (((ok, 100), "multiple of 16"), ((ok, True), "multiple of 16"), ((ok, 0), "multiple of 16"),
                        ((ok.long(), 128), "int32"), ((ok[:1], 128), r"int32 \[2, 2\]"),
                        ((ok, 64), r"int32 \[4, 2\]"), (([[0, 1], [0, 1]], 128), "int32")):
        with pytest.raises(ValueError, match=match):
            check(skip, "stats", None, 200, cpu)
    with pytest.raises(ValueError, match=r"int32 \[2, 2\] on cuda"):
        check((ok, 128), "stats", None, 200, torch.device("cuda"))
    for mode, band in (("maxprob", None), ("logits", None), ("stats", (-64, 256))):
        with pytest.raises(ValueError, match="skip applies to mode 'stats' without a band"):
            check((ok, 128), mode, band, 200, cpu)


def test_ranges_reach_the_kernel_aligned_and_contiguous():
    """The kernel reads each range as an 8-byte pair: an int32 view starting at an odd element
    is copied, and a strided one made contiguous."""
    buffer = torch.arange(9, dtype=torch.int32)
    odd = buffer[1:].view(4, 2)
    ranges, block = mask_kernels._checked_skip((odd, 64), "stats", None, 256, torch.device("cpu"))
    assert ranges.data_ptr() % 8 == 0 and torch.equal(ranges, odd) and block == 64
    strided = torch.arange(16, dtype=torch.int32).view(2, 8)[:, ::4]
    ranges, _ = mask_kernels._checked_skip((strided, 128), "stats", None, 200, torch.device("cpu"))
    assert ranges.is_contiguous() and torch.equal(ranges, strided)
