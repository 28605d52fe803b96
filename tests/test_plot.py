"""Mask pictures (matplotlib): the binned image and the PNG."""

import pytest
import torch

from fgcupy import SliceMask
from fgcupy.plot import block_density, draw_masks, image_extent, mask_image

pytest.importorskip("matplotlib")


def _mask():
    dense = torch.zeros(1, 2, 4, 300, dtype=torch.bool)
    dense[0, 0, 0, :10] = True
    dense[0, 1, 3, 290:] = True
    return SliceMask.from_dense(dense, 64, 256)


def test_mask_image_bins_keys_into_kept_fractions():
    image = mask_image(_mask(), head=0, max_columns=30)
    assert image.shape == (4, 30)
    assert image[0, 0] == 1.0 and image[0, 1:].sum() == 0 and image[1:].sum() == 0
    image = mask_image(_mask(), head=1, max_columns=300)
    assert image[3, 290:].all() and image.sum() == 10
    with pytest.raises(ValueError, match=r"\(batch, head\) must index the mask's \(1, 2\), got \(0, 2\)"):
        mask_image(_mask(), head=2)


@pytest.mark.parametrize("args, error, match", [
    (("x",), TypeError, "mask must be a fgcupy.SliceMask, got str"),
    ((None, 0, 1.5), TypeError, "head must be an int, got 1.5"),
    ((None, 0, True), TypeError, "head must be an int, got True"),
    ((None, 0, 0, 10.5), TypeError, "max_columns must be an int, got 10.5"),
])
def test_mask_image_names_an_argument_of_the_wrong_type(args, error, match):
    args = tuple(_mask() if a is None else a for a in args[:1]) + args[1:]
    with pytest.raises(error, match=match):
        mask_image(*args)


def test_draw_masks_writes_a_png(tmp_path):
    path = draw_masks({"a": _mask(), "b": _mask()}, tmp_path / "m.png", head=1, block_size=128, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = SliceMask.full(1, 1, 0, 16, 4)
    assert draw_masks({"no queries": empty}, tmp_path / "e.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one mask"):
        draw_masks({}, tmp_path / "n.png")


def test_the_last_bin_counts_only_real_keys():
    """kv_len not a multiple of the bin: a fully kept mask draws every bin at 1 and density 1."""
    mask = SliceMask.full(1, 1, 128, 2049, 64)
    image = mask_image(mask, max_columns=2048)
    assert torch.all(image == 1.0)


@pytest.mark.parametrize("kv_len, max_columns", [(3, 2), (4097, 2048), (300, 30), (1000, 7), (1000, 2048), (5, 1)])
def test_block_density_weights_the_short_last_bin(kv_len, max_columns):
    """The bar beside a block is its kept fraction of all keys, even where the last bin is short,
    at any max_columns the image was drawn with (the bins' width follows from its columns)."""
    dense = torch.zeros(1, 1, 2, kv_len, dtype=torch.bool)
    dense[0, 0, 0, -1] = True
    dense[0, 0, 1, : kv_len // 3] = True
    mask = SliceMask.from_dense(dense, 64, 128)
    bars = block_density(mask_image(mask, max_columns=max_columns), kv_len)
    torch.testing.assert_close(bars, dense[0, 0].float().mean(1))


def test_block_density_refuses_an_image_that_no_bin_width_gives():
    with pytest.raises(ValueError, match="no bin width gives 10 keys 6 columns"):
        block_density(torch.zeros(2, 6), 10)
    with pytest.raises(ValueError, match="cannot be the keys"):
        block_density(torch.zeros(2, 6), 5)
    with pytest.raises(TypeError, match="masks must be a dict"):
        draw_masks([SliceMask.full(1, 1, 64, 64, 64)], "unused.png")


def test_pixels_sit_over_the_queries_and_keys_they_stand_for():
    """q_len and kv_len of 200 with slices of 64: the image spans 4 blocks (256 queries) and the
    block cover 2 x 2 blocks of 128, each cropped to the sequence, so a slice drawn at block 1 is
    queries 64-127 whatever the sequence's length."""
    dense = torch.zeros(1, 1, 4, 200, dtype=torch.bool)
    dense[0, 0, 1, 110:120] = True
    mask = SliceMask.from_dense(dense, 64, 200)
    image = mask_image(mask)
    assert image_extent(image, 64, 1) == (0, 200, 256, 0)
    assert image_extent(mask.block_cover(128)[0, 0], 128, 128) == (0, 256, 256, 0)


@pytest.mark.parametrize("block_size", ["a", 0, 1.5])
def test_draw_masks_names_a_bad_block_size(tmp_path, block_size):
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        draw_masks({"m": SliceMask.full(1, 1, 128, 256, 64)}, tmp_path / "m.png", block_size=block_size)


@pytest.mark.parametrize("density", ["0", "1.5", "nan"])
def test_the_picture_command_refuses_a_density_before_any_attention(density, capsys):
    from bench.draw_masks import main

    with pytest.raises(SystemExit):
        main(["--grid", "2", "8", "16", "--device", "cpu", "--density", density])
    assert "--density must be in (0, 1]" in capsys.readouterr().err
