"""Reading and writing video, audio and images: the one module that talks to PyAV and Pillow.

Conventions used across lmdiff:

- frames are ``uint8`` RGB arrays, ``[H, W, 3]`` each or ``[T, H, W, 3]`` stacked;
- audio is ``float32`` mono in ``[-1, 1]``, 16 kHz unless a ``sample_rate`` says otherwise;
- a clip of ``duration`` seconds at ``fps`` has :func:`frame_count` frames, and the audio that goes
  with ``n_frames`` frames has exactly ``round(n_frames / fps * sample_rate)`` samples
  (:func:`fit_audio_to_frames`).

Every user mistake (missing file, a folder, a file that is not media, a video without sound where sound
is needed, ...) raises :class:`~lmdiff_core.errors.LmdiffInputError` naming the path and what was expected.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .atomic import atomic_write
from .errors import LmdiffInputError

DEFAULT_FPS = 25.0
DEFAULT_SAMPLE_RATE = 16000
MIN_IMAGE_SIZE = 16
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")

# Absorbs float error in duration * fps, so that 10.0 s at 25 fps is 250 frames, not 251.
_FRAME_COUNT_TOLERANCE = 1e-6
# A source frame stamped up to this fraction of a source frame interval after an output time still counts
# as shown at that time: containers with coarse time bases (e.g. milliseconds) round timestamps.
_TIMESTAMP_TOLERANCE_FRAMES = 0.1
# Audio codecs pad their last frame (AAC: up to 1024 samples); anything longer is not encoder padding.
_MAX_ENCODER_PADDING_SECONDS = 0.2

_VIDEO_EXPECTED = "a video file such as .mp4, .mov, .mkv or .webm"
_AUDIO_EXPECTED = "an audio file (.wav, .mp3, .flac, .m4a) or a video with sound"
_IMAGE_EXPECTED = "a PNG, JPEG or WebP picture"
_PARTIAL_HINT = "to keep what decodes, allow partial media (CLI: --allow-partial)"

# Set by `allow_partial_media`: media that decodes only partly is then cut short with a warning, not an error.
_ALLOW_PARTIAL: ContextVar[bool] = ContextVar("lmdiff_allow_partial_media", default=False)
_log = logging.getLogger("lmdiff")

PathLike = str | os.PathLike


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video from its header and first frame.

    ``width`` and ``height`` are the displayed size (rotation metadata applied), ``fps`` the average frame
    rate of the video stream, ``duration`` its length in seconds and ``n_frames_source`` its frame count
    (from the container, else estimated from duration and fps).
    """

    width: int
    height: int
    fps: float
    duration: float
    n_frames_source: int
    has_audio: bool


@dataclass
class Video:
    """A decoded video: ``frames`` ``[T, H, W, 3]`` uint8 at ``fps``, and its audio track if asked for.

    ``audio`` is float32 mono at ``sample_rate`` as decoded (use :func:`fit_audio_to_frames` to give it the
    length of the frames), or ``None`` when the file has no audio track or it was not requested.
    """

    frames: np.ndarray
    fps: float
    duration: float
    audio: np.ndarray | None = None
    sample_rate: int = DEFAULT_SAMPLE_RATE


def frame_count(duration: float, fps: float) -> int:
    """Number of frames of a clip of ``duration`` seconds at ``fps``: ``ceil(duration * fps)``.

    This is the single owner of the length contract; float error is tolerated, so 10.0 s at 25 fps is 250.
    """
    fps = _checked_fps(fps)
    if duration < 0:
        raise LmdiffInputError(f"duration must be zero or positive, got {duration} s")
    return math.ceil(duration * fps - _FRAME_COUNT_TOLERANCE)


def fit_audio_to_frames(
    audio: np.ndarray, n_frames: int, fps: float, sample_rate: int = DEFAULT_SAMPLE_RATE
) -> np.ndarray:
    """Trim ``audio``, or pad it with silence, to exactly ``round(n_frames / fps * sample_rate)`` samples."""
    n_samples = _samples_for_frames(n_frames, fps, sample_rate)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise LmdiffInputError(f"audio must be mono with shape [samples], got shape {audio.shape}")
    if len(audio) >= n_samples:
        return audio[:n_samples]
    return np.pad(audio, (0, n_samples - len(audio)))


