"""Offline metrics: Fréchet distance and KID against torchmetrics / pytorch-fid, the digits feature
extractor and its cache, Inception FID's quick skip, and 2-D mode coverage with hand-checked values."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sparsegan.metrics
from sparsegan.data import grid_of_gaussians, load_digits, ring_of_gaussians
from sparsegan.metrics import (
    digits_feature_extractor,
    evaluate_images,
    extract_features,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
    inception_fid,
    inception_weights_path,
    kernel_inception_distance,
    mmd2_unbiased,
    mode_coverage,
    polynomial_kernel,
)


class _Features(nn.Module):
    """A fixed random feature map shared by sparsegan and the reference implementations."""

    num_features = 16

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(3 * 8 * 8, 16, generator=gen, dtype=torch.float64) / 8,
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1).double() @ self.weight) + 0.1 * x.flatten(1)[:, :16].double() ** 2


def _images(seed: int, n: int = 400, shift: float = 0.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=gen) + shift


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pytorch-fid passes scipy's deprecated disp=
def test_frechet_distance_matches_torchmetrics_and_pytorch_fid() -> None:
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import FrechetInceptionDistance

    net = _Features()
    real, fake = _images(1), _images(2, shift=0.15)
    f_real, f_fake = net(real), net(fake)
    ours = frechet_distance_from_features(f_real, f_fake)

    metric = FrechetInceptionDistance(feature=net)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert _rel(ours, float(metric.compute())) < 1e-8  # the bar; measured ~1e-15

    (mu1, s1), (mu2, s2) = feature_statistics(f_real), feature_statistics(f_fake)
    reference = calculate_frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert _rel(ours, float(reference)) < 1e-8
    assert ours > 0.01


def test_frechet_distance_closed_forms() -> None:
    # identical sets: 0; diagonal Gaussians: |mu1 - mu2|^2 + sum (s1 - s2)^2 for standard deviations s
    x = torch.randn(300, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(frechet_distance_from_features(x, x)) < 1e-9
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    sd1, sd2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 2.0, 0.0])  # a singular covariance too
    expected = float(((mu1 - mu2) ** 2).sum() + ((sd1 - sd2) ** 2).sum())  # 5 + 4.25
    assert frechet_distance(mu1, torch.diag(sd1**2), mu2, torch.diag(sd2**2)) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 3))


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_matches_torchmetrics() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd

    net = _Features()
    real, fake = _images(3, 300), _images(4, 200, shift=0.2)
    metric = KernelInceptionDistance(feature=net, subsets=4, subset_size=50)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(123)
    ref_mean, ref_std = (float(v) for v in metric.compute())
    torch.manual_seed(123)  # seed=None draws the subsets from the global RNG in torchmetrics' order
    mean, std = kernel_inception_distance(net(real), net(fake), subsets=4, subset_size=50, seed=None)
    assert _rel(mean, ref_mean) < 1e-6 and _rel(std, ref_std) < 1e-6

    f_real, f_fake = net(real)[:100], net(fake)[:100]
    ours = mmd2_unbiased(polynomial_kernel(f_real, f_real), polynomial_kernel(f_fake, f_fake),
                         polynomial_kernel(f_real, f_fake))
    assert _rel(ours, float(poly_mmd(f_real, f_fake))) < 1e-9
    # one subset holding every sample does not depend on the draw
    full = kernel_inception_distance(f_real, f_fake, subsets=1, subset_size=100, seed=7)
    assert full[0] == pytest.approx(ours, rel=1e-12) and full[1] == 0.0
    # the default seed (0) makes repeated calls identical, and the seed does pick the subsets
    default = kernel_inception_distance(net(real), net(fake), subsets=3, subset_size=40)
    assert default == kernel_inception_distance(net(real), net(fake), subsets=3, subset_size=40)
    assert default == kernel_inception_distance(net(real), net(fake), subsets=3, subset_size=40, seed=0)
    assert default != kernel_inception_distance(net(real), net(fake), subsets=3, subset_size=40, seed=1)


def test_mode_coverage_hand_checked_ring() -> None:
    ring = ring_of_gaussians(8, radius=2.0, std=0.02)  # high quality = within 0.06 of a centre
    c = ring.centers.double()
    points = [c[k] + torch.tensor([0.05, 0.0], dtype=torch.float64) for k in range(6) for _ in range(3)]
    points.append(c[6] + torch.tensor([0.0, 0.059], dtype=torch.float64))  # just inside
    points.append(c[7] + torch.tensor([0.07, 0.0], dtype=torch.float64))  # just outside
    points.append(torch.zeros(2, dtype=torch.float64))  # the centre of the ring: far from every mode
    samples = torch.stack(points)
    result = mode_coverage(samples, ring.centers, ring.std, min_count=2)
    assert result.counts == (3, 3, 3, 3, 3, 3, 1, 0)
    assert result.modes_covered == 6 and result.modes == 8
    assert result.high_quality_rate == pytest.approx(19 / 21)
    # default threshold: 1 % of 21 samples rounds up to 1 sample
    default = mode_coverage(samples, ring.centers, ring.std)
    assert default.min_count == 1 and default.modes_covered == 7


def test_mode_coverage_of_true_samples_and_of_a_collapsed_generator() -> None:
    ring = ring_of_gaussians()
    true = mode_coverage(ring.sample(40_000, torch.Generator().manual_seed(0)), ring.centers, ring.std)
    # in 2-D, P(|x - mu| <= 3 sigma) = 1 - exp(-9/2) = 0.98889; standard error at n = 40000 is 0.0005
    assert true.modes_covered == 8
    assert true.high_quality_rate == pytest.approx(1 - math.exp(-4.5), abs=0.003)

    grid = grid_of_gaussians(5, spacing=2.0, std=0.05)
    gen = torch.Generator().manual_seed(1)
    kept = grid.centers[[0, 6, 12, 18, 24]]  # the diagonal: 5 of 25 modes
    collapsed = kept[torch.randint(5, (1000,), generator=gen)] + 0.05 * torch.randn(1000, 2, generator=gen)
    result = mode_coverage(collapsed, grid.centers, grid.std)
    assert result.modes_covered == 5 and result.min_count == 10
    assert result.high_quality_rate > 0.97


@pytest.fixture(scope="module")
def extractor(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("extractor-cache")
    start = time.perf_counter()
    net = digits_feature_extractor(16, cache=cache, epochs=3)
    net.trained_in = time.perf_counter() - start  # type: ignore[attr-defined]
    net.cache = cache  # type: ignore[attr-defined]
    return net


def test_digits_extractor_is_accurate_and_cached(extractor, monkeypatch: pytest.MonkeyPatch) -> None:
    assert extractor.accuracy is not None and extractor.accuracy > 0.85
    files = list(Path(extractor.cache).glob("digits-features-*16px*.pt"))
    assert len(files) == 1

    def no_training(*args: object) -> None:
        raise AssertionError("trained again although the cache holds this extractor")

    # retraining with the same seed would give the same weights: only a refusal to train shows the cache was read
    monkeypatch.setattr(sparsegan.metrics, "_train_digits_extractor", no_training)
    again = digits_feature_extractor(16, cache=extractor.cache, epochs=3)
    assert again.accuracy == extractor.accuracy
    for (name, a), b in zip(extractor.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in again.parameters())
    # the epochs are part of the cache key: another training length is not served from that file
    with pytest.raises(AssertionError, match="trained again"):
        digits_feature_extractor(16, cache=extractor.cache, epochs=4)


def test_digits_features_separate_real_from_fake(extractor) -> None:
    data = load_digits(16)
    real, held_out = data.images[::2], data.images[1::2]
    noise = torch.rand(len(held_out), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(held_out, 3, stride=1, padding=1)
    feats = extract_features(extractor, real)
    good = evaluate_images(real, held_out, extractor, real_features=feats, kid_subsets=5, kid_subset_size=200)
    blurry = evaluate_images(real, blurred, extractor, real_features=feats, kid_subsets=5, kid_subset_size=200)
    bad = evaluate_images(real, noise, extractor, real_features=feats, kid_subsets=5, kid_subset_size=200)
    assert good["fd"] < blurry["fd"] < bad["fd"]
    assert good["kid_mean"] < bad["kid_mean"]
    assert good["classes_covered"] == 10 and good["confident_rate"] > bad["confident_rate"]
    # RGB input of another size is accepted (converted to grey, resized)
    assert extractor(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_inception_fid_skips_quickly_without_cached_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    images = torch.zeros(4, 1, 16, 16)
    with caplog.at_level(logging.INFO, logger="sparsegan.metrics"):
        assert inception_fid(images, images) is None  # no download attempt: there is no network here
    assert "Inception FID skipped" in caplog.text


_INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torch-fidelity Inception file with random (He-scaled) weights, so the real torchmetrics
    pipeline runs offline; the values mean nothing, but every step of inception_fid is exercised."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe  # requirements/testbed.txt

    with pytest.MonkeyPatch.context() as mp:  # build the network without loading (or downloading) weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *args, **kwargs: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *args, **kwargs: None)
        network = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    state = network.state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):  # default init shrinks activations to ~1e-7 after 90 layers
            state[key] = torch.randn(value.shape, generator=gen) * math.sqrt(2.0 / value[0].numel())
    path = tmp_path_factory.mktemp("hub") / "checkpoints" / _INCEPTION_FILE
    path.parent.mkdir()
    torch.save(state, path)
    return path


def _reference_inception_fd(weights: Path, real: torch.Tensor, fake: torch.Tensor, feature: int) -> float:
    """FID by hand: torchmetrics' Inception network on uint8 RGB images, pytorch-fid's formula."""
    from pytorch_fid.fid_score import calculate_frechet_distance
    from torchmetrics.image.fid import NoTrainInceptionV3

    network = NoTrainInceptionV3("inception-v3-compat", [str(feature)], str(weights))
    stats = []
    for images in (real, fake):
        as_uint8 = torch.floor((images.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).repeat(1, 3, 1, 1)
        with torch.no_grad():
            features = network(as_uint8).reshape(len(images), -1).double().numpy()
        stats += [features.mean(axis=0), np.cov(features, rowvar=False)]
    return float(calculate_frechet_distance(*stats))


def test_inception_fid_pipeline_matches_a_hand_computed_fid(random_inception_weights: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(1)
    real = torch.rand(12, 1, 16, 16, generator=gen) * 2 - 1
    fake = (torch.rand(12, 1, 16, 16, generator=gen) * 2 - 1) * 0.5
    reference = _reference_inception_fd(random_inception_weights, real, fake, 64)
    value = inception_fid(real, fake, feature=64, weights=random_inception_weights, batch_size=5)
    assert value is not None and reference > 0.1
    assert value == pytest.approx(reference, rel=1e-4)
    assert inception_fid(real, real, feature=64, weights=random_inception_weights) == pytest.approx(0.0, abs=1e-6)
    # found in the torch hub cache without weights=; the standard pool3 features run end to end
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(random_inception_weights.parent.parent))
    assert inception_weights_path() == random_inception_weights
    pool3 = inception_fid(real[:4], fake[:4])
    assert pool3 is not None and np.isfinite(pool3) and pool3 > 0


def test_inception_fid_rejects_bad_arguments(tmp_path: Path) -> None:
    images = torch.zeros(4, 1, 16, 16)
    with pytest.raises(ValueError, match="feature must be one of"):
        inception_fid(images, images, feature=100)
    with pytest.raises(ValueError, match="fake images must be"):
        inception_fid(images, torch.zeros(4, 16, 16))
    with pytest.raises(ValueError, match="N >= 2"):
        inception_fid(images[:1], images)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inception_fid(images, images, weights=tmp_path / "missing.pth")
