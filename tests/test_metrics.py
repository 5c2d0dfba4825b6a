"""Metrics against independent computations on real frames and landmarks."""

import math

import numpy as np
import pytest
import torch
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lmdiff_core import metrics
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import iter_frames
from lmdiff_core.smoothing import smooth_landmarks

from .conftest import random_arcface_onnx, shared_path


@pytest.fixture(scope="module")
def clip(mediapipe_model):
    frames = np.stack(list(iter_frames(shared_path("data/clips/macron_fr.mp4"), 25.0, max_frames=30)))
    with load_landmarker("mediapipe", mediapipe_model, num_faces=1) as landmarker:
        seq = extract_landmarks(frames, landmarker, 25.0)
    return frames, seq


def test_psnr_identity_known_noise_and_mask(clip):
    frames, _ = clip
    truth = frames[:4]
    assert metrics.psnr(truth, truth) == math.inf
    rng = np.random.default_rng(0)
    noisy = np.clip(truth.astype(np.float64) + rng.normal(0, 8, truth.shape), 0, 255).round().astype(np.uint8)
    expected = peak_signal_noise_ratio(truth, noisy, data_range=255)
    assert metrics.psnr(noisy, truth) == pytest.approx(expected, abs=1e-3)
    assert 29 < expected < 31  # sigma 8 of 255: 20 log10(255 / 8) = 30.1 dB before rounding and clipping
    mask = torch.zeros(4, 1, *truth.shape[1:3])
    mask[:, :, 100:300, 150:350] = 1
    inside = truth.copy()
    inside[:, 100:300, 150:350] = noisy[:, 100:300, 150:350]
    assert metrics.psnr(inside, truth, mask) == pytest.approx(
        peak_signal_noise_ratio(truth[:, 100:300, 150:350], noisy[:, 100:300, 150:350], data_range=255), abs=1e-3
    )
    assert metrics.psnr(inside, truth, 1 - mask) == math.inf


def test_ssim_is_wang_et_al_as_skimage_computes_it(clip):
    """The SSIM of the published tables: skimage's structural_similarity with Wang et al.'s Gaussian window, per frame
    and averaged over frames (inside a mask: the masked mean of skimage's full SSIM map, border pixels cropped)."""
    frames, _ = clip
    a, b = frames[[0, 5]], frames[[12, 20]]
    assert metrics.ssim(frames[:1], frames[:1]) == pytest.approx(1.0, abs=1e-9)
    ours = metrics.ssim(a, b)
    assert ours == pytest.approx(metrics.ssim(b, a), abs=1e-9)
    options = dict(channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    reference = [structural_similarity(x, y, **options) for x, y in zip(a, b)]
    assert ours == pytest.approx(np.mean(reference), abs=1e-6)
    assert ours < 0.999
    _, full = structural_similarity(a[0], b[0], full=True, **options)
    mask = torch.zeros(1, 1, *a.shape[1:3])
    mask[..., 100:300, 150:350] = 1
    want = full.mean(axis=-1)[100:300, 150:350].mean()
    assert metrics.ssim(a[:1], b[:1], mask) == pytest.approx(want, abs=1e-6)


def test_mean_psnr_averages_frames_and_differs_from_the_pooled_psnr(clip):
    frames, _ = clip
    truth = frames[:6]
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, truth.shape) * np.array([2, 4, 8, 16, 32, 3])[:, None, None, None]
    noisy = np.clip(truth + noise, 0, 255).round().astype(np.uint8)
    per_frame = [peak_signal_noise_ratio(t, x, data_range=255) for t, x in zip(truth, noisy)]
    np.testing.assert_allclose(metrics.frame_psnr(noisy, truth), per_frame, atol=1e-6)
    assert metrics.mean_psnr(noisy, truth) == pytest.approx(np.mean(per_frame), abs=1e-6)
    pooled = peak_signal_noise_ratio(truth, noisy, data_range=255)  # skimage pools the MSE of the whole array
    assert metrics.psnr(noisy, truth) == pytest.approx(pooled, abs=1e-4)
    assert metrics.mean_psnr(noisy, truth) - pooled > 1.0  # unequal noise: the two conventions differ by dBs
    noisy[2] = truth[2]  # an identical frame has an infinite PSNR and is left out of the mean
    assert metrics.mean_psnr(noisy, truth) == pytest.approx(np.mean(per_frame[:2] + per_frame[3:]), abs=1e-6)
    assert metrics.mean_psnr(truth, truth) == math.inf


