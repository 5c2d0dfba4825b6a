"""Image autoencoders of the landmarks-to-video latent diffusion stage behind one interface.

`load_autoencoder(path)` gives a `LatentAutoencoder` for any of:

- a tiny autoencoder (TAE) pair, ``*_encoder.safetensors`` + ``*_decoder.safetensors`` or ``*_encoder.pth`` +
  ``*_decoder.pth`` (madebyollin's taesd.py key layout), given as their folder or as either file of the pair:
  TAESD (4 latent channels), TAEF1 (16) and TAEF2 (32, with an extra pool branch in the 3 blocks on each side of
  the latent). All load into diffusers `AutoencoderTiny`; TAEF2's pooled blocks are `PooledTinyBlock`;
- a diffusers folder with config.json (`AutoencoderKL` or `AutoencoderTiny`);
- one SD-style (LDM key layout, 4 latent channels) `AutoencoderKL` ``.safetensors`` file as kept in ComfyUI's
  models/vae, converted by diffusers `from_single_file` offline;
- ``"pixel"``: no weights, the lossless space-to-depth rearrangement (4x4 pixels -> 48 channels). It caps nothing
  and costs nothing to encode or decode, which suits small models trained and run on a CPU; a learned autoencoder
  gives the U-Net 12x (TAESD) to 1.5x (TAEF2) fewer values to denoise.

Images are RGB float in [0, 1]; latents are model latents ``(raw - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock
from torch import nn

from .errors import LmdiffInputError
from .weights import read_state_dict

KINDS = ("taesd", "taef1", "taef2", "kl", "pixel")
PIXEL_DOWNSCALE = 4
TINY_KIND_BY_CHANNELS = {4: "taesd", 16: "taef1"}  # AutoencoderTiny without pool branches; with them 32 is taef2
TAE_SUFFIXES = (".safetensors", ".pth")
SD_VAE_SCALING_FACTOR = 0.18215  # SD 1.x/2.x; an SDXL VAE file needs 0.13025 (set `.scaling_factor`)
RANGE_TOLERANCE = 1e-3  # images may overshoot [0, 1] by this much (resampling), they are clamped

_TAE_KEY = re.compile(r"^(\d+)\.(.+)$")
_LDM_ENCODER_CONV_IN = re.compile(r"^(?:first_stage_model\.|vae\.)?encoder\.conv_in\.weight$")


class PooledTinyBlock(AutoencoderTinyBlock):
    """TAEF2's residual block: a pool branch (1x1 conv to 4x width, GroupNorm(4), ReLU, 1x1 conv back) is added to
    the input before the conv/skip/fuse block."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, "relu")
        hidden = 4 * channels
        self.pool = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.GroupNorm(4, hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x + self.pool(x))


class PixelSpace(nn.Module):
    """The "pixel" autoencoder: [-1, 1] images <-> their space-to-depth rearrangement (lossless, no weights)."""

    def __init__(self, downscale: int = PIXEL_DOWNSCALE):
        super().__init__()
        self.downscale = downscale
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels, self.downscale)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.downscale)


