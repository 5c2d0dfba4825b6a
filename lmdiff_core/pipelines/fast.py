"""`fast` mode: the lower face of each frame rebuilt from the person's own frames, without a generator.

Per output frame: the appearance bank's best entries for the target lips and pose (`AppearanceBank.retrieve`), each
warped onto the frame's target landmarks (`AppearanceBank.warp`), blended by match quality, shifted in colour to the
frame's own skin around the mouth, and pasted into the frame under the feathered union of the frame's and the
target's lower-face masks (`crop.face_masks`, `crop.paste_back`); pixels outside that mask are the frame's own.
Frames without a face (source landmarks not valid) are passed through untouched. Streams: frames come in and go out
`batch` at a time.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from ..appearance_bank import AppearanceBank, Retrieval, shape_keys
from ..crop import compute_crop_track, crop_frames, face_masks, paste_back, transform_landmarks
from ..errors import LmdiffInputError
from ..landmarks import LandmarkSequence
from .timing import StageTimer, stage

FEATHER = 1.0 / 32.0  # paste-back feather, Gaussian sigma as a fraction of the crop side


def retrieve_for(bank: AppearanceBank, target: LandmarkSequence, k: int = 3, **options) -> Retrieval:
    """`bank.retrieve` for image-space target landmarks (frames without a face get the bank's keys of the mean
    face; they are passed through anyway)."""
    lips, pose = shape_keys(target)
    return bank.retrieve(lips, pose, k=k, **options)


def blend_warped(bank: AppearanceBank, retrieval: Retrieval, frames: np.ndarray, target_crop: LandmarkSequence):
    """The blended warp [F, 3, S, S] (0..1) for output frames `frames` (indices into `retrieval`) and their
    crop-space target landmarks (F frames)."""
    out = torch.zeros(len(frames), 3, bank.size, bank.size)
    for j in range(retrieval.indices.shape[1]):
        w = retrieval.weights[frames, j]
        used = np.flatnonzero(w > 0)
        if len(used) == 0:
            continue
        warped = bank.warp(retrieval.indices[frames[used], j], target_crop[used])
        out[used] += warped * torch.as_tensor(w[used], dtype=torch.float32)[:, None, None, None]
    return out


def warped_references(
    bank: AppearanceBank, target: LandmarkSequence, k: int = 3, batch: int = 16, progress=None
) -> Iterator[torch.Tensor]:
    """The retrieved and warped references for image-space target landmarks, in the target's own stable face crops
    (`compute_crop_track`, the bank's crop size): float [F, 3, S, S] in 0..1, `batch` frames at a time. Frames
    without a valid target are grey. `progress(done, total)` after each batch."""
    n = len(target)
    retrieval = retrieve_for(bank, target, k)
    target_crop = transform_landmarks(target, compute_crop_track(target, bank.size))
    for start in range(0, n, batch):
        idx = np.arange(start, min(n, start + batch))
        out = torch.full((len(idx), 3, bank.size, bank.size), 0.5)
        faces = np.flatnonzero(target.valid[idx])
        if len(faces):
            out[faces] = blend_warped(bank, retrieval, idx[faces], target_crop[idx[faces]])
        yield out
        if progress is not None:
            progress(int(idx[-1]) + 1, n)


def match_colour(warped: torch.Tensor, crops: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """`warped` [F, 3, S, S] shifted per channel by the mean difference to `crops` over `region` [F, 1, S, S]
    (the skin around the mouth): the bank frame's lighting becomes the target frame's."""
    weight = region.sum((2, 3), keepdim=True).clamp_min(1.0)
    offset = ((crops - warped) * region).sum((2, 3), keepdim=True) / weight
    return (warped + offset).clamp(0.0, 1.0)


def render_fast(
    frames: Iterable[np.ndarray],
    source: LandmarkSequence,
    target: LandmarkSequence,
    bank: AppearanceBank,
    k: int = 3,
    batch: int = 8,
    timer: StageTimer | None = None,
    progress: Callable[[int, int], None] | None = None,
    refine: Callable | None = None,
) -> Iterator[np.ndarray]:
    """Output frames (uint8 [H, W, 3]) one by one: `frames` (as many as `target`) with the lower face of `target`
    (image-space landmarks, same frame size as `source`, the frames' own landmarks) rebuilt from `bank`.
    `refine(crops, warped, source_crop, target_crop)` -> crops [F, 3, S, S], if given, rebuilds each batch's crops
    from the colour-matched warp before paste-back (quality mode's refiner, `pipelines/quality.py`)."""
    if len(source) != len(target) or source.frame_size != target.frame_size:
        raise LmdiffInputError(
            f"source and target landmarks must have the same length and frame size, got {len(source)} frames "
            f"{source.frame_size} and {len(target)} frames {target.frame_size}"
        )
    n, size = len(target), bank.size
    with stage(timer, "retrieve"):
        retrieval = retrieve_for(bank, target, k)
    track = compute_crop_track(source, size)
    source_crop = transform_landmarks(source, track)
    target_crop = transform_landmarks(target, track)
    has_face = source.valid & target.valid
    frame_iter = iter(frames)
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        chunk = []
        for _ in range(stop - start):
            try:
                chunk.append(np.asarray(next(frame_iter)))
            except StopIteration:
                raise LmdiffInputError(f"frames ended after {start + len(chunk)} of {n}") from None
        idx = np.arange(start, stop)
        faces = idx[has_face[idx]]
        if len(faces) == 0:
            yield from chunk
        else:
            pos = faces - start
            sub = np.stack([chunk[p] for p in pos])
            with stage(timer, "crop"):
                crops = crop_frames(sub, track, faces)
                both = LandmarkSequence.concatenate([source_crop[faces], target_crop[faces]])
                masks = face_masks(both, parts=("lower_face", "mouth"))
                f = len(faces)
                paste = torch.maximum(masks["lower_face"][:f], masks["lower_face"][f:])
                skin = (paste - torch.maximum(masks["mouth"][:f], masks["mouth"][f:])).clamp_min(0.0)
            with stage(timer, "warp"):
                warped = blend_warped(bank, retrieval, faces, target_crop[faces])
                warped = match_colour(warped, crops, skin)
            if refine is not None:
                warped = refine(crops, warped, source_crop[faces], target_crop[faces])
            with stage(timer, "paste_back"):
                pasted, _ = paste_back(sub, warped, track, faces, mask=paste, feather=FEATHER * size)
                pasted = (pasted.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for p, frame in zip(pos, pasted):
                chunk[p] = frame
            yield from chunk
        if progress is not None:
            progress(stop, n)
