"""Head motion and blinks for generated (pose-free) landmarks.

A2L predicts canonical landmarks: a frontal face that talks but never moves its head or blinks. Before rendering,
pose comes back either from a driving video (`canonical.transfer_pose`) or from `generate_head_motion`, a smooth
random head motion whose amplitude and speed follow measured statistics, and blinks from `add_blinks`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.transform import Rotation

from .canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR, apply_transform, head_pose
from .data.store import BLENDSHAPE_NAMES, clip_sequence, load_index, split_entries
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import get_topology

EYE_BLINK_LEFT = BLENDSHAPE_NAMES.index("eyeBlinkLeft")  # 9
EYE_BLINK_RIGHT = BLENDSHAPE_NAMES.index("eyeBlinkRight")  # 10
BLINK_THRESHOLD = 0.5  # mean of eyeBlinkLeft and eyeBlinkRight above this: eyes (more than half) closed
BLINK_MERGE_FRAMES = 1  # closed runs this many frames apart or less are one blink (score flicker at the threshold)
BLINK_MAX_SECONDS = 1.0  # a longer closure is not a blink (eyes shut, or looking down), counted apart


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
        """From `dataset_motion_stats(...)["summary"]`; missing figures keep their defaults.

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



def natural_motion(
    seq: LandmarkSequence, stats: MotionStats | None, seed: int | None, head_motion: bool = True
) -> LandmarkSequence:
    """Canonical (A2L) landmarks with generated head motion (`generate_head_motion`; with `head_motion=False` the
    pose stays, e.g. one taken from a driving video) and blinks (`blink_curve`), both drawn from `stats`."""
    n = len(seq)
    if head_motion:
        seq = apply_head_motion(seq, generate_head_motion(n, seq.fps, stats, seed))
    return add_blinks(seq, blink_curve(n, seq.fps, stats, seed))

# -- statistics of a prepared dataset ------------------------------------------------------------------------------
def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _time_scale(values: np.ndarray, fps: float) -> float:
    """Seconds until the autocorrelation of a signal falls below 1/e (a Gaussian-smoothed noise of sigma s frames
    gives 2 s, the `time_scale * fps` of `motion.generate_head_motion`); nan for a constant signal."""
    x = np.asarray(values, dtype=np.float64) - np.mean(values)
    energy = float(np.dot(x, x))
    if len(x) < 3 or energy <= 1e-12:
        return float("nan")
    for lag in range(1, len(x)):
        if np.dot(x[:-lag], x[lag:]) / energy < math.exp(-1.0):
            return lag / fps
    return len(x) / fps


