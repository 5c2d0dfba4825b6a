"""Training data for A2L (audio -> canonical landmarks) and L2V (landmarks -> video): `lmdiff prepare`.

`prepare_dataset(sources, out_dir, landmarker_factory)` turns talking-head videos into a dataset folder::

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

Readers: `load_index`, `clip_arrays`, `clip_sequence`, `load_crops`, `A2LWindowDataset` (windows for the A2L trainer)
and `dataset_motion_stats` (head-motion and blink statistics for the pose/blink generator).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .atomic import atomic_write
from .errors import LmdiffInputError

FORMAT = "lmdiff-dataset"
FORMAT_VERSION = 1
SAMPLE_RATE = 16000
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
AUDIO_SIDECAR_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a")
CLIPS_FOLDER = "clips"
INDEX_NAME = "index.json"
REPORT_NAME = "report.json"
CROP_BATCH = 32
MAX_AUDIO_SHORTFALL = 0.25  # seconds of missing speech at the end tolerated (padded with silence)
MAX_ID_LENGTH = 120

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
EYE_BLINK_LEFT = BLENDSHAPE_NAMES.index("eyeBlinkLeft")  # 9
EYE_BLINK_RIGHT = BLENDSHAPE_NAMES.index("eyeBlinkRight")  # 10
BLINK_THRESHOLD = 0.5  # mean of eyeBlinkLeft and eyeBlinkRight above this: eyes (more than half) closed
BLINK_MERGE_FRAMES = 1  # closed runs this many frames apart or less are one blink (score flicker at the threshold)
BLINK_MAX_SECONDS = 1.0  # a longer closure is not a blink (eyes shut, or looking down), counted apart

# Failure reasons in report.json.
REASONS = {
    "unreadable": "not a readable video",
    "too_short": "shorter than min_seconds",
    "no_audio": "no audio track and no audio file beside it",
    "audio_too_short": "the audio ends well before the video",
    "no_face": "no face in any frame",
    "face_gaps": "the face is missing for longer than max_gap frames",
    "error": "unexpected error (see message and traceback)",
}


# ======================================================================================================================
# small file helpers
# ======================================================================================================================
def _write_json(path: Path, data) -> None:
    """Write JSON atomically (temporary file + os.replace)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")


def _save_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """`safetensors.numpy.save_file`, atomically."""
    from safetensors.numpy import save_file

    with atomic_write(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)


_ST_DTYPES = {np.dtype("uint8"): "U8", np.dtype("float32"): "F32", np.dtype("float64"): "F64"}


def _stream_safetensors(
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
# sources, ids, split
# ======================================================================================================================
@dataclass(frozen=True)
class SourceClip:
    """One video found among the sources: its path, its dataset id and its path relative to the source given."""

    path: Path
    clip_id: str
    relative: str


def _sanitize(text: str) -> str:
    text = text.replace("\\", "/")
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip("._") or "_" for p in text.split("/") if p not in ("", ".")]
    name = "__".join(parts) or "clip"
    if len(name) > MAX_ID_LENGTH:
        name = f"{name[: MAX_ID_LENGTH - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def find_videos(sources: Sequence[str | os.PathLike] | str | os.PathLike) -> list[SourceClip]:
    """The videos of `sources` (files, or folders searched recursively for .mp4/.mov/.mkv/.webm) with their ids.

    A clip's id is its path relative to the source it came from, made filesystem-safe: a file given directly is its
    stem (``talk.mp4`` -> ``talk``); a file found in a folder keeps the folder's name and the sub-folders
    (``data/clips`` holding ``a/talk.mp4`` -> ``clips__a__talk``). Ids are stable across runs for the same sources;
    when two different files would share an id, their extension is added, and then a hash of their path. A file
    reached twice is listed once. Missing sources raise LmdiffInputError.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for source in sources:
        src = Path(source).expanduser()
        if not src.exists():
            raise LmdiffInputError(f"source {src} does not exist; expected a video file or a folder of videos")
        if src.is_dir():
            base = src.resolve()
            files = sorted(
                p for p in base.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
            )  # sorted: a stable order
            pairs = [(p.resolve(), f"{base.name}/{p.relative_to(base).as_posix()}") for p in files]
        else:
            pairs = [(src.resolve(), src.name)]
        for path, rel in pairs:
            if path not in seen:
                seen.add(path)
                found.append((path, rel))
    ids = {}
    for path, rel in found:
        ids[path] = _sanitize(str(Path(rel).with_suffix("")))
    for round_ in (1, 2):
        groups: dict[str, list[Path]] = {}
        for path, cid in ids.items():
            groups.setdefault(cid, []).append(path)
        for cid, paths in groups.items():
            if len(paths) > 1:
                for p in paths:
                    if round_ == 1:
                        ids[p] = _sanitize(f"{cid}_{p.suffix.lstrip('.')}")
                    else:
                        ids[p] = f"{cid}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
    return [SourceClip(path, ids[path], rel) for path, rel in found]


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) for a string: the first 8 bytes of its SHA-1."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_split(clip_id: str, val_fraction: float, val_clips: Iterable[str] = (), key: str | None = None) -> str:
    """ "val" when `clip_id` is in `val_clips` or the SHA-1 of `key` (default the clip id) maps below `val_fraction`,
    else "train": independent of the order of clips and of which other clips exist."""
    if clip_id in set(val_clips):
        return "val"
    return "val" if hash_fraction(clip_id if key is None else key) < val_fraction else "train"


# ======================================================================================================================
# prepare
# ======================================================================================================================
@dataclass
class FailedClip:
    source: str
    clip_id: str
    reason: str  # a key of REASONS
    message: str
    traceback: str | None = None


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: clip ids done now, already complete (skipped), and failures with reasons."""

    out_dir: str
    done: list[str] = field(default_factory=list)
    skipped_existing: list[str] = field(default_factory=list)
    failed: list[FailedClip] = field(default_factory=list)
    seconds: float = 0.0
    clip_seconds: dict[str, float] = field(default_factory=dict)  # processing time per clip done
    unmatched_val_clips: list[str] = field(default_factory=list)
    interrupted: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.out_dir}: {len(self.done)} clips prepared, {len(self.skipped_existing)} already there, "
            f"{len(self.failed)} failed ({self.seconds:.1f} s)" + (" - interrupted" if self.interrupted else "")
        ]
        lines += [f"  failed {f.source}: {f.reason}: {f.message}" for f in self.failed]
        if self.unmatched_val_clips:
            lines.append(f"  val_clips that match no clip: {', '.join(self.unmatched_val_clips)}")
        return "\n".join(lines)


