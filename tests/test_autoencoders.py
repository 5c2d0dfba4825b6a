"""LatentAutoencoder / load_autoencoder: the real TAESD, TAEF1 and TAEF2 weights on real portraits, a tiny random
diffusers AutoencoderKL (folder and offline single file), and the user errors."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from lmdiff_core.autoencoders import LatentAutoencoder, load_autoencoder
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import read_image

from .conftest import shared_path  # the one way tests reach ../shared

PORTRAITS = ("portrait_man_a.jpg", "portrait_woman_b.png")
EXPECTED_CHANNELS = {"taesd": 4, "taef1": 16, "taef2": 32}
# MANIFEST at 256 px: taesd 25.1-30.0 dB, taef1 28.7-34.9, taef2 32.2-37.6; measured on PORTRAITS: 29.4, 32.3, 34.8
MIN_MEAN_PSNR = {"taesd": 27.5, "taef1": 30.5, "taef2": 33.0}


@pytest.fixture(scope="module")
def portraits() -> torch.Tensor:
    """The portraits resized to 256x256, [2, 3, 256, 256] float in [0, 1]."""
    images = []
    for name in PORTRAITS:
        image = Image.fromarray(read_image(shared_path(f"data/images/{name}"))).resize((256, 256), Image.BICUBIC)
        images.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255)
    return torch.stack(images)


@pytest.fixture(scope="module")
def autoencoders() -> dict[str, LatentAutoencoder]:
    return {kind: load_autoencoder(shared_path(f"weights/{kind}")) for kind in EXPECTED_CHANNELS}


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(1 / ((a - b) ** 2).flatten(1).mean(1))


# ------------------------------------------------------------------------------------------------------------------
# real TAE weights
# ------------------------------------------------------------------------------------------------------------------
def test_real_taes_round_trip_portraits(autoencoders, portraits):
    mean_psnr = {}
    for kind, autoencoder in autoencoders.items():
        channels = EXPECTED_CHANNELS[kind]
        assert (autoencoder.kind, autoencoder.latent_channels, autoencoder.downscale) == (kind, channels, 8)
        assert (autoencoder.scaling_factor, autoencoder.shift_factor) == (1.0, 0.0)
        latents = autoencoder.encode(portraits, batch_size=1)
        assert latents.shape == (2, channels, 32, 32) and latents.dtype == torch.float32
        assert 0.5 < latents.std() < 1.5  # TAE latents are used unscaled, std about 1
        decoded = autoencoder.decode(latents)
        assert decoded.shape == portraits.shape and decoded.dtype == torch.float32
        assert decoded.min() >= 0 and decoded.max() <= 1
        mean_psnr[kind] = psnr(decoded, portraits).mean().item()
        assert mean_psnr[kind] > MIN_MEAN_PSNR[kind], (kind, mean_psnr[kind])
    assert mean_psnr["taef2"] > mean_psnr["taef1"] > mean_psnr["taesd"] + 1.0


def reference_tae(latent_channels: int, pooled_encoder_blocks=(), pooled_decoder_blocks=()):
    """taesd.py's encoder and decoder, written independently from MANIFEST.md (with TAEF2's pool branch)."""

    class Block(nn.Module):
        def __init__(self, pooled: bool):
            super().__init__()
            conv = [nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]
            self.conv = nn.Sequential(conv[0], nn.ReLU(), conv[1], nn.ReLU(), conv[2])
            self.skip, self.fuse = nn.Identity(), nn.ReLU()
            if pooled:
                self.pool = nn.Sequential(
                    nn.Conv2d(64, 256, 1, bias=False),
                    nn.GroupNorm(4, 256),
                    nn.ReLU(),
                    nn.Conv2d(256, 64, 1, bias=False),
                )

        def forward(self, x):
            if hasattr(self, "pool"):
                x = x + self.pool(x)
            return self.fuse(self.conv(x) + self.skip(x))

    class SoftClamp(nn.Module):
        def forward(self, x):
            return torch.tanh(x / 3) * 3

    encoder = [nn.Conv2d(3, 64, 3, padding=1), Block(False)]
    for _ in range(3):
        encoder.append(nn.Conv2d(64, 64, 3, padding=1, stride=2, bias=False))
        encoder += [Block(len(encoder) + i in pooled_encoder_blocks) for i in range(3)]
    encoder.append(nn.Conv2d(64, latent_channels, 3, padding=1))
    decoder = [SoftClamp(), nn.Conv2d(latent_channels, 64, 3, padding=1), nn.ReLU()]
    for _ in range(3):
        decoder += [Block(len(decoder) + i in pooled_decoder_blocks) for i in range(3)]
        decoder += [nn.Upsample(scale_factor=2), nn.Conv2d(64, 64, 3, padding=1, bias=False)]
    decoder += [Block(False), nn.Conv2d(64, 3, 3, padding=1)]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


@pytest.mark.parametrize("kind", ["taesd", "taef2"])
def test_tae_matches_independent_reference(kind, autoencoders, portraits):
    if kind == "taesd":
        encoder, decoder = reference_tae(4)
        folder = shared_path("weights/taesd")
        encoder_state = load_file(folder / "taesd_encoder.safetensors")
        decoder_state = load_file(folder / "taesd_decoder.safetensors")
    else:
        encoder, decoder = reference_tae(32, pooled_encoder_blocks=(11, 12, 13), pooled_decoder_blocks=(3, 4, 5))
        folder = shared_path("weights/taef2")
        encoder_state = torch.load(folder / "taef2_encoder.pth", map_location="cpu", weights_only=True)
        decoder_state = torch.load(folder / "taef2_decoder.pth", map_location="cpu", weights_only=True)
    encoder.load_state_dict({k: v.float() for k, v in encoder_state.items()}, strict=True)
    decoder.load_state_dict({k: v.float() for k, v in decoder_state.items()}, strict=True)
    images = portraits[:1, :, 96:160, 96:160]
    with torch.no_grad():
        expected_latents = encoder(images)
        expected_images = decoder(expected_latents).clamp(0, 1)
    latents = autoencoders[kind].encode(images)
    torch.testing.assert_close(latents, expected_latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(autoencoders[kind].decode(expected_latents), expected_images, atol=1e-4, rtol=1e-4)


def test_file_of_pair_and_forced_kind_load_the_same_weights(autoencoders, portraits):
    decoder_file = shared_path("weights/taef1/taef1_decoder.safetensors")
    autoencoder = load_autoencoder(decoder_file, kind="taef1")
    images = portraits[:1, :, 96:160, 96:160]
    torch.testing.assert_close(autoencoder.encode(images), autoencoders["taef1"].encode(images), atol=0, rtol=0)
    with pytest.raises(
        LmdiffInputError,
        match=r"16 latent channels whose architecture fits kind \('taesd', 'taef1'\), not kind='taef2'",
    ):
        load_autoencoder(decoder_file, kind="taef2")


def test_other_dtype_keeps_float32_io_on_the_input_device(portraits):
    autoencoder = load_autoencoder(shared_path("weights/taesd"), dtype=torch.bfloat16)
    assert autoencoder.dtype == torch.bfloat16 and autoencoder.device == torch.device("cpu")
    images = portraits[:1, :, 112:144, 112:144]
    latents = autoencoder.encode(images)
    assert latents.dtype == torch.float32 and autoencoder.decode(latents).dtype == torch.float32
    reference = autoencoder.to(dtype=torch.float32)
    assert reference is autoencoder and autoencoder.dtype == torch.float32
    assert (autoencoder.encode(images) - latents).abs().mean() < 0.05


# ------------------------------------------------------------------------------------------------------------------
# diffusers AutoencoderKL
# ------------------------------------------------------------------------------------------------------------------
def tiny_kl(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    blocks = 4
    return AutoencoderKL(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        latent_channels=4,
        **config,
    ).eval()


def test_diffusers_kl_folder(tmp_path):
    reference = tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    reference.save_pretrained(tmp_path / "vae")
    autoencoder = load_autoencoder(tmp_path / "vae")
    assert (autoencoder.kind, autoencoder.latent_channels, autoencoder.downscale) == ("kl", 4, 8)
    assert (autoencoder.scaling_factor, autoencoder.shift_factor) == (0.5, 0.1)
    images = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    latents = autoencoder.encode(images, batch_size=2)
    torch.testing.assert_close(autoencoder.encode(images, batch_size=1), latents, atol=1e-6, rtol=0)  # deterministic
    with torch.no_grad():
        expected = (reference.encode(images * 2 - 1).latent_dist.mean - 0.1) * 0.5
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=1e-5)
    decoded = autoencoder.decode(latents, batch_size=2)
    assert decoded.shape == images.shape and decoded.min() >= 0 and decoded.max() <= 1


def ldm_state_dict(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in the original (LDM) key layout of SD .safetensors VAE files."""
    renames = [
        (r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block."),
        (r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample."),
        (r"(up\.\d+\.)resnets\.", r"\1block."),
        (r"upsamplers\.0\.", "upsample."),
        (r"mid_block\.resnets\.0\.", "mid.block_1."),
        (r"mid_block\.resnets\.1\.", "mid.block_2."),
        (r"mid_block\.attentions\.0\.", "mid.attn_1."),
        (r"conv_norm_out", "norm_out"),
        (r"conv_shortcut", "nin_shortcut"),
        (r"group_norm", "norm"),
        (r"to_([qkv])\.", r"\1."),
        (r"to_out\.0\.", "proj_out."),
    ]
    ldm = {}
    for key, value in state.items():
        key = re.sub(r"up_blocks\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.", key)
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        ldm[key] = (value[:, :, None, None] if ".attn_1." in key and value.ndim == 2 else value).contiguous()
    return ldm


def test_single_file_sd_kl_loads_offline(tmp_path):
    reference = tiny_kl()
    save_file(ldm_state_dict(reference.state_dict(), 4), tmp_path / "vae.safetensors")
    autoencoder = load_autoencoder(tmp_path / "vae.safetensors")  # conftest sets HF_HUB_OFFLINE=1
    assert (autoencoder.kind, autoencoder.latent_channels, autoencoder.scaling_factor) == ("kl", 4, 0.18215)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.encode(images * 2 - 1).latent_dist.mean * 0.18215
    torch.testing.assert_close(autoencoder.encode(images), expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------------------
def test_missing_path(tmp_path):
    with pytest.raises(LmdiffInputError, match=r"nowhere.*does not exist; expected a TAE encoder/decoder pair"):
        load_autoencoder(tmp_path / "nowhere")


def test_encoder_without_decoder(tmp_path):
    shutil.copy(shared_path("weights/taesd/taesd_encoder.safetensors"), tmp_path)
    expected = re.escape(str(tmp_path / "taesd_decoder.safetensors"))
    with pytest.raises(LmdiffInputError, match=f"has no decoder beside it; expected {expected}"):
        load_autoencoder(tmp_path)
    with pytest.raises(LmdiffInputError, match="has no decoder beside it"):
        load_autoencoder(tmp_path / "taesd_encoder.safetensors")


def test_safetensors_with_unrelated_keys(tmp_path):
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, tmp_path / "clip.safetensors")
    with pytest.raises(LmdiffInputError, match=r"clip\.safetensors has an unknown key layout.*text_model"):
        load_autoencoder(tmp_path / "clip.safetensors")
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, tmp_path / "x_encoder.safetensors")
    save_file({"1.weight": torch.zeros(64, 4, 3, 3)}, tmp_path / "x_decoder.safetensors")
    with pytest.raises(LmdiffInputError, match=r"x_encoder\.safetensors has key 'text_model.*expected taesd\.py"):
        load_autoencoder(tmp_path)


def test_bad_images(autoencoders):
    taesd = autoencoders["taesd"]
    with pytest.raises(LmdiffInputError, match="60x64 .*multiples of 8"):
        taesd.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(LmdiffInputError, match=r"values in \[0, 255\]; expected RGB floats in \[0, 1\]"):
        taesd.encode(torch.linspace(0, 255, 3 * 64 * 64).reshape(1, 3, 64, 64))
    with pytest.raises(LmdiffInputError, match=r"shape \(1, 64, 64, 3\); expected \[B, 3, H, W\]"):
        taesd.encode(torch.rand(1, 64, 64, 3))
    with pytest.raises(LmdiffInputError, match=r"latents has shape \(1, 16, 8, 8\); expected \[B, 4, H, W\]"):
        taesd.decode(torch.zeros(1, 16, 8, 8))


def test_pixel_autoencoder_is_the_exact_space_to_depth_rearrangement():
    """No weights: latent channel (c, dy, dx) at (i, j) is 2 x pixel (4i + dy, 4j + dx) of channel c, minus 1."""
    ae = load_autoencoder("pixel")
    assert (ae.kind, ae.latent_channels, ae.downscale) == ("pixel", 48, 4)
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    latents = ae.encode(images)
    assert latents.shape == (2, 48, 4, 6)
    c, dy, dx, i, j = 1, 2, 3, 1, 4
    assert torch.isclose(latents[0, c * 16 + dy * 4 + dx, i, j], images[0, c, 4 * i + dy, 4 * j + dx] * 2 - 1)
    torch.testing.assert_close(ae.decode(latents), images, atol=1e-6, rtol=0)