def test_landmark_distance_zero_shift_and_scale(clip):
    _, seq = clip
    assert metrics.landmark_distance(seq, seq) == 0.0
    shifted = seq.replace(points=seq.points + np.array([3.0, 4.0, 0.0], np.float32))
    expected = float(np.mean(5.0 / seq.inter_ocular()))
    assert metrics.landmark_distance(shifted, seq) == pytest.approx(expected, rel=1e-5)
    assert metrics.landmark_distance(shifted, seq, "mouth") == pytest.approx(expected, rel=1e-5)
    # resizing both videos by 2 leaves the normalised distance unchanged
    double = lambda s: s.replace(points=s.points * 2, frame_size=(s.frame_size[0] * 2, s.frame_size[1] * 2))  # noqa: E731
    assert metrics.landmark_distance(double(shifted), double(seq)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(LmdiffInputError, match="frames"):
        metrics.landmark_distance(seq[:5], seq)


def test_mouth_opening_correlation(clip):
    _, seq = clip
    assert metrics.mouth_opening_correlation(seq, seq) == pytest.approx(1.0)
    opening = seq.mouth_opening()
    delayed = seq[np.maximum(np.arange(len(seq)) - 5, 0)]
    assert metrics.mouth_opening_correlation(delayed, seq) == pytest.approx(
        np.corrcoef(opening[np.maximum(np.arange(len(seq)) - 5, 0)], opening)[0, 1]
    )
    assert metrics.mouth_opening_correlation(delayed, seq) < 0.9


def test_frame_difference_error_and_jitter(clip):
    frames, seq = clip
    truth = frames[:10]
    assert metrics.frame_difference_error(truth, truth) == 0.0
    frozen = np.repeat(truth[:1], 10, axis=0)
    expected = float(np.mean((np.diff(truth.astype(np.float64) / 255, axis=0)) ** 2))
    assert metrics.frame_difference_error(frozen, truth) == pytest.approx(expected, rel=1e-4)
    assert metrics.landmark_jitter(smooth_landmarks(seq)) < metrics.landmark_jitter(seq)


def test_cpbd_falls_monotonically_with_blur():
    from PIL import Image

    frame = next(iter(iter_frames(shared_path("data/clips/cnn_anchor_en.mp4"), 25.0, max_frames=1)))
    portrait = np.asarray(Image.open(shared_path("data/images/portrait_man_a.jpg")).convert("RGB"))
    for image in (frame, portrait):
        scores = [metrics.cpbd(image)]
        for sigma in (0.5, 1.0, 1.5):
            blurred = gaussian(image, sigma=sigma, channel_axis=-1, preserve_range=True).round().astype(np.uint8)
            scores.append(metrics.cpbd(blurred))
        assert all(a > b for a, b in zip(scores, scores[1:])), scores
        assert 0.2 < scores[0] <= 1.0


def test_csim_same_person_above_other_person(clip, mediapipe_model):
    frames, seq = clip
    other = np.stack(list(iter_frames(shared_path("data/clips/cnn_anchor_en.mp4"), 25.0, max_frames=len(frames))))
    with load_landmarker("mediapipe", mediapipe_model, num_faces=1) as landmarker:
        other_seq = extract_landmarks(other, landmarker, 25.0)
    encoder = metrics.IdentityEncoder()
    assert metrics.csim(encoder, frames, seq, frames, seq) == pytest.approx(1.0, abs=1e-6)
    later = np.arange(len(frames))[::-1]  # the same person, other frames
    same = metrics.csim(encoder, frames[later], seq[later], frames, seq)
    different = metrics.csim(encoder, other, other_seq, frames, seq)
    assert 0.85 < same < 1.0 and different < same - 0.05, (same, different)


def test_shape_mismatch_is_a_clear_error(clip):
    frames, _ = clip
    with pytest.raises(LmdiffInputError, match="differ in shape"):
        metrics.psnr(frames[:2], frames[:3])
    with pytest.raises(LmdiffInputError, match="at least 2"):
        metrics.frame_difference_error(frames[:1], frames[:1])


def test_arcface_alignment_matches_an_independent_similarity_warp(clip, tmp_path):
    """Random-weight ArcFace stand-in: the aligned crop equals skimage's least-squares similarity warp of the same
    5 keypoints, and the embedding equals onnxruntime run on skimage's crop."""
    pytest.importorskip("onnxruntime")
    import onnxruntime
    from skimage.transform import SimilarityTransform, warp

    frames, seq = clip
    points = seq.to_topology("ibug68").points[5]
    encoder = metrics.ArcFaceEncoder(random_arcface_onnx(tmp_path / "arcface.onnx"))
    transform = SimilarityTransform.from_estimate(metrics.five_points(points), metrics.ARCFACE_TEMPLATE)
    reference = warp(frames[5].astype(np.float64), transform.inverse, output_shape=(112, 112), order=1, cval=0)
    crop = encoder.align(frames[5], points)
    assert np.abs(crop - reference).mean() < 1.0  # grey levels
    mapped = transform(metrics.five_points(points))
    assert np.abs(mapped - metrics.ARCFACE_TEMPLATE).max() < 6.0  # the face's keypoints land near the template
    session = onnxruntime.InferenceSession(str(tmp_path / "arcface.onnx"), providers=["CPUExecutionProvider"])
    blob = ((reference.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    direct = session.run(None, {"input.1": blob})[0][0]
    direct = direct / np.linalg.norm(direct)
    assert float(encoder(frames[5], points) @ direct) > 0.999
    assert metrics.csim(encoder, frames, seq, frames, seq) == pytest.approx(1.0, abs=1e-6)
    assert encoder.name == "arcface:arcface.onnx"


def test_arcface_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(LmdiffInputError, match="does not exist"):
        metrics.ArcFaceEncoder(tmp_path / "missing.onnx")
    pytest.importorskip("onnxruntime")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(LmdiffInputError, match="could not be loaded"):
        metrics.ArcFaceEncoder(bad)
