"""`quality` mode: fast mode's warped retrieval refined by an L2V U-Net that takes it as one more reference.

Per batch of output frames, `render_fast` (`pipelines/fast.py`) crops the frames, retrieves and warps the person's
own frames onto the target landmarks and matches their colour; `Refiner` then rebuilds the crop with the refiner
U-Net (`L2VUNet` with ``extra_references=1``, x0 prediction) from: the target landmarks drawn as the condition, the
frame's crop with the lower face greyed out (the union of the frame's and the target's pose masks, as in dubbing),
an identity crop, and the warped reference itself. Sampling is SDEdit-like (`sdedit`): the warped reference noised
to `strength` x the training timesteps, then `steps` deterministic DDIM steps down to a clean crop, every frame with
the same noise. The result is pasted back by `render_fast` under fast mode's feathered lower-face mask.
"""

from __future__ import annotations

import numpy as np
import torch

from ..conditioning import pose_reference, render_condition
from ..landmarks import LandmarkSequence
from .timing import stage

DEFAULT_STRENGTH = 0.5
DEFAULT_STEPS = 2


def sdedit_timesteps(num_train_timesteps: int, strength: float, steps: int) -> list[int]:
    """The `steps` timesteps of an SDEdit run from `strength` x the training range, evenly spaced down to 0 (excl.)."""
    start = strength * (num_train_timesteps - 1)
    return [int(round(start * (steps - i) / steps)) for i in range(steps)]


@torch.no_grad()
def sdedit(denoise, start: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps) -> torch.Tensor:
    """Deterministic DDIM from `start` [N, C, h, w] noised to timesteps[0] with `noise` [N, C, h, w] (or [1, ...]).

    `denoise(sample, t)` returns the clean estimate x0 [N, C, h, w]; after the last step x0 is returned."""
    ab = alphas_cumprod.to(start)
    t0 = int(timesteps[0])
    sample = ab[t0].sqrt() * start + (1 - ab[t0]).sqrt() * noise
    x0 = start
    for i, t in enumerate(timesteps):
        x0 = denoise(sample, int(t))
        if i + 1 < len(timesteps):
            nxt = int(timesteps[i + 1])
            eps = (sample - ab[int(t)].sqrt() * x0) / (1 - ab[int(t)]).sqrt()
            sample = ab[nxt].sqrt() * x0 + (1 - ab[nxt]).sqrt() * eps
    return x0


class Refiner:
    """The `refine` hook of `render_fast` for one job: `refiner(crops, warped, source_crop, target_crop)` -> refined
    crops [F, 3, S, S] in 0..1 (see the module docstring).

    l2v: a `LandmarkToVideoPipeline` whose U-Net has extra_references=1 (and its autoencoder); identity: the
    identity crop [3, S', S'] (`l2v.reference_crop`); crops are resized to the pipeline's crop size and back."""

    def __init__(self, l2v, identity: torch.Tensor, strength: float = DEFAULT_STRENGTH, steps: int = DEFAULT_STEPS,
                 seed: int | None = 0, on_step=None):
        self.l2v, self.strength, self.steps, self.on_step = l2v, float(strength), int(steps), on_step
        unet, ae = l2v.unet, l2v.autoencoder
        self.size = l2v.crop_size
        self.identity = l2v._encode(_resize(identity[None].float(), self.size))
        h = self.size // ae.downscale
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
        self.noise = torch.randn((1, ae.latent_channels, h, h), generator=generator).to(unet.device, unet.dtype)
        self.timesteps = sdedit_timesteps(unet.config.num_train_timesteps, self.strength, self.steps)

    @classmethod
    def for_bank(cls, l2v, bank, seed: int | None = 0, on_step=None) -> "Refiner":
        """The refiner of a job whose appearance bank is `bank`, with its checkpoint's settings (`l2v.refine`); the
        identity crop is the bank entry with the most typical lips (the refiner was trained on bank entries)."""
        typical = int(np.argmin(((bank.lips - bank.lips.mean(0)) ** 2).sum((1, 2))))
        return cls(l2v, bank.crops[typical].float() / 255.0, **l2v.refine, seed=seed, on_step=on_step)

    def __call__(self, crops, warped, source_crop: LandmarkSequence, target_crop: LandmarkSequence) -> torch.Tensor:
        l2v, unet, size = self.l2v, self.l2v.unet, self.size
        device, dtype = unet.device, unet.dtype
        out_size = crops.shape[-1]
        crops, warped = _resize(crops, size), _resize(warped, size)
        f = len(crops)
        with stage(l2v.timer, "crop"):
            condition = render_condition(target_crop.to_topology(l2v.topology), size).to(device, dtype)
            both = LandmarkSequence.concatenate([source_crop, target_crop]).to_topology(l2v.topology)
            _, mask = pose_reference(crops.repeat(2, 1, 1, 1), both)
            mask = torch.maximum(mask[:f], mask[f:])
            masked = crops * (1 - mask) + 0.5 * mask
        with stage(l2v.timer, "encode"):
            pose_latent, reference = l2v._encode(masked), l2v._encode(warped)
        identity = self.identity.expand(f, -1, -1, -1)
        mask = mask.to(device, dtype)

        def denoise(sample, t):
            out = unet(sample, t, condition, pose_latent, mask, identity, references=reference)
            if self.on_step is not None:
                self.on_step()
            return out

        with stage(l2v.timer, "denoise"):
            alphas = l2v.scheduler.alphas_cumprod
            latents = sdedit(denoise, reference, self.noise.expand(f, -1, -1, -1), alphas, self.timesteps)
        with stage(l2v.timer, "decode"):
            return _resize(l2v.autoencoder.decode(latents.float()).cpu(), out_size)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size:
        return images
    import torch.nn.functional as F

    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
