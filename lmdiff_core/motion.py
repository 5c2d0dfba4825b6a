"""Head motion and blinks for generated (pose-free) landmarks.

A2L predicts canonical landmarks: a frontal face that talks but never moves its head or blinks. Before rendering,
pose comes back either from a driving video (`canonical.transfer_pose`) or from `generate_head_motion`, a smooth
random head motion whose amplitude and speed follow measured statistics, and blinks from `add_blinks`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.transform import Rotation

from .canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR, apply_transform
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import get_topology


@dataclass
class MotionStats:
    """How a talking head moves: angle spread per axis (deg), its time scale (s), drift (inter-ocular distances),
    blink rate and blink length."""

    yaw_std: float = 4.0
    pitch_std: float = 3.0
    roll_std: float = 2.0
    time_scale: float = 1.2
    shift_std: float = 0.02
    blinks_per_minute: float = 15.0
    blink_seconds: float = 0.25

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_summary(cls, summary: dict) -> "MotionStats":
        """From `dataset.dataset_motion_stats(...)["summary"]`; missing figures keep their defaults.

        The dataset measures how long the eyes are more than half closed; a whole blink lasts about 1.5 times that.
        """
        values = {f.name: summary[f.name] for f in fields(cls) if summary.get(f.name) is not None}
        if "blink_seconds" in values:
            values["blink_seconds"] *= 1.5
        return cls(**values)


def _smooth_noise(rng: np.random.Generator, n: int, sigma_frames: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise of n samples (Gaussian-filtered white noise)."""
    pad = int(4 * sigma_frames) + 1
    noise = gaussian_filter1d(rng.standard_normal(n + 2 * pad), sigma_frames)[pad : pad + n]
    return noise / max(noise.std(), 1e-9)


def generate_head_motion(
    n_frames: int, fps: float = 25.0, stats: MotionStats | None = None, seed: int | None = None
) -> np.ndarray:
    """[T, 4, 4] rotations (yaw, pitch, roll about the canonical eye midpoint) plus a small drift, canonical -> canonical."""
    if n_frames <= 0:
        raise LmdiffInputError(f"head motion needs a positive number of frames, got {n_frames}")
    stats = stats or MotionStats()
    rng = np.random.default_rng(seed)
    sigma = max(stats.time_scale * fps / 2, 1.0)
    angles = np.stack(
        [_smooth_noise(rng, n_frames, sigma) * s for s in (stats.yaw_std, stats.pitch_std, stats.roll_std)], axis=1
    )
    angles -= angles[0]  # start from the reference's own pose
    rotation = Rotation.from_euler("YXZ", angles, degrees=True).as_matrix()
    pivot = np.array([*CANONICAL_EYE_MID, 60.0])  # roughly the centre of the head, behind the eyes
    motion = np.zeros((n_frames, 4, 4))
    motion[:, :3, :3] = rotation
    motion[:, :3, 3] = pivot - np.einsum("tij,j->ti", rotation, pivot)
    drift = (
        np.stack([_smooth_noise(rng, n_frames, 2 * sigma) for _ in range(2)], axis=1)
        * stats.shift_std
        * CANONICAL_INTER_OCULAR
    )
    motion[:, :2, 3] += drift - drift[0]
    motion[:, 3, 3] = 1.0
    return motion


def apply_head_motion(seq: LandmarkSequence, motion: np.ndarray) -> LandmarkSequence:
    """Canonical landmarks moved by per-frame canonical transforms (e.g. from `generate_head_motion`).

    The result stays canonical and keeps its pose, so `uncanonicalize` places the moving head in the frame.
    """
    if seq.space != "canonical":
        raise LmdiffInputError("apply_head_motion expects canonical landmarks")
    if motion.shape != (len(seq), 4, 4):
        raise LmdiffInputError(f"head motion has shape {motion.shape}, expected ({len(seq)}, 4, 4)")
    return seq.replace(points=apply_transform(motion, seq.points).astype(np.float32))


def blink_curve(n_frames: int, fps: float = 25.0, stats: MotionStats | None = None, seed: int | None = None):
    """[T] eyelid closure in 0..1: blinks at random (Poisson) times, each a smooth close-and-open."""
    stats = stats or MotionStats()
    rng = np.random.default_rng(seed)
    closure = np.zeros(n_frames)
    t = rng.exponential(60.0 / stats.blinks_per_minute) * fps
    width = max(stats.blink_seconds * fps, 2.0)
    frames = np.arange(n_frames)
    while t < n_frames:
        closure = np.maximum(
            closure, np.clip(np.cos(np.pi * (frames - t) / width), 0, 1) * (np.abs(frames - t) < width / 2)
        )
        t += max(rng.exponential(60.0 / stats.blinks_per_minute) * fps, 2 * width)
    return closure


def add_blinks(seq: LandmarkSequence, closure: np.ndarray) -> LandmarkSequence:
    """Close the eyes by `closure` [T] (0 open .. 1 shut): upper and lower lids meet at each eye's mid-line."""
    if len(closure) != len(seq):
        raise LmdiffInputError(f"blink curve has {len(closure)} frames, the landmarks {len(seq)}")
    topo = get_topology(seq.topology)
    points = seq.points.copy()
    for eye, (a, b) in zip(("right_eye", "left_eye"), topo.eye_corners, strict=True):
        lid = topo.part_indices(eye)
        lid = lid[(lid != a) & (lid != b)]
        corner_a, corner_b = points[:, a, :2], points[:, b, :2]
        axis = corner_b - corner_a
        axis /= np.maximum(np.linalg.norm(axis, axis=-1, keepdims=True), 1e-6)
        rel = points[:, lid, :2] - corner_a[:, None]
        along = np.einsum("tnd,td->tn", rel, axis)
        on_line = corner_a[:, None] + along[..., None] * axis[:, None]
        points[:, lid, :2] += (on_line - points[:, lid, :2]) * closure[:, None, None]
    return seq.replace(points=points)
