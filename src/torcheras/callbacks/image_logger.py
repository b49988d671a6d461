"""ImageLogger: images made by the model (a GAN's samples) every N epochs, as PNG and in
TensorBoard."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from torcheras import checkpoint, images
from torcheras.callbacks.callback import Callback

__all__ = ["ImageLogger"]


class ImageLogger(Callback):
    """Call ``make_images(model)`` every ``every_n_epochs`` epochs and save what it returns
    (``N x C x H x W`` or ``N x H x W``) as one image grid: a PNG per epoch in ``directory``
    (``{name}_epoch{epoch:03d}.png``, 1-based) and, with ``log_dir``, a TensorBoard image
    (run ``images``) at that epoch. The function runs under ``torch.no_grad()`` with the model in
    eval mode (training mode is restored after). Under torchrun, rank 0 alone writes.

    Args:
        make_images: ``model -> images``; e.g. the generator on noise fixed once, so the grids
            of successive epochs show the same samples improving.
        directory: where the PNGs go: a folder, or a URL such as
            ``"s3://bucket/run/images"`` (through fsspec). ``log_dir`` (TensorBoard) stays
            local.
        every_n_epochs: how often.
        log_dir: a TensorBoard folder (the TensorBoard callback's, to see them side by side).
        nrow: images per row of the grid.
        value_range: the range mapped to black..white, e.g. ``(-1, 1)`` for a tanh output;
            default: each image's own min..max.
        scale: enlarge small images in the PNG (nearest neighbour).
        name: the file prefix and TensorBoard tag.

    Example:
        ```python
        noise = torch.randn(16, 32)
        show = ImageLogger(lambda m: m.generator(noise), "runs/gan/images", value_range=(-1, 1))
        gan.fit(x, epochs=20, callbacks=[show])
        ```
    """

    rank_zero_only = True
    state_key_attributes = ("directory", "name")

    def __init__(
        self,
        make_images: Callable[[Any], torch.Tensor],
        directory: str | os.PathLike[str],
        every_n_epochs: int = 1,
        log_dir: str | os.PathLike[str] | None = None,
        nrow: int = 8,
        value_range: tuple[float, float] | None = None,
        scale: int = 1,
        name: str = "samples",
    ) -> None:
        if not callable(make_images):
            raise TypeError("ImageLogger: `make_images` must be a function model -> images.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(
                f"ImageLogger: `every_n_epochs` must be a positive integer; got {every_n_epochs!r}."
            )
        self.make_images = make_images
        self.directory = checkpoint.location(directory)
        self.every_n_epochs = every_n_epochs
        self.log_dir = (
            None
            if log_dir is None
            else checkpoint.local_folder(log_dir, "ImageLogger(log_dir=...)")
        )
        self.nrow, self.value_range, self.scale, self.name = nrow, value_range, scale, name
        self.saved: list[Path | str] = []
        self._writer: Any = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.saved = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if (epoch + 1) % self.every_n_epochs:
            return
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                batch = self.make_images(model)
        finally:
            model.train(was_training)
        if not isinstance(batch, torch.Tensor) or batch.dim() not in (3, 4):
            raise ValueError(
                f"ImageLogger: make_images returned {type(batch).__name__}"
                f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else ''}; it must "
                "return a tensor of images, N x C x H x W or N x H x W."
            )
        grid = images.make_grid(batch, nrow=self.nrow, value_range=self.value_range)
        path = checkpoint.join(self.directory, f"{self.name}_epoch{epoch + 1:03d}.png")
        self.saved.append(images.save_png(grid, path, scale=self.scale))
        if self.log_dir is not None:
            with checkpoint.naming_file_errors(self.log_dir / "images", "write images to"):
                if self._writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self._writer = SummaryWriter(str(self.log_dir / "images"))
                self._writer.add_image(self.name, grid, epoch, dataformats="HWC")
                self._writer.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._close()

    def on_exception(self, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
