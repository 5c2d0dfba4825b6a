"""`TalkingHeadPipeline`: speech + a portrait (one-shot) or a video (dubbing) -> a talking-head video, through A2L and L2V.

Dubbing: the video's landmarks give the head pose, the eyes and the crop boxes; A2L (personalised by the video's
most closed-mouth frame) gives the lips and jaw, put into the video's canonical landmarks and posed like the video;
L2V regenerates the lower face. A video shorter than the audio is looped. One-shot: A2L from the portrait's
landmarks, plus generated head motion and blinks (the A2L checkpoint's training-set statistics); L2V generates the
whole face crop. Either way the output has exactly ceil(audio duration x fps) frames.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..canonical import canonicalize, uncanonicalize
from ..detectors import Landmarker, detect_image, extract_landmarks
from ..errors import LmdiffInputError
from ..landmarks import LandmarkSequence
from ..media import frame_count, iter_frames, probe_video
from ..motion import add_blinks, apply_head_motion, blink_curve, generate_head_motion
from ..smoothing import smooth_landmarks
from ..topology import get_topology
from .a2l import AudioToLandmarksPipeline
from .l2v import LandmarkToVideoPipeline

LOWER_FACE_PARTS = ("outer_lips", "inner_lips", "contour")  # contour: the jaw line (ibug68)


def natural_motion(talking: LandmarkSequence, a2l: AudioToLandmarksPipeline, seed: int | None) -> LandmarkSequence:
    """Canonical A2L output + generated head motion and blinks (statistics of the A2L checkpoint's training set)."""
    n = len(talking)
    talking = apply_head_motion(talking, generate_head_motion(n, talking.fps, a2l.motion_stats, seed))
    return add_blinks(talking, blink_curve(n, talking.fps, a2l.motion_stats, seed))


def dub_landmarks(source: LandmarkSequence, talking: LandmarkSequence) -> LandmarkSequence:
    """Image-space landmarks of the video `source` (same length as `talking`) with the lips and jaw of the canonical
    A2L output `talking`, posed like the video."""
    topology = talking.topology
    canonical = canonicalize(source).to_topology(topology)
    lower = np.unique(np.concatenate([get_topology(topology).part_indices(p) for p in LOWER_FACE_PARTS]))
    points = canonical.points.copy()
    points[:, lower] = talking.points[:, lower]
    return uncanonicalize(canonical.replace(points=points))


def _looped_frames(video: Path, fps: float, n: int, length: int) -> Iterator[np.ndarray]:
    """n frames of a video of `length` frames, looping it from the start as often as needed."""
    done = 0
    while done < n:
        for frame in iter_frames(video, fps, max_frames=min(length, n - done)):
            yield frame
            done += 1


class TalkingHeadPipeline(DiffusionPipeline):
    """A2L + L2V: audio and a portrait or a video in, frames out (see the module docstring)."""

    def __init__(self, a2l: AudioToLandmarksPipeline, l2v: LandmarkToVideoPipeline):
        super().__init__()
        self.register_modules(unet=l2v.unet, scheduler=l2v.scheduler)
        self.a2l, self.l2v = a2l, l2v

    def generate(
        self,
        audio: np.ndarray,
        landmarker: Landmarker,
        image: np.ndarray | None = None,
        video: str | Path | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        a2l_guidance_scale: float = 1.5,
        seed: int | None = 0,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> tuple[Iterator[np.ndarray], int]:
        """(frames, n): an iterator over the n output frames (uint8 [H, W, 3]) for `audio` (16 kHz mono), from a
        portrait `image` (one-shot) or a `video` file (dubbing). `progress(stage, done, total)`."""
        if (image is None) == (video is None):
            raise LmdiffInputError("give either a portrait image or a video to dub, not both or neither")
        fps = self.a2l.fps
        n = frame_count(len(audio) / 16000, fps)
        if n <= 0:
            raise LmdiffInputError("the audio is too short: it gives no video frame")
        report = (lambda stage: lambda d, t: progress(stage, d, t)) if progress else (lambda stage: None)
        if video is not None:
            video = Path(video)
            length = frame_count(probe_video(video).duration, fps)
            if length <= 0:
                raise LmdiffInputError(f"video {video} is shorter than one frame at {fps:g} fps")
            source = extract_landmarks(iter_frames(video, fps), landmarker, fps, source=str(video))
            source = smooth_landmarks(source)
            opening = source.mouth_opening()
            valid = np.flatnonzero(source.valid)
            reference = source[int(valid[np.argmin(opening[valid])])]
            talking = self.a2l(
                audio, reference, n_frames=n, guidance_scale=a2l_guidance_scale, seed=seed, progress=report("a2l")
            )
            index = np.arange(n) % length
            source_n = source[index]
            target = dub_landmarks(source_n, talking)
            identity_frame = int(valid[np.argsort(opening[valid])[len(valid) // 2]])
            frame = next(f for i, f in enumerate(iter_frames(video, fps)) if i == identity_frame)
            identity = self.l2v.reference_crop(frame, source[identity_frame])
            frames = _looped_frames(video, fps, n, length)
            mode = "dub"
        else:
            reference = detect_image(image, landmarker, source="portrait")
            talking = self.a2l(
                audio,
                canonicalize(reference),
                n_frames=n,
                guidance_scale=a2l_guidance_scale,
                seed=seed,
                progress=report("a2l"),
            )
            target = uncanonicalize(natural_motion(talking, self.a2l, seed))
            source_n = reference[np.zeros(n, dtype=int)]
            identity = self.l2v.reference_crop(image, reference)
            frames = (image for _ in range(n))
            mode = "one_shot"
        out = self.l2v.generate(
            frames,
            source_n.to_topology(target.topology),
            target,
            identity,
            mode,
            num_inference_steps,
            guidance_scale,
            seed,
            progress=report("l2v"),
        )
        return out, n

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> np.ndarray:
        """All frames of `generate` as one array [T, H, W, 3] uint8."""
        frames, _ = self.generate(*args, **kwargs)
        return np.stack(list(frames))
