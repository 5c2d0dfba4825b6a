"""The one sampler (`pipelines.sampling`): the same numbers as a plain scheduler loop, per-step callbacks (progress,
Cancel) in A2L diffusion and L2V alike, and L2V checkpoints reloading the scheduler they save."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdiff_core.canonical import CANONICAL_SIZE, mean_face
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.models import A2LDiffusion, L2VUNet
from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline, sample_window
from lmdiff_core.pipelines.schedulers import make_scheduler

from .test_l2v_model import TINY, _randomize_zero_layers


def _reference_loop(unet, scheduler, noise, cond, pose, mask, ident, steps, scale, known, weight, generator):
    """Classifier-free guided DDIM written out step by step: conditional and blank-condition passes run separately,
    the known first frames are pulled towards their noised latents before every step."""
    scheduler.set_timesteps(steps)
    sample = noise * scheduler.init_noise_sigma
    k, w = known.shape[0], weight[:, None, None, None]
    for t in scheduler.timesteps:
        noised = scheduler.add_noise(known, noise[:k], t.reshape(1))
        sample = torch.cat([w * noised + (1 - w) * sample[:k], sample[k:]])
        x = scheduler.scale_model_input(sample, t)
        c = unet(x, t, cond, pose, mask, ident, len(noise))
        u = unet(x, t, torch.zeros_like(cond), pose, mask, ident, len(noise))
        sample = scheduler.step(u + scale * (c - u), t, sample, generator=generator).prev_sample
    return sample


@torch.no_grad()
def test_l2v_window_matches_a_plain_guided_loop():
    torch.manual_seed(0)
    unet = L2VUNet(**TINY).eval()
    _randomize_zero_layers(unet)  # so the landmark condition matters and guidance changes the result
    g = torch.Generator().manual_seed(1)
    noise, pose, ident = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    cond, mask = torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 1, 64, 64, generator=g)
    known, weight = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([0.6])
    steps, calls = 5, []
    got = sample_window(
        unet, make_scheduler(unet), noise, cond, pose, mask, ident, steps, guidance_scale=2.5, known=known,
        known_weight=weight, generator=torch.Generator().manual_seed(2), on_step=lambda: calls.append(1),
    )
    want = _reference_loop(
        unet, make_scheduler(unet), noise, cond, pose, mask, ident, steps, 2.5, known, weight, torch.Generator()
    )
    assert len(calls) == steps
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    unguided = sample_window(unet, make_scheduler(unet), noise, cond, pose, mask, ident, steps, known=known,
                             known_weight=weight)
    assert (unguided - got).abs().max() > 1e-3  # guidance is not a no-op here, so the match above means something


def _tiny_a2l() -> AudioToLandmarksPipeline:
    torch.manual_seed(0)
    model = A2LDiffusion(d_model=32, n_heads=2, n_layers=1, window=8, prev_frames=4).eval()
    return AudioToLandmarksPipeline(model)


def _reference() -> LandmarkSequence:
    points = mean_face("ibug68")[None].astype(np.float32)
    return LandmarkSequence(points=points, topology="ibug68", fps=25.0, frame_size=CANONICAL_SIZE, space="canonical")


def test_a2l_diffusion_calls_on_step_and_a_cancel_stops_it():
    pipeline = _tiny_a2l()
    cfg = pipeline.model.config
    features = np.random.default_rng(0).standard_normal((20, cfg.audio_sub_frames, cfg.audio_layers, cfg.audio_dim))
    features = features.astype(np.float32)
    calls = []
    seq = pipeline.predict_features(features, _reference(), num_inference_steps=3, on_step=lambda: calls.append(1))
    windows = int(np.ceil((20 - 8) / (8 - cfg.prev_frames // 2))) + 1
    assert len(seq) == 20 and len(calls) == 3 * windows

    class Cancelled(Exception):
        pass

    def cancel():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    calls.clear()
    with pytest.raises(Cancelled):
        pipeline.predict_features(features, _reference(), num_inference_steps=3, on_step=cancel)
    assert len(calls) == 2  # stopped inside the first window, at the second step


def test_l2v_checkpoint_reloads_the_scheduler_it_saved(tmp_path):
    unet = L2VUNet(latent_channels=12, downscale=2, autoencoder="pixel", **TINY)
    scheduler = make_scheduler(unet)
    scheduler.register_to_config(beta_schedule="scaled_linear")  # not what make_scheduler would build
    pipeline = LandmarkToVideoPipeline(unet, type(scheduler).from_config(scheduler.config), crop_size=64, window=2,
                                       overlap=1)
    pipeline.save_pretrained(tmp_path / "ckpt")
    loaded = LandmarkToVideoPipeline.from_pretrained(tmp_path / "ckpt")
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
    torch.testing.assert_close(loaded.scheduler.betas, pipeline.scheduler.betas)
    dpm = LandmarkToVideoPipeline.from_pretrained(tmp_path / "ckpt", sampler="dpm++")
    assert type(dpm.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.scheduler.config.beta_schedule == "scaled_linear"
    loaded.set_sampler("unipc")
    assert loaded.scheduler.config.beta_schedule == "scaled_linear"
