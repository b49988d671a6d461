"""ImageLogger: the PNG grid holds the model's images, TensorBoard reads them back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_model

from torcheras import callbacks as cb
from torcheras import images

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")


def test_every_n_epochs_a_png_grid_of_what_the_function_returns(blobs, tmp_path):
    x, y = blobs
    model = make_model()
    calls = []

    def make(m):
        calls.append((m.training, torch.is_grad_enabled()))
        # 5 images of 6x6 in [-1, 1]: image i is the constant -1 + 0.4 i
        return (torch.arange(5.0) * 0.4 - 1).view(5, 1, 1, 1).expand(5, 1, 6, 6)

    logger = cb.ImageLogger(make, tmp_path, every_n_epochs=2, nrow=3, value_range=(-1, 1))
    model.fit(x, y, epochs=5, verbose=0, callbacks=[logger])
    assert [p.name for p in logger.saved] == ["samples_epoch002.png", "samples_epoch004.png"]
    assert calls == [(False, False), (False, False)] and model.training
    image = np.asarray(Image.open(logger.saved[0]).convert("RGB"), dtype=np.float32) / 255
    assert image.shape == (2 * 8 + 2, 3 * 8 + 2, 3)  # 2 rows x 3 columns of 6+2 pixels
    for i in range(5):
        top, left = 2 + (i // 3) * 8, 2 + (i % 3) * 8
        tile = image[top : top + 6, left : left + 6]
        assert tile == pytest.approx(np.full_like(tile, 0.2 * i), abs=1 / 255)
    assert image[0, 0] == pytest.approx([1, 1, 1])  # padding is white


def test_the_grid_goes_to_tensorboard(blobs, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = blobs
    logger = cb.ImageLogger(lambda m: torch.rand(4, 3, 8, 8), tmp_path / "png", log_dir=tmp_path)
    make_model().fit(x, y, epochs=2, verbose=0, callbacks=[logger])
    events = EventAccumulator(str(tmp_path / "images"), size_guidance={"images": 0})
    events.Reload()
    shown = events.Images("samples")
    assert [e.step for e in shown] == [0, 1]
    import io

    decoded = Image.open(io.BytesIO(shown[1].encoded_image_string))
    assert decoded.size == Image.open(logger.saved[1]).size


def test_a_function_that_returns_no_images_is_a_clear_error(blobs, tmp_path):
    x, y = blobs
    logger = cb.ImageLogger(lambda m: torch.rand(4, 10), tmp_path)
    with pytest.raises(ValueError, match="must return a tensor of images"):
        make_model().fit(x, y, epochs=1, verbose=0, callbacks=[logger])
    with pytest.raises(ValueError, match="every_n_epochs"):
        cb.ImageLogger(lambda m: m, tmp_path, every_n_epochs=0)


def test_make_grid_normalises_each_image_by_default():
    grid = images.make_grid(torch.stack([torch.zeros(1, 4, 4), torch.full((1, 4, 4), 7.0)]))
    assert grid.shape == (8, 14, 3) and grid.min() >= 0 and grid.max() <= 1