class _ClipFailure(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class _SettingsError(LmdiffInputError):
    """The run's settings do not fit the dataset folder: fatal, not a per-clip failure."""


class _DecodeError(Exception):
    """A decoding error from inside extract_landmarks' frame loop (told apart from 'no face')."""


def _frames_checked(frames: Iterable[np.ndarray]):
    try:
        yield from frames
    except LmdiffInputError as exc:
        raise _DecodeError(str(exc)) from None


def _signature(path: Path | None) -> list | None:
    if path is None:
        return None
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _find_audio(video: Path, has_track: bool, audio: str) -> Path | None:
    """The file to read the clip's speech from: a same-stem audio file beside the video (audio="auto"), else the
    video's own track, else None."""
    if audio not in ("auto", "video"):
        raise LmdiffInputError(
            f"audio must be 'auto' (an audio file beside the video, else its track) or 'video', got {audio!r}"
        )
    if audio == "auto":
        for suffix in AUDIO_SIDECAR_SUFFIXES:
            for candidate in (video.with_suffix(suffix), video.with_suffix(suffix.upper())):
                if candidate.is_file():
                    return candidate
    return video if has_track else None


def _speaker_label(clip: SourceClip, speaker) -> str:
    if speaker is None or speaker == "stem":
        return clip.path.stem
    if speaker == "parent":
        return clip.path.parent.name
    if callable(speaker):
        return str(speaker(clip.path))
    raise LmdiffInputError(f"speaker must be 'stem', 'parent' or a function of the path, got {speaker!r}")


def _load_extractor(features, fps: float):
    """The audio feature extractor of `features` (see `audio_features.load_feature_extractor`), at the dataset's fps."""
    if features is not None and callable(features) and hasattr(features, "config"):
        extractor = features
    else:
        from .audio_features import load_feature_extractor

        if features is None or (isinstance(features, str) and features.strip().lower() == "logmel"):
            extractor = load_feature_extractor(features, fps=fps)
        else:
            extractor = load_feature_extractor(features)
    if abs(float(getattr(extractor, "fps", fps)) - fps) > 1e-9:
        raise LmdiffInputError(
            f"the audio features are made for {extractor.fps:g} fps but the dataset is prepared at {fps:g} fps"
        )
    return extractor


def _normalized(obj):
    return json.loads(json.dumps(obj))


def _clip_files(clips_dir: Path, clip_id: str) -> dict[str, Path]:
    return {
        "a2l": clips_dir / f"{clip_id}.a2l.safetensors",
        "crops": clips_dir / f"{clip_id}.crops.safetensors",
        "sidecar": clips_dir / f"{clip_id}.json",
    }


def _read_sidecar(path: Path) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") is True else None


def _complete_entries(out_dir: Path) -> dict[str, dict]:
    """Sidecars of the clips complete on disk (sidecar present and all its files there), by id."""
    entries = {}
    clips_dir = out_dir / CLIPS_FOLDER
    if not clips_dir.is_dir():
        return entries
    for path in sorted(clips_dir.glob("*.json")):
        data = _read_sidecar(path)
        if data is None or "id" not in data:
            continue
        if all((out_dir / rel).is_file() for rel in data.get("files", {}).values() if rel):
            entries[data["id"]] = data
    return entries


_PUBLIC_KEYS = (
    "id",
    "source",
    "audio_source",
    "n_frames",
    "duration",
    "split",
    "files",
    "speaker",
    "face_rate",
    "image_size",
    "topology",
)


def _settings(fps, extractor, crop_size, topology) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fps": float(fps),
        "sample_rate": SAMPLE_RATE,
        "features": _normalized(extractor.config()),
        "crop_size": int(crop_size),
        "topology": topology,
    }


def _check_settings(existing: dict, wanted: dict, out_dir: Path) -> None:
    for key in ("format", "format_version", "fps", "sample_rate", "features", "crop_size", "smoothing"):
        if key in existing and existing[key] != wanted[key]:
            raise LmdiffInputError(
                f"dataset {out_dir} was prepared with {key}={json.dumps(existing[key])}, this run asks for "
                f"{key}={json.dumps(wanted[key])}: use another output folder (or the same settings)"
            )


