"""Temporal smoothing of landmark sequences: a zero-phase One Euro filter (Casiez et al., CHI 2012).

The One Euro filter is a low-pass whose cutoff rises with speed: still points are smoothed hard (detector jitter goes)
while fast motion passes with little lag. Run forwards then backwards it has no lag at all, which keeps lip motion in
sync with the audio. Fast-moving parts (lips, eyelids, irises) get their own, faster setting so that speech and blinks
keep their shape.
"""

from __future__ import annotations

import numpy as np

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
