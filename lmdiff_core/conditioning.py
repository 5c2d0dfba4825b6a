"""Conditioning inputs of the landmarks-to-video (L2V) stage, shared by training and inference.

The L2V model is a latent diffusion U-Net that generates an aligned face crop (`crop` module) from:

1. a condition: the crop-space landmarks drawn as an image (`render_condition`, the part colours of `render`);
2. a pose reference: the target crop with the lower face replaced by grey, plus that mask (`pose_reference`): the
   model keeps the head, eyes, background and lighting of the reference and generates the masked part (dubbing);
3. an identity reference: another crop of the same person (`L2VFrameDataset` draws one at least `identity_gap`
   frames away from the target, so the model cannot copy the target's mouth from it).

`mouth_weight_mask` gives the mouth region, for a mouth-weighted loss and for mouth-region metrics.

Training reads a prepared dataset folder (`data.prepare.prepare_dataset` with crop_size > 0) through
`data.l2v_dataset.L2VFrameDataset`;
inference builds the same inputs from a video's crops (`crop.compute_crop_track` + `crop.crop_frames`) and the
predicted landmarks moved into the crops with `crop_landmarks`. Every function takes crop-space landmarks
(`crop_landmarks`) at any crop resolution: points are scaled from ``seq_crop.frame_size`` to the size asked for, so
landmarks of a 256 px crop serve a model trained at 128 px.

Images are float32 tensors in [0, 1], [B, C, S, S]; masks are [B, 1, S, S].

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

import numpy as np
import torch

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .topology import Topology, get_topology

# pose mask geometry, in face units (see the module docstring)
POSE_LINE = 0.25  # top of the mask under the eye midpoint: below the lower eyelids (~0.05), above the nose base (~0.7)
POSE_MARGIN = 0.12  # outward dilation of the face's width and of the target's lower face
POSE_JAW_DROP = 0.3  # downward sweep of the target's lower face (an opening jaw)
POSE_SIDE = 1.6  # the template's sides run straight down to here (under the jaw angles), then round off
POSE_REACH = 2.6  # bottom of the template under the eye midpoint (closed chin ~1.85 + open jaw ~0.5 + margin)
NOSE_TO_EYE_DISTANCE = 0.7  # eye-midpoint-to-nose-base distance / eye-centre distance of the mean frontal face
NOSE_BASE = {"mediapipe478": 2, "ibug68": 33}  # the point under the nose tip (subnasale)
MOUTH_MARGIN = 0.15  # mouth_weight_mask: outer-lip hull dilated by this x mouth width (`crop.face_masks`'s "mouth")
GREY = 0.5
_ELLIPSE_POINTS = 64


# ======================================================================================================================
# landmarks
# ======================================================================================================================
def crop_landmarks(seq: LandmarkSequence, matrices: np.ndarray, size: int) -> LandmarkSequence:
    """Image-space landmarks -> crop-space landmarks (frame_size (size, size)) through the frame -> crop matrices.

    seq: landmarks in frame pixels (a canonical sequence carrying a pose, like `data.store.clip_sequence` returns, is
    put back into its frames with `canonical.uncanonicalize` first). matrices: [T, 2, 3] frame pixels -> crop pixels
    (`CropTrack.matrices`, the ``matrices`` of a dataset's crops file), one per frame of `seq`. size: the crop side
    the matrices map into. x, y go through the matrices, z is scaled by their scale (`crop.transform_landmarks`).
    """
    from .crop import CropTrack, transform_landmarks

    if not isinstance(seq, LandmarkSequence):
        raise LmdiffInputError(f"crop_landmarks needs a LandmarkSequence, got {type(seq).__name__}")
    if seq.space == "canonical":
        if seq.pose is None or seq.image_size is None:
            raise LmdiffInputError(
                "crop_landmarks needs image-space landmarks, or canonical ones carrying a pose (from canonicalize)"
            )
        from .canonical import uncanonicalize

        seq = uncanonicalize(seq)
    if isinstance(matrices, torch.Tensor):
        matrices = matrices.detach().cpu().double().numpy()
    m = np.asarray(matrices, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (2, 3):
        raise LmdiffInputError(f"crop_landmarks: matrices have shape {m.shape}, expected [T, 2, 3]")
    if len(m) != len(seq):
        raise LmdiffInputError(f"crop_landmarks: {len(m)} matrices for {len(seq)} landmark frames (one per frame)")
    return transform_landmarks(seq, CropTrack(m, size, seq.frame_size))


def _check_crop_seq(seq_crop, name: str = "seq_crop") -> LandmarkSequence:
    if not isinstance(seq_crop, LandmarkSequence):
        raise LmdiffInputError(
            f"{name} must be a LandmarkSequence (from crop_landmarks), got {type(seq_crop).__name__}"
        )
    if seq_crop.space != "image":
        raise LmdiffInputError(f"{name} must hold crop-space landmarks (from crop_landmarks), got space='canonical'")
    return seq_crop


def _check_size(size, name: str = "size") -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 8:
        raise LmdiffInputError(f"{name} must be an integer of at least 8 pixels, got {size!r}")
    return int(size)


def _points_at(seq_crop: LandmarkSequence, size: int) -> np.ndarray:
    """[T, N, 2] float64 crop-space points scaled from seq_crop.frame_size to a size x size crop."""
    w, h = seq_crop.frame_size
    scale = np.array([size / w, size / h])
    return seq_crop.points[..., :2].astype(np.float64) * scale


def _valid(seq_crop: LandmarkSequence, xy: np.ndarray) -> np.ndarray:
    return np.asarray(seq_crop.valid, dtype=bool) & np.isfinite(xy).all(axis=(1, 2))


# ======================================================================================================================
# condition
# ======================================================================================================================
def default_thickness(size: int) -> float:
    """Line width of the condition image: 1 px up to 128 px crops, then size / 128 (2 px at 256, 4 px at 512)."""
    return max(1.0, size / 128.0)


def render_condition(
    seq_crop: LandmarkSequence, size: int, device="cpu", *, thickness: float | None = None
) -> torch.Tensor:
    """The conditioning image [T, 3, S, S] float32 in [0, 1] of crop-space landmarks, on `device`.

    The face parts are drawn as polylines in `render.PART_COLORS` on black (`render.render_landmarks`, style "parts":
    lips magenta/green, eyes red/blue, brows orange/azure, nose yellow, contour white, irises cyan/pink), so the model
    can tell lips, eyes, brows and jaw apart; mediapipe478 and ibug68 both work (ibug68 has no irises). `thickness`
    is the line width in output pixels (default `default_thickness(size)`). Invalid frames are black.
    """
    from .render import render_landmarks

    seq_crop = _check_crop_seq(seq_crop)
    size = _check_size(size)
    thickness = default_thickness(size) if thickness is None else thickness
    img = render_landmarks(seq_crop, size=size, thickness=thickness, style="parts", device=device)
    return img.permute(0, 3, 1, 2).contiguous()


# ======================================================================================================================
# masks
# ======================================================================================================================
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
    from .crop import hull_polygons, rasterize_polygons

    seq_crop = _check_crop_seq(seq_crop)
    size = _check_size(size)
    for name, value in (("margin", margin), ("jaw_drop", jaw_drop), ("reach", reach), ("line", line)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise LmdiffInputError(f"pose mask {name} must be a finite number >= 0 (face units), got {value!r}")
    topo = get_topology(seq_crop.topology)
    xy = _points_at(seq_crop, size)
    valid = _valid(seq_crop, xy)
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


def pose_reference(
    crops: torch.Tensor, seq_crop: LandmarkSequence, feather: float | None = None, **mask_options
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pose reference for dubbing: (masked crops [T, 3, S, S], mask [T, 1, S, S] with 1 = to be generated).

    crops: the target crops [T, 3, S, S] float in [0, 1] (uint8 0..255 accepted). seq_crop: their crop-space
    landmarks (any crop resolution; scaled to S). The mask is `pose_mask` (options passed on), feathered outward only
    by a Gaussian of sigma `feather` px (default S / 64; 0 for a hard edge): ``max(hard, blur(hard))``, so the hard
    region stays fully hidden. Masked crops are ``crop * (1 - m) + 0.5 * m``; where m == 0 they are the crops exactly.
    At inference pass the landmarks of the video frames being dubbed: the mask must hide their mouth.
    """
    from .crop import _feather

    if not isinstance(crops, torch.Tensor):
        raise LmdiffInputError(f"pose_reference: crops must be a tensor [T, 3, S, S], got {type(crops).__name__}")
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise LmdiffInputError(f"pose_reference: crops must be [T, 3, S, S], got shape {tuple(crops.shape)}")
    seq_crop = _check_crop_seq(seq_crop)
    if crops.shape[0] != len(seq_crop):
        raise LmdiffInputError(f"pose_reference: {crops.shape[0]} crops for {len(seq_crop)} landmark frames")
    if crops.dtype == torch.uint8:
        crops = crops.float() / 255.0
    elif not crops.is_floating_point():
        raise LmdiffInputError(f"pose_reference: crops must be float (0..1) or uint8, got {crops.dtype}")
    s = int(crops.shape[-1])
    sigma = s / 64.0 if feather is None else feather
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise LmdiffInputError(f"pose_reference: feather must be a number of pixels >= 0, got {feather!r}")
    hard = pose_mask(seq_crop, s, **mask_options)
    mask = torch.maximum(hard, _feather(hard, float(sigma))) if sigma > 0 else hard
    mask = mask.to(device=crops.device, dtype=crops.dtype)
    masked = torch.where(mask > 0, crops * (1 - mask) + GREY * mask, crops)
    return masked, mask


def mouth_weight_mask(seq_crop: LandmarkSequence, size: int, *, margin: float = MOUTH_MARGIN) -> torch.Tensor:
    """The mouth region [T, 1, S, S] float32 (0 or 1): the outer-lip hull dilated by `margin` x mouth width, as
    `crop.face_masks`'s "mouth" (for a mouth-weighted loss and mouth-region metrics). Invalid frames are empty."""
    from .crop import masks_from_points

    seq_crop = _check_crop_seq(seq_crop)
    size = _check_size(size)
    xy = _points_at(seq_crop, size)
    valid = _valid(seq_crop, xy)
    xy = np.where(valid[:, None, None], xy, 0.0)
    if len(xy) == 0:
        return torch.zeros(0, 1, size, size)
    return masks_from_points(xy, valid, seq_crop.topology, size, size, parts=("mouth",), mouth_margin=margin)["mouth"]

__all__ = [
    "crop_landmarks",
    "default_thickness",
    "mouth_weight_mask",
    "pose_mask",
    "pose_reference",
    "render_condition",
]