def prepare_dataset(
    sources,
    out_dir,
    landmarker_factory: Callable[[], object],
    features=None,
    crop_size: int = 256,
    val_fraction: float = 0.1,
    min_seconds: float = 2.0,
    fps: float = 25.0,
    progress: Callable[[int, int, str, str], None] | None = None,
    val_clips: Sequence[str] = (),
    max_gap: int = 12,
    face="largest",
    smooth: str | bool = "canonical",
    audio: str = "auto",
    speaker="stem",
    split_by: str = "clip",
) -> PrepareReport:
    """Prepare an A2L / L2V training set from talking-head videos (what `lmdiff prepare SRC... -o DIR` runs).

    sources: video files or folders (searched recursively for .mp4/.mov/.mkv/.webm); ids as in `find_videos`.
    landmarker_factory(): a fresh video-mode `Landmarker` per clip (trackers need increasing timestamps per clip).
    features: the audio feature extractor (`audio_features.load_feature_extractor` spec: None = log-mel, a name, a
        dict or a path; or an extractor object).
    crop_size: side of the stored face crops (0: no crops). val_fraction / val_clips / split_by: the split (see
        `assign_split`; val_clips are clip ids, source paths or file stems; split_by="speaker" hashes the speaker
        label instead of the clip id so that a speaker's clips stay together). min_seconds: shorter clips are
        skipped. audio: "auto" reads a same-stem .wav/.flac/.mp3/.m4a beside the video when there is one, else the
        video's own audio track; "video" only the track. speaker: the identity label, "stem" (default), "parent"
        (the folder's name) or a function of the path. progress(i, n, clip_id, status) is called before each clip
        (status "start") and after it ("done", "skipped", "failed"). smooth: see `smooth_clip` ("canonical", the
        default; "image", the CLI's order; "none"). max_gap, face: as in `detectors.extract_landmarks`.

    Resumable: a clip whose sidecar (written last) and files exist, from the same unchanged source, is skipped; an
    interruption (KeyboardInterrupt) leaves no partial file and index.json lists exactly the complete clips. Clips that
    cannot be used are listed in report.json with a reason (see `REASONS`) and the run goes on. A dataset folder
    keeps the clips of earlier runs; prepare with other fps, features or crop size into a new folder.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise LmdiffInputError(f"dataset folder {out_dir} is a file; expected a folder (new or from lmdiff prepare)")
    if (
        isinstance(crop_size, bool)
        or not isinstance(crop_size, (int, np.integer))
        or (0 < crop_size < 8)
        or crop_size < 0
    ):
        raise LmdiffInputError(f"crop_size must be 0 (no crops) or an integer of at least 8, got {crop_size!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 <= val_fraction <= 1.0):
        raise LmdiffInputError(f"val_fraction must be between 0 and 1, got {val_fraction!r}")
    if split_by not in ("clip", "speaker"):
        raise LmdiffInputError(f"split_by must be 'clip' or 'speaker', got {split_by!r}")
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise LmdiffInputError(f"fps must be a positive number, got {fps!r}")
    if isinstance(val_clips, str):
        val_clips = [val_clips]
    val_clips = [str(v) for v in val_clips]
    smooth = _smooth_mode(smooth)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    clips = find_videos(sources)
    if not clips:
        raise LmdiffInputError(
            f"no video files ({', '.join(VIDEO_SUFFIXES)}) in {', '.join(str(s) for s in sources) or 'no sources'}"
        )
    extractor = _load_extractor(features, float(fps))
    settings = _settings(fps, extractor, crop_size, None)
    settings["smoothing"] = smooth

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out_dir)
    try:
        clips_dir = out_dir / CLIPS_FOLDER
        clips_dir.mkdir(exist_ok=True)
        index_path = out_dir / INDEX_NAME
        existing_index = None
        if index_path.exists():
            existing_index = _read_index_file(index_path)
            _check_settings(existing_index, settings, out_dir)
            settings["topology"] = existing_index.get("topology")
        # temporary files of a run that was killed (the lock says no other run is writing here)
        for stale in [
            *clips_dir.glob(".*.tmp"),
            *out_dir.glob(f".{INDEX_NAME}.*.tmp"),
            *out_dir.glob(f".{REPORT_NAME}.*.tmp"),
        ]:
            stale.unlink(missing_ok=True)
        entries = _complete_entries(out_dir)
        for entry in entries.values():
            settings["topology"] = settings["topology"] or entry.get("topology")

        report = PrepareReport(out_dir=str(out_dir))
        # each val_clips item matches a clip id, a file stem or a source path (as given or resolved)
        val_names = {
            v: {v} | ({str(Path(v).expanduser().resolve())} if Path(v).expanduser().exists() else set())
            for v in val_clips
        }
        val_set = set().union(*val_names.values()) if val_names else set()

        def names_of(entry: dict) -> set[str]:
            return {entry["id"], entry.get("source", ""), Path(entry.get("source", "")).stem}

        def split_of(entry: dict) -> str:
            if names_of(entry) & val_set:
                return "val"
            key = entry["id"] if split_by == "clip" else f"speaker:{entry.get('speaker', entry['id'])}"
            return assign_split(entry["id"], val_fraction, (), key=key)

        def write_index() -> None:
            listed = []
            for cid in sorted(entries):
                e = {k: entries[cid].get(k) for k in _PUBLIC_KEYS}
                e["split"] = split_of(entries[cid])
                listed.append(e)
            index = dict(settings)
            index.update(
                val_fraction=float(val_fraction),
                val_clips=list(val_clips),
                split_by=split_by,
                blendshape_names=list(BLENDSHAPE_NAMES)
                if any(e.get("has_blendshapes") for e in entries.values())
                else None,
                n_clips=len(listed),
                n_frames=int(sum(e["n_frames"] for e in listed)),
                clips=listed,
            )
            _write_json(index_path, index)

        def write_report() -> None:
            report.seconds = round(time.perf_counter() - started, 3)
            _write_json(out_dir / REPORT_NAME, report.to_dict())

        try:
            write_index()
            for i, clip in enumerate(clips):
                files = _clip_files(clips_dir, clip.clip_id)
                sidecar = entries.get(clip.clip_id)
                if progress is not None:
                    progress(i, len(clips), clip.clip_id, "start")
                if sidecar is not None and _is_current(sidecar, clip, audio):
                    report.skipped_existing.append(clip.clip_id)
                    if progress is not None:
                        progress(i + 1, len(clips), clip.clip_id, "skipped")
                    continue
                # Not complete, or from another (or changed) source: start this clip afresh.
                entries.pop(clip.clip_id, None)
                for path in files.values():
                    path.unlink(missing_ok=True)
                clip_started = time.perf_counter()
                try:
                    entry = _prepare_clip(
                        clip,
                        out_dir,
                        files,
                        landmarker_factory,
                        extractor,
                        settings,
                        crop_size=int(crop_size),
                        min_seconds=min_seconds,
                        fps=float(fps),
                        max_gap=max_gap,
                        face=face,
                        smooth=smooth,
                        audio=audio,
                        speaker=_speaker_label(clip, speaker),
                    )
                except _ClipFailure as exc:
                    report.failed.append(FailedClip(str(clip.path), clip.clip_id, exc.reason, exc.message))
                    status = "failed"
                except _SettingsError:
                    raise
                except Exception as exc:  # an unexpected error on one clip must not end a long run
                    report.failed.append(
                        FailedClip(
                            str(clip.path),
                            clip.clip_id,
                            "error",
                            f"{exc.__class__.__name__}: {exc}",
                            traceback.format_exc(),
                        )
                    )
                    status = "failed"
                else:
                    entries[clip.clip_id] = entry
                    settings["topology"] = settings["topology"] or entry["topology"]
                    report.done.append(clip.clip_id)
                    report.clip_seconds[clip.clip_id] = round(time.perf_counter() - clip_started, 3)
                    write_index()
                    status = "done"
                if progress is not None:
                    progress(i + 1, len(clips), clip.clip_id, status)
            matched = set().union(*(names_of(e) for e in entries.values())) if entries else set()
            report.unmatched_val_clips = sorted(v for v, names in val_names.items() if not names & matched)
            write_index()
        except KeyboardInterrupt:
            report.interrupted = True
            raise
        finally:
            write_report()
        return report
    finally:
        _unlock_folder(lock)


def _is_current(sidecar: dict, clip: SourceClip, audio_mode: str) -> bool:
    """The stored clip came from this file and the same audio file, unchanged since (path, size, mtime)."""
    sig = sidecar.get("signature") or {}
    try:
        if sig.get("video") != _signature(clip.path):
            return False
        audio = sig.get("audio")
        if audio is None or str(_find_audio(clip.path, True, audio_mode)) != audio[0]:
            return False  # e.g. a .wav was put beside the video since
        return audio == _signature(Path(audio[0]))
    except OSError:
        return False


LOCK_NAME = ".prepare.lock"


def _lock_folder(out_dir: Path):
    """An exclusive lock on the dataset folder for this run (where the platform has fcntl; released on exit)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        return None
    handle = open(out_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise LmdiffInputError(f"another `lmdiff prepare` is writing to {out_dir}; wait for it or use another folder")
    return handle


def _unlock_folder(handle) -> None:
    if handle is not None:
        handle.close()  # closing releases the flock


SMOOTHING_MODES = ("canonical", "image", "none")
POSE_MIN_CUTOFF = 1.0  # Hz
POSE_BETA = 3.0  # 1 / (radians or inter-ocular distances per second)


def _smooth_mode(smooth) -> str:
    if smooth is True:
        return "canonical"
    if smooth is False or smooth is None:
        return "none"
    if smooth not in SMOOTHING_MODES:
        raise LmdiffInputError(f"smooth must be one of {SMOOTHING_MODES} (or True / False), got {smooth!r}")
    return smooth


def smooth_pose(
    pose: np.ndarray, fps: float, min_cutoff: float = POSE_MIN_CUTOFF, beta: float = POSE_BETA
) -> np.ndarray:
    """Zero-phase One Euro smoothing of per-frame head poses [T, 4, 4] (canonical -> image similarities).

    The filtered quantities are the rotation (rotation vector, radians), the image position of the canonical eye
    midpoint (in inter-ocular distances) and the log scale, so rotation and position cannot drift apart. The One Euro
    cutoff rises with speed, so detector jitter goes while nods and turns pass with little lag.
    """
    from scipy.spatial.transform import Rotation

    from .canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR
    from .smoothing import zero_phase_one_euro

    pose = np.asarray(pose, dtype=np.float64)
    if len(pose) < 3:
        return pose.copy()
    linear = pose[:, :3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    rotvec = Rotation.from_matrix(linear / scale[:, None, None]).as_rotvec()
    eye_mid = np.array([*CANONICAL_EYE_MID, 0.0])
    centre = np.einsum("tij,j->ti", linear, eye_mid) + pose[:, :3, 3]
    unit = float(np.median(scale)) * CANONICAL_INTER_OCULAR  # frame px per inter-ocular distance
    values = np.concatenate([rotvec, centre / unit, np.log(scale)[:, None]], axis=1)
    out = zero_phase_one_euro(values, fps, min_cutoff=min_cutoff, beta=beta)
    s = np.exp(out[:, 6])
    linear = Rotation.from_rotvec(out[:, :3]).as_matrix() * s[:, None, None]
    smoothed = np.zeros_like(pose)
    smoothed[:, :3, :3] = linear
    smoothed[:, :3, 3] = out[:, 3:6] * unit - np.einsum("tij,j->ti", linear, eye_mid)
    smoothed[:, 3, 3] = 1.0
    return smoothed


def smooth_clip(seq, mode: str = "canonical"):
    """Canonical landmarks with pose of an image-space `LandmarkSequence`, smoothed in time.

    "canonical" (the dataset default): canonicalise the detections, then smooth the pose-free landmarks
    (`smoothing.smooth_landmarks`) and the pose (`smooth_pose`) separately. "image": smooth the image-space landmarks
    and canonicalise them (the `lmdiff landmarks` order); its lip and eye points follow the head faster than the rest,
    so fast head motion leaks into the canonical mouth (measured on the real clips: mouth centre shifted by 0.01 to
    0.06 inter-ocular distances on average and up to 0.25 in fast nods, against 0.005 in the canonical order).
    "none": canonicalise the detections as they are.
    """
    from .canonical import canonicalize
    from .smoothing import smooth_landmarks

    mode = _smooth_mode(mode)
    if mode == "image":
        return canonicalize(smooth_landmarks(seq))
    canonical = canonicalize(seq)
    if mode == "none":
        return canonical
    return smooth_landmarks(canonical).replace(pose=smooth_pose(canonical.pose, seq.fps))


def _prepare_clip(clip: SourceClip, out_dir: Path, files: dict[str, Path], *args, **kwargs) -> dict:
    """Process one clip and write its files (`_prepare_clip_inner`); any failure or interruption removes what it wrote."""
    try:
        return _prepare_clip_inner(clip, out_dir, files, *args, **kwargs)
    except BaseException:
        for path in files.values():
            path.unlink(missing_ok=True)
        raise


def _prepare_clip_inner(
    clip,
    out_dir,
    files,
    landmarker_factory,
    extractor,
    settings,
    crop_size,
    min_seconds,
    fps,
    max_gap,
    face,
    smooth,
    audio,
    speaker,
) -> dict:
    from .canonical import uncanonicalize
    from .detectors import extract_landmarks
    from .media import fit_audio_to_frames, frame_count, iter_frames, probe_video, read_audio

    # -- cheap checks first: readable, long enough, has speech ---------------------------------------------------------
    try:
        info = probe_video(clip.path)
    except LmdiffInputError as exc:
        raise _ClipFailure("unreadable", str(exc)) from None
    if info.duration < min_seconds:
        raise _ClipFailure("too_short", f"{info.duration:.2f} s long, shorter than min_seconds={min_seconds:g}")
    audio_path = _find_audio(clip.path, info.has_audio, audio)
    if audio_path is None:
        raise _ClipFailure("no_audio", f"{clip.path} has no audio track and no same-stem audio file beside it")
    n_frames = frame_count(info.duration, fps)
    try:
        speech = read_audio(audio_path, SAMPLE_RATE)
    except LmdiffInputError as exc:
        raise _ClipFailure("no_audio", str(exc)) from None
    needed = round(n_frames / fps * SAMPLE_RATE)
    if len(speech) < needed - MAX_AUDIO_SHORTFALL * SAMPLE_RATE:
        raise _ClipFailure(
            "audio_too_short",
            f"the audio of {audio_path} lasts {len(speech) / SAMPLE_RATE:.2f} s, the video {n_frames / fps:.2f} s",
        )
    speech = fit_audio_to_frames(speech, n_frames, fps, SAMPLE_RATE)

    # -- landmarks ------------------------------------------------------------------------------------------------------
    landmarker = landmarker_factory()
    try:
        topology = landmarker.topology
        if settings.get("topology") and topology != settings["topology"]:
            raise _SettingsError(
                f"the detector gives {topology} landmarks but the dataset holds {settings['topology']}: "
                "use the same detector, or another output folder"
            )
        try:
            seq = extract_landmarks(
                _frames_checked(iter_frames(clip.path, fps, max_frames=n_frames)),
                landmarker,
                fps,
                face=face,
                max_gap=max_gap,
                source=str(clip.path),
            )
        except _DecodeError as exc:
            raise _ClipFailure("unreadable", str(exc)) from None
        except LmdiffInputError as exc:
            reason = "face_gaps" if "cannot be filled" in str(exc) else "no_face"
            raise _ClipFailure(reason, str(exc)) from None
    finally:
        close = getattr(landmarker, "close", None)
        if close is not None:
            close()
    if len(seq) != n_frames:
        raise _ClipFailure("unreadable", f"decoded {len(seq)} frames, expected {n_frames}")
    face_rate = float(1.0 - seq.interpolated.mean())  # before gap filling every frame was detected or not
    canonical = smooth_clip(seq, smooth)
    seq = uncanonicalize(canonical)  # the image-space landmarks the stored arrays stand for (crops follow them)

    # -- audio features -------------------------------------------------------------------------------------------------
    feats = np.asarray(extractor(speech, n_frames), dtype=np.float32)
    if feats.ndim != 4 or feats.shape[0] != n_frames:
        raise RuntimeError(f"the feature extractor returned shape {feats.shape}, expected [{n_frames}, k, L, D]")

    # -- crops (second decoding pass, streamed) -------------------------------------------------------------------------
    rel = {"a2l": f"{CLIPS_FOLDER}/{files['a2l'].name}", "crops": None}
    if crop_size:
        _write_crops(files["crops"], clip, seq, crop_size, fps, n_frames)
        rel["crops"] = f"{CLIPS_FOLDER}/{files['crops'].name}"

    # -- A2L arrays -----------------------------------------------------------------------------------------------------
    arrays = {
        "points": canonical.points.astype(np.float32),
        "pose": canonical.pose.astype(np.float32),
        "valid": canonical.valid.astype(bool),
        "interpolated": canonical.interpolated.astype(bool),
        "features": feats,
        "audio": np.round(speech * 32767.0).astype(np.int16),
    }
    if canonical.blendshapes is not None:
        arrays["blendshapes"] = canonical.blendshapes.astype(np.float32)
    metadata = {
        "format_version": str(FORMAT_VERSION),
        "clip_id": clip.clip_id,
        "fps": repr(float(fps)),
        "topology": topology,
        "image_size": f"{info.width},{info.height}",
        "sample_rate": str(SAMPLE_RATE),
        "features": json.dumps(settings["features"]),
    }
    _save_safetensors(files["a2l"], arrays, metadata)

    entry = {
        "id": clip.clip_id,
        "source": str(clip.path),
        "audio_source": str(audio_path),
        "n_frames": int(n_frames),
        "duration": float(info.duration),
        "files": rel,
        "speaker": speaker,
        "face_rate": round(face_rate, 6),
        "image_size": [int(info.width), int(info.height)],
        "topology": topology,
        "has_blendshapes": canonical.blendshapes is not None,
        "feature_shape": list(feats.shape[1:]),
        "complete": True,
        "format_version": FORMAT_VERSION,
        "signature": {"video": _signature(clip.path), "audio": _signature(audio_path)},
    }
    _write_json(files["sidecar"], entry)  # last: marks the clip complete
    return entry


def _write_crops(path: Path, clip: SourceClip, seq, crop_size: int, fps: float, n_frames: int) -> None:
    import torch

    from .crop import compute_crop_track, crop_frames
    from .media import iter_frames

    track = compute_crop_track(seq, size=crop_size)

    def batches():
        frames = iter_frames(clip.path, fps, max_frames=n_frames)
        start = 0
        while True:
            batch = []
            for frame in frames:
                batch.append(frame)
                if len(batch) == CROP_BATCH:
                    break
            if not batch:
                return
            idx = np.arange(start, start + len(batch))
            with torch.no_grad():
                crops = crop_frames(np.stack(batch), track, idx)
            yield crops.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).numpy()
            start += len(batch)

    metadata = {
        "format_version": str(FORMAT_VERSION),
        "clip_id": clip.clip_id,
        "size": str(crop_size),
        "frame_size": f"{track.frame_size[0]},{track.frame_size[1]}",
        "fps": repr(float(fps)),
    }
    _stream_safetensors(
        path,
        {"matrices": track.matrices.astype(np.float64)},
        "crops",
        np.uint8,
        (n_frames, 3, crop_size, crop_size),
        batches(),
        metadata,
    )


# ======================================================================================================================
# readers
# ======================================================================================================================
def _read_index_file(path: Path) -> dict:
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
    return _read_index_file(path)


def _entry(index: dict, dataset_dir: Path, clip_id: str) -> dict:
    for e in index["clips"]:
        if e["id"] == clip_id:
            return e
    raise LmdiffInputError(f"dataset {dataset_dir} has no clip {clip_id!r}")


def _open_safetensors(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        raise LmdiffInputError(f"dataset file {path} is missing; run `lmdiff prepare` again to complete the dataset")
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as exc:
        raise LmdiffInputError(f"{path} is not a readable safetensors file ({exc})") from None


def _read_a2l(path: Path, keys: Sequence[str] | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    with _open_safetensors(path) as f:
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
    entry = _entry(index, folder, clip_id)
    arrays, meta = _read_a2l(folder / entry["files"]["a2l"])
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


def clip_sequence(dataset_dir, clip_id: str):
    """The clip's canonical landmarks as a `LandmarkSequence` (with pose, image_size, flags and blendshapes)."""
    from .canonical import CANONICAL_SIZE
    from .landmarks import LandmarkSequence

    a = clip_arrays(dataset_dir, clip_id)
    return LandmarkSequence(
        points=a["points"],
        topology=a["topology"],
        fps=a["fps"],
        frame_size=CANONICAL_SIZE,
        valid=a["valid"],
        interpolated=a["interpolated"],
        blendshapes=a.get("blendshapes"),
        pose=a["pose"].astype(np.float64),
        space="canonical",
        image_size=a["image_size"],
    )


def load_crops(dataset_dir, clip_id: str, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 [n, 3, S, S] and their frame -> crop matrices [n, 2, 3] for frames start..stop-1, read from
    disk without loading the rest of the clip."""
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    entry = _entry(index, folder, clip_id)
    rel = entry["files"].get("crops")
    if not rel:
        raise LmdiffInputError(f"dataset {folder} was prepared without crops (crop_size 0)")
    with _open_safetensors(folder / rel) as f:
        crops = f.get_slice("crops")[start:stop]
        matrices = f.get_slice("matrices")[start:stop]
    return np.asarray(crops), np.asarray(matrices)


def _split_entries(index: dict, split: str | None) -> list[dict]:
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


try:  # a Dataset subclass when torch is there (it is a dependency; the guard keeps the readers importable alone)
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


class A2LWindowDataset(_TorchDataset):
    """Fixed-length windows of a prepared dataset for the A2L trainer.

    Loads the `.a2l.safetensors` of the clips in `split` ("train", "val" or "all"; never the crops), converts the
    canonical points to `topology` (None keeps the stored one) and to model units (`canonical.to_model_units`). Windows
    start at 0, stride, 2 * stride, ... (stride default window // 2) while a whole window fits; clips shorter than one
    window are left out and listed in `.skipped` (with a warning). A sample is a dict of torch tensors:

    - ``audio`` [W, k, L, D] float32: features of the window's frames;
    - ``landmarks`` [W, N, 3] float32: the target;
    - ``prev`` [P, N, 3] and ``prev_mask`` [P] bool: the P frames before the window; before the clip's start the first
      frame is repeated with mask False;
    - ``reference`` [N, 3]: the clip's first detected frame ("first"), or a random detected frame of the clip outside
      the window when it has one ("random"; seeded by (seed, epoch, index): the same frame for an index within an
      epoch, another one each epoch, see `set_epoch`);
    - ``detected`` [W] bool: frames with a detected (not gap-filled) face, for masking the loss;
    - ``clip_id`` str and ``start`` int.
    """

    def __init__(
        self,
        dataset_dir,
        split: str | None = "train",
        window: int = 32,
        prev_frames: int = 8,
        topology: str | None = "ibug68",
        reference: str = "first",
        seed: int = 0,
        stride: int | None = None,
    ):
        from .canonical import to_model_units
        from .topology import convert_points, get_topology

        if reference not in ("first", "random"):
            raise LmdiffInputError(f"reference must be 'first' or 'random', got {reference!r}")
        if not (isinstance(window, (int, np.integer)) and window >= 1):
            raise LmdiffInputError(f"window must be a positive number of frames, got {window!r}")
        if not (isinstance(prev_frames, (int, np.integer)) and prev_frames >= 0):
            raise LmdiffInputError(f"prev_frames must be zero or a positive number of frames, got {prev_frames!r}")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.index = load_index(self.dataset_dir)
        self.window = int(window)
        self.prev_frames = int(prev_frames)
        self.stride = max(1, self.window // 2) if stride is None else int(stride)
        if self.stride < 1:
            raise LmdiffInputError(f"stride must be at least 1, got {stride!r}")
        self.reference = reference
        self.seed = int(seed)
        self.epoch = 0
        stored = self.index.get("topology")
        self.topology = stored if topology is None else get_topology(topology).name
        self.fps = float(self.index["fps"])
        self.split = split
        self.clip_ids: list[str] = []
        self.skipped: list[tuple[str, int]] = []  # (clip id, n_frames) of clips shorter than a window
        self._points: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self._detected: list[np.ndarray] = []
        clip_index, starts = [], []
        entries = _split_entries(self.index, split)
        for entry in entries:
            if entry["n_frames"] < self.window:
                self.skipped.append((entry["id"], int(entry["n_frames"])))
                continue
            arrays, meta = _read_a2l(
                self.dataset_dir / entry["files"]["a2l"], ("points", "features", "interpolated", "valid")
            )
            source_topology = meta.get("topology", stored)
            points = to_model_units(convert_points(arrays["points"], source_topology, self.topology))
            c = len(self.clip_ids)
            self.clip_ids.append(entry["id"])
            self._points.append(np.ascontiguousarray(points, dtype=np.float32))
            self._features.append(np.ascontiguousarray(arrays["features"], dtype=np.float32))
            self._detected.append(arrays["valid"] & ~arrays["interpolated"])
            s = window_starts(len(points), self.window, self.stride)
            clip_index.append(np.full(len(s), c, dtype=np.int64))
            starts.append(s)
        if self.skipped:
            warnings.warn(
                f"A2LWindowDataset: {len(self.skipped)} clip(s) of split {split!r} are shorter than the window of "
                f"{self.window} frames and are left out: " + ", ".join(f"{c} ({n})" for c, n in self.skipped[:10]),
                stacklevel=2,
            )
        self._clip = np.concatenate(clip_index) if clip_index else np.zeros(0, dtype=np.int64)
        self._start = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        if len(self._clip) == 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} has no window of {self.window} frames in split {split!r} "
                f"({len(entries)} clip(s) in the split, {len(self.skipped)} shorter than the window)"
            )

    def __len__(self) -> int:
        return len(self._clip)

    @property
    def windows(self) -> list[tuple[str, int]]:
        """(clip id, start) of every window, in index order."""
        return [(self.clip_ids[c], int(s)) for c, s in zip(self._clip, self._start)]

    def _reference_frame(self, c: int, start: int, index: int) -> int:
        detected = np.flatnonzero(self._detected[c])
        if len(detected) == 0:
            detected = np.arange(len(self._points[c]))
        if self.reference == "first":
            return int(detected[0])
        outside = detected[(detected < start) | (detected >= start + self.window)]
        pool = outside if len(outside) else detected
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(pool[rng.integers(len(pool))])

    def set_epoch(self, epoch: int) -> None:
        """Draw other random references from now on (the trainer calls this every epoch; reproducible per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} is out of range for a dataset of {len(self)} windows")
        index = int(index) % len(self)
        c, start = int(self._clip[index]), int(self._start[index])
        points = self._points[c]
        end = start + self.window
        prev_idx = np.arange(start - self.prev_frames, start)
        prev_mask = prev_idx >= 0
        prev = points[np.maximum(prev_idx, 0)]
        ref = self._reference_frame(c, start, index)
        return {
            "audio": torch.from_numpy(self._features[c][start:end].copy()),
            "landmarks": torch.from_numpy(points[start:end].copy()),
            "prev": torch.from_numpy(prev.copy()),
            "prev_mask": torch.from_numpy(prev_mask),
            "reference": torch.from_numpy(points[ref].copy()),
            "detected": torch.from_numpy(self._detected[c][start:end].copy()),
            "clip_id": self.clip_ids[c],
            "start": start,
        }


# ======================================================================================================================
# motion statistics
# ======================================================================================================================
def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    padded = np.concatenate([[False], np.asarray(mask, bool), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _time_scale(values: np.ndarray, fps: float) -> float:
    """Seconds until the autocorrelation of a signal falls below 1/e (a Gaussian-smoothed noise of sigma s frames
    gives 2 s, the `time_scale * fps` of `motion.generate_head_motion`); nan for a constant signal."""
    x = np.asarray(values, dtype=np.float64) - np.mean(values)
    energy = float(np.dot(x, x))
    if len(x) < 3 or energy <= 1e-12:
        return float("nan")
    for lag in range(1, len(x)):
        if np.dot(x[:-lag], x[lag:]) / energy < math.exp(-1.0):
            return lag / fps
    return len(x) / fps


def blink_runs(
    blendshapes: np.ndarray,
    fps: float,
    threshold: float = BLINK_THRESHOLD,
    merge_frames: int = BLINK_MERGE_FRAMES,
    max_seconds: float = BLINK_MAX_SECONDS,
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(blinks, long closures): runs (start, end exclusive) of frames where the mean of the eyeBlinkLeft (9) and
    eyeBlinkRight (10) blendshapes exceeds `threshold`. Runs at most `merge_frames` apart are joined; runs longer
    than `max_seconds` are long closures, not blinks."""
    closure = (blendshapes[:, EYE_BLINK_LEFT] + blendshapes[:, EYE_BLINK_RIGHT]) / 2
    merged: list[list[int]] = []
    for a, b in _runs(closure > threshold):
        if merged and a - merged[-1][1] <= merge_frames:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    blinks = [(a, b) for a, b in merged if (b - a) / fps <= max_seconds]
    long_closures = [(a, b) for a, b in merged if (b - a) / fps > max_seconds]
    return blinks, long_closures


def clip_motion_stats(seq, blink_threshold: float = BLINK_THRESHOLD) -> dict:
    """Head-motion and blink statistics of one canonical `LandmarkSequence` with pose (see dataset_motion_stats)."""
    from .canonical import CANONICAL_INTER_OCULAR, head_pose

    pose = head_pose(seq)
    fps = seq.fps
    out: dict = {"n_frames": len(seq), "seconds": len(seq) / fps}
    scales = []
    for axis in ("yaw", "pitch", "roll"):
        a = np.unwrap(np.radians(pose[axis])) * 180 / np.pi
        out[f"{axis}_std"] = float(np.std(a))
        out[f"{axis}_velocity"] = float(np.mean(np.abs(np.diff(a))) * fps) if len(a) > 1 else 0.0  # deg/s
        scales.append(_time_scale(a, fps))
    finite = [s for s in scales if math.isfinite(s)]
    out["time_scale"] = float(np.mean(finite)) if finite else float("nan")
    iod = np.maximum(pose["scale"] * CANONICAL_INTER_OCULAR, 1e-6)  # frame px per inter-ocular distance
    out["shift_std"] = float((np.std(pose["tx"] / iod) + np.std(pose["ty"] / iod)) / 2)
    if seq.blendshapes is not None and seq.blendshapes.shape[1] > EYE_BLINK_RIGHT:
        blinks, long_closures = blink_runs(seq.blendshapes, fps, blink_threshold)
        durations = [(b - a) / fps for a, b in blinks]
        out["blinks"] = len(blinks)
        out["blinks_per_minute"] = len(blinks) / (len(seq) / fps) * 60.0
        out["blink_seconds"] = float(np.mean(durations)) if durations else None
        out["blink_durations"] = durations
        out["long_closures"] = len(long_closures)
    else:
        out.update(blinks=None, blinks_per_minute=None, blink_seconds=None, blink_durations=[], long_closures=None)
    return out


def dataset_motion_stats(dataset_dir, split: str | None = "train", blink_threshold: float = BLINK_THRESHOLD) -> dict:
    """Head-pose and blink statistics of a prepared dataset, for the pose/blink generator (`motion.MotionStats`).

    Per clip (`clip_motion_stats`), from the stored (smoothed) pose through `canonical.head_pose`: the std of yaw,
    pitch and roll (degrees), their mean absolute velocity (deg/s), the motion time scale (s: the lag at which the
    angles' autocorrelation falls to 1/e, averaged over the three; for Gaussian-smoothed noise this is the
    `time_scale` of `motion.generate_head_motion`), the spread of the head position (std of the eye midpoint in the
    frame, in inter-ocular distances). Blinks (`blink_runs`): runs of frames where the mean of the eyeBlinkLeft
    (blendshape 9) and eyeBlinkRight (10) scores exceeds `blink_threshold` (runs one frame apart joined, runs over
    1 s counted as long closures instead), as blinks per minute and blink_seconds, the mean time the eyes are more
    than half closed per blink (a cosine-shaped blink of full width w is above half closure for 2/3 w).

    Returns {"summary": {...}, "clips": {id: {...}}, "blendshape_indices": {...}, "blink_threshold": ...}; the
    summary averages the clips weighted by duration (blinks: all blinks over all minutes) under the names of
    `motion.MotionStats` (yaw_std, pitch_std, roll_std, time_scale, shift_std, blinks_per_minute, blink_seconds)
    plus the velocities; blink figures are None when no clip has blendshapes (blink_seconds also when no blink was
    seen). Short clips underestimate time_scale (their autocorrelation is cut off).
    """
    folder = Path(dataset_dir).expanduser()
    index = load_index(folder)
    entries = _split_entries(index, split)
    if not entries:
        raise LmdiffInputError(f"dataset {folder} has no clip in split {split!r}")
    clips = {e["id"]: clip_motion_stats(clip_sequence(folder, e["id"]), blink_threshold) for e in entries}
    weights = np.array([c["seconds"] for c in clips.values()])

    def wmean(key: str):
        vals = np.array([c[key] for c in clips.values()], dtype=np.float64)
        ok = np.isfinite(vals)
        return float(np.average(vals[ok], weights=weights[ok])) if ok.any() else None

    summary = {
        k: wmean(k)
        for k in (
            "yaw_std",
            "pitch_std",
            "roll_std",
            "time_scale",
            "shift_std",
            "yaw_velocity",
            "pitch_velocity",
            "roll_velocity",
        )
    }
    with_blinks = [c for c in clips.values() if c["blinks"] is not None]
    minutes = sum(c["seconds"] for c in with_blinks) / 60.0
    durations = [d for c in with_blinks for d in c["blink_durations"]]
    summary["blinks_per_minute"] = sum(c["blinks"] for c in with_blinks) / minutes if with_blinks else None
    summary["blink_seconds"] = float(np.mean(durations)) if durations else None
    summary["n_clips"] = len(clips)
    summary["seconds"] = float(weights.sum())
    return {
        "summary": summary,
        "clips": clips,
        "blendshape_indices": {"eyeBlinkLeft": EYE_BLINK_LEFT, "eyeBlinkRight": EYE_BLINK_RIGHT},
        "blink_threshold": blink_threshold,
    }


__all__ = [
    "A2LWindowDataset",
    "BLENDSHAPE_NAMES",
    "FailedClip",
    "PrepareReport",
    "REASONS",
    "SourceClip",
    "assign_split",
    "blink_runs",
    "clip_arrays",
    "clip_motion_stats",
    "smooth_clip",
    "smooth_pose",
    "clip_sequence",
    "dataset_motion_stats",
    "find_videos",
    "hash_fraction",
    "load_crops",
    "load_index",
    "prepare_dataset",
    "window_starts",
]


def refeature_dataset(dataset_dir, out_dir, features, cache_dir=None, progress=None) -> Path:
    """A copy of an A2L dataset with other audio features, computed from each clip's stored 16 kHz ``audio``.

    ``features`` is an `audio_features.load_feature_extractor` spec (e.g. ``"whisper-base"``); landmarks, pose,
    split and every other array are copied unchanged (crops are not: the copy is for A2L training). ``cache_dir``:
    an optional `FeatureCache` folder. ``progress(i, n, clip_id)`` is called before each clip. Each clip is written
    atomically and the index last, so a failed run leaves no complete-looking copy. Returns ``out_dir``.
    """
    from .audio_features import FeatureCache

    src, out = Path(dataset_dir).expanduser(), Path(out_dir).expanduser()
    index = load_index(src)
    extractor = _load_extractor(features, float(index["fps"]))
    if (out / INDEX_NAME).exists():
        raise LmdiffInputError(f"{out} already holds a dataset; choose a new folder for the refeatured copy")
    (out / CLIPS_FOLDER).mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(cache_dir) if cache_dir else None
    clips = []
    for i, entry in enumerate(index["clips"]):
        if progress is not None:
            progress(i, len(index["clips"]), entry["id"])
        arrays, metadata = _read_a2l(src / entry["files"]["a2l"])
        audio = arrays["audio"].astype(np.float32) / 32767.0
        n = int(entry["n_frames"])
        arrays["features"] = cache.get_or_compute(extractor, audio, n) if cache else extractor(audio, n)
        metadata["features"] = json.dumps(_normalized(extractor.config()))
        rel = {"a2l": entry["files"]["a2l"], "crops": None}
        _save_safetensors(out / rel["a2l"], arrays, metadata)
        clips.append({**entry, "files": rel, "feature_shape": list(arrays["features"].shape[1:])})
        _write_json(out / CLIPS_FOLDER / f"{entry['id']}.json", {**clips[-1], "complete": True})
    _write_json(out / INDEX_NAME, {**index, "features": _normalized(extractor.config()), "crop_size": 0, "clips": clips})
    return out
