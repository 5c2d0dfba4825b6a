"""ComfyUI runtime services with plain fallbacks: progress bars, interruption, devices and precision.

Inside ComfyUI these use `comfy.utils` and `comfy.model_management`; without ComfyUI (library use, tests) progress
is not shown, nothing interrupts, and devices are picked from torch directly.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass

from ..lmdiff_core.errors import LmdiffInputError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def comfy_module(module: str):
    """A ComfyUI module, or None outside ComfyUI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def check_interrupted() -> None:
    """Raise ComfyUI's interruption exception when the user pressed Cancel (no-op outside ComfyUI)."""
    management = comfy_module("comfy.model_management")
    if management is not None:
        management.throw_exception_if_processing_interrupted()


class Progress:
    """A ComfyUI progress bar over `total` steps; calling it with (done[, total]) also honours a Cancel."""

    def __init__(self, total: int):
        utils = comfy_module("comfy.utils")
        self.bar = utils.ProgressBar(max(int(total), 1)) if utils is not None else None

    def __call__(self, done: int, total: int | None = None) -> None:
        check_interrupted()
        if self.bar is not None:
            self.bar.update_absolute(int(done), None if total is None else int(total))


def torch_device(choice: str = "auto"):
    """The device a model runs on: ComfyUI's device for "auto" inside ComfyUI, else CUDA when present, else CPU."""
    import torch

    if choice not in DEVICES:
        raise LmdiffInputError(f"device must be one of {DEVICES}, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    management = comfy_module("comfy.model_management")
    if choice == "auto" and management is not None:
        return management.get_torch_device()
    if torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise LmdiffInputError("device 'cuda' was chosen but torch sees no CUDA GPU: choose 'auto' or 'cpu'")
    return torch.device("cpu")


def offload_device(device):
    """Where a model waits between runs: ComfyUI's offload device inside ComfyUI, else the CPU."""
    import torch

    management = comfy_module("comfy.model_management")
    if management is not None and device.type != "cpu":
        return management.unet_offload_device()
    return torch.device("cpu")


def free_memory() -> None:
    """Release cached accelerator memory after a model went back to its offload device."""
    management = comfy_module("comfy.model_management")
    if management is not None:
        management.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def torch_dtype(precision: str, device):
    """The weight dtype for `precision`; "auto" is bf16 (or fp16) on a CUDA GPU and fp32 elsewhere."""
    import torch

    if precision not in PRECISIONS:
        raise LmdiffInputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass
class LoadedPipeline:
    """What a loader node outputs: a pipeline, the device it runs on and its movable parts (torch modules or
    autoencoders), which wait on the offload device between runs."""

    pipeline: object
    device: object
    parts: tuple

    @contextmanager
    def running(self):
        """The pipeline with its parts on the run device; afterwards they go back to the offload device."""
        for part in self.parts:
            part.to(self.device)
        try:
            yield self.pipeline
        finally:
            offload = offload_device(self.device)
            if offload != self.device:
                for part in self.parts:
                    part.to(offload)
                free_memory()