class LatentAutoencoder:
    """An image autoencoder (a diffusers `AutoencoderTiny` or `AutoencoderKL`) with [0, 1] images and model latents.

    kind: "taesd" | "taef1" | "taef2" | "kl" | "pixel"; latent_channels: from the weights; downscale: image px per latent px.
    Model latent = (raw latent - shift_factor) * scaling_factor.
    """

    def __init__(
        self,
        module: AutoencoderTiny | AutoencoderKL | PixelSpace,
        kind: str,
        latent_channels: int,
        scaling_factor: float,
        shift_factor: float,
        downscale: int,
    ):
        self.module = module.eval().requires_grad_(False)
        self.kind = kind
        self.latent_channels = latent_channels
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.downscale = downscale

    def __repr__(self) -> str:
        return (
            f"LatentAutoencoder(kind={self.kind!r}, latent_channels={self.latent_channels}, "
            f"scaling_factor={self.scaling_factor:g}, shift_factor={self.shift_factor:g}, downscale={self.downscale}, "
            f"device={self.device}, dtype={self.dtype})"
        )

    @property
    def device(self) -> torch.device:
        return self._tensor().device

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor().dtype

    def _tensor(self) -> torch.Tensor:
        return next(iter([*self.module.parameters(), *self.module.buffers()]))

    def to(self, device=None, dtype: torch.dtype | None = None) -> LatentAutoencoder:
        """Move the weights (in place) and return self."""
        nn.Module.to(self.module, device=device, dtype=dtype)  # torch's own: diffusers' override warns on any cast
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Images [B, 3, H, W] RGB float in [0, 1] (H, W multiples of `downscale`) -> model latents
        [B, latent_channels, H / downscale, W / downscale] float32 on the images' device. KL: the posterior mean."""
        _check_batch(images, "images", 3, batch_size)
        if images.shape[-2] % self.downscale or images.shape[-1] % self.downscale:
            raise LmdiffInputError(
                f"images are {images.shape[-2]}x{images.shape[-1]} (HxW); expected both sides to be multiples of "
                f"{self.downscale} for the {self.kind} autoencoder"
            )
        low, high = images.aminmax()
        if not (low >= -RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE):  # also catches NaN
            raise LmdiffInputError(
                f"images hold values in [{low.item():.3g}, {high.item():.3g}]; expected RGB floats in [0, 1]"
            )
        chunks = []
        for chunk in images.split(batch_size):
            pixels = chunk.to(self.device, self.dtype).clamp(0, 1) * 2 - 1  # diffusers autoencoders take [-1, 1]
            if self.kind == "pixel":
                raw = self.module.encode(pixels)
            elif self.kind == "kl":
                raw = self.module.encode(pixels).latent_dist.mean
            else:
                raw = self.module.encode(pixels).latents
            chunks.append(((raw.float() - self.shift_factor) * self.scaling_factor).to(images.device))
        return torch.cat(chunks)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
        """Model latents [B, latent_channels, h, w] -> images [B, 3, h * downscale, w * downscale] float32 in [0, 1]
        (clamped) on the latents' device."""
        _check_batch(latents, "latents", self.latent_channels, batch_size)
        chunks = []
        for chunk in latents.split(batch_size):
            raw = chunk.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
            pixels = self.module.decode(raw.to(self.dtype))
            pixels = pixels if self.kind == "pixel" else pixels.sample
            chunks.append(((pixels.float() + 1) / 2).clamp_(0, 1).to(latents.device))
        return torch.cat(chunks)


