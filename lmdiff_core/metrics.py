"""Quality metrics of generated talking-head video against ground truth: image, landmark, sync and temporal.

Frames are float tensors [T, 3, H, W] in [0, 1] (or uint8 [T, H, W, 3] arrays, converted by `as_frames`); masks are
[T, 1, H, W] in [0, 1]; landmarks are `LandmarkSequence`s of the same frames.

- `mean_psnr`: the mean over frames of each frame's PSNR, as talking-head papers report it; `psnr`: the PSNR of the
  mean squared error pooled over all frames (what `lmdiff eval` called PSNR before), full frame or inside a mask.
- `ssim`: Wang et al.'s SSIM ("Image quality assessment: from error visibility to structural similarity", IEEE TIP
  2004) as scikit-image computes it for the published tables (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  population covariances, per RGB channel, pixels whose window lies inside the frame); mean over frames.
- `landmark_distance` (LMD): mean point distance over the inter-ocular distance of the ground truth, all points or a
  part ("mouth": the lips).
- `mouth_opening_correlation`: Pearson correlation over time of the inner-lip gap (a sync measure needing no
  weights).
- `frame_difference_error`: mean squared difference between the prediction's and the ground truth's frame-to-frame
  changes (flicker that the real video does not have), optionally inside a mask.
- `landmark_jitter`: mean second difference of landmark positions (inter-ocular units per frame^2); compare the
  prediction's with the ground truth's.
- `cpbd`: cumulative probability of blur detection (Narvekar & Karam 2011), a no-reference sharpness in [0, 1].
- `IdentityEncoder`, `ArcFaceEncoder` / `csim`: cosine similarity of face identity embeddings: dlib's face descriptor
  (ships with the `dlib` extra), or the ArcFace model of an insightface pack given as a path (run by onnxruntime).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import get_topology

CPBD_BETA = 3.6
CPBD_P_JNB = 0.63
CPBD_BLOCK = 64
CPBD_EDGE_FRACTION = 0.002  # a block counts as an edge block when this share of its pixels are edges


def as_frames(frames) -> torch.Tensor:
    """uint8 [T, H, W, 3] array / float [T, 3, H, W] tensor -> float32 [T, 3, H, W] in [0, 1]."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise LmdiffInputError(f"frames must be [T, H, W, 3], got {frames.shape}")
        return torch.from_numpy(np.array(frames, dtype=np.float32)).permute(0, 3, 1, 2) / 255.0
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[1] != 3:
        raise LmdiffInputError(f"frames must be a [T, 3, H, W] tensor or [T, H, W, 3] uint8 array, got {frames!r:.80}")
    return frames.float()


def _pair(pred, truth) -> tuple[torch.Tensor, torch.Tensor]:
    pred, truth = as_frames(pred), as_frames(truth)
    if pred.shape != truth.shape:
        raise LmdiffInputError(f"prediction {tuple(pred.shape)} and ground truth {tuple(truth.shape)} differ in shape")
    return pred, truth


def psnr(pred, truth, mask: torch.Tensor | None = None) -> float:
    """PSNR (dB) of the mean squared error pooled over all frames (inside `mask` when given); inf for identical
    frames. Published tables average per-frame PSNR instead: `mean_psnr`."""
    pred, truth = _pair(pred, truth)
    if mask is None:
        mse = float(((pred - truth) ** 2).mean())
    else:
        weight = mask.float().expand_as(pred)
        mse = float(((pred - truth) ** 2 * weight).sum() / weight.sum().clamp(min=1e-8))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def frame_psnr(pred, truth) -> np.ndarray:
    """[T] PSNR (dB) of each frame (peak 1.0); inf for a frame identical to its ground truth."""
    pred, truth = _pair(pred, truth)
    mse = ((pred.double() - truth.double()) ** 2).mean(dim=(1, 2, 3)).numpy()
    with np.errstate(divide="ignore"):
        return -10 * np.log10(mse)


def mean_psnr(pred, truth) -> float:
    """The mean over frames of each frame's PSNR (dB), the talking-head papers' PSNR. Frames identical to the ground
    truth (infinite PSNR) are left out; inf when every frame is identical."""
    values = frame_psnr(pred, truth)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else math.inf


