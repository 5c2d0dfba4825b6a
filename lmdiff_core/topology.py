"""Landmark topologies: point counts, face-part polylines, stable points and the mediapipe478 -> ibug68 map.

Index conventions: "right"/"left" are the subject's (MediaPipe's and iBUG's convention), so the right eye is on the
image's left in a frontal photo. The mediapipe478 part polylines follow the MediaPipe face-mesh connection sets
(`mediapipe.tasks.python.vision.FaceLandmarksConnections`); a test checks them against that module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .assets import asset
from .errors import LmdiffInputError


@dataclass(frozen=True)
class Polyline:
    indices: tuple[int, ...]
    closed: bool = False


@dataclass(frozen=True)
class Topology:
    name: str
    n_points: int
    parts: dict[str, tuple[Polyline, ...]]
    stable: tuple[int, ...]  # rigid upper-face points used to estimate head pose (no mouth, jaw or eyelids)
    outer_eye_corners: tuple[int, int]  # (right, left); their distance is the inter-ocular distance (300-W convention)
    eye_corners: tuple[tuple[int, int], tuple[int, int]]  # ((right outer, right inner), (left inner, left outer))
    inner_lips: tuple[int, int]  # (upper, lower) mid points of the inner lip contour
    mouth_corners: tuple[int, int]
    pupils: tuple[int, int] | None = None  # (right, left) iris centres when the topology has them

    def part_indices(self, part: str) -> np.ndarray:
        return np.unique(np.concatenate([np.asarray(p.indices) for p in self.parts[part]]))

    def eye_centers(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(right, left) eye centres of points [..., N, 3]: the midpoints of each eye's two corners.

        Corners, not irises: MediaPipe's iris points can land far outside the eye on small faces.
        """
        (r0, r1), (l0, l1) = self.eye_corners
        return (points[..., r0, :] + points[..., r1, :]) / 2, (points[..., l0, :] + points[..., l1, :]) / 2

    def inter_ocular(self, points: np.ndarray) -> np.ndarray:
        """Distance between the outer eye corners in the image plane, per frame of points [..., N, 3]."""
        a, b = self.outer_eye_corners
        return np.linalg.norm(points[..., a, :2] - points[..., b, :2], axis=-1)

    def pupil_points(self, points: np.ndarray) -> np.ndarray:
        """[..., 2, 3] right and left pupils: the iris centre where it lies inside the eye, else the eye centre."""
        centres = np.stack(self.eye_centers(points), axis=-2)
        if self.pupils is None:
            return centres
        irises = points[..., list(self.pupils), :]
        corners = np.asarray(self.eye_corners)
        half_width = np.linalg.norm(points[..., corners[:, 0], :2] - points[..., corners[:, 1], :2], axis=-1) / 2
        inside = np.linalg.norm(irises[..., :2] - centres[..., :2], axis=-1) <= half_width
        return np.where(inside[..., None], irises, centres)


def _chain(*indices: int, closed: bool = False) -> Polyline:
    return Polyline(tuple(indices), closed)


MEDIAPIPE478 = Topology(
    name="mediapipe478",
    n_points=478,
    parts={
        "contour": (
            _chain(
                10,
                338,
                297,
                332,
                284,
                251,
                389,
                356,
                454,
                323,
                361,
                288,
                397,
                365,
                379,
                378,
                400,
                377,
                152,
                148,
                176,
                149,
                150,
                136,
                172,
                58,
                132,
                93,
                234,
                127,
                162,
                21,
                54,
                103,
                67,
                109,
                closed=True,
            ),
        ),
        "right_brow": (_chain(46, 53, 52, 65, 55), _chain(70, 63, 105, 66, 107)),
        "left_brow": (_chain(276, 283, 282, 295, 285), _chain(300, 293, 334, 296, 336)),
        "right_eye": (
            _chain(33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246, closed=True),
        ),
        "left_eye": (
            _chain(263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466, closed=True),
        ),
        "nose": (
            _chain(168, 6, 197, 195, 5, 4, 1, 19, 94, 2),
            _chain(98, 97, 2, 326, 327, 294, 278, 344, 440, 275, 4, 45, 220, 115, 48, 64, 98),
        ),
        "outer_lips": (
            _chain(
                61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37, 39, 40, 185, closed=True
            ),
        ),
        "inner_lips": (
            _chain(
                78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191, closed=True
            ),
        ),
        "right_iris": (_chain(469, 470, 471, 472, closed=True),),
        "left_iris": (_chain(474, 475, 476, 477, closed=True),),
    },
    stable=(33, 133, 362, 263, 168, 6, 197, 195, 5, 4, 1, 10, 151, 9, 8, 234, 454, 127, 356, 162, 389),
    outer_eye_corners=(33, 263),
    eye_corners=((33, 133), (362, 263)),
    inner_lips=(13, 14),
    mouth_corners=(61, 291),
    pupils=(468, 473),
)

IBUG68 = Topology(
    name="ibug68",
    n_points=68,
    parts={
        "contour": (_chain(*range(0, 17)),),
        "right_brow": (_chain(*range(17, 22)),),
        "left_brow": (_chain(*range(22, 27)),),
        "nose": (_chain(27, 28, 29, 30, 33), _chain(31, 32, 33, 34, 35)),
        "right_eye": (_chain(*range(36, 42), closed=True),),
        "left_eye": (_chain(*range(42, 48), closed=True),),
        "outer_lips": (_chain(*range(48, 60), closed=True),),
        "inner_lips": (_chain(*range(60, 68), closed=True),),
    },
    stable=(27, 28, 29, 30, 31, 33, 35, 36, 39, 42, 45, 0, 16, 1, 15),
    outer_eye_corners=(36, 45),
    eye_corners=((36, 39), (42, 45)),
    inner_lips=(62, 66),
    mouth_corners=(48, 54),
)

TOPOLOGIES = {t.name: t for t in (MEDIAPIPE478, IBUG68)}


def get_topology(name: str) -> Topology:
    try:
        return TOPOLOGIES[name]
    except KeyError:
        raise LmdiffInputError(f"unknown landmark topology {name!r}, expected one of {sorted(TOPOLOGIES)}") from None


@lru_cache(maxsize=None)
def ibug68_from_mediapipe478() -> np.ndarray:
    """The mediapipe478 -> ibug68 map, rows (a, b, w): iBUG point j = w * p[a] + (1 - w) * p[b].

    Derived by `scripts/build_face_assets.py`: for every iBUG point, the MediaPipe vertex or two-vertex blend that
    best matches dlib's 68-point fit on 350 real frontal photos (held-out mean error 0.019 inter-ocular distances).
    The table, with its provenance and errors, is `lmdiff_core/assets/ibug68_from_mediapipe478.json`.
    """
    with asset("ibug68_from_mediapipe478.json").open() as f:
        table = np.asarray(json.load(f)["map"], dtype=np.float64)
    table.setflags(write=False)
    return table


def convert_points(points: np.ndarray, source: str, target: str) -> np.ndarray:
    """Convert [..., N, 3] points between topologies (only mediapipe478 -> ibug68 is defined)."""
    if source == target:
        return points
    if (source, target) != ("mediapipe478", "ibug68"):
        raise LmdiffInputError(
            f"cannot convert landmarks from {source} to {target}: only mediapipe478 -> ibug68 exists"
        )
    table = ibug68_from_mediapipe478()
    a, b, w = table[:, 0].astype(int), table[:, 1].astype(int), table[:, 2]
    w = w[:, None].astype(points.dtype)
    return points[..., a, :] * w + points[..., b, :] * (1 - w)
