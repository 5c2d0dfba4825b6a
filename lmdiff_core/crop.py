"""Aligned face crops: stable per-sequence crop boxes, batched crop / paste-back with kornia, and face-region masks in
crop space (`face_masks`, drawn by `masks`).

A talking-head model works on an aligned square crop of the face; its output is warped back into the original
frame and blended in under a (feathered) mask. This module does the geometry:

- `compute_crop_track(seq)` -> `CropTrack`: one similarity transform per frame (centre, side, roll), computed from
  the landmarks FFHQ-style (centre between the eyes and the mouth, side proportional to
  ``max(eye distance, eye-to-mouth distance)``), then smoothed over time with a zero-phase Gaussian so the box does
  not jitter. Frames without a face get parameters interpolated from their valid neighbours.
- `crop_frames(frames, track, indices)` -> crops ``[B, 3, size, size]``.
- `paste_back(frames, crops, track, indices, mask, feather)` -> (frames, frame-space masks).
- `face_masks(seq, track, indices)` -> {"face", "lower_face", "mouth"} masks in crop space.
- `transform_landmarks(seq, track)` / `transform_landmarks(seq, track, inverse=True)`: frame <-> crop coordinates.

Pixel convention (the same as `LandmarkSequence` and `lmdiff_core.render`): coordinates are continuous, pixel
``(i, j)`` (row, column) covers ``[j, j + 1) x [i, i + 1)`` and its centre is at ``(j + 0.5, i + 0.5)``; a
MediaPipe landmark is ``x * W``. `CropTrack.matrices` act on such coordinates, so the crop square ``[0, size]^2``
is exactly the rotated box of side `sides[t]` around `centers[t]`. (kornia's matrices use pixel-centre indices;
the conversion is internal.)

Everything works on batches: the caller loops over chunks of frame indices for long videos, passing the frame
indices of each chunk as `indices`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .masks import MASK_NAMES, feather_mask, masks_from_points
from .topology import Topology, get_topology

PADDING_MODES = {"replicate": "border", "zeros": "zeros", "reflection": "reflection"}

DEFAULT_SCALE = 3.2  # box side / max(eye distance, eye-to-mouth distance): whole face, chin and forehead, ~10% margin
DEFAULT_CENTER_OFFSET = (
    0.45  # box centre = eye midpoint + offset * (mouth centre - eye midpoint): centres the face oval
)
DEFAULT_SMOOTHING = 0.15  # Gaussian sigma in seconds for centre and angle (the side gets 3x, it changes slowly)
MIN_SIZE = 8


# ------------------------------------------------------------------------------------------------------------------
# the track
# ------------------------------------------------------------------------------------------------------------------
@dataclass(eq=False)  # arrays inside: compare tracks field by field
class CropTrack:
    """Per-frame frame -> crop similarity transforms of one video.

    matrices: [T, 2, 3] float64, maps frame pixel coordinates to crop pixel coordinates (module pixel convention).
    size: side of the square crop in pixels.
    frame_size: (width, height) of the frames the track was computed for.
    centers: [T, 2] box centres in frame pixels; sides: [T] box sides in frame pixels; angles: [T] roll in radians
        (the crop is the frame rotated by -angle). Informational; `matrices` is what every function uses.
    valid: [T] bool, True where the frame's box came from detected landmarks, False where it was interpolated.
    landmarks: the frame-space `LandmarkSequence` the track came from (used by `paste_back` for named masks).
    """

    matrices: np.ndarray
    size: int
    frame_size: tuple[int, int]
    centers: np.ndarray | None = None
    sides: np.ndarray | None = None
    angles: np.ndarray | None = None
    valid: np.ndarray | None = None
    landmarks: LandmarkSequence | None = field(default=None, repr=False)

    def __post_init__(self):
        m = self.matrices
        if isinstance(m, torch.Tensor):
            m = m.detach().cpu().double().numpy()
        m = np.asarray(m, dtype=np.float64)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1:] != (2, 3):
            raise LmdiffInputError(f"CropTrack.matrices has shape {m.shape}, expected [T, 2, 3]")
        if not np.isfinite(m).all():
            raise LmdiffInputError("CropTrack.matrices holds non-finite values")
        self.matrices = m
        self.size = _check_size(self.size, "CropTrack.size")
        self.frame_size = _check_frame_size(self.frame_size, "CropTrack.frame_size")
        t = m.shape[0]
        for name, shape in (("centers", (t, 2)), ("sides", (t,)), ("angles", (t,)), ("valid", (t,))):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, dtype=bool if name == "valid" else np.float64)
                if value.shape != shape:
                    raise LmdiffInputError(f"CropTrack.{name} has shape {value.shape}, expected {shape}")
                setattr(self, name, value)
        if self.valid is None:
            self.valid = np.ones(t, dtype=bool)
        if self.landmarks is not None and len(self.landmarks) != t:
            raise LmdiffInputError(f"CropTrack.landmarks has {len(self.landmarks)} frames, expected {t}")

    def __len__(self) -> int:
        return self.matrices.shape[0]

    def __repr__(self) -> str:
        return (
            f"CropTrack({len(self)} frames, crop {self.size}x{self.size}, frame {self.frame_size[0]}x{self.frame_size[1]}, "
            f"{int(self.valid.sum())} from landmarks)"
        )

    def __getitem__(self, index) -> "CropTrack":
        """The track of a subset of frames (an int, a slice or an index array)."""
        if isinstance(index, (int, np.integer)):
            index = slice(index, index + 1 if index != -1 else None)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(
            self,
            matrices=self.matrices[index],
            centers=pick(self.centers),
            sides=pick(self.sides),
            angles=pick(self.angles),
            valid=self.valid[index],
            landmarks=None if self.landmarks is None else self.landmarks[index],
        )

    @property
    def scales(self) -> np.ndarray:
        """[T] crop pixels per frame pixel."""
        return np.sqrt(np.abs(np.linalg.det(self.matrices[:, :, :2])))

    def inverse_matrices(self) -> np.ndarray:
        """[T, 2, 3] crop -> frame matrices."""
        return _invert(self.matrices)

    @classmethod
    def from_boxes(cls, centers, sides, angles, size: int, frame_size, **kwargs) -> "CropTrack":
        """A track from box parameters: centres [T, 2] and sides [T] in frame pixels, roll angles [T] in radians."""
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        sides = np.asarray(sides, dtype=np.float64).reshape(-1)
        angles = np.asarray(angles, dtype=np.float64).reshape(-1)
        size = _check_size(size, "size")
        if not (len(centers) == len(sides) == len(angles)):
            raise LmdiffInputError(f"box parameters differ in length: {len(centers)}, {len(sides)}, {len(angles)}")
        if not (np.isfinite(sides).all() and (sides > 0).all()):
            raise LmdiffInputError("box sides must be positive and finite")
        k = size / sides
        cos, sin = np.cos(angles) * k, np.sin(angles) * k
        m = np.empty((len(sides), 2, 3))
        m[:, 0, 0], m[:, 0, 1] = cos, sin
        m[:, 1, 0], m[:, 1, 1] = -sin, cos
        m[:, :, 2] = size / 2.0 - np.einsum("tij,tj->ti", m[:, :, :2], centers)
        return cls(m, size, frame_size, centers=centers, sides=sides, angles=angles, **kwargs)


def _check_size(size, name: str) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise LmdiffInputError(f"{name} must be an integer of at least {MIN_SIZE} pixels, got {size!r}")
    return int(size)


def _number(value, name: str, minimum: float = 0.0, strict: bool = True) -> float:
    """A finite real number > minimum (>= minimum when not strict), else LmdiffInputError naming it."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise LmdiffInputError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_frame_size(frame_size, name: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in frame_size)
    except (TypeError, ValueError):
        raise LmdiffInputError(f"{name} must be (width, height), got {frame_size!r}") from None
    if w <= 0 or h <= 0:
        raise LmdiffInputError(f"{name} must be positive (width, height), got {frame_size!r}")
    return w, h


