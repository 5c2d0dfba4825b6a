"""Training pairs of the quality-mode refiner: a real frame, and fast mode's warped retrieval of it from the same clip.

The refiner (`L2VUNet` with ``extra_references=1``) learns to turn fast mode's output into the real frame: it sees
the landmark condition, the masked pose reference, an identity crop and the warped reference (the appearance bank's
best entries warped onto the target landmarks and blended, colour-matched as fast mode does: `pipelines.fast`), and
must output the target crop, fixing alignment, seams, colour and the inside of the mouth.

A pair for target frame t of a clip (`make_pair`):
- the bank is the clip's `AppearanceBank` with every entry closer than `MIN_GAP_SECONDS` to t left out (the target's
  own mouth, and the frames just around it, are never retrievable: at inference the video's other frames are);
- the target crop box is the clip's stable crop box of frame t (`crop.compute_crop_track`) moved by a random
  similarity (`jitter_matrix`: scale, roll, shift; pose and scale jitter); the condition, the pose reference and the
  warp all follow that box;
- the identity is a bank entry (also >= MIN_GAP_SECONDS away).

`build_cache` writes the pairs of many clips once, as uint8 arrays (`CHANNELS`), under a cache folder;
`RefinerPairs` reads them for training. Images are float32 in [0, 1], [B, C, S, S]; masks [B, 1, S, S].
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .appearance_bank import AppearanceBank
from .crop import CropTrack, compute_crop_track, crop_frames, face_masks, transform_landmarks
from .errors import LmdiffInputError
from .conditioning import pose_reference, render_condition
from .landmarks import LandmarkSequence
from .pipelines.fast import blend_warped, match_colour, retrieve_for

MIN_GAP_SECONDS = 2.0
MIN_BANK_ENTRIES = 8  # a target whose bank would be smaller is skipped
TOPOLOGY = "ibug68"
# cached uint8 channels of one pair, in this order
CHANNELS = {"target": 3, "warped": 3, "identity": 3, "condition": 3, "pose_mask": 1, "paste_mask": 1, "mouth_mask": 1}
JITTER = {"scale": 0.06, "angle": 4.0, "shift": 0.04}  # max |log scale|, |roll| in degrees, |shift| / crop side


def bank_excluding(bank: AppearanceBank, frame: int, min_gap: float) -> AppearanceBank:
    """The entries of `bank` (frames of one clip) at least `min_gap` frames away from `frame`, as a bank."""
    keep = np.flatnonzero(np.abs(bank.frames - int(frame)) >= min_gap)
    return AppearanceBank(bank.crops[keep], bank.landmarks[keep], bank.lips[keep], bank.pose[keep], bank.frames[keep])


def jitter_matrix(matrix: np.ndarray, size: int, rng: np.random.Generator, jitter: dict = JITTER) -> np.ndarray:
    """A frame -> crop matrix [2, 3] composed with a random similarity about the crop centre (log-scale, roll in
    degrees and shift as a fraction of `size`, each uniform within `jitter`'s bounds)."""
    scale = math.exp(rng.uniform(-jitter["scale"], jitter["scale"]))
    angle = math.radians(rng.uniform(-jitter["angle"], jitter["angle"]))
    shift = rng.uniform(-jitter["shift"], jitter["shift"], 2) * size
    c = (size - 1) / 2.0
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offset = np.array([c, c]) + shift - rot @ np.array([c, c])
    return np.concatenate([rot @ matrix[:, :2], (rot @ matrix[:, 2] + offset)[:, None]], axis=1)


def warped_reference(bank: AppearanceBank, target: LandmarkSequence, target_crop: LandmarkSequence, crops, k: int = 3):
    """Fast mode's reference for crops [F, 3, S, S] with image-space `target` landmarks and their crop-space
    `target_crop`: (the blended warp colour-matched to the crops' skin around the mouth [F, 3, S, S], the entries
    used [F, K] as indices into `bank`, with weight 0 where unused as -1)."""
    retrieval = retrieve_for(bank, target, k)
    frames = np.arange(len(target))
    warped = blend_warped(bank, retrieval, frames, target_crop)
    masks = face_masks(target_crop, parts=("lower_face", "mouth"))
    skin = (masks["lower_face"] - masks["mouth"]).clamp_min(0.0)
    used = np.where(retrieval.weights > 0, retrieval.indices, -1)
    return match_colour(warped, crops, skin), used


def make_pair(
    frame: np.ndarray,
    landmarks: LandmarkSequence,
    index: int,
    bank: AppearanceBank,
    rng: np.random.Generator,
    track: CropTrack | None = None,
    min_gap: float = MIN_GAP_SECONDS,
    jitter: dict | None = JITTER,
) -> dict | None:
    """One training pair for frame `index` (uint8 [H, W, 3] `frame`) of a clip with image-space `landmarks` and the
    clip's `bank` (built with its frame indices); None when fewer than MIN_BANK_ENTRIES entries are far enough.
    Returns the `CHANNELS` images (float [1, C, S, S]) plus "bank_frames" (the clip frames the warp and the
    identity came from)."""
    size = bank.size
    sub = bank_excluding(bank, index, min_gap * landmarks.fps)
    if len(sub) < MIN_BANK_ENTRIES:
        return None
    track = compute_crop_track(landmarks, size) if track is None else track
    matrix = track.matrices[index]
    if jitter:
        matrix = jitter_matrix(matrix, size, rng, jitter)
    box = CropTrack(matrix[None], size, track.frame_size)
    target = landmarks[index : index + 1].to_topology(TOPOLOGY)
    target_crop = transform_landmarks(target, box)
    crop = crop_frames(np.asarray(frame)[None], box)
    warped, used = warped_reference(sub, target, target_crop, crop)
    identity = int(rng.integers(len(sub)))
    _, pose = pose_reference(crop, target_crop)
    masks = face_masks(target_crop, parts=("lower_face", "mouth"))
    pair = {
        "target": crop,
        "warped": warped,
        "identity": sub.crops[identity : identity + 1].float() / 255.0,
        "condition": render_condition(target_crop, size),
        "pose_mask": pose,
        "paste_mask": masks["lower_face"],
        "mouth_mask": masks["mouth"],
    }
    pair["bank_frames"] = np.append(sub.frames[used[used >= 0]], sub.frames[identity])
    return pair


def target_frames(landmarks: LandmarkSequence, max_pairs: int, min_gap: float = MIN_GAP_SECONDS) -> np.ndarray:
    """Up to `max_pairs` evenly spread frames with a usable face and some frame `min_gap` seconds away (the rest
    of the bank check is `make_pair`'s)."""
    gap = min_gap * landmarks.fps
    usable = np.flatnonzero(landmarks.valid & ~landmarks.interpolated)
    if usable.size == 0:
        return usable
    far = np.array([np.any(np.abs(usable - t) >= gap) for t in usable])
    usable = usable[far]
    if usable.size <= max_pairs:
        return usable
    return usable[np.linspace(0, usable.size - 1, max_pairs).round().astype(int)]


def clip_pairs(
    frames: np.ndarray,
    landmarks: LandmarkSequence,
    size: int,
    max_pairs: int,
    seed: int,
    jitter: dict | None = JITTER,
    min_gap: float = MIN_GAP_SECONDS,
) -> tuple[np.ndarray, list[dict]]:
    """The pairs of one clip (uint8 frames [T, H, W, 3], their image-space landmarks): (uint8 array
    [N, sum(CHANNELS), S, S], per pair {"frame", "bank_frames"}); the bank holds every usable frame."""
    bank = AppearanceBank.build(frames, landmarks, size, max_entries=len(frames))
    track = compute_crop_track(landmarks, size)
    rng = np.random.default_rng(seed)
    arrays, meta = [], []
    for t in target_frames(landmarks, max_pairs, min_gap):
        pair = make_pair(frames[t], landmarks, int(t), bank, rng, track=track, min_gap=min_gap, jitter=jitter)
        if pair is None:
            continue
        stacked = torch.cat([pair[name] for name in CHANNELS], dim=1)[0]
        arrays.append((stacked.clamp(0, 1) * 255).round().to(torch.uint8).numpy())
        meta.append({"frame": int(t), "bank_frames": pair["bank_frames"].tolist()})
    empty = np.zeros((0, sum(CHANNELS.values()), size, size), np.uint8)
    return (np.stack(arrays) if arrays else empty), meta


def build_cache(
    clips: Iterable[Path], out: Path, landmarker_path, size: int = 256, max_pairs: int = 250, seed: int = 0,
    fps: float = 25.0, log=print,
) -> list[dict]:
    """Write `clip_pairs` of every clip (mp4 paths) to `out`/<clip>.npy + `out`/<clip>.json (a clip already there
    is kept); returns the index entries. Landmarks: MediaPipe (a fresh video landmarker per clip), smoothed."""
    from .detectors import extract_landmarks, load_landmarker
    from .media import iter_frames
    from .smoothing import smooth_detections

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for n, path in enumerate(clips):
        path = Path(path)
        npy, info = out / f"{path.stem}.npy", out / f"{path.stem}.json"
        if not (npy.is_file() and info.is_file()):
            frames = np.stack(list(iter_frames(path, fps)))
            with load_landmarker("mediapipe", landmarker_path, video=True) as landmarker:
                found = extract_landmarks(frames, landmarker, fps, max_gap=None, source=str(path))
                landmarks = smooth_detections(found)
            arrays, meta = clip_pairs(frames, landmarks, size, max_pairs, seed + n)
            tmp = npy.with_suffix(".tmp.npy")
            np.save(tmp, arrays)
            tmp.rename(npy)
            info.write_text(json.dumps({"clip": path.stem, "frames": len(frames), "pairs": meta}))
            log(f"{path.stem}: {len(meta)} pairs from {len(frames)} frames")
        index.append({"clip": path.stem, "file": npy.name})
    return index


def split_channels(stacked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cached uint8 [B, sum(CHANNELS), S, S] -> {name: float [B, C, S, S] in [0, 1]}."""
    out, start = {}, 0
    for name, c in CHANNELS.items():
        out[name] = stacked[:, start : start + c].float() / 255.0
        start += c
    return out


class RefinerPairs(torch.utils.data.Dataset):
    """The cached pairs of some clips (`build_cache`'s folder): item i = {name: float [C, S, S]} (`CHANNELS`) plus
    "clip" and "frame". Arrays are memory-mapped."""

    def __init__(self, folder, clips: Iterable[str]):
        folder = Path(folder)
        self.arrays, self.items = {}, []
        for clip in clips:
            npy, info = folder / f"{clip}.npy", folder / f"{clip}.json"
            if not npy.is_file() or not info.is_file():
                raise LmdiffInputError(f"refiner cache {folder} has no pairs of clip {clip!r} (run build_cache)")
            self.arrays[clip] = np.load(npy, mmap_mode="r")
            pairs = json.loads(info.read_text())["pairs"]
            self.items += [(clip, i, p["frame"]) for i, p in enumerate(pairs)]
        if not self.items:
            raise LmdiffInputError(f"refiner cache {folder}: no pairs in clips {list(clips)}")
        self.size = int(next(iter(self.arrays.values())).shape[-1])

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Nothing varies by epoch (the pairs are fixed); the shared training loop calls it."""

    def __getitem__(self, index: int) -> dict:
        clip, i, frame = self.items[index]
        item = {k: v[0] for k, v in split_channels(torch.from_numpy(np.array(self.arrays[clip][i]))[None]).items()}
        return {**item, "clip": clip, "frame": frame}
