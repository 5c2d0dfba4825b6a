"""Landmark editing (lmdiff_core.editing, fit_indices) on real landmarks, checked by independent measurements."""

import numpy as np
import pytest

from lmdiff_core import LmdiffInputError
from lmdiff_core.canonical import apply_transform, canonicalize, head_pose
from lmdiff_core.detectors import detect_image, extract_landmarks, load_landmarker
from lmdiff_core.editing import add_head_motion, dub_landmarks, frontalize, mouth_gain, rest_frame, transfer_pose
from lmdiff_core.landmarks import FIT_MODES, fit_indices
from lmdiff_core.media import iter_frames, read_image
from lmdiff_core.motion import MotionStats
from lmdiff_core.topology import get_topology

from .conftest import shared_path

CLIP_FRAMES = 75  # 3 s of a televised address: the head turns and nods, the mouth opens and closes


@pytest.fixture(scope="module")
def talking(mediapipe_model):
    """Image-space MediaPipe landmarks of a real talking clip."""
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        frames = iter_frames(shared_path("data/clips/macron_fr.mp4"), 25, max_frames=CLIP_FRAMES)
        return extract_landmarks(frames, landmarker, 25.0)


@pytest.fixture(scope="module")
def portrait(images_dir, mediapipe_model):
    with load_landmarker("mediapipe", mediapipe_model, video=False) as landmarker:
        return detect_image(read_image(images_dir / "portrait_woman_a.jpg"), landmarker)


def _angles(seq) -> np.ndarray:
    """[T, 3] yaw, pitch, roll in degrees, measured on the landmarks themselves."""
    pose = head_pose(canonicalize(seq))
    return np.stack([pose["yaw"], pose["pitch"], pose["roll"]], axis=1)


def _eye_midpoints(seq) -> np.ndarray:
    right, left = get_topology(seq.topology).eye_centers(seq.points[..., :2])
    return (right + left) / 2


