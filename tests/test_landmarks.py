"""Tests of `LandmarkSequence` (files, indexing, joining, resampling, validation, topology conversion, mouth
opening) and of the topology definitions, on landmarks detected in the real media of ../shared/data.

Expected values come from independent computations: frame arithmetic done here, midpoints computed here, dlib's
own 68-point fit for the mediapipe478 -> ibug68 map, MediaPipe's own connection sets and jawOpen blendshape.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from lmdiff_core.canonical import canonicalize
from lmdiff_core.detectors import detect_image, extract_landmarks, load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.media import frame_count, iter_frames, read_image
from lmdiff_core.topology import IBUG68, MEDIAPIPE478, get_topology

from .conftest import shared_path

N_FRAMES = 40  # 1.6 s of a 25 fps clip


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_frames():
    """The first 1.6 s of a real 256x256 talking clip with clear mouth motion."""
    return list(iter_frames(shared_path("data/clips/edtalk_man_en.mp4"), 25, max_frames=N_FRAMES))


@pytest.fixture(scope="module")
def real_seq(clip_frames, mediapipe_model) -> LandmarkSequence:
    """Raw MediaPipe landmarks (with blendshapes) of `clip_frames`, image space."""
    with load_landmarker("mediapipe", mediapipe_model) as lm:
        seq = extract_landmarks(clip_frames, lm, fps=25)
    assert len(seq) == N_FRAMES and seq.valid.all() and seq.blendshapes is not None
    return seq


@pytest.fixture(scope="module")
def full_seq(real_seq) -> LandmarkSequence:
    """A canonical sequence that uses every field: pose, image_size, blendshapes, and mixed valid/interpolated flags."""
    canonical = canonicalize(real_seq)
    t = len(canonical)
    valid = np.ones(t, dtype=bool)
    valid[[5, 17, 18]] = False
    interpolated = np.zeros(t, dtype=bool)
    interpolated[[2, 3, 30]] = True
    seq = canonical.replace(valid=valid, interpolated=interpolated)
    assert seq.pose is not None and seq.image_size == (256, 256) and seq.space == "canonical"
    return seq


@pytest.fixture(scope="module")
def dlib_landmarker():
    lm = load_landmarker("dlib")
    yield lm
    lm.close()


@pytest.fixture(scope="module")
def mediapipe_image_landmarker(mediapipe_model):
    lm = load_landmarker("mediapipe", mediapipe_model, video=False)
    yield lm
    lm.close()


FIELDS = (
    "points",
    "topology",
    "fps",
    "frame_size",
    "valid",
    "interpolated",
    "blendshapes",
    "pose",
    "space",
    "image_size",
)


def assert_same_sequence(a: LandmarkSequence, b: LandmarkSequence) -> None:
    """Every field of a and b is exactly equal (values, dtypes, None-ness)."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), name
            assert x.dtype == y.dtype, (name, x.dtype, y.dtype)
            assert np.array_equal(x, y), name
        else:
            assert x == y and type(x) is type(y), (name, x, y)


def assert_frames_picked(view: LandmarkSequence, seq: LandmarkSequence, index) -> None:
    """`view` holds exactly the frames `index` of `seq` in every per-frame field, and seq's per-sequence fields."""
    expect = np.arange(len(seq))[index]
    expect = np.atleast_1d(expect)
    assert len(view) == len(expect)
    np.testing.assert_array_equal(view.points, seq.points[expect])
    np.testing.assert_array_equal(view.valid, seq.valid[expect])
    np.testing.assert_array_equal(view.interpolated, seq.interpolated[expect])
    np.testing.assert_array_equal(view.blendshapes, seq.blendshapes[expect])
    np.testing.assert_array_equal(view.pose, seq.pose[expect])
    for name in ("topology", "fps", "frame_size", "space", "image_size"):
        assert getattr(view, name) == getattr(seq, name), name