SSIM_SIGMA = 1.5  # Gaussian window of Wang et al.'s SSIM: sigma 1.5 px, truncated at 3.5 sigma (11 taps, as skimage)
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def ssim_map(pred, truth) -> torch.Tensor:
    """Wang et al.'s SSIM per pixel [T, 1, H - 10, W - 10] float64, averaged over the RGB channels, for the pixels
    whose 11x11 window lies inside the frame (see the module docstring; peak 1.0)."""
    import torch.nn.functional as F

    pred, truth = _pair(pred, truth)
    x, y = pred.double(), truth.double()
    taps = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    channels = x.shape[1]
    rows, cols = g.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), g.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)

    def blur(v: torch.Tensor) -> torch.Tensor:  # separable 'valid' Gaussian filter
        return F.conv2d(F.conv2d(v, rows, groups=channels), cols, groups=channels)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=1, keepdim=True)


def ssim(pred, truth, mask: torch.Tensor | None = None) -> float:
    """Mean SSIM (`ssim_map`) over the frames, inside `mask` [T, 1, H, W] when given."""
    values = ssim_map(pred, truth)
    if mask is None:
        return float(values.mean())
    r = SSIM_RADIUS
    weight = mask.double()[..., r:-r, r:-r]
    return float((values * weight).sum() / weight.sum().clamp(min=1e-8))


def _landmark_pair(pred: LandmarkSequence, truth: LandmarkSequence) -> tuple[np.ndarray, np.ndarray]:
    if len(pred) != len(truth):
        raise LmdiffInputError(f"{len(pred)} predicted landmark frames for {len(truth)} ground-truth frames")
    if pred.topology != truth.topology:
        pred = pred.to_topology(truth.topology)
    return pred.points[..., :2], truth.points[..., :2]


def landmark_distance(pred: LandmarkSequence, truth: LandmarkSequence, part: str | None = None) -> float:
    """LMD: mean 2D point distance over the ground truth's inter-ocular distance; `part`: None (all) or "mouth"."""
    p, t = _landmark_pair(pred, truth)
    if part == "mouth":
        topo = get_topology(truth.topology)
        index = np.union1d(topo.part_indices("outer_lips"), topo.part_indices("inner_lips"))
        p, t = p[:, index], t[:, index]
    elif part is not None:
        raise LmdiffInputError(f"landmark_distance part must be None or 'mouth', got {part!r}")
    iod = np.maximum(truth.inter_ocular(), 1e-6)
    return float((np.linalg.norm(p - t, axis=-1).mean(axis=1) / iod).mean())


def mouth_opening_correlation(pred: LandmarkSequence, truth: LandmarkSequence) -> float:
    """Pearson correlation over time of the inner-lip gap of prediction and ground truth (nan if either is still)."""
    if len(pred) != len(truth):
        raise LmdiffInputError(f"{len(pred)} predicted landmark frames for {len(truth)} ground-truth frames")
    a, b = pred.mouth_opening(), truth.mouth_opening()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def frame_difference_error(pred, truth, mask: torch.Tensor | None = None) -> float:
    """Mean squared difference of frame-to-frame changes, (p[t+1] - p[t]) - (g[t+1] - g[t]), inside `mask`."""
    pred, truth = _pair(pred, truth)
    if len(pred) < 2:
        raise LmdiffInputError("frame_difference_error needs at least 2 frames")
    error = (pred.diff(dim=0) - truth.diff(dim=0)) ** 2
    if mask is None:
        return float(error.mean())
    weight = mask.float()[1:].expand_as(error) if len(mask) == len(pred) else mask.float().expand_as(error)
    return float((error * weight).sum() / weight.sum().clamp(min=1e-8))


def landmark_jitter(seq: LandmarkSequence) -> float:
    """Mean norm of the second difference of the 2D landmarks, in inter-ocular distances per frame^2."""
    if len(seq) < 3:
        raise LmdiffInputError("landmark_jitter needs at least 3 frames")
    second = np.diff(seq.points[..., :2], n=2, axis=0)
    iod = np.maximum(seq.inter_ocular()[1:-1], 1e-6)
    return float((np.linalg.norm(second, axis=-1).mean(axis=1) / iod).mean())


