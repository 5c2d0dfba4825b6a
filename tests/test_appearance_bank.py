"""Appearance bank and fast mode on real clips: retrieval, warping, pass-through of faceless frames, end to end."""

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmdiff_core.appearance_bank import (
    KEY_WEIGHTS,
    LIP_SIGMA,
    POSE_SIGMA,
    AppearanceBank,
    shape_keys,
)
from lmdiff_core.canonical import CANONICAL_INTER_OCULAR, canonicalize, head_pose
from lmdiff_core.crop import compute_crop_track, crop_frames, face_masks, transform_landmarks
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.editing import dub_landmarks
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import iter_frames, read_audio
from lmdiff_core.pipelines.fast import render_fast
from lmdiff_core.smoothing import smooth_landmarks

FPS = 25.0
N = 60


@pytest.fixture(scope="module")
def clip(clips_dir, mediapipe_model):
    frames = np.stack(list(iter_frames(clips_dir / "edtalk_man_en.mp4", FPS, max_frames=N)))
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        seq = smooth_landmarks(extract_landmarks(frames, landmarker, FPS))
    return frames, seq


def test_retrieval_returns_the_nearest_lip_shape(clip):
    frames, seq = clip
    bank = AppearanceBank.build(frames[:40], seq[:40], size=64)
    assert len(bank) == 40 and list(bank.frames) == list(range(40))
    # independent brute force: canonical iBUG-68 lips (48-67) and jaw (3-13), weighted, plus pose
    def keys(s):
        canonical = canonicalize(s)
        pts = canonical.to_topology("ibug68").points[:, list(range(48, 68)) + list(range(3, 14)), :2]
        pose = head_pose(canonical)
        return pts / CANONICAL_INTER_OCULAR, np.stack([pose["yaw"], pose["pitch"], pose["roll"]], 1)

    q_lips, q_pose = keys(seq[40:])
    b_lips, b_pose = keys(seq[:40])
    w = KEY_WEIGHTS / KEY_WEIGHTS.sum()
    expected = np.empty((20, 40))
    for i in range(20):
        for j in range(40):
            d2 = ((q_lips[i] - b_lips[j]) ** 2).sum(-1)
            expected[i, j] = (w * d2).sum() / 2 / LIP_SIGMA**2 + ((q_pose[i] - b_pose[j]) ** 2).sum() / POSE_SIGMA**2
    idx, cost = bank.nearest(*shape_keys(seq[40:]), k=1)
    np.testing.assert_array_equal(idx[:, 0], expected.argmin(1))
    np.testing.assert_allclose(cost[:, 0], expected.min(1), rtol=1e-4, atol=1e-6)
    # without hysteresis or smoothing, retrieve's first choice is that nearest entry
    r = bank.retrieve(*shape_keys(seq[40:]), k=2, hysteresis=0.0, smoothing=0.0)
    np.testing.assert_array_equal(r.indices[:, 0], expected.argmin(1))
    np.testing.assert_allclose(r.weights.sum(1), 1.0)
    # a frame in the bank retrieves itself; an excluded frame cannot be retrieved
    assert (bank.nearest(*shape_keys(seq[:40]), k=1)[0][:, 0] == np.arange(40)).all()
    held = AppearanceBank.build(frames[:40], seq[:40], size=64, exclude=np.arange(10, 20))
    assert not set(range(10, 20)) & set(held.frames.tolist())
    r = held.retrieve(*shape_keys(seq[10:20]), k=3)
    assert not set(held.frames[r.indices[r.weights > 0]].tolist()) & set(range(10, 20))


def test_retrieval_is_temporally_stable(clip):
    frames, seq = clip
    bank = AppearanceBank.build(frames[:40], seq[:40], size=64)
    lips, pose = shape_keys(seq[40:])
    lips = lips + np.random.default_rng(0).normal(0, 0.2 * LIP_SIGMA, lips.shape)  # detector-like jitter
    plain = bank.retrieve(lips, pose, k=1, hysteresis=0.0, smoothing=0.0)
    stable = bank.retrieve(lips, pose, k=1)
    switches = lambda r: int((np.diff(r.indices[:, 0]) != 0).sum())  # noqa: E731
    assert switches(stable) <= switches(plain)
    blended = bank.retrieve(lips, pose, k=3)
    change = np.abs(np.diff(_dense(blended, len(bank)), axis=0)).sum(1)
    assert change.max() < 2.0  # a source never drops from full weight to zero in one frame


def _dense(r, b):
    out = np.zeros((len(r.indices), b))
    np.put_along_axis(out, r.indices, r.weights, axis=1)
    return out


