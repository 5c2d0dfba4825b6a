"""A2LDiffusion: the denoiser of AToM-Net, a transformer diffusion model over landmark sequences, from "Dual diffusion
model for one-shot high-fidelity talking head generation" (published as MoDiTalker, arXiv 2403.19144).

Tensors (model units, `lmdiff_core.canonical.to_model_units`):
    sample     [B, T, N, 3]     noisy displacement from the reference, scaled: `landmarks_to_sample`
    timestep   [B] or scalar    diffusion timestep in [0, num_train_timesteps)
    audio      [B, T, k, L, D]  T video frames at 25 fps, k sub-frames per frame, L encoder layers, D features
    reference  [B, N, 3]        the speaker's landmarks (absolute), e.g. from the portrait
    prev       [B, P, N, 3]     the previous window's last P frames (absolute landmarks, clean) or None
    prev_mask  [B, P] bool      False hides a prev frame from attention (before a clip's start, prev dropout) or None
    audio_mask [B] bool         False drops the audio (classifier-free guidance) or None (keep all)
    output     [B, T, N, 3]     in the space of `sample`: v, epsilon or the clean sample (`prediction_type`)

The diffusion variable is `displacement_scale * (landmarks - reference)`: displacements keep the speaker's identity
out of what is generated, and the scale brings them (a few hundredths of the inter-ocular distance) to about unit
variance, the noise's. `sample_to_landmarks` maps a denoised sample back. The sampling loop, the scheduler and
`audio_dropout` (the probability of `audio_mask=False` in training) belong to the pipeline and trainer; `window`
and `prev_frames` are the lengths they train and sample with (the model itself takes any T and P).

Architecture: every frame gives one lip token (the lip points, embedded by their own MLP) and one non-lip token (the
other points, another MLP). Each group is its own transformer stream with self-attention over time, so the audio
drives the mouth without pulling on the upper face. After every block a per-frame exchange adds a projection of each
stream's state to the other (the jaw and the lips move together at the same instant; temporal context stays within
each stream); `stream_exchange=False` removes it. FiLM (scale and shift after every normalisation) conditions the
lip stream on the timestep plus per-frame audio, the non-lip stream on the timestep plus the window's mean audio.
Reference landmarks are embedded per group and added to every token; `prev` frames are prefix tokens at the
positions before the window, conditioned by a learned embedding in place of the audio. Sinusoidal temporal
positions; zero-initialised output heads, so an untrained model outputs zeros.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .common import AudioFeatureNorm, refuse_other_class

PREDICTION_TYPES = ("v_prediction", "epsilon", "sample")


class FiLMLayerNorm(nn.Module):
    """LayerNorm whose scale and shift come from a condition: (1 + scale(c)) * norm(x) + shift(c); identity at init."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale, shift = self.modulation(condition).chunk(2, dim=-1)
        return self.norm(hidden) * (1 + scale) + shift


class TemporalSelfAttention(nn.Module):
    """Multi-head self-attention over the time axis of [B, S, d]."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"d_model ({dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` [B, S] bool: False keys are not attended to."""
        q, k, v = self.to_qkv(hidden).unflatten(-1, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))


class StreamBlock(nn.Module):
    """One transformer block of one stream: FiLM-conditioned self-attention over time, then a feed-forward layer."""

    def __init__(self, dim: int, n_heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.attn_norm = FiLMLayerNorm(dim)
        self.attn = TemporalSelfAttention(dim, n_heads, dropout)
        self.ffn_norm = FiLMLayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, condition: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attn(self.attn_norm(hidden, condition), key_mask))
        return hidden + self.dropout(self.ffn(self.ffn_norm(hidden, condition)))


class StreamExchange(nn.Module):
    """Per-frame exchange between the streams: each adds a projection of the other's normalised state."""

    def __init__(self, dim: int):
        super().__init__()
        self.lip_from_non_lip = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.non_lip_from_lip = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))

    def forward(self, lip: torch.Tensor, non_lip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lip + self.lip_from_non_lip(non_lip), non_lip + self.non_lip_from_lip(lip)


def _mlp(in_dim: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))