@contextmanager
def allow_partial_media(allow: bool = True) -> Iterator[None]:
    """Within this block, a video or audio track that stops decoding before its declared duration gives what
    decodes (with a warning naming the file) instead of raising :class:`LmdiffInputError`."""
    token = _ALLOW_PARTIAL.set(allow)
    try:
        yield
    finally:
        _ALLOW_PARTIAL.reset(token)


def _stopped_early(message: str) -> None:
    """Raise for media that decodes only partly, or warn when partial media is allowed."""
    if not _ALLOW_PARTIAL.get():
        raise LmdiffInputError(f"{message}; {_PARTIAL_HINT}")
    _log.warning("lmdiff: warning: %s; keeping what decodes", message)


def probe_video(path: PathLike) -> VideoInfo:
    """Read the size, frame rate, duration and streams of the video at ``path``."""
    path = _existing_file(path, "video", _VIDEO_EXPECTED)
    with _open_input(path, "video", _VIDEO_EXPECTED) as container:
        stream = _video_stream(container, path)
        fps = _average_fps(stream, path)
        duration = _video_duration(container, stream, path)
        first_frame = next(_decode(container, stream, path, "video"), None)
        if first_frame is None:
            raise LmdiffInputError(f"video {path} has no decodable frames; expected {_VIDEO_EXPECTED}")
        width, height = first_frame.width, first_frame.height
        if _quarter_turns(first_frame) % 2:
            width, height = height, width
        return VideoInfo(
            width=width,
            height=height,
            fps=fps,
            duration=duration,
            n_frames_source=stream.frames or frame_count(duration, fps),
            has_audio=bool(container.streams.audio),
        )


