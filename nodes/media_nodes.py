"""Media nodes: a video or speech file from ComfyUI's input folder, decoded by `lmdiff_core.media`.

Media that stops decoding before its declared length (a truncated download or copy) is an error naming the file and
where decoding stopped, unless `allow_partial` is on: then what decodes is kept (the CLI's `--allow-partial`).
"""

from __future__ import annotations

from pathlib import Path

from ..lmdiff_core.errors import LmdiffInputError
from .runtime import comfy_module

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", *VIDEO_SUFFIXES)
ALLOW_PARTIAL = (
    "BOOLEAN",
    {
        "default": False,
        "tooltip": "Keep what decodes of a truncated or damaged file (a warning in the log) instead of an error",
    },
)


def input_files(suffixes: tuple[str, ...]) -> list[str]:
    """Files with one of `suffixes` in ComfyUI's input folder (none outside ComfyUI)."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        return []
    folder = Path(folder_paths.get_input_directory())
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)


def input_path(name: str) -> Path:
    """The file `name` of ComfyUI's input folder; names outside that folder are refused."""
    folder_paths = comfy_module("folder_paths")
    if folder_paths is None:
        raise LmdiffInputError("the media nodes read ComfyUI's input folder: run them inside ComfyUI")
    folder = Path(folder_paths.get_input_directory()).resolve()
    path = Path(folder_paths.get_annotated_filepath(name)).resolve()
    if folder not in path.parents:
        raise LmdiffInputError(f"media name {name!r} is outside ComfyUI's input folder {folder}")
    return path


class LoadVideo:
    """A video file as IMAGE frames at `fps` (0: the file's own rate), its speech as AUDIO (16 kHz mono, silence
    when the file has none) and the frame rate."""

    CATEGORY = "lmdiff/media"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("frames", "audio", "fps")
    FUNCTION = "load"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": (input_files(VIDEO_SUFFIXES), {"video_upload": True}),
                "fps": ("FLOAT", {"default": 25.0, "min": 0.0, "max": 120.0, "step": 0.01, "tooltip": "0: as is"}),
                "allow_partial": ALLOW_PARTIAL,
            }
        }

    def load(self, video, fps, allow_partial):
        import numpy as np

        from ..lmdiff_core.comfy_io import audio_to_comfy, frames_to_image
        from ..lmdiff_core.media import allow_partial_media, fit_audio_to_frames, read_video

        with allow_partial_media(allow_partial):
            clip = read_video(input_path(video), fps=fps or None)
        audio = np.zeros(0, np.float32) if clip.audio is None else clip.audio
        audio = fit_audio_to_frames(audio, len(clip.frames), clip.fps, clip.sample_rate)
        return frames_to_image(clip.frames), audio_to_comfy(audio, clip.sample_rate), float(clip.fps)


class LoadAudio:
    """The speech track of an audio or video file as AUDIO (16 kHz mono)."""

    CATEGORY = "lmdiff/media"
    RETURN_TYPES = ("AUDIO",)
    RETURN_NAMES = ("audio",)
    FUNCTION = "load"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "audio": (input_files(AUDIO_SUFFIXES), {"audio_upload": True}),
                "allow_partial": ALLOW_PARTIAL,
            }
        }

    def load(self, audio, allow_partial):
        from ..lmdiff_core.comfy_io import audio_to_comfy
        from ..lmdiff_core.media import DEFAULT_SAMPLE_RATE, allow_partial_media, read_audio

        with allow_partial_media(allow_partial):
            samples = read_audio(input_path(audio), DEFAULT_SAMPLE_RATE)
        return (audio_to_comfy(samples, DEFAULT_SAMPLE_RATE),)
