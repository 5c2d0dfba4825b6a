"""The one sampling loop of lmdiff's diffusion models (A2L diffusion and L2V), k-diffusion style: a denoiser is a
function ``(x, t) -> model output``, classifier-free guidance is a wrapper around one (`with_cfg`), and `denoise` runs
a diffusers scheduler over it."""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scaled model input [B, ...], timestep) -> output


def with_cfg(paired: Denoiser, guidance_scale: float) -> Denoiser:
    """Classifier-free guidance as a denoiser wrapper.

    `paired(x2, t)` runs the model once on `x2` = the input twice over [2B, ...], conditioned for the first B and
    unconditioned for the last B; the wrapper returns ``uncond + guidance_scale * (cond - uncond)`` [B, ...].
    """

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond, uncond = paired(torch.cat([x, x]), t).chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return guided


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    before_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Sample from `noise` with `scheduler` in `num_inference_steps` steps; returns the final sample (noise's shape).

    `before_step(sample, t)` may replace the sample before each model call (L2V pulls frames it already knows
    towards them); `on_step()` runs after each step (progress, or a Cancel that raises).
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    sample = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if before_step is not None:
            sample = before_step(sample, t)
        output = denoiser(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(output, t, sample, generator=generator).prev_sample
        if on_step is not None:
            on_step()
    return sample
