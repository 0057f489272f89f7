"""Offline GAN metrics: Fréchet distance, KID, an offline feature extractor, 2-D mode coverage.

Nothing here downloads anything.

* :func:`frechet_distance` / :func:`frechet_distance_from_features`: the Fréchet distance between
  Gaussians fitted to two feature sets (FID when the features are Inception pool3 features). It
  agrees with ``torchmetrics`` and ``pytorch-fid`` on identical features.
* :func:`kernel_inception_distance`: KID, the unbiased polynomial-kernel MMD² averaged over random
  subsets, as in ``torchmetrics``' ``KernelInceptionDistance``.
* :class:`DigitsFeatureExtractor` / :func:`digits_feature_extractor`: a small CNN trained on
  scikit-learn's digits the first time it is needed (a few seconds on a CPU), cached on disk,
  its held-out accuracy recorded. Its penultimate layer plays the role Inception plays in FID:
  the "digits FD" it gives is comparable between runs that use the same extractor, and not with
  published FIDs.
* :func:`inception_fid`: true Inception FID through ``torchmetrics`` when its weights already lie
  in the local torch hub cache; otherwise it logs why and returns ``None`` at once.
* :func:`mode_coverage`: modes covered and high-quality-sample rate on 2-D Gaussian mixtures.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DigitsFeatureExtractor",
    "INCEPTION_FEATURES",
    "ModeCoverage",
    "cache_dir",
    "digits_feature_extractor",
    "evaluate_images",
    "extract_features",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "inception_fid",
    "inception_weights_path",
    "kernel_inception_distance",
    "mmd2_unbiased",
    "mode_coverage",
    "polynomial_kernel",
]

logger = logging.getLogger(__name__)

_EXTRACTOR_VERSION = 1


# ---------------------------------------------------------------------------------------- Fréchet


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance (``N - 1``) of a ``(N, d)`` feature matrix, in float64.

    Raises:
        ValueError: With fewer than two samples or a non-2-D input.
    """
    x = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be a (N, d) matrix with N >= 2, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

    ``||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)``, computed in float64.
    The trace term uses ``tr((s1^½ s2 s1^½)^½)``, a symmetric PSD form with the same eigenvalues as
    ``sigma1 @ sigma2``, so no complex arithmetic or diagonal offset is needed, even for
    singular covariances.

    Args:
        mu1: Mean of the first set ``(d,)``.
        sigma1: Covariance of the first set ``(d, d)``.
        mu2: Mean of the second set.
        sigma2: Covariance of the second set.

    Returns:
        The distance (>= 0 up to rounding).
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s, dtype=torch.float64) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shape mismatch: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} / {tuple(s2.shape)}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * trace_sqrt)


def frechet_distance_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """:func:`frechet_distance` of Gaussians fitted to two ``(N, d)`` feature matrices."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


# ---------------------------------------------------------------------------------------- KID


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, *, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """``(gamma <x, y> + coef0) ** degree`` for all pairs of rows; ``gamma`` defaults to ``1/d``."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """Unbiased MMD² from kernel matrices of two equally large sets (diagonals left out)."""
    m = k_xx.shape[0]
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, degree: int = 3, gamma: float | None = None,
                              coef0: float = 1.0, seed: int | None = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al., 2018) on two ``(N, d)`` feature matrices.

    For each of ``subsets`` rounds, ``subset_size`` rows are drawn without replacement from each
    set (real first, then fake, as ``torchmetrics`` does) and the unbiased MMD² with a polynomial
    kernel is computed; the mean and the population standard deviation over rounds are returned.

    Args:
        real: Real features.
        fake: Generated features.
        subsets: Number of rounds.
        subset_size: Rows per set per round (at most the smaller set's size; larger values are
            reduced to it with a log message).
        degree: Polynomial kernel degree.
        gamma: Kernel scale (default ``1/d``).
        coef0: Kernel offset.
        seed: Seed of the subset draws; ``None`` uses the global RNG (then a given
            ``torch.manual_seed`` reproduces ``torchmetrics``' draws exactly).

    Returns:
        ``(kid_mean, kid_std)``.

    Raises:
        ValueError: For fewer than two samples, or mismatched feature sizes.
    """
    x = torch.as_tensor(real).detach().to("cpu", torch.float64)
    y = torch.as_tensor(fake).detach().to("cpu", torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need two (N, d) feature matrices with the same d, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError("KID needs at least two samples in each set")
    if size < subset_size:
        logger.info("KID: subset_size %d reduced to %d (the smaller set's size)", subset_size, size)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    scores = []
    for _ in range(subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:size]]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:size]]
        kw: dict[str, Any] = {"degree": degree, "gamma": gamma, "coef0": coef0}
        scores.append(mmd2_unbiased(polynomial_kernel(xs, xs, **kw), polynomial_kernel(ys, ys, **kw),
                                    polynomial_kernel(xs, ys, **kw)))
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False))


