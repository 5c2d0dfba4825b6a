"""Face-region masks: convex hulls, rasterising, feathering, the face / lower-face / mouth masks (`masks_from_points`), the
dubbing (pose) mask of the L2V pose reference (`pose_mask`) and the mouth weight mask (`mouth_weight_mask`). `crop.face_masks`
draws the face / lower-face / mouth masks of frame landmarks in a crop track's crops.

Masks are float32 tensors [B, 1, H, W] (0 or 1 unless feathered); crop-space landmarks come from
`conditioning.crop_landmarks` and may be at any crop resolution (points are scaled to the size asked for).

The pose mask (`pose_mask`): it must hide the lower face of the target AND every place the lower face could occupy
with another mouth shape, and its outline must not give the mouth shape away (else the model reads the jaw opening
from the mask and, at inference, follows the original video's mouth instead of the predicted landmarks). It is the
union, below a line `POSE_LINE` face units under the eyes (so the eyes and brows stay visible), of

- a "template" region built only from mouth-independent landmarks (eye corners, nose base, the widest extent of the
  face contour, which lies at cheek/temple level): a U hanging from that line, as wide as the face plus
  `POSE_MARGIN` on both sides, with straight sides down to `POSE_SIDE` face units under the eyes (below the jaw
  angles) and a half-elliptic bottom reaching `POSE_REACH` units (the chin of a closed mouth is ~1.85 units under
  the eyes, a wide open jaw adds up to ~0.5; the bottom edge of a default crop is at ~2.1-2.3, so in default crops
  the template runs off the bottom edge: no chin outline at all);
- the target's own lower face, the convex hull of the face contour and the lips swept downward by `POSE_JAW_DROP`
  units (room for an opening jaw) and dilated by `POSE_MARGIN` units: this guarantees the cover when the template
  falls short (extreme pitch, a long face); in ordinary frames it lies inside the template and changes nothing.

A face unit is max(distance between the eye centres, eye-midpoint-to-nose-base distance / 0.7): both are independent
of the mouth, and the max keeps the unit for a turned (yaw) or tilted (pitch) head. The mask is hard inside and
feathered outward only, so no pixel inside the hard region shows any of the target.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import Topology, get_topology

MASK_NAMES = ("face", "lower_face", "mouth")
# pose mask geometry, in face units (see the module docstring)
POSE_LINE = 0.25  # top of the mask under the eye midpoint: below the lower eyelids (~0.05), above the nose base (~0.7)
POSE_MARGIN = 0.12  # outward dilation of the face's width and of the target's lower face
POSE_JAW_DROP = 0.3  # downward sweep of the target's lower face (an opening jaw)
POSE_SIDE = 1.6  # the template's sides run straight down to here (under the jaw angles), then round off
POSE_REACH = 2.6  # bottom of the template under the eye midpoint (closed chin ~1.85 + open jaw ~0.5 + margin)
NOSE_TO_EYE_DISTANCE = 0.7  # eye-midpoint-to-nose-base distance / eye-centre distance of the mean frontal face
NOSE_BASE = {"mediapipe478": 2, "ibug68": 33}  # the point under the nose tip (subnasale)
MOUTH_MARGIN = 0.15  # mouth_weight_mask: outer-lip hull dilated by this x mouth width (`masks_from_points`'s "mouth")
_ELLIPSE_POINTS = 64


# -- hulls and rasterising ---------------------------------------------------------------------------------------
HULL_DIRECTIONS = 96
# Kept over scipy.spatial.ConvexHull + skimage.draw.polygon2mask: those go one polygon at a time, and polygon2mask puts
# pixel (r, c) at (r, c) rather than at its centre, moving ~3% of a mouth mask's pixels (the masks' numbers would change).


def hull_polygons(points: np.ndarray, radius: np.ndarray | float = 0.0, n_dirs: int = HULL_DIRECTIONS) -> np.ndarray:
    """Convex hulls of point sets [B, N, 2], dilated by `radius` ([B] or a number), as polygons [B, n_dirs, 2].

    Vertex k is the support point of the (dilated) hull in direction angle 2 pi k / n_dirs: the farthest input point
    along that direction plus `radius` times the direction, so every vertex lies on the hull's boundary and the
    polygon is inscribed in it, vectorised over the batch. Hull vertices whose exterior angle is below 2 pi / n_dirs
    may be cut (by a sliver: under 0.3% of the hull's size with 96 directions); repeated support points give
    zero-length edges, which rasterise to nothing.
    """
    pts = np.asarray(points, dtype=np.float64)
    a = np.arange(n_dirs) * (2 * np.pi / n_dirs)
    dirs = np.stack([np.cos(a), np.sin(a)], axis=1)  # [D, 2]
    best = np.argmax(np.einsum("bnk,dk->bdn", pts, dirs), axis=2)  # [B, D]
    support = np.take_along_axis(pts, best[:, :, None], axis=1)  # [B, D, 2]
    r = np.broadcast_to(np.asarray(radius, dtype=np.float64), (pts.shape[0],))
    return support + r[:, None, None] * dirs[None]


def _drop_repeats(polygons: np.ndarray) -> np.ndarray:
    """Remove consecutive repeated vertices (zero-length edges) of [B, K, 2] polygons, padding each to the batch's
    longest by repeating its last vertex."""
    same = np.all(polygons == np.roll(polygons, 1, axis=1), axis=2)
    same[:, 0] = False
    keep = ~same
    counts = keep.sum(axis=1)
    k = int(counts.max())
    pos = np.cumsum(keep, axis=1) - 1  # target slot of every kept vertex
    out = np.empty((polygons.shape[0], k, 2))
    rows = np.nonzero(keep)
    out[rows[0], pos[keep]] = polygons[keep]
    slot = np.arange(k)[None, :]
    last = out[np.arange(len(out)), counts - 1]
    return np.where((slot < counts[:, None])[..., None], out, last[:, None, :])


def rasterize_polygons(polygons, width: int, height: int) -> torch.Tensor:
    """Fill polygons [B, K, 2] (pixel coordinates, any orientation, may self-intersect: non-zero winding rule) into
    bool masks [B, height, width]. A pixel is inside when its centre is. Scanline method: per row, the signed edge
    crossings are scattered at their column and a cumulative sum gives every pixel's winding number, so the cost is
    O(B * K * rows spanned + B * H * W)."""
    poly = np.asarray(polygons, dtype=np.float64)
    b = poly.shape[0]
    out = torch.zeros(b, height, width, dtype=torch.bool)
    if b == 0 or poly.shape[1] < 3:
        return out
    poly = _drop_repeats(poly)
    ys = poly[..., 1]
    r0 = int(np.clip(np.floor(np.nanmin(ys) - 0.5), 0, height))
    r1 = int(np.clip(np.ceil(np.nanmax(ys) + 0.5), 0, height))
    if r1 <= r0:
        return out
    p0 = torch.as_tensor(poly)
    p1 = torch.roll(p0, -1, dims=1)
    yc = torch.arange(r0, r1, dtype=torch.float64) + 0.5
    x0, y0, x1, y1 = (v[..., None] for v in (p0[..., 0], p0[..., 1], p1[..., 0], p1[..., 1]))  # [B, K, 1]
    up = (y0 <= yc) & (y1 > yc)
    down = (y1 <= yc) & (y0 > yc)
    slope = (x1 - x0) / torch.where(y1 == y0, torch.ones_like(y1), y1 - y0)
    col = (x0 + 0.5 + (yc - y0) * slope).floor_().clamp_(0, width).long()  # first pixel right of the crossing
    sign = up.to(torch.int16) - down.to(torch.int16)
    acc = torch.zeros(b, r1 - r0, width + 1, dtype=torch.int16)
    acc.scatter_add_(2, col.transpose(1, 2), sign.transpose(1, 2))
    out[:, r0:r1] = acc.cumsum_(dim=2)[:, :, :width] != 0
    return out


def masks_from_points(
    points: np.ndarray,
    valid: np.ndarray,
    topology: str,
    width: int,
    height: int,
    parts: Sequence[str] = MASK_NAMES,
    mouth_margin: float = 0.15,
    lower_face_line: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Masks [B, 1, height, width] float32 (0 or 1) from [B, N, 2|3] pixel landmarks; see `crop.face_masks`."""
    for p in parts:
        if p not in MASK_NAMES:
            raise LmdiffInputError(f"unknown mask {p!r}, expected one of {MASK_NAMES}")
    topo = get_topology(topology)
    xy = np.asarray(points, dtype=np.float64)[..., :2]
    valid = np.asarray(valid, dtype=bool) & np.isfinite(xy).all(axis=(1, 2))
    xy = np.where(valid[:, None, None], xy, 0.0)
    b = xy.shape[0]
    lips = xy[:, topo.part_indices("outer_lips")]
    right, left = topo.eye_centers(xy)
    a, c = topo.mouth_corners
    eye_mid = (right + left) / 2
    to_mouth = (xy[:, a] + xy[:, c]) / 2 - eye_mid
    mouth_width = np.linalg.norm(xy[:, a] - xy[:, c], axis=1)

    polygons = [hull_polygons(lips, mouth_margin * mouth_width)]  # mouth: dilated outer-lip hull
    need_face = "face" in parts or "lower_face" in parts
    if need_face:
        face_pts = [xy[:, topo.part_indices("contour")], lips]
        if topo.name != "mediapipe478":  # a jaw-line contour: add a forehead by raising the brows
            brows = xy[:, np.concatenate([topo.part_indices("right_brow"), topo.part_indices("left_brow")])]
            face_pts.append(brows - 0.6 * to_mouth[:, None])
        polygons.append(hull_polygons(np.concatenate(face_pts, axis=1)))
    filled = rasterize_polygons(np.concatenate(polygons), width, height)
    mouth = filled[:b]
    out: dict[str, torch.Tensor] = {"mouth": mouth}
    if need_face:
        face = filled[b:] | mouth
        out["face"] = face
        if "lower_face" in parts:
            eye_vec = left - right
            normal = np.stack([-eye_vec[:, 1], eye_vec[:, 0]], axis=1)
            normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-9)
            along = np.einsum("bi,bi->b", to_mouth, normal)
            normal *= np.where(along < 0, -1.0, 1.0)[:, None]  # point from the eyes towards the mouth
            offset = lower_face_line * np.abs(along) + np.einsum("bi,bi->b", eye_mid, normal)
            n = torch.as_tensor(normal, dtype=torch.float32)
            xs = torch.arange(width, dtype=torch.float32) + 0.5
            ys = torch.arange(height, dtype=torch.float32) + 0.5
            below = (
                n[:, 1, None, None] * ys[None, :, None] + n[:, 0, None, None] * xs[None, None, :]
                >= torch.as_tensor(offset, dtype=torch.float32)[:, None, None]
            )
            out["lower_face"] = (face & below) | mouth
    keep = torch.as_tensor(valid).view(-1, 1, 1, 1)
    return {name: (out[name][:, None] & keep).float() for name in parts}