def _invert(m: np.ndarray) -> np.ndarray:
    lin = np.linalg.inv(m[:, :, :2])
    return np.concatenate([lin, -np.einsum("tij,tj->ti", lin, m[:, :, 2])[:, :, None]], axis=2)


def _apply(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply [T, 2, 3] matrices to [T, N, 2] points."""
    return np.einsum("tij,tnj->tni", m[:, :, :2], xy) + m[:, None, :, 2]


def _kornia_matrix(m: np.ndarray, device, dtype=torch.float32) -> torch.Tensor:
    """Continuous-coordinate matrices -> kornia's pixel-index matrices (pixel centre at integer index)."""
    k = m.copy()
    k[:, :, 2] = m[:, :, 2] + m[:, :, :2].sum(axis=2) * 0.5 - 0.5
    return torch.as_tensor(k, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------------------------
# box parameters from landmarks
# ------------------------------------------------------------------------------------------------------------------
def _eyes_mouth(points: np.ndarray, topo: Topology) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right eye, left eye, mouth centre) [T, 2] float64 in the image plane."""
    right, left = topo.eye_centers(points[..., :2].astype(np.float64))
    a, b = topo.mouth_corners
    mouth = (points[:, a, :2].astype(np.float64) + points[:, b, :2]) / 2
    return right, left, mouth


def raw_crop_params(
    seq: LandmarkSequence,
    scale: float = DEFAULT_SCALE,
    align_rotation: bool = True,
    center_offset: float = DEFAULT_CENTER_OFFSET,
):
    """Unsmoothed per-frame box parameters: (centres [T, 2], sides [T], angles [T], usable [T] bool).

    centre = eye midpoint + center_offset * (mouth centre - eye midpoint); side = scale * max(distance between the eye
    centres, eye-midpoint-to-mouth-centre distance); angle = angle of the line from the right to the left eye (0 when
    align_rotation is False). `usable` is seq.valid restricted to frames with finite, non-degenerate landmarks.
    """
    topo = get_topology(seq.topology)
    right, left, mouth = _eyes_mouth(seq.points, topo)
    eye_mid = (right + left) / 2
    eye_vec = left - right
    to_mouth = mouth - eye_mid
    size = np.maximum(np.linalg.norm(eye_vec, axis=1), np.linalg.norm(to_mouth, axis=1))
    centers = eye_mid + center_offset * to_mouth
    angles = np.arctan2(eye_vec[:, 1], eye_vec[:, 0]) if align_rotation else np.zeros(len(seq))
    with np.errstate(invalid="ignore"):
        usable = seq.valid & np.isfinite(centers).all(axis=1) & np.isfinite(size) & (size > 1e-3) & np.isfinite(angles)
    return centers, size * scale, angles, usable


def _fill_invalid(values: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames that are not usable (constant beyond the ends)."""
    if usable.all():
        return values
    t = np.arange(len(values))
    good = np.flatnonzero(usable)
    flat = values.reshape(len(values), -1)
    out = np.stack([np.interp(t, good, flat[good, j]) for j in range(flat.shape[1])], axis=1)
    return out.reshape(values.shape)


def compute_crop_track(
    seq: LandmarkSequence,
    size: int = 256,
    scale: float = DEFAULT_SCALE,
    align_rotation: bool = True,
    smoothing: float = DEFAULT_SMOOTHING,
    center_offset: float = DEFAULT_CENTER_OFFSET,
) -> CropTrack:
    """Stable square face crops for a whole landmark sequence.

    Per frame: centre = eye midpoint + `center_offset` x (mouth centre - eye midpoint), side = `scale` x max(eye
    distance, eye-to-mouth distance) (robust to yaw and to pitch), roll = eye-line angle when `align_rotation`.
    Then, over time: frames without a usable face take parameters interpolated linearly from their valid neighbours,
    and centre and roll are smoothed with a zero-phase Gaussian of sigma `smoothing` seconds, the side (log) with
    3x that sigma (0 disables smoothing). The defaults fit the whole face oval, chin and forehead with ~10% margin.
    """
    if not isinstance(seq, LandmarkSequence):
        raise LmdiffInputError(f"compute_crop_track needs a LandmarkSequence, got {type(seq).__name__}")
    if seq.space != "image":
        raise LmdiffInputError(f"compute_crop_track needs image-space landmarks, got space={seq.space!r}")
    size = _check_size(size, "crop size")
    scale = _number(scale, "crop scale")
    smoothing = _number(smoothing, "crop smoothing (seconds)", strict=False)
    center_offset = _number(center_offset, "crop center_offset", minimum=-np.inf)
    if len(seq) == 0:
        raise LmdiffInputError("compute_crop_track: the landmark sequence has no frames")
    centers, sides, angles, usable = raw_crop_params(seq, scale, align_rotation, center_offset)
    if not usable.any():
        raise LmdiffInputError(
            f"compute_crop_track: the landmark sequence ({len(seq)} frames) has no valid face in any frame"
        )
    centers = _fill_invalid(np.where(usable[:, None], centers, 0.0), usable)
    log_sides = _fill_invalid(np.log(np.where(usable, sides, 1.0)), usable)
    unwrapped = np.zeros(len(seq))
    unwrapped[usable] = np.unwrap(angles[usable])
    angles = _fill_invalid(unwrapped, usable)
    sigma = smoothing * seq.fps
    if sigma > 0 and len(seq) > 1:
        from scipy.ndimage import gaussian_filter1d

        centers = gaussian_filter1d(centers, sigma, axis=0, mode="nearest")
        angles = gaussian_filter1d(angles, sigma, mode="nearest")
        log_sides = gaussian_filter1d(log_sides, 3 * sigma, mode="nearest")
    return CropTrack.from_boxes(
        centers, np.exp(log_sides), angles, size, seq.frame_size, valid=usable.copy(), landmarks=seq
    )


# ------------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------------
def _to_bchw(frames, name: str) -> torch.Tensor:
    """Frames as float [B, 3, H, W] in 0..1: a torch tensor [B, 3, H, W] (float, or uint8 0..255) or a numpy array
    [B, H, W, 3] (uint8 0..255 or float 0..1). May share memory with `frames`."""
    if isinstance(frames, np.ndarray):
        if frames.ndim == 3 and frames.shape[-1] == 3:
            frames = frames[None]
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise LmdiffInputError(f"{name} as a numpy array must be [B, H, W, 3], got shape {frames.shape}")
        t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    elif isinstance(frames, torch.Tensor):
        t = frames[None] if frames.ndim == 3 else frames
        if t.ndim != 4 or t.shape[1] != 3:
            raise LmdiffInputError(f"{name} as a tensor must be [B, 3, H, W], got shape {tuple(frames.shape)}")
    else:
        raise LmdiffInputError(
            f"{name} must be a torch tensor [B, 3, H, W] or a numpy array [B, H, W, 3], got {type(frames).__name__}"
        )
    if t.shape[0] == 0:
        raise LmdiffInputError(f"{name} is empty: it holds no frames")
    if t.dtype == torch.uint8:
        return t.float().div_(255.0)
    if not t.is_floating_point():
        raise LmdiffInputError(f"{name} must be uint8 (0..255) or float (0..1), got {t.dtype}")
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _index_array(indices, n: int, name: str) -> np.ndarray:
    """Frame indices (int, sequence, range, numpy or torch) as a 1-D int64 array, each in [0, n)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.size and idx.dtype.kind not in "iu":
        raise LmdiffInputError(f"{name} must be integer frame indices, got dtype {idx.dtype}")
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise LmdiffInputError(f"{name} must lie in [0, {n}) (the crop track's frames), got {idx.min()}..{idx.max()}")
    return idx


def _check_indices(indices, batch: int, track: CropTrack, name: str = "indices") -> np.ndarray:
    if indices is None:
        if batch != len(track):
            raise LmdiffInputError(
                f"{name} is required: the batch has {batch} frames but the crop track has {len(track)}; "
                "pass the frame index of each batch item"
            )
        return np.arange(batch)
    idx = _index_array(indices, len(track), name)
    if len(idx) != batch:
        raise LmdiffInputError(f"{name} has {len(idx)} entries but the batch has {batch} frames")
    return idx


def _check_frames_match(frames: torch.Tensor, track: CropTrack, name: str) -> None:
    h, w = frames.shape[-2:]
    if (w, h) != track.frame_size:
        raise LmdiffInputError(
            f"{name} are {w}x{h} but the crop track was computed for {track.frame_size[0]}x{track.frame_size[1]} frames"
        )


def _check_padding(padding: str) -> str:
    if padding not in PADDING_MODES:
        raise LmdiffInputError(f"padding must be one of {sorted(PADDING_MODES)}, got {padding!r}")
    return PADDING_MODES[padding]


# ------------------------------------------------------------------------------------------------------------------
# resampling helpers
# ------------------------------------------------------------------------------------------------------------------
AA_THRESHOLD = 1.5  # a warp shrinking by more than this (source px per output px) is preceded by an antialiased resize
AA_OVERSAMPLE = 1.25  # ... to this many source px per output px, so the bilinear warp after it shrinks by ~1.25 at most


def _shrink_source(src: torch.Tensor, m: np.ndarray, shrink: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Antialiasing for a warp that shrinks: when every item shrinks by more than AA_THRESHOLD (`shrink`: source px
    per output px, [B]), resize `src` [B, C, h, w] with torch's antialiased bicubic filter to AA_OVERSAMPLE source px
    per output px for the batch's least-shrunk item and return it with `m` (source -> output, continuous coordinates)
    rewritten for the resized source. Values stay within the source's range (no bicubic overshoot)."""
    factor = float(np.min(shrink))
    if factor <= AA_THRESHOLD:
        return src, m
    factor /= AA_OVERSAMPLE
    h, w = src.shape[-2:]
    nh, nw = max(1, round(h / factor)), max(1, round(w / factor))
    x = src.float()
    small = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    small = small.clamp_(float(x.min()), float(x.max())).to(src.dtype)
    out = m.copy()
    out[:, :, 0] *= w / nw  # continuous coordinates scale exactly with align_corners=False
    out[:, :, 1] *= h / nh
    return small, out


def _footprint_box(inv: np.ndarray, lo: np.ndarray, hi: np.ndarray, bounds: tuple[int, int], margin: int):
    """Integer (x0, y0, x1, y1) covering, over the batch, the image under [T, 2, 3] `inv` of the crop-space boxes
    [lo, hi] ([T, 2] each), grown by `margin` and clipped to `bounds` (width, height); None when empty."""
    corners = np.stack([lo, np.stack([hi[:, 0], lo[:, 1]], 1), hi, np.stack([lo[:, 0], hi[:, 1]], 1)], axis=1)
    pts = _apply(inv, corners).reshape(-1, 2)
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - margin
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + margin
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, bounds[0]), min(y1, bounds[1])
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1


