"""Temporal smoothing of landmark sequences: a zero-phase One Euro filter (Casiez et al., CHI 2012).

The One Euro filter is a low-pass whose cutoff rises with speed: still points are smoothed hard (detector jitter goes)
while fast motion passes with little lag. Run forwards then backwards it has no lag at all, which keeps lip motion in
sync with the audio. Fast-moving parts (lips, eyelids, irises) get their own, faster setting so that speech and blinks
keep their shape.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from .canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR, canonicalize, uncanonicalize
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import get_topology

FAST_PARTS = ("outer_lips", "inner_lips", "right_eye", "left_eye", "right_iris", "left_iris")


def _alpha(cutoff: np.ndarray | float, fps: float) -> np.ndarray:
    tau = 1.0 / (2 * np.pi * np.asarray(cutoff))
    return 1.0 / (1.0 + tau * fps)


def one_euro(values: np.ndarray, fps: float, min_cutoff: float = 1.0, beta: float = 0.05, d_cutoff: float = 1.0):
    """Causal One Euro filter along axis 0 of values [T, ...]; cutoffs in Hz, beta in 1/(unit/s)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    out[0] = values[0]
    d_prev = np.zeros_like(values[0])
    a_d = _alpha(d_cutoff, fps)
    for t in range(1, len(values)):
        d = (values[t] - out[t - 1]) * fps
        d_prev = a_d * d + (1 - a_d) * d_prev
        a = _alpha(min_cutoff + beta * np.abs(d_prev), fps)
        out[t] = a * values[t] + (1 - a) * out[t - 1]
    return out


def zero_phase_one_euro(values: np.ndarray, fps: float, **params) -> np.ndarray:
    """One Euro run forwards and then backwards: the phase lags cancel."""
    forward = one_euro(values, fps, **params)
    return one_euro(forward[::-1], fps, **params)[::-1]


def smooth_landmarks(
    seq: LandmarkSequence,
    min_cutoff: float = 0.7,
    beta: float = 0.02,
    fast_min_cutoff: float = 8.0,
    fast_beta: float = 1.0,
) -> LandmarkSequence:
    """Smooth detector jitter without delaying the lips or blinks.

    Points are filtered in units of the face size (inter-ocular distance), so the same settings hold for any
    resolution. Cutoffs are in Hz; betas in 1/(inter-ocular distances per second). Frames without a face are left
    as they are and each run of frames with one is smoothed on its own.
    """
    if not seq.valid.all():
        runs = np.split(np.arange(len(seq)), np.flatnonzero(np.diff(seq.valid.astype(np.int8))) + 1)
        points = seq.points.copy()
        for run in runs:
            if seq.valid[run[0]]:
                points[run] = smooth_landmarks(seq[run], min_cutoff, beta, fast_min_cutoff, fast_beta).points
        return seq.replace(points=points)
    if len(seq) < 3:
        return seq
    if min(min_cutoff, fast_min_cutoff) <= 0 or min(beta, fast_beta) < 0:
        raise LmdiffInputError("smoothing cutoffs must be positive and betas non-negative")
    topo = get_topology(seq.topology)
    scale = float(np.median(seq.inter_ocular()[seq.valid])) if seq.valid.any() else 1.0
    points = seq.points.astype(np.float64) / max(scale, 1e-6)
    fast = np.unique(np.concatenate([topo.part_indices(p) for p in FAST_PARTS if p in topo.parts]))
    if topo.pupils is not None:
        fast = np.union1d(fast, topo.pupils)
    rest = np.setdiff1d(np.arange(seq.n_points), fast)
    out = np.empty_like(points)
    out[:, rest] = zero_phase_one_euro(points[:, rest], seq.fps, min_cutoff=min_cutoff, beta=beta)
    out[:, fast] = zero_phase_one_euro(points[:, fast], seq.fps, min_cutoff=fast_min_cutoff, beta=fast_beta)
    return seq.replace(points=(out * scale).astype(np.float32))


def jitter(seq: LandmarkSequence, indices=None) -> float:
    """Mean magnitude of the second time difference of points (image plane), in inter-ocular units per frame^2."""
    pts = seq.points[:, :, :2] if indices is None else seq.points[:, np.asarray(indices), :2]
    scale = float(np.median(seq.inter_ocular()))
    return float(np.linalg.norm(np.diff(pts.astype(np.float64), n=2, axis=0), axis=-1).mean() / scale)


