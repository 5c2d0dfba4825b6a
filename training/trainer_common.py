"""Pieces both trainers share: the config file, the saved step counter, per-step global randomness, full-state
checkpoints and the run folder's protection."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from lmdiff_core.errors import LmdiffInputError

KEEP_CHECKPOINTS = 2


def load_config(path) -> dict:
    """A training config (YAML) with its model, data and train sections."""
    path = Path(path)
    if not path.is_file():
        raise LmdiffInputError(f"training config {path} does not exist")
    config = yaml.safe_load(path.read_text())
    for section in ("model", "data", "train"):
        if section not in config:
            raise LmdiffInputError(f"training config {path} has no '{section}' section")
    return config


class TrainingStep:
    """The step counter, saved with the checkpoint."""

    def __init__(self):
        self.value = 0

    def state_dict(self):
        return {"step": self.value}

    def load_state_dict(self, state):
        self.value = int(state["step"])


def global_random(step: int, seed: int, batch: int, shape: tuple, rank: int, world: int, kind: str, **kw):
    """A random tensor for the whole global batch of a step, sliced to this process's part of the batch."""
    generator = torch.Generator().manual_seed(
        seed * 1_000_003 + step * 7 + {"noise": 1, "t": 2, "mask": 3, "one_shot": 4, "prev": 5}[kind]
    )
    if kind == "noise":
        full = torch.randn((batch, *shape), generator=generator)
    elif kind == "t":
        full = torch.randint(0, kw["high"], (batch,), generator=generator)
    else:
        full = torch.rand((batch,), generator=generator) >= kw["p"]
    per = batch // world
    return full[rank * per : (rank + 1) * per]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("step_*"))
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run); a new run never goes into a folder that holds one."""
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise LmdiffInputError(f"--resume: {run_dir} has no checkpoint to resume from")
    if not resume and latest is not None:
        raise LmdiffInputError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return latest


def save_checkpoint(accelerator, run_dir: Path, step: int) -> None:
    """Full training state under checkpoints/step_NNNNNN, written to a temporary folder first."""
    folder = run_dir / "checkpoints" / f"step_{step:06d}"
    partial = folder.with_name(folder.name + ".partial")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        for old in sorted((run_dir / "checkpoints").glob("step_*"))[:-KEEP_CHECKPOINTS]:
            if not old.name.endswith(".partial"):
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def run_training_steps(
    accelerator,
    model,
    optimizer,
    lr_scheduler,
    loader,
    dataset,
    ema,
    params,
    step,
    max_steps: int,
    train_cfg: dict,
    run_dir: Path,
    loss_fn,
    validate_fn,
    default_every: int,
) -> bool:
    """The optimisation loop both trainers share, from `step` to `max_steps`: epochs reseed the loader and the
    dataset (a resumed run skips the batches already seen), gradient accumulation and clipping of `params`, EMA,
    `metrics.jsonl` (loss, lr, and `validate_fn()`'s numbers every `val_every` steps), checkpoints every
    `checkpoint_every` steps. `loss_fn(batch)` gives the loss. Returns False when interrupted (after saving a
    checkpoint), True when `max_steps` is reached."""
    import json
    import sys

    from tqdm.auto import tqdm

    metrics_path = run_dir / "metrics.jsonl"
    steps_per_epoch = len(loader)
    bar = tqdm(total=max_steps, initial=step.value, disable=not accelerator.is_main_process, desc="train")
    try:
        while step.value < max_steps:
            epoch = step.value // steps_per_epoch
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            skip = step.value - epoch * steps_per_epoch
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            for batch in batches:
                with accelerator.accumulate(model):
                    loss = loss_fn(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and train_cfg.get("grad_clip"):
                        accelerator.clip_grad_norm_(params, train_cfg["grad_clip"])
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                if not accelerator.sync_gradients:
                    continue
                ema.step(params)
                step.value += 1
                bar.update(1)
                loss_value = accelerator.reduce(loss.detach(), "mean").item()
                record = {"step": step.value, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
                if step.value % train_cfg.get("val_every", default_every) == 0 or step.value == max_steps:
                    record.update(validate_fn())
                if accelerator.is_main_process and (
                    step.value % train_cfg.get("log_every", 10) == 0 or len(record) > 3 or step.value == max_steps
                ):
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if step.value % train_cfg.get("checkpoint_every", default_every) == 0 or step.value == max_steps:
                    save_checkpoint(accelerator, run_dir, step.value)
                if step.value >= max_steps:
                    break
    except KeyboardInterrupt:
        save_checkpoint(accelerator, run_dir, step.value)
        print(f"interrupted at step {step.value}; resume with --resume", file=sys.stderr)
        return False
    bar.close()
    return True