def _one_frame_bank(frames, seq, size=128):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank = AppearanceBank.build(frames[:1], seq[:1], size=size)
    assert any("one frame" in str(w.message) for w in caught)
    return bank


def test_warp_recovers_a_known_similarity(clip):
    frames, seq = clip
    bank = _one_frame_bank(frames, seq)
    pts = bank.landmarks.points[:1, :, :2].astype(np.float64)
    angle, scale, shift = math.radians(6.0), 1.06, np.array([5.0, -3.0])
    c = np.array([63.5, 63.5])
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    target = bank.landmarks.replace(points=np.concatenate([(pts - c) @ rot.T + c + shift, pts[..., 2:] * 0], -1))
    warped = bank.warp([0], target)
    # the same similarity applied independently: sample the crop at inverse(target px)
    ys, xs = np.meshgrid(np.arange(128.0), np.arange(128.0), indexing="ij")
    src = (np.stack([xs, ys], -1) - c - shift) @ np.linalg.inv(rot).T + c
    grid = torch.as_tensor(2 * src / 127.0 - 1, dtype=torch.float32)[None]
    expected = F.grid_sample(bank.crops[:1].float() / 255, grid, align_corners=True, padding_mode="border")
    face = face_masks(target, parts=("face",))["face"].bool().expand(-1, 3, -1, -1)
    err = (warped - expected).abs()[face]
    assert err.mean() < 0.02, err.mean()
    identity = (bank.crops[:1].float() / 255 - expected).abs()[face]
    assert identity.mean() > 4 * err.mean()


def test_warp_recovers_a_known_lower_face_bend(clip):
    frames, seq = clip
    bank = _one_frame_bank(frames, seq)
    pts = bank.landmarks.points[0, :, :2].astype(np.float64)
    mouth = pts[48:68].mean(0)

    def bend(p):  # target px -> source px: a smooth bump that opens the jaw (source px = p + d(p))
        r2 = ((p - mouth) ** 2).sum(-1, keepdims=True) / (18.0**2)
        return p + np.exp(-r2) * np.array([0.0, -6.0]) * np.clip((p[..., 1:] - mouth[1] + 20) / 20, 0, 1)

    target = pts.copy()
    for _ in range(50):  # the target points whose bent position is the source landmark: fixed point of t = s - d(t)
        target = pts - (bend(target) - target)
    seq_t = bank.landmarks.replace(points=np.concatenate([target[None], np.zeros((1, 68, 1))], -1))
    warped = bank.warp([0], seq_t)
    ys, xs = np.meshgrid(np.arange(128.0), np.arange(128.0), indexing="ij")
    grid = torch.as_tensor(2 * bend(np.stack([xs, ys], -1)) / 127.0 - 1, dtype=torch.float32)[None]
    expected = F.grid_sample(bank.crops[:1].float() / 255, grid, align_corners=True, padding_mode="border")
    region = face_masks(seq_t, parts=("mouth",))["mouth"].bool().expand(-1, 3, -1, -1)
    err = (warped - expected).abs()[region].mean()
    unbent = (bank.crops[:1].float() / 255 - expected).abs()[region].mean()
    assert err < 0.5 * unbent, (err, unbent)


def test_fast_mode_passes_faceless_frames_and_keeps_pixels_outside_the_mask(clip, mediapipe_model):
    frames, seq = clip
    video = frames[:30].copy()
    video[10:14] = 0  # a cut to black
    video[14:16] = 255  # and a blank white flash
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        source = smooth_landmarks(extract_landmarks(video, landmarker, FPS, max_gap=None))
    assert not source.valid[10:16].any() and source.valid[:10].all() and source.valid[16:].all()
    bank = AppearanceBank.build(frames[30:], seq[30:], size=128)
    talking = canonicalize(seq[30:60]).to_topology("ibug68")  # other lips, posed like this video's frames
    target = dub_landmarks(source, talking)
    source = source.to_topology("ibug68")
    assert (target.valid == source.valid).all()
    out = np.stack(list(render_fast(video, source, target, bank)))
    assert out.shape == video.shape
    np.testing.assert_array_equal(out[10:16], video[10:16])
    changed = (out != video).any(-1)
    assert changed[16:].any((1, 2)).all() and changed[:10].any((1, 2)).all()  # the face is picked up again
    # outside the dilated face hull of the frame and of the target nothing moves
    hull = torch.maximum(face_masks(source, parts=("face",))["face"], face_masks(target, parts=("face",))["face"])
    near = F.max_pool2d(hull, 2 * 41 + 1, stride=1, padding=41)[:, 0].numpy() > 0
    assert not changed[~near].any()
    above_eyes = int(source.points[source.valid, 36:48, 1].min()) - 40  # rows above the eyes (all faces)
    assert not changed[:, :above_eyes].any()


