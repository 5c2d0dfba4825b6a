"""Reading weight files safely: safetensors, or a PyTorch state dict with `torch.load(weights_only=True)` (pickled
code is refused), and checking a file's names and shapes against a network before loading it."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from .errors import LmdiffInputError


def read_state_dict(path, what: str = "a weights file") -> dict[str, torch.Tensor]:
    """Tensors of `path` (safetensors by suffix, else a state dict read with weights_only=True); a missing or
    unreadable file raises LmdiffInputError naming it and `what` was expected. Nothing is ever downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmdiffInputError(f"{path} does not exist; expected {what}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise LmdiffInputError(f"cannot read {path} as a .safetensors file ({error}); expected {what}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
        state = None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LmdiffInputError(
            f"{path} is not a state dict of tensors readable by torch.load(weights_only=True) (pickled code is "
            f"refused); expected {what}"
        )
    return dict(state)


def check_state_dict(path, state: dict, expected: dict, what: str) -> None:
    """Raise naming `path` unless `state` has the names and shapes of `expected` ({name: shape});
    `num_batches_tracked` counters (absent from files older than PyTorch 0.4.1) are optional."""
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} for {tuple(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = [
        f"{len(keys)} {label} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if keys
    ]
    if problems:
        raise LmdiffInputError(f"{path} is not {what}: {'; '.join(problems)}")


def load_checked(model: nn.Module, path, what: str, device="cpu", state: dict | None = None) -> nn.Module:
    """`model` in eval mode on `device` with the weights of `path` (or `state` read from it), checked first."""
    state = read_state_dict(path, what) if state is None else state
    check_state_dict(path, state, {k: v.shape for k, v in model.state_dict().items()}, what)
    full = model.state_dict()  # supplies the num_batches_tracked counters a file may lack
    full.update(state)
    model.load_state_dict(full, strict=True)
    return model.to(device).eval()
