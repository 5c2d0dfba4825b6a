"""`TalkingHeadPipeline`: speech + a portrait (one-shot) or a video (dubbing) -> a talking-head video, through A2L and L2V.

Dubbing: the video's landmarks give the head pose, the eyes and the crop boxes; A2L (personalised by frames
across the video's mouth openings, `a2l.speaker_references`) gives the lips and jaw, put into the video's canonical
landmarks and posed like the video; L2V regenerates the lower face. A video shorter than the audio is looped. One-shot: A2L from the portrait's
landmarks, plus generated head motion and blinks (the A2L checkpoint's training-set statistics); L2V generates the
whole face crop. A portrait can also be dubbed as a still video (`image_mode="still"`): only the lips and jaw move
and everything else stays the photo's own pixels, which small models do best. Either way the output has exactly
ceil(audio duration x fps) frames.

`mode="fast"` replaces L2V by the appearance bank (`pipelines/fast.py`): the lower face is rebuilt from the person's
own frames (the video's, and/or `bank_frames`), retrieved by lip shape and pose and warped onto the target landmarks,
with no generator. `mode="quality"` with a refiner L2V checkpoint (a U-Net with ``extra_references``, like the
bundled checkpoints/refiner) is fast mode plus the refiner (`pipelines/quality.py`), which rebuilds each warped crop
in a few denoising steps before the same paste-back; with a plain L2V checkpoint it is the path above. In fast mode and
with a refiner a portrait is always dubbed as a still (the bank can bend lips, not turn a head), and video frames
without a face are passed through untouched (counted in a warning) instead of being an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import warnings

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..canonical import canonicalize, uncanonicalize
from ..detectors import FaceSelector, Landmarker, detect_image, extract_landmarks
from ..editing import dub_landmarks
from ..errors import LmdiffInputError
from ..appearance_bank import AppearanceBank
from ..landmarks import LandmarkSequence
from ..media import frame_count, iter_frames, probe_video
from ..motion import natural_motion
from ..smoothing import smooth_detections
from .a2l import AudioToLandmarksPipeline, speaker_references
from .fast import render_fast
from .l2v import LandmarkToVideoPipeline
from .quality import Refiner
from .timing import stage

IMAGE_MODES = ("one_shot", "still")
MODES = ("quality", "fast")


def _looped_frames(video: Path | np.ndarray, fps: float, n: int, length: int) -> Iterator[np.ndarray]:
    """n frames of a video (a file, or frames already at `fps`) of `length` frames, looped as often as needed."""
    if not isinstance(video, Path):
        yield from (video[i % length] for i in range(n))
        return
    done = 0
    while done < n:
        for frame in iter_frames(video, fps, max_frames=min(length, n - done)):
            yield frame
            done += 1


def _frames_at(frames, video_fps: float, fps: float) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 given at `video_fps`, resampled (nearest earlier frame) to `fps`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise LmdiffInputError(f"video frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if video_fps == fps:
        return frames
    n = frame_count(len(frames) / video_fps, fps)
    return frames[np.minimum((np.arange(n) * video_fps / fps + 1e-6).astype(int), len(frames) - 1)]


def _open_video(video, video_fps: float | None, fps: float) -> tuple[Path | np.ndarray, int, str]:
    """(video as a Path or frames at `fps`, its length in frames at `fps`, its name for messages)."""
    if isinstance(video, (str, Path)):
        video = Path(video)
        length, name = frame_count(probe_video(video).duration, fps), f"video {video}"
    else:
        video = _frames_at(video, video_fps or fps, fps)
        length, name = len(video), "the video"
    if length <= 0:
        raise LmdiffInputError(f"{name} is shorter than one frame at {fps:g} fps")
    return video, length, name


def _video_landmarks(
    video, landmarker: Landmarker, fps: float, name: str, max_gap: int | None, face: FaceSelector = "largest",
    smooth: bool = True,
) -> LandmarkSequence:
    """Landmarks of `face` in a video from `_open_video` (`max_gap` as in `extract_landmarks`), smoothed if `smooth`."""
    frames = iter_frames(video, fps) if isinstance(video, Path) else video
    source = extract_landmarks(frames, landmarker, fps, face, max_gap, source=name)
    return smooth_detections(source) if smooth else source


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
        video: str | Path | np.ndarray | None = None,
        video_fps: float | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        a2l_guidance_scale: float = 3.0,
        seed: int | None = 0,
        image_mode: str = "one_shot",
        n_frames: int | None = None,
        progress: Callable[[str, int, int], None] | None = None,
        face: FaceSelector = "largest",
        max_gap: int = 12,
        smooth: bool = True,
        fps: float | None = None,
        on_step: Callable[[], None] | None = None,
        mode: str = "quality",
        bank_frames: np.ndarray | None = None,
        bank_from_video: bool = True,
        crop_size: int = 256,
        bank_k: int = 3,
    ) -> tuple[Iterator[np.ndarray], int]:
        """(frames, n): an iterator over the n output frames (uint8 [H, W, 3]) for `audio` (16 kHz mono), from a
        portrait `image` (`image_mode` "one_shot" or "still") or a `video` to dub: a file, or frames uint8
        [T, H, W, 3] at `video_fps` (default: the output fps). The output is at `fps` (default: the A2L checkpoint's;
        another rate resamples the A2L landmarks in time); n = `n_frames`, by default ceil(audio duration x fps).
        `face` picks the person ("largest" or an index from the left, see `detectors.select_face`); for a video,
        gaps of up to `max_gap` frames without that face are filled and `smooth` smooths its landmarks in time.
        `progress(stage, done, total)`; `on_step()` after each denoising step (A2L diffusion and L2V).

        `mode` "quality" (L2V) or "fast" (appearance bank, see the module docstring). Fast mode and quality mode
        with a refiner: `bank_frames` uint8 [T, H, W, 3], more frames of the same person for the bank;
        `bank_from_video=False` keeps the video's own frames out of the bank (an evaluation dubbing its test frames
        must); `crop_size` (px) of the bank's face crops; `bank_k` entries blended per frame. Faceless frames pass
        through untouched. A refiner samples with its checkpoint's settings (`l2v.refine`: strength and steps);
        `num_inference_steps`, `guidance_scale`, `image_mode` and `max_gap` apply to a plain L2V only."""
        if (image is None) == (video is None):
            raise LmdiffInputError("give either a portrait image or a video to dub, not both or neither")
        if image_mode not in IMAGE_MODES:
            raise LmdiffInputError(f"image_mode must be one of {IMAGE_MODES}, got {image_mode!r}")
        if mode not in MODES:
            raise LmdiffInputError(f"mode must be one of {MODES}, got {mode!r}")
        timer = self.l2v.timer
        fps = self.a2l.fps if fps is None else float(fps)
        n = frame_count(len(audio) / 16000, fps) if n_frames is None else int(n_frames)
        if n <= 0:
            raise LmdiffInputError("the audio is too short: it gives no video frame")
        n_a2l = n if fps == self.a2l.fps else frame_count(n / fps, self.a2l.fps)
        report = (lambda name: lambda d, t: progress(name, d, t)) if progress else (lambda name: None)
        refiner = mode == "quality" and self.l2v.refine is not None
        if mode == "fast" or refiner:
            frames = self._generate_fast(
                audio, landmarker, image, video, video_fps, a2l_guidance_scale, seed, n, report,
                bank_frames, bank_from_video, crop_size, bank_k, face=face, smooth=smooth, fps=fps,
                refiner=refiner, on_step=on_step,
            )
            return frames, n
        if video is not None:
            video, length, name = _open_video(video, video_fps, fps)
            with stage(timer, "landmarks"):
                source = _video_landmarks(video, landmarker, fps, name, max_gap, face=face, smooth=smooth)
            length = len(source)  # fewer than probed only for partial media (`media.allow_partial_media`)
            talking = self._dub_talking(audio, source, n, a2l_guidance_scale, seed, report, fps, on_step)
            opening = source.mouth_opening()
            valid = np.flatnonzero(source.valid)
            index = np.arange(n) % length
            source_n = source[index]
            target = dub_landmarks(source_n, talking)
            identity_frame = int(valid[np.argsort(opening[valid])[len(valid) // 2]])
            frame = next(f for i, f in enumerate(_looped_frames(video, fps, length, length)) if i == identity_frame)
            identity = self.l2v.reference_crop(frame, source[identity_frame])
            frames = _looped_frames(video, fps, n, length)
            mode = "dub"
        else:
            with stage(timer, "landmarks"):
                reference = detect_image(image, landmarker, face, source="portrait")
            with stage(timer, "a2l"):
                talking = self.a2l(
                    audio,
                    canonicalize(reference),
                    n_frames=n_a2l,
                    guidance_scale=a2l_guidance_scale,
                    seed=seed,
                    progress=report("a2l"),
                    on_step=on_step,
                )
            talking = talking if n_a2l == n and fps == talking.fps else talking.resample(fps, n)
            source_n = reference[np.zeros(n, dtype=int)]
            if image_mode == "still":
                target = dub_landmarks(source_n, talking)
                mode = "dub"
            else:
                target = uncanonicalize(natural_motion(talking, self.a2l.motion_stats, seed))
                mode = "one_shot"
            identity = self.l2v.reference_crop(image, reference)
            frames = (image for _ in range(n))
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
            on_step=on_step,
        )
        return out, n

    def _dub_talking(
        self, audio, source: LandmarkSequence, n: int, guidance_scale, seed, report, fps: float, on_step=None
    ) -> LandmarkSequence:
        """A2L's canonical lips and jaw for `audio` as n frames at `fps`, personalised by `source`, the person's
        landmark track (`a2l.speaker_references`: frames across the person's mouth openings, silence pulled to the
        most closed mouth). The A2L runs at its own rate; another `fps` resamples its landmarks in time."""
        references, rest = speaker_references(source)
        n_a2l = n if fps == self.a2l.fps else frame_count(n / fps, self.a2l.fps)
        with stage(self.l2v.timer, "a2l"):
            talking = self.a2l(
                audio,
                references,
                n_frames=n_a2l,
                guidance_scale=guidance_scale,
                seed=seed,
                progress=report("a2l"),
                rest=rest,
                on_step=on_step,
            )
        return talking if n_a2l == n and fps == talking.fps else talking.resample(fps, n)

    def _generate_fast(
        self, audio, landmarker, image, video, video_fps, a2l_guidance_scale, seed, n, report,
        bank_frames, bank_from_video, crop_size, bank_k, face="largest", smooth=True, fps=None, refiner=False,
        on_step=None,
    ) -> Iterator[np.ndarray]:
        """The n output frames of `generate` in fast mode, or with `refiner` in quality mode with the L2V refiner
        (arguments as there; `report(stage)` -> a progress)."""
        timer = self.l2v.timer
        fps = self.a2l.fps if fps is None else fps
        banks = []
        if bank_frames is not None:
            extra = _frames_at(bank_frames, fps, fps)
            with stage(timer, "landmarks"):
                extra_lm = smooth_detections(
                    extract_landmarks(extra, landmarker, fps, max_gap=None, source="the bank frames")
                )
            with stage(timer, "bank"):
                banks.append(AppearanceBank.build(extra, extra_lm, crop_size, source="the bank frames"))
        if video is not None:
            video, length, name = _open_video(video, video_fps, fps)
            with stage(timer, "landmarks"):
                source = _video_landmarks(video, landmarker, fps, name, None, face=face, smooth=smooth)
            faceless = int((~source.valid).sum())
            if faceless:
                warnings.warn(f"{name}: no face in {faceless} of {length} frames; they are passed through untouched")
            if bank_from_video:
                with stage(timer, "bank"):
                    banks.append(AppearanceBank.build(_looped_frames(video, fps, length, length), source, crop_size,
                                                      source=name))
            frames = _looped_frames(video, fps, n, length)
            source_n = source[np.arange(n) % length]
        else:
            with stage(timer, "landmarks"):
                source = detect_image(image, landmarker, face, source="portrait")
            with stage(timer, "bank"):
                banks.insert(0, AppearanceBank.build([image], source, crop_size, source="the portrait"))
            frames = (image for _ in range(n))
            source_n = source[np.zeros(n, dtype=int)]
        if not banks:
            raise LmdiffInputError("fast mode needs an appearance bank: give bank_frames or leave bank_from_video on")
        bank = AppearanceBank.concatenate(banks)
        talking = self._dub_talking(audio, source, n, a2l_guidance_scale, seed, report, fps, on_step)
        target = dub_landmarks(source_n, talking)
        source_n = source_n.to_topology(target.topology)
        refine = Refiner.for_bank(self.l2v, bank, seed, on_step) if refiner else None
        return render_fast(
            frames, source_n, target, bank, k=bank_k, timer=timer, progress=report("fast"), refine=refine
        )

    @torch.no_grad()
    def __call__(self, *args, **kwargs) -> np.ndarray:
        """All frames of `generate` as one array [T, H, W, 3] uint8."""
        frames, _ = self.generate(*args, **kwargs)
        return np.stack(list(frames))