def feather_mask(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of [B, 1, S, S] masks with zero outside the crop; large sigmas run at reduced resolution."""
    if sigma < 0.3:
        return mask
    from kornia.filters import gaussian_blur2d

    factor = 1
    while sigma / (factor * 2) >= 2.0 and mask.shape[-1] // (factor * 2) >= 16:
        factor *= 2
    small = F.avg_pool2d(mask, factor) if factor > 1 else mask
    s = sigma / factor
    if factor > 1:  # the box filter already blurred by ~factor/sqrt(12) full-res px
        s = math.sqrt(max(s * s - 1.0 / 12.0, 0.09))
    ks = 2 * int(math.ceil(3 * s)) + 1
    small = gaussian_blur2d(small, (ks, ks), (s, s), border_type="constant")
    if factor > 1:
        small = F.interpolate(small, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return small.clamp_(0.0, 1.0)


# -- crop-space landmarks -----------------------------------------------------------------------------------------
def check_crop_landmarks(seq_crop, name: str = "seq_crop") -> LandmarkSequence:
    if not isinstance(seq_crop, LandmarkSequence):
        raise LmdiffInputError(
            f"{name} must be a LandmarkSequence (from crop_landmarks), got {type(seq_crop).__name__}"
        )
    if seq_crop.space != "image":
        raise LmdiffInputError(f"{name} must hold crop-space landmarks (from crop_landmarks), got space='canonical'")
    return seq_crop


def check_crop_size(size, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise LmdiffInputError(f"{name} must be an integer of at least 8 pixels, got {size!r}")
    return int(size)


def crop_points(seq_crop: LandmarkSequence, size: int) -> np.ndarray:
    """[T, N, 2] float64 crop-space points scaled from seq_crop.frame_size to a size x size crop."""
    w, h = seq_crop.frame_size
    scale = np.array([size / w, size / h])
    return seq_crop.points[..., :2].astype(np.float64) * scale


def crop_valid(seq_crop: LandmarkSequence, xy: np.ndarray) -> np.ndarray:
    """[T] frames whose landmarks are valid and finite."""
    return np.asarray(seq_crop.valid, dtype=bool) & np.isfinite(xy).all(axis=(1, 2))


# -- the dubbing mask and the mouth weight mask -------------------------------------------------------------------
def _face_frame(xy: np.ndarray, topo: Topology):
    """Per frame: eye midpoint [T, 2], unit eye-line direction u [T, 2], unit normal n towards the nose [T, 2] and
    the face unit [T] (see the module docstring), all from mouth-independent landmarks."""
    right, left = topo.eye_centers(xy)
    mid = (right + left) / 2
    eye_vec = left - right
    eye_dist = np.linalg.norm(eye_vec, axis=1)
    u = eye_vec / np.maximum(eye_dist, 1e-9)[:, None]
    n = np.stack([-u[:, 1], u[:, 0]], axis=1)
    to_nose = xy[:, NOSE_BASE[topo.name]] - mid
    along = np.einsum("ti,ti->t", to_nose, n)
    n *= np.where(along < 0, -1.0, 1.0)[:, None]  # from the eyes towards the nose (a mirrored frame flips u)
    unit = np.maximum(eye_dist, np.abs(along) / NOSE_TO_EYE_DISTANCE)
    return mid, u, n, np.maximum(unit, 1e-6)


def pose_mask(
    seq_crop: LandmarkSequence,
    size: int,
    *,
    margin: float = POSE_MARGIN,
    jaw_drop: float = POSE_JAW_DROP,
    reach: float = POSE_REACH,
    line: float = POSE_LINE,
) -> torch.Tensor:
    """The hard dubbing mask [T, 1, S, S] float32 (1 = to be generated) of crop-space landmarks, S = `size`.

    The union, below a line `line` face units under the eye midpoint (parallel to the eye line), of the mouth-
    independent template (a U as wide as the face contour's widest extent + `margin`, reaching `reach` units under
    the eyes) and of the target's contour-and-lips hull swept down by `jaw_drop` and dilated by `margin`; see
    the module docstring for the reasons. Frames whose landmarks are not valid get an empty mask.
    """
    seq_crop = check_crop_landmarks(seq_crop)
    size = check_crop_size(size)
    for name, value in (("margin", margin), ("jaw_drop", jaw_drop), ("reach", reach), ("line", line)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise LmdiffInputError(f"pose mask {name} must be a finite number >= 0 (face units), got {value!r}")
    topo = get_topology(seq_crop.topology)
    xy = crop_points(seq_crop, size)
    valid = crop_valid(seq_crop, xy)
    xy = np.where(valid[:, None, None], xy, 0.0)
    if len(xy) == 0:
        return torch.zeros(0, 1, size, size)
    mid, u, n, unit = _face_frame(xy, topo)
    top = line * unit  # [T] px under the eye midpoint

    # template: a U from the face's widest extent (mouth-independent), hanging from the line
    contour = xy[:, topo.part_indices("contour")] - mid[:, None]
    cu = np.einsum("tki,ti->tk", contour, u)
    u0, u1 = cu.min(axis=1), cu.max(axis=1)
    a = (u1 - u0) / 2 + margin * unit
    uc = (u1 + u0) / 2
    side = np.maximum(np.minimum(POSE_SIDE * unit, reach * unit), top)  # straight sides down to here
    b = np.maximum(reach * unit - side, 1e-3)
    theta = np.linspace(0.0, np.pi, _ELLIPSE_POINTS)
    eu = uc[:, None] + a[:, None] * np.cos(theta)[None]  # right -> bottom -> left, then up to the line and across
    en = side[:, None] + b[:, None] * np.sin(theta)[None]
    eu = np.concatenate([eu, (uc - a)[:, None], (uc + a)[:, None]], axis=1)
    en = np.concatenate([en, top[:, None], top[:, None]], axis=1)
    template = mid[:, None] + eu[..., None] * u[:, None] + en[..., None] * n[:, None]  # [T, K, 2]

    # the target's own lower face: contour and lips, swept down by the jaw drop, dilated
    own = xy[:, np.concatenate([topo.part_indices("contour"), topo.part_indices("outer_lips")])]
    swept = np.concatenate([own, own + (jaw_drop * unit)[:, None, None] * n[:, None]], axis=1)
    hull = hull_polygons(swept, margin * unit)

    region = rasterize_polygons(template, size, size) | rasterize_polygons(hull, size, size)
    c = torch.arange(size, dtype=torch.float64) + 0.5
    nn_ = torch.as_tensor(n)
    depth = nn_[:, 0, None, None] * c[None, None, :] + nn_[:, 1, None, None] * c[None, :, None]  # n . pixel centre
    below = depth >= torch.as_tensor(np.einsum("ti,ti->t", mid, n) + top)[:, None, None]
    mask = region & below & torch.as_tensor(valid)[:, None, None]
    return mask[:, None].float()


def mouth_weight_mask(seq_crop: LandmarkSequence, size: int, *, margin: float = MOUTH_MARGIN) -> torch.Tensor:
    """The mouth region [T, 1, S, S] float32 (0 or 1): the outer-lip hull dilated by `margin` x mouth width, as
    `masks_from_points`'s "mouth" (for a mouth-weighted loss and mouth-region metrics). Invalid frames are empty."""
    seq_crop = check_crop_landmarks(seq_crop)
    size = check_crop_size(size)
    xy = crop_points(seq_crop, size)
    valid = crop_valid(seq_crop, xy)
    xy = np.where(valid[:, None, None], xy, 0.0)
    if len(xy) == 0:
        return torch.zeros(0, 1, size, size)
    return masks_from_points(xy, valid, seq_crop.topology, size, size, parts=("mouth",), mouth_margin=margin)["mouth"]