def test_fast_mode_end_to_end_frame_count_and_warning(clips_dir, mediapipe_model):
    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

    frames = np.stack(list(iter_frames(clips_dir / "latentsync_woman.mp4", FPS, max_frames=30)))
    frames[12:15] = 0
    audio = read_audio(clips_dir / "cnn_anchor_en.wav")[: int(1.37 * 16000)]  # 34.25 frames -> 35
    pipe = TalkingHeadPipeline(
        AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L), LandmarkToVideoPipeline.from_pretrained(BUNDLED_L2V)
    )
    with load_landmarker("mediapipe", mediapipe_model) as landmarker, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, n = pipe.generate(audio, landmarker, video=frames, mode="fast", crop_size=128)
        out = np.stack(list(out))
    assert n == 35 == math.ceil(len(audio) / 16000 * FPS) and out.shape == (35, *frames.shape[1:])
    assert any("no face in 3 of 30 frames" in str(w.message) for w in caught)
    looped = frames[np.arange(35) % 30]
    np.testing.assert_array_equal(out[12:15], looped[12:15])
    assert (out[15:30] != looped[15:30]).any((1, 2, 3)).all()


def test_bad_inputs_give_a_clear_message_or_a_stated_fallback(clip, images_dir, mediapipe_model):
    frames, seq = clip
    blank = np.zeros((5, 128, 128, 3), np.uint8)
    with load_landmarker("mediapipe", mediapipe_model) as landmarker, pytest.raises(LmdiffInputError, match="no face"):
        extract_landmarks(blank, landmarker, FPS, max_gap=None)
    with pytest.raises(LmdiffInputError, match="appearance bank is empty"):
        AppearanceBank.build(frames[:3], seq[:3].replace(valid=np.zeros(3, bool)), size=64)
    bank = _one_frame_bank(frames, seq, size=64)  # one frame: a warning, and every output bends that frame
    r = bank.retrieve(*shape_keys(seq[10:20]), k=3)
    assert (r.indices == 0).all() and np.allclose(r.weights, 1.0)
    # a 64 px face: the frame shrunk so the face is ~64 px wide still gives a bank and warps (upscaled crops)
    small = F.interpolate(torch.as_tensor(frames[:8]).permute(0, 3, 1, 2).float(), scale_factor=0.25, mode="area")
    small = small.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        try:
            lm = extract_landmarks(small, landmarker, FPS, max_gap=None)
        except LmdiffInputError as exc:  # the stated fallback when the detector cannot see it: a clear message
            assert "no face found" in str(exc)
            return
    face_width = float(np.ptp(lm.points[lm.valid][:, :, 0], axis=1).mean())
    assert face_width < 80
    tiny = AppearanceBank.build(small, lm, size=128)
    out = tiny.warp([0], transform_landmarks(lm[:1], compute_crop_track(lm[:1], 128)).to_topology("ibug68"))
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()


def test_generate_cli_fast_mode(tmp_path, clips_dir, mediapipe_model):
    import soundfile

    from lmdiff_core.cli import main
    from lmdiff_core.media import frame_count, write_video

    speech = tmp_path / "speech.wav"
    soundfile.write(speech, read_audio(clips_dir / "cnn_anchor_en.wav")[: int(1.5 * 16000)], 16000)
    video = tmp_path / "short.mp4"  # 1 s of video for 1.5 s of speech: looped
    write_video(video, list(iter_frames(clips_dir / "latentsync_woman.mp4", FPS, max_frames=25)), FPS)
    out = tmp_path / "dub.mp4"
    args = ["generate", "--audio", str(speech), "--video", str(video), "--mode", "fast", "--size", "128"]
    assert main([*args, "--model", str(mediapipe_model), "-o", str(out)]) == 0
    assert sum(1 for _ in iter_frames(out, None)) == frame_count(1.5, FPS) == 38


def test_smoothing_leaves_faceless_frames_and_smooths_each_run_alone(clip):
    _, seq = clip
    valid = np.ones(len(seq), bool)
    valid[20:26] = False
    gappy = seq.replace(points=np.where(valid[:, None, None], seq.points, 0.0), valid=valid)
    out = smooth_landmarks(gappy)
    np.testing.assert_array_equal(out.points[20:26], 0.0)
    np.testing.assert_allclose(out.points[:20], smooth_landmarks(gappy[:20]).points, atol=1e-4)
    np.testing.assert_allclose(out.points[26:], smooth_landmarks(gappy[26:]).points, atol=1e-4)
    assert np.abs(out.points[19] - seq.points[19]).max() < 0.05 * float(seq.inter_ocular()[19])  # not pulled to 0