def _shift(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Matrices whose input origin moves to (dx, dy): m applied to (p + (dx, dy))."""
    out = m.copy()
    out[:, :, 2] = m[:, :, 2] + m[:, :, :2] @ np.array([dx, dy])
    return out


# ------------------------------------------------------------------------------------------------------------------
# crop
# ------------------------------------------------------------------------------------------------------------------
def crop_frames(
    frames,
    track: CropTrack,
    indices=None,
    *,
    padding: str = "replicate",
    antialias: bool = True,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Aligned crops [B, 3, size, size] float32 in 0..1 of frames [B, 3, H, W] (or uint8 numpy [B, H, W, 3]).

    `indices` are the track frames of the batch items (default: all of the track when the batch is the whole video).
    Resampling is kornia `warp_affine` (`mode` bilinear). Crop pixels outside the frame use `padding`: "replicate"
    (default: the frame's border pixels are repeated, so a model never sees black bars; those pixels land outside the
    frame again on paste-back), "zeros" or "reflection". With `antialias`, when a crop shrinks the frame by more than
    1.5x, the part of the frames it covers is first resized (torch's antialiased bicubic) to 1.25 frame px per crop
    px; without it (or below 1.5x) the warp samples the frames directly.
    """
    if not isinstance(track, CropTrack):
        raise LmdiffInputError(f"track must be a CropTrack, got {type(track).__name__}")
    grid_padding = _check_padding(padding)
    _check_mode(mode)
    x = _to_bchw(frames, "frames")
    _check_frames_match(x, track, "frames")
    idx = _check_indices(indices, x.shape[0], track)
    m = track.matrices[idx]
    s = track.size
    if antialias and np.min(1.0 / track.scales[idx]) > AA_THRESHOLD:
        lo = np.zeros((len(idx), 2))
        box = _footprint_box(_invert(m), lo, lo + s, track.frame_size, 2)
        if box is not None:  # resize only the part of the frames the crops cover
            x0, y0, x1, y1 = box
            x, m = _shrink_source(x[:, :, y0:y1, x0:x1], _shift(m, x0, y0), 1.0 / track.scales[idx])
    out = _warp(x, _kornia_matrix(m, x.device), (s, s), mode, grid_padding)
    return out.float()


def _check_mode(mode: str) -> None:
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise LmdiffInputError(f"interpolation mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")


def _warp(src: torch.Tensor, m: torch.Tensor, dsize: tuple[int, int], mode: str, padding: str) -> torch.Tensor:
    from kornia.geometry.transform import warp_affine

    return warp_affine(src, m.to(src.dtype), dsize, mode=mode, padding_mode=padding, align_corners=True)


# ------------------------------------------------------------------------------------------------------------------
# landmarks
# ------------------------------------------------------------------------------------------------------------------
def transform_landmarks(
    seq: LandmarkSequence, track: CropTrack, inverse: bool = False, indices=None
) -> LandmarkSequence:
    """Landmarks moved between frame and crop pixel coordinates.

    Forward: frame-space `seq` (frame_size == track.frame_size) -> crop space (frame_size (size, size)). With
    `inverse=True`, crop-space `seq` -> frame space. x, y go through the track's similarity, z is scaled by its scale,
    a `pose` is composed with it. `indices` are the track frames of `seq`'s frames (default: the whole track).
    """
    if not isinstance(seq, LandmarkSequence):
        raise LmdiffInputError(f"transform_landmarks needs a LandmarkSequence, got {type(seq).__name__}")
    if not isinstance(track, CropTrack):
        raise LmdiffInputError(f"track must be a CropTrack, got {type(track).__name__}")
    if seq.space != "image":
        raise LmdiffInputError(f"transform_landmarks needs image-space landmarks, got space={seq.space!r}")
    idx = _check_indices(indices, len(seq), track, "indices (landmark frames)")
    expected = (track.size, track.size) if inverse else track.frame_size
    if seq.frame_size != expected:
        where = "crop" if inverse else "frame"
        raise LmdiffInputError(
            f"landmarks have frame_size {seq.frame_size}, expected the {where} size {expected} of the crop track"
        )
    m = track.matrices[idx]
    if inverse:
        m = _invert(m)
    k = np.sqrt(np.abs(np.linalg.det(m[:, :, :2])))
    pts = seq.points.astype(np.float64)
    out = np.empty_like(pts)
    out[..., :2] = _apply(m, pts[..., :2])
    out[..., 2] = pts[..., 2] * k[:, None]
    pose = None
    if seq.pose is not None:
        s4 = np.zeros((len(m), 4, 4))
        s4[:, :2, :2] = m[:, :, :2]
        s4[:, :2, 3] = m[:, :, 2]
        s4[:, 2, 2] = k
        s4[:, 3, 3] = 1.0
        pose = s4 @ seq.pose
    size = track.frame_size if inverse else (track.size, track.size)
    return seq.replace(points=out.astype(np.float32), frame_size=size, pose=pose)


# ------------------------------------------------------------------------------------------------------------------
# masks in crop space (drawn by `masks`)
# ------------------------------------------------------------------------------------------------------------------
def face_masks(
    seq: LandmarkSequence,
    track: CropTrack | None = None,
    indices=None,
    *,
    size: int | None = None,
    parts: Sequence[str] = MASK_NAMES,
    mouth_margin: float = 0.15,
    lower_face_line: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Binary face-region masks {name: float32 [B, 1, S, S]} in crop space.

    With a `track`, `seq` holds frame-space landmarks and is moved into the crop (S = `size`, default track.size);
    without one, `seq` is drawn in its own pixel space (a crop-space sequence from `transform_landmarks`, or a
    frame to get frame-space masks [B, 1, H, W]; `size` needs a track). `indices` picks the frames (default all).

    - "face": convex hull of the face contour (mediapipe478: the face oval, forehead to chin; ibug68: the jaw line
      plus the brows raised by 0.6 x eye-to-mouth distance) and of the outer lips, united with "mouth".
    - "lower_face": "face" below a line parallel to the eye line, `lower_face_line` x the eye-to-mouth distance below
      the eye midpoint (through the nose bridge, under the eyes): nose, mouth, chin and jaw, the region a dubbing
      model regenerates; united with "mouth".
    - "mouth": outer-lip hull dilated by `mouth_margin` x mouth width.
    So mouth <= lower_face <= face. Frames whose landmarks are not valid get empty masks (nothing is pasted there).
    """
    if not isinstance(seq, LandmarkSequence):
        raise LmdiffInputError(f"face_masks needs a LandmarkSequence, got {type(seq).__name__}")
    mouth_margin = _number(mouth_margin, "mouth_margin", strict=False)
    lower_face_line = _number(lower_face_line, "lower_face_line", minimum=-np.inf)
    if track is not None:
        if not isinstance(track, CropTrack):
            raise LmdiffInputError(f"track must be a CropTrack, got {type(track).__name__}")
        if len(seq) != len(track):
            raise LmdiffInputError(f"landmarks have {len(seq)} frames but the crop track has {len(track)}")
        idx = np.arange(len(seq)) if indices is None else _index_array(indices, len(track), "indices")
        crop_seq = transform_landmarks(seq[idx], track, indices=idx)
        s = track.size if size is None else _check_size(size, "mask size")
        pts = crop_seq.points[..., :2].astype(np.float64) * (s / track.size)
        return masks_from_points(pts, crop_seq.valid, seq.topology, s, s, parts, mouth_margin, lower_face_line)
    if size is not None:
        raise LmdiffInputError(
            "face_masks: size needs a track (without one, masks are drawn at the landmarks' frame_size)"
        )
    idx = np.arange(len(seq)) if indices is None else _index_array(indices, len(seq), "indices")
    w, h = seq.frame_size
    pts = seq.points[idx, :, :2].astype(np.float64)
    return masks_from_points(pts, seq.valid[idx], seq.topology, w, h, parts, mouth_margin, lower_face_line)


# ------------------------------------------------------------------------------------------------------------------
# paste back
# ------------------------------------------------------------------------------------------------------------------
def _mask_input(mask, batch: int, s: int, device) -> torch.Tensor:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise LmdiffInputError(f"mask must be one of {MASK_NAMES} or a tensor [B, 1, S, S], got {type(mask).__name__}")
    m = mask.float()
    if m.ndim == 2:
        m = m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    if m.ndim != 4 or m.shape[1] != 1 or m.shape[0] not in (1, batch):
        raise LmdiffInputError(f"mask tensor must be [B, 1, S, S] or [B, S, S] with B={batch}, got {tuple(mask.shape)}")
    if m.shape[-2:] != (s, s):
        m = F.interpolate(m, size=(s, s), mode="bilinear", align_corners=False)
    return m.expand(batch, -1, -1, -1).to(device).clamp(0.0, 1.0)


def paste_back(
    frames,
    crops: torch.Tensor,
    track: CropTrack,
    indices=None,
    mask="lower_face",
    feather: float | None = None,
    *,
    landmarks: LandmarkSequence | None = None,
    antialias: bool = True,
    mode: str = "bilinear",
    mouth_margin: float = 0.15,
    lower_face_line: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blend (processed) crops back into their frames: returns (frames [B, 3, H, W] float32 0..1, masks [B, 1, H, W]).

    frames: [B, 3, H, W] float 0..1 (or uint8 numpy [B, H, W, 3]); crops: [B, 3, S, S] float 0..1, any S (S other
    than track.size is taken as the same crop box at another resolution). `mask` is "face", "lower_face", "mouth"
    (drawn from `landmarks`, default track.landmarks, in crop space) or a crop-space tensor [B, 1, S, S] / [B, S, S]
    in 0..1. The mask is feathered by a Gaussian of sigma `feather` crop pixels (default S / 64; 0 for a hard edge)
    with zero outside the crop, then mask and crop are warped into the frame with the inverse similarity (kornia,
    `mode` bilinear, crop border replicated, mask zero outside) and ``out = frame * (1 - m) + crop * m``. With
    `antialias`, when pasting shrinks the crop by more than 1.5x (a crop finer than the frame), crop and mask are
    first resized (torch's antialiased bicubic) to 1.25 crop px per frame px.
    Only the bounding box of the mask's footprint in the frame is resampled.
    """

    if not isinstance(track, CropTrack):
        raise LmdiffInputError(f"track must be a CropTrack, got {type(track).__name__}")
    _check_mode(mode)
    x = _to_bchw(frames, "frames")
    _check_frames_match(x, track, "frames")
    if not isinstance(crops, torch.Tensor):
        crops = _to_bchw(crops, "crops")
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise LmdiffInputError(f"crops must be a tensor [B, 3, S, S], got shape {tuple(crops.shape)}")
    if crops.shape[0] != x.shape[0]:
        raise LmdiffInputError(f"crops hold {crops.shape[0]} items but frames hold {x.shape[0]}")
    if crops.dtype == torch.uint8:
        crops = crops.float() / 255.0
    elif not crops.is_floating_point():
        raise LmdiffInputError(f"crops must be float (0..1) or uint8 (0..255), got {crops.dtype}")
    b = x.shape[0]
    s = crops.shape[-1]
    idx = _check_indices(indices, b, track)
    feather = s / 64.0 if feather is None else _number(feather, "feather (pixels)", strict=False)

    if isinstance(mask, str):
        if mask not in MASK_NAMES:
            raise LmdiffInputError(f"mask must be one of {MASK_NAMES} or a tensor, got {mask!r}")
        lms = landmarks if landmarks is not None else track.landmarks
        if lms is None:
            raise LmdiffInputError(
                f"mask {mask!r} needs landmarks: pass landmarks= or use a track from compute_crop_track"
            )
        if len(lms) != len(track):
            raise LmdiffInputError(f"landmarks have {len(lms)} frames but the crop track has {len(track)}")
        m = face_masks(
            lms, track, idx, size=s, parts=(mask,), mouth_margin=mouth_margin, lower_face_line=lower_face_line
        )[mask].to(x.device)
    else:
        m = _mask_input(mask, b, s, x.device)
    m = feather_mask(m.float(), float(feather))

    # crop -> frame matrices for crops of side s
    fwd = track.matrices[idx] * (s / track.size)
    inv = _invert(fwd)
    converted = isinstance(frames, (np.ndarray, torch.Tensor)) and frames.dtype in (np.uint8, torch.uint8)
    out = x.to(torch.float32, copy=not converted)  # never write into the caller's frames
    masks_out = torch.zeros(b, 1, x.shape[2], x.shape[3], dtype=out.dtype, device=x.device)
    support = m[:, 0] > 1e-4
    rows, cols = support.any(dim=2), support.any(dim=1)  # [B, S]
    has = rows.any(dim=1).cpu().numpy()
    if not has.any():
        return out, masks_out
    ar = torch.arange(s, device=x.device)
    big = torch.full_like(ar, s)
    lo = np.stack(
        [
            torch.where(cols, ar, big).min(1).values.cpu().numpy(),
            torch.where(rows, ar, big).min(1).values.cpu().numpy(),
        ],
        1,
    ).astype(np.float64)
    hi = (
        np.stack(
            [
                torch.where(cols, ar, -1).max(1).values.cpu().numpy(),
                torch.where(rows, ar, -1).max(1).values.cpu().numpy(),
            ],
            1,
        ).astype(np.float64)
        + 1
    )
    box = _footprint_box(inv[has], lo[has], hi[has], track.frame_size, 2)
    if box is None:
        return out, masks_out
    x0, y0, x1, y1 = box
    src = torch.cat([crops.to(device=x.device, dtype=out.dtype), m], dim=1)  # crop and mask resample together
    region_m = _shift_output(inv, -x0, -y0)
    if antialias:
        src, region_m = _shrink_source(src, region_m, track.scales[idx] * (s / track.size))
    dsize = (y1 - y0, x1 - x0)
    warped = _warp(src[:, :3], _kornia_matrix(region_m, x.device), dsize, mode, "border")
    wm = _warp(src[:, 3:], _kornia_matrix(region_m, x.device), dsize, "bilinear", "zeros").clamp_(0.0, 1.0)
    region = out[:, :, y0:y1, x0:x1]
    out[:, :, y0:y1, x0:x1] = region + (warped - region) * wm
    masks_out[:, :, y0:y1, x0:x1] = wm
    return out, masks_out


def _shift_output(m: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Matrices followed by a translation of their output by (dx, dy)."""
    out = m.copy()
    out[:, 0, 2] += dx
    out[:, 1, 2] += dy
    return out


__all__ = [
    "CropTrack",
    "face_masks",
    "compute_crop_track",
    "crop_frames",
    "paste_back",
    "raw_crop_params",
    "transform_landmarks",
]