# -- CPBD -------------------------------------------------------------------------------------------------------------
def _edge_widths(gray: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Width (pixels) of each vertical edge at the `edges` pixels: the run between the nearest local extrema left and
    right of the pixel along its row, following the sign of the horizontal gradient (Marziliano et al.)."""
    rows, cols = np.nonzero(edges)
    gx = np.gradient(gray, axis=1)
    widths = np.empty(len(rows))
    w = gray.shape[1]
    for k, (r, c) in enumerate(zip(rows, cols)):
        line = gray[r]
        rising = gx[r, c] > 0
        left = c
        while left > 0 and ((line[left - 1] < line[left]) if rising else (line[left - 1] > line[left])):
            left -= 1
        right = c
        while right < w - 1 and ((line[right + 1] > line[right]) if rising else (line[right + 1] < line[right])):
            right += 1
        widths[k] = right - left
    return widths


def cpbd(frame) -> float:
    """Sharpness of one frame (uint8 [H, W, 3] or float [3, H, W]): the share of detected edges whose blur stays below
    the just-noticeable level (Narvekar & Karam 2011). Higher is sharper; blurring lowers it."""
    from scipy.ndimage import sobel

    image = as_frames(frame[None] if np.ndim(frame) == 3 else frame)[0]
    gray = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).numpy().astype(np.float64) * 255.0
    # vertical edges as MATLAB's edge(I, "sobel", "vertical") finds them (which the CPBD paper uses): squared
    # horizontal Sobel response above 4x its mean, thinned to the row-wise maxima
    strength = sobel(gray, axis=1) ** 2
    thinned = np.zeros_like(strength, dtype=bool)
    thinned[:, 1:-1] = (strength[:, 1:-1] >= strength[:, :-2]) & (strength[:, 1:-1] >= strength[:, 2:])
    edges = thinned & (strength > 4 * strength.mean())
    h, w = gray.shape
    probabilities = []
    for top in range(0, h - CPBD_BLOCK + 1, CPBD_BLOCK):
        for left in range(0, w - CPBD_BLOCK + 1, CPBD_BLOCK):
            block = (slice(top, top + CPBD_BLOCK), slice(left, left + CPBD_BLOCK))
            block_edges = np.zeros_like(edges)
            block_edges[block] = edges[block]
            if block_edges.sum() <= CPBD_EDGE_FRACTION * CPBD_BLOCK * CPBD_BLOCK:
                continue
            contrast = gray[block].max() - gray[block].min()
            width_jnb = 5.0 if contrast <= 50 else 3.0
            widths = _edge_widths(gray, block_edges)
            probabilities.append(1.0 - np.exp(-((widths / width_jnb) ** CPBD_BETA)))
    if not probabilities:
        return 0.0
    p = np.concatenate(probabilities)
    return float((p <= CPBD_P_JNB).mean())


# -- identity -----------------------------------------------------------------------------------------------------------
class IdentityEncoder:
    """dlib's 128-d face descriptor (ResNet, from the face_recognition_models package) of a face given by its 68
    landmarks; `name` says which embedding a report used."""

    name = "dlib_face_descriptor"

    def __init__(self):
        import dlib

        from .detectors import dlib_model_path

        self._dlib = dlib
        self._model = dlib.face_recognition_model_v1(str(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))

    def __call__(self, frame: np.ndarray, points68: np.ndarray) -> np.ndarray:
        """Unit-length descriptor [128] of the face with iBUG-68 points [68, 2+] in the uint8 RGB frame."""
        dlib = self._dlib
        xy = np.asarray(points68)[:, :2]
        left, top = xy.min(axis=0)
        right, bottom = xy.max(axis=0)
        box = dlib.rectangle(int(left), int(top), int(right), int(bottom))
        shape = dlib.full_object_detection(box, [dlib.point(int(round(x)), int(round(y))) for x, y in xy])
        vector = np.asarray(self._model.compute_face_descriptor(np.ascontiguousarray(frame), shape))
        return vector / max(np.linalg.norm(vector), 1e-12)


# ArcFace's 5-point template for 112 x 112 crops (insightface `arcface_dst`): eye centres, nose tip, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)
ARCFACE_SIZE = 112


def five_points(points68: np.ndarray) -> np.ndarray:
    """ArcFace's 5 keypoints [5, 2] (image-left eye first) from iBUG-68 points [68, 2+]."""
    xy = np.asarray(points68, dtype=np.float64)[:, :2]
    return np.stack([xy[36:42].mean(0), xy[42:48].mean(0), xy[30], xy[48], xy[54]])


def arcface_alignment(points68: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity (least squares, as insightface's `norm_crop`) taking the face's 5 keypoints to the
    template."""
    from .canonical import umeyama

    pad = lambda xy: np.concatenate([xy, np.zeros((5, 1))], axis=1)[None]  # noqa: E731
    s, r, t = umeyama(pad(five_points(points68)), pad(ARCFACE_TEMPLATE))
    return np.concatenate([s[0] * r[0, :2, :2], t[0, :2, None]], axis=1)


class ArcFaceEncoder:
    """ArcFace embedding (e.g. `w600k_r50.onnx` of insightface's buffalo_l pack, `glintr100.onnx` of antelopev2) of a
    face given by its 68 landmarks: aligned to 112 x 112 by the 5-point similarity, RGB normalised by `input_mean` and
    `input_std` (insightface's values for these packs), run with onnxruntime."""

    def __init__(self, model_path, input_mean: float = 127.5, input_std: float = 127.5):
        from pathlib import Path

        path = Path(model_path).expanduser()
        if not path.is_file():
            raise LmdiffInputError(f"ArcFace model {path} does not exist (expected an .onnx file, e.g. w600k_r50.onnx)")
        try:
            import onnxruntime
        except ImportError as err:
            raise LmdiffInputError("ArcFace CSIM needs onnxruntime: pip install 'lmdiff[insightface]'") from err
        try:
            self._session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for unreadable models
            raise LmdiffInputError(f"ArcFace model {path} could not be loaded by onnxruntime: {err}") from err
        shape = self._session.get_inputs()[0].shape
        if len(shape) != 4 or tuple(shape[2:]) != (ARCFACE_SIZE, ARCFACE_SIZE):
            raise LmdiffInputError(
                f"ArcFace model {path} takes input {shape}, expected [N, 3, {ARCFACE_SIZE}, {ARCFACE_SIZE}]"
            )
        self._input = self._session.get_inputs()[0].name
        self.mean, self.std = float(input_mean), float(input_std)
        self.name = f"arcface:{path.name}"

    def align(self, frame: np.ndarray, points68: np.ndarray) -> np.ndarray:
        """uint8 RGB frame -> the aligned float32 crop [112, 112, 3] (0-255, zeros outside the frame)."""
        import kornia

        image = torch.from_numpy(np.ascontiguousarray(frame)).permute(2, 0, 1)[None].float()
        matrix = torch.from_numpy(arcface_alignment(points68)).float()[None]
        crop = kornia.geometry.transform.warp_affine(
            image, matrix, (ARCFACE_SIZE, ARCFACE_SIZE), mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return crop[0].permute(1, 2, 0).numpy()

    def embed(self, crop: np.ndarray) -> np.ndarray:
        """Unit-length embedding of an aligned crop [112, 112, 3] (RGB, 0-255)."""
        blob = ((np.asarray(crop, dtype=np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
        vector = self._session.run(None, {self._input: np.ascontiguousarray(blob)})[0][0].astype(np.float64)
        return vector / max(np.linalg.norm(vector), 1e-12)

    def __call__(self, frame: np.ndarray, points68: np.ndarray) -> np.ndarray:
        """Unit-length embedding of the face with iBUG-68 points [68, 2+] in the uint8 RGB frame."""
        return self.embed(self.align(frame, points68))


def csim(
    encoder: IdentityEncoder | ArcFaceEncoder,
    pred: np.ndarray,
    pred_seq: LandmarkSequence,
    truth: np.ndarray,
    truth_seq,
    samples=8,
) -> float:
    """Mean cosine similarity of the identity embeddings of `samples` frames (uint8 [T, H, W, 3]) of prediction and
    ground truth, at frames where both have a detected face."""
    pred68, truth68 = pred_seq.to_topology("ibug68"), truth_seq.to_topology("ibug68")
    usable = np.flatnonzero(pred68.valid & truth68.valid)
    if usable.size == 0:
        return float("nan")
    picks = usable[np.linspace(0, len(usable) - 1, min(samples, len(usable))).round().astype(int)]
    return float(np.mean([encoder(pred[i], pred68.points[i]) @ encoder(truth[i], truth68.points[i]) for i in picks]))
