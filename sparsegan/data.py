"""Offline image datasets and 2-D toy distributions for demos, comparisons and metrics.

Nothing here downloads anything. Built-in image sets come from files that ship inside pip
packages:

* ``"digits"``: scikit-learn's ``load_digits`` (1797 hand-written digits, 8x8, 10 classes),
  upscaled to three quarters of the target size and zero-padded to it (16x16 or 32x32), like
  MNIST's 20-pixel digits in a 28-pixel frame;
* ``"faces"``: the 100 face crops of scikit-image's ``lfw_subset`` (25x25 grey), resized.

Users' own data: a folder of images (png, jpg, bmp, gif, tif, webp; searched recursively) or an
``.npz`` file holding an image array. Every dataset is returned as an :class:`ImageDataset`
whose images are a float tensor ``(N, C, H, W)`` in ``[-1, 1]``.

The 2-D toy distributions (:func:`ring_of_gaussians`, :func:`grid_of_gaussians`) are the usual
mode-collapse benchmarks; :class:`ToyDistribution` carries the mode centres and the standard
deviation that :func:`sparsegan.metrics.mode_coverage` needs.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BUILTIN_DATASETS",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "ImageDataset",
    "ToyDistribution",
    "grid_of_gaussians",
    "images_to_tensor",
    "load_dataset",
    "load_digits",
    "load_faces",
    "load_image_folder",
    "load_npz",
    "ring_of_gaussians",
]

logger = logging.getLogger(__name__)

BUILTIN_DATASETS: tuple[str, ...] = ("digits", "faces")
"""Names of the embedded datasets :func:`load_dataset` accepts."""

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File extensions :func:`load_image_folder` reads (case-insensitive)."""


class DatasetError(ValueError):
    """A dataset that cannot be loaded (missing, empty, unreadable or of the wrong shape)."""


