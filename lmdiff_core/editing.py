"""Landmark editing: mouth gain, frontalisation, head motion and pose transfer on `LandmarkSequence`s.

Edits that must not move with the head work on canonical (pose-free) landmarks and put the result back with each
frame's pose, so a sequence comes back in the space it came in: image-space landmarks are canonicalised and
uncanonicalised around the edit, canonical ones must carry a pose (from `canonicalize`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .canonical import CANONICAL_EYE_MID, canonicalize, uncanonicalize
from .canonical import transfer_pose as _transfer_canonical
from .errors import LmdiffInputError
from .landmarks import FIT_MODES, LandmarkSequence
from .topology import get_topology

TRANSFER_PARTS = ("face", "lips_and_jaw")
LOWER_FACE_PARTS = ("outer_lips", "inner_lips", "contour")  # what "lips_and_jaw" replaces; contour: the jaw line


def rest_frame(seq: LandmarkSequence) -> int:
    """Index of the valid frame with the most closed mouth (the speaker at rest)."""
    valid = np.flatnonzero(seq.valid)
    if valid.size == 0:
        raise LmdiffInputError(f"the landmarks ({len(seq)} frames) have no valid frame")
    return int(valid[np.argmin(seq.mouth_opening()[valid])])


def _edit_canonical(seq: LandmarkSequence, edit: Callable[[LandmarkSequence], LandmarkSequence]) -> LandmarkSequence:
    """Apply `edit` to the canonical landmarks of `seq` and return the result in the space of `seq`."""
    if seq.space == "image":
        return uncanonicalize(edit(canonicalize(seq)))
    if seq.pose is None:
        raise LmdiffInputError("canonical landmarks without a pose cannot be edited here: run canonicalize first")
    return edit(seq)


def mouth_indices(canonical: LandmarkSequence, rest: np.ndarray) -> np.ndarray:
    """The lips and the part of the face contour below the mouth corners (jaw and chin) in the `rest` frame [N, 3]."""
    topo = get_topology(canonical.topology)
    lips = np.union1d(topo.part_indices("outer_lips"), topo.part_indices("inner_lips"))
    contour = topo.part_indices("contour")
    corner_y = rest[list(topo.mouth_corners), 1].mean()
    return np.union1d(lips, contour[rest[contour, 1] > corner_y])


def mouth_gain(seq: LandmarkSequence, gain: float) -> LandmarkSequence:
    """Lip and jaw motion scaled by `gain` (0 = mouth held at rest, 1 = unchanged, > 1 = exaggerated).

    Motion is measured in canonical space from the rest frame (`rest_frame`, the most closed mouth), so head motion
    is not scaled; every other point is left as it is.
    """
    if not (np.isfinite(gain) and gain >= 0):
        raise LmdiffInputError(f"mouth gain must be a finite number >= 0, got {gain!r}")
    at_rest = rest_frame(seq)

    def edit(canonical: LandmarkSequence) -> LandmarkSequence:
        rest = canonical.points[at_rest]
        mouth = mouth_indices(canonical, rest)
        points = canonical.points.copy()
        points[:, mouth] = rest[mouth] + gain * (points[:, mouth] - rest[mouth])
        return canonical.replace(points=points)

    return _edit_canonical(seq, edit)


def frontalize(seq: LandmarkSequence, strength: float = 1.0) -> LandmarkSequence:
    """Head rotation (yaw, pitch, roll) removed by `strength` (0..1); position, size and expression are kept.

    Each frame's pose becomes its scale times the rotation reduced by `strength` (along the shortest path), placed so
    that the canonical eye midpoint lands where it was.
    """
    from scipy.spatial.transform import Rotation

    if not (np.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise LmdiffInputError(f"frontalize strength must be between 0 and 1, got {strength!r}")

    def edit(canonical: LandmarkSequence) -> LandmarkSequence:
        pose = canonical.pose
        scale = np.cbrt(np.linalg.det(pose[:, :3, :3]))
        rotvec = Rotation.from_matrix(pose[:, :3, :3] / scale[:, None, None]).as_rotvec()
        linear = scale[:, None, None] * Rotation.from_rotvec(rotvec * (1.0 - strength)).as_matrix()
        eye_mid = np.array([*CANONICAL_EYE_MID, 0.0])
        placed = np.einsum("tij,j->ti", pose[:, :3, :3], eye_mid) + pose[:, :3, 3]
        frontal = np.zeros_like(pose)
        frontal[:, :3, :3] = linear
        frontal[:, :3, 3] = placed - np.einsum("tij,j->ti", linear, eye_mid)
        frontal[:, 3, 3] = 1.0
        return canonical.replace(pose=frontal)

    return _edit_canonical(seq, edit)


def add_head_motion(seq: LandmarkSequence, stats=None, seed: int | None = None) -> LandmarkSequence:
    """Generated head motion (`motion.generate_head_motion`, MotionStats `stats`) on top of each frame's pose."""
    from .motion import apply_head_motion, generate_head_motion

    return _edit_canonical(seq, lambda c: apply_head_motion(c, generate_head_motion(len(c), c.fps, stats, seed)))


