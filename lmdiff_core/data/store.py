"""The dataset store: the files `lmdiff prepare` (`data.prepare`) writes, their writers and their readers.

A dataset folder::

    DATASET/
      index.json                        format, settings and one entry per complete clip (rewritten after each clip)
      report.json                       what the last run did: done, skipped (already there), failed with reasons
      clips/<id>.a2l.safetensors        A2L arrays (small: A2L training reads only these)
      clips/<id>.crops.safetensors      aligned face crops for L2V (large; never loaded for A2L)
      clips/<id>.json                   per-clip sidecar, written last: its presence marks the clip complete

`<id>.a2l.safetensors` (safetensors, numpy layout; `T` frames at the dataset's fps):

- ``points`` float32 [T, N, 3]: canonical (pose-free) landmarks in the detector's topology (`canonical` module),
  smoothed in time after canonicalisation (see `smooth_clip`);
- ``pose`` float32 [T, 4, 4]: canonical -> image transform per frame (`LandmarkSequence.pose`), smoothed
  (`smooth_pose`); `clip_sequence` gives points and pose back as a `LandmarkSequence`;
- ``valid``, ``interpolated`` bool [T]: frames with a face, and frames filled in across a short detection gap;
- ``blendshapes`` float32 [T, 52] (MediaPipe only; names in `BLENDSHAPE_NAMES` and index.json);
- ``features`` float32 [T, k, L, D]: audio features (`audio_features`), frame t is the audio of frame t;
- ``audio`` int16 [round(T / fps * 16000)]: the clip's 16 kHz mono speech fitted to the frames, so that other
  features can be computed later without decoding the videos again.
  Metadata (strings): clip_id, fps, topology, image_size ("W,H"), sample_rate, format_version.

`<id>.crops.safetensors`: ``crops`` uint8 [T, 3, S, S] (RGB, `crop.compute_crop_track` + `crop.crop_frames`) and
``matrices`` float64 [T, 2, 3] (frame pixels -> crop pixels, `CropTrack.matrices`), written frame batch by batch.

Readers: `load_index`, `clip_arrays`, `clip_sequence`, `load_crops`, `read_a2l_file`; the training datasets
(`data.a2l_dataset`, `data.l2v_dataset`) and `motion.dataset_motion_stats` read through them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..atomic import atomic_write
from ..errors import LmdiffInputError

FORMAT = "lmdiff-dataset"
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
CLIPS_FOLDER = "clips"
INDEX_NAME = "index.json"
REPORT_NAME = "report.json"


# MediaPipe FaceLandmarker's 52 blendshapes in output order (the `category_name`s of `result.face_blendshapes[i]`;
# tests/test_dataset.py checks the list against a real detection). Scores are stored in this order.
BLENDSHAPE_NAMES = (
    "_neutral",
    "browDownLeft",
    "browDownRight",
    "browInnerUp",
    "browOuterUpLeft",
    "browOuterUpRight",
    "cheekPuff",
    "cheekSquintLeft",
    "cheekSquintRight",
    "eyeBlinkLeft",
    "eyeBlinkRight",
    "eyeLookDownLeft",
    "eyeLookDownRight",
    "eyeLookInLeft",
    "eyeLookInRight",
    "eyeLookOutLeft",
    "eyeLookOutRight",
    "eyeLookUpLeft",
    "eyeLookUpRight",
    "eyeSquintLeft",
    "eyeSquintRight",
    "eyeWideLeft",
    "eyeWideRight",
    "jawForward",
    "jawLeft",
    "jawOpen",
    "jawRight",
    "mouthClose",
    "mouthDimpleLeft",
    "mouthDimpleRight",
    "mouthFrownLeft",
    "mouthFrownRight",
    "mouthFunnel",
    "mouthLeft",
    "mouthLowerDownLeft",
    "mouthLowerDownRight",
    "mouthPressLeft",
    "mouthPressRight",
    "mouthPucker",
    "mouthRight",
    "mouthRollLower",
    "mouthRollUpper",
    "mouthShrugLower",
    "mouthShrugUpper",
    "mouthSmileLeft",
    "mouthSmileRight",
    "mouthStretchLeft",
    "mouthStretchRight",
    "mouthUpperUpLeft",
    "mouthUpperUpRight",
    "noseSneerLeft",
    "noseSneerRight",
)


# ======================================================================================================================
# writers (atomic: a file appears complete or not at all)
# ======================================================================================================================
def write_json(path: Path, data) -> None:
    """Write JSON atomically (temporary file + os.replace)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")


