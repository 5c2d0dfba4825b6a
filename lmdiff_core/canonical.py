"""Canonical (pose-free) landmark geometry, as in Landmark-guided Diffusion (arXiv 2408.01732) and Dual Diffusion / MoDiTalker (arXiv 2403.19144).

Every frame is related to the canonical mean face by a 3D similarity transform fitted on stable upper-face points
(eye corners, nose bridge, forehead, temples; never the mouth, jaw or eyelids). Applying it gives canonical landmarks
that keep the speaker's expression and lip shape but not the head pose; its inverse, stored per frame in
`LandmarkSequence.pose`, puts edited or generated canonical landmarks back into the frame.

The canonical space is a virtual frontal 512x512 image: x right, y down, z away from the camera, the eye midpoint at
`CANONICAL_EYE_MID` and outer eye corners `CANONICAL_INTER_OCULAR` px apart.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .assets import asset
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import convert_points, get_topology

CANONICAL_SIZE = (512, 512)
CANONICAL_EYE_MID = (256.0, 220.0)
CANONICAL_INTER_OCULAR = 150.0


def to_model_units(points: np.ndarray) -> np.ndarray:
    """Canonical points (px) -> model units: origin at the eye midpoint, one unit = the canonical inter-ocular distance."""
    centre = np.array([*CANONICAL_EYE_MID, 0.0], dtype=np.float32)
    return ((np.asarray(points, dtype=np.float32) - centre) / CANONICAL_INTER_OCULAR).astype(np.float32)


def from_model_units(points: np.ndarray) -> np.ndarray:
    """Inverse of `to_model_units`."""
    centre = np.array([*CANONICAL_EYE_MID, 0.0], dtype=np.float32)
    return (np.asarray(points, dtype=np.float32) * CANONICAL_INTER_OCULAR + centre).astype(np.float32)


@lru_cache(maxsize=None)
def mean_face(topology: str) -> np.ndarray:
    """The canonical mean face [N, 3] (float64) of a topology (see scripts/build_face_assets.py for its origin)."""
    with asset("mean_face_mediapipe478.npy").open("rb") as f:
        face = np.load(f).astype(np.float64)
    face = convert_points(face, "mediapipe478", get_topology(topology).name)
    face.setflags(write=False)
    return face


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None):
    """Batched least-squares similarity dst ~ s * R @ src + t (Umeyama 1991) for src, dst [B, K, 3].

    Returns s [B], R [B, 3, 3] (proper rotations), t [B, 3].
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(src.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s = np.einsum("k,bkd->bd", w, src)
    mu_d = np.einsum("k,bkd->bd", w, dst)
    xs, xd = src - mu_s[:, None], dst - mu_d[:, None]
    cov = np.einsum("k,bki,bkj->bij", w, xd, xs)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones_like(sig)
    d[:, -1] = np.sign(np.linalg.det(u @ vt))
    r = u @ (d[:, :, None] * vt)
    var_s = np.einsum("k,bkd->b", w, xs**2)
    s = (sig * d).sum(1) / var_s
    t = mu_d - s[:, None] * np.einsum("bij,bj->bi", r, mu_s)
    return s, r, t


def nearest_valid(n: int, valid: np.ndarray) -> np.ndarray:
    """For each of n frames, the position in `valid` (sorted frame indices) of the nearest valid frame, the earlier
    one on a tie; O(n log v) memory-light, for sequences of any length."""
    frames = np.arange(n)
    right = np.clip(np.searchsorted(valid, frames), 0, len(valid) - 1)
    left = np.maximum(right - 1, 0)
    take_left = np.abs(frames - valid[left]) <= np.abs(valid[right] - frames)
    return np.where(take_left, left, right)


def _similarity_matrix(s: np.ndarray, r: np.ndarray, t: np.ndarray) -> np.ndarray:
    m = np.zeros((len(s), 4, 4))
    m[:, :3, :3] = s[:, None, None] * r
    m[:, :3, 3] = t
    m[:, 3, 3] = 1.0
    return m


def apply_transform(matrices: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply per-frame 4x4 transforms [T, 4, 4] to points [T, N, 3] (float64 out)."""
    return np.einsum("tij,tnj->tni", matrices[:, :3, :3], points.astype(np.float64)) + matrices[:, None, :3, 3]


def lift_depth(points: np.ndarray, topology: str) -> np.ndarray:
    """Give 2D landmarks [T, N, 3] (z = 0) a depth from the mean face under a weak-perspective fit (POS).

    x and y are kept; z is the fitted mean face's depth, so a 3D similarity can remove yaw and pitch too.
    """
    template = mean_face(topology)
    stable = np.asarray(get_topology(topology).stable)
    x_h = np.concatenate([template[stable], np.ones((len(stable), 1))], axis=1)  # [K, 4]
    out = points.astype(np.float64).copy()
    # Least-squares affine camera M [2, 4] per frame: xy ~ M @ [X, 1].
    m = np.einsum("ij,tjk->tik", np.linalg.pinv(x_h), points[:, stable, :2].astype(np.float64)).transpose(0, 2, 1)
    rows = m[:, :, :3]
    u, sig, vt = np.linalg.svd(rows, full_matrices=False)
    scale = sig.mean(1)
    r12 = u @ vt  # nearest orthonormal pair of rows
    r3 = np.cross(r12[:, 0], r12[:, 1])
    depth = scale[:, None] * np.einsum("tj,nj->tn", r3, template)
    out[..., 2] = depth - depth.mean(1, keepdims=True)
    return out


def canonicalize(seq: LandmarkSequence) -> LandmarkSequence:
    """Pose-free landmarks of an image-space sequence; `.pose` of the result maps them back into the frames."""
    if seq.space != "image":
        raise LmdiffInputError("canonicalize expects landmarks in image space; these are already canonical")
    topo = get_topology(seq.topology)
    template = mean_face(seq.topology)
    points = seq.points.astype(np.float64)
    if not np.any(points[seq.valid, :, 2]):
        points = lift_depth(points, seq.topology)
    stable = np.asarray(topo.stable)
    valid = np.flatnonzero(seq.valid)
    if valid.size == 0:
        raise LmdiffInputError("cannot canonicalise a landmark sequence without any valid frame")
    s, r, t = umeyama(points[valid][:, stable], np.broadcast_to(template[stable], (valid.size, len(stable), 3)))
    to_canonical = np.empty((len(seq), 4, 4))
    # Frames without a face take the transform of the nearest valid frame.
    to_canonical[:] = _similarity_matrix(s, r, t)[nearest_valid(len(seq), valid)]
    canonical = apply_transform(to_canonical, points)
    canonical[~seq.valid] = template
    return seq.replace(
        points=canonical.astype(np.float32),
        space="canonical",
        frame_size=CANONICAL_SIZE,
        image_size=seq.frame_size,
        pose=np.linalg.inv(to_canonical),
    )


def uncanonicalize(seq: LandmarkSequence) -> LandmarkSequence:
    """Canonical landmarks put back into their frames with their own `.pose`."""
    if seq.space != "canonical" or seq.pose is None or seq.image_size is None:
        raise LmdiffInputError("uncanonicalize expects canonical landmarks that carry a pose (from canonicalize)")
    points = apply_transform(seq.pose, seq.points)
    return seq.replace(
        points=points.astype(np.float32), space="image", frame_size=seq.image_size, image_size=None, pose=None
    )


def transfer_pose(target: LandmarkSequence, driving: LandmarkSequence) -> LandmarkSequence:
    """Put `driving`'s per-frame head pose onto `target`'s canonical landmarks (alignment step of "Dual diffusion model for one-shot high-fidelity talking head generation" (published as MoDiTalker, arXiv 2403.19144)).

    target: canonical landmarks (one frame, broadcast over the driving sequence, or as many frames as `driving`).
    driving: canonical landmarks with pose (from `canonicalize` of the driving video).
    Returns image-space landmarks in the driving video's frames.
    """
    if target.space != "canonical":
        raise LmdiffInputError("transfer_pose: the target landmarks must be canonical (run canonicalize first)")
    if driving.space != "canonical" or driving.pose is None:
        raise LmdiffInputError("transfer_pose: the driving landmarks must be canonical with a pose (from canonicalize)")
    if target.topology != driving.topology:
        target = target.to_topology(driving.topology)
    if len(target) == 1:
        points = np.repeat(target.points, len(driving), axis=0)
    elif len(target) == len(driving):
        points = target.points
    else:
        raise LmdiffInputError(
            f"transfer_pose: target has {len(target)} frames and driving {len(driving)}; expected 1 or the same count"
        )
    blendshapes = target.blendshapes if len(target) == len(driving) else None
    return uncanonicalize(driving.replace(points=points, blendshapes=blendshapes))


def head_pose(seq: LandmarkSequence) -> dict[str, np.ndarray]:
    """Per-frame head pose of canonical landmarks: yaw, pitch, roll (degrees), tx, ty (px), scale.

    Angles are intrinsic Y-X-Z rotations about image axes (x right, y down, z into the scene) taking the canonical
    frontal face to the frame; tx, ty is where the canonical eye midpoint lands; scale is frame px per canonical px.
    """
    from scipy.spatial.transform import Rotation

    if seq.pose is None:
        raise LmdiffInputError("head_pose expects canonical landmarks carrying a pose (from canonicalize)")
    linear = seq.pose[:, :3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    yaw, pitch, roll = Rotation.from_matrix(linear / scale[:, None, None]).as_euler("YXZ", degrees=True).T
    eye_mid = np.array([*CANONICAL_EYE_MID, 0.0])
    centre = apply_transform(seq.pose, np.broadcast_to(eye_mid, (len(seq), 1, 3)))[:, 0]
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "tx": centre[:, 0], "ty": centre[:, 1], "scale": scale}