def blink_runs(
    blendshapes: np.ndarray,
    fps: float,
    threshold: float = BLINK_THRESHOLD,
    merge_frames: int = BLINK_MERGE_FRAMES,
    max_seconds: float = BLINK_MAX_SECONDS,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(blinks, long closures): runs (start, end exclusive) of frames where the mean of the eyeBlinkLeft (9) and
    eyeBlinkRight (10) blendshapes exceeds `threshold`. Runs at most `merge_frames` apart are joined; runs longer
    than `max_seconds` are long closures, not blinks."""
    closure = (blendshapes[:, EYE_BLINK_LEFT] + blendshapes[:, EYE_BLINK_RIGHT]) / 2
    merged: list[list[int]] = []
    for a, b in _runs(closure > threshold):
        if merged and a - merged[-1][1] <= merge_frames:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    blinks = [(a, b) for a, b in merged if (b - a) / fps <= max_seconds]
    long_closures = [(a, b) for a, b in merged if (b - a) / fps > max_seconds]
    return blinks, long_closures


def clip_motion_stats(seq, blink_threshold: float = BLINK_THRESHOLD) -> dict:
    """Head-motion and blink statistics of one canonical `LandmarkSequence` with pose (see dataset_motion_stats)."""
    pose = head_pose(seq)
    fps = seq.fps
    out: dict = {"n_frames": len(seq), "seconds": len(seq) / fps}
    scales = []
    for axis in ("yaw", "pitch", "roll"):
        a = np.unwrap(np.radians(pose[axis])) * 180 / np.pi
        out[f"{axis}_std"] = float(np.std(a))
        out[f"{axis}_velocity"] = float(np.mean(np.abs(np.diff(a))) * fps) if len(a) > 1 else 0.0  # deg/s
        scales.append(_time_scale(a, fps))
    finite = [s for s in scales if math.isfinite(s)]
    out["time_scale"] = float(np.mean(finite)) if finite else float("nan")
    iod = np.maximum(pose["scale"] * CANONICAL_INTER_OCULAR, 1e-6)  # frame px per inter-ocular distance
    out["shift_std"] = float((np.std(pose["tx"] / iod) + np.std(pose["ty"] / iod)) / 2)
    if seq.blendshapes is not None and seq.blendshapes.shape[1] > EYE_BLINK_RIGHT:
        blinks, long_closures = blink_runs(seq.blendshapes, fps, blink_threshold)
        durations = [(b - a) / fps for a, b in blinks]
        out["blinks"] = len(blinks)
        out["blinks_per_minute"] = len(blinks) / (len(seq) / fps) * 60.0
        out["blink_seconds"] = float(np.mean(durations)) if durations else None
        out["blink_durations"] = durations
        out["long_closures"] = len(long_closures)
    else:
        out.update(blinks=None, blinks_per_minute=None, blink_seconds=None, blink_durations=[], long_closures=None)
    return out


def dataset_motion_stats(dataset_dir, split: str | None = "train", blink_threshold: float = BLINK_THRESHOLD) -> dict:
    """Head-pose and blink statistics of a prepared dataset, for the pose/blink generator (`motion.MotionStats`).

    Per clip (`clip_motion_stats`), from the stored (smoothed) pose through `canonical.head_pose`: the std of yaw,
    pitch and roll (degrees), their mean absolute velocity (deg/s), the motion time scale (s: the lag at which the
    angles' autocorrelation falls to 1/e, averaged over the three; for Gaussian-smoothed noise this is the
    `time_scale` of `motion.generate_head_motion`), the spread of the head position (std of the eye midpoint in the
    frame, in inter-ocular distances). Blinks (`blink_runs`): runs of frames where the mean of the eyeBlinkLeft
    (blendshape 9) and eyeBlinkRight (10) scores exceeds `blink_threshold` (runs one frame apart joined, runs over
    1 s counted as long closures instead), as blinks per minute and blink_seconds, the mean time the eyes are more
    than half closed per blink (a cosine-shaped blink of full width w is above half closure for 2/3 w).

    Returns {"summary": {...}, "clips": {id: {...}}, "blendshape_indices": {...}, "blink_threshold": ...}; the
    summary averages the clips weighted by duration (blinks: all blinks over all minutes) under the names of
    `motion.MotionStats` (yaw_std, pitch_std, roll_std, time_scale, shift_std, blinks_per_minute, blink_seconds)
    plus the velocities; blink figures are None when no clip has blendshapes (blink_seconds also when no blink was
    seen). Short clips underestimate time_scale (their autocorrelation is cut off).
    """
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    entries = split_entries(index, split)
    if not entries:
        raise LmdiffInputError(f"dataset {folder} has no clip in split {split!r}")
    clips = {e["id"]: clip_motion_stats(clip_sequence(folder, e["id"]), blink_threshold) for e in entries}
    weights = np.array([c["seconds"] for c in clips.values()])

    def wmean(key: str):
        vals = np.array([c[key] for c in clips.values()], dtype=np.float64)
        ok = np.isfinite(vals)
        return float(np.average(vals[ok], weights=weights[ok])) if ok.any() else None

    summary = {
        k: wmean(k)
        for k in (
            "yaw_std",
            "pitch_std",
            "roll_std",
            "time_scale",
            "shift_std",
            "yaw_velocity",
            "pitch_velocity",
            "roll_velocity",
        )
    }
    with_blinks = [c for c in clips.values() if c["blinks"] is not None]
    minutes = sum(c["seconds"] for c in with_blinks) / 60.0
    durations = [d for c in with_blinks for d in c["blink_durations"]]
    summary["blinks_per_minute"] = sum(c["blinks"] for c in with_blinks) / minutes if with_blinks else None
    summary["blink_seconds"] = float(np.mean(durations)) if durations else None
    summary["n_clips"] = len(clips)
    summary["seconds"] = float(weights.sum())
    return {
        "summary": summary,
        "clips": clips,
        "blendshape_indices": {"eyeBlinkLeft": EYE_BLINK_LEFT, "eyeBlinkRight": EYE_BLINK_RIGHT},
        "blink_threshold": blink_threshold,
    }
