"""L2VUNet: the landmark-to-video denoiser, a latent U-Net from diffusers blocks with a ControlNet-style guider.

Tensors (N = batch x frames; C latent channels of the autoencoder; h x w latent, H x W = h x w x downscale pixels):
    sample          [N, C, h, w]    noisy latent of the target face crop
    timestep        [N] or scalar   diffusion timestep in [0, num_train_timesteps)
    condition       [N, 3, H, W]    rendered landmarks of the target frame (`conditioning.render_condition`), in [0, 1]
    pose_reference  [N, C, h, w]    latent of the pose reference (dubbing: the target crop, lower face greyed out;
                                    one-shot: the portrait crop)
    pose_mask       [N, 1, H', W']  1 where the U-Net must generate (any resolution; averaged down to h x w)
    identity        [N, C, h, w]    latent of the identity reference (another frame of the same person)
    references      [N, R*C, h, w]  with ``extra_references`` R > 0: more pixel-aligned references, e.g. the quality
                                    mode refiner's warped retrieval (`refiner_data`); None when R = 0
    output          [N, C, h, w]    epsilon, v or the clean latent (`prediction_type`)

Design:
- Input = concat(sample, pose_reference, pose_mask, identity[, references]) -> conv_in ((3 + R)C + 1 channels).
  Concatenation puts the pose reference (everything around the mouth) and the identity reference pixel-aligned with
  the target. Blocks whose type has ``CrossAttn`` additionally attend to identity tokens (the identity latent,
  patchified): reference attention, for identity details that are not aligned (teeth, the inside of the mouth).
  ``identity_concat=False`` leaves the identity out of the concatenation (reference attention only); blocks without
  ``CrossAttn`` leave reference attention out. `benchmarks/l2v_ablations.py` measures the three choices: on unseen
  people the concatenation carries most of the identity (2 dB of mouth PSNR), attention adds 0.3-0.5 dB in the mouth.
- The landmark condition enters through `LandmarkGuider`, a small conv encoder of the rendered landmark image whose
  features pass through zero-initialised 1x1 convolutions and are added to the residuals of every down block and
  of the mid block, as ControlNet's are; an untrained guider therefore changes nothing.
- With ``temporal_attention`` a zero-initialised attention over the frames of a window follows the mid block and
  every up block (forward's ``num_frames``): frames of one window see each other, which keeps them coherent.
- With ``reference_residual`` (a refiner, R >= 1, x0 prediction) the output is the first extra reference plus a
  zero-initialised correction: an untrained refiner returns the warped retrieval unchanged, training learns the fix.
- Attribute names follow diffusers' UNet2DConditionModel, so `from_sd15` can start from a user's SD1.5 U-Net.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import (
    UNetMidBlock2D,
    UNetMidBlock2DCrossAttn,
    get_down_block,
    get_up_block,
)
from torch import nn

from ..errors import LmdiffInputError
from .common import refuse_other_class

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class LandmarkGuider(nn.Module):
    """Rendered landmark image -> residuals for the U-Net's down path and mid block (zero at initialisation)."""

    def __init__(self, block_out_channels, layers_per_block: int, downscale: int, embed_channels=(16, 32, 64)):
        super().__init__()
        n_down = int(round(math.log2(downscale)))
        if 2**n_down != downscale:
            raise ValueError(f"downscale must be a power of two, got {downscale}")
        chans = [embed_channels[min(i, len(embed_channels) - 1)] for i in range(n_down + 1)]
        layers: list[nn.Module] = [nn.Conv2d(3, chans[0], 3, padding=1), nn.SiLU()]
        for i in range(n_down):  # pixel resolution -> latent resolution
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.SiLU()]
        layers += [nn.Conv2d(chans[-1], block_out_channels[0], 3, padding=1), nn.SiLU()]
        self.embed = nn.Sequential(*layers)
        self.levels = nn.ModuleList()  # level l: the features at the resolution of down block l
        for i in range(1, len(block_out_channels)):
            self.levels.append(
                nn.Sequential(
                    nn.Conv2d(block_out_channels[i - 1], block_out_channels[i], 3, stride=2, padding=1), nn.SiLU()
                )
            )
        # One zero conv per down-path residual: conv_in, then per block its resnets and its downsampler.
        residual_levels = [0]
        for i in range(len(block_out_channels)):
            residual_levels += [i] * layers_per_block + ([i + 1] if i < len(block_out_channels) - 1 else [])
        self.residual_levels = residual_levels
        out_chans = [block_out_channels[0]]
        for i, ch in enumerate(block_out_channels):
            out_chans += [ch] * layers_per_block + ([ch] if i < len(block_out_channels) - 1 else [])
        self.zero_convs = nn.ModuleList(
            _zero_conv(block_out_channels[level], ch) for level, ch in zip(residual_levels, out_chans)
        )
        self.mid_zero_conv = _zero_conv(block_out_channels[-1], block_out_channels[-1])

    def forward(self, condition: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        features = [self.embed(condition)]
        for level in self.levels:
            features.append(level(features[-1]))
        residuals = [conv(features[level]) for conv, level in zip(self.zero_convs, self.residual_levels)]
        return residuals, self.mid_zero_conv(features[-1])


class TemporalAttention(nn.Module):
    """Self-attention over the frames of a window at every spatial position; zero-initialised output (identity)."""

    def __init__(self, channels: int, head_dim: int = 32, groups: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: torch.Tensor, num_frames: int) -> torch.Tensor:
        if num_frames <= 1:
            return hidden
        n, c, h, w = hidden.shape
        x = self.norm(hidden).reshape(n // num_frames, num_frames, c, h * w).permute(0, 3, 1, 2)  # [B, hw, F, c]
        positions = get_timestep_embedding(torch.arange(num_frames, device=x.device), c, True, 0).to(x.dtype)
        x = (x + positions).flatten(0, 1)  # [B*hw, F, c]
        q, k, v = self.to_qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
        out = out.reshape(n // num_frames, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(n, c, h, w)
        return hidden + out


class L2VUNet(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Landmark-guided latent U-Net with pose and identity references (see the module docstring)."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 4,
        downscale: int = 8,
        autoencoder: str = "taesd",
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block: int = 1,
        num_attention_heads: int = 8,
        cross_attention_dim: int = 256,
        norm_num_groups: int = 32,
        temporal_attention: bool = True,
        identity_concat: bool = True,
        prediction_type: str = "epsilon",
        num_train_timesteps: int = 1000,
        extra_references: int = 0,
        reference_residual: bool = False,
    ):
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        n_levels = len(block_out_channels)
        if len(down_block_types) != n_levels or len(up_block_types) != n_levels:
            raise ValueError("down_block_types and up_block_types need one entry per block_out_channels")
        self.uses_cross_attention = any("CrossAttn" in t for t in (*down_block_types, *up_block_types))
        if not (identity_concat or self.uses_cross_attention):
            raise ValueError("the U-Net must see the identity: set identity_concat or use CrossAttn blocks")
        time_dim = 4 * block_out_channels[0]
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_dim)
        if isinstance(extra_references, bool) or not isinstance(extra_references, int) or extra_references < 0:
            raise ValueError(f"extra_references must be an integer >= 0, got {extra_references!r}")
        inputs = ((3 if identity_concat else 2) + extra_references) * latent_channels + 1
        self.conv_in = nn.Conv2d(inputs, block_out_channels[0], 3, padding=1)
        self.guider = LandmarkGuider(block_out_channels, layers_per_block, downscale)
        self.identity_tokens = (
            nn.Conv2d(latent_channels, cross_attention_dim, 2, stride=2) if self.uses_cross_attention else None
        )
        common = dict(
            num_layers=layers_per_block,
            temb_channels=time_dim,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
        )
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    in_channels=block_out_channels[max(i - 1, 0)],
                    out_channels=block_out_channels[i],
                    add_downsample=i < n_levels - 1,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=block_out_channels[i] // num_attention_heads,
                    downsample_padding=1,
                    **common,
                )
            )
        mid_channels = block_out_channels[-1]
        if self.uses_cross_attention:
            self.mid_block = UNetMidBlock2DCrossAttn(
                in_channels=mid_channels,
                temb_channels=time_dim,
                resnet_eps=1e-5,
                resnet_groups=norm_num_groups,
                cross_attention_dim=cross_attention_dim,
                num_attention_heads=num_attention_heads,
            )
        else:
            self.mid_block = UNetMidBlock2D(
                in_channels=mid_channels,
                temb_channels=time_dim,
                resnet_eps=1e-5,
                resnet_groups=norm_num_groups,
                attention_head_dim=mid_channels // num_attention_heads,
            )
        reversed_channels = list(reversed(block_out_channels))
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(up_block_types):
            self.up_blocks.append(
                get_up_block(
                    block_type,
                    in_channels=reversed_channels[min(i + 1, n_levels - 1)],
                    out_channels=reversed_channels[i],
                    prev_output_channel=reversed_channels[max(i - 1, 0)],
                    add_upsample=i < n_levels - 1,
                    resolution_idx=i,
                    num_attention_heads=num_attention_heads,
                    attention_head_dim=reversed_channels[i] // num_attention_heads,
                    **{**common, "num_layers": layers_per_block + 1},
                )
            )
        self.temporal_layers = (
            nn.ModuleList(TemporalAttention(ch, groups=norm_num_groups) for ch in [mid_channels, *reversed_channels])
            if temporal_attention
            else None
        )
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(block_out_channels[0], latent_channels, 3, padding=1)
        if reference_residual:  # the output starts as the first extra reference (the refiner starts at fast mode)
            if not extra_references:
                raise ValueError("reference_residual needs extra_references >= 1")
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, return_unused_kwargs: bool = False, **kwargs):
        """As `ConfigMixin.from_config`, but a config saved by another class is an error, not a silent mismatch."""
        refuse_other_class(cls, config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def size_multiple(self) -> int:
        """Crop sizes must be multiples of this (downscale x 2 per down block)."""
        return self.config.downscale * 2 ** (len(self.config.block_out_channels) - 1)

    def _check_inputs(self, sample, condition, pose_reference, pose_mask, identity, num_frames, references) -> None:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.latent_channels:
            raise LmdiffInputError(
                f"latents have {sample.shape[1] if sample.ndim == 4 else '?'} channels but this L2V model was "
                f"trained on {cfg.latent_channels}-channel latents ({cfg.autoencoder}): use that autoencoder"
            )
        n, _, h, w = sample.shape
        expected = {
            "condition": (n, 3, h * cfg.downscale, w * cfg.downscale),
            "pose_reference": (n, cfg.latent_channels, h, w),
            "identity": (n, cfg.latent_channels, h, w),
        }
        extra = cfg.extra_references
        if (references is None) != (extra == 0):
            raise LmdiffInputError(
                f"this L2V model takes {extra} extra reference(s) (references [N, {extra * cfg.latent_channels}, h, w])"
                f", got {'none' if references is None else 'some'}"
            )
        named = [("condition", condition), ("pose_reference", pose_reference), ("identity", identity)]
        if extra:
            expected["references"] = (n, extra * cfg.latent_channels, h, w)
            named.append(("references", references))
        for name, tensor in named:
            if tuple(tensor.shape) != expected[name]:
                raise LmdiffInputError(f"{name} must be {expected[name]}, got {tuple(tensor.shape)}")
        if pose_mask.ndim != 4 or pose_mask.shape[:2] != (n, 1):
            raise LmdiffInputError(f"pose_mask must be [{n}, 1, H, W], got {tuple(pose_mask.shape)}")
        if num_frames < 1 or n % num_frames:
            raise LmdiffInputError(f"num_frames ({num_frames}) must divide the batch of frames ({n})")
        multiple = self.size_multiple // cfg.downscale
        if h % multiple or w % multiple:
            raise LmdiffInputError(
                f"latent size {h}x{w} must be a multiple of {multiple} (crop size a multiple of {self.size_multiple})"
            )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        condition: torch.Tensor,
        pose_reference: torch.Tensor,
        pose_mask: torch.Tensor,
        identity: torch.Tensor,
        num_frames: int = 1,
        condition_scale: float = 1.0,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoiser output [N, C, h, w] (see the module docstring for the tensors)."""
        self._check_inputs(sample, condition, pose_reference, pose_mask, identity, num_frames, references)
        dtype = self.dtype
        n, _, h, w = sample.shape
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        emb = self.time_embedding(self.time_proj(timestep).to(dtype))
        mask = F.interpolate(pose_mask.to(dtype), size=(h, w), mode="area")
        concat = (
            [sample, pose_reference, mask, identity] if self.config.identity_concat else [sample, pose_reference, mask]
        )
        if references is not None:
            concat.append(references)
        x = self.conv_in(torch.cat(concat, dim=1).to(dtype))
        context = None
        if self.identity_tokens is not None:
            context = self.identity_tokens(identity.to(dtype)).flatten(2).transpose(1, 2)
        guide, guide_mid = self.guider(condition.to(dtype))

        residuals = [x]
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                x, res = block(x, emb, encoder_hidden_states=context)
            else:
                x, res = block(x, emb)
            residuals.extend(res)
        residuals = [r + condition_scale * g for r, g in zip(residuals, guide)]
        if self.uses_cross_attention:
            x = self.mid_block(x, emb, encoder_hidden_states=context)
        else:
            x = self.mid_block(x, emb)
        x = x + condition_scale * guide_mid
        if self.temporal_layers is not None:
            x = self.temporal_layers[0](x, num_frames)
        for i, block in enumerate(self.up_blocks):
            skip = tuple(residuals[-len(block.resnets) :])
            residuals = residuals[: -len(block.resnets)]
            size = residuals[-1].shape[2:] if residuals else None
            if getattr(block, "has_cross_attention", False):
                x = block(x, skip, emb, encoder_hidden_states=context, upsample_size=size)
            else:
                x = block(x, skip, emb, upsample_size=size)
            if self.temporal_layers is not None:
                x = self.temporal_layers[i + 1](x, num_frames)
        out = self.conv_out(self.conv_act(self.conv_norm_out(x)))
        if self.config.reference_residual:
            out = out + references[:, : self.config.latent_channels].to(out.dtype)
        return out

    @classmethod
    def from_sd15(cls, unet_path: str | Path, **overrides) -> "L2VUNet":
        """An L2VUNet with SD1.5's U-Net layout, initialised from a user's SD1.5 UNet (a diffusers ``unet`` folder).

        Every weight whose name and shape match is copied; conv_in keeps SD1.5's weights for the noisy-latent
        channels and starts at zero for the reference and mask channels; the guider, identity tokens and temporal
        layers start untrained (zero-initialised where they feed the U-Net).
        """
        from diffusers import UNet2DConditionModel

        path = Path(unet_path).expanduser()
        if not (path / "config.json").is_file():
            raise LmdiffInputError(f"SD1.5 UNet path {path} must be a diffusers UNet folder with config.json")
        source = UNet2DConditionModel.from_pretrained(path)
        src = source.config
        config = dict(
            latent_channels=src.in_channels,
            block_out_channels=tuple(src.block_out_channels),
            down_block_types=tuple(src.down_block_types),
            up_block_types=tuple(src.up_block_types),
            layers_per_block=src.layers_per_block,
            num_attention_heads=src.attention_head_dim,  # SD1.5's config names its head count so
            cross_attention_dim=src.cross_attention_dim,
            norm_num_groups=src.norm_num_groups,
        )
        config.update(overrides)
        model = cls(**config)
        state = model.state_dict()
        copied = 0
        for name, tensor in source.state_dict().items():
            if name == "conv_in.weight" and name in state:
                state[name].zero_()
                state[name][:, : tensor.shape[1]] = tensor
                copied += 1
            elif name in state and state[name].shape == tensor.shape:
                state[name] = tensor
                copied += 1
        model.load_state_dict(state)
        if copied == 0:
            raise LmdiffInputError(f"no weight of {path} fits the L2V U-Net: is it an SD1.5 UNet?")
        return model