# -- files ---------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_keeps_every_field(full_seq, tmp_path):
    path = full_seq.save(tmp_path / "canonical.npz")
    assert path == tmp_path / "canonical.npz"
    loaded = LandmarkSequence.load(path)
    assert_same_sequence(loaded, full_seq)
    # The fixture really exercises the optional fields and non-default flags.
    assert loaded.pose.shape == (N_FRAMES, 4, 4) and loaded.blendshapes.shape == (N_FRAMES, 52)
    assert (~loaded.valid).sum() == 3 and loaded.interpolated.sum() == 3
    assert loaded.space == "canonical" and loaded.image_size == (256, 256) and loaded.frame_size == (512, 512)


def test_save_load_round_trip_without_optional_fields(real_seq, tmp_path):
    ibug = real_seq.to_topology("ibug68").replace(blendshapes=None, fps=30.0, frame_size=(256, 250))
    loaded = LandmarkSequence.load(ibug.save(tmp_path / "ibug.npz"))
    assert_same_sequence(loaded, ibug)
    assert loaded.blendshapes is None and loaded.pose is None and loaded.image_size is None
    assert loaded.topology == "ibug68" and loaded.fps == 30.0 and loaded.frame_size == (256, 250)


def test_save_rejects_other_suffixes(real_seq, tmp_path):
    with pytest.raises(LmdiffInputError, match="npz"):
        real_seq.save(tmp_path / "landmarks.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_existing_file_untouched(full_seq, real_seq, tmp_path, monkeypatch, failure):
    target = tmp_path / "seq.npz"
    real_seq.save(target)
    before = target.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 half-written archive")
        raise failure

    monkeypatch.setattr(np, "savez_compressed", broken_savez)
    with pytest.raises(type(failure)):
        full_seq.save(target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["seq.npz"], "a temporary file was left behind"
    monkeypatch.undo()
    assert_same_sequence(LandmarkSequence.load(target), real_seq)


def test_saved_file_has_the_same_permissions_as_an_ordinary_file(real_seq, tmp_path):
    reference = tmp_path / "reference.bin"
    reference.write_bytes(b"x")
    saved = real_seq.save(tmp_path / "seq.npz")
    assert oct(saved.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


def _text_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not landmarks\n")
    return path


def _directory(tmp_path):
    path = tmp_path / "folder.npz"
    path.mkdir()
    return path


def _missing(tmp_path):
    return tmp_path / "missing.npz"


def _npz_without_keys(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, points=np.zeros((2, 68, 3), np.float32), fps=np.float64(25))
    return path


def _npz_with_bad_points(tmp_path):
    path = tmp_path / "badpoints.npz"
    np.savez(
        path,
        points=np.zeros((2, 10, 3), np.float32),
        topology=np.str_("ibug68"),
        fps=np.float64(25),
        frame_size=np.array([256, 256]),
    )
    return path


@pytest.mark.parametrize("make", [_text_file, _directory, _missing, _npz_without_keys, _npz_with_bad_points])
def test_load_of_a_non_landmark_file_names_the_path(make, tmp_path):
    path = make(tmp_path)
    with pytest.raises(LmdiffInputError) as info:
        LandmarkSequence.load(path)
    message = str(info.value)
    if make is not _npz_with_bad_points:  # that one is rejected by the constructor, which names the field instead
        assert str(path) in message, message
    else:
        assert "points" in message, message
    assert "\n" not in message


def test_load_reports_which_keys_are_missing(tmp_path):
    path = _npz_without_keys(tmp_path)
    with pytest.raises(LmdiffInputError, match="frame_size") as info:
        LandmarkSequence.load(path)
    assert "topology" in str(info.value)


# -- indexing and joining -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "index",
    [slice(2, 5), slice(None, None, 3), slice(-4, None), 3, 0, -1, -2, np.int64(7), np.array([9, 0, 4, 4]), [1, 5, 17]],
    ids=["2:5", "::3", "-4:", "3", "0", "-1", "-2", "np.int64", "array", "list"],
)
def test_indexing_keeps_per_frame_fields_aligned(full_seq, index):
    view = full_seq[index]
    assert isinstance(view, LandmarkSequence)
    assert_frames_picked(view, full_seq, index)


def test_boolean_mask_selects_frames(full_seq):
    view = full_seq[full_seq.valid]
    assert_frames_picked(view, full_seq, np.flatnonzero(full_seq.valid))
    assert view.valid.all() and len(view) == N_FRAMES - 3


def test_out_of_range_index_raises(full_seq):
    with pytest.raises(IndexError):
        full_seq[len(full_seq)]


def test_concatenate_rejoins_the_pieces(full_seq):
    joined = LandmarkSequence.concatenate([full_seq[:3], full_seq[3:18], full_seq[18:]])
    assert_same_sequence(joined, full_seq)


def test_concatenate_in_a_different_order(full_seq):
    joined = LandmarkSequence.concatenate([full_seq[20:], full_seq[:20]])
    order = np.r_[20:N_FRAMES, 0:20]
    assert_frames_picked(joined, full_seq, order)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda s: s.to_topology("ibug68"), "topology"),
        (lambda s: s.replace(fps=30.0), "fps"),
        (lambda s: s.replace(frame_size=(256, 256)), "frame_size"),
        (lambda s: s.replace(space="image"), "space"),
    ],
    ids=["topology", "fps", "frame_size", "space"],
)
def test_concatenate_refuses_mismatches(full_seq, change, field):
    other = change(full_seq[4:8])
    with pytest.raises(LmdiffInputError, match=field):
        LandmarkSequence.concatenate([full_seq[:4], other])


