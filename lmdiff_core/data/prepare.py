"""`lmdiff prepare`: talking-head videos -> a dataset folder (`data.store` describes the files).

`prepare_dataset(sources, out_dir, landmarker_factory)` finds the videos, assigns each clip to train or val, and per
clip detects and smooths the landmarks (`smoothing.smooth_clip`), fits the speech to the frames, computes the audio
features and writes the clip's arrays and face crops; it resumes (complete clips are kept), locks the folder against
a second run and writes report.json. `refeature_dataset` copies a dataset with other audio features.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import LmdiffInputError
from ..smoothing import smooth_clip, smoothing_mode
from .store import (
    BLENDSHAPE_NAMES,
    CLIPS_FOLDER,
    FORMAT,
    FORMAT_VERSION,
    INDEX_NAME,
    REPORT_NAME,
    SAMPLE_RATE,
    load_index,
    read_a2l_file,
    read_index_file,
    save_safetensors,
    stream_safetensors,
    write_json,
)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
AUDIO_SIDECAR_SUFFIXES = (".wav", ".flac", ".mp3", ".m4a")
CROP_BATCH = 32
MAX_AUDIO_SHORTFALL = 0.25  # seconds of missing speech at the end tolerated (padded with silence)
MAX_ID_LENGTH = 120

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
        from ..audio_features import load_feature_extractor

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
    _check_arguments(out_dir, crop_size, val_fraction, split_by, fps)
    val_clips = [str(v) for v in ([val_clips] if isinstance(val_clips, str) else val_clips)]
    smooth = smoothing_mode(smooth)
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
    clip_options = dict(crop_size=int(crop_size), min_seconds=min_seconds, fps=float(fps), max_gap=max_gap, face=face,
                        smooth=smooth, audio=audio)

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out_dir)
    try:
        entries = _open_dataset_folder(out_dir, settings)
        report = PrepareReport(out_dir=str(out_dir))
        split = _Split(val_clips, val_fraction, split_by)

        def write_index() -> None:
            _write_index(out_dir / INDEX_NAME, entries, settings, split)

        try:
            write_index()
            for i, clip in enumerate(clips):
                if progress is not None:
                    progress(i, len(clips), clip.clip_id, "start")
                sidecar = entries.get(clip.clip_id)
                if sidecar is not None and _is_current(sidecar, clip, audio):
                    report.skipped_existing.append(clip.clip_id)
                    status = "skipped"
                else:
                    entries.pop(clip.clip_id, None)  # not complete, or from another (or changed) source: afresh
                    files = _clip_files(out_dir / CLIPS_FOLDER, clip.clip_id)
                    entry = _prepare_or_report(
                        clip, out_dir, files, landmarker_factory, extractor, settings, report,
                        speaker=_speaker_label(clip, speaker), **clip_options,
                    )
                    if entry is not None:
                        entries[clip.clip_id] = entry
                        settings["topology"] = settings["topology"] or entry["topology"]
                        write_index()
                    status = "failed" if entry is None else "done"
                if progress is not None:
                    progress(i + 1, len(clips), clip.clip_id, status)
            report.unmatched_val_clips = split.unmatched(entries)
            write_index()
        except KeyboardInterrupt:
            report.interrupted = True
            raise
        finally:
            report.seconds = round(time.perf_counter() - started, 3)
            write_json(out_dir / REPORT_NAME, report.to_dict())
        return report
    finally:
        _unlock_folder(lock)


def _check_arguments(out_dir: Path, crop_size, val_fraction, split_by, fps) -> None:
    """LmdiffInputError naming the first argument of `prepare_dataset` that cannot be used."""
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


def _open_dataset_folder(out_dir: Path, settings: dict) -> dict[str, dict]:
    """The complete clips of the (locked) dataset folder by id, after checking its index's settings against
    `settings` (whose topology it fills in) and removing the temporary files of a killed run."""
    clips_dir = out_dir / CLIPS_FOLDER
    clips_dir.mkdir(exist_ok=True)
    index_path = out_dir / INDEX_NAME
    if index_path.exists():
        existing_index = read_index_file(index_path)
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
    return entries


class _Split:
    """The train / val split of `prepare_dataset`: val_clips items match a clip id, a file stem or a source path (as
    given or resolved); the other clips are hashed (`assign_split`) by clip id or by speaker."""

    def __init__(self, val_clips: list[str], val_fraction: float, split_by: str):
        self.val_clips, self.val_fraction, self.split_by = val_clips, float(val_fraction), split_by
        self.val_names = {
            v: {v} | ({str(Path(v).expanduser().resolve())} if Path(v).expanduser().exists() else set())
            for v in val_clips
        }
        self.val_set = set().union(*self.val_names.values()) if self.val_names else set()

    @staticmethod
    def names_of(entry: dict) -> set[str]:
        return {entry["id"], entry.get("source", ""), Path(entry.get("source", "")).stem}

    def __call__(self, entry: dict) -> str:
        if self.names_of(entry) & self.val_set:
            return "val"
        key = entry["id"] if self.split_by == "clip" else f"speaker:{entry.get('speaker', entry['id'])}"
        return assign_split(entry["id"], self.val_fraction, (), key=key)

    def unmatched(self, entries: dict[str, dict]) -> list[str]:
        """The val_clips items that matched no clip."""
        matched = set().union(*(self.names_of(e) for e in entries.values())) if entries else set()
        return sorted(v for v, names in self.val_names.items() if not names & matched)


def _write_index(index_path: Path, entries: dict[str, dict], settings: dict, split: _Split) -> None:
    listed = []
    for cid in sorted(entries):
        e = {k: entries[cid].get(k) for k in _PUBLIC_KEYS}
        e["split"] = split(entries[cid])
        listed.append(e)
    index = dict(settings)
    index.update(
        val_fraction=split.val_fraction,
        val_clips=list(split.val_clips),
        split_by=split.split_by,
        blendshape_names=list(BLENDSHAPE_NAMES) if any(e.get("has_blendshapes") for e in entries.values()) else None,
        n_clips=len(listed),
        n_frames=int(sum(e["n_frames"] for e in listed)),
        clips=listed,
    )
    write_json(index_path, index)


def _prepare_or_report(clip, out_dir, files, landmarker_factory, extractor, settings, report, **options) -> dict | None:
    """`_prepare_clip` of one clip: its index entry, or None with the failure added to `report` (a settings mismatch
    ends the run; any other error on one clip must not end a long run)."""
    for path in files.values():
        path.unlink(missing_ok=True)
    clip_started = time.perf_counter()
    try:
        entry = _prepare_clip(clip, out_dir, files, landmarker_factory, extractor, settings, **options)
    except _ClipFailure as exc:
        report.failed.append(FailedClip(str(clip.path), clip.clip_id, exc.reason, exc.message))
        return None
    except _SettingsError:
        raise
    except Exception as exc:
        message = f"{exc.__class__.__name__}: {exc}"
        report.failed.append(FailedClip(str(clip.path), clip.clip_id, "error", message, traceback.format_exc()))
        return None
    report.done.append(clip.clip_id)
    report.clip_seconds[clip.clip_id] = round(time.perf_counter() - clip_started, 3)
    return entry


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
    from ..canonical import uncanonicalize
    from ..detectors import extract_landmarks
    from ..media import fit_audio_to_frames, frame_count, iter_frames, probe_video, read_audio

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
    save_safetensors(files["a2l"], arrays, metadata)

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
    write_json(files["sidecar"], entry)  # last: marks the clip complete
    return entry


def _write_crops(path: Path, clip: SourceClip, seq, crop_size: int, fps: float, n_frames: int) -> None:
    import torch

    from ..crop import compute_crop_track, crop_frames
    from ..media import iter_frames

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
    stream_safetensors(
        path,
        {"matrices": track.matrices.astype(np.float64)},
        "crops",
        np.uint8,
        (n_frames, 3, crop_size, crop_size),
        batches(),
        metadata,
    )



def refeature_dataset(dataset_dir, out_dir, features, cache_dir=None, progress=None) -> Path:
    """A copy of an A2L dataset with other audio features, computed from each clip's stored 16 kHz ``audio``.

    ``features`` is an `audio_features.load_feature_extractor` spec (e.g. ``"whisper-base"``); landmarks, pose,
    split and every other array are copied unchanged (crops are not: the copy is for A2L training). ``cache_dir``:
    an optional `FeatureCache` folder. ``progress(i, n, clip_id)`` is called before each clip. Each clip is written
    atomically and the index last, so a failed run leaves no complete-looking copy. Returns ``out_dir``.
    """
    from ..audio_features import FeatureCache

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
        arrays, metadata = read_a2l_file(src / entry["files"]["a2l"])
        audio = arrays["audio"].astype(np.float32) / 32767.0
        n = int(entry["n_frames"])
        arrays["features"] = cache.get_or_compute(extractor, audio, n) if cache else extractor(audio, n)
        metadata["features"] = json.dumps(_normalized(extractor.config()))
        rel = {"a2l": entry["files"]["a2l"], "crops": None}
        save_safetensors(out / rel["a2l"], arrays, metadata)
        clips.append({**entry, "files": rel, "feature_shape": list(arrays["features"].shape[1:])})
        write_json(out / CLIPS_FOLDER / f"{entry['id']}.json", {**clips[-1], "complete": True})
    write_json(out / INDEX_NAME, {**index, "features": _normalized(extractor.config()), "crop_size": 0, "clips": clips})
    return out