def _expected_indices(length: int, n: int, mode: str) -> list[int]:
    """The fitted frame order built by walking the sequence, not by modular arithmetic."""
    if mode == "loop":
        walk = list(range(length)) * (n // length + 1)
    elif mode == "pingpong":
        walk = [0]
        while len(walk) < n:
            walk += list(range(1, length)) + list(range(length - 2, -1, -1)) if length > 1 else [0]
    else:
        walk = list(range(length)) + [length - 1] * n
    return walk[:n]


@pytest.mark.parametrize("mode", FIT_MODES)
@pytest.mark.parametrize("length, n", [(4, 11), (5, 5), (7, 3), (1, 6), (2, 9)])
def test_fit_indices_walk_the_sequence(mode, length, n):
    assert fit_indices(length, n, mode).tolist() == _expected_indices(length, n, mode)


def test_fit_length_uses_the_same_frames(talking):
    short = talking[:10]
    for mode in FIT_MODES:
        fitted = short.fit_length(23, mode)
        expected = np.stack([short.points[i] for i in _expected_indices(10, 23, mode)])
        np.testing.assert_array_equal(fitted.points, expected)
    with pytest.raises(LmdiffInputError, match="mode"):
        fit_indices(3, 5, "bounce")
    with pytest.raises(LmdiffInputError, match="positive"):
        fit_indices(3, 0, "loop")


def test_rest_frame_is_the_most_closed_valid_mouth(talking):
    opening = talking.mouth_opening()
    closest = int(np.argmin(opening))
    assert rest_frame(talking) == closest
    valid = talking.valid.copy()
    valid[closest] = False
    others = np.flatnonzero(valid)
    assert rest_frame(talking.replace(valid=valid)) == int(others[np.argmin(opening[others])])
    with pytest.raises(LmdiffInputError, match="no valid frame"):
        rest_frame(talking.replace(valid=np.zeros(len(talking), bool)))


@pytest.mark.parametrize("topology", ["mediapipe478", "ibug68"])
def test_mouth_gain_scales_the_mouth_motion_only(talking, topology):
    seq = talking.to_topology(topology)
    rest = rest_frame(seq)
    opening = seq.mouth_opening()
    moved = opening - opening[rest]
    assert moved.max() > 0.08, "the clip must open the mouth for this test to mean anything"

    doubled = mouth_gain(seq, 2.0)
    lips = np.union1d(
        get_topology(topology).part_indices("outer_lips"), get_topology(topology).part_indices("inner_lips")
    )
    still = np.setdiff1d(np.arange(seq.n_points), np.union1d(lips, get_topology(topology).part_indices("contour")))
    np.testing.assert_allclose(doubled.points[:, still, :2], seq.points[:, still, :2], atol=1e-2)
    open_frames = moved > 0.03
    slope = np.polyfit(moved[open_frames], (doubled.mouth_opening() - opening[rest])[open_frames], 1)[0]
    assert slope == pytest.approx(2.0, abs=0.15)
    np.testing.assert_allclose(doubled.points[rest, :, :2], seq.points[rest, :, :2], atol=1e-2)

    held = mouth_gain(seq, 0.0)
    assert np.ptp(held.mouth_opening()) < 0.01 * np.ptp(opening)
    np.testing.assert_allclose(mouth_gain(seq, 1.0).points[..., :2], seq.points[..., :2], atol=1e-2)


def test_mouth_gain_keeps_the_lower_lip_above_the_chin(talking):
    seq = talking.to_topology("ibug68")
    louder = mouth_gain(seq, 2.0)
    lower_lip, chin = 57, 8  # iBUG: bottom of the outer lower lip, tip of the chin
    gap = np.linalg.norm(louder.points[:, chin, :2] - louder.points[:, lower_lip, :2], axis=-1)
    assert (gap > 0.05 * seq.inter_ocular()).all()


def test_frontalize_removes_the_head_rotation_and_keeps_the_rest(talking):
    before = _angles(talking)
    assert np.abs(before).max() > 5.0, "the clip must turn the head for this test to mean anything"
    front = frontalize(talking, 1.0)
    assert np.abs(_angles(front)).max() < 1.0
    half = _angles(frontalize(talking, 0.5))
    np.testing.assert_allclose(half, before / 2, atol=1.0)
    scale = talking.inter_ocular()[:, None]
    assert (np.linalg.norm(_eye_midpoints(front) - _eye_midpoints(talking), axis=-1) < 0.05 * scale[:, 0]).all()
    np.testing.assert_allclose(front.mouth_opening(), talking.mouth_opening(), atol=0.01)
    np.testing.assert_allclose(frontalize(talking, 0.0).points[..., :2], talking.points[..., :2], atol=1e-2)


def test_added_head_motion_has_the_asked_spread(portrait):
    n = 25 * 40
    stats = MotionStats(yaw_std=5.0, pitch_std=3.0, roll_std=2.0, time_scale=1.0)
    still = portrait.replace(fps=25.0)[np.zeros(n, int)]
    moving = add_head_motion(still, stats, seed=2)
    assert moving.space == "image" and len(moving) == n
    change = _angles(moving) - _angles(still)
    for axis, expected in enumerate((5.0, 3.0, 2.0)):
        assert 0.6 * expected < change[:, axis].std() < 1.4 * expected
    np.testing.assert_array_equal(add_head_motion(still, stats, seed=2).points, moving.points)
    assert not np.allclose(add_head_motion(still, stats, seed=3).points, moving.points)


def test_transfer_pose_moves_the_portrait_like_the_driver(portrait, talking):
    posed = transfer_pose(portrait, talking)
    assert len(posed) == len(talking) and posed.frame_size == talking.frame_size and posed.space == "image"
    np.testing.assert_allclose(_angles(posed), _angles(talking), atol=1.5)
    face = canonicalize(posed).points[..., :2]
    own = canonicalize(portrait).points[0, :, :2]
    assert np.abs(face - own).mean() < 0.02 * 150  # the portrait's face shape (150 px = canonical eye distance)


def test_transfer_pose_lips_and_jaw_keep_the_driving_face(portrait, talking):
    speech = canonicalize(portrait).to_topology("ibug68")[np.zeros(len(talking), int)]  # like A2L output
    dubbed = transfer_pose(speech, talking, parts="lips_and_jaw")
    driver = talking.to_topology("ibug68")
    topo = get_topology("ibug68")
    eyes = np.union1d(topo.part_indices("right_eye"), topo.part_indices("left_eye"))
    np.testing.assert_allclose(dubbed.points[:, eyes, :2], driver.points[:, eyes, :2], atol=1e-2)
    lips = topo.part_indices("outer_lips")
    expected = apply_transform(canonicalize(talking).pose, speech.points)  # the new lips in the driver's pose
    np.testing.assert_allclose(dubbed.points[:, lips, :2], expected[:, lips, :2], atol=1e-2)


def test_transfer_pose_fits_the_driver_to_the_take(portrait, talking):
    take = canonicalize(portrait)[np.zeros(100, int)]
    looped = transfer_pose(take, talking[:40], fit="loop")
    assert len(looped) == 100
    angles, driver = _angles(looped), _angles(talking[:40])
    np.testing.assert_allclose(angles, driver[np.arange(100) % 40], atol=1.5)
    slower = transfer_pose(take.replace(fps=12.5)[:20], talking[:40])  # the driver is resampled to 12.5 fps
    np.testing.assert_allclose(_angles(slower), driver[::2], atol=1.5)


def test_edit_input_errors(talking):
    with pytest.raises(LmdiffInputError, match="gain"):
        mouth_gain(talking, -1.0)
    with pytest.raises(LmdiffInputError, match="strength"):
        frontalize(talking, 1.5)
    with pytest.raises(LmdiffInputError, match="parts"):
        transfer_pose(talking, talking, parts="eyes")
    with pytest.raises(LmdiffInputError, match="fit"):
        transfer_pose(talking, talking, fit="bounce")
    with pytest.raises(LmdiffInputError, match="pose"):
        frontalize(canonicalize(talking).replace(pose=None), 1.0)


def test_dub_landmarks_in_chunks_equals_one_pass(talking):
    """Long videos are dubbed a chunk of frames at a time (bounded memory); chunk borders change nothing, and the
    lips and jaw come from the A2L landmarks while the rest stays where the video has it."""
    source = talking
    lips_from = canonicalize(talking[::-1]).to_topology("ibug68")  # another take of the lips: the clip reversed
    whole = dub_landmarks(source, lips_from, chunk=10**6)
    for chunk in (1, 7, 25):
        chunked = dub_landmarks(source, lips_from, chunk=chunk)
        np.testing.assert_allclose(chunked.points, whole.points, atol=1e-3)
        np.testing.assert_array_equal(chunked.valid, whole.valid)
    upper = get_topology("ibug68").part_indices("left_eye")
    np.testing.assert_allclose(whole.points[:, upper, :2], source.to_topology("ibug68").points[:, upper, :2], atol=0.5)
    assert len(whole) == len(source)


def test_pose_from_is_the_face_transfer_of_a_driving_video(talking, portrait):
    """`pose_from` (the CLI's --pose-from and the A2L node's pose input) poses canonical landmarks like a driving video
    looped to their length: the same image-space face as `transfer_pose(..., "face", "loop")`, and head angles that
    follow the driving clip frame by frame."""
    from lmdiff_core.canonical import uncanonicalize
    from lmdiff_core.editing import pose_from

    speaker = canonicalize(portrait).to_topology("ibug68")
    still = speaker[np.zeros(100, dtype=int)].replace(fps=25.0)  # 100 frames: longer than the 75 driving frames
    posed = pose_from(still, talking)
    assert posed.space == "canonical" and len(posed) == 100 and posed.image_size == talking.frame_size
    np.testing.assert_allclose(
        uncanonicalize(posed).points, transfer_pose(still, talking, "face", "loop").points, atol=1e-3
    )
    driving = _angles(talking)
    np.testing.assert_allclose(_angles(uncanonicalize(posed).to_topology("ibug68"))[:75], driving, atol=1.5)
    np.testing.assert_allclose(_angles(uncanonicalize(posed))[75:], driving[:25], atol=1.5)  # looped, not mirrored
    with pytest.raises(LmdiffInputError, match="canonical"):
        pose_from(talking, talking)
