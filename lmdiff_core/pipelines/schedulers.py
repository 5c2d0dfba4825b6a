"""The diffusers schedulers lmdiff samples with, built to match a model's training noise schedule."""

from __future__ import annotations

from ..errors import LmdiffInputError

SAMPLERS = ("ddim", "dpm++", "unipc", "ddpm")


def make_scheduler(model, kind: str = "ddim"):
    """A diffusers scheduler for `model` (its config's num_train_timesteps and prediction_type).

    "ddim", "dpm++" (DPM-Solver++ 2M), "unipc" for sampling; "ddpm" is the training noise schedule. All share one
    squared-cosine beta schedule, so a model trained with "ddpm" samples with any of them.
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    kinds = {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
    }
    if kind not in kinds:
        raise LmdiffInputError(f"unknown sampler {kind!r}, expected one of {list(SAMPLERS)}")
    options = dict(
        num_train_timesteps=model.config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=model.config.prediction_type,
    )
    if kind in ("ddim", "ddpm"):
        options["clip_sample"] = False
    return kinds[kind](**options)
