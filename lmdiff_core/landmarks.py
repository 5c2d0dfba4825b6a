"""`LandmarkSequence`: the one landmark type every lmdiff stage reads and writes."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write
from .errors import LmdiffInputError
from .topology import get_topology

FORMAT_VERSION = 1
SPACES = ("image", "canonical")
FIT_MODES = ("loop", "pingpong", "hold")


def _as_bool(values, length: int, default: bool, name: str) -> np.ndarray:
    if values is None:
        return np.full(length, default, dtype=bool)
    values = np.asarray(values, dtype=bool).reshape(-1)
    if values.shape[0] != length:
        raise LmdiffInputError(
            f"LandmarkSequence.{name} has {values.shape[0]} entries, expected {length} (one per frame)"
        )
    return values


def fit_indices(length: int, n_frames: int, mode: str = "pingpong") -> np.ndarray:
    """Source frame of each of `n_frames` output frames for a sequence of `length` frames (see `fit_length`)."""
    if n_frames <= 0:
        raise LmdiffInputError(f"fit_length needs a positive frame count, got {n_frames}")
    if mode not in FIT_MODES:
        raise LmdiffInputError(f"fit_length mode {mode!r} is not one of {FIT_MODES}")
    t = np.arange(n_frames)
    if mode == "loop":
        return t % length
    if mode == "pingpong" and length > 1:
        phase = t % (2 * length - 2)
        return np.where(phase < length, phase, 2 * length - 2 - phase)
    return np.minimum(t, length - 1)


@dataclass
class LandmarkSequence:
    """Per-frame facial landmarks.

    points: [T, N, 3] float32. In `space="image"` x and y are pixels of a `frame_size` (width, height) frame and z is
        depth in the same pixel units (0 where the detector gives none). In `space="canonical"` the points live in the
        pose-free canonical frame (see `lmdiff_core.canonical`), itself a virtual frontal image of `frame_size`.
    topology: "mediapipe478" or "ibug68" (see `lmdiff_core.topology`).
    valid: [T] bool, False where no face was found and nothing could be filled in.
    interpolated: [T] bool, True where points were filled in across a short detection gap.
    blendshapes: optional [T, 52] MediaPipe blendshape scores.
    pose: optional [T, 4, 4] similarity transforms taking canonical points to image points (set by canonicalisation).
    image_size: (width, height) of the frames `pose` maps into (canonical sequences only).
    """

    points: np.ndarray
    topology: str
    fps: float = 25.0
    frame_size: tuple[int, int] = (512, 512)
    valid: np.ndarray | None = None
    interpolated: np.ndarray | None = None
    blendshapes: np.ndarray | None = None
    pose: np.ndarray | None = None
    space: str = "image"
    image_size: tuple[int, int] | None = None

    def __post_init__(self):
        points = np.asarray(self.points, dtype=np.float32)
        if points.ndim == 2:
            points = points[None]
        if points.ndim != 3 or points.shape[2] not in (2, 3):
            raise LmdiffInputError(f"LandmarkSequence.points has shape {points.shape}, expected [T, N, 3]")
        if points.shape[2] == 2:
            points = np.concatenate([points, np.zeros_like(points[..., :1])], axis=2)
        topo = get_topology(self.topology)
        if points.shape[1] != topo.n_points:
            raise LmdiffInputError(
                f"LandmarkSequence.points has {points.shape[1]} points per frame, topology {self.topology!r} has {topo.n_points}"
            )
        if self.space not in SPACES:
            raise LmdiffInputError(f"LandmarkSequence.space is {self.space!r}, expected one of {SPACES}")
        if not (self.fps > 0):
            raise LmdiffInputError(f"LandmarkSequence.fps is {self.fps}, expected a positive number")
        t = points.shape[0]
        self.points = points
        self.fps = float(self.fps)
        self.frame_size = (int(self.frame_size[0]), int(self.frame_size[1]))
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
        self.valid = _as_bool(self.valid, t, True, "valid")
        self.interpolated = _as_bool(self.interpolated, t, False, "interpolated")
        if self.blendshapes is not None:
            self.blendshapes = np.asarray(self.blendshapes, dtype=np.float32)
            if self.blendshapes.shape[0] != t:
                raise LmdiffInputError(
                    f"LandmarkSequence.blendshapes has {self.blendshapes.shape[0]} frames, expected {t}"
                )
        if self.pose is not None:
            self.pose = np.asarray(self.pose, dtype=np.float64)
            if self.pose.shape != (t, 4, 4):
                raise LmdiffInputError(f"LandmarkSequence.pose has shape {self.pose.shape}, expected ({t}, 4, 4)")

    # -- basic properties -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.points.shape[0]

    @property
    def n_points(self) -> int:
        return self.points.shape[1]

    @property
    def duration(self) -> float:
        return len(self) / self.fps

    def __repr__(self) -> str:
        return (
            f"LandmarkSequence({len(self)} frames x {self.n_points} pts, {self.topology}, {self.space}, "
            f"{self.fps:g} fps, frame {self.frame_size[0]}x{self.frame_size[1]}, {int(self.valid.sum())} valid)"
        )

    def replace(self, **changes) -> "LandmarkSequence":
        """A copy with some fields changed (dataclasses.replace)."""
        return replace(self, **changes)

    # -- indexing, joining, resampling ------------------------------------------------------------------------------
    def __getitem__(self, index) -> "LandmarkSequence":
        if isinstance(index, (int, np.integer)):
            if not -len(self) <= index < len(self):
                raise IndexError(f"frame {index} is out of range for a sequence of {len(self)} frames")
            index = slice(index % len(self), index % len(self) + 1)
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(
            self,
            points=self.points[index],
            valid=self.valid[index],
            interpolated=self.interpolated[index],
            blendshapes=pick(self.blendshapes),
            pose=pick(self.pose),
        )

    @classmethod
    def concatenate(cls, sequences: Sequence["LandmarkSequence"]) -> "LandmarkSequence":
        """Join sequences in time; they must share topology, space, fps and frame size."""
        if not sequences:
            raise LmdiffInputError("LandmarkSequence.concatenate needs at least one sequence")
        first = sequences[0]
        for s in sequences[1:]:
            for name in ("topology", "space", "fps", "frame_size"):
                if getattr(s, name) != getattr(first, name):
                    raise LmdiffInputError(
                        f"cannot concatenate landmark sequences with different {name}: {getattr(first, name)} vs {getattr(s, name)}"
                    )

        def cat(name):
            parts = [getattr(s, name) for s in sequences]
            if any(p is None for p in parts):
                return None
            return np.concatenate(parts)

        return replace(
            first,
            points=cat("points"),
            valid=cat("valid"),
            interpolated=cat("interpolated"),
            blendshapes=cat("blendshapes"),
            pose=cat("pose"),
        )

    def resample(self, fps: float, n_frames: int | None = None) -> "LandmarkSequence":
        """The sequence at another frame rate, by linear interpolation in time (rotations by slerp).

        Output frame k is at time k / fps; `n_frames` defaults to ceil(duration * fps).
        """
        from scipy.spatial.transform import Rotation, Slerp

        from .media import frame_count

        if not (fps > 0):
            raise LmdiffInputError(f"resample: fps must be positive, got {fps}")
        n_out = frame_count(self.duration, fps) if n_frames is None else int(n_frames)
        src_t = np.arange(len(self)) / self.fps
        dst_t = np.clip(np.arange(n_out) / fps, 0.0, src_t[-1])
        hi = np.clip(np.searchsorted(src_t, dst_t, side="right"), 1, max(len(self) - 1, 1))
        lo = hi - 1
        if len(self) == 1:
            lo = hi = np.zeros(n_out, dtype=int)
            w = np.zeros(n_out)
        else:
            w = (dst_t - src_t[lo]) / (src_t[hi] - src_t[lo])
        lerp = lambda a: a[lo] * (1 - w.reshape(-1, *[1] * (a.ndim - 1))) + a[hi] * w.reshape(-1, *[1] * (a.ndim - 1))  # noqa: E731
        pose = None
        if self.pose is not None:
            scale = np.cbrt(np.linalg.det(self.pose[:, :3, :3]))
            rot = self.pose[:, :3, :3] / scale[:, None, None]
            if len(self) == 1:
                rot_out = np.repeat(rot, n_out, axis=0)
            else:
                rot_out = Slerp(src_t, Rotation.from_matrix(rot))(dst_t).as_matrix()
            pose = np.zeros((n_out, 4, 4))
            pose[:, :3, :3] = rot_out * lerp(scale)[:, None, None]
            pose[:, :3, 3] = lerp(self.pose[:, :3, 3])
            pose[:, 3, 3] = 1.0
        nearest = np.where(w < 0.5, lo, hi)
        # An output frame that falls on a source frame takes its validity; one between two needs both.
        valid = np.where(
            w < 1e-6, self.valid[lo], np.where(w > 1 - 1e-6, self.valid[hi], self.valid[lo] & self.valid[hi])
        )
        return replace(
            self,
            points=lerp(self.points.astype(np.float64)).astype(np.float32),
            fps=float(fps),
            valid=valid,
            interpolated=self.interpolated[nearest],
            blendshapes=None if self.blendshapes is None else lerp(self.blendshapes).astype(np.float32),
            pose=pose,
        )

    def fit_length(self, n_frames: int, mode: str = "pingpong") -> "LandmarkSequence":
        """Exactly `n_frames` frames: trimmed, or extended by "loop", "pingpong" (back and forth) or "hold" (last frame)."""
        return self[fit_indices(len(self), n_frames, mode)]

    # -- topology -----------------------------------------------------------------------------------------------------
    def to_topology(self, name: str) -> "LandmarkSequence":
        """The same faces in another topology (mediapipe478 -> ibug68 via the documented index map)."""
        if name == self.topology:
            return self
        from .topology import convert_points

        return replace(self, points=convert_points(self.points, self.topology, name), topology=name)

    def inter_ocular(self) -> np.ndarray:
        """Per-frame outer-eye-corner distance in the image plane (the 300-W normaliser), in the sequence's units."""
        return get_topology(self.topology).inter_ocular(self.points)

    def mouth_opening(self) -> np.ndarray:
        """Per-frame inner-lip gap in inter-ocular distances (0 = closed)."""
        upper, lower = get_topology(self.topology).inner_lips
        gap = np.linalg.norm(self.points[:, upper, :2] - self.points[:, lower, :2], axis=-1)
        return gap / np.maximum(self.inter_ocular(), 1e-6)

    # -- files --------------------------------------------------------------------------------------------------------
    def save(self, path) -> Path:
        """Write a `.npz` atomically (a failed write never replaces an existing file)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise LmdiffInputError(f"landmark file {path} must end in .npz")
        arrays = dict(
            format_version=np.int64(FORMAT_VERSION),
            points=self.points,
            topology=np.str_(self.topology),
            fps=np.float64(self.fps),
            frame_size=np.asarray(self.frame_size, dtype=np.int64),
            valid=self.valid,
            interpolated=self.interpolated,
            space=np.str_(self.space),
        )
        if self.blendshapes is not None:
            arrays["blendshapes"] = self.blendshapes
        if self.pose is not None:
            arrays["pose"] = self.pose
        if self.image_size is not None:
            arrays["image_size"] = np.asarray(self.image_size, dtype=np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path) -> "LandmarkSequence":
        """Read a `.npz` written by `save`; anything else gives a clear LmdiffInputError."""
        path = Path(path)
        if not path.exists():
            raise LmdiffInputError(f"landmark file {path} does not exist")
        if path.is_dir():
            raise LmdiffInputError(f"landmark file {path} is a directory, expected a .npz file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise LmdiffInputError(f"{path} is not a readable .npz landmark file ({exc.__class__.__name__})") from None
        missing = {"points", "topology", "fps", "frame_size"} - arrays.keys()
        if missing:
            raise LmdiffInputError(f"{path} is not an lmdiff landmark file: missing {sorted(missing)}")
        try:
            return cls(
                points=arrays["points"],
                topology=str(arrays["topology"]),
                fps=float(arrays["fps"]),
                frame_size=tuple(int(v) for v in arrays["frame_size"]),
                valid=arrays.get("valid"),
                interpolated=arrays.get("interpolated"),
                blendshapes=arrays.get("blendshapes"),
                pose=arrays.get("pose"),
                space=str(arrays.get("space", "image")),
                image_size=None if "image_size" not in arrays else tuple(int(v) for v in arrays["image_size"]),
            )
        except LmdiffInputError as exc:
            raise LmdiffInputError(f"{path} is not a valid landmark file: {exc}") from None
