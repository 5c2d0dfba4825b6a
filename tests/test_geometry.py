"""Detectors, face selection and gap filling, canonical geometry, pose transfer and smoothing, on real media."""

import os

import numpy as np
import pytest
import torch

from lmdiff_core import LandmarkSequence, LmdiffInputError
from lmdiff_core.canonical import canonicalize, head_pose, mean_face, nearest_valid, transfer_pose, uncanonicalize
from lmdiff_core.detectors import detect_image, extract_landmarks, fill_gaps, load_landmarker
from lmdiff_core.media import iter_frames, read_image
from lmdiff_core.smoothing import jitter, smooth_landmarks
from lmdiff_core.topology import MEDIAPIPE478

from .conftest import shared_path


@pytest.fixture(scope="module")
def macron(mediapipe_model):
    """Three seconds of a real 512x512 talking clip, with its frames and raw MediaPipe landmarks."""
    frames = list(iter_frames(shared_path("data/clips/macron_fr.mp4"), max_frames=75))
    with load_landmarker("mediapipe", mediapipe_model) as lm:
        seq = extract_landmarks(frames, lm)
    return frames, seq


def _warp(image: np.ndarray, angle: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    import kornia

    h, w = image.shape[:2]
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()
    matrix = kornia.geometry.transform.get_rotation_matrix2d(
        torch.tensor([[w / 2, h / 2]]), torch.tensor([angle]), torch.tensor([[scale, scale]])
    )
    matrix[:, :, 2] += torch.tensor(shift)
    out = kornia.geometry.transform.warp_affine(tensor, matrix, (h, w), padding_mode="border")
    return out[0].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def test_mediapipe_detects_real_portraits(images_dir, mediapipe_model):
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        for path in sorted(images_dir.iterdir()):
            image = read_image(path)
            faces = lm.detect(image)
            assert len(faces) >= 1, path.name
            face = faces[0]
            assert face.points.shape == (478, 3) and face.blendshapes.shape == (52,) and face.transform.shape == (4, 4)
            h, w = image.shape[:2]
            assert (face.points[:, 0] > 0).all() and (face.points[:, 0] < w).all() and (face.points[:, 1] < h).all()


def test_face_selection_and_tracking_with_two_faces(mediapipe_model):
    """Two real talkers side by side: each selector picks the right one and tracking keeps it."""
    left = iter_frames(shared_path("data/clips/edtalk_woman_en.mp4"), max_frames=25)
    right = iter_frames(shared_path("data/clips/edtalk_man_en.mp4"), max_frames=25)
    frames = [np.concatenate([a, b], axis=1) for a, b in zip(left, right)]  # 512x256, faces centred at x 128 and 384
    centres = {}
    for selector in (0, 1, (300, 60, 480, 240)):
        with load_landmarker("mediapipe", mediapipe_model, num_faces=2) as lm:
            seq = extract_landmarks(frames, lm, face=selector)
        assert seq.valid.all()
        centres[str(selector)] = seq.points[:, :, 0].mean(1)
    assert (centres["0"] < 256).all() and (centres["1"] > 256).all()
    np.testing.assert_allclose(centres["(300, 60, 480, 240)"], centres["1"], atol=1.0)


def test_short_gaps_are_interpolated_and_flagged_long_gaps_fail(macron, mediapipe_model):
    frames, _ = macron
    blank = np.full_like(frames[0], 127)
    gapped = frames[:20] + [blank] * 5 + frames[25:40]
    with load_landmarker("mediapipe", mediapipe_model) as lm:
        seq = extract_landmarks(gapped, lm, max_gap=12)
    assert seq.valid.all()
    np.testing.assert_array_equal(np.flatnonzero(seq.interpolated), np.arange(20, 25))
    # Filled points lie on the straight line between the last frame before and the first frame after the gap.
    w = (np.arange(20, 25) - 19) / 6
    expected = seq.points[19][None] * (1 - w[:, None, None]) + seq.points[25][None] * w[:, None, None]
    np.testing.assert_allclose(seq.points[20:25], expected, atol=1e-3)

    long_gap = frames[:10] + [blank] * 30 + frames[10:20]
    with load_landmarker("mediapipe", mediapipe_model) as lm, pytest.raises(LmdiffInputError, match=r"frames 10-39"):
        extract_landmarks(long_gap, lm, max_gap=12, source="gapped clip")


def test_no_face_anywhere_is_a_clear_error(macron):
    _, seq = macron
    with pytest.raises(LmdiffInputError, match="no face found"):
        fill_gaps(seq.replace(valid=np.zeros(len(seq), bool)), 12, source="blank.mp4")


def test_no_face_in_image(mediapipe_model):
    grey = np.full((256, 256, 3), 128, np.uint8)
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        with pytest.raises(LmdiffInputError, match="no face found in grey.png"):
            detect_image(grey, lm, source="grey.png")


@pytest.mark.parametrize("topology", ["mediapipe478", "ibug68"])
def test_canonical_round_trip(macron, topology):
    _, seq = macron
    seq = seq.to_topology(topology)
    canonical = canonicalize(seq)
    assert canonical.space == "canonical" and canonical.image_size == seq.frame_size
    back = uncanonicalize(canonical)
    assert np.abs(back.points[..., :2] - seq.points[..., :2]).max() <= 1e-3
    if topology == "mediapipe478":
        assert np.abs(back.points - seq.points).max() <= 1e-3


def test_dlib_2d_landmarks_canonicalise_with_lifted_depth(images_dir):
    image = read_image(images_dir / "portrait_man_b.png")
    with load_landmarker("dlib") as lm:
        seq = detect_image(image, lm)
    canonical = canonicalize(seq)
    assert np.abs(uncanonicalize(canonical).points[..., :2] - seq.points[..., :2]).max() <= 1e-3
    stable = list(canonical.to_topology("ibug68").points[0, [36, 39, 42, 45, 27, 30]])
    template = mean_face("ibug68")[[36, 39, 42, 45, 27, 30]]
    assert np.linalg.norm(np.asarray(stable)[:, :2] - template[:, :2], axis=1).mean() < 0.06 * 150


def test_known_similarity_warp_gives_same_canonical_landmarks(images_dir, mediapipe_model):
    """A portrait rotated 15 deg, scaled 0.8 and shifted gives the same canonical face, and the pose shows the warp."""
    image = read_image(images_dir / "portrait_woman_c.png")
    warped = _warp(image, 15.0, 0.8, (30.0, -20.0))
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        a, b = detect_image(image, lm), detect_image(warped, lm)
    ca, cb = canonicalize(a), canonicalize(b)
    iod = float(ca.inter_ocular()[0])
    raw_gap = np.linalg.norm(a.points[0, :, :2] - b.points[0, :, :2], axis=1).mean()
    canonical_gap = np.linalg.norm(ca.points[0, :, :2] - cb.points[0, :, :2], axis=1).mean()
    assert canonical_gap < 0.02 * iod, (canonical_gap, iod)
    assert raw_gap > 20 * canonical_gap
    pa, pb = head_pose(ca), head_pose(cb)
    # kornia's positive angle turns the image anticlockwise on screen, which is a negative roll about z (y down).
    assert abs((pb["roll"] - pa["roll"])[0] + 15.0) < 1.0
    assert abs((pb["scale"] / pa["scale"])[0] - 0.8) < 0.02


def test_head_pose_of_a_frontal_portrait_is_near_zero(images_dir, mediapipe_model):
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        seq = detect_image(read_image(images_dir / "portrait_woman_a.jpg"), lm)
    pose = head_pose(canonicalize(seq))
    for angle in ("yaw", "pitch", "roll"):
        assert abs(pose[angle][0]) < 15.0, (angle, pose[angle])


def test_pose_transfer_puts_target_face_in_driving_pose(macron, images_dir, mediapipe_model):
    _, driving_seq = macron
    driving = canonicalize(driving_seq)
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        target = canonicalize(detect_image(read_image(images_dir / "portrait_woman_a.jpg"), lm))
    moved = transfer_pose(target, driving)
    assert moved.space == "image" and len(moved) == len(driving) and moved.frame_size == driving_seq.frame_size
    again = canonicalize(moved)
    np.testing.assert_allclose(again.points, np.repeat(target.points, len(driving), 0), atol=1e-3)
    np.testing.assert_allclose(again.pose, driving.pose, rtol=1e-4, atol=1e-3)
    # The transferred face sits where the driving face is: stable points within a fraction of the face size.
    stable = list(MEDIAPIPE478.stable)
    offset = np.linalg.norm(moved.points[:, stable, :2] - driving_seq.points[:, stable, :2], axis=-1).mean()
    assert offset < 0.15 * float(np.median(driving_seq.inter_ocular()))


def test_smoothing_removes_jitter_without_lagging_the_lips(macron):
    _, seq = macron
    smooth = smooth_landmarks(seq)
    stable = list(MEDIAPIPE478.stable)
    assert jitter(smooth, stable) < jitter(seq, stable) / 3
    raw, smoothed = seq.mouth_opening(), smooth.mouth_opening()
    lags = range(-3, 4)
    corr = [np.corrcoef(np.roll(raw, k)[5:-5], smoothed[5:-5])[0, 1] for k in lags]
    assert list(lags)[int(np.argmax(corr))] == 0
    assert corr[3] > 0.97


def test_detector_errors_name_the_input(tmp_path):
    with pytest.raises(LmdiffInputError, match="does not exist"):
        load_landmarker("mediapipe", tmp_path / "missing.task")
    bad = tmp_path / "bad.task"
    bad.write_text("not a model")
    with pytest.raises(LmdiffInputError, match="bad.task"):
        load_landmarker("mediapipe", bad)
    with pytest.raises(LmdiffInputError, match="unknown detector"):
        load_landmarker("openface")
    with pytest.raises(LmdiffInputError, match="does not exist"):
        load_landmarker("insightface", tmp_path)
    with load_landmarker("dlib") as lm, pytest.raises(LmdiffInputError, match="too small"):
        lm.detect(np.zeros((1, 1, 3), np.uint8))


def test_insightface_real_model_agrees_with_dlib(images_dir):
    root = os.environ.get("LMDIFF_INSIGHTFACE_ROOT")
    if not root:
        pytest.skip("insightface model packs (buffalo_l) cannot be obtained here; set LMDIFF_INSIGHTFACE_ROOT to run")
    image = read_image(images_dir / "portrait_woman_a.jpg")
    with load_landmarker("insightface", root) as lm:
        ours = detect_image(image, lm)
    with load_landmarker("dlib") as lm:
        reference = detect_image(image, lm)
    error = np.linalg.norm(ours.points[0, :, :2] - reference.points[0, :, :2], axis=1).mean()
    assert error < 0.1 * reference.inter_ocular()[0]


def test_landmark_sequence_is_the_package_type():
    import lmdiff_core

    assert lmdiff_core.LandmarkSequence is LandmarkSequence


def test_small_face_crops_stay_upright_and_pupils_stay_in_the_eyes(mediapipe_model):
    """On a small face MediaPipe's iris points can fall outside the eyes; eye centres and pupils must not follow."""
    from lmdiff_core.crop import compute_crop_track

    frames = iter_frames(shared_path("data/clips/latentsync_woman.mp4"), max_frames=110)
    with load_landmarker("mediapipe", mediapipe_model) as lm:
        seq = extract_landmarks(frames, lm)
    angles = np.degrees(compute_crop_track(seq, size=256).angles)
    (r0, r1), (l0, l1) = MEDIAPIPE478.eye_corners
    eye_line = seq.points[:, l1, :2] - seq.points[:, r0, :2]
    expected = np.degrees(np.arctan2(eye_line[:, 1], eye_line[:, 0]))
    assert np.abs(angles - expected).max() < 10.0
    pupils = MEDIAPIPE478.pupil_points(seq.points)
    for (a, b), pupil in zip(MEDIAPIPE478.eye_corners, (pupils[:, 0], pupils[:, 1])):
        half = np.linalg.norm(seq.points[:, a, :2] - seq.points[:, b, :2], axis=-1) / 2
        centre = (seq.points[:, a, :2] + seq.points[:, b, :2]) / 2
        assert (np.linalg.norm(pupil[:, :2] - centre, axis=-1) <= half + 1e-4).all()


def test_nearest_valid_frame_matches_brute_force_and_stays_small():
    """Frames without a face borrow the nearest valid frame's transform (the earlier one on a tie). Checked against
    the all-pairs distance matrix on random masks; a 10-minute sequence (15,000 frames) needs no 15,000^2 matrix."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 50, 301):
        for _ in range(20):
            valid = np.flatnonzero(rng.random(n) < rng.uniform(0.05, 0.9))
            if valid.size == 0:
                valid = np.array([rng.integers(n)])
            brute = np.abs(np.arange(n)[:, None] - valid[None]).argmin(1)
            np.testing.assert_array_equal(nearest_valid(n, valid), brute)
    long = nearest_valid(15_000, np.array([0, 7_000, 14_999]))
    assert long.nbytes == 15_000 * 8 and long[3_500] == 0 and long[3_501] == 1 and long[-1] == 2