# ---------------------------------------------------------------------------------------- features


class DigitsFeatureExtractor(nn.Module):
    """A small CNN classifier of the 10 digits whose penultimate layer gives image features.

    Inputs are images ``(N, C, H, W)`` in ``[-1, 1]``; colour images are converted to grey and
    any size is resized to the network's ``image_size``, so it accepts every dataset (its
    features are most meaningful on digit-like images).

    Args:
        image_size: Side length the network works at (a multiple of 4).
        num_features: Size of the feature vector.

    Attributes:
        accuracy: Held-out classification accuracy on the digits (set by training / loading).
    """

    def __init__(self, image_size: int = 16, num_features: int = 64) -> None:
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.image_size, self.num_features = image_size, num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64 * (image_size // 4) ** 2, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, 10)
        self.scale: torch.Tensor
        self.register_buffer("scale", torch.ones(()))
        self.accuracy: float | None = None

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Convert images to the network's input: one channel, ``image_size`` pixels, float."""
        x = images.float()
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif x.shape[1] != 1:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.image_size)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(N, num_features)`` of images in ``[-1, 1]``, scaled to unit mean variance on the digits."""
        return self.body(self.prepare(images)) * self.scale

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)``."""
        return self.classify(self.forward(images))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, 10)`` from features returned by :meth:`forward`."""
        return self.head(features / self.scale)


def cache_dir() -> Path:
    """Where trained extractors are cached: ``$SPARSEGAN_CACHE``, else ``$XDG_CACHE_HOME/sparsegan``,
    else ``~/.cache/sparsegan``."""
    if os.environ.get("SPARSEGAN_CACHE"):
        return Path(os.environ["SPARSEGAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsegan"


def _train_digits_extractor(image_size: int, seed: int, epochs: int) -> DigitsFeatureExtractor:
    """Train the extractor on 85 % of the digits (random ±1-pixel shifts), test on the rest."""
    from sparsegan.data import load_digits

    data = load_digits(image_size)
    rng = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=rng)
    n_train = int(0.85 * len(data))
    train_idx, test_idx = order[:n_train], order[n_train:]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = DigitsFeatureExtractor(image_size)
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    images, labels = data.images, data.labels
    assert labels is not None
    shift = max(1, image_size // 16)
    net.train()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(n_train, generator=rng)]
        for batch in perm.split(64):
            dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=rng))
            x = torch.roll(images[batch], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(net.logits(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        net.accuracy = float((net.logits(images[test_idx]).argmax(1) == labels[test_idx]).float().mean())
        net.scale.fill_(1.0 / float(net(images[train_idx]).var(0).mean().clamp(min=1e-12).sqrt()))
    return net


def digits_feature_extractor(image_size: int = 16, *, cache: str | os.PathLike[str] | None | bool = None,
                             seed: int = 0, epochs: int = 10) -> DigitsFeatureExtractor:
    """The digits feature extractor, trained on first use and cached.

    Args:
        image_size: Side length it works at (use the training images' size).
        cache: Cache folder; ``None`` for :func:`cache_dir`; ``False`` to neither read nor write a
            cache. A cache that cannot be written is skipped with a log message.
        seed: Training seed (part of the cache key).
        epochs: Training epochs (part of the cache key).

    Returns:
        The extractor in eval mode with gradients off and ``accuracy`` set.
    """
    folder = None if cache is False else cache_dir() if cache is None or cache is True else Path(cache)
    file = None if folder is None else folder / f"digits-features-v{_EXTRACTOR_VERSION}-{image_size}px-s{seed}-e{epochs}.pt"
    net = DigitsFeatureExtractor(image_size)
    if file is not None and file.is_file():
        try:
            saved = torch.load(file, map_location="cpu", weights_only=True)
            net.load_state_dict(saved["state_dict"])
            net.accuracy = float(saved["accuracy"])
            logger.info("digits feature extractor loaded from %s (held-out accuracy %.4f)", file, net.accuracy)
        except Exception as exc:  # noqa: BLE001 - a broken cache file is retrained, not fatal
            logger.warning("ignoring unreadable cached extractor %s: %s", file, exc)
            net.accuracy = None
    if net.accuracy is None:
        net = _train_digits_extractor(image_size, seed, epochs)
        logger.info("digits feature extractor trained (held-out accuracy %.4f)", net.accuracy)
        if file is not None:
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_suffix(f".tmp{os.getpid()}")
                torch.save({"state_dict": net.state_dict(), "accuracy": net.accuracy, "image_size": image_size}, tmp)
                os.replace(tmp, file)
            except OSError as exc:
                logger.info("could not cache the digits feature extractor in %s: %s", folder, exc)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def extract_features(extractor: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, *,
                     batch_size: int = 500) -> torch.Tensor:
    """Features of ``images`` in batches, without gradients, as a CPU float64 tensor."""
    with torch.no_grad():
        return torch.cat([extractor(chunk).detach().to("cpu", torch.float64) for chunk in images.split(batch_size)])


def evaluate_images(real: torch.Tensor, fake: torch.Tensor, extractor: DigitsFeatureExtractor, *,
                    kid_subsets: int = 50, kid_subset_size: int = 500, seed: int = 0,
                    real_features: torch.Tensor | None = None) -> dict[str, Any]:
    """Digits-feature FD and KID of generated images, plus the classifier's view of them.

    Args:
        real: Real images ``(N, C, H, W)`` in ``[-1, 1]``.
        fake: Generated images.
        extractor: The feature extractor.
        kid_subsets: KID rounds.
        kid_subset_size: KID subset size (reduced to the smaller set's size).
        seed: Seed of the KID subsets.
        real_features: Precomputed features of ``real`` (saves time across evaluations).

    Returns:
        ``fd``, ``kid_mean``, ``kid_std``, ``confident_rate`` (share of fakes classified with
        probability > 0.9), ``classes_covered`` (digit classes receiving >= 2 % of the fakes),
        ``n_real``, ``n_fake``, ``extractor_accuracy``.
    """
    feats_real = real_features if real_features is not None else extract_features(extractor, real)
    feats_fake = extract_features(extractor, fake)
    kid_mean, kid_std = kernel_inception_distance(feats_real, feats_fake, subsets=kid_subsets,
                                                  subset_size=kid_subset_size, seed=seed)
    with torch.no_grad():
        probs = torch.cat([extractor.classify(f.float()).softmax(1) for f in feats_fake.split(1000)])
    confident = probs.max(1).values > 0.9
    counts = torch.bincount(probs.argmax(1), minlength=10)
    return {
        "fd": frechet_distance_from_features(feats_real, feats_fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "confident_rate": float(confident.float().mean()),
        "classes_covered": int((counts >= 0.02 * len(fake)).sum()),
        "n_real": int(real.shape[0]),
        "n_fake": int(fake.shape[0]),
        "extractor_accuracy": extractor.accuracy,
    }


# ---------------------------------------------------------------------------------------- Inception


_INCEPTION_FILE_PREFIX = "weights-inception-2015-12-05"


def inception_weights_path() -> Path | None:
    """The torch-fidelity Inception weights in the local torch hub cache, or ``None``."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{_INCEPTION_FILE_PREFIX}*")) if folder.is_dir() else []
    return found[0] if found else None


