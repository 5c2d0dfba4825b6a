"""Where the bundled default checkpoints live (save_pretrained folders committed with the repository), and reading
a checkpoint's settings file (`lmdiff_a2l.json`, `lmdiff_l2v.json`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import LmdiffInputError

BUNDLED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLED_A2L = BUNDLED_CHECKPOINTS / "a2l"
BUNDLED_A2L_DIFFUSION = BUNDLED_CHECKPOINTS / "a2l_diffusion"
BUNDLED_L2V = BUNDLED_CHECKPOINTS / "l2v"
BUNDLED_REFINER = BUNDLED_CHECKPOINTS / "refiner"  # the quality-mode refiner (an L2V checkpoint with extra_references)


def read_checkpoint_info(folder: Path, name: str, kind: str, required: tuple[str, ...]) -> dict:
    """The settings `folder/name` of an lmdiff `kind` checkpoint ("A2L", "L2V") as a dict holding every key in
    `required`; a missing, corrupt or incomplete file raises LmdiffInputError naming the file and the key."""
    path = Path(folder) / name
    if not Path(folder).is_dir() or not path.is_file():
        raise LmdiffInputError(f"{folder} is not an lmdiff {kind} checkpoint (expected a folder with {name})")
    try:
        info = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LmdiffInputError(f"{path} is not valid JSON ({exc}); expected the {kind} checkpoint's settings") from None
    if not isinstance(info, dict):
        raise LmdiffInputError(f"{path} holds a JSON {type(info).__name__}; expected the {kind} checkpoint's settings")
    missing = [key for key in required if key not in info]
    if missing:
        raise LmdiffInputError(
            f"{path} lacks the key {', '.join(repr(k) for k in missing)}: the {kind} checkpoint is incomplete"
        )
    return info
