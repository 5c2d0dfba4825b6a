"""Appearance bank: the person's own face crops, indexed by lip/jaw shape and head pose, retrieved and warped.

The video to dub (or a portrait plus any extra frames of the same person) already shows this very mouth open,
closed and in between. `AppearanceBank.build` keeps aligned face crops of up to `max_entries` of its frames, picked to
cover the lip/jaw shapes and poses it contains (farthest-point sampling), each indexed by

- its canonical lips and jaw (`lmdiff_core.canonical`: pose-free, iBUG-68 outer lips, inner lips and lower jaw line,
  x and y in inter-ocular units), and
- its head pose (yaw, pitch, roll in degrees, `canonical.head_pose`).

For each output frame `retrieve` finds the K entries closest to the target lips and pose (cost = mean squared lip
distance / LIP_SIGMA^2 + squared angle difference / POSE_SIGMA^2), keeps the sources of the previous frame unless a new
one is better by `hysteresis`, and smooths the blending weights over time, so sources cross-fade instead of switching.
`warp` puts an entry onto a target frame's crop geometry with one thin-plate spline (kornia) fitted on: the lower-face
points (lips and jaw go where the target has them) plus the stable upper-face points and the crop border, which go
where a similarity fitted on the stable points sends them (the head is aligned rigidly, the mouth is bent). Frames can
be left out of the index (`exclude`): an evaluation's scored frames must never be retrievable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .canonical import CANONICAL_INTER_OCULAR, canonicalize, head_pose, umeyama
from .crop import compute_crop_track, crop_frames, transform_landmarks
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import get_topology

KEY_TOPOLOGY = "ibug68"
LIP_POINTS = tuple(range(48, 68))  # outer (48-59) and inner (60-67) lips
JAW_POINTS = tuple(range(3, 14))  # the jaw line under the cheeks (the ends near the ears barely move)
KEY_POINTS = LIP_POINTS + JAW_POINTS
KEY_WEIGHTS = np.array([1.0] * len(LIP_POINTS) + [0.5] * len(JAW_POINTS))
WARP_POINTS = tuple(i for i in range(2, 15)) + tuple(i for i in range(48, 60)) + (61, 62, 63, 65, 66, 67)
# the thin-plate spline's lower-face control points: jaw, outer lips, inner lips without their corners (they sit on
# the outer corners) ...
NOSE_POINTS = (31, 32, 33, 34, 35)  # ... and the nose base, which moves with the head
LIP_SIGMA = 0.03  # inter-ocular units: a lip shape this far (RMS) costs as much as a POSE_SIGMA pose difference
POSE_SIGMA = 15.0  # degrees
BORDER_ANCHORS = 5  # per crop side: the crop's edge follows the similarity (no bending reaches it)
SPLINE_SMOOTHING = 1e-4  # ridge on the spline's kernel (normalised crop units): near-coincident points stay solvable
GRID = 32  # the spline is evaluated on a GRID x GRID grid, upsampled bilinearly to the crop


def _rigid_points() -> np.ndarray:
    stable = np.asarray(get_topology(KEY_TOPOLOGY).stable)
    return np.setdiff1d(stable, np.asarray(WARP_POINTS + NOSE_POINTS))


def shape_keys(seq: LandmarkSequence) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval keys of image-space landmarks: (lips and jaw [T, P, 2] canonical, inter-ocular units;
    pose [T, 3] yaw, pitch, roll in degrees). Invalid frames get the mean face's keys (exclude them yourself)."""
    canonical = canonicalize(seq)
    pose = head_pose(canonical)
    points = canonical.to_topology(KEY_TOPOLOGY).points[:, list(KEY_POINTS), :2].astype(np.float64)
    return points / CANONICAL_INTER_OCULAR, np.stack([pose["yaw"], pose["pitch"], pose["roll"]], axis=1)


def match_cost(lips_a: np.ndarray, pose_a: np.ndarray, lips_b: np.ndarray, pose_b: np.ndarray) -> np.ndarray:
    """Cost matrix [A, B] between keys (see the module docstring); 0 = the same lips and pose."""
    w = KEY_WEIGHTS / KEY_WEIGHTS.sum()
    fa = (lips_a * np.sqrt(w)[None, :, None]).reshape(len(lips_a), -1)
    fb = (lips_b * np.sqrt(w)[None, :, None]).reshape(len(lips_b), -1)
    lip_d2 = np.maximum((fa**2).sum(1)[:, None] + (fb**2).sum(1)[None] - 2 * fa @ fb.T, 0.0) / 2  # per coordinate
    dp = pose_a[:, None, :] - pose_b[None, :, :]
    dp = (dp + 180.0) % 360.0 - 180.0
    return lip_d2 / LIP_SIGMA**2 + (dp**2).sum(-1) / POSE_SIGMA**2


