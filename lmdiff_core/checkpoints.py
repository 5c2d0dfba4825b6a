"""Where the bundled default checkpoints live (save_pretrained folders committed with the repository)."""

from __future__ import annotations

from pathlib import Path

BUNDLED_CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLED_A2L = BUNDLED_CHECKPOINTS / "a2l"
BUNDLED_A2L_DIFFUSION = BUNDLED_CHECKPOINTS / "a2l_diffusion"
BUNDLED_L2V = BUNDLED_CHECKPOINTS / "l2v"