def test_concatenate_of_nothing_is_an_input_error():
    with pytest.raises(LmdiffInputError):
        LandmarkSequence.concatenate([])


# -- resampling ---------------------------------------------------------------------------------------------------------


def _rotation_and_scale(pose: np.ndarray):
    linear = pose[:, :3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    return linear / scale[:, None, None], scale


def test_resample_25_to_50_fps_interpolates_midpoints(full_seq):
    seq = full_seq.replace(valid=None, interpolated=None)  # all valid here; flags are checked separately
    t = len(seq)
    out = seq.resample(50.0)
    assert out.fps == 50.0
    assert len(out) == frame_count(t / 25.0, 50.0) == 2 * t
    # Output frame 2j is at source frame j's time stamp: exactly that frame.
    np.testing.assert_array_equal(out.points[0::2], seq.points)
    np.testing.assert_array_equal(out.blendshapes[0::2], seq.blendshapes)
    # Output frame 2j+1 lies halfway between source frames j and j+1; the last one is past the end: held.
    mid = ((seq.points[:-1].astype(np.float64) + seq.points[1:]) / 2).astype(np.float32)
    np.testing.assert_allclose(out.points[1:-1:2], mid, atol=1e-3)
    np.testing.assert_array_equal(out.points[-1], seq.points[-1])
    np.testing.assert_allclose(out.blendshapes[1:-1:2], (seq.blendshapes[:-1] + seq.blendshapes[1:]) / 2, atol=1e-6)
    for name in ("topology", "frame_size", "space", "image_size"):
        assert getattr(out, name) == getattr(seq, name)
    # A real clip moves: the midpoints are not just copies of a neighbour.
    assert np.abs(seq.points[1:] - seq.points[:-1]).max() > 0.5


def test_resampled_poses_stay_similarities(full_seq):
    seq = full_seq
    out = seq.resample(50.0)
    rot, scale = _rotation_and_scale(out.pose)
    src_rot, src_scale = _rotation_and_scale(seq.pose)
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), eye, atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-9)
    np.testing.assert_array_equal(out.pose[:, 3], np.broadcast_to([0.0, 0.0, 0.0, 1.0], (len(out), 4)))
    # At the source time stamps the pose is the source pose.
    np.testing.assert_allclose(out.pose[0::2], seq.pose, rtol=1e-9, atol=1e-9)
    # In between: the rotation is the geodesic midpoint, scale and translation the arithmetic midpoints.
    r_prev, r_next, r_mid = (Rotation.from_matrix(m) for m in (src_rot[:-1], src_rot[1:], rot[1:-1:2]))
    to_prev = (r_prev.inv() * r_mid).magnitude()
    to_next = (r_mid.inv() * r_next).magnitude()
    between = (r_prev.inv() * r_next).magnitude()
    np.testing.assert_allclose(to_prev, between / 2, atol=1e-7)
    np.testing.assert_allclose(to_next, between / 2, atol=1e-7)
    np.testing.assert_allclose(scale[1:-1:2], (src_scale[:-1] + src_scale[1:]) / 2, rtol=1e-9)
    np.testing.assert_allclose(out.pose[1:-1:2, :3, 3], (seq.pose[:-1, :3, 3] + seq.pose[1:, :3, 3]) / 2, atol=1e-9)
    assert between.max() > 1e-4, "the real head should rotate a little between frames"


