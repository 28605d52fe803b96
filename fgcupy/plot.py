"""Pictures of slice masks (matplotlib, the optional ``plot`` extra).

One panel per mask: query blocks down, keys across, kept slices lit, the 128x128 block cover
(what a block-sparse kernel would have to compute; drawn where the block size is a multiple
of the mask's slice_m) shaded behind them, and each block's
density in a bar beside it. Long key axes are binned: a pixel shows the fraction of its keys
kept.
"""

from __future__ import annotations

import torch

from .mask import SliceMask, is_int, num_blocks


def _figure(**kwargs):
    """A matplotlib Figure on the Agg canvas (the caller's pyplot backend stays as it is)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("mask pictures need matplotlib: pip install 'fgcupy[plot]'") from err
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def mask_image(mask: SliceMask, batch: int = 0, head: int = 0, max_columns: int = 2048) -> torch.Tensor:
    """float32 [QB, columns]: the fraction of keys kept in each (block, key bin) of one head."""
    if not isinstance(mask, SliceMask):
        raise TypeError(f"mask must be a fgcupy.SliceMask, got {type(mask).__name__}")
    for name, value in (("batch", batch), ("head", head), ("max_columns", max_columns)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if not (0 <= batch < mask.batch and 0 <= head < mask.heads):
        raise ValueError(f"(batch, head) must index the mask's {(mask.batch, mask.heads)}, got {(batch, head)}")
    if max_columns < 1:
        raise ValueError(f"max_columns must be positive, got {max_columns}")
    dense = _head_mask(mask, batch, head).to_dense()[0, 0].float().cpu()
    if mask.kv_len == 0:
        return torch.zeros(mask.q_blocks, 0)
    per_bin = _keys_per_bin(mask.kv_len, max_columns)
    pad = (-mask.kv_len) % per_bin
    kept = torch.nn.functional.pad(dense, (0, pad)).unflatten(1, (-1, per_bin)).sum(2)
    keys = torch.nn.functional.pad(torch.ones(mask.kv_len), (0, pad)).unflatten(0, (-1, per_bin)).sum(1)
    return kept / keys  # the last bin holds fewer keys: the padding is not a dropped key


def _keys_per_bin(kv_len: int, max_columns: int) -> int:
    return num_blocks(kv_len, max_columns) if kv_len else 1


def image_extent(image: torch.Tensor, rows_per_pixel: int, keys_per_pixel: int) -> tuple:
    """matplotlib's (left, right, bottom, top) of ``image`` in queries and keys: whole blocks and
    bins, so every pixel sits over the queries and keys it stands for (the last ones may run past
    the sequence)."""
    return (0, image.shape[1] * keys_per_pixel, image.shape[0] * rows_per_pixel, 0)


def block_density(image: torch.Tensor, kv_len: int) -> torch.Tensor:
    """float32 [QB]: each block's kept fraction of all keys, from ``mask_image``'s bins (weighted
    by the keys each holds: the last bin may hold fewer). The bins' width follows from the image's
    columns: ceil(kv_len / columns) is the width mask_image gave them, whatever its max_columns."""
    if not isinstance(image, torch.Tensor) or image.dim() != 2:
        raise TypeError(f"image must be mask_image's 2-D tensor, got {image!r:.80}")
    if not is_int(kv_len) or kv_len < 0 or (image.shape[1] == 0) != (kv_len == 0) or image.shape[1] > kv_len:
        raise ValueError(f"kv_len {kv_len!r} cannot be the keys of an image of {image.shape[1]} columns")
    per_bin = _keys_per_bin(kv_len, image.shape[1])
    if kv_len and num_blocks(kv_len, per_bin) != image.shape[1]:
        raise ValueError(f"no bin width gives {kv_len} keys {image.shape[1]} columns: not mask_image's image")
    keys = torch.full((image.shape[1],), float(per_bin))
    if image.shape[1]:
        keys[-1] = kv_len - per_bin * (image.shape[1] - 1)
    return (image * keys).sum(1) / max(kv_len, 1)


def _head_mask(mask: SliceMask, batch: int, head: int) -> SliceMask:
    """Head ``head`` of batch ``batch`` as a mask of its own (its offsets, the shared keys)."""
    return SliceMask(mask.indptr[batch : batch + 1, head : head + 1].contiguous(), mask.indices, mask.slice_m,
                     mask.q_len, mask.kv_len)


def draw_masks(masks: dict, path, batch: int = 0, head: int = 0, block_size: int = 128, max_columns: int = 2048,
               title: str | None = None):
    """Draw ``{label: SliceMask}`` side by side into ``path`` (PNG); returns the figure's path.
    A mask's block cover is shaded where ``block_size`` is a multiple of its slice_m (else its
    blocks would cut query blocks: its panel shows the slices alone)."""
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict {{label: SliceMask}}, got {type(masks).__name__}")
    if not masks:
        raise ValueError("draw_masks needs at least one mask")
    if not is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    fig = _figure(figsize=(6.5 * len(masks), 5))
    axes = fig.subplots(1, 2 * len(masks), gridspec_kw={"width_ratios": [8, 1] * len(masks)}, squeeze=False)
    for i, (label, mask) in enumerate(masks.items()):
        image = mask_image(mask, batch, head, max_columns)
        ax, bar = axes[0, 2 * i], axes[0, 2 * i + 1]
        if block_size % mask.slice_m == 0:
            cover = mask.block_cover(block_size)[batch, head].float().cpu()
            ax.imshow(cover, cmap="Blues", vmin=0, vmax=3, aspect="auto", interpolation="nearest",
                      extent=image_extent(cover, block_size, block_size))
        shown = torch.where(image > 0, image, torch.nan)
        ax.imshow(shown, cmap="magma_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                  extent=image_extent(image, mask.slice_m, _keys_per_bin(mask.kv_len, max_columns)))
        ax.set_xlim(0, mask.kv_len)  # the last blocks and bins run past the sequence: cropped
        ax.set_ylim(mask.q_len, 0)
        ax.set_title(f"{label}: density {_head_mask(mask, batch, head).density():.3f}")
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        rows = block_density(image, mask.kv_len)
        bar.barh(torch.arange(rows.numel()) * mask.slice_m + mask.slice_m / 2, rows, height=mask.slice_m, color="0.3")
        bar.set_ylim(mask.q_len, 0)
        bar.set_xlim(0, max(float(rows.max()) if rows.numel() else 0.0, 1e-3) * 1.1)
        bar.set_xlabel("density")
        bar.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