class A2LDiffusion(ModelMixin, ConfigMixin):
    """Split lip / non-lip transformer denoiser over landmark displacements (AToM-Net), see the module docstring."""

    @register_to_config
    def __init__(
        self,
        n_points: int = 68,
        lip_indices: tuple[int, ...] = tuple(range(48, 68)),
        audio_dim: int = 80,
        audio_sub_frames: int = 4,
        audio_layers: int = 1,
        window: int = 32,
        prev_frames: int = 8,
        d_model: int = 128,
        n_heads: int = 4,
        n_layers: int = 4,
        ffn_mult: int = 4,
        dropout: float = 0.0,
        prediction_type: str = "v_prediction",
        audio_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        displacement_scale: float = 10.0,
        stream_exchange: bool = True,
    ):
        super().__init__()
        lip_indices = [int(i) for i in lip_indices]
        if len(set(lip_indices)) != len(lip_indices) or not all(0 <= i < n_points for i in lip_indices):
            raise ValueError(f"lip_indices must be distinct point indices in [0, {n_points}), got {lip_indices}")
        if not 0 < len(lip_indices) < n_points:
            raise ValueError("lip_indices must name some but not all of the points")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.register_to_config(lip_indices=lip_indices)  # plain ints in a list: JSON-safe, equal after a round trip
        lip_set = set(lip_indices)
        non_lip_indices = [i for i in range(n_points) if i not in lip_set]
        self.register_buffer("lip_index", torch.tensor(lip_indices), persistent=False)
        self.register_buffer("non_lip_index", torch.tensor(non_lip_indices), persistent=False)
        # Output tokens come lip points first; this gather puts them back in landmark order.
        self.register_buffer("point_order", torch.tensor(lip_indices + non_lip_indices).argsort(), persistent=False)
        n_lip, n_non_lip = len(lip_indices), len(non_lip_indices)

        self.audio_norm = AudioFeatureNorm(audio_layers, audio_dim)
        self.audio_frame_proj = nn.Sequential(nn.Linear(audio_sub_frames * audio_dim, d_model), nn.GELU())
        self.audio_temporal_conv = nn.Conv1d(d_model, d_model, kernel_size=5, padding=2, padding_mode="replicate")
        self.null_audio = nn.Parameter(torch.zeros(d_model))
        self.global_audio_proj = nn.Linear(d_model, d_model)
        self.prev_condition = nn.Parameter(torch.zeros(d_model))
        self.time_proj = Timesteps(d_model, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(d_model, d_model)

        self.lip_embed = _mlp(n_lip * 3, d_model)
        self.non_lip_embed = _mlp(n_non_lip * 3, d_model)
        self.lip_reference_embed = _mlp(n_lip * 3, d_model)
        self.non_lip_reference_embed = _mlp(n_non_lip * 3, d_model)

        self.lip_blocks = nn.ModuleList(StreamBlock(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.non_lip_blocks = nn.ModuleList(StreamBlock(d_model, n_heads, ffn_mult, dropout) for _ in range(n_layers))
        self.exchanges = nn.ModuleList(StreamExchange(d_model) for _ in range(n_layers)) if stream_exchange else None

        self.lip_out_norm = nn.LayerNorm(d_model)
        self.non_lip_out_norm = nn.LayerNorm(d_model)
        self.lip_head = nn.Linear(d_model, n_lip * 3)
        self.non_lip_head = nn.Linear(d_model, n_non_lip * 3)
        for head in (self.lip_head, self.non_lip_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """As `ConfigMixin.from_config`, but a config saved by another class is an error, not a silent mismatch."""
        refuse_other_class(cls, config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def landmarks_to_sample(self, landmarks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Absolute landmarks [B, T, N, 3] -> the diffusion variable: scaled displacement from reference [B, N, 3]."""
        return (landmarks - reference[:, None]) * self.config.displacement_scale

    def sample_to_landmarks(self, sample: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Inverse of `landmarks_to_sample`."""
        return reference[:, None] + sample / self.config.displacement_scale

    def _check_inputs(self, sample, audio, reference, prev, prev_mask, audio_mask) -> None:
        cfg = self.config
        if sample.ndim != 4 or tuple(sample.shape[2:]) != (cfg.n_points, 3):
            raise ValueError(f"sample must be [B, T, {cfg.n_points}, 3], got {tuple(sample.shape)}")
        batch, frames = sample.shape[:2]
        expected = (batch, frames, cfg.audio_sub_frames, cfg.audio_layers, cfg.audio_dim)
        if tuple(audio.shape) != expected:
            raise ValueError(f"audio must be [B, T, k, L, D] = {expected}, got {tuple(audio.shape)}")
        if tuple(reference.shape) != (batch, cfg.n_points, 3):
            raise ValueError(f"reference must be [{batch}, {cfg.n_points}, 3], got {tuple(reference.shape)}")
        if prev is not None and (
            prev.ndim != 4 or prev.shape[0] != batch or tuple(prev.shape[2:]) != (cfg.n_points, 3)
        ):
            raise ValueError(f"prev must be [{batch}, P, {cfg.n_points}, 3], got {tuple(prev.shape)}")
        if prev_mask is not None and (prev is None or tuple(prev_mask.shape) != tuple(prev.shape[:2])):
            raise ValueError(f"prev_mask must be [B, P] bool beside prev, got {tuple(prev_mask.shape)}")
        if audio_mask is not None and tuple(audio_mask.shape) != (batch,):
            raise ValueError(f"audio_mask must be [{batch}] bool, got {tuple(audio_mask.shape)}")

    def encode_audio(self, audio: torch.Tensor, audio_mask: torch.Tensor | None) -> torch.Tensor:
        """[B, T, k, L, D] -> [B, T, d_model]; rows with audio_mask False get the learned null embedding."""
        frames = self.audio_frame_proj(self.audio_norm(audio).flatten(2))
        frames = F.gelu(self.audio_temporal_conv(frames.transpose(1, 2))).transpose(1, 2)
        if audio_mask is None:
            return frames
        return torch.where(audio_mask.to(frames.device, torch.bool)[:, None, None], frames, self.null_audio)

    def _tokens(self, points: torch.Tensor, index: torch.Tensor, embed: nn.Module) -> torch.Tensor:
        return embed(points[:, :, index].flatten(2))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        audio: torch.Tensor,
        reference: torch.Tensor,
        prev: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
        prev_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output [B, T, N, 3] in the space of `sample` (see the module docstring for the tensors)."""
        self._check_inputs(sample, audio, reference, prev, prev_mask, audio_mask)
        batch, frames = sample.shape[:2]
        dtype, device = self.dtype, sample.device
        sample, audio, reference = sample.to(dtype), audio.to(dtype), reference.to(dtype)
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        time_code = self.time_embedding(self.time_proj(timestep).to(dtype))[:, None]  # [B, 1, d]

        audio_code = self.encode_audio(audio, audio_mask)  # [B, T, d]
        lip_condition = time_code + audio_code
        non_lip_condition = (time_code + self.global_audio_proj(audio_code.mean(1, keepdim=True))).expand_as(audio_code)

        lip = self._tokens(sample, self.lip_index, self.lip_embed)
        non_lip = self._tokens(sample, self.non_lip_index, self.non_lip_embed)
        n_prev, key_mask = 0, None
        if prev is not None and prev.shape[1] > 0:
            n_prev = prev.shape[1]
            prev_sample = self.landmarks_to_sample(prev.to(dtype), reference)
            lip = torch.cat([self._tokens(prev_sample, self.lip_index, self.lip_embed), lip], dim=1)
            non_lip = torch.cat([self._tokens(prev_sample, self.non_lip_index, self.non_lip_embed), non_lip], dim=1)
            prev_condition = (time_code + self.prev_condition).expand(batch, n_prev, -1)
            lip_condition = torch.cat([prev_condition, lip_condition], dim=1)
            non_lip_condition = torch.cat([prev_condition, non_lip_condition], dim=1)
            if prev_mask is not None:
                window_keys = torch.ones(batch, frames, dtype=torch.bool, device=device)
                key_mask = torch.cat([prev_mask.to(device, torch.bool), window_keys], dim=1)

        positions = torch.arange(-n_prev, frames, device=device)
        position_code = get_timestep_embedding(positions, self.config.d_model, True, 0).to(dtype)
        lip_reference = self._tokens(reference[:, None], self.lip_index, self.lip_reference_embed)
        non_lip_reference = self._tokens(reference[:, None], self.non_lip_index, self.non_lip_reference_embed)
        lip = lip + position_code + lip_reference
        non_lip = non_lip + position_code + non_lip_reference

        for layer, (lip_block, non_lip_block) in enumerate(zip(self.lip_blocks, self.non_lip_blocks)):
            lip = lip_block(lip, lip_condition, key_mask)
            non_lip = non_lip_block(non_lip, non_lip_condition, key_mask)
            if self.exchanges is not None:
                lip, non_lip = self.exchanges[layer](lip, non_lip)

        lip_out = self.lip_head(self.lip_out_norm(lip[:, n_prev:])).unflatten(-1, (-1, 3))
        non_lip_out = self.non_lip_head(self.non_lip_out_norm(non_lip[:, n_prev:])).unflatten(-1, (-1, 3))
        return torch.cat([lip_out, non_lip_out], dim=2)[:, :, self.point_order]