@pytest.mark.parametrize("n", [N_FRAMES, N_FRAMES - 1], ids=["even", "odd"])
def test_resample_25_to_12_5_fps_takes_every_other_frame(full_seq, n):
    seq = full_seq[:n]
    out = seq.resample(12.5)
    assert out.fps == 12.5
    assert len(out) == frame_count(n / 25.0, 12.5) == (n + 1) // 2
    np.testing.assert_array_equal(out.points, seq.points[::2])
    np.testing.assert_array_equal(out.blendshapes, seq.blendshapes[::2])
    np.testing.assert_array_equal(out.interpolated, seq.interpolated[::2])
    np.testing.assert_allclose(out.pose, seq.pose[::2], atol=1e-9)


def test_resample_to_the_same_rate_keeps_the_points(full_seq):
    out = full_seq.resample(25.0)
    assert len(out) == len(full_seq)
    np.testing.assert_array_equal(out.points, full_seq.points)
    np.testing.assert_array_equal(out.interpolated, full_seq.interpolated)


def test_resample_with_n_frames_and_bad_fps(full_seq):
    assert len(full_seq.resample(50.0, n_frames=7)) == 7
    for fps in (0.0, -25.0, float("nan")):
        with pytest.raises(LmdiffInputError):
            full_seq.resample(fps)


def test_resample_marks_frames_blended_with_an_invalid_frame_invalid(full_seq):
    out = full_seq.resample(50.0)
    valid = full_seq.valid
    # Midpoints between source frames j and j+1 mix both: valid only if both are.
    np.testing.assert_array_equal(out.valid[1:-1:2], valid[:-1] & valid[1:])


def test_resample_keeps_a_valid_frame_valid_at_its_own_time(full_seq):
    out = full_seq.resample(50.0)
    np.testing.assert_array_equal(out.valid[0::2], full_seq.valid)


# -- constructor validation ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(points=np.zeros((3, 68, 3)), topology="mediapipe478"),
        dict(points=np.zeros((3, 478, 3)), topology="ibug68"),
        dict(points=np.zeros((3, 70, 3)), topology="ibug68"),
        dict(points=np.zeros(68 * 3), topology="ibug68"),
        dict(points=np.zeros((2, 3, 68, 3)), topology="ibug68"),
        dict(points=np.zeros((3, 68, 4)), topology="ibug68"),
        dict(points=np.zeros((3, 68, 3)), topology="dlib5"),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", fps=0),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", fps=-25),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", fps=float("nan")),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", space="world"),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", valid=[True, False]),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", interpolated=np.zeros(4, bool)),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", blendshapes=np.zeros((2, 52))),
        dict(points=np.zeros((3, 68, 3)), topology="ibug68", pose=np.zeros((3, 3, 3))),
    ],
    ids=[
        "68-for-mp478",
        "478-for-ibug",
        "70-for-ibug",
        "1d",
        "4d",
        "xyzw",
        "unknown-topology",
        "fps0",
        "fps-neg",
        "fps-nan",
        "space",
        "valid-len",
        "interpolated-len",
        "blendshapes-len",
        "pose-shape",
    ],
)
def test_constructor_rejects_bad_input(kwargs):
    with pytest.raises(LmdiffInputError):
        LandmarkSequence(**kwargs)


