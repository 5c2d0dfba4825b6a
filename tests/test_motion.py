"""Generated head motion and blinks on real canonical landmarks."""

import numpy as np
import pytest

from lmdiff_core import LmdiffInputError
from lmdiff_core.canonical import canonicalize, head_pose, uncanonicalize
from lmdiff_core.detectors import detect_image, load_landmarker
from lmdiff_core.media import read_image
from lmdiff_core.motion import MotionStats, add_blinks, apply_head_motion, blink_curve, generate_head_motion
from lmdiff_core.topology import get_topology


@pytest.fixture(scope="module")
def portrait(images_dir, mediapipe_model):
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        return canonicalize(detect_image(read_image(images_dir / "portrait_woman_a.jpg"), lm))


def _eye_gap(points: np.ndarray, topology: str) -> np.ndarray:
    """Mean distance of the eyelid points from each eye's corner line, per frame."""
    topo = get_topology(topology)
    gaps = []
    for eye, (a, b) in zip(("right_eye", "left_eye"), topo.eye_corners):
        lid = [i for i in topo.part_indices(eye) if i not in (a, b)]
        axis = points[:, b, :2] - points[:, a, :2]
        normal = np.stack([-axis[:, 1], axis[:, 0]], axis=1) / np.linalg.norm(axis, axis=1, keepdims=True)
        gaps.append(np.abs(np.einsum("tnd,td->tn", points[:, lid, :2] - points[:, a, None, :2], normal)).mean(1))
    return np.mean(gaps, axis=0)


def test_generated_head_motion_has_the_asked_spread(portrait):
    n = 25 * 60
    stats = MotionStats(yaw_std=5.0, pitch_std=3.0, roll_std=2.0, time_scale=1.0)
    moving = apply_head_motion(portrait[np.zeros(n, int)], generate_head_motion(n, 25.0, stats, seed=1))
    pose = head_pose(canonicalize(uncanonicalize(moving)))
    for axis, expected in (("yaw", 5.0), ("pitch", 3.0), ("roll", 2.0)):
        measured = pose[axis] - pose[axis][0]
        assert 0.6 * expected < measured.std() < 1.4 * expected, (axis, measured.std())
        assert np.abs(np.diff(measured)).max() < expected, "head motion must be smooth"
    assert abs(pose["yaw"][0] - head_pose(portrait)["yaw"][0]) < 0.5  # starts at the reference's own pose


def test_head_motion_is_seeded(portrait):
    a, b = generate_head_motion(50, seed=3), generate_head_motion(50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, generate_head_motion(50, seed=4))


@pytest.mark.parametrize("topology", ["mediapipe478", "ibug68"])
def test_blinks_close_and_reopen_the_eyes(portrait, topology):
    seq = portrait.to_topology(topology)[np.zeros(100, int)]
    closure = blink_curve(100, 25.0, MotionStats(blinks_per_minute=30), seed=0)
    assert closure.max() == pytest.approx(1.0, abs=0.05) and closure.min() == 0.0
    blinked = add_blinks(seq, closure)
    open_gap, gap = _eye_gap(seq.points, topology), _eye_gap(blinked.points, topology)
    np.testing.assert_allclose(gap, open_gap * (1 - closure), rtol=1e-3, atol=1e-3)
    mouth = get_topology(topology).part_indices("outer_lips")
    np.testing.assert_array_equal(blinked.points[:, mouth], seq.points[:, mouth])


def test_blink_rate_follows_the_stats():
    closure = blink_curve(25 * 600, 25.0, MotionStats(blinks_per_minute=12), seed=0)
    onsets = np.flatnonzero((closure[1:] > 0.5) & (closure[:-1] <= 0.5))
    assert 90 <= len(onsets) <= 150  # 12 per minute over ten minutes, Poisson spread


def test_motion_input_errors(portrait):
    with pytest.raises(LmdiffInputError):
        generate_head_motion(0)
    with pytest.raises(LmdiffInputError, match="canonical"):
        apply_head_motion(uncanonicalize(portrait), np.eye(4)[None])
    with pytest.raises(LmdiffInputError, match="frames"):
        add_blinks(portrait, np.zeros(3))
