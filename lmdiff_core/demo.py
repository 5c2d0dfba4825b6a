"""A bundled default input for the first README command: a generated talking-head-like clip and speech-like audio.

The portrait is scikit-image's astronaut photo (public domain, shipped inside scikit-image), moved by a known,
smooth head motion (roll, scale, translation) so the demo can show canonicalisation taking the pose out again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEMO_FPS = 25.0
DEMO_SAMPLE_RATE = 16000


@dataclass
class DemoMotion:
    """Per-frame similarity applied to the portrait: roll (degrees, about the face centre), scale, shift (px)."""

    roll: np.ndarray
    scale: np.ndarray
    shift: np.ndarray


def demo_portrait() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def demo_motion(n_frames: int) -> DemoMotion:
    t = np.arange(n_frames) / DEMO_FPS
    return DemoMotion(
        roll=8.0 * np.sin(2 * np.pi * 0.35 * t),
        scale=1.0 + 0.06 * np.sin(2 * np.pi * 0.2 * t),
        shift=np.stack([12 * np.sin(2 * np.pi * 0.27 * t), 6 * np.sin(2 * np.pi * 0.41 * t)], axis=1),
    )


def demo_frames(n_frames: int, batch_size: int = 25):
    """Yield the astronaut portrait moved by `demo_motion`, as uint8 RGB frames."""
    import kornia
    import torch

    portrait = demo_portrait()
    h, w = portrait.shape[:2]
    image = torch.from_numpy(portrait).permute(2, 0, 1)[None].float() / 255
    centre = torch.tensor([[220.0, 120.0]])  # roughly the astronaut's face
    motion = demo_motion(n_frames)
    for start in range(0, n_frames, batch_size):
        sl = slice(start, min(start + batch_size, n_frames))
        n = sl.stop - sl.start
        matrix = kornia.geometry.transform.get_rotation_matrix2d(
            centre.expand(n, 2),
            torch.from_numpy(motion.roll[sl]).float(),
            torch.from_numpy(motion.scale[sl]).float()[:, None].expand(n, 2).contiguous(),
        )
        matrix[:, :, 2] += torch.from_numpy(motion.shift[sl]).float()
        warped = kornia.geometry.transform.warp_affine(
            image.expand(n, -1, -1, -1), matrix, (h, w), padding_mode="border"
        )
        for frame in (warped.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy():
            yield frame


def demo_speech(duration: float) -> np.ndarray:
    """Speech-like audio: vowel syllables (a glottal pulse train through two formant resonators), 4 per second."""
    from scipy.signal import lfilter

    sr = DEMO_SAMPLE_RATE
    n = int(round(duration * sr))
    t = np.arange(n) / sr
    phase = np.cumsum((120 + 15 * np.sin(2 * np.pi * 0.5 * t)) / sr)
    pulses = np.diff(np.floor(phase), prepend=0.0)
    vowels = ((730, 1090), (270, 2290), (300, 870), (530, 1840))  # /a/ /i/ /u/ /e/ formants F1, F2 in Hz
    out = np.zeros(n)
    length = sr // 4
    for i, start in enumerate(range(0, n, length)):
        if i % 7 == 6:
            continue  # a pause between phrases
        segment = slice(start, min(start + length, n))
        x = pulses[segment]
        for formant, bandwidth in zip(vowels[i % len(vowels)], (90, 110)):
            r = np.exp(-np.pi * bandwidth / sr)
            x = lfilter([1 - r], [1, -2 * r * np.cos(2 * np.pi * formant / sr), r * r], x)
        out[segment] = x * np.sin(np.pi * np.linspace(0, 1, len(x))) ** 0.7
    return (0.5 * out / max(np.abs(out).max(), 1e-9)).astype(np.float32)
