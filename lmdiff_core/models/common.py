"""Building blocks shared by the A2L models."""

from __future__ import annotations

import torch
from torch import nn


class AudioFeatureNorm(nn.Module):
    """[..., L, D] -> [..., D]: fixed per-feature standardisation, then a learned softmax-weighted sum over layers.

    The mean and std are buffers set from the training data (`set_statistics`; 0 and 1 until then), so the
    normalisation is the same in training and inference, for any window, and keeps the loudness contour (silence vs
    speech) that drives how far the mouth opens.
    """

    def __init__(self, audio_layers: int, audio_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(audio_layers, audio_dim))
        self.register_buffer("std", torch.ones(audio_layers, audio_dim))
        self.layer_logits = nn.Parameter(torch.zeros(audio_layers))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(torch.as_tensor(mean).reshape(self.mean.shape))
        self.std.copy_(torch.as_tensor(std).reshape(self.std.shape).clamp_min(1e-3))

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.einsum("...ld,l->...d", (audio - self.mean) / self.std, self.layer_logits.softmax(0))


def refuse_other_class(cls: type, config: dict | None) -> None:
    """diffusers loads a folder saved by another model class silently (random weights, a warning): refuse it."""
    saved_class = (config or {}).get("_class_name", cls.__name__)
    if saved_class != cls.__name__:
        raise ValueError(f"the config is that of a {saved_class}, not of an {cls.__name__}: load it with {saved_class}")