def iter_frames(path: PathLike, fps: float | None = DEFAULT_FPS, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Stream the frames of the video at ``path`` as uint8 RGB ``[H, W, 3]`` arrays, resampled to ``fps``.

    Output frame ``k`` shows the latest source frame whose timestamp is at or before ``k / fps`` (a
    sample-and-hold resampler: frames are dropped or repeated, never blended); ``fps=None`` keeps the
    source's average rate. Exactly ``frame_count(duration, fps)`` frames are yielded (at most
    ``max_frames``). A stream that stops decoding before its declared duration (a truncated or damaged file)
    raises LmdiffInputError naming the last frame that decoded; within `allow_partial_media` it ends there
    instead (fewer frames; a frame is never repeated past its own display time). Rotation metadata is applied.
    Only one decoded frame is held at a time. The file is checked when this is called, not on first use.
    """
    path = _existing_file(path, "video", _VIDEO_EXPECTED)
    info = probe_video(path)
    target_fps = info.fps if fps is None else _checked_fps(fps)
    n_frames = frame_count(info.duration, target_fps)
    if max_frames is not None:
        if max_frames < 0:
            raise LmdiffInputError(f"max_frames must be zero or positive, got {max_frames}")
        n_frames = min(n_frames, max_frames)
    return _resampled_frames(path, info.fps, target_fps, n_frames)


def read_video(path: PathLike, fps: float | None = DEFAULT_FPS, with_audio: bool = True) -> Video:
    """Decode the whole video at ``path`` at ``fps`` (see :func:`iter_frames`), with its audio at 16 kHz.

    With ``with_audio=True`` a file without an audio track gives ``audio=None``; use :func:`read_audio` to
    require one.
    """
    path = _existing_file(path, "video", _VIDEO_EXPECTED)
    info = probe_video(path)
    target_fps = info.fps if fps is None else _checked_fps(fps)
    n_frames = frame_count(info.duration, target_fps)
    frames = np.empty((n_frames, info.height, info.width, 3), dtype=np.uint8)
    decoded = 0
    for decoded, frame in enumerate(_resampled_frames(path, info.fps, target_fps, n_frames), start=1):
        frames[decoded - 1] = frame
    frames = frames[:decoded]  # fewer only for partial media (`allow_partial_media`)
    audio = read_audio(path, DEFAULT_SAMPLE_RATE) if with_audio and info.has_audio else None
    return Video(frames=frames, fps=target_fps, duration=info.duration, audio=audio)


def read_audio(path: PathLike, sample_rate: int = DEFAULT_SAMPLE_RATE) -> np.ndarray:
    """Decode the first audio track of ``path`` (wav, mp3, flac, m4a, mp4, ...) to float32 mono in [-1, 1].

    Channels are averaged and the result resampled to ``sample_rate``. Encoder padding (silence a codec such
    as AAC adds after the end) is dropped when the container declares the track's duration. A track that stops
    decoding more than 0.2 s before its declared duration raises LmdiffInputError (see `allow_partial_media`);
    mp3 files are exempt, as their declared duration is often an estimate from the bitrate.
    """
    path = _existing_file(path, "audio", _AUDIO_EXPECTED)
    if sample_rate <= 0:
        raise LmdiffInputError(f"sample_rate must be positive, got {sample_rate}")
    with _open_input(path, "audio", _AUDIO_EXPECTED) as container:
        if not container.streams.audio:
            raise LmdiffInputError(f"{path} has no audio track; expected {_AUDIO_EXPECTED}")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", rate=sample_rate)
        chunks = []
        for frame in _decode(container, stream, path, "audio"):
            chunks.extend(resampled.to_ndarray().mean(axis=0) for resampled in resampler.resample(frame))
        chunks.extend(resampled.to_ndarray().mean(axis=0) for resampled in resampler.resample(None))
        declared_duration = float(stream.duration * stream.time_base) if stream.duration else None
        estimated = container.format.name == "mp3"
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if declared_duration is not None and not estimated and len(audio):
        decoded = len(audio) / sample_rate
        if declared_duration - decoded > _MAX_ENCODER_PADDING_SECONDS:
            _stopped_early(
                f"audio {path} stops decoding at {decoded:.2f} s of its declared {declared_duration:.2f} s "
                "(truncated or damaged)"
            )
    if declared_duration is not None:
        padding = len(audio) - round(declared_duration * sample_rate)
        # A larger excess means the declared duration is a guess (e.g. from an mp3 bitrate): keep everything.
        if 0 < padding <= _MAX_ENCODER_PADDING_SECONDS * sample_rate:
            audio = audio[: len(audio) - padding]
    if len(audio) == 0:
        raise LmdiffInputError(f"{path} contains no audio samples; expected {_AUDIO_EXPECTED}")
    return np.clip(audio, -1.0, 1.0, out=audio)


def write_video(
    path: PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = DEFAULT_SAMPLE_RATE,
    crf: int = 18,
    progress: bool = False,
    preset: str = "veryfast",
) -> Path:
    """Encode ``frames`` as an H.264 (yuv420p) MP4 at ``path``, with ``audio`` as an AAC track if given.

    ``crf`` and ``preset`` are x264's. "veryfast" (default) encodes a 512 px frame about 3x faster than x264's own
    default "medium" for about the same file size at crf 18 (measured on a 2-core CPU).

    ``frames`` is a ``[T, H, W, 3]`` uint8 array or any iterable of ``[H, W, 3]`` uint8 frames (encoded as
    they arrive). Odd widths or heights are padded to even by repeating the last row/column. The audio is
    fitted to the frames written, as :func:`fit_audio_to_frames` does. The file appears at ``path`` only
    once complete: a failed or interrupted write leaves an existing file untouched and no partial file.
    Returns ``path``.
    """
    path = Path(path)
    fps = _checked_fps(fps)
    if not 0 <= crf <= 51:
        raise LmdiffInputError(f"crf must be between 0 (lossless) and 51, got {crf}")
    if preset not in X264_PRESETS:
        raise LmdiffInputError(f"preset must be one of {X264_PRESETS}, got {preset!r}")
    if path.is_dir():
        raise LmdiffInputError(f"output path {path} is a directory; expected a file path ending in .mp4")
    if not path.parent.is_dir():
        raise LmdiffInputError(f"cannot write {path}: its folder {path.parent} does not exist")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1:
            raise LmdiffInputError(f"audio for {path} must be mono with shape [samples], got {audio.shape}")

    mp4_options = {"movflags": "+faststart"}  # index first, so players can start before the download ends
    with atomic_write(path) as temporary:
        with av.open(str(temporary), mode="w", format="mp4", container_options=mp4_options) as container:
            _encode(container, path, frames, fps, audio, sample_rate, crf, progress, preset)
    return path


def read_image(path: PathLike) -> np.ndarray:
    """Read the picture at ``path`` as uint8 RGB ``[H, W, 3]``.

    EXIF orientation is applied, greyscale and palette images are converted, and transparent pixels are
    composited onto white. Pictures smaller than 16x16 are rejected.
    """
    path = _existing_file(path, "image", _IMAGE_EXPECTED)
    try:
        with Image.open(path) as image:
            rgb = _to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise LmdiffInputError(f"{path} is not a readable image ({error}); expected {_IMAGE_EXPECTED}") from error
    if min(rgb.size) < MIN_IMAGE_SIZE:
        raise LmdiffInputError(
            f"image {path} is {rgb.width}x{rgb.height} pixels; expected at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}"
        )
    return np.asarray(rgb)


def _checked_fps(fps: float) -> float:
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise LmdiffInputError(f"fps must be a positive number, got {fps!r}")
    return float(fps)


def _samples_for_frames(n_frames: int, fps: float, sample_rate: int) -> int:
    return round(n_frames / _checked_fps(fps) * sample_rate)


def _existing_file(path: PathLike, kind: str, expected: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise LmdiffInputError(f"{kind} file {path} does not exist; expected {expected}")
    if path.is_dir():
        raise LmdiffInputError(f"{kind} path {path} is a directory; expected {expected}")
    return path


@contextmanager
def _open_input(path: Path, kind: str, expected: str) -> Iterator[av.container.InputContainer]:
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as error:
        raise LmdiffInputError(f"cannot read {kind} {path} ({error}); expected {expected}") from error
    with container:
        yield container


def _decode(
    container: av.container.InputContainer, stream: av.stream.Stream, path: Path, kind: str
) -> Iterator[av.frame.Frame]:
    """The decoded frames of `stream`. Data that fails to decode after the first frame ends the stream there: the
    callers compare what decoded with the declared duration (a truncated file usually ends in a broken packet)."""
    decoded = 0
    try:
        for frame in container.decode(stream):
            decoded += 1
            yield frame
    except av.FFmpegError as error:
        if not decoded:
            raise LmdiffInputError(f"{kind} {path} is damaged and cannot be decoded ({error})") from error


def _video_stream(container: av.container.InputContainer, path: Path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise LmdiffInputError(f"{path} has no video stream; expected {_VIDEO_EXPECTED}")
    return container.streams.video[0]


def _average_fps(stream: av.video.stream.VideoStream, path: Path) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise LmdiffInputError(f"video {path} does not declare a frame rate; expected {_VIDEO_EXPECTED}")
    return float(rate)


def _video_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    raise LmdiffInputError(f"video {path} does not declare its duration; expected {_VIDEO_EXPECTED}")


def _quarter_turns(frame: av.VideoFrame) -> int:
    """Counter-clockwise quarter turns that display the frame upright (from its rotation metadata)."""
    return round(frame.rotation / 90) % 4


def _frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    rgb = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _resampled_frames(path: Path, source_fps: float, fps: float, n_frames: int) -> Iterator[np.ndarray]:
    """Sample-and-hold the decoded frames onto the grid ``k / fps`` for ``k < n_frames``."""
    if n_frames == 0:
        return
    tolerance = _TIMESTAMP_TOLERANCE_FRAMES / source_fps
    with _open_input(path, "video", _VIDEO_EXPECTED) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        start = stream.start_time or 0
        emitted = 0
        held = None  # the latest source frame at or before the next output time
        held_time, decoded = 0.0, 0
        for index, frame in enumerate(_decode(container, stream, path, "video")):
            decoded = index + 1
            if frame.pts is None:
                time = index / source_fps
            else:
                time = float((frame.pts - start) * stream.time_base)
            while emitted < n_frames and time > emitted / fps + tolerance:
                # Nothing was shown yet if the stream starts late: use its first frame.
                yield _frame_to_rgb(held if held is not None else frame)
                emitted += 1
            if emitted == n_frames:
                return
            held, held_time = frame, time
        if held is None:
            raise LmdiffInputError(f"video {path} has no decodable frames; expected {_VIDEO_EXPECTED}")
        # The last frame is shown until one source frame interval after its timestamp, and no longer.
        shown_until = held_time + 1 / source_fps - tolerance
        while emitted < n_frames and emitted / fps < shown_until:
            yield _frame_to_rgb(held)
            emitted += 1
        if emitted < n_frames:
            _stopped_early(
                f"video {path} stops decoding after frame {decoded - 1} (at {held_time:.2f} s): output frame "
                f"{emitted} at {fps:g} fps and later are missing (truncated or damaged)"
            )


def _encode(
    container: av.container.OutputContainer,
    path: Path,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None,
    sample_rate: int,
    crf: int,
    progress: bool,
    preset: str,
) -> None:
    frame_iterator = iter(frames)
    first = next(frame_iterator, None)
    if first is None:
        raise LmdiffInputError(f"no frames to write to {path}; expected at least one [H, W, 3] uint8 frame")
    height, width = _checked_frame(first, 0, None, path).shape[:2]

    video_stream = container.add_stream(
        "libx264", rate=Fraction(fps).limit_denominator(1001), options={"crf": str(crf), "preset": preset}
    )
    video_stream.width, video_stream.height = width + width % 2, height + height % 2
    video_stream.pix_fmt = "yuv420p"
    audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono") if audio is not None else None

    samples_written = 0
    total = len(frames) if hasattr(frames, "__len__") else None
    with tqdm(total=total, unit="frame", desc=f"writing {path.name}", disable=not progress) as bar:
        for index, frame in enumerate(_chain_first(first, frame_iterator)):
            frame = _checked_frame(frame, index, (height, width), path)
            if width % 2 or height % 2:
                frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = index
            container.mux(video_stream.encode(video_frame))
            if audio_stream is not None:
                # Interleave the audio that belongs to the frames so far; past its end, silence.
                target = _samples_for_frames(index + 1, fps, sample_rate)
                if target > samples_written:
                    chunk = audio[samples_written:target]
                    chunk = np.pad(chunk, (0, target - samples_written - len(chunk)))
                    container.mux(audio_stream.encode(_audio_frame(chunk, samples_written, sample_rate)))
                    samples_written = target
            bar.update()
    container.mux(video_stream.encode(None))
    if audio_stream is not None:
        container.mux(audio_stream.encode(None))


def _chain_first(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def _checked_frame(frame: np.ndarray, index: int, size: tuple[int, int] | None, path: Path) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise LmdiffInputError(
            f"frame {index} for {path} has shape {getattr(frame, 'shape', None)} and dtype "
            f"{getattr(frame, 'dtype', None)}; expected an [H, W, 3] uint8 RGB array"
        )
    if size is not None and frame.shape[:2] != size:
        raise LmdiffInputError(
            f"frame {index} for {path} is {frame.shape[1]}x{frame.shape[0]}; expected {size[1]}x{size[0]} like frame 0"
        )
    return frame


def _audio_frame(samples: np.ndarray, pts: int, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples)[None, :], format="flt", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = pts
    frame.time_base = Fraction(1, sample_rate)
    return frame


def _to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