@dataclass
class ImageDataset:
    """Images in memory, ready for GAN training.

    Attributes:
        images: Float tensor ``(N, C, H, W)`` with values in ``[-1, 1]``.
        name: Where the images came from (``"digits"``, a path, ...).
        labels: Optional integer class labels ``(N,)`` (the digits have them).
        notes: Human-readable notes on how the data was prepared.
    """

    images: torch.Tensor
    name: str
    labels: torch.Tensor | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        """Number of images."""
        return int(self.images.shape[0])

    @property
    def channels(self) -> int:
        """Number of colour channels (1 or 3)."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Side length of the (square) images."""
        return int(self.images.shape[-1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images drawn uniformly with replacement.

        Args:
            n: Batch size.
            generator: Random generator for the indices (the global RNG when ``None``).

        Returns:
            A ``(n, C, H, W)`` tensor (on the dataset's device).
        """
        index = torch.randint(len(self), (n,), generator=generator)
        return self.images[index.to(self.images.device)]

    def to(self, device: torch.device | str) -> ImageDataset:
        """A copy whose tensors live on ``device``."""
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageDataset(self.images.to(device), self.name, labels, list(self.notes))

    def __repr__(self) -> str:
        return (f"ImageDataset(name={self.name!r}, n={len(self)}, channels={self.channels}, "
                f"size={self.image_size})")


def _check_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size < 8 or image_size % 4:
        raise DatasetError(f"image_size must be an int >= 8 and a multiple of 4 (e.g. 16 or 32), got {image_size!r}")
    return image_size


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a ``(N, C, h, w)`` float batch to ``size x size`` (antialiased when shrinking)."""
    if images.shape[-2:] == (size, size):
        return images
    shrink = images.shape[-1] > size or images.shape[-2] > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


def images_to_tensor(array: np.ndarray | torch.Tensor, *, image_size: int | None = None,
                     channels: int | None = None) -> torch.Tensor:
    """Convert an image array to a float ``(N, C, H, W)`` tensor in ``[-1, 1]``.

    Accepts ``(N, H, W)``, ``(N, H, W, C)`` (channels last, C in 1/3/4) or ``(N, C, H, W)``.
    Integer arrays are read as 0..255; float arrays as 0..1, or as -1..1 when they hold negative
    values. An alpha channel is dropped. Non-square images are centre-cropped to a square.

    Args:
        array: The images.
        image_size: Resize to this side length (keep the size when ``None``).
        channels: 1 (grey) or 3 (RGB); keep the array's channels when ``None``.

    Returns:
        The converted tensor.

    Raises:
        DatasetError: For an array of the wrong rank, size or value type.
    """
    x = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3, 4):
            raise DatasetError(f"cannot tell the channel axis of an image array of shape {tuple(x.shape)}; "
                               "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C in 1, 3, 4")
    else:
        raise DatasetError(f"expected an image array (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise DatasetError("the image array is empty (0 images)")
    if x.dtype == torch.bool or not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16,
                                                                          torch.int32, torch.int64)):
        raise DatasetError(f"image values must be integers (0..255) or floats (0..1 or -1..1), got {x.dtype}")
    if x.is_floating_point():
        x = x.float()
        if not torch.isfinite(x).all():
            raise DatasetError("the image array holds NaN or infinite values")
        x = x if float(x.min()) < 0 else x * 2 - 1
    else:
        x = x.float() / 127.5 - 1
    x = x.clamp(-1, 1)
    if x.shape[1] == 4:
        x = x[:, :3]
    if channels is not None:
        if channels not in (1, 3):
            raise DatasetError(f"channels must be 1 or 3, got {channels!r}")
        if channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[..., top:top + side, left:left + side]
    if image_size is not None:
        x = _resize(x, image_size)
    return x.contiguous()


def _pad_to(images: torch.Tensor, size: int, content: int) -> torch.Tensor:
    """Resize to ``content`` pixels and pad with the background value (-1) to ``size``."""
    images = _resize(images, content)
    before = (size - content) // 2
    after = size - content - before
    return F.pad(images, (before, after, before, after), value=-1.0)


def load_digits(image_size: int = 16) -> ImageDataset:
    """scikit-learn's 1797 hand-written digits, white on black, with their labels.

    The 8x8 images (values 0..16) are bilinearly upscaled to ``3/4 * image_size`` and padded with
    black to ``image_size`` (12 -> 16, 24 -> 32), then scaled to ``[-1, 1]``.

    Args:
        image_size: Output side length (16 or 32 are the intended sizes; any multiple of 4 >= 8).

    Returns:
        A one-channel :class:`ImageDataset` with ``labels``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    size = _check_size(image_size)
    bunch = _sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1
    content = max(8, (size * 3) // 4)
    images = _pad_to(images, size, content).clamp(-1, 1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return ImageDataset(images, "digits", labels,
                        [f"sklearn load_digits: 1797 images 8x8, upscaled to {content}x{content}, padded to {size}x{size}"])


def load_faces(image_size: int = 32) -> ImageDataset:
    """The 100 face crops of scikit-image's ``lfw_subset`` (grey, 25x25), resized.

    Args:
        image_size: Output side length.

    Returns:
        A one-channel :class:`ImageDataset` of 100 faces.
    """
    from skimage.data import lfw_subset

    size = _check_size(image_size)
    faces = lfw_subset()[:100]  # the first 100 are faces, the next 100 are background crops
    images = images_to_tensor(faces.astype(np.float32), image_size=size, channels=1)
    return ImageDataset(images, "faces", None, [f"skimage lfw_subset: 100 faces 25x25, resized to {size}x{size}"])


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(folder: str | os.PathLike[str], *, image_size: int = 32, channels: int | None = None,
                      max_images: int | None = None) -> ImageDataset:
    """Every image in a folder (recursively), centre-cropped to a square and resized.

    Args:
        folder: The folder.
        image_size: Output side length.
        channels: 1 or 3; by default 1 when every image is greyscale, else 3.
        max_images: Read at most this many (in sorted path order).

    Returns:
        An :class:`ImageDataset`.

    Raises:
        DatasetError: When the folder does not exist, holds no image files, or an image cannot be
            read.
    """
    from PIL import Image, UnidentifiedImageError

    size = _check_size(image_size)
    path = Path(folder)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {str(path)!r} does not exist or is not a folder")
    files = _image_files(path)
    if not files:
        raise DatasetError(
            f"dataset folder {str(path)!r} contains no images (looked recursively for "
            f"{', '.join(IMAGE_EXTENSIONS)}); point --data at a folder of images, an .npz file, "
            f"or one of the built-in datasets {list(BUILTIN_DATASETS)}"
        )
    if max_images is not None:
        files = files[:max_images]
    loaded: list[Image.Image] = []
    for file in files:
        try:
            with Image.open(file) as img:
                img.load()
                loaded.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read image {str(file)!r}: {exc}") from None
    grey_modes = {"1", "L", "LA", "I", "I;16", "F"}
    if channels is None:
        channels = 1 if all(img.mode in grey_modes for img in loaded) else 3
    tensors = []
    for picture in loaded:
        arr = np.asarray(picture.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        tensors.append(images_to_tensor(arr[None], image_size=size, channels=channels))
    images = torch.cat(tensors)
    logger.info("loaded %d images from %s", len(images), path)
    return ImageDataset(images, str(path), None, [f"{len(images)} images from {path}, resized to {size}x{size}"])


def load_npz(file: str | os.PathLike[str], *, image_size: int = 32, channels: int | None = None,
             key: str | None = None) -> ImageDataset:
    """Images stored in an ``.npz`` file (``np.savez(path, images=array)``).

    The array is the one under ``key``, else under ``"images"``, ``"x"`` or ``"data"``, else
    the file's only array. Shapes and value ranges as in :func:`images_to_tensor`. Labels under
    ``"labels"`` or ``"y"`` are kept.

    Args:
        file: The ``.npz`` file.
        image_size: Output side length.
        channels: 1 or 3 (keep the file's channels when ``None``).
        key: Name of the image array in the file.

    Returns:
        An :class:`ImageDataset`.

    Raises:
        DatasetError: When the file is missing or unreadable, or holds no suitable array.
    """
    size = _check_size(image_size)
    path = Path(file)
    if not path.is_file():
        raise DatasetError(f"dataset file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {str(path)!r} as an .npz file: {exc}") from None
    if not arrays:
        raise DatasetError(f"{str(path)!r} holds no arrays")
    if key is not None:
        if key not in arrays:
            raise DatasetError(f"{str(path)!r} has no array {key!r}; it has {sorted(arrays)}")
        chosen = key
    else:
        named = [k for k in ("images", "x", "data") if k in arrays]
        if named:
            chosen = named[0]
        elif len(arrays) == 1:
            chosen = next(iter(arrays))
        else:
            raise DatasetError(f"{str(path)!r} holds several arrays {sorted(arrays)}; name the images 'images'")
    images = images_to_tensor(arrays[chosen], image_size=size, channels=channels)
    labels = next((torch.as_tensor(arrays[k]).long() for k in ("labels", "y") if k in arrays
                   and arrays[k].shape[:1] == (images.shape[0],)), None)
    return ImageDataset(images, str(path), labels, [f"{len(images)} images from {path} ({chosen!r}), resized to {size}x{size}"])


def load_dataset(source: str | os.PathLike[str] = "digits", *, image_size: int = 16,
                 channels: int | None = None) -> ImageDataset:
    """Load a built-in dataset by name, a folder of images, or an ``.npz`` file.

    Args:
        source: ``"digits"``, ``"faces"``, a folder, or a path ending in ``.npz``.
        image_size: Output side length.
        channels: 1 or 3 (keep the source's channels when ``None``).

    Returns:
        An :class:`ImageDataset`.

    Raises:
        DatasetError: For an unknown name, a missing path, an empty folder, or unreadable data.
    """
    text = os.fspath(source)
    if text.lower() in BUILTIN_DATASETS and not Path(text).exists():
        data = load_digits(image_size) if text.lower() == "digits" else load_faces(image_size)
        if channels is not None and channels != data.channels:
            data.images = images_to_tensor(data.images, channels=channels)
        return data
    path = Path(text)
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, channels=channels)
    if path.suffix.lower() == ".npz":
        return load_npz(path, image_size=image_size, channels=channels)
    if path.exists():
        raise DatasetError(f"{text!r} is neither a folder of images nor an .npz file")
    raise DatasetError(f"unknown dataset {text!r}: not a built-in dataset {list(BUILTIN_DATASETS)}, "
                       "an existing folder of images, or an .npz file")


# ---------------------------------------------------------------------------------------- 2-D toys


@dataclass(frozen=True)
class ToyDistribution:
    """A mixture of equally weighted isotropic 2-D Gaussians.

    Attributes:
        centers: ``(modes, 2)`` mode centres.
        std: Standard deviation of every mode.
        name: ``"ring"`` or ``"grid"``.
    """

    centers: torch.Tensor
    std: float
    name: str

    @property
    def modes(self) -> int:
        """Number of modes."""
        return int(self.centers.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points ``(n, 2)`` from the mixture."""
        k = torch.randint(self.modes, (n,), generator=generator)
        return self.centers[k] + self.std * torch.randn(n, 2, generator=generator)


def ring_of_gaussians(modes: int = 8, radius: float = 2.0, std: float = 0.02) -> ToyDistribution:
    """``modes`` Gaussians evenly spaced on a circle (the classic 8-mode ring).

    Args:
        modes: Number of modes.
        radius: Circle radius.
        std: Standard deviation of each mode.
    """
    angle = 2 * math.pi * torch.arange(modes, dtype=torch.float32) / modes
    centers = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    return ToyDistribution(centers, float(std), "ring")


def grid_of_gaussians(side: int = 5, spacing: float = 2.0, std: float = 0.05) -> ToyDistribution:
    """``side x side`` Gaussians on a square grid centred at the origin (the 25-mode grid).

    Args:
        side: Modes per row and column.
        spacing: Distance between neighbouring modes.
        std: Standard deviation of each mode.
    """
    coords = (torch.arange(side, dtype=torch.float32) - (side - 1) / 2) * spacing
    xs, ys = torch.meshgrid(coords, coords, indexing="ij")
    centers = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    return ToyDistribution(centers, float(std), "grid")