INCEPTION_FEATURES = (64, 192, 768, 2048)
"""The Inception feature layers ``torchmetrics`` can read (2048: pool3, the standard FID)."""


def inception_fid(real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 100, feature: int = 2048,
                  weights: str | os.PathLike[str] | None = None) -> float | None:
    """True Inception FID via ``torchmetrics``, when it can run without a download.

    Needs ``torch-fidelity`` and its Inception weights: the file given as ``weights``, or else
    the one already in the torch hub cache (``torch.hub.get_dir()/checkpoints``). The weights
    file is always passed to ``torchmetrics`` explicitly, so nothing is ever downloaded. When
    torch-fidelity or the weights are missing this logs why and returns ``None`` immediately.

    Args:
        real: Real images ``(N, C, H, W)`` in ``[-1, 1]`` (grey images are repeated to RGB;
            values outside ``[-1, 1]`` are clamped).
        fake: Generated images, same layout.
        batch_size: Images per Inception forward.
        feature: Inception layer whose features are compared, one of
            :data:`INCEPTION_FEATURES` (2048, pool3, is the FID everyone reports).
        weights: A torch-fidelity Inception weights file
            (``weights-inception-2015-12-05-6726825d.pth``) to use instead of the hub cache.

    Returns:
        The FID, or ``None`` when Inception is unavailable.

    Raises:
        ValueError: ``feature`` is not one of :data:`INCEPTION_FEATURES`, or the images are not
            ``(N, 1 or 3, H, W)`` with at least 2 of each.
        FileNotFoundError: ``weights`` was given and does not exist.
    """
    if feature not in INCEPTION_FEATURES:
        raise ValueError(f"feature must be one of {INCEPTION_FEATURES} (2048 is the standard FID), got {feature!r}")
    for name, images in (("real", real), ("fake", fake)):
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] < 2:
            raise ValueError(f"{name} images must be (N, 1 or 3, H, W) with N >= 2, got shape {tuple(images.shape)}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        logger.info("Inception FID skipped: torch-fidelity is not installed (torchmetrics needs it for Inception)")
        return None
    if weights is not None:
        given = Path(weights)
        path: Path | None = given
        if not given.is_file():
            raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist; pass the torch-fidelity "
                                    "file weights-inception-2015-12-05-6726825d.pth, or weights=None for the hub cache")
    else:
        path = inception_weights_path()
    if path is None:
        logger.info("Inception FID skipped: no cached Inception weights in %s/checkpoints (nothing is downloaded)",
                    torch.hub.get_dir())
        return None
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=feature, normalize=True, feature_extractor_weights_path=str(path))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", never a crash
        logger.info("Inception FID skipped: %s: %s", type(exc).__name__, exc)
        return None
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            x = ((chunk.detach().float().clamp(-1, 1) + 1) / 2).cpu()
            metric.update(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, real=is_real)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------- 2-D toys


