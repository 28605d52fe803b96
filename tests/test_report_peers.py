"""bench.report_peers' optional peers: a peer that is not installed is reported, not fatal."""

import pytest

pytest.importorskip("torch")

from bench.report_peers import optional_peer  # noqa: E402


def test_a_peer_that_fails_is_left_out_with_its_reason(capsys):
    def missing():
        raise ModuleNotFoundError("No module named 'flashinfer'")

    assert optional_peer("flashinfer-slices", missing, reps=3) is None  # fails while making the call
    out = capsys.readouterr().out
    assert "flashinfer-slices" in out and "unavailable here (ModuleNotFoundError: No module named 'flashinfer')" in out

    def fails_when_run():
        def call():
            raise RuntimeError("FLASH backend needs flash_attn.cute\nmore lines")
        return call

    assert optional_peer("flex-flash-dense", fails_when_run, reps=3) is None
    assert "unavailable here (RuntimeError: FLASH backend needs flash_attn.cute)" in capsys.readouterr().out



def test_the_block_cover_density_counts_full_blocks():
    """A cover lists its blocks as full ones: they are what FlexAttention computes."""
    import torch

    from bench.report_peers import visited_share
    from fgcupy import SliceMask

    dense = torch.zeros(1, 2, 4, 512, dtype=torch.bool)
    dense[..., :3] = True  # every query block keeps keys of the first key block only
    cover = SliceMask.from_dense(dense, 128, 512).to_block_mask(128, exact=False)
    assert visited_share(cover, 2 * 4 * 4) == 0.25
