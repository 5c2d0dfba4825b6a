"""Pieces both trainers share: the saved step counter, per-step global randomness, full-state checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

KEEP_CHECKPOINTS = 2


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
        seed * 1_000_003 + step * 7 + {"noise": 1, "t": 2, "mask": 3, "one_shot": 4}[kind]
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