@dataclass(frozen=True)
class ModeCoverage:
    """Mode coverage of samples from a 2-D Gaussian mixture.

    Attributes:
        modes_covered: Modes that received at least ``min_count`` high-quality samples.
        modes: Number of modes.
        high_quality_rate: Share of samples within ``threshold`` standard deviations of their
            nearest mode centre.
        counts: High-quality samples per mode.
        min_count: The count a mode needed to be covered.
    """

    modes_covered: int
    modes: int
    high_quality_rate: float
    counts: tuple[int, ...]
    min_count: int


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, std: float, *, threshold: float = 3.0,
                  min_count: int | None = None, min_fraction: float = 0.01) -> ModeCoverage:
    """Modes covered and high-quality-sample rate (the protocol of Unrolled GAN / VEEGAN / PacGAN).

    A sample is *high quality* when its distance to the nearest mode centre is at most
    ``threshold * std``; it is then assigned to that mode. A mode is *covered* when it received at
    least ``min_count`` high-quality samples (default: ``max(1, ceil(min_fraction * N))``,
    i.e. 1 % of the samples).

    Args:
        samples: ``(N, 2)`` generated points.
        centers: ``(modes, 2)`` mode centres.
        std: Standard deviation of each mode.
        threshold: High-quality radius in standard deviations.
        min_count: Samples a mode needs to count as covered.
        min_fraction: Default ``min_count`` as a fraction of ``N``.

    Returns:
        A :class:`ModeCoverage`.
    """
    x = torch.as_tensor(samples, dtype=torch.float64)
    c = torch.as_tensor(centers, dtype=torch.float64)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"samples {tuple(x.shape)} and centers {tuple(c.shape)} must be (N, d) and (modes, d)")
    if x.shape[0] == 0:
        raise ValueError("no samples")
    distance, nearest = torch.cdist(x, c).min(dim=1)
    good = distance <= threshold * std
    counts = torch.bincount(nearest[good], minlength=c.shape[0])
    need = min_count if min_count is not None else max(1, math.ceil(min_fraction * x.shape[0]))
    return ModeCoverage(int((counts >= need).sum()), int(c.shape[0]), float(good.double().mean()),
                        tuple(int(v) for v in counts), int(need))
