"""A2LLSTM: audio features -> canonical landmarks with an LSTM regressor (A2L stage of "Landmark-guided Diffusion Model for High-fidelity and Temporally Coherent Talking Head Generation" (arXiv 2408.01732)).

Tensors (model units, `lmdiff_core.canonical.to_model_units`):
    audio      [B, T, k, L, D]  T video frames at 25 fps, k sub-frames per frame, L encoder layers, D features
    reference  [B, N, 3]        the speaker's landmarks (absolute), e.g. from the portrait
    output     [B, T, N, 3]     absolute landmarks = reference + predicted displacement

Audio features are standardised per feature with statistics of the training data (`AudioFeatureNorm`, set by the
trainer), so raw natural-log mel works as is; with L > 1 encoder layers a learned softmax weighting mixes them. The LSTM runs forward in time only: frame t sees the audio of frames <= t +
`audio_context` (the look-ahead coarticulation needs) and nothing later. A bidirectional LSTM would make every frame
depend on where a window ends, hence seams between sliding windows; this one costs O(T), so a pipeline can run a
whole clip in one pass, and a frame's result never changes when later audio arrives.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import AudioFeatureNorm, refuse_other_class


class A2LLSTM(ModelMixin, ConfigMixin):
    """LSTM regressor from audio features and reference landmarks to landmark sequences.

    Per frame, an MLP encodes the audio sub-frames of the frames t - audio_context .. t + audio_context (edge frames
    repeated), the result is concatenated with an embedding of the reference and fed to a forward LSTM; a zero-
    initialised linear head predicts displacements from the reference, so an untrained model returns the reference.
    """

    @register_to_config
    def __init__(
        self,
        n_points: int = 68,
        audio_dim: int = 80,
        audio_sub_frames: int = 4,
        audio_layers: int = 1,
        audio_context: int = 2,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        sub_frame_channels = max(hidden_size // 8, 8)
        window_sub_frames = (2 * audio_context + 1) * audio_sub_frames
        self.audio_norm = AudioFeatureNorm(audio_layers, audio_dim)
        self.sub_frame_proj = nn.Sequential(nn.Linear(audio_dim, sub_frame_channels), nn.GELU())
        self.window_encoder = nn.Sequential(
            nn.Linear(window_sub_frames * sub_frame_channels, hidden_size),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, hidden_size),
        )
        self.reference_encoder = nn.Sequential(
            nn.Linear(n_points * 3, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.lstm = nn.LSTM(
            2 * hidden_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.displacement_head = nn.Linear(hidden_size, n_points * 3)
        nn.init.zeros_(self.displacement_head.weight)
        nn.init.zeros_(self.displacement_head.bias)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """As `ConfigMixin.from_config`, but a config saved by another class is an error, not a silent mismatch."""
        refuse_other_class(cls, config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def _check_inputs(self, audio: torch.Tensor, reference: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.audio_sub_frames, cfg.audio_layers, cfg.audio_dim)
        if audio.ndim != 5 or tuple(audio.shape[2:]) != expected:
            raise ValueError(f"audio must be [B, T, k, L, D] with (k, L, D) = {expected}, got {tuple(audio.shape)}")
        if tuple(reference.shape) != (audio.shape[0], cfg.n_points, 3):
            raise ValueError(
                f"reference must be [B, {cfg.n_points}, 3] with B = {audio.shape[0]}, got {tuple(reference.shape)}"
            )

    def encode_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """[B, T, k, L, D] -> [B, T, hidden_size]: one code per frame from its window of +-audio_context frames."""
        frames = self.sub_frame_proj(self.audio_norm(audio))  # [B, T, k, C]
        num_frames = frames.shape[1]
        context = self.config.audio_context
        offsets = torch.arange(-context, context + 1, device=audio.device)
        window = (torch.arange(num_frames, device=audio.device)[:, None] + offsets).clamp(0, num_frames - 1)
        return self.window_encoder(frames[:, window].flatten(2))  # [B, T, 2c+1, k, C] -> [B, T, (2c+1)*k*C]

    def forward(self, audio: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """audio [B, T, k, L, D], reference [B, N, 3] -> absolute landmarks [B, T, N, 3] (model units)."""
        self._check_inputs(audio, reference)
        audio = audio.to(self.dtype)
        reference = reference.to(self.dtype)
        audio_code = self.encode_audio(audio)
        reference_code = self.reference_encoder(reference.flatten(1))[:, None].expand_as(audio_code)
        hidden, _ = self.lstm(torch.cat([audio_code, reference_code], dim=-1))
        displacement = self.displacement_head(hidden).unflatten(-1, (self.config.n_points, 3))
        return reference[:, None] + displacement
