"""Learned metrics (FID, LPIPS, tLP) on real frames with randomly initialised networks.

The published weights are not available here, so these tests check the plumbing, the loaders and that the state-dict
names and shapes are those of the published files (parameter counts derived from torchvision's documented totals);
the Frechet distance is checked against independent computations."""

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from lmdiff_core import learned_metrics as lm
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import iter_frames

from .conftest import shared_path


@pytest.fixture(scope="module")
def frames():
    """8 real 512x512 frames of a talking head."""
    return np.stack(list(iter_frames(shared_path("data/clips/macron_fr.mp4"), 25.0, max_frames=8)))


def _noisy(frames: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def _random_inception() -> lm.FIDInceptionV3:
    """Random-initialised FID Inception; He-initialised convolutions keep the 2048-d features at an O(1) scale."""
    torch.manual_seed(0)
    model = lm.FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def _random_lpips(net: str, seed: int = 0) -> lm.LPIPS:
    """Random-initialised LPIPS with non-negative linear heads, so a distance is a sum of non-negative terms."""
    torch.manual_seed(seed)
    model = lm.LPIPS(net)
    for head in model.lins:
        head.model[1].weight.abs_()
    return model


def test_frechet_distance_against_independent_computations():
    rng = np.random.default_rng(0)
    # diagonal covariances: closed form |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert lm.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # full-rank covariances: scipy's matrix square root of s1 s2 (as pytorch-fid computes it)
    a, b = rng.normal(size=(40, 12)), rng.normal(size=(50, 12)) @ rng.normal(size=(12, 12)) + 0.5
    m1, s1, m2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    reference = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert lm.frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-8)
    # singular covariances of few samples: tr((s1 s2)^(1/2)) is the nuclear norm of A B^T / sqrt((n-1)(m-1))
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(7, 30))
    ac, bc = a - a.mean(0), b - b.mean(0)
    trace_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt(4 * 6)
    reference = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.sum(ac**2) / 4 + np.sum(bc**2) / 6 - 2 * trace_sqrt
    stats_a, stats_b = (a.mean(0), np.cov(a, rowvar=False)), (b.mean(0), np.cov(b, rowvar=False))
    assert lm.frechet_distance(*stats_a, *stats_b) == pytest.approx(reference, rel=1e-10)
    assert lm.frechet_distance(*stats_a, *stats_a) == pytest.approx(0, abs=1e-10)
    assert lm.frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    assert lm.frechet_distance(m1, s1, m1 + 0.1, s1) == pytest.approx(12 * 0.01, rel=1e-6)
    with pytest.raises(LmdiffInputError, match="covariances"):
        lm.frechet_distance(m1, s1, mu1, np.diag(v1))


def test_fid_of_a_set_with_itself_and_with_heavy_noise(frames):
    """Random-initialised Inception: 2048-d features; FID 0 for a set with itself, large against heavy noise."""
    inception = _random_inception()
    real = frames[:3]
    features = lm.inception_features(real, inception, batch_size=2)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    mu, sigma = features.mean(axis=0), np.cov(features, rowvar=False)
    total_variance = np.trace(sigma)
    assert total_variance > 0
    assert abs(lm.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * total_variance
    assert lm.fid(_noisy(real, 60), real, inception) > 0.1 * total_variance
    with pytest.raises(LmdiffInputError, match="at least 2 frames"):
        lm.fid(real[:1], real, inception)


def test_lpips_zero_symmetric_and_growing_with_noise(frames):
    """Random-initialised AlexNet and VGG16 backbones with non-negative heads, on a real frame (downscaled)."""
    for net, step in (("alex", 4), ("vgg", 8)):
        model = _random_lpips(net)
        video = frames[:4, ::step, ::step]
        assert lm.lpips(video, video, model).tolist() == [0.0] * 4
        other = video[[3, 2, 1, 0]]
        forward, backward = lm.lpips(video, other, model, batch_size=3), lm.lpips(other, video, model)
        assert forward.shape == (4,) and forward[0] > 0
        np.testing.assert_allclose(forward, backward, rtol=1e-5)
        by_noise = [float(lm.lpips(_noisy(video[:1], sigma), video[:1], model)[0]) for sigma in (4, 16, 48)]
        assert 0 < by_noise[0] < by_noise[1] < by_noise[2], (net, by_noise)
    assert lm.LPIPS().net == "alex"
    with pytest.raises(LmdiffInputError, match="squeeze"):
        lm.LPIPS("squeeze")
    with pytest.raises(LmdiffInputError, match="differ in shape"):
        lm.lpips(frames[:2], frames[:3], model)


def test_tlp(frames):
    """Random-initialised AlexNet LPIPS: tLP 0 for identical videos; a frozen prediction scores the ground truth's own
    mean frame-to-frame LPIPS."""
    model = _random_lpips("alex")
    video = frames[:6, ::4, ::4]
    assert lm.tlp(video, video, model) == 0.0
    frozen = video[[0] * len(video)]
    own_change = lm.lpips(video[:-1], video[1:], model).mean()
    assert own_change > 0
    assert lm.tlp(frozen, video, model) == pytest.approx(own_change, rel=1e-6)
    with pytest.raises(LmdiffInputError, match="at least 2 frames"):
        lm.tlp(video[:1], video[:1], model)


def test_inception_state_dict_round_trip_and_wrong_files(frames, tmp_path):
    """Random-initialised Inception saved as safetensors and as a .pth without BN counters loads to the same
    features; missing, foreign and unreadable files raise naming the file."""
    model = _random_inception()
    path = tmp_path / "pt_inception.safetensors"
    save_file(model.state_dict(), str(path))
    expected = lm.inception_features(frames[:2], model)
    np.testing.assert_array_equal(lm.inception_features(frames[:2], lm.load_inception(path)), expected)
    legacy = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, legacy)
    assert (
        lm.load_inception(legacy)
        .state_dict()["Mixed_7c.branch_pool.conv.weight"]
        .equal(model.state_dict()["Mixed_7c.branch_pool.conv.weight"])
    )

    foreign = tmp_path / "imagenet_inception.pth"
    torch.save({"fc.weight": torch.zeros(1000, 2048), "AuxLogits.fc.weight": torch.zeros(1000, 768)}, foreign)
    with pytest.raises(LmdiffInputError) as error:
        lm.load_inception(foreign)
    message = str(error.value)
    assert str(foreign) in message and "pt_inception-2015-12-05" in message
    assert "Conv2d_1a_3x3.conv.weight" in message and "AuxLogits.fc.weight" in message
    assert "fc.weight (1000, 2048) for (1008, 2048)" in message
    with pytest.raises(LmdiffInputError, match="does not exist"):
        lm.load_inception(tmp_path / "absent.pth")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not weights")
    with pytest.raises(LmdiffInputError, match="garbage.safetensors"):
        lm.load_inception(garbage)


