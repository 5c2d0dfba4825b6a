"""`LandmarkToVideoPipeline`: landmarks + references -> face video, with the L2V U-Net (a diffusers DiffusionPipeline).

A checkpoint folder holds ``unet/`` (`L2VUNet.save_pretrained`), ``scheduler/`` and ``lmdiff_l2v.json`` (crop size,
landmark topology, window and overlap, which autoencoder the U-Net was trained with and, for a quality-mode refiner (a
U-Net with ``extra_references``, `pipelines/quality.py`), its sampling settings ``refine``). The autoencoder itself is
not part of the folder (users keep those under ``models/vae``): `from_pretrained(folder, autoencoder=...)` takes a
`LatentAutoencoder` and refuses one whose latents do not match the U-Net.

Modes, per frame t of the output:
- dubbing: the pose reference is the source frame's face crop with the lower face greyed out; the identity reference
  is a crop of another frame of the same video; the generated crop is pasted back under a feathered lower-face mask.
- one-shot: the pose reference is the portrait's crop and the whole crop is generated (mask = 1), then pasted back
  under a feathered face mask.

Temporal coherence (`generate`): every frame starts from the same noise; frames are denoised together in windows of
`window` frames, so the U-Net's temporal attention sees the whole window; consecutive windows overlap by `overlap`
frames: while a window is denoised its first frames are pulled, at every step, towards the previous window's
result noised to the current level (conditioning on the frames already generated), and once done the overlapping
latents are blended linearly. Memory stays bounded: frames stream in and out one window at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..atomic import atomic_write
from ..checkpoints import read_checkpoint_info
from ..crop import CropTrack, compute_crop_track, crop_frames, face_masks, paste_back, transform_landmarks
from ..errors import LmdiffInputError
from ..conditioning import pose_reference, render_condition
from ..landmarks import LandmarkSequence
from ..models import L2VUNet
from .quality import DEFAULT_STEPS, DEFAULT_STRENGTH
from .sampling import denoise, with_cfg
from .schedulers import SAMPLERS, load_scheduler, make_scheduler
from .timing import StageTimer, stage

CHECKPOINT_INFO = "lmdiff_l2v.json"
MODES = ("dub", "one_shot")


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise LmdiffInputError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return int(value)


def _pull_known(scheduler, known: torch.Tensor, weight: torch.Tensor, noise: torch.Tensor):
    """A `denoise` before_step: the first K frames of the sample blended towards `known` [K, C, h, w] noised to the
    current level (with the window's own noise), by `weight` [K] in 0..1."""
    k, w = known.shape[0], weight.to(noise)[:, None, None, None]

    def before_step(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        noised = scheduler.add_noise(known, noise[:k], t.reshape(1).to(noise.device))
        return torch.cat([w * noised + (1 - w) * sample[:k], sample[k:]])

    return before_step


def sample_window(
    unet: L2VUNet,
    scheduler,
    noise: torch.Tensor,
    condition: torch.Tensor,
    pose_latent: torch.Tensor,
    pose_mask: torch.Tensor,
    identity_latent: torch.Tensor,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    known: torch.Tensor | None = None,
    known_weight: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Denoise one window of F frames [F, C, h, w] from `noise` with `scheduler` (`sampling.denoise`); `on_step()`
    runs after each step.

    `known` [K, C, h, w] (K <= F): clean latents already generated for the window's first K frames; at every step
    those frames are blended towards `known` noised to the current level with `known_weight` [K] in 0..1.
    Classifier-free guidance (`guidance_scale` != 1, `sampling.with_cfg`) contrasts the landmark condition with a
    blank one.
    """
    frames = noise.shape[0]

    def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x, t, condition, pose_latent, pose_mask, identity_latent, frames)

    denoiser = conditional
    if guidance_scale != 1.0:
        blank = torch.cat([condition, torch.zeros_like(condition)])
        pose2, mask2, identity2 = (x.repeat(2, 1, 1, 1) for x in (pose_latent, pose_mask, identity_latent))
        denoiser = with_cfg(lambda x2, t: unet(x2, t, blank, pose2, mask2, identity2, frames), guidance_scale)
    before_step = None if known is None else _pull_known(scheduler, known, known_weight, noise)
    return denoise(denoiser, scheduler, noise, num_inference_steps, generator, before_step, on_step)


class LandmarkToVideoPipeline(DiffusionPipeline):
    """Face crops generated from landmarks, pasted back into frames (see the module docstring)."""

    def __init__(
        self,
        unet: L2VUNet,
        scheduler,
        autoencoder=None,
        crop_size: int = 256,
        topology: str = "ibug68",
        window: int = 8,
        overlap: int = 2,
        refine: dict | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.crop_size = _check_int(crop_size, "crop_size", unet.size_multiple)
        if self.crop_size % unet.size_multiple:
            raise LmdiffInputError(f"crop_size must be a multiple of {unet.size_multiple}, got {crop_size}")
        self.topology = topology
        self.window = _check_int(window, "window", 1)
        self.overlap = _check_int(overlap, "overlap", 0)
        if self.overlap >= self.window:
            raise LmdiffInputError(f"overlap ({overlap}) must be smaller than window ({window})")
        if refine is not None and not unet.config.extra_references:
            raise LmdiffInputError("refine settings (strength, steps) go with a refiner U-Net (extra_references) only")
        if refine is None and unet.config.extra_references:
            refine = {"strength": DEFAULT_STRENGTH, "steps": DEFAULT_STEPS}
        self.refine = refine  # a refiner's sampling settings (`pipelines/quality.py`); None for a plain L2V
        self.autoencoder = None
        if autoencoder is not None:
            self.set_autoencoder(autoencoder)
        self.timer: StageTimer | None = None  # set one to measure the time of each stage

    # -- checkpoints ------------------------------------------------------------------------------------------------
    def set_autoencoder(self, autoencoder) -> None:
        """Use `autoencoder` (a `LatentAutoencoder`); its latents must be the ones the U-Net was trained on."""
        cfg = self.unet.config
        if autoencoder.latent_channels != cfg.latent_channels or autoencoder.downscale != cfg.downscale:
            raise LmdiffInputError(
                f"the autoencoder ({autoencoder.kind}: {autoencoder.latent_channels} latent channels, downscale "
                f"{autoencoder.downscale}) does not match the L2V model, trained on {cfg.autoencoder} latents "
                f"({cfg.latent_channels} channels, downscale {cfg.downscale})"
            )
        self.autoencoder = autoencoder

    def save_pretrained(self, folder, **_) -> Path:
        """Write the checkpoint folder; it appears complete or not at all (an existing one is replaced at the end)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder, folder=True) as tmp:
            self.unet.save_pretrained(tmp / "unet")
            self.scheduler.save_pretrained(tmp / "scheduler")
            info = {
                "crop_size": self.crop_size,
                "topology": self.topology,
                "window": self.window,
                "overlap": self.overlap,
                "autoencoder": self.unet.config.autoencoder,
            }
            if self.refine is not None:
                info["refine"] = self.refine
            (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        return folder

    @classmethod
    def from_pretrained(cls, folder, autoencoder=None, device="cpu", dtype=torch.float32, sampler: str = "ddim"):
        folder = Path(folder).expanduser()
        info = read_checkpoint_info(folder, CHECKPOINT_INFO, "L2V", ("crop_size", "topology", "window", "overlap"))
        try:
            unet = L2VUNet.from_pretrained(folder / "unet", torch_dtype=dtype).to(device)
        except (ValueError, OSError) as exc:
            raise LmdiffInputError(f"{folder}: cannot load the L2V U-Net: {exc}") from None
        pipe = cls(
            unet,
            load_scheduler(folder / "scheduler", unet, sampler),
            None,
            info["crop_size"],
            info["topology"],
            info["window"],
            info["overlap"],
            info.get("refine"),
        )
        if autoencoder is not None:
            pipe.set_autoencoder(autoencoder)
        return pipe

    def set_sampler(self, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise LmdiffInputError(f"unknown sampler {sampler!r}, expected one of {list(SAMPLERS)}")
        self.scheduler = make_scheduler(self.unet, sampler, dict(self.scheduler.config))  # keeps the noise schedule

    # -- inference --------------------------------------------------------------------------------------------------
    def reference_crop(self, image: np.ndarray, landmarks: LandmarkSequence) -> torch.Tensor:
        """The aligned crop [3, S, S] of one image (uint8 [H, W, 3]) with its one frame of image-space landmarks."""
        track = compute_crop_track(landmarks[:1], self.crop_size, smoothing=0)
        return crop_frames(np.array(image[None]), track)[0]

    def crop_track(self, source: LandmarkSequence) -> CropTrack:
        """The crop boxes the frames are generated in: those of the source's (smoothed) landmarks."""
        return compute_crop_track(source, self.crop_size)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(images.to(self.autoencoder.device)).to(self.unet.device, self.unet.dtype)

    def generate(
        self,
        frames: Iterable[np.ndarray],
        source: LandmarkSequence,
        target: LandmarkSequence,
        identity: torch.Tensor,
        mode: str = "dub",
        num_inference_steps: int = 20,
        guidance_scale: float = 1.0,
        seed: int | None = 0,
        shared_noise: bool = True,
        progress: Callable[[int, int], None] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> Iterator[np.ndarray]:
        """Output frames (uint8 [H, W, 3]) one by one.

        frames: the source frames (dub: the video; one-shot: the portrait repeated), as many as `target`;
        source: their image-space landmarks (the crop boxes and the kept regions come from them);
        target: the image-space landmarks to render (same frame size); identity: `reference_crop` of the identity
        image. `progress(done, total)` is called after each window, `on_step()` after each denoising step (a Cancel
        check may raise from either).
        """
        if self.autoencoder is None:
            raise LmdiffInputError("no autoencoder: pass one to from_pretrained or set_autoencoder")
        if mode not in MODES:
            raise LmdiffInputError(f"mode must be one of {MODES}, got {mode!r}")
        if len(source) != len(target) or source.frame_size != target.frame_size:
            raise LmdiffInputError(
                f"source and target landmarks must have the same length and frame size, got {len(source)} frames "
                f"{source.frame_size} and {len(target)} frames {target.frame_size}"
            )
        _check_int(num_inference_steps, "num_inference_steps", 1)
        n, size = len(target), self.crop_size
        track = self.crop_track(source)
        source_crop = transform_landmarks(source, track).to_topology(self.topology)
        target_crop = transform_landmarks(target, track).to_topology(self.topology)
        device, dtype = self.unet.device, self.unet.dtype
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        h = size // self.unet.config.downscale
        latent_shape = (self.unet.config.latent_channels, h, h)
        base_noise = torch.randn((1, *latent_shape), generator=generator)
        identity_latent = self._encode(identity[None].float())
        frame_iter = iter(frames)
        held_frames: list[np.ndarray] = []  # source frames of the frames not yet output
        known = None  # clean latents of the last `overlap` frames of the previous window (not yet output)
        start = 0  # first frame of the current window
        while start < n:
            stop = min(n, start + self.window)
            while len(held_frames) < stop - start:
                try:
                    held_frames.append(np.asarray(next(frame_iter)))
                except StopIteration:
                    raise LmdiffInputError(f"frames ended after {start + len(held_frames)} of {n}") from None
            batch = np.stack(held_frames[: stop - start])
            idx = np.arange(start, stop)
            with stage(self.timer, "crop"):
                crops = crop_frames(batch, track, idx)
                condition = render_condition(target_crop[start:stop], size).to(device, dtype)
                if mode == "dub":
                    both = LandmarkSequence.concatenate([source_crop[start:stop], target_crop[start:stop]])
                    masked, mask = pose_reference(crops.repeat(2, 1, 1, 1), both)
                    mask = torch.maximum(mask[: stop - start], mask[stop - start :])
                    masked = crops * (1 - mask) + 0.5 * mask
                else:
                    masked = identity[None].expand(stop - start, -1, -1, -1)
                    mask = torch.ones(stop - start, 1, size, size)
            with stage(self.timer, "encode"):
                pose_latent = self._encode(masked)
            noise = (
                base_noise.expand(stop - start, -1, -1, -1)
                if shared_noise
                else torch.randn((stop - start, *latent_shape), generator=generator)
            ).to(device, dtype)
            k = 0 if known is None else known.shape[0]
            weight = torch.linspace(1.0, 0.0, k + 2)[1:-1] if k else None
            with stage(self.timer, "denoise"):
                latents = sample_window(
                    self.unet,
                    self.scheduler,
                    noise,
                    condition,
                    pose_latent,
                    mask.to(device, dtype),
                    identity_latent.expand(stop - start, -1, -1, -1),
                    num_inference_steps,
                    guidance_scale,
                    known,
                    weight,
                    generator,
                    on_step,
                )
            if k:
                w = weight.to(latents)[:, None, None, None]
                latents = torch.cat([w * known + (1 - w) * latents[:k], latents[k:]])
            last = stop == n
            emit = stop - start if last else max(stop - start - self.overlap, 1)
            with stage(self.timer, "decode"):
                out_crops = self.autoencoder.decode(latents[:emit].to(self.autoencoder.device)).cpu()
            with stage(self.timer, "paste_back"):
                if mode == "dub":
                    paste_mask = mask[:emit]
                else:
                    paste_mask = face_masks(target_crop[start : start + emit], parts=("face",))["face"]
                pasted, _ = paste_back(batch[:emit], out_crops, track, idx[:emit], mask=paste_mask)
                pasted = (pasted.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for frame in pasted:
                yield frame
            known = latents[emit:] if emit < stop - start else None  # the overlap, still to be output
            held_frames = held_frames[emit:]
            start += emit
            if progress is not None:
                progress(start, n)

    def __call__(self, *args, **kwargs) -> np.ndarray:
        """All frames of `generate` as one array [T, H, W, 3] uint8."""
        return np.stack(list(self.generate(*args, **kwargs)))
