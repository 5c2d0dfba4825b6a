"""Pieces both trainers share: the config file, per-step global randomness, the run folder's protection and
resumption, and the optimisation loop."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml
from checkpoint import TrainingState, latest_checkpoint, remove_leftovers

from lmdiff_core.atomic import atomic_write
from lmdiff_core.errors import LmdiffInputError


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


def resume_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The newest complete checkpoint to resume from (None for a new run); a new run never goes into a folder that
    holds one."""
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise LmdiffInputError(f"--resume: {run_dir} has no complete checkpoint to resume from")
    if not resume and latest is not None:
        raise LmdiffInputError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return latest


def start_run(state: TrainingState, run_dir: Path, resume_from: Path | None) -> None:
    """Load the checkpoint (if any) and, on the main process, clear what killed runs left: half-written folders and
    `metrics.jsonl` lines after the checkpoint's step (a new run starts an empty one)."""
    if resume_from is not None:
        state.load(resume_from)
    if state.accelerator.is_main_process:
        if resume_from is not None:
            print(f"resuming from {resume_from}", file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(run_dir)
        remove_leftovers(run_dir / "checkpoints")
        trim_metrics(run_dir / "metrics.jsonl", state.step)
    state.accelerator.wait_for_everyone()


def trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (dropping a line a kill cut short), replacing the file atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_write(path) as partial:
        partial.write_text("".join(kept))


def run_training_steps(
    state: TrainingState,
    loader,
    dataset,
    params,
    max_steps: int,
    train_cfg: dict,
    run_dir: Path,
    loss_fn,
    validate_fn,
    default_every: int,
) -> bool:
    """The optimisation loop both trainers share, from `state.step` to `max_steps`: epochs reseed the loader and the
    dataset (a resumed run skips the batches already seen), gradient accumulation and clipping of `params`, EMA,
    `metrics.jsonl` (loss, lr, and `validate_fn()`'s numbers every `val_every` steps), checkpoints every
    `checkpoint_every` steps. `loss_fn(batch)` gives the loss. Returns False when interrupted (after saving a
    checkpoint), True when `max_steps` is reached."""
    from tqdm.auto import tqdm

    accelerator, model, optimizer, lr_scheduler = state.accelerator, state.model, state.optimizer, state.lr_scheduler

    metrics_path = run_dir / "metrics.jsonl"
    steps_per_epoch = len(loader)
    bar = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
    try:
        while state.step < max_steps:
            epoch = state.step // steps_per_epoch
            loader.set_epoch(epoch)
            dataset.set_epoch(epoch)
            skip = state.step - epoch * steps_per_epoch
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
                state.ema.step(params)
                state.step += 1
                bar.update(1)
                loss_value = accelerator.reduce(loss.detach(), "mean").item()
                record = {"step": state.step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}
                if state.step % train_cfg.get("val_every", default_every) == 0 or state.step == max_steps:
                    record.update(validate_fn())
                if accelerator.is_main_process and (
                    state.step % train_cfg.get("log_every", 10) == 0 or len(record) > 3 or state.step == max_steps
                ):
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                if state.step % train_cfg.get("checkpoint_every", default_every) == 0 or state.step == max_steps:
                    state.save(run_dir)
                if state.step >= max_steps:
                    break
    except KeyboardInterrupt:
        state.save(run_dir)
        print(f"interrupted at step {state.step}; resume with --resume", file=sys.stderr)
        return False
    bar.close()
    return True
