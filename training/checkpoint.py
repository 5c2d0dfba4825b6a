"""Full training state on disk without pickle, in checkpoint folders that appear complete or not at all.

`checkpoints/step_NNNNNN/` holds, for each part of the state (model, EMA, optimizer, LR schedule, gradient scaler,
step counters, each process's random generators), `<part>.safetensors` (its tensors) and `<part>.json` (everything
else, naming the tensors it refers to), and, written last, `checkpoint.json` (the step and every file's size). The
folder is written as `step_NNNNNN.partial` and renamed once complete, so a kill at any moment leaves the complete
checkpoints as they were; only folders whose `checkpoint.json` matches their files are resumed from. Loading reads
safetensors and JSON only: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MARKER = "checkpoint.json"
KEEP_CHECKPOINTS = 2
_NAME = re.compile(r"^step_(\d{6,})$")
_LEFTOVER = re.compile(r"\.(partial|deleting)$")


# ---- state trees: tensors to safetensors, the rest to JSON -----------------------------------------------------------
def _encode(value, tensors: dict, name: str):
    """A JSON-able tree for `value`; its tensors go to `tensors` under unique names (the tree names them)."""
    if isinstance(value, torch.Tensor):
        key = name or "tensor"
        while key in tensors:
            key += "'"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.str, "shape": list(value.shape), "data": value.ravel().tolist()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    join = (lambda key: f"{name}.{key}") if name else str
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, join(i)) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, join(i)) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v, tensors, join(k)) for k, v in value.items()}
        return {"__items__": [[_encode(k, tensors, ""), _encode(v, tensors, join(k))] for k, v in value.items()]}
    raise TypeError(f"cannot checkpoint a {type(value).__name__} without pickle ({name})")


def _decode(tree, tensors: dict):
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.asarray(tree["data"], dtype=np.dtype(tree["__ndarray__"])).reshape(tree["shape"])
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    if "__items__" in tree:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__items__"]}
    return {k: _decode(v, tensors) for k, v in tree.items()}


def _pause() -> None:
    """Test hook: LMDIFF_TEST_CHECKPOINT_PAUSE seconds after each file written (and each folder renamed for removal),
    so a test can kill a run mid-save."""
    time.sleep(float(os.environ.get("LMDIFF_TEST_CHECKPOINT_PAUSE", 0)))


def _synced(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    _pause()


def save_part(folder: Path, name: str, state) -> None:
    """`state` (nested dicts/lists/tuples of tensors, arrays and plain values) as `name`.safetensors + `name`.json."""
    tensors: dict = {}
    tree = _encode(state, tensors, "")
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _synced(folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(tree))
    _synced(folder / f"{name}.json")


def load_part(folder: Path, name: str, device="cpu"):
    """The state `save_part` wrote, its tensors on `device`."""
    tensors = load_file(str(folder / f"{name}.safetensors"), device=str(device))
    return _decode(json.loads((folder / f"{name}.json").read_text()), tensors)


# ---- checkpoint folders ----------------------------------------------------------------------------------------------
def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder: its marker names its step and the size of each of its files."""
    match = _NAME.match(folder.name)
    if not match or not (folder / MARKER).is_file():
        return None
    try:
        marker = json.loads((folder / MARKER).read_text())
        files = marker["files"]
        if marker["step"] != int(match.group(1)) or not files:
            return None
        if any((folder / name).stat().st_size != size for name, size in files.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return marker["step"]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoint folders, oldest first."""
    root = run_dir / "checkpoints"
    found = [(checkpoint_step(p), p) for p in root.iterdir()] if root.is_dir() else []
    return [p for step, p in sorted((s, p) for s, p in found if s is not None)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_folder(folder: Path) -> None:
    """Rename to `<name>.deleting` first, so a kill during the removal leaves no half folder under its name."""
    if folder.exists():
        doomed = folder.with_name(folder.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(folder, doomed)
        _pause()
        shutil.rmtree(doomed)


def publish_folder(partial: Path, folder: Path) -> None:
    """Put the finished folder `partial` in the place of `folder` (replacing it, if any) by renames."""
    remove_folder(folder)
    os.replace(partial, folder)
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_leftovers(folder: Path) -> None:
    """Remove the `.partial` / `.deleting` folders killed saves left in `folder`."""
    if folder.is_dir():
        for entry in folder.iterdir():
            if _LEFTOVER.search(entry.name):
                shutil.rmtree(entry, ignore_errors=True)


# ---- the training state ----------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TrainingState:
    """What a checkpoint holds: the prepared model, optimizer and LR schedule, the EMA, the gradient scaler, the
    optimisation step (`step`) and Accelerate's micro-step, and each process's random generators."""

    def __init__(self, accelerator, model, optimizer, lr_scheduler, ema):
        from accelerate.utils import DistributedType

        if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            from lmdiff_core.errors import LmdiffInputError

            raise LmdiffInputError(
                f"{accelerator.distributed_type.value}: not supported (its sharded optimizer state has no "
                "pickle-free checkpoint); use the multi-GPU DDP config"
            )
        self.accelerator, self.model, self.optimizer, self.lr_scheduler, self.ema = (
            accelerator,
            model,
            optimizer,
            lr_scheduler,
            ema,
        )
        self.step = 0

    def _write(self, folder: Path) -> None:
        acc = self.accelerator
        save_part(folder, f"rng_{acc.process_index}", _rng_state())
        if not acc.is_main_process:
            return
        save_part(folder, "model", acc.unwrap_model(self.model).state_dict())
        save_part(folder, "ema", self.ema.state_dict())
        save_part(folder, "optimizer", self.optimizer.state_dict())
        save_part(folder, "lr_scheduler", self.lr_scheduler.state_dict())
        if acc.scaler is not None:
            save_part(folder, "scaler", acc.scaler.state_dict())
        save_part(folder, "trainer", {"step": self.step, "accelerator_step": acc.step})

    def save(self, run_dir: Path) -> Path:
        """Write checkpoints/step_NNNNNN (all processes call this); then keep the newest KEEP_CHECKPOINTS."""
        acc = self.accelerator
        root = run_dir / "checkpoints"
        folder = root / f"step_{self.step:06d}"
        if checkpoint_step(folder) == self.step:  # saved already (an interrupt right after a checkpoint)
            return folder
        partial = folder.with_name(folder.name + ".partial")
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root)
            partial.mkdir()
        acc.wait_for_everyone()
        self._write(partial)
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {p.name: p.stat().st_size for p in sorted(partial.iterdir())}
            marker = {"step": self.step, "processes": acc.num_processes, "files": files}
            (partial / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            _synced(partial / MARKER)
            publish_folder(partial, folder)
            for old in complete_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
                remove_folder(old)
        acc.wait_for_everyone()
        return folder

    def load(self, folder: Path) -> None:
        """Restore everything `save` wrote (tensors land where the live ones are)."""
        acc = self.accelerator
        acc.unwrap_model(self.model).load_state_dict(load_part(folder, "model"))
        device = self.ema.shadow_params[0].device if self.ema.shadow_params else "cpu"
        self.ema.load_state_dict(load_part(folder, "ema", device))
        self.optimizer.load_state_dict(load_part(folder, "optimizer"))
        self.lr_scheduler.load_state_dict(load_part(folder, "lr_scheduler"))
        if acc.scaler is not None:
            acc.scaler.load_state_dict(load_part(folder, "scaler"))
        trainer = load_part(folder, "trainer")
        self.step, acc.step = trainer["step"], trainer["accelerator_step"]
        if (folder / f"rng_{acc.process_index}.json").is_file():
            _set_rng_state(load_part(folder, f"rng_{acc.process_index}"))
