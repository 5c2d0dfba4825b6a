"""Learned image metrics on weights the user supplies: FID, LPIPS and temporal LPIPS (tLP).

Nothing is downloaded. `load_inception` and `load_lpips` read weight files the user already has (safetensors, or a
PyTorch file read with `weights_only=True`) whose names are those of the published files; a missing file, or one whose
names or shapes differ, raises `LmdiffInputError` naming the file and what was expected.

- `FIDInceptionV3`: pytorch-fid's Inception v3 (`pt_inception-2015-12-05-6726825d.pth`, TensorFlow's 2015-12-05
  graph): 2048-d pool features of frames resized to 299x299 (bilinear) and scaled to [-1, 1].
- `frechet_distance`, `fid`: Frechet distance between Gaussians fitted to the Inception features of two frame sets.
- `LPIPS`, `lpips`, `tlp`: LPIPS v0.1 (Zhang et al. 2018) on AlexNet or VGG16 features (torchvision's `features.N.*`
  names, the lpips package's linear heads `linK.model.1.weight`), per frame; tLP (TecoGAN): the mean difference of the
  LPIPS between consecutive frames of prediction and ground truth.

Frames are uint8 [T, H, W, 3] arrays or float [T, 3, H, W] tensors in [0, 1] (`metrics.as_frames`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import LmdiffInputError
from .metrics import as_frames
from .weights import check_state_dict, load_checked, read_state_dict

BATCH = 16
INCEPTION_SIZE = 299
INCEPTION_FILE = "pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth)"
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer, applied to input in [-1, 1]
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_BACKBONES = {"alex": "AlexNet", "vgg": "VGG16"}


# -- FID --------------------------------------------------------------------------------------------------------------
class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3) and ReLU: torchvision's BasicConv2d (`conv.*`, `bn.*`)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    """3x3 average pool, stride 1, leaving the zero padding out of the mean as TensorFlow does."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool(x))], 1)


class _InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = layer(branch7x7dbl)
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool(x))], 1)


class _InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    """InceptionE; the FID graph's last block (`max_pool`) pools its input branch with a 3x3 max, not an average."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(branch3x3),
                self.branch3x3_2b(branch3x3),
                self.branch3x3dbl_3a(branch3x3dbl),
                self.branch3x3dbl_3b(branch3x3dbl),
                self.branch_pool(pooled),
            ],
            1,
        )


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception v3 (inference only). `forward`: float [N, 3, H, W] in [0, 1] -> pool features
    [N, 2048]. Parameter names are those of `pt_inception-2015-12-05-6726825d.pth` (torchvision's Inception3 without
    AuxLogits); `fc`, the graph's 1008-class layer, is in that file and unused by FID."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _InceptionA(192, pool_features=32)
        self.Mixed_5c = _InceptionA(256, pool_features=64)
        self.Mixed_5d = _InceptionA(288, pool_features=64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b = _InceptionC(768, c7=128)
        self.Mixed_6c = _InceptionC(768, c7=160)
        self.Mixed_6d = _InceptionC(768, c7=160)
        self.Mixed_6e = _InceptionC(768, c7=192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b = _InceptionE(1280, max_pool=False)
        self.Mixed_7c = _InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(2 * x - 1)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        return x.mean(dim=(2, 3))


@torch.no_grad()
def inception_features(frames, inception: FIDInceptionV3, batch_size: int = BATCH) -> np.ndarray:
    """Pool features [N, 2048] (float64) of N frames, `batch_size` at a time on the network's device."""
    device = next(inception.parameters()).device
    batches = [
        inception(as_frames(frames[start : start + batch_size]).to(device)).double().cpu().numpy()
        for start in range(0, len(frames), batch_size)
    ]
    return np.concatenate(batches) if batches else np.zeros((0, 2048))


