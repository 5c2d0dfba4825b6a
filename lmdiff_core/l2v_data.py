"""Conditioning inputs of the landmarks-to-video (L2V) stage, shared by training and inference.

The L2V model is a latent diffusion U-Net that generates an aligned face crop (`crop` module) from:

1. a condition: the crop-space landmarks drawn as an image (`render_condition`, the part colours of `render`);
2. a pose reference: the target crop with the lower face replaced by grey, plus that mask (`pose_reference`): the
   model keeps the head, eyes, background and lighting of the reference and generates the masked part (dubbing);
3. an identity reference: another crop of the same person (`L2VFrameDataset` draws one at least `identity_gap`
   frames away from the target, so the model cannot copy the target's mouth from it).

`mouth_weight_mask` gives the mouth region, for a mouth-weighted loss and for mouth-region metrics.

Training reads a prepared dataset folder (`dataset.prepare_dataset` with crop_size > 0) through `L2VFrameDataset`;
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
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

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

    seq: landmarks in frame pixels (a canonical sequence carrying a pose, like `dataset.clip_sequence` returns, is
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


# ======================================================================================================================
# the training dataset
# ======================================================================================================================
try:  # a Dataset subclass when torch is there (as in dataset.py)
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


def _frame_range(frames, n: int, clip_id: str) -> tuple[int, int]:
    """(lo, hi) frames of a clip from `frames`: None (all), (start, stop) ints (frame indices; stop None or past the
    end = the clip's end) or, when either is a float, fractions in [0, 1] of the clip's length (rounded to frames)."""
    if frames is None:
        return 0, n
    if not (isinstance(frames, (tuple, list)) and len(frames) == 2):
        raise LmdiffInputError(f"frames must be a (start, stop) pair, got {frames!r}")
    a, b = frames
    numbers = [v for v in (a, b) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in numbers):
        raise LmdiffInputError(f"frames must be a (start, stop) pair of frame indices or fractions, got {frames!r}")
    if any(isinstance(v, (float, np.floating)) for v in numbers):
        a = 0.0 if a is None else float(a)
        b = 1.0 if b is None else float(b)
        if not (0.0 <= a < b <= 1.0):
            raise LmdiffInputError(f"frames as fractions must satisfy 0 <= start < stop <= 1, got {frames!r}")
        return int(round(a * n)), int(round(b * n))
    a = 0 if a is None else int(a)
    b = n if b is None else int(b)
    if a < 0 or b <= a:
        raise LmdiffInputError(f"frames must satisfy 0 <= start < stop, got {frames!r}")
    if a >= n:
        raise LmdiffInputError(f"frames {frames!r} start past the end of clip {clip_id!r} ({n} frames)")
    return a, min(b, n)


def _clip_landmarks(folder: Path, entry: dict, index: dict) -> LandmarkSequence:
    """`dataset.clip_sequence` of one clip (canonical points with pose, flags), reading only the landmark arrays of
    its .a2l.safetensors (not the audio features)."""
    from .canonical import CANONICAL_SIZE
    from .dataset import _read_a2l

    arrays, meta = _read_a2l(folder / entry["files"]["a2l"], ("points", "pose", "valid", "interpolated"))
    w, h = (int(v) for v in meta.get("image_size", "0,0").split(","))
    return LandmarkSequence(
        points=arrays["points"],
        topology=meta.get("topology", index.get("topology")),
        fps=float(meta.get("fps", index["fps"])),
        frame_size=CANONICAL_SIZE,
        valid=arrays["valid"],
        interpolated=arrays["interpolated"],
        pose=arrays["pose"].astype(np.float64),
        space="canonical",
        image_size=(w, h),
    )


class L2VFrameDataset(_TorchDataset):
    """Training items for the L2V model from a prepared dataset folder (`dataset.prepare_dataset`, crop_size > 0).

    dataset_dir: the folder. split: "train", "val" or "all" (None = "all"). clips: optional list of clip ids (each
    must exist and be in the split). frames: optional (start, stop) range used in every clip, as frame indices (stop
    None or past the end = the clip's end) or as fractions of the clip's length (when either is a float: (0.0, 0.7)
    and (0.7, 1.0) split every clip into two disjoint parts); windows and identity frames stay inside it. window: consecutive
    frames per item (> 1 for temporal layers); windows start every `stride` frames (default max(1, window // 2)).
    identity_gap: the identity reference frame lies in the same clip and range, at least this many frames from every
    frame of the window (a detected, not gap-filled frame when there is one), drawn with a generator seeded by
    (seed, epoch, index): the same frame for an item within an epoch, others after `set_epoch`. Windows without any
    such frame are left out. size: side of the returned images (default the stored crop size; crops are resized with
    antialiased bilinear interpolation and landmarks scaled). topology: the landmark topology the condition images
    are drawn in (default the dataset's; "ibug68" for a model driven by A2L output).

    A clip whose range is shorter than a window, or has no window with an identity frame, is an error when it was
    asked for by name (`clips`), else it is left out with a warning (listed in `.skipped`); no item at all is an error.

    An item is a dict: "target" [F, 3, S, S], "condition" [F, 3, S, S] (`render_condition`), "pose_reference"
    [F, 3, S, S] and "pose_mask" [F, 1, S, S] (`pose_reference`), "identity" [3, S, S], "mouth_mask" [F, 1, S, S]
    (`mouth_weight_mask`), all float32 in [0, 1]; "clip" str, "start" int (the window's first frame in the clip) and
    "identity_frame" int. Crops are read from disk per item (only the frames needed); landmarks are kept in memory.
    """

    def __init__(
        self,
        dataset_dir,
        split: str | None = "train",
        clips: Sequence[str] | None = None,
        frames: tuple | None = None,
        window: int = 1,
        identity_gap: int = 25,
        seed: int = 0,
        size: int | None = None,
        stride: int | None = None,
        thickness: float | None = None,
        topology: str | None = None,
    ):
        from .dataset import _split_entries, load_index, window_starts

        if isinstance(window, bool) or not (isinstance(window, (int, np.integer)) and window >= 1):
            raise LmdiffInputError(f"window must be a positive number of frames, got {window!r}")
        if isinstance(identity_gap, bool) or not (isinstance(identity_gap, (int, np.integer)) and identity_gap >= 0):
            raise LmdiffInputError(f"identity_gap must be a number of frames >= 0, got {identity_gap!r}")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1):
            raise LmdiffInputError(f"stride must be a positive number of frames, got {stride!r}")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.index = load_index(self.dataset_dir)
        self.window = int(window)
        self.identity_gap = int(identity_gap)
        self.stride = max(1, self.window // 2) if stride is None else int(stride)
        self.seed = int(seed)
        self.epoch = 0
        self.split = "all" if split is None else split
        self.frames = frames
        self.crop_size = int(self.index.get("crop_size") or 0)
        if self.crop_size <= 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} was prepared without crops (crop_size 0); L2V training needs face "
                "crops: prepare it again with a crop size (lmdiff prepare --crop-size 256)"
            )
        self.size = self.crop_size if size is None else _check_size(size, "size")
        self.thickness = thickness
        self.topology = self.index.get("topology")
        self.condition_topology = self.topology if topology is None else get_topology(topology).name

        entries = _split_entries(self.index, self.split)
        if clips is not None:
            if isinstance(clips, str):
                clips = [clips]
            known = {e["id"]: e for e in self.index["clips"]}
            in_split = {e["id"] for e in entries}
            chosen = []
            for cid in clips:
                if cid not in known:
                    listed = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
                    raise LmdiffInputError(f"dataset {self.dataset_dir} has no clip {cid!r} (its clips: {listed})")
                if cid not in in_split:
                    raise LmdiffInputError(
                        f"clip {cid!r} is in split {known[cid]['split']!r}, not {self.split!r}: "
                        "pass split='all' to use clips of any split"
                    )
                chosen.append(known[cid])
            entries = chosen
        named = clips is not None

        self.clip_ids: list[str] = []
        self.ranges: list[tuple[int, int]] = []
        self.skipped: list[tuple[str, str]] = []  # (clip id, reason)
        self._files: list[Path] = []
        self._seqs: list[LandmarkSequence] = []  # crop-space landmarks of each clip's range, at the stored crop size
        self._detected: list[np.ndarray] = []
        item_clip, item_start = [], []
        for entry in entries:
            cid = entry["id"]
            rel = (entry.get("files") or {}).get("crops")
            if not rel:
                raise LmdiffInputError(
                    f"clip {cid!r} of dataset {self.dataset_dir} has no crops (prepared with crop_size 0)"
                )
            n = int(entry["n_frames"])
            lo, hi = _frame_range(frames, n, cid)
            if hi - lo < self.window:
                reason = f"its frame range {lo}..{hi} ({hi - lo} frames) is shorter than the window of {self.window}"
                if named:
                    raise LmdiffInputError(f"clip {cid!r}: {reason}")
                self.skipped.append((cid, reason))
                continue
            starts = window_starts(hi - lo, self.window, self.stride) + lo
            gap = self.identity_gap
            ok = (starts - gap >= lo) | (starts + self.window - 1 + gap <= hi - 1)
            if not ok.any():
                reason = (
                    f"no frame of its range {lo}..{hi} is {gap} frames from a window of {self.window} "
                    "(lower identity_gap or widen the range)"
                )
                if named:
                    raise LmdiffInputError(f"clip {cid!r}: {reason}")
                self.skipped.append((cid, reason))
                continue
            path = self.dataset_dir / rel
            matrices = self._read(path, "matrices", lo, hi)
            seq = _clip_landmarks(self.dataset_dir, entry, self.index)[lo:hi]
            c = len(self.clip_ids)
            self.clip_ids.append(cid)
            self.ranges.append((lo, hi))
            self._files.append(path)
            self._seqs.append(crop_landmarks(seq, matrices, self.crop_size))
            self._detected.append(seq.valid & ~seq.interpolated)
            item_clip.append(np.full(int(ok.sum()), c, dtype=np.int64))
            item_start.append(starts[ok])
        if self.skipped:
            warnings.warn(
                f"L2VFrameDataset: {len(self.skipped)} clip(s) left out: "
                + "; ".join(f"{c}: {r}" for c, r in self.skipped[:10]),
                stacklevel=2,
            )
        self._clip = np.concatenate(item_clip) if item_clip else np.zeros(0, dtype=np.int64)
        self._start = np.concatenate(item_start) if item_start else np.zeros(0, dtype=np.int64)
        if len(self._clip) == 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} has no window of {self.window} frames with an identity frame "
                f"{self.identity_gap} frames away in split {self.split!r}"
                + (f", frames {frames!r}" if frames is not None else "")
                + f" ({len(entries)} clip(s) considered, {len(self.skipped)} left out)"
            )

    @staticmethod
    def _read(path: Path, name: str, start: int, stop: int) -> np.ndarray:
        from .dataset import _open_safetensors

        with _open_safetensors(path) as f:
            return np.asarray(f.get_slice(name)[start:stop])

    def __len__(self) -> int:
        return len(self._clip)

    @property
    def items(self) -> list[tuple[str, int]]:
        """(clip id, start) of every item, in index order."""
        return [(self.clip_ids[c], int(s)) for c, s in zip(self._clip, self._start)]

    def set_epoch(self, epoch: int) -> None:
        """Draw other identity frames from now on (the trainer calls this every epoch; reproducible per epoch)."""
        self.epoch = int(epoch)

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} is out of range for a dataset of {len(self)} items")
        return int(index) % len(self)

    def identity_frame(self, index: int) -> int:
        """The identity reference frame (in the clip) of item `index` for the current epoch."""
        index = self._index(index)
        c, start = int(self._clip[index]), int(self._start[index])
        lo, hi = self.ranges[c]
        frames = np.arange(lo, hi)
        allowed = (frames <= start - self.identity_gap) | (frames >= start + self.window - 1 + self.identity_gap)
        detected = allowed & self._detected[c]
        pool = frames[detected] if detected.any() else frames[allowed]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(pool[rng.integers(len(pool))])

    def range_start_crop(self, index: int) -> torch.Tensor:
        """[3, S, S]: the crop of the first frame of item `index`'s clip range (the frozen-lips baseline's source)."""
        c = int(self._clip[self._index(index)])
        lo = self.ranges[c][0]
        return self._images(self._read(self._files[c], "crops", lo, lo + 1))[0]

    def _images(self, crops: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(crops)).float().div_(255.0)
        if self.size != self.crop_size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        return x

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        c, start = int(self._clip[index]), int(self._start[index])
        lo = self.ranges[c][0]
        ident = self.identity_frame(index)
        from .dataset import _open_safetensors

        with _open_safetensors(self._files[c]) as f:
            part = f.get_slice("crops")
            window = np.asarray(part[start : start + self.window])
            identity = np.asarray(part[ident : ident + 1])
        target = self._images(window)
        seq = self._seqs[c][start - lo : start - lo + self.window]
        s = self.size
        masked, mask = pose_reference(target, seq)
        return {
            "target": target,
            "condition": render_condition(seq.to_topology(self.condition_topology), s, thickness=self.thickness),
            "pose_reference": masked,
            "pose_mask": mask,
            "identity": self._images(identity)[0],
            "mouth_mask": mouth_weight_mask(seq, s),
            "clip": self.clip_ids[c],
            "start": start,
            "identity_frame": ident,
        }


__all__ = [
    "L2VFrameDataset",
    "crop_landmarks",
    "default_thickness",
    "mouth_weight_mask",
    "pose_mask",
    "pose_reference",
    "render_condition",
]
