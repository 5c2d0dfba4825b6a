"""Adapters between ComfyUI's IMAGE and AUDIO types and lmdiff's numpy conventions.

ComfyUI passes an IMAGE as a float32 tensor ``[B, H, W, C]`` in 0..1 (``B`` frames, RGB) and an AUDIO as
``{"waveform": Tensor [B, C, T] float32, "sample_rate": int}``. lmdiff works on uint8 RGB frames
``[T, H, W, 3]`` and float32 mono audio (see :mod:`lmdiff_core.media`). This module needs only torch and
numpy, so it imports without ComfyUI.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from .errors import LmdiffInputError


def image_to_frames(image: torch.Tensor) -> np.ndarray:
    """Convert a ComfyUI IMAGE ``[B, H, W, 3 or 4]`` to uint8 RGB frames ``[B, H, W, 3]``, dropping alpha."""
    if not isinstance(image, torch.Tensor):
        raise LmdiffInputError(f"IMAGE must be a torch.Tensor [B, H, W, C], got {type(image).__name__}")
    if image.ndim != 4:
        raise LmdiffInputError(f"IMAGE must have 4 dimensions [B, H, W, C], got shape {tuple(image.shape)}")
    if image.shape[-1] not in (3, 4):
        raise LmdiffInputError(f"IMAGE must have 3 (RGB) or 4 (RGBA) channels last, got shape {tuple(image.shape)}")
    if image.shape[0] == 0:
        raise LmdiffInputError("IMAGE is empty: it holds no frames")
    rgb = torch.clamp(image[..., :3].detach().to(device="cpu", dtype=torch.float32), 0.0, 1.0)
    return rgb.mul_(255.0).round_().to(torch.uint8).numpy()


def frames_to_image(frames: np.ndarray) -> torch.Tensor:
    """Convert uint8 RGB frames ``[B, H, W, 3]`` to a ComfyUI IMAGE (float32 in 0..1)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise LmdiffInputError(
            f"frames must be a uint8 array [B, H, W, 3], got shape {frames.shape} and dtype {frames.dtype}"
        )
    return torch.from_numpy(np.ascontiguousarray(frames)).to(torch.float32).div_(255.0)


def _checked_audio(audio: dict) -> tuple[torch.Tensor, int]:
    """The waveform [B, C, T] and sample rate of a ComfyUI AUDIO, or LmdiffInputError saying what is wrong."""
    if not isinstance(audio, dict) or not {"waveform", "sample_rate"} <= audio.keys():
        found = sorted(audio) if isinstance(audio, dict) else type(audio).__name__
        raise LmdiffInputError(f"AUDIO must be a dict with 'waveform' and 'sample_rate', got {found}")
    waveform, source_rate = audio["waveform"], audio["sample_rate"]
    if not isinstance(waveform, torch.Tensor) or waveform.ndim != 3:
        shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform).__name__
        raise LmdiffInputError(f"AUDIO waveform must be a torch.Tensor [B, C, T], got {shape}")
    if 0 in waveform.shape:
        raise LmdiffInputError(f"AUDIO waveform is empty (shape {tuple(waveform.shape)})")
    if not isinstance(source_rate, numbers.Integral) or source_rate <= 0:
        raise LmdiffInputError(f"AUDIO sample_rate must be a positive integer, got {source_rate!r}")
    return waveform, int(source_rate)


def audio_duration(audio: dict) -> float:
    """Length of a ComfyUI AUDIO in seconds (samples / sample_rate of the original, before any resampling)."""
    waveform, source_rate = _checked_audio(audio)
    return waveform.shape[-1] / source_rate


def audio_from_comfy(audio: dict, sample_rate: int = 16000) -> np.ndarray:
    """Convert a ComfyUI AUDIO to float32 mono at ``sample_rate``.

    The first batch item is used, its channels are averaged and it is resampled with ``librosa.resample``
    when its rate differs.
    """
    waveform, source_rate = _checked_audio(audio)
    mono = waveform[0].detach().to(device="cpu", dtype=torch.float32).mean(dim=0).numpy()
    if source_rate != sample_rate:
        import librosa  # imported here: slow to import and only needed when rates differ

        mono = librosa.resample(mono, orig_sr=int(source_rate), target_sr=sample_rate)
    return mono.astype(np.float32, copy=False)


def audio_to_comfy(audio: np.ndarray, sample_rate: int = 16000) -> dict:
    """Wrap float32 mono ``audio`` as a ComfyUI AUDIO (``waveform`` ``[1, 1, T]``)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise LmdiffInputError(f"audio must be mono with shape [samples], got shape {audio.shape}")
    waveform = torch.tensor(audio, dtype=torch.float32).reshape(1, 1, -1)
    return {"waveform": waveform, "sample_rate": int(sample_rate)}