def test_constructor_accepts_2d_points_and_a_single_frame():
    xy = np.arange(68 * 2, dtype=np.float64).reshape(1, 68, 2)
    seq = LandmarkSequence(xy, "ibug68")
    assert seq.points.shape == (1, 68, 3) and seq.points.dtype == np.float32
    np.testing.assert_array_equal(seq.points[..., :2], xy)
    np.testing.assert_array_equal(seq.points[..., 2], 0)
    single = LandmarkSequence(np.ones((68, 3)), "ibug68", fps=30)
    assert len(single) == 1 and single.valid.tolist() == [True] and single.interpolated.tolist() == [False]
    assert single.duration == pytest.approx(1 / 30)


def test_get_topology_of_an_unknown_name():
    with pytest.raises(LmdiffInputError, match="dlib5"):
        get_topology("dlib5")


# -- topology conversion against dlib ------------------------------------------------------------------------------------


def _ibug_error(mp_ibug: np.ndarray, dlib_pts: np.ndarray) -> float:
    """Mean point distance in the image plane, in units of dlib's outer-eye-corner distance (36-45)."""
    iod = np.linalg.norm(dlib_pts[36, :2] - dlib_pts[45, :2])
    return float(np.linalg.norm(mp_ibug[:, :2] - dlib_pts[:, :2], axis=1).mean() / iod)


def _real_test_images(images_dir):
    images = [(path.name, read_image(path)) for path in sorted(images_dir.iterdir())]
    assert len(images) == 6
    for clip in ("edtalk_man_en", "macron_fr"):
        frames = list(iter_frames(shared_path(f"data/clips/{clip}.mp4"), 25, max_frames=41))
        images += [(f"{clip}#{i}", frames[i]) for i in (0, 20, 40)]
    return images


def test_mediapipe_to_ibug68_matches_dlib_on_real_faces(images_dir, dlib_landmarker, mediapipe_image_landmarker):
    errors = {}
    for name, image in _real_test_images(images_dir):
        dlib_seq = detect_image(image, dlib_landmarker, source=name)
        mp_seq = detect_image(image, mediapipe_image_landmarker, source=name)
        converted = mp_seq.to_topology("ibug68")
        assert converted.topology == "ibug68" and converted.points.shape == (1, 68, 3)
        assert converted.frame_size == mp_seq.frame_size == dlib_seq.frame_size
        np.testing.assert_array_equal(converted.blendshapes, mp_seq.blendshapes)
        errors[name] = _ibug_error(converted.points[0], dlib_seq.points[0])
    report = ", ".join(f"{k}: {v:.3f}" for k, v in errors.items())
    assert len(errors) == 12
    assert max(errors.values()) <= 0.10, f"mean error / inter-ocular distance per image: {report}"


def test_ibug68_cannot_become_mediapipe478(real_seq):
    ibug = real_seq.to_topology("ibug68")
    with pytest.raises(LmdiffInputError, match="ibug68"):
        ibug.to_topology("mediapipe478")
    assert ibug.to_topology("ibug68").points is ibug.points