def _check_batch(x, name: str, channels: int, batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise LmdiffInputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        found = f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise LmdiffInputError(f"{name} must be a float tensor [B, {channels}, H, W], got a {found}")
    if x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0:
        raise LmdiffInputError(f"{name} has shape {tuple(x.shape)}; expected [B, {channels}, H, W] with B >= 1")


# ------------------------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------------------------
def load_autoencoder(
    path: str | os.PathLike, kind: str = "auto", device="cpu", dtype: torch.dtype = torch.float32
) -> LatentAutoencoder:
    """Load the autoencoder at `path` (see the module docstring for the accepted layouts).

    kind "auto" detects it from the weights: a TAE pair is "taesd" (4 latent channels), "taef1" (16) or "taef2"
    (pool branch, 32); a diffusers or single-file AutoencoderKL is "kl". A given kind must fit the weights'
    architecture (TAE without pool: taesd/taef1, with pool: taef2, AutoencoderKL: kl) and names it. The path
    "pixel" (or kind "pixel") is the weightless space-to-depth autoencoder.
    """
    if kind != "auto" and kind not in KINDS:
        raise LmdiffInputError(f"kind must be 'auto' or one of {KINDS}, got {kind!r}")
    if str(path) == "pixel" or kind == "pixel":
        return LatentAutoencoder(PixelSpace(), "pixel", 3 * PIXEL_DOWNSCALE**2, 1.0, 0.0, PIXEL_DOWNSCALE).to(
            device, dtype
        )
    path = Path(path)
    if not path.exists():
        raise LmdiffInputError(
            f"autoencoder path {path} does not exist; expected a TAE encoder/decoder pair, a diffusers autoencoder "
            "folder with config.json or an AutoencoderKL .safetensors file"
        )
    if path.is_dir():
        pair = _tae_pair_in_folder(path)
        if pair is not None:
            model = _load_tae_pair(*pair, kind)
        elif (path / "config.json").is_file():
            model = _load_diffusers_folder(path, kind)
        else:
            raise LmdiffInputError(
                f"autoencoder folder {path} holds neither a TAE pair (*_encoder.safetensors + *_decoder.safetensors "
                "or *_encoder.pth + *_decoder.pth) nor a diffusers config.json"
            )
    elif _tae_role(path) is not None:
        model = _load_tae_pair(*_tae_pair_of_file(path), kind)
    elif path.suffix == ".safetensors":
        model = _load_single_file_kl(path, kind)
    else:
        raise LmdiffInputError(
            f"autoencoder file {path} is not a *_encoder/*_decoder .safetensors/.pth TAE file nor an AutoencoderKL "
            ".safetensors file"
        )
    return model.to(device, dtype)


def _tae_role(path: Path) -> str | None:
    """'encoder' or 'decoder' for a file named *_encoder.{safetensors,pth} / *_decoder.*, else None."""
    if path.suffix not in TAE_SUFFIXES:
        return None
    match = re.search(r"_(encoder|decoder)$", path.stem)
    return match.group(1) if match else None


def _tae_pair_of_file(path: Path) -> tuple[Path, Path]:
    role = _tae_role(path)
    other_role = "decoder" if role == "encoder" else "encoder"
    sibling = path.with_name(path.stem[: -len(role)] + other_role + path.suffix)
    if not sibling.is_file():
        raise LmdiffInputError(f"TAE {role} {path} has no {other_role} beside it; expected {sibling}")
    return (path, sibling) if role == "encoder" else (sibling, path)


def _tae_pair_in_folder(folder: Path) -> tuple[Path, Path] | None:
    encoders = sorted(p for p in folder.iterdir() if p.is_file() and _tae_role(p) == "encoder")
    if len(encoders) > 1:
        names = ", ".join(p.name for p in encoders)
        raise LmdiffInputError(f"autoencoder folder {folder} holds several TAE encoders ({names}); pass one file")
    if encoders:
        return _tae_pair_of_file(encoders[0])
    decoders = sorted(p for p in folder.iterdir() if p.is_file() and _tae_role(p) == "decoder")
    if decoders:
        raise LmdiffInputError(
            f"autoencoder folder {folder} holds TAE decoder {decoders[0].name} but no *_encoder file"
        )
    return None


def _tae_layers(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """A taesd.py-layout state dict ("<layer index>.<name>") grouped by layer index, as float32."""
    state = read_state_dict(path, "autoencoder weights")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _TAE_KEY.match(key)
        if match is None:
            raise LmdiffInputError(
                f"TAE file {path} has key {key!r}; expected taesd.py's layout ('<layer index>.<param>', "
                "e.g. '0.weight', '1.conv.0.weight')"
            )
        layers.setdefault(int(match.group(1)), {})[match.group(2)] = value.float()
    return layers


def _load_tae_pair(encoder_path: Path, decoder_path: Path, kind: str) -> LatentAutoencoder:
    encoder, decoder = _tae_layers(encoder_path), _tae_layers(decoder_path)
    if not encoder or "weight" not in encoder[max(encoder)]:
        raise LmdiffInputError(f"TAE encoder {encoder_path} does not end in a conv layer (64 -> latent channels)")
    latent_channels = encoder[max(encoder)]["weight"].shape[0]
    decoder = {index - 1: params for index, params in decoder.items()}  # diffusers applies the clamp (file index 0)
    pooled = any("pool.0.weight" in params for params in [*encoder.values(), *decoder.values()])
    if pooled:
        kind = _resolve_kind(
            kind, "taef2" if latent_channels == 32 else None, ("taef2",), encoder_path, latent_channels
        )
    else:
        detected = TINY_KIND_BY_CHANNELS.get(latent_channels)
        kind = _resolve_kind(kind, detected, ("taesd", "taef1"), encoder_path, latent_channels)
    module = AutoencoderTiny(latent_channels=latent_channels)
    state = {}
    for prefix, layers_by_index, layers in (
        ("encoder.layers", encoder, module.encoder.layers),
        ("decoder.layers", decoder, module.decoder.layers),
    ):
        for index, params in layers_by_index.items():
            if "pool.0.weight" in params and 0 <= index < len(layers):
                layers[index] = PooledTinyBlock(params["pool.0.weight"].shape[1])
            state.update({f"{prefix}.{index}.{name}": value for name, value in params.items()})
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise LmdiffInputError(
            f"TAE pair {encoder_path} + {decoder_path} does not fit the taesd.py layout with {latent_channels} latent "
            f"channels: {str(error).splitlines()[0]}"
        ) from None
    return LatentAutoencoder(module, kind, latent_channels, 1.0, 0.0, downscale=8)


def _resolve_kind(requested: str, detected: str | None, fitting: tuple[str, ...], source: Path, channels: int) -> str:
    """The kind of the weights at `source`: `detected` for "auto", else `requested` when the architecture fits it."""
    if requested == "auto":
        if detected is None:
            raise LmdiffInputError(
                f"{source}: cannot tell the kind of an autoencoder with {channels} latent channels; pass kind= one "
                f"of {fitting}"
            )
        return detected
    if requested not in fitting:
        raise LmdiffInputError(
            f"{source} holds an autoencoder with {channels} latent channels whose architecture fits kind {fitting}, "
            f"not kind={requested!r}"
        )
    return requested


def _load_diffusers_folder(folder: Path, kind: str) -> LatentAutoencoder:
    try:
        config = json.loads((folder / "config.json").read_text())
        class_name = config.get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise LmdiffInputError(f"{folder / 'config.json'} is not a diffusers config (JSON object)") from None
    classes = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
    if class_name not in classes:
        raise LmdiffInputError(
            f"diffusers folder {folder} holds a {class_name!r}; expected an AutoencoderKL or AutoencoderTiny"
        )
    try:
        module = classes[class_name].from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise LmdiffInputError(f"cannot load the {class_name} in {folder}: {error}") from None
    config = module.config
    if class_name == "AutoencoderKL":
        kind = _resolve_kind(kind, "kl", ("kl",), folder, config.latent_channels)
        levels = len(config.block_out_channels)
    else:
        detected = TINY_KIND_BY_CHANNELS.get(config.latent_channels)
        kind = _resolve_kind(kind, detected, ("taesd", "taef1"), folder, config.latent_channels)
        levels = len(config.encoder_block_out_channels)
    return LatentAutoencoder(
        module,
        kind,
        config.latent_channels,
        float(config.scaling_factor),
        float(config.shift_factor or 0.0),
        downscale=2 ** (levels - 1),
    )


def _load_single_file_kl(path: Path, kind: str) -> LatentAutoencoder:
    """An SD-style AutoencoderKL .safetensors (LDM keys, optionally under first_stage_model. or vae.), offline: the
    LDM config diffusers needs is derived from the weight shapes, so nothing is downloaded."""
    state = read_state_dict(path, "autoencoder weights")
    conv_in = next((key for key in state if _LDM_ENCODER_CONV_IN.match(key)), None)
    if conv_in is None:
        raise LmdiffInputError(
            f"{path} has an unknown key layout (e.g. {next(iter(state), 'no keys')!r}); expected an SD-style "
            "AutoencoderKL file with LDM keys such as 'encoder.conv_in.weight', or a TAE file named *_encoder/*_decoder"
        )
    try:
        ddconfig = _ldm_vae_ddconfig(state, conv_in[: -len("encoder.conv_in.weight")])
    except KeyError as error:
        raise LmdiffInputError(
            f"{path} looks like an AutoencoderKL file but lacks the LDM weight {error}; a diffusers-format file "
            "(keys 'encoder.down_blocks.*') loads from its folder with config.json"
        ) from None
    _resolve_kind(kind, "kl", ("kl",), path, ddconfig["z_channels"])
    if ddconfig["z_channels"] != 4:
        raise LmdiffInputError(
            f"{path} is an AutoencoderKL with {ddconfig['z_channels']} latent channels (FLUX/SD3-style); its "
            "scaling is not in the file, so load it from a diffusers folder with config.json instead"
        )
    original_config = {
        "model": {
            "params": {"scale_factor": SD_VAE_SCALING_FACTOR, "first_stage_config": {"params": {"ddconfig": ddconfig}}}
        }
    }
    try:
        module = AutoencoderKL.from_single_file(state, original_config=original_config, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise LmdiffInputError(f"cannot load {path} as an SD-style AutoencoderKL: {error}") from None
    levels = len(ddconfig["ch_mult"])
    return LatentAutoencoder(module, "kl", 4, SD_VAE_SCALING_FACTOR, 0.0, downscale=2 ** (levels - 1))


def _ldm_vae_ddconfig(state: dict[str, torch.Tensor], prefix: str) -> dict:
    """The LDM `ddconfig` of an AutoencoderKL checkpoint, read from its weight shapes."""
    widths = []
    while f"{prefix}encoder.down.{len(widths)}.block.0.conv1.weight" in state:
        widths.append(state[f"{prefix}encoder.down.{len(widths)}.block.0.conv1.weight"].shape[0])
    if not widths:
        raise KeyError(f"{prefix}encoder.down.0.block.0.conv1.weight")
    res_blocks = 0
    while f"{prefix}encoder.down.0.block.{res_blocks}.conv1.weight" in state:
        res_blocks += 1
    base = state[f"{prefix}encoder.conv_in.weight"].shape[0]
    return {
        "ch": base,
        "ch_mult": [width // base for width in widths],
        "num_res_blocks": res_blocks,
        "in_channels": state[f"{prefix}encoder.conv_in.weight"].shape[1],
        "out_ch": state[f"{prefix}decoder.conv_out.weight"].shape[0],
        "z_channels": state[f"{prefix}encoder.conv_out.weight"].shape[0] // 2,
    }


__all__ = ["KINDS", "LatentAutoencoder", "PooledTinyBlock", "load_autoencoder"]
