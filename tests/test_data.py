"""Offline datasets: embedded digits and faces, users' folders and .npz files, 2-D toy mixtures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sparsegan.data import (
    DatasetError,
    ImageDataset,
    grid_of_gaussians,
    images_to_tensor,
    load_dataset,
    load_digits,
    load_faces,
    load_image_folder,
    load_npz,
    ring_of_gaussians,
)


@pytest.mark.parametrize("size, content", [(16, 12), (32, 24)])
def test_digits_are_padded_and_scaled(size: int, content: int) -> None:
    data = load_digits(size)
    assert data.images.shape == (1797, 1, size, size)
    assert data.images.dtype == torch.float32
    assert float(data.images.min()) == -1.0 and float(data.images.max()) <= 1.0
    assert data.labels is not None and sorted(data.labels.unique().tolist()) == list(range(10))
    pad = (size - content) // 2
    border = torch.cat([data.images[..., :pad, :].flatten(), data.images[..., -pad:, :].flatten(),
                        data.images[..., :, :pad].flatten(), data.images[..., :, -pad:].flatten()])
    assert torch.all(border == -1.0)  # black frame around the digit
    assert data.images[..., pad:-pad, pad:-pad].max() > 0.9  # strokes reach (near) white


def test_faces_are_the_hundred_lfw_faces() -> None:
    data = load_faces(32)
    assert data.images.shape == (100, 1, 32, 32)
    assert -1.0 <= float(data.images.min()) and float(data.images.max()) <= 1.0
    assert data.images.std() > 0.2


def _png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    channels = {"L": (size[1], size[0]), "RGB": (size[1], size[0], 3)}[mode]
    Image.fromarray(np.full(channels, value, dtype=np.uint8), mode=mode).save(path)


def test_image_folder_reads_recursively_crops_and_resizes(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "a.png", (40, 20), "L", 0)
    _png(tmp_path / "sub" / "b.PNG", (10, 10), "L", 255)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, image_size=16)
    assert data.images.shape == (2, 1, 16, 16)  # all grey -> one channel
    assert torch.allclose(data.images[0], torch.tensor(-1.0))
    assert torch.allclose(data.images[1], torch.tensor(1.0))
    _png(tmp_path / "c.jpg", (16, 16), "RGB", 128)
    assert load_image_folder(tmp_path, image_size=8).images.shape == (3, 3, 8, 8)  # one colour image -> RGB
    assert load_dataset(tmp_path, image_size=8, channels=1).images.shape == (3, 1, 8, 8)


def test_empty_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="contains no images"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_image_folder(tmp_path)


def test_npz_layouts_and_value_ranges(tmp_path: Path) -> None:
    grey = np.zeros((5, 20, 20), dtype=np.uint8)
    grey[:, 5:15, 5:15] = 255
    np.savez(tmp_path / "grey.npz", images=grey, labels=np.arange(5))
    data = load_npz(tmp_path / "grey.npz", image_size=20)
    assert data.images.shape == (5, 1, 20, 20)
    assert float(data.images.min()) == -1.0 and float(data.images.max()) == 1.0
    assert data.labels is not None and data.labels.tolist() == [0, 1, 2, 3, 4]

    rgb_last = np.random.default_rng(0).random((3, 12, 12, 3)).astype(np.float32)  # 0..1, channels last
    np.savez(tmp_path / "rgb.npz", x=rgb_last)
    x = load_dataset(tmp_path / "rgb.npz", image_size=12).images
    assert x.shape == (3, 3, 12, 12)
    assert torch.allclose(x, torch.from_numpy(rgb_last).permute(0, 3, 1, 2) * 2 - 1)

    signed = np.linspace(-1, 1, 2 * 1 * 8 * 8, dtype=np.float32).reshape(2, 1, 8, 8)  # already -1..1, NCHW
    np.savez(tmp_path / "signed.npz", signed)
    assert torch.allclose(load_npz(tmp_path / "signed.npz", image_size=8).images, torch.from_numpy(signed))


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 8, 8)), b=np.zeros((2, 8, 8)))
    with pytest.raises(DatasetError, match="several arrays"):
        load_npz(tmp_path / "two.npz")
    np.savez(tmp_path / "flat.npz", images=np.zeros((4, 64)))
    with pytest.raises(DatasetError, match="expected an image array"):
        load_npz(tmp_path / "flat.npz")
    with pytest.raises(DatasetError, match="does not exist"):
        load_npz(tmp_path / "missing.npz")


def test_unknown_source_and_bad_arrays() -> None:
    with pytest.raises(DatasetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(DatasetError, match="empty"):
        images_to_tensor(np.zeros((0, 8, 8)))
    with pytest.raises(DatasetError, match="NaN"):
        images_to_tensor(np.full((1, 8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DatasetError, match="image_size"):
        load_digits(10)


def test_sampling_is_reproducible() -> None:
    data = load_digits(16)
    a = data.sample(8, torch.Generator().manual_seed(3))
    b = data.sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (8, 1, 16, 16)
    # the draw is the generator's: uniform indices with replacement, the same rows by hand
    index = torch.randint(len(data.images), (8,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, data.images[index])
    # and the seed matters: another seed draws other images
    assert not torch.equal(a, data.sample(8, torch.Generator().manual_seed(4)))
    # with replacement: more draws than images still works, and every draw is a dataset image
    tiny = ImageDataset(data.images[:3].clone(), "three digits")
    many = tiny.sample(50, torch.Generator().manual_seed(0))
    assert many.shape == (50, 1, 16, 16)
    matches = (many[:, None] == tiny.images[None]).flatten(2).all(-1)  # (50, 3): draw i is image j
    assert bool(matches.any(1).all()) and int(matches.any(0).sum()) == 3


def test_toy_mixtures() -> None:
    ring = ring_of_gaussians(8, radius=2.0, std=0.02)
    assert ring.modes == 8
    assert torch.allclose(ring.centers.norm(dim=1), torch.full((8,), 2.0))
    angles = torch.atan2(ring.centers[:, 1], ring.centers[:, 0])
    assert torch.allclose(torch.diff(angles % (2 * math.pi)), torch.full((7,), math.pi / 4), atol=1e-5)
    grid = grid_of_gaussians(5, spacing=2.0)
    assert grid.modes == 25 and float(grid.centers.abs().max()) == 4.0
    points = ring.sample(1000, torch.Generator().manual_seed(0))
    assert points.shape == (1000, 2)
    assert ((points.norm(dim=1) - 2.0).abs() < 0.2).all()