def test_to_topology_keeps_the_per_frame_fields(full_seq):
    converted = full_seq.to_topology("ibug68")
    assert len(converted) == len(full_seq)
    for name in ("valid", "interpolated", "blendshapes", "pose"):
        np.testing.assert_array_equal(getattr(converted, name), getattr(full_seq, name))
    for name in ("fps", "frame_size", "space", "image_size"):
        assert getattr(converted, name) == getattr(full_seq, name)


# -- mouth opening and inter-ocular distance ----------------------------------------------------------------------------


def _blendshape_names(image: np.ndarray, model) -> list[str]:
    """MediaPipe's own blendshape category names, in the order of its scores."""
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    options = vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=str(model)), output_face_blendshapes=True
    )
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
    return [c.category_name for c in result.face_blendshapes[0]]


def test_mouth_opening_follows_mediapipe_jaw_open_on_a_real_clip(real_seq, clip_frames, mediapipe_model):
    jaw = real_seq.blendshapes[:, _blendshape_names(clip_frames[0], mediapipe_model).index("jawOpen")]
    opening = real_seq.mouth_opening()
    assert opening.shape == (N_FRAMES,) and (opening >= 0).all()
    assert opening.max() - opening.min() > 0.05, "the speaker's mouth should open and close in 1.6 s"
    r = np.corrcoef(opening, jaw)[0, 1]
    assert r > 0.8, f"mouth_opening vs jawOpen correlation {r:.2f}"


def test_inter_ocular_is_the_outer_eye_corner_distance(real_seq):
    p = real_seq.points.astype(np.float64)
    by_hand = np.hypot(p[:, 33, 0] - p[:, 263, 0], p[:, 33, 1] - p[:, 263, 1])
    np.testing.assert_allclose(real_seq.inter_ocular(), by_hand, rtol=1e-5)
    # A 256 px crop of a face: the eyes are tens of pixels apart.
    assert 40 < by_hand.mean() < 200


@pytest.mark.parametrize(
    "topology, upper, lower, right, left", [("mediapipe478", 13, 14, 33, 263), ("ibug68", 62, 66, 36, 45)]
)
def test_mouth_opening_is_the_inner_lip_gap_over_the_eye_distance(real_seq, topology, upper, lower, right, left):
    frame = real_seq[0].to_topology(topology).points[0].astype(np.float64)
    iod = np.hypot(*(frame[right, :2] - frame[left, :2]))
    closed = frame.copy()
    closed[lower] = closed[upper]
    gap = 0.25 * iod
    opened = closed.copy()
    opened[lower, 1] += gap  # lower lip moved straight down by a known amount
    opened_more = closed.copy()
    opened_more[lower, :2] += (0.3 * iod, 0.4 * iod)  # a 3-4-5 triangle: distance 0.5 iod
    seq = LandmarkSequence(np.stack([closed, opened, opened_more]), topology, frame_size=real_seq.frame_size)
    np.testing.assert_allclose(seq.mouth_opening(), [0.0, 0.25, 0.5], atol=1e-5)


# -- topology definitions ---------------------------------------------------------------------------------------------------


def _edges(topology, *parts) -> set[frozenset]:
    edges = set()
    for part in parts:
        for line in topology.parts[part]:
            idx = line.indices
            pairs = list(zip(idx[:-1], idx[1:])) + ([(idx[-1], idx[0])] if line.closed else [])
            edges |= {frozenset(p) for p in pairs}
    return edges


