"""The quality-mode refiner on real clips: its training pairs never see the target's surroundings, its sampler, and
quality mode end to end with the bundled refiner."""

import math

import numpy as np
import pytest
import torch

from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.media import iter_frames, read_audio
from lmdiff_core.pipelines.quality import sdedit, sdedit_timesteps
from lmdiff_core.refiner_data import CHANNELS, MIN_GAP_SECONDS, clip_pairs, split_channels
from lmdiff_core.smoothing import smooth_detections

FPS = 25.0


@pytest.fixture(scope="module")
def clip(clips_dir, mediapipe_model):
    frames = np.stack(list(iter_frames(clips_dir / "edtalk_woman_en.mp4", FPS, max_frames=150)))  # 6 s
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        seq = smooth_detections(extract_landmarks(frames, landmarker, FPS, max_gap=None))
    return frames, seq


def test_pairs_never_retrieve_frames_within_two_seconds_of_the_target(clip):
    frames, seq = clip
    gap = MIN_GAP_SECONDS * FPS
    arrays, meta = clip_pairs(frames, seq, size=128, max_pairs=7, seed=0)
    assert arrays.shape == (len(meta), sum(CHANNELS.values()), 128, 128) and arrays.dtype == np.uint8
    assert len(meta) >= 5  # mid-clip targets of a 6 s clip still have frames 2 s away on one side
    for pair in meta:
        used = np.asarray(pair["bank_frames"])
        assert used.size >= 2 and (np.abs(used - pair["frame"]) >= gap).all()
    # without the exclusion the nearest lip shapes are mostly the target's own neighbours: the check can fail
    _, unguarded = clip_pairs(frames, seq, size=128, max_pairs=7, seed=0, min_gap=0.0)
    assert any((np.abs(np.asarray(p["bank_frames"]) - p["frame"]) < gap).any() for p in unguarded)
    # the cached pair: the warped reference resembles the target in the mouth far more than the grey pose reference
    item = split_channels(torch.from_numpy(arrays[:1]))
    mouth = item["mouth_mask"].expand(-1, 3, -1, -1) > 0.5
    err = (item["warped"] - item["target"]).abs()[mouth].mean()
    assert err < (0.5 - item["target"]).abs()[mouth].mean()


def test_sdedit_with_a_perfect_denoiser_returns_its_estimate():
    """The sampler: from `start` noised to the first timestep, each step re-noises the estimate along the implied
    noise (DDIM, deterministic); a denoiser that always answers x0 gives x0, whatever the noise."""
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    x0 = torch.rand(2, 3, 4, 4)
    seen = []

    def denoise(sample, t):
        seen.append((t, sample))
        return x0

    out = sdedit(denoise, torch.zeros(2, 3, 4, 4), torch.randn(1, 3, 4, 4), alphas, sdedit_timesteps(1000, 0.5, 2))
    assert torch.equal(out, x0)
    assert [t for t, _ in seen] == [500, 250]
    assert torch.allclose(seen[0][1].mean(), torch.tensor(0.0), atol=0.6)  # the start (zeros) noised
    a = alphas[250]
    eps = (seen[0][1] - alphas[500].sqrt() * x0) / (1 - alphas[500]).sqrt()
    assert torch.allclose(seen[1][1], a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-5)


def test_quality_mode_end_to_end_with_the_bundled_refiner(clips_dir, mediapipe_model):
    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_REFINER
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

    frames = np.stack(list(iter_frames(clips_dir / "edtalk_man_en.mp4", FPS, max_frames=20)))
    audio = read_audio(clips_dir / "edtalk_man_en.wav")[: int(0.9 * 16000)]  # 22.5 frames -> 23 (video looped)
    refiner = LandmarkToVideoPipeline.from_pretrained(BUNDLED_REFINER, autoencoder=load_autoencoder("pixel"))
    assert refiner.unet.config.extra_references == 1 and refiner.refine["steps"] >= 1
    pipe = TalkingHeadPipeline(AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L), refiner)
    steps = []
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        out, n = pipe.generate(audio, landmarker, video=frames, mode="quality", on_step=lambda: steps.append(1))
        out = np.stack(list(out))
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        fast, _ = pipe.generate(audio, landmarker, video=frames, mode="fast")
        fast = np.stack(list(fast))
    looped = frames[np.arange(23) % 20]
    assert n == 23 == math.ceil(len(audio) / 16000 * FPS) and out.shape == looped.shape
    assert len(steps) == refiner.refine["steps"] * math.ceil(23 / 8)  # render_fast's batches of 8
    changed = (out != looped).any(-1)
    assert changed.any((1, 2)).all()  # every frame's lower face is rebuilt ...
    assert not (fast != looped).any(-1)[:, : frames.shape[1] // 4].any()  # ... under fast mode's paste mask only
    assert not changed[:, : frames.shape[1] // 4].any()
    # the refiner changes fast mode's pixels (it is not the identity) but stays close to them
    diff = np.abs(out.astype(int) - fast.astype(int))[changed]
    assert 0.5 < diff.mean() < 40
