"""The diffusers schedulers lmdiff samples with, built to match a model's training noise schedule."""

from __future__ import annotations

from pathlib import Path

from ..errors import LmdiffInputError

SAMPLERS = ("ddim", "dpm++", "unipc", "ddpm")


def _classes() -> dict:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

    return {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm++": DPMSolverMultistepScheduler,
        "unipc": UniPCMultistepScheduler,
    }


def make_scheduler(model, kind: str = "ddim", saved: dict | None = None):
    """A diffusers scheduler for `model` (its config's num_train_timesteps and prediction_type).

    "ddim", "dpm++" (DPM-Solver++ 2M), "unipc" for sampling; "ddpm" is the training noise schedule. All share one
    squared-cosine beta schedule, so a model trained with "ddpm" samples with any of them. `saved`: the config of
    a scheduler a checkpoint saved; its noise schedule (train timesteps, beta schedule, prediction type) wins.
    """
    kinds = _classes()
    if kind not in kinds:
        raise LmdiffInputError(f"unknown sampler {kind!r}, expected one of {list(SAMPLERS)}")
    options = dict(
        num_train_timesteps=model.config.num_train_timesteps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=model.config.prediction_type,
    )
    options.update({key: saved[key] for key in options if saved and key in saved})
    if kind in ("ddim", "ddpm"):
        options["clip_sample"] = False
    return kinds[kind](**options)


def load_scheduler(folder, model, kind: str = "ddim"):
    """The scheduler a checkpoint saved in `folder` (its ``scheduler/``) as sampler `kind`: reloaded as saved when it
    is of that kind, else `make_scheduler` on the saved noise schedule; `make_scheduler(model, kind)` when the
    folder is absent."""
    folder = Path(folder)
    if not folder.is_dir():
        return make_scheduler(model, kind)
    kinds = _classes()
    if kind not in kinds:
        raise LmdiffInputError(f"unknown sampler {kind!r}, expected one of {list(SAMPLERS)}")
    try:
        saved = kinds[kind].load_config(folder)
    except (OSError, ValueError) as exc:
        raise LmdiffInputError(f"{folder}: cannot read the saved scheduler: {exc}") from None
    if saved.get("_class_name") == kinds[kind].__name__:
        return kinds[kind].from_config(saved)
    return make_scheduler(model, kind, saved)