def pose_from(talking: LandmarkSequence, driving: LandmarkSequence, fit: str = "loop") -> LandmarkSequence:
    """Canonical landmarks `talking` carrying the head pose of `driving` (a video's image-space landmarks, or canonical
    ones with a pose), frame by frame: the driving landmarks are resampled to `talking`'s frame rate and fitted to its
    length with `fit` ("loop", "pingpong" or "hold"). `uncanonicalize` then places the face in the driving frames."""
    if talking.space != "canonical":
        raise LmdiffInputError("pose_from: the talking landmarks must be canonical (A2L output, or run canonicalize)")
    driving = canonicalize(_driving_frames(driving, fit, talking))
    return talking.replace(pose=driving.pose, image_size=driving.image_size)


def _driving_frames(driving: LandmarkSequence, fit: str, like: LandmarkSequence | None) -> LandmarkSequence:
    """Image-space driving landmarks; with `like`, resampled to its frame rate and fitted to its length by `fit`."""
    if fit not in FIT_MODES:
        raise LmdiffInputError(f"the driving landmarks' fit must be one of {FIT_MODES}, got {fit!r}")
    if driving.space == "canonical":
        if driving.pose is None:
            raise LmdiffInputError("the driving landmarks carry no head pose: give image-space landmarks")
        driving = uncanonicalize(driving)
    if like is not None:
        if driving.fps != like.fps:
            driving = driving.resample(like.fps)
        driving = driving.fit_length(len(like), fit)
    return driving


def transfer_pose(
    seq: LandmarkSequence, driving: LandmarkSequence, parts: str = "face", fit: str = "loop"
) -> LandmarkSequence:
    """`seq`'s face posed like `driving`, frame by frame: image-space landmarks in the driving frames.

    parts: "face" puts all of `seq`'s canonical face into the driving pose (reenactment); "lips_and_jaw" keeps the
    driving face and replaces only its lips and jaw (dubbing: the driving eyes and blinks stay).
    Lengths: one frame of `seq` follows the whole driving sequence; otherwise the driving landmarks (resampled to
    `seq`'s frame rate) are fitted to `seq`'s length with `fit` ("loop", "pingpong" or "hold"; longer ones trimmed).
    """
    if parts not in TRANSFER_PARTS:
        raise LmdiffInputError(f"transfer_pose parts must be one of {TRANSFER_PARTS}, got {parts!r}")
    driving = _driving_frames(driving, fit, seq if len(seq) > 1 else None)
    if seq.topology != driving.topology:  # only mediapipe478 -> ibug68 converts
        seq = seq.to_topology("ibug68")
    canonical = seq if seq.space == "canonical" else canonicalize(seq)
    if parts == "face":  # the driver's pose is measured in its own topology (more points), then converted
        return _transfer_canonical(canonical, canonicalize(driving).to_topology(canonical.topology))
    if len(canonical) == 1:
        canonical = canonical[np.zeros(len(driving), dtype=int)]
    return dub_landmarks(driving, canonical)


def dub_landmarks(source: LandmarkSequence, talking: LandmarkSequence, chunk: int = 1000) -> LandmarkSequence:
    """Image-space landmarks of the video `source` (same length as `talking`) with the lips and jaw of the canonical
    A2L output `talking`, posed like the video. Done `chunk` frames at a time (bounded memory for long videos) when
    every chunk has a detected face."""
    starts = range(0, len(source), chunk)
    if len(source) > chunk and all(source.valid[i : i + chunk].any() for i in starts):
        return LandmarkSequence.concatenate(
            [dub_landmarks(source[i : i + chunk], talking[i : i + chunk], chunk) for i in starts]
        )
    topology = talking.topology
    canonical = canonicalize(source).to_topology(topology)
    lower = np.unique(np.concatenate([get_topology(topology).part_indices(p) for p in LOWER_FACE_PARTS]))
    points = canonical.points.copy()
    points[:, lower] = talking.points[:, lower]
    return uncanonicalize(canonical.replace(points=points))