def _nonzero(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with those under numpy's rank tolerance (rounding errors) set to 0."""
    tolerance = max(eigenvalues.max(initial=0.0), 0.0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2): |mu1 - mu2|^2 + tr(s1 + s2 - 2 (s1 s2)^(1/2)).

    tr((s1 s2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric s1^(1/2) s2 s1^(1/2), with
    eigenvalues under numpy's rank tolerance taken as 0: real and exact to rounding for the singular covariances of
    few samples, where pytorch-fid's scipy sqrtm of s1 s2 carries the square roots of rounding errors (and takes
    seconds more at 2048 dimensions)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = len(mu1)
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise LmdiffInputError(
            f"Frechet distance needs means [D] and covariances [D, D] of one D, got {mu1.shape}, {sigma1.shape}, "
            f"{mu2.shape}, {sigma2.shape}"
        )
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(_nonzero(values))) @ vectors.T
    inner = root @ sigma2 @ root
    trace_sqrt = np.sqrt(_nonzero(np.linalg.eigvalsh((inner + inner.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_stats(frames, inception: FIDInceptionV3, batch_size: int = BATCH, name: str = "frames"):
    """(mean [2048], covariance [2048, 2048]) of the Inception features of a frame set (at least 2 frames)."""
    if len(frames) < 2:
        raise LmdiffInputError(f"FID needs at least 2 frames of the {name}, got {len(frames)}")
    features = inception_features(frames, inception, batch_size)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(pred_frames, truth_frames, inception: FIDInceptionV3, batch_size: int = BATCH, truth_stats=None) -> float:
    """FID between two frame sets (at least 2 frames each; it is biased upwards for small sets, so compare values
    only between sets of equal size). `truth_stats`: the ground truth's `inception_stats`, when already computed."""
    pred_stats = inception_stats(pred_frames, inception, batch_size, "prediction")
    if truth_stats is None:
        truth_stats = inception_stats(truth_frames, inception, batch_size, "ground truth")
    return frechet_distance(*pred_stats, *truth_stats)


# -- LPIPS ------------------------------------------------------------------------------------------------------------
def _alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` up to its last ReLU (indices 0-11)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    )


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 `features` up to its last ReLU (indices 0-29)."""
    layers, cin = [], 3
    for stage, (cout, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
        if stage:
            layers.append(nn.MaxPool2d(2, 2))
        for _ in range(convs):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            cin = cout
    return nn.Sequential(*layers)


_LPIPS_LAYERS = {  # backbone builder, `features` indices of the ReLUs compared, their channels
    "alex": (_alexnet_features, (1, 4, 7, 9, 11), (64, 192, 384, 256, 256)),
    "vgg": (_vgg16_features, (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)),
}


class _LinearHead(nn.Module):
    """1x1 convolution to one channel without bias; `model.0` was lpips' training dropout, so the weight is
    `model.1.weight`."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 (inference only) on backbone `net` ("alex" or "vgg", kept as `.net` for reports).
    `forward(x0, x1)`: float [N, 3, H, W] in [0, 1] -> distances [N]. Parameter names: `features.N.*` (torchvision's
    backbone) and `lin0.model.1.weight`..`lin4`."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _LPIPS_LAYERS:
            raise LmdiffInputError(f"LPIPS backbone must be one of {sorted(_LPIPS_LAYERS)}, got {net!r}")
        build, self.taps, channels = _LPIPS_LAYERS[net]
        self.net = net
        self.features = build()
        self.lins = [_LinearHead(c) for c in channels]
        for k, head in enumerate(self.lins):
            self.add_module(f"lin{k}", head)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        x = ((2 * torch.cat([x0, x1]) - 1) - self.shift) / self.scale
        total = 0
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                unit = x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
                a, b = unit.chunk(2)
                total = total + self.lins[self.taps.index(index)].model((a - b) ** 2).mean(dim=(1, 2, 3))
        return total


@torch.no_grad()
def _distances(a, b, net: LPIPS, batch_size: int) -> np.ndarray:
    device = next(net.parameters()).device
    batches = [
        net(as_frames(a[s : s + batch_size]).to(device), as_frames(b[s : s + batch_size]).to(device))
        for s in range(0, len(a), batch_size)
    ]
    return torch.cat(batches).double().cpu().numpy() if batches else np.zeros(0)


def _check_pair(pred, truth, minimum: int) -> None:
    if tuple(pred.shape) != tuple(truth.shape):
        raise LmdiffInputError(f"prediction {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in shape")
    if len(pred) < minimum:
        raise LmdiffInputError(f"needs at least {minimum} frames, got {len(pred)}")


def lpips(pred, truth, net: LPIPS, batch_size: int = BATCH) -> np.ndarray:
    """LPIPS of each frame [T] (float64) between prediction and ground truth of one shape; 0 for identical frames."""
    _check_pair(pred, truth, 1)
    return _distances(pred, truth, net, batch_size)


def lpips_changes(frames, net: LPIPS, batch_size: int = BATCH) -> np.ndarray:
    """LPIPS between consecutive frames [T - 1]: how much a video changes, perceptually, from frame to frame."""
    return _distances(frames[:-1], frames[1:], net, batch_size)


def tlp(pred, truth, net: LPIPS, batch_size: int = BATCH, truth_changes=None) -> float:
    """Temporal LPIPS (TecoGAN): mean over t of |LPIPS(pred_t, pred_t+1) - LPIPS(truth_t, truth_t+1)|; 0 when the
    prediction changes between frames as much, perceptually, as the ground truth. `truth_changes`: the ground
    truth's `lpips_changes`, when already computed."""
    _check_pair(pred, truth, 2)
    if truth_changes is None:
        truth_changes = lpips_changes(truth, net, batch_size)
    return float(np.abs(lpips_changes(pred, net, batch_size) - truth_changes).mean())


# -- loading ----------------------------------------------------------------------------------------------------------
def load_inception(path, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """pytorch-fid's FID Inception from `pt_inception-2015-12-05-6726825d.pth` (or the same tensors as safetensors)."""
    return load_checked(FIDInceptionV3(), path, INCEPTION_FILE, device)


def load_lpips(backbone_path, linear_path=None, net: str = "alex", device: str | torch.device = "cpu") -> LPIPS:
    """LPIPS from torchvision's ImageNet backbone file (alexnet-owt-7be5be79.pth, vgg16-397923af.pth; `classifier.*`
    is ignored) and the lpips package's linear file (weights/v0.1/alex.pth or vgg.pth); without `linear_path` the
    backbone file must hold the `linK.model.1.weight` heads too (an `LPIPS(net).state_dict()` as saved)."""
    model = LPIPS(net)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    backbone_name = f"torchvision's {LPIPS_BACKBONES[net]} weights"
    state = read_state_dict(backbone_path, backbone_name)
    state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    if linear_path is not None:
        backbone = {k: s for k, s in expected.items() if k.startswith("features.")}
        check_state_dict(backbone_path, state, backbone, backbone_name)
        heads = {k: s for k, s in expected.items() if k.startswith("lin")}
        what = f"lpips v0.1 {net} linear heads (weights/v0.1/{net}.pth)"
        linear = read_state_dict(linear_path, what)
        check_state_dict(linear_path, linear, heads, what)
        state.update(linear)
    return load_checked(
        model, backbone_path, f"LPIPS-{net} weights ({backbone_name} and lin0-lin4 heads)", device, state
    )