@pytest.mark.parametrize(
    "connections, parts",
    [
        ("FACE_LANDMARKS_FACE_OVAL", ("contour",)),
        ("FACE_LANDMARKS_RIGHT_EYE", ("right_eye",)),
        ("FACE_LANDMARKS_LEFT_EYE", ("left_eye",)),
        ("FACE_LANDMARKS_RIGHT_EYEBROW", ("right_brow",)),
        ("FACE_LANDMARKS_LEFT_EYEBROW", ("left_brow",)),
        ("FACE_LANDMARKS_NOSE", ("nose",)),
        ("FACE_LANDMARKS_RIGHT_IRIS", ("right_iris",)),
        ("FACE_LANDMARKS_LEFT_IRIS", ("left_iris",)),
        ("FACE_LANDMARKS_LIPS", ("outer_lips", "inner_lips")),
    ],
)
def test_mediapipe478_parts_are_mediapipes_connection_sets(connections, parts):
    from mediapipe.tasks.python.vision import FaceLandmarksConnections

    theirs = {frozenset((c.start, c.end)) for c in getattr(FaceLandmarksConnections, connections)}
    ours = _edges(MEDIAPIPE478, *parts)
    assert ours == theirs, (sorted(map(sorted, theirs - ours)), sorted(map(sorted, ours - theirs)))


def test_ibug68_parts_follow_the_68_point_convention():
    assert set(IBUG68.part_indices("contour")) == set(range(0, 17))
    assert set(IBUG68.part_indices("right_brow")) == set(range(17, 22))
    assert set(IBUG68.part_indices("left_brow")) == set(range(22, 27))
    assert set(IBUG68.part_indices("nose")) == set(range(27, 36))
    assert set(IBUG68.part_indices("right_eye")) == set(range(36, 42))
    assert set(IBUG68.part_indices("left_eye")) == set(range(42, 48))
    assert set(IBUG68.part_indices("outer_lips")) == set(range(48, 60))
    assert set(IBUG68.part_indices("inner_lips")) == set(range(60, 68))
    # Upper and lower inner-lip mid points, outer eye corners.
    assert IBUG68.inner_lips == (62, 66) and IBUG68.outer_eye_corners == (36, 45)


@pytest.mark.parametrize("topology", [MEDIAPIPE478, IBUG68], ids=lambda t: t.name)
def test_named_points_belong_to_their_parts(topology):
    all_parts = set(np.concatenate([topology.part_indices(p) for p in topology.parts]))
    assert all_parts <= set(range(topology.n_points))
    right, left = topology.outer_eye_corners
    assert right in topology.part_indices("right_eye") and left in topology.part_indices("left_eye")
    (r0, r1), (l0, l1) = topology.eye_corners
    assert {r0, r1} <= set(topology.part_indices("right_eye")) and {l0, l1} <= set(topology.part_indices("left_eye"))
    assert set(topology.inner_lips) <= set(topology.part_indices("inner_lips"))
    assert set(topology.mouth_corners) <= set(topology.part_indices("outer_lips"))
    assert set(topology.stable).isdisjoint(topology.part_indices("outer_lips"))
    assert set(topology.stable).isdisjoint(topology.part_indices("inner_lips"))


def test_sides_and_pupils_on_a_real_face(real_seq):
    """The subject's right eye is on the image's left; each pupil lies inside its own eye outline."""
    p = real_seq.points[0]
    topo = MEDIAPIPE478
    right_eye, left_eye = p[topo.part_indices("right_eye")], p[topo.part_indices("left_eye")]
    assert right_eye[:, 0].max() < left_eye[:, 0].min()
    right_pupil, left_pupil = topo.pupil_points(p)[..., :2]
    for pupil, eye in ((right_pupil, right_eye), (left_pupil, left_eye)):
        assert eye[:, 0].min() < pupil[0] < eye[:, 0].max()
        assert eye[:, 1].min() - 2 < pupil[1] < eye[:, 1].max() + 2
    # The pupil is the centre of its iris ring.
    iod = float(real_seq.inter_ocular()[0])
    for centre, ring in ((468, "right_iris"), (473, "left_iris")):
        ring_mean = p[topo.part_indices(ring), :2].mean(0)
        assert np.linalg.norm(p[centre, :2] - ring_mean) < 0.03 * iod
    # The upper inner-lip point is above the lower one; the mouth corners bracket them.
    assert p[13, 1] <= p[14, 1]
    assert p[61, 0] < p[13, 0] < p[291, 0]
