"""`AudioToLandmarksPipeline`: speech + the speaker's reference landmarks -> canonical landmarks at 25 fps.

A checkpoint folder (what the trainer writes to RUN_DIR/final) holds the model (`save_pretrained`: config.json with
`_class_name` + safetensors), `lmdiff_a2l.json` (landmark topology, frame rate, audio-feature config, head-motion
statistics of the training set) and, for the diffusion model, `scheduler/`.

Any audio length runs in bounded memory: overlapping windows whose overlaps are cross-faded; each diffusion window is
also conditioned on the frames already generated before it. The output has exactly ceil(duration * fps) frames.
Silent stretches are pulled to the reference's mouth (still and closed when the reference's mouth is closed), or
to a separate `rest` frame.

Several reference frames (e.g. `speaker_references` of a video) give the mean of one prediction per frame: the models
are trained with a random frame of the clip as the reference, so one frame picks one arbitrary offset (a closed-mouth
reference gives a mouth that barely opens), while the mean over frames that span the person's range does not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..audio_features import AudioFeatureExtractor, audio_to_mono16k, load_feature_extractor
from ..canonical import CANONICAL_SIZE, canonicalize, from_model_units, to_model_units
from ..checkpoints import read_checkpoint_info
from ..editing import rest_frame
from ..errors import LmdiffInputError
from ..landmarks import LandmarkSequence
from ..media import frame_count
from ..models import A2LLSTM, A2LDiffusion
from ..motion import MotionStats
from .sampling import denoise, with_cfg
from .schedulers import load_scheduler, make_scheduler

CHECKPOINT_INFO = "lmdiff_a2l.json"
SILENCE_BELOW_LOUD_DB = 40.0  # frames this far below the clip's loud frames are silent
SILENCE_FLOOR_DB = -60.0  # and so is anything quieter than this (dB full scale)
SILENCE_MIN_SECONDS = 0.2
MIN_AUDIO_SECONDS = 0.2  # shorter audio holds no syllable to animate
REFERENCE_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)  # of the mouth opening: the frames `speaker_references` picks


def speaker_references(
    source: LandmarkSequence, quantiles: tuple[float, ...] = REFERENCE_QUANTILES
) -> tuple[LandmarkSequence, LandmarkSequence]:
    """(references, rest) from a person's landmark track: the frames at these quantiles of the mouth opening among
    frames with a face (each frame once, in time order), and the most closed-mouth frame (1 frame)."""
    at_rest = rest_frame(source)  # checks that some frame has a face
    valid = np.flatnonzero(source.valid)
    order = valid[np.argsort(source.mouth_opening()[valid], kind="stable")]
    picks = [int(order[int(round(q * (len(order) - 1)))]) for q in quantiles]
    return source[np.unique(picks)], source[at_rest : at_rest + 1]


def silence_gate(audio: np.ndarray, n_frames: int, fps: float = 25.0, sample_rate: int = 16000) -> np.ndarray:
    """[T] in 0..1: 1 where the audio is silent for at least SILENCE_MIN_SECONDS, with short ramps at the edges."""
    from scipy.ndimage import binary_opening, uniform_filter1d

    per_frame = sample_rate / fps
    edges = np.round(np.arange(n_frames + 1) * per_frame).astype(int)
    padded = np.pad(audio.astype(np.float64), (0, max(0, edges[-1] - len(audio))))
    energy = np.array([np.mean(padded[a:b] ** 2) if b > a else 0.0 for a, b in zip(edges[:-1], edges[1:])])
    db = 10 * np.log10(energy + 1e-12)
    loud = np.percentile(db, 95) if n_frames else 0.0
    silent = (db < loud - SILENCE_BELOW_LOUD_DB) | (db < SILENCE_FLOOR_DB)
    run = max(int(round(SILENCE_MIN_SECONDS * fps)), 1)
    silent = binary_opening(silent, structure=np.ones(run)) if n_frames >= run else np.zeros(n_frames, bool)
    return np.clip(uniform_filter1d(silent.astype(np.float64), 3), 0.0, 1.0) * silent


def _crossfade_weights(overlap: int) -> np.ndarray:
    return (np.arange(1, overlap + 1) / (overlap + 1)).astype(np.float32)


class AudioToLandmarksPipeline:
    """Runs an A2L model (A2LLSTM or A2LDiffusion) over any length of speech."""

    def __init__(
        self,
        model: A2LLSTM | A2LDiffusion,
        features: AudioFeatureExtractor | None = None,
        topology: str = "ibug68",
        fps: float = 25.0,
        motion_stats: MotionStats | None = None,
        scheduler=None,
        window: int | None = None,
    ):
        self.model = model.eval()
        # Frames per inference window: the training window (an LSTM has only learnt to run that long from rest).
        self.window = int(window or getattr(model.config, "window", 50))
        self.features = features or load_feature_extractor("logmel")
        self.topology = topology
        self.fps = float(fps)
        self.motion_stats = motion_stats or MotionStats()
        self.is_diffusion = isinstance(model, A2LDiffusion)
        self.scheduler = scheduler if scheduler is not None or not self.is_diffusion else make_scheduler(model)
        cfg = model.config
        if (cfg.audio_dim, cfg.audio_sub_frames, cfg.audio_layers) != (
            self.features.dim,
            self.features.sub_frames,
            self.features.layers,
        ):
            raise LmdiffInputError(
                f"the audio features ({self.features.name}: k={self.features.sub_frames}, L={self.features.layers}, "
                f"D={self.features.dim}) do not match the model (k={cfg.audio_sub_frames}, L={cfg.audio_layers}, "
                f"D={cfg.audio_dim})"
            )

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder)
        info = {
            "model_class": type(self.model).__name__,
            "topology": self.topology,
            "fps": self.fps,
            "audio_features": self.features.config(),
            "motion_stats": self.motion_stats.to_dict(),
            "window": self.window,
        }
        (folder / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        if self.scheduler is not None:
            self.scheduler.save_pretrained(folder / "scheduler")
        return folder

    @classmethod
    def from_pretrained(cls, folder, device: str | torch.device = "cpu", dtype=torch.float32):
        folder = Path(folder)
        info = read_checkpoint_info(
            folder, CHECKPOINT_INFO, "A2L", ("model_class", "audio_features", "topology", "fps")
        )
        classes = {"A2LLSTM": A2LLSTM, "A2LDiffusion": A2LDiffusion}
        if info.get("model_class") not in classes:
            raise LmdiffInputError(f"{folder}: unknown A2L model class {info.get('model_class')!r}")
        try:
            model = classes[info["model_class"]].from_pretrained(folder, torch_dtype=dtype).to(device)
        except (ValueError, OSError) as exc:
            raise LmdiffInputError(f"{folder}: cannot load the A2L model: {exc}") from None
        scheduler = load_scheduler(folder / "scheduler", model) if (folder / "scheduler").is_dir() else None
        return cls(
            model,
            load_feature_extractor(info["audio_features"]),
            info["topology"],
            info["fps"],
            MotionStats(**info.get("motion_stats", {})),
            scheduler,
            info.get("window"),
        )

    # -- inference --------------------------------------------------------------------------------------------------
    def reference_points(self, reference: LandmarkSequence) -> np.ndarray:
        """[R, N, 3] model-unit landmarks of every frame of image-space or canonical reference landmarks."""
        if not isinstance(reference, LandmarkSequence) or len(reference) == 0:
            raise LmdiffInputError("the reference must be a LandmarkSequence with at least one frame")
        canonical = reference if reference.space == "canonical" else canonicalize(reference)
        canonical = canonical.to_topology(self.topology)
        return to_model_units(canonical.points)

    def __call__(
        self,
        audio,
        reference: LandmarkSequence,
        n_frames: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int | None = 0,
        window: int | None = None,
        overlap: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        rest: LandmarkSequence | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> LandmarkSequence:
        """Canonical landmarks for `audio` (array at 16 kHz, ComfyUI AUDIO dict or path), one per 1/fps: the mean
        prediction over the `reference` frames (see `speaker_references`); silence pulls to `rest` (as
        `predict_features`).

        The result keeps the reference's pose (its first frame's, if it has one) on every frame, so `uncanonicalize`
        puts the talking face where the reference face is.
        """
        audio = audio_to_mono16k(audio)
        seconds = len(audio) / self.features.sample_rate
        if seconds < MIN_AUDIO_SECONDS:
            raise LmdiffInputError(
                f"the audio is {seconds:.3f} s long; speech-driven landmarks need at least {MIN_AUDIO_SECONDS} s"
            )
        n = frame_count(seconds, self.fps) if n_frames is None else int(n_frames)
        if n <= 0:
            raise LmdiffInputError("the audio is too short: it gives no video frame")
        return self.predict_features(
            self.features(audio, n),
            reference,
            silence=silence_gate(audio, n, self.fps, self.features.sample_rate),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            window=window,
            overlap=overlap,
            progress=progress,
            rest=rest,
            on_step=on_step,
        )

    @torch.no_grad()
    def predict_features(
        self,
        features: np.ndarray,
        reference: LandmarkSequence,
        silence: np.ndarray | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int | None = 0,
        window: int | None = None,
        overlap: int | None = None,
        progress: Callable[[int, int], None] | None = None,
        rest: LandmarkSequence | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> LandmarkSequence:
        """Landmarks from precomputed audio features [T, k, L, D]: the mean of one prediction per `reference` frame;
        `silence` [T] pulls frames to `rest` (one frame; default the first reference frame).

        `progress(done, total)` after each window; `on_step()` after each denoising step of the diffusion model (a
        Cancel raises there)."""
        n = len(features)
        refs = self.reference_points(reference)
        window = window or self.window
        if overlap is None:
            overlap = self.model.config.prev_frames // 2 if self.is_diffusion else window // 2
        if not 0 <= overlap < window:
            raise LmdiffInputError(f"window overlap {overlap} must be at least 0 and below the window ({window})")
        out = np.zeros((n, refs.shape[1], 3), dtype=np.float32)
        for r, ref in enumerate(refs):
            report = None
            if progress is not None:
                report = lambda done, total, r=r: progress(r * total + done, len(refs) * total)  # noqa: E731
            out += self._windows(
                features, ref, window, overlap, num_inference_steps, guidance_scale, seed, report, on_step
            )
        out /= len(refs)
        if silence is not None:
            still = refs[0] if rest is None else self.reference_points(rest)[0]
            out = out * (1 - silence[:, None, None]) + still[None] * silence[:, None, None]
        pose = image_size = None
        if reference.space == "canonical" and reference.pose is not None:
            pose, image_size = np.repeat(reference.pose[:1], n, axis=0), reference.image_size
        return LandmarkSequence(
            points=from_model_units(out),
            topology=self.topology,
            fps=self.fps,
            frame_size=CANONICAL_SIZE,
            space="canonical",
            pose=pose,
            image_size=image_size,
        )

    def _windows(self, features, ref, window, overlap, steps, guidance_scale, seed, progress, on_step) -> np.ndarray:
        """[T, N, 3] model-unit landmarks for features [T, k, L, D] and one reference [N, 3], window by window."""
        n = len(features)
        param = next(self.model.parameters())
        ref_t = torch.from_numpy(ref).to(param)[None]
        out = np.zeros((n, len(ref), 3), dtype=np.float32)
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        start, done = 0, 0
        while done < n:
            stop = min(start + window, n)
            audio_t = torch.from_numpy(np.ascontiguousarray(features[start:stop])).to(param)[None]
            if self.is_diffusion:
                prev_start = max(0, start - self.model.config.prev_frames)
                prev = None if start == 0 else torch.from_numpy(out[prev_start:start])
                block = self._denoise(audio_t, ref_t, prev, steps, guidance_scale, generator, param, on_step)
            else:
                block = self.model(audio_t, ref_t)[0].float().cpu().numpy()
            fade = min(done - start, len(block))
            if fade > 0:
                w = _crossfade_weights(fade)[:, None, None]
                out[start : start + fade] = out[start : start + fade] * (1 - w) + block[:fade] * w
            out[start + fade : stop] = block[fade:]
            done = stop
            start = stop - overlap if stop < n else stop
            if progress is not None:
                progress(done, n)
        return out

    def _denoise(self, audio, reference, prev, steps, guidance_scale, generator, param, on_step=None) -> np.ndarray:
        """One window of landmarks [W, N, 3] (model units) by `sampling.denoise`, guided on the audio."""
        model = self.model
        shape = (1, audio.shape[1], reference.shape[1], 3)
        noise = torch.randn(shape, generator=generator).to(param)
        prev = None if prev is None else prev.to(param)[None]

        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, audio, reference, prev)

        denoiser = conditional
        if guidance_scale != 1.0:
            audio2, reference2 = audio.repeat(2, 1, 1, 1, 1), reference.repeat(2, 1, 1)
            prev2 = None if prev is None else prev.repeat(2, 1, 1, 1)
            audio_mask = torch.tensor([True, False])  # the second half is unconditional (no audio)
            paired = lambda x2, t: model(x2, t, audio2, reference2, prev2, audio_mask=audio_mask)  # noqa: E731
            denoiser = with_cfg(paired, guidance_scale)
        sample = denoise(denoiser, self.scheduler, noise, steps, generator, on_step=on_step)
        return model.sample_to_landmarks(sample, reference)[0].float().cpu().numpy()