def test_lpips_round_trip_from_the_published_file_layouts(frames, tmp_path):
    """Random-initialised LPIPS written as torchvision's backbone file (with its classifier) plus the lpips package's
    linear file, and as one file, loads to the same distances; mismatched files raise naming the file."""
    for net, step in (("alex", 4), ("vgg", 8)):
        video = frames[:3, ::step, ::step]
        model = _random_lpips(net, seed=1)
        expected = lm.lpips(video, video[::-1].copy(), model)
        state = model.state_dict()
        backbone = {k: v for k, v in state.items() if k.startswith("features.")}
        backbone["classifier.1.weight"] = torch.zeros(4, 4)  # torchvision files carry the classifier, ignored here
        backbone_path, linear_path = tmp_path / f"{net}-backbone.safetensors", tmp_path / f"{net}.pth"
        save_file(backbone, str(backbone_path))
        torch.save({k: v for k, v in state.items() if k.startswith("lin")}, linear_path)
        loaded = lm.load_lpips(backbone_path, linear_path, net=net)
        np.testing.assert_array_equal(lm.lpips(video, video[::-1].copy(), loaded), expected)
        combined = tmp_path / f"{net}-lpips.safetensors"
        save_file(state, str(combined))
        np.testing.assert_array_equal(lm.lpips(video, video[::-1].copy(), lm.load_lpips(combined, net=net)), expected)

    with pytest.raises(LmdiffInputError) as error:
        lm.load_lpips(tmp_path / "alex.pth", tmp_path / "alex.pth")  # linear heads given as the backbone
    assert "alex.pth is not torchvision's AlexNet weights" in str(error.value) and "features.0.weight" in str(
        error.value
    )
    with pytest.raises(LmdiffInputError, match="vgg.pth is not lpips v0.1 alex linear heads.*wrong shapes"):
        lm.load_lpips(tmp_path / "alex-backbone.safetensors", tmp_path / "vgg.pth", net="alex")
    with pytest.raises(LmdiffInputError, match="vgg-backbone.safetensors is not LPIPS-vgg weights.*missing keys"):
        lm.load_lpips(tmp_path / "vgg-backbone.safetensors", net="vgg")


def test_state_dict_names_are_those_of_the_published_files():
    """Random-initialised networks: names and shapes of pytorch-fid's FID Inception file (torchvision's Inception3 with
    1008 classes and no AuxLogits), torchvision's AlexNet/VGG16 `features` and lpips' linear heads."""
    inception = lm.FIDInceptionV3().state_dict()
    shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    assert {k: tuple(inception[k].shape) for k in shapes} == shapes
    assert not any(k.startswith("AuxLogits") for k in inception)
    # torchvision documents 27,161,264 parameters for Inception3 (1000 classes, with AuxLogits: 3,326,696)
    params = sum(v.numel() for k, v in inception.items() if not k.endswith(("running_mean", "running_var", "tracked")))
    assert params == 27_161_264 - 3_326_696 - (2048 * 1000 + 1000) + (2048 * 1008 + 1008)

    # torchvision documents 61,100,840 (AlexNet) and 138,357,544 (VGG16) parameters, of which the classifier's three
    # linear layers hold 58,631,144 and 123,642,856
    for net, last_conv, channels, features in (
        ("alex", "features.10.weight", (64, 192, 384, 256, 256), 61_100_840 - 58_631_144),
        ("vgg", "features.28.weight", (64, 128, 256, 512, 512), 138_357_544 - 123_642_856),
    ):
        state = lm.LPIPS(net).state_dict()
        assert "features.0.weight" in state and tuple(state[last_conv].shape) == (channels[-1], channels[-1], 3, 3)
        assert sum(v.numel() for k, v in state.items() if k.startswith("features.")) == features
        heads = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("features.")}
        assert heads == {f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(channels)}