def _farthest_points(features: np.ndarray, count: int) -> np.ndarray:
    """`count` rows of features [N, D] chosen greedily, each the farthest from those already chosen (sorted)."""
    chosen = [int(np.argmin(((features - features.mean(0)) ** 2).sum(1)))]
    dist = ((features - features[chosen[0]]) ** 2).sum(1)
    for _ in range(count - 1):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, ((features - features[nxt]) ** 2).sum(1))
    return np.sort(np.asarray(chosen))


@dataclass
class Retrieval:
    """Per output frame the bank entries to blend: indices [T, K] int and weights [T, K] (rows sum to 1; an
    unused slot has weight 0), and the cost [T] of each frame's best match (0 = the exact lips and pose)."""

    indices: np.ndarray
    weights: np.ndarray
    best_cost: np.ndarray


class AppearanceBank:
    """Aligned face crops of one person with their retrieval keys (see the module docstring).

    crops: uint8 [B, 3, S, S]; landmarks: their crop-space landmarks (iBUG-68, B frames); lips [B, P, 2] and
    pose [B, 3]: the keys; frames: the index of each entry in the frames the bank was built from.
    """

    def __init__(self, crops: torch.Tensor, landmarks: LandmarkSequence, lips, pose, frames):
        self.crops = crops
        self.landmarks = landmarks
        self.lips = np.asarray(lips, dtype=np.float64)
        self.pose = np.asarray(pose, dtype=np.float64)
        self.frames = np.asarray(frames, dtype=int)
        self.size = int(crops.shape[-1])

    def __len__(self) -> int:
        return len(self.frames)

    @classmethod
    def build(
        cls,
        frames: Iterable[np.ndarray] | np.ndarray,
        landmarks: LandmarkSequence,
        size: int = 256,
        max_entries: int = 256,
        exclude=None,
        source: str = "the bank frames",
    ) -> "AppearanceBank":
        """Index frames (uint8 [H, W, 3], an iterable read once, as many as `landmarks`) by their image-space
        `landmarks`. Frames without a face and those in `exclude` (indices or a bool mask [T]) are never entries;
        when more remain than `max_entries`, a subset covering their lip shapes and poses is kept."""
        if not isinstance(landmarks, LandmarkSequence) or landmarks.space != "image":
            raise LmdiffInputError("AppearanceBank.build needs image-space landmarks of the bank frames")
        if isinstance(max_entries, bool) or not isinstance(max_entries, (int, np.integer)) or max_entries < 1:
            raise LmdiffInputError(f"max_entries must be an integer of at least 1, got {max_entries!r}")
        usable = landmarks.valid & ~landmarks.interpolated
        if exclude is not None:
            ex = np.asarray(exclude)
            mask = np.zeros(len(landmarks), dtype=bool)
            if ex.dtype == bool:
                if ex.shape != (len(landmarks),):
                    raise LmdiffInputError(f"exclude: a bool mask must have {len(landmarks)} entries, got {ex.shape}")
                mask = ex
            else:
                mask[ex.astype(int)] = True
            usable &= ~mask
        candidates = np.flatnonzero(usable)
        if candidates.size == 0:
            raise LmdiffInputError(f"no face found in any usable frame of {source}: the appearance bank is empty")
        lips, pose = shape_keys(landmarks[candidates])
        if candidates.size > max_entries:
            features = np.concatenate(
                [(lips * np.sqrt(KEY_WEIGHTS / KEY_WEIGHTS.sum())[:, None]).reshape(len(lips), -1) / LIP_SIGMA,
                 pose / POSE_SIGMA], axis=1
            )
            keep = _farthest_points(features, max_entries)
            candidates, lips, pose = candidates[keep], lips[keep], pose[keep]
        track = compute_crop_track(landmarks, size)
        wanted = {int(f): j for j, f in enumerate(candidates)}
        crops = torch.empty(len(candidates), 3, size, size, dtype=torch.uint8)
        seen = 0
        for i, frame in enumerate(frames):
            seen = i + 1
            j = wanted.get(i)
            if j is not None:
                crop = crop_frames(np.array(frame)[None], track, [i])
                crops[j] = (crop[0] * 255).round().clamp(0, 255).to(torch.uint8)
            if i >= candidates[-1]:
                break
        if seen <= candidates[-1]:
            raise LmdiffInputError(f"{source}: the frames ended after {seen}, the landmarks have {len(landmarks)}")
        crop_landmarks = transform_landmarks(landmarks[candidates], track[candidates], indices=None)
        if len(candidates) == 1:
            warnings.warn(
                f"{source}: the appearance bank has one frame; every mouth is that frame's mouth bent to the target "
                "lips (no new teeth or mouth interior)",
                stacklevel=2,
            )
        return cls(crops, crop_landmarks.to_topology(KEY_TOPOLOGY), lips, pose, candidates)

    @classmethod
    def concatenate(cls, banks: list["AppearanceBank"]) -> "AppearanceBank":
        """One bank holding the entries of several (same crop size); `frames` keeps each bank's own indices."""
        if len(banks) == 1:
            return banks[0]
        if len({b.size for b in banks}) != 1:
            raise LmdiffInputError(f"banks of different crop sizes cannot be joined: {[b.size for b in banks]}")
        return cls(
            torch.cat([b.crops for b in banks]),
            LandmarkSequence.concatenate([b.landmarks for b in banks]),
            np.concatenate([b.lips for b in banks]),
            np.concatenate([b.pose for b in banks]),
            np.concatenate([b.frames for b in banks]),
        )

    # -- retrieval ---------------------------------------------------------------------------------------------------
    def nearest(self, lips: np.ndarray, pose: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """The k lowest-cost entries per query (indices [T, k], costs [T, k]), by brute force over the bank."""
        cost = match_cost(lips, pose, self.lips, self.pose)
        k = min(k, len(self))
        idx = np.argsort(cost, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(cost, idx, axis=1)

    def retrieve(
        self,
        lips: np.ndarray,
        pose: np.ndarray,
        k: int = 3,
        hysteresis: float = 1.0,
        smoothing: float = 0.5,
        temperature: float = 1.0,
        chunk: int = 1000,
    ) -> Retrieval:
        """Blend sources for T output frames with keys lips [T, P, 2] and pose [T, 3] (from `shape_keys`).

        Per frame the candidates are the 2k nearest entries plus the previous frame's sources, whose cost is lowered
        by `hysteresis`; the best k get weights exp(-(cost - best) / temperature); then weights follow an exponential
        moving average (`smoothing` = the share kept from the previous frame) and the k largest are kept."""
        if not (isinstance(k, (int, np.integer)) and k >= 1):
            raise LmdiffInputError(f"k (entries blended per frame) must be an integer >= 1, got {k!r}")
        if not (0.0 <= smoothing < 1.0):
            raise LmdiffInputError(f"smoothing must be in [0, 1), got {smoothing!r}")
        n = len(lips)
        k = min(int(k), len(self))
        indices = np.zeros((n, k), dtype=int)
        weights = np.zeros((n, k))
        best = np.zeros(n)
        previous: dict[int, float] = {}
        for start in range(0, n, chunk):
            cost = match_cost(lips[start : start + chunk], pose[start : start + chunk], self.lips, self.pose)
            m = min(2 * k, len(self))
            if m < len(self):
                near = np.argpartition(cost, m - 1, axis=1)[:, :m]
            else:
                near = np.tile(np.arange(m), (len(cost), 1))
            for row in range(len(cost)):
                t = start + row
                cand = set(near[row].tolist()) | set(previous)
                cand_idx = np.fromiter(cand, dtype=int)
                c = cost[row, cand_idx] - hysteresis * np.isin(cand_idx, list(previous))
                order = np.argsort(c, kind="stable")[:k]
                chosen, c = cand_idx[order], c[order]
                w = np.exp(-(c - c[0]) / temperature)
                w /= w.sum()
                mixed = {int(i): (1 - smoothing) * float(x) for i, x in zip(chosen, w)}
                for i, x in previous.items():
                    mixed[i] = mixed.get(i, 0.0) + smoothing * x
                top = sorted(mixed.items(), key=lambda item: -item[1])[:k]
                total = sum(x for _, x in top)
                previous = {i: x / total for i, x in top}
                for j, (i, x) in enumerate(previous.items()):
                    indices[t, j], weights[t, j] = i, x
                best[t] = cost[row].min()
        return Retrieval(indices, weights, best)

    # -- warping -----------------------------------------------------------------------------------------------------
    def warp(self, entries, target_crop: LandmarkSequence) -> torch.Tensor:
        """Entries (indices [M]) warped onto target crop-space landmarks (M frames, crop size S): float [M, 3, S, S]
        in 0..1. Pixels the warp takes from outside an entry's crop repeat its border."""
        entries = np.asarray(entries, dtype=int)
        target = target_crop.to_topology(KEY_TOPOLOGY)
        if target.frame_size != (self.size, self.size):
            raise LmdiffInputError(
                f"warp: target landmarks are for {target.frame_size} crops, the bank holds {self.size} px crops"
            )
        grid = spline_grid(target.points[..., :2], self.landmarks.points[entries, :, :2], self.size)
        src = self.crops[torch.as_tensor(entries)].float() / 255.0
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _similarity_2d(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Batched 2D similarities [M, 2, 3] with dst ~ A @ src + b, fitted on points [M, K, 2] (Umeyama)."""
    pad = lambda p: np.concatenate([p, np.zeros_like(p[..., :1])], axis=-1)  # noqa: E731
    s, r, t = umeyama(pad(src), pad(dst))
    return np.concatenate([s[:, None, None] * r[:, :2, :2], t[:, :2, None]], axis=2)


def _solve_spline(centres: torch.Tensor, values: torch.Tensor, smooth: float = SPLINE_SMOOTHING):
    """Thin-plate spline weights with kernel centres at `centres` [M, N, 2] interpolating `values` [M, N, 2], in
    kornia's layout (kernel [M, N, 2], affine [M, 3, 2], kernel U(d^2) = d^2 log(d^2) / 2, for `warp_points_tps`).
    The classic symmetric system (Bookstein 1989) with a small ridge `smooth` on the kernel: kornia's
    `get_tps_transform` puts the centres on the values instead, which folds when the two point sets differ much."""
    m, n, _ = centres.shape
    d2 = ((centres[:, :, None] - centres[:, None]) ** 2).sum(-1)
    k = 0.5 * d2 * torch.log(d2.clamp_min(1e-12))
    p = torch.cat([torch.ones(m, n, 1), centres], -1)
    top = torch.cat([k + smooth * torch.eye(n), p], -1)
    bottom = torch.cat([p.transpose(1, 2), torch.zeros(m, 3, 3)], -1)
    rhs = torch.cat([values, torch.zeros(m, 3, 2)], 1)
    weights = torch.linalg.solve(torch.cat([top, bottom], 1).double(), rhs.double()).float()
    return weights[:, :n], weights[:, n:]


def spline_grid(target: np.ndarray, source: np.ndarray, size: int, grid: int = GRID) -> torch.Tensor:
    """The sampling grid [M, S, S, 2] (grid_sample, align_corners=True) that moves iBUG-68 points `source` [M, 68, 2]
    of S px crops onto `target` [M, 68, 2]: a thin-plate spline from target to source pixels fitted on the lower
    face (WARP_POINTS, NOSE_POINTS: exact) and on the stable points and the crop border (sent where the similarity
    fitted on the stable points sends them); evaluated on a `grid` x `grid` lattice and upsampled."""
    from kornia.geometry.transform import warp_points_tps

    target = np.asarray(target, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    m = len(target)
    stable = list(get_topology(KEY_TOPOLOGY).stable)
    sim = _similarity_2d(target[:, stable], source[:, stable])  # target px -> source px
    edge = np.linspace(0.0, size - 1.0, BORDER_ANCHORS)
    lo, hi = np.zeros_like(edge), np.full_like(edge, size - 1.0)
    border = np.concatenate(
        [
            np.stack([edge, lo], 1),
            np.stack([edge, hi], 1),
            np.stack([lo[1:-1], edge[1:-1]], 1),
            np.stack([hi[1:-1], edge[1:-1]], 1),
        ]
    )
    rigid = np.concatenate([target[:, _rigid_points()], np.broadcast_to(border, (m, *border.shape))], axis=1)
    bent = list(WARP_POINTS + NOSE_POINTS)
    ctrl_t = np.concatenate([target[:, bent], rigid], axis=1)
    ctrl_s = np.concatenate(
        [source[:, bent], np.einsum("mij,mkj->mki", sim[:, :, :2], rigid) + sim[:, None, :, 2]], axis=1
    )
    to_norm = lambda p: torch.as_tensor(2.0 * p / (size - 1.0) - 1.0, dtype=torch.float32)  # noqa: E731
    ct, cs = to_norm(ctrl_t), to_norm(ctrl_s)
    kernel, affine = _solve_spline(ct, cs)
    lin = torch.linspace(-1.0, 1.0, grid)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    lattice = torch.stack([xx, yy], -1).reshape(1, -1, 2).expand(m, -1, -1)
    coarse = warp_points_tps(lattice, ct, kernel, affine).reshape(m, grid, grid, 2)
    if grid == size:
        return coarse
    fine = F.interpolate(coarse.permute(0, 3, 1, 2), size=(size, size), mode="bilinear", align_corners=True)
    return fine.permute(0, 2, 3, 1)
