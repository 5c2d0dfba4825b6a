"""Conditioning inputs of the landmarks-to-video (L2V) stage, shared by training and inference.

The L2V model is a latent diffusion U-Net that generates an aligned face crop (`crop` module) from:

1. a condition: the crop-space landmarks drawn as an image (`render_condition`, the part colours of `render`);
2. a pose reference: the target crop with the lower face replaced by grey, plus that mask (`pose_reference`): the
   model keeps the head, eyes, background and lighting of the reference and generates the masked part (dubbing);
3. an identity reference: another crop of the same person (`L2VFrameDataset` draws one at least `identity_gap`
   frames away from the target, so the model cannot copy the target's mouth from it).

The masks (`pose_mask`, why it has its shape, and `mouth_weight_mask`) are in `masks`.

Training reads a prepared dataset folder (`data.prepare.prepare_dataset` with crop_size > 0) through
`data.l2v_dataset.L2VFrameDataset`; inference builds the same inputs from a video's crops (`crop.compute_crop_track` + `crop.crop_frames`) and the
predicted landmarks moved into the crops with `crop_landmarks`. Every function takes crop-space landmarks
(`crop_landmarks`) at any crop resolution: points are scaled from ``seq_crop.frame_size`` to the size asked for, so
landmarks of a 256 px crop serve a model trained at 128 px.

Images are float32 tensors in [0, 1], [B, C, S, S]; masks are [B, 1, S, S].
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .masks import check_crop_landmarks, check_crop_size, feather_mask, pose_mask

GREY = 0.5


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

    seq_crop = check_crop_landmarks(seq_crop)
    size = check_crop_size(size)
    thickness = default_thickness(size) if thickness is None else thickness
    img = render_landmarks(seq_crop, size=size, thickness=thickness, style="parts", device=device)
    return img.permute(0, 3, 1, 2).contiguous()


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
    if not isinstance(crops, torch.Tensor):
        raise LmdiffInputError(f"pose_reference: crops must be a tensor [T, 3, S, S], got {type(crops).__name__}")
    if crops.ndim != 4 or crops.shape[1] != 3 or crops.shape[2] != crops.shape[3]:
        raise LmdiffInputError(f"pose_reference: crops must be [T, 3, S, S], got shape {tuple(crops.shape)}")
    seq_crop = check_crop_landmarks(seq_crop)
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
    mask = torch.maximum(hard, feather_mask(hard, float(sigma))) if sigma > 0 else hard
    mask = mask.to(device=crops.device, dtype=crops.dtype)
    masked = torch.where(mask > 0, crops * (1 - mask) + GREY * mask, crops)
    return masked, mask


__all__ = [
    "crop_landmarks",
    "default_thickness",
    "pose_reference",
    "render_condition",
]