def save_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """`safetensors.numpy.save_file`, atomically."""
    from safetensors.numpy import save_file

    with atomic_write(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)


_ST_DTYPES = {np.dtype("uint8"): "U8", np.dtype("float32"): "F32", np.dtype("float64"): "F64"}


def stream_safetensors(
    path: Path,
    small: dict[str, np.ndarray],
    big_name: str,
    big_dtype,
    big_shape: tuple[int, ...],
    chunks: Iterable[np.ndarray],
    metadata: dict[str, str],
) -> None:
    """Write a safetensors file whose large tensor `big_name` arrives in chunks along axis 0 (bounded memory).

    The header (shapes and offsets) is known up front; the small tensors come first, then the chunks. The file
    appears at `path` only once complete (temporary file + os.replace).
    """
    big_dtype = np.dtype(big_dtype)
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    small = {k: np.ascontiguousarray(v) for k, v in small.items()}
    for name, arr in small.items():
        header[name] = {
            "dtype": _ST_DTYPES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    big_bytes = int(np.prod(big_shape)) * big_dtype.itemsize
    header[big_name] = {
        "dtype": _ST_DTYPES[big_dtype],
        "shape": list(big_shape),
        "data_offsets": [offset, offset + big_bytes],
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in small.values():
            f.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        rows = 0
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=big_dtype)
            if chunk.shape[1:] != tuple(big_shape[1:]):
                raise ValueError(f"chunk of shape {chunk.shape} does not fit {big_name} {big_shape}")
            f.write(chunk.tobytes())
            rows += chunk.shape[0]
        if rows != big_shape[0]:
            raise ValueError(f"{big_name}: {rows} rows written, {big_shape[0]} expected")


# ======================================================================================================================
# readers
# ======================================================================================================================
def read_index_file(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except ValueError as exc:
        raise LmdiffInputError(f"{path} is not valid JSON ({exc}); the dataset index is damaged") from None
    except OSError as exc:
        raise LmdiffInputError(f"cannot read the dataset index {path}: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise LmdiffInputError(f"{path} is not an lmdiff dataset index (made by `lmdiff prepare`)")
    if index.get("format_version") != FORMAT_VERSION:
        raise LmdiffInputError(
            f"{path} has dataset format version {index.get('format_version')}, this lmdiff reads {FORMAT_VERSION}"
        )
    if not isinstance(index.get("clips"), list):
        raise LmdiffInputError(f"{path} has no clip list; the dataset index is damaged")
    return index


def load_index(dataset_dir) -> dict:
    """index.json of a dataset folder made by `prepare_dataset`; LmdiffInputError for anything else."""
    folder = Path(dataset_dir).expanduser()
    if not folder.exists():
        raise LmdiffInputError(
            f"dataset folder {folder} does not exist; make one with `lmdiff prepare SRC -o {folder}`"
        )
    if not folder.is_dir():
        raise LmdiffInputError(f"dataset path {folder} is a file; expected a folder made by `lmdiff prepare`")
    path = folder / INDEX_NAME
    if not path.is_file():
        raise LmdiffInputError(f"{folder} is not an lmdiff dataset: it has no {INDEX_NAME} (run `lmdiff prepare`)")
    return read_index_file(path)


def clip_entry(index: dict, dataset_dir: Path, clip_id: str) -> dict:
    for e in index["clips"]:
        if e["id"] == clip_id:
            return e
    raise LmdiffInputError(f"dataset {dataset_dir} has no clip {clip_id!r}")


def open_safetensors(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise LmdiffInputError(f"dataset file {path} is missing; run `lmdiff prepare` again to complete the dataset")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:
        raise LmdiffInputError(f"{path} is not a readable safetensors file ({exc})") from None


def read_a2l_file(path: Path, keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with open_safetensors(path) as f:
        names = list(f.keys()) if keys is None else [k for k in keys if k in f.keys()]
        arrays = {k: f.get_tensor(k) for k in names}
        metadata = f.metadata() or {}
    return arrays, metadata


def clip_arrays(dataset_dir, clip_id: str, crops: bool = False) -> dict:
    """All stored arrays of one clip, for whole-clip use (validation): points, pose, valid, interpolated, features,
    blendshapes (if any), audio (float32, 16 kHz), plus fps, topology, image_size, sample_rate, clip_id and the index
    entry; with `crops=True` also crops uint8 [T, 3, S, S] and crop_matrices [T, 2, 3]."""
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    entry = clip_entry(index, folder, clip_id)
    arrays, meta = read_a2l_file(folder / entry["files"]["a2l"])
    out: dict = dict(arrays)
    if "audio" in out:
        out["audio"] = out["audio"].astype(np.float32) / 32767.0
    w, h = (int(v) for v in meta.get("image_size", "0,0").split(","))
    out.update(
        clip_id=clip_id,
        fps=float(meta.get("fps", index["fps"])),
        topology=meta.get("topology", index.get("topology")),
        image_size=(w, h),
        sample_rate=int(meta.get("sample_rate", SAMPLE_RATE)),
        entry=entry,
    )
    if crops:
        out["crops"], out["crop_matrices"] = load_crops(folder, clip_id)
    return out


def read_clip_sequence(dataset_dir, entry: dict, index: dict):
    """The canonical landmarks of the clip of index `entry` as a `LandmarkSequence` (with pose, image_size, flags and
    blendshapes), reading only the landmark arrays of its .a2l.safetensors (not the audio)."""
    from ..canonical import CANONICAL_SIZE
    from ..landmarks import LandmarkSequence

    keys = ("points", "pose", "valid", "interpolated", "blendshapes")
    arrays, meta = read_a2l_file(Path(dataset_dir) / entry["files"]["a2l"], keys)
    w, h = (int(v) for v in meta.get("image_size", "0,0").split(","))
    return LandmarkSequence(
        points=arrays["points"],
        topology=meta.get("topology", index.get("topology")),
        fps=float(meta.get("fps", index["fps"])),
        frame_size=CANONICAL_SIZE,
        valid=arrays["valid"],
        interpolated=arrays["interpolated"],
        blendshapes=arrays.get("blendshapes"),
        pose=arrays["pose"].astype(np.float64),
        space="canonical",
        image_size=(w, h),
    )


def clip_sequence(dataset_dir, clip_id: str):
    """The clip's canonical landmarks as a `LandmarkSequence` (`read_clip_sequence` by clip id)."""
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    return read_clip_sequence(folder, clip_entry(index, folder, clip_id), index)


def load_crops(dataset_dir, clip_id: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 [n, 3, S, S] and their frame -> crop matrices [n, 2, 3] for frames start..stop-1, read from
    disk without loading the rest of the clip."""
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    entry = clip_entry(index, folder, clip_id)
    rel = entry["files"].get("crops")
    if not rel:
        raise LmdiffInputError(f"dataset {folder} was prepared without crops (crop_size 0)")
    with open_safetensors(folder / rel) as f:
        crops = f.get_slice("crops")[start:stop]
        matrices = f.get_slice("matrices")[start:stop]
    return np.asarray(crops), np.asarray(matrices)


def split_entries(index: dict, split: str | None) -> list[dict]:
    if split in (None, "all"):
        return list(index["clips"])
    if split not in ("train", "val"):
        raise LmdiffInputError(f"split must be 'train', 'val' or 'all', got {split!r}")
    return [e for e in index["clips"] if e["split"] == split]


def window_starts(n_frames: int, window: int, stride: int) -> np.ndarray:
    """Start frames of the windows of a clip: 0, stride, 2 * stride, ... while a whole window fits."""
    if n_frames < window:
        return np.zeros(0, dtype=np.int64)
    return np.arange(0, n_frames - window + 1, stride, dtype=np.int64)

