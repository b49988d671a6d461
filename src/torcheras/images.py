"""Image grids from batches of tensors, saved as PNG (for ImageLogger and PredictionLogger)."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from torcheras import checkpoint

__all__ = ["is_image_batch", "make_grid", "save_png"]


def is_image_batch(x: object) -> bool:
    """A batch of images: N x C x H x W with 1, 3 or 4 channels, or N x H x W."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() and x.dtype != torch.uint8:
        return False
    return (x.dim() == 4 and x.shape[1] in (1, 3, 4) and min(x.shape[2:]) >= 4) or (
        x.dim() == 3 and min(x.shape[1:]) >= 4
    )


def make_grid(
    images: torch.Tensor,
    nrow: int = 8,
    padding: int = 2,
    value_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """Tile ``N x C x H x W`` (or ``N x H x W``) images into one ``H x W x 3`` float array in
    [0, 1]. ``value_range`` maps to [0, 1] (``(-1, 1)`` for a tanh generator); default: each
    image's own min and max (uint8 images: 0..255)."""
    x = images.detach().float().cpu()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"Images must be N x C x H x W (or N x H x W); got {tuple(images.shape)}.")
    if images.dtype == torch.uint8:
        x = x / 255.0
    elif value_range is not None:
        low, high = value_range
        x = (x - low) / max(high - low, 1e-12)
    else:
        flat = x.reshape(x.shape[0], -1)
        low = flat.min(dim=1).values.view(-1, 1, 1, 1)
        high = flat.max(dim=1).values.view(-1, 1, 1, 1)
        x = (x - low) / (high - low).clamp_min(1e-12)
    x = x.clamp(0, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    n, _, h, w = x.shape
    columns = min(nrow, n)
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i in range(n):
        top = padding + (i // columns) * (h + padding)
        left = padding + (i % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid.permute(1, 2, 0).numpy()


def save_png(grid: np.ndarray, path: str | os.PathLike[str], scale: int = 1) -> Path | str:
    """Write an ``H x W x 3`` array in [0, 1] as a PNG (``scale``: nearest-neighbour
    enlargement, for small images such as 8 x 8 digits). Needs matplotlib."""
    try:
        from matplotlib.image import imsave
    except ImportError:
        raise ImportError(
            "Saving images needs matplotlib: pip install 'torcheras[plot]'."
        ) from None
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    buffer = io.BytesIO()
    imsave(buffer, np.ascontiguousarray(grid), format="png")
    return checkpoint.atomic_write(path, lambda f: f.write(buffer.getvalue()), every_rank=True)