SMOOTHING_MODES = ("canonical", "image", "none")
POSE_MIN_CUTOFF = 1.0  # Hz
POSE_BETA = 3.0  # 1 / (radians or inter-ocular distances per second)


def smoothing_mode(smooth) -> str:
    if smooth is True:
        return "canonical"
    if smooth is False or smooth is None:
        return "none"
    if smooth not in SMOOTHING_MODES:
        raise LmdiffInputError(f"smooth must be one of {SMOOTHING_MODES} (or True / False), got {smooth!r}")
    return smooth


def smooth_pose(
    pose: np.ndarray, fps: float, min_cutoff: float = POSE_MIN_CUTOFF, beta: float = POSE_BETA
) -> np.ndarray:
    """Zero-phase One Euro smoothing of per-frame head poses [T, 4, 4] (canonical -> image similarities).

    The filtered quantities are the rotation (rotation vector, radians), the image position of the canonical eye
    midpoint (in inter-ocular distances) and the log scale, so rotation and position cannot drift apart. The One Euro
    cutoff rises with speed, so detector jitter goes while nods and turns pass with little lag.
    """
    pose = np.asarray(pose, dtype=np.float64)
    if len(pose) < 3:
        return pose.copy()
    linear = pose[:, :3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    rotvec = Rotation.from_matrix(linear / scale[:, None, None]).as_rotvec()
    eye_mid = np.array([*CANONICAL_EYE_MID, 0.0])
    centre = np.einsum("tij,j->ti", linear, eye_mid) + pose[:, :3, 3]
    unit = float(np.median(scale)) * CANONICAL_INTER_OCULAR  # frame px per inter-ocular distance
    values = np.concatenate([rotvec, centre / unit, np.log(scale)[:, None]], axis=1)
    out = zero_phase_one_euro(values, fps, min_cutoff=min_cutoff, beta=beta)
    s = np.exp(out[:, 6])
    linear = Rotation.from_rotvec(out[:, :3]).as_matrix() * s[:, None, None]
    smoothed = np.zeros_like(pose)
    smoothed[:, :3, :3] = linear
    smoothed[:, :3, 3] = out[:, 3:6] * unit - np.einsum("tij,j->ti", linear, eye_mid)
    smoothed[:, 3, 3] = 1.0
    return smoothed


def smooth_clip(seq, mode: str = "canonical"):
    """Canonical landmarks with pose of an image-space `LandmarkSequence`, smoothed in time.

    "canonical" (the dataset default): canonicalise the detections, then smooth the pose-free landmarks
    (`smooth_landmarks`) and the pose (`smooth_pose`) separately. "image": smooth the image-space landmarks
    and canonicalise them (the `lmdiff landmarks` order); its lip and eye points follow the head faster than the rest,
    so fast head motion leaks into the canonical mouth (measured on the real clips: mouth centre shifted by 0.01 to
    0.06 inter-ocular distances on average and up to 0.25 in fast nods, against 0.005 in the canonical order).
    "none": canonicalise the detections as they are.
    """
    mode = smoothing_mode(mode)
    if mode == "image":
        return canonicalize(smooth_landmarks(seq))
    canonical = canonicalize(seq)
    if mode == "none":
        return canonical
    pose = canonical.pose.copy()
    for run in _valid_runs(seq.valid):  # frames without a face keep the pose canonicalize gave them
        pose[run] = smooth_pose(canonical.pose[run], seq.fps)
    return smooth_landmarks(canonical).replace(pose=pose)


def _valid_runs(valid: np.ndarray) -> list[np.ndarray]:
    """Frame indices of each run of consecutive True values of `valid` [T]."""
    runs = np.split(np.arange(len(valid)), np.flatnonzero(np.diff(valid.astype(np.int8))) + 1)
    return [run for run in runs if len(run) and valid[run[0]]]


def smooth_detections(seq: LandmarkSequence, mode: str = "canonical") -> LandmarkSequence:
    """Image-space detections smoothed by the training recipe: `uncanonicalize(smooth_clip(seq, mode))`, the
    landmarks `lmdiff prepare` stores and crops by, so a model sees landmarks from the same function in training and at
    inference. Frames without a face keep their points; 2D landmarks (no depth) stay 2D."""
    if smoothing_mode(mode) == "none" or not seq.valid.any():
        return seq
    out = uncanonicalize(smooth_clip(seq, mode))
    points = out.points
    if not np.any(seq.points[..., 2]):
        points[..., 2] = 0.0
    points[~seq.valid] = seq.points[~seq.valid]
    return seq.replace(points=points)
