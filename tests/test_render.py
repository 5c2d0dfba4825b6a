"""Tests of lmdiff_core.render: rasterisation against an independent reference, colours, scaling, batching, export."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.render import (
    MESH_COLOR,
    PART_COLORS,
    PART_ORDER,
    draw_landmarks_on_frames,
    iter_rendered_frames,
    mesh_edges,
    render_landmarks,
    render_points,
    save_openpose_json,
    to_openpose_face,
)
from lmdiff_core.topology import IBUG68, MEDIAPIPE478

from .conftest import shared_path

OFF = -1000.0  # a position far outside every test image


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def synthetic_ibug68(scale: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """[68, 3] cartoon face in a 256x256 frame with every part well separated from the others."""
    p = np.zeros((68, 3), np.float32)
    th = np.pi * np.arange(17) / 16
    p[0:17, 0], p[0:17, 1] = 128 - 98 * np.cos(th), 110 + 110 * np.sin(th)  # jaw U from (30,110) to (226,110)
    p[17:22, 0], p[17:22, 1] = np.linspace(50, 100, 5), 70  # right brow (image left)
    p[22:27, 0], p[22:27, 1] = np.linspace(156, 206, 5), 70
    p[27:31, 0], p[27:31, 1] = 128, np.linspace(88, 138, 4)  # nose bridge
    p[31:36, 0], p[31:36, 1] = np.linspace(113, 143, 5), 150  # nostrils (33 = bottom centre)
    a6 = 2 * np.pi * np.arange(6) / 6
    p[36:42, 0], p[36:42, 1] = 75 + 15 * np.cos(a6), 100 + 7 * np.sin(a6)
    p[42:48, 0], p[42:48, 1] = 181 + 15 * np.cos(a6), 100 + 7 * np.sin(a6)
    a12 = 2 * np.pi * np.arange(12) / 12
    p[48:60, 0], p[48:60, 1] = 128 + 35 * np.cos(a12), 185 + 15 * np.sin(a12)
    a8 = 2 * np.pi * np.arange(8) / 8
    p[60:68, 0], p[60:68, 1] = 128 + 20 * np.cos(a8), 185 + 5 * np.sin(a8)
    p[:, :2] = p[:, :2] * scale + np.asarray(shift, np.float32)
    return p


def synthetic_mediapipe478(size: int = 256) -> np.ndarray:
    """[478, 3]: every part polyline drawn on its own small circle in its own grid cell; other points off-image."""
    p = np.full((478, 3), OFF, np.float32)
    p[:, 2] = 0
    cell = size / 4
    for k, part in enumerate(PART_ORDER):
        cx, cy = cell * (k % 4 + 0.5), cell * (k // 4 + 0.5)
        idx = MEDIAPIPE478.part_indices(part)
        ang = 2 * np.pi * np.arange(len(idx)) / len(idx)
        p[idx, 0], p[idx, 1] = cx + 0.3 * cell * np.cos(ang), cy + 0.3 * cell * np.sin(ang)
    p[468, :2] = p[MEDIAPIPE478.part_indices("right_iris"), :2].mean(0)
    p[473, :2] = p[MEDIAPIPE478.part_indices("left_iris"), :2].mean(0)
    return p


def face_like_mediapipe478(rng, size: int = 256) -> np.ndarray:
    """[478, 3] points on a disk, smoothed along the tessellation so edges are short like a real mesh (Tutte-style)."""
    edges = mesh_edges()
    contour = np.asarray(MEDIAPIPE478.parts["contour"][0].indices)
    p = rng.uniform(0.3 * size, 0.7 * size, (478, 2))
    ang = 2 * np.pi * np.arange(len(contour)) / len(contour)
    p[contour] = size / 2 + 0.4 * size * np.stack([np.sin(ang), -np.cos(ang)], 1)
    free = np.setdiff1d(np.arange(468), contour)
    src = np.concatenate([edges[:, 0], edges[:, 1]])
    dst = np.concatenate([edges[:, 1], edges[:, 0]])
    deg = np.bincount(src, minlength=478).astype(float)
    for _ in range(200):
        acc = np.stack([np.bincount(src, weights=p[dst, k], minlength=478) for k in (0, 1)], 1)
        p[free] = acc[free] / deg[free, None]
    out = np.zeros((478, 3), np.float32)
    out[:, :2] = p
    out[468:473, :2] = p[468:473]
    return out


def seq_of(points, topology="ibug68", frame_size=(256, 256), valid=None) -> LandmarkSequence:
    return LandmarkSequence(
        points=np.asarray(points, np.float32), topology=topology, frame_size=frame_size, valid=valid
    )


def segment_distance(px, py, a, b):
    """Distance from pixel centres (px, py arrays) to segment a-b (numpy reference)."""
    ax, ay = a
    dx, dy = b[0] - ax, b[1] - ay
    ll = dx * dx + dy * dy
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.where(ll == 0, 1.0, ll), 0, 1)
    return np.hypot(px - (ax + t * dx), py - (ay + t * dy))


def reference_parts(points2d: np.ndarray, topo, width: int, height: int, thickness: float, antialias: bool):
    """Independent brute-force renderer: per pixel, the max over segments of (coverage level, part rank)."""
    ys, xs = np.mgrid[0:height, 0:width]
    px, py = xs + 0.5, ys + 0.5
    r = thickness / 2
    best = np.zeros((height, width), np.int64)
    for rank, part in enumerate(PART_ORDER):
        for line in topo.parts.get(part, ()):
            idx = list(line.indices)
            pairs = list(zip(idx[:-1], idx[1:])) + ([(idx[-1], idx[0])] if line.closed else [])
            for i, j in pairs:
                dist = segment_distance(px, py, points2d[i], points2d[j])
                if antialias:
                    level = np.round(np.clip(r + 0.5 - dist, 0, 1) * 255).astype(np.int64)
                else:
                    level = np.where(dist <= r, 255, 0)
                best = np.maximum(best, level * 16 + rank)
    colors = np.array([PART_COLORS[p] for p in PART_ORDER], np.float64) / 255
    level, rank = best // 16, best % 16
    return colors[rank] * (level / 255.0)[..., None], dist_margin(points2d, topo, px, py, r, antialias)


def dist_margin(points2d, topo, px, py, r, antialias):
    """Pixels whose distance sits within 1e-3 of a quantisation edge (float32 vs float64 may round them apart)."""
    near = np.zeros(px.shape, bool)
    for lines in topo.parts.values():
        for line in lines:
            idx = list(line.indices)
            pairs = list(zip(idx[:-1], idx[1:])) + ([(idx[-1], idx[0])] if line.closed else [])
            for i, j in pairs:
                dist = segment_distance(px, py, points2d[i], points2d[j])
                if antialias:
                    v = (r + 0.5 - dist) * 255
                    near |= (np.abs(v - np.round(v - 0.5) - 0.5) < 0.05) & (v > -1) & (v < 256)
                else:
                    near |= np.abs(dist - r) < 1e-3
    return near


# ---------------------------------------------------------------------------------------------------------------------
# rasterisation
# ---------------------------------------------------------------------------------------------------------------------
def two_point_face(a, b) -> np.ndarray:
    """ibug68 points where only the jaw segment a-b is on screen (the rest of the jaw sits on b, the rest off-image)."""
    p = np.full((68, 3), OFF, np.float32)
    p[:, 2] = 0
    p[0, :2] = a
    p[1:17, :2] = b
    return p


@pytest.mark.parametrize("antialias", [True, False])
def test_horizontal_segment_thickness_one_lights_exactly_its_row(antialias):
    seq = seq_of(two_point_face((10.5, 20.5), (50.5, 20.5)), frame_size=(64, 48))
    img = render_landmarks(seq, thickness=1.0, antialias=antialias)
    assert img.shape == (1, 48, 64, 3) and img.dtype == torch.float32
    lit = img[0].amax(-1).numpy() > 0
    expected = np.zeros((48, 64), bool)
    expected[20, 10:51] = True
    np.testing.assert_array_equal(lit, expected)
    np.testing.assert_allclose(img[0, 20, 10:51].numpy(), np.tile(np.array(PART_COLORS["contour"]) / 255, (41, 1)))


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("thickness", [1.0, 2.0, 3.5])
def test_parts_match_brute_force_reference(antialias, thickness):
    rng = np.random.default_rng(int(thickness * 10) + antialias)
    pts = synthetic_ibug68(scale=0.25)
    pts[:, :2] += rng.uniform(-0.5, 0.5, (68, 2)).astype(np.float32)  # off-grid coordinates
    seq = seq_of(pts, frame_size=(64, 64))
    got = render_landmarks(seq, thickness=thickness, antialias=antialias)[0].numpy()
    ref, near = reference_parts(pts[:, :2].astype(np.float64), IBUG68, 64, 64, thickness, antialias)
    diff = np.abs(got - ref).max(-1)
    assert (diff[~near] < 1.5 / 255).all(), f"{int((diff[~near] >= 1.5 / 255).sum())} pixels differ from the reference"
    assert (got.max(-1) > 0).sum() > 150


def test_mesh_style_matches_brute_force_reference():
    size, thickness, mesh_thickness = 96, 2.0, 1.0
    pts = face_like_mediapipe478(np.random.default_rng(5), size=size)
    seq = seq_of(pts, "mediapipe478", frame_size=(size, size))
    got = render_landmarks(seq, thickness=thickness, style="mesh", mesh_thickness=mesh_thickness)[0].numpy()
    parts, near = reference_parts(pts[:, :2].astype(np.float64), MEDIAPIPE478, size, size, thickness, True)
    ys, xs = np.mgrid[0:size, 0:size]
    level = np.zeros((size, size))
    edges = mesh_edges()
    p2 = pts[:, :2].astype(np.float64)
    for chunk in np.array_split(edges, 8):  # all edges of a chunk at once: [E, 1, 1] against [H, W]
        a, b = p2[chunk[:, 0]][:, None, None], p2[chunk[:, 1]][:, None, None]
        dist = segment_distance(xs + 0.5, ys + 0.5, (a[..., 0], a[..., 1]), (b[..., 0], b[..., 1]))
        level = np.maximum(level, np.round(np.clip(mesh_thickness / 2 + 0.5 - dist, 0, 1) * 255).max(0))
    alpha = parts.max(-1, keepdims=True)  # parts colours all have a 255 channel, so this is their coverage
    ref = parts + (1 - alpha) * (level / 255)[..., None] * np.array(MESH_COLOR) / 255
    diff = np.abs(got - ref).max(-1)
    assert (diff[~near] < 2.5 / 255).all(), f"{int((diff[~near] >= 2.5 / 255).sum())} pixels differ from the reference"


def test_antialiased_line_carries_its_area():
    length, thickness = 100.0, 3.0
    a = np.array([30.3, 40.7])
    b = a + length * np.array([math.cos(0.52), math.sin(0.52)])
    img = render_landmarks(seq_of(two_point_face(a, b), frame_size=(160, 120)), thickness=thickness)
    area = img[0].amax(-1).sum().item()  # contour colour is white, so coverage = any channel
    expected = thickness * length + math.pi * (thickness / 2) ** 2
    assert abs(area - expected) / expected < 0.02


def test_far_away_points_are_clipped_and_nan_draws_nothing():
    seq = seq_of(two_point_face((-1e7, 20.5), (1e7, 20.5)), frame_size=(64, 48))
    lit = render_landmarks(seq, thickness=1.0)[0].amax(-1).numpy() > 0
    expected = np.zeros((48, 64), bool)
    expected[20, :] = True
    np.testing.assert_array_equal(lit, expected)
    for a, b in [((-1e9, 20.5), (1e9, 20.5)), ((-3e9, -1e9), (2e9, 3e9)), ((1e30, 5), (-1e30, 7))]:
        img = render_landmarks(seq_of(two_point_face(a, b), frame_size=(64, 48)), thickness=2.0)
        assert torch.isfinite(img).all()
    pts = synthetic_ibug68()
    pts[0] = np.nan
    img = render_landmarks(seq_of(pts), thickness=2.0)
    assert torch.isfinite(img).all() and img.amax() > 0


def test_every_part_has_its_colour_ibug68():
    pts = synthetic_ibug68()
    img = render_landmarks(seq_of(pts), thickness=3.0)[0].numpy()
    for part, lines in IBUG68.parts.items():
        i, j = lines[0].indices[:2]
        x, y = ((pts[i, :2] + pts[j, :2]) / 2).astype(int)
        np.testing.assert_allclose(img[y, x], np.array(PART_COLORS[part]) / 255, err_msg=part)


def test_every_part_has_its_colour_mediapipe478():
    pts = synthetic_mediapipe478()
    img = render_landmarks(seq_of(pts, "mediapipe478"), thickness=3.0)[0].numpy()
    for part, lines in MEDIAPIPE478.parts.items():
        i, j = lines[0].indices[:2]
        x, y = ((pts[i, :2] + pts[j, :2]) / 2).astype(int)
        np.testing.assert_allclose(img[y, x], np.array(PART_COLORS[part]) / 255, err_msg=part)


def test_part_colours_are_fixed_distinct_and_cover_both_topologies():
    assert set(PART_COLORS) == set(PART_ORDER)
    for topo in (IBUG68, MEDIAPIPE478):
        assert set(topo.parts) <= set(PART_COLORS)
    cols = np.array([PART_COLORS[p] for p in PART_ORDER], float)
    dists = np.linalg.norm(cols[:, None] - cols[None], axis=-1) + np.eye(len(cols)) * 1e9
    assert dists.min() >= 120
    assert len(set(PART_COLORS.values()) | {MESH_COLOR}) == len(PART_COLORS) + 1


def _centroid(w):
    ys, xs = np.nonzero(w)
    return np.array([np.average(xs + 0.5, weights=w[ys, xs]), np.average(ys + 0.5, weights=w[ys, xs])])


def test_scaling_to_another_size_moves_pixels_proportionally():
    seq = seq_of(synthetic_ibug68())
    small = render_landmarks(seq, thickness=2.0)[0].amax(-1).numpy()
    big = render_landmarks(seq, size=512, thickness=4.0)[0].amax(-1).numpy()  # same shapes, twice as big
    assert big.shape == (512, 512)
    np.testing.assert_allclose(_centroid(big), _centroid(small) * 2.0, atol=0.25)
    # each solid pixel of the big image maps back onto (or right next to) a lit pixel of the small one
    ys, xs = np.nonzero(big > 0.99)
    back = small[(ys // 2), (xs // 2)]
    assert (back > 0).mean() > 0.95
    # non-square output: each axis scales on its own (dots = zero-length segments)
    for dot in [(37.3, 81.6), (200.2, 20.9), (128.0, 150.5)]:
        seq = seq_of(two_point_face(dot, dot), frame_size=(256, 200))
        img = render_landmarks(seq, size=(512, 300), thickness=3.0)[0].amax(-1).numpy()
        assert img.shape == (300, 512)
        np.testing.assert_allclose(_centroid(img), np.array(dot) * [2.0, 1.5], atol=0.05)


def test_invalid_frames_are_black_and_batches_match_single_frames():
    rng = np.random.default_rng(1)
    frames = np.stack([synthetic_ibug68(scale=rng.uniform(0.7, 1.0), shift=rng.uniform(-20, 20, 2)) for _ in range(7)])
    valid = np.array([True, True, False, True, True, True, False])
    seq = seq_of(frames, valid=valid)
    full = render_landmarks(seq, thickness=2.5, batch_size=64)
    assert (full[~torch.from_numpy(valid)] == 0).all()
    assert (full[torch.from_numpy(valid)].flatten(1).amax(1) > 0).all()
    for bs in (1, 3):
        assert torch.equal(render_landmarks(seq, thickness=2.5, batch_size=bs), full)
    for t in range(len(seq)):
        assert torch.equal(render_landmarks(seq[t], thickness=2.5)[0], full[t])


def test_mesh_style_lights_more_pixels_with_parts_on_top():
    pts = face_like_mediapipe478(np.random.default_rng(0))
    seq = seq_of(pts[None].repeat(2, 0), "mediapipe478")
    parts = render_landmarks(seq, thickness=2.0)
    mesh = render_landmarks(seq, thickness=2.0, style="mesh")
    n_parts, n_mesh = (parts[0].amax(-1) > 0).sum().item(), (mesh[0].amax(-1) > 0).sum().item()
    assert n_mesh > 2 * n_parts
    solid = parts[0].amax(-1) > 0.999  # fully covered part pixels keep their exact colour
    assert torch.equal(mesh[0][solid], parts[0][solid])
    mesh_only = (parts[0].amax(-1) == 0) & (mesh[0].amax(-1) > 0)
    grey = mesh[0][mesh_only]
    assert torch.allclose(grey[:, 0], grey[:, 1]) and grey.max() <= MESH_COLOR[0] / 255 + 1e-6
    edges = mesh_edges()
    assert edges.shape[1] == 2 and len(edges) > 1000 and edges.max() < 468 and (edges[:, 0] < edges[:, 1]).all()


def test_render_points_matches_render_landmarks():
    pts = synthetic_ibug68()
    seq = seq_of(np.stack([pts, pts + 3]))
    rgb, alpha = render_points(torch.from_numpy(seq.points), "ibug68", (256, 256), thickness=2.0, return_alpha=True)
    assert torch.equal(rgb, render_landmarks(seq, thickness=2.0))
    assert alpha.shape == (2, 256, 256) and torch.allclose(alpha, rgb.amax(-1), atol=1e-6)


def test_iter_rendered_frames_streams_uint8_equal_to_render():
    frames = np.stack([synthetic_ibug68(shift=(k, 0)) for k in range(5)])
    seq = seq_of(frames, valid=[True, True, True, False, True])
    it = iter_rendered_frames(seq, size=128, thickness=2.0, batch_size=2)
    assert not isinstance(it, (list, tuple))
    got = list(it)
    assert len(got) == 5 and all(f.dtype == np.uint8 and f.shape == (128, 128, 3) for f in got)
    ref = (render_landmarks(seq, size=128, thickness=2.0) * 255).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.stack(got), ref)
    with pytest.raises(LmdiffInputError):
        iter_rendered_frames(seq, style="bogus")  # raised at the call, before any frame is drawn


def test_draw_landmarks_on_frames_blends_over_real_frames():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 128, 160, 3), dtype=np.uint8)
    pts = synthetic_ibug68()
    seq = LandmarkSequence(
        points=np.stack([pts] * 3), topology="ibug68", frame_size=(256, 256), valid=[True, False, True]
    )
    out = draw_landmarks_on_frames(frames, seq, thickness=2.0)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8 and out.shape == frames.shape
    np.testing.assert_array_equal(out[1], frames[1])  # invalid frame untouched
    lines = render_landmarks(seq, size=(160, 128), thickness=2.0)[0].numpy()
    solid = lines.max(-1) > 0.999
    np.testing.assert_array_equal(out[0][solid], np.round(lines[solid] * 255).astype(np.uint8))
    empty = lines.max(-1) == 0
    np.testing.assert_array_equal(out[0][empty], frames[0][empty])
    np.testing.assert_array_equal(draw_landmarks_on_frames(frames, seq, opacity=0.0), frames)
    as_float = torch.from_numpy(frames).float() / 255
    out_t = draw_landmarks_on_frames(as_float, seq, thickness=2.0)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    assert (out_t * 255 - torch.from_numpy(out).float()).abs().max() <= 1.0
    single = draw_landmarks_on_frames(frames[0], seq[0], thickness=2.0)
    np.testing.assert_array_equal(single, out[0])


# ---------------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_input_raises_lmdiff_input_error():
    ibug = seq_of(synthetic_ibug68())
    with pytest.raises(LmdiffInputError, match="style"):
        render_landmarks(ibug, style="wireframe")
    with pytest.raises(LmdiffInputError, match="mesh"):
        render_landmarks(ibug, style="mesh")
    for bad in (0, -5, (0, 10), (10, -1), 2.5, "512", (1, 2, 3)):
        with pytest.raises(LmdiffInputError, match="size"):
            render_landmarks(ibug, size=bad)
    for bad in (0, -1, float("nan"), "thick"):
        with pytest.raises(LmdiffInputError, match="thickness"):
            render_landmarks(ibug, thickness=bad)
    with pytest.raises(LmdiffInputError, match="batch_size"):
        render_landmarks(ibug, batch_size=0)
    with pytest.raises(LmdiffInputError, match="LandmarkSequence"):
        render_landmarks(np.zeros((1, 68, 3)))
    with pytest.raises(LmdiffInputError, match="frames"):
        draw_landmarks_on_frames(np.zeros((2, 64, 64, 3), np.uint8), ibug)
    with pytest.raises(LmdiffInputError, match="opacity"):
        draw_landmarks_on_frames(np.zeros((1, 64, 64, 3), np.uint8), ibug, opacity=2)


# ---------------------------------------------------------------------------------------------------------------------
# OpenPose export
# ---------------------------------------------------------------------------------------------------------------------
def test_openpose_face_export_ibug68(tmp_path):
    pts = np.stack([synthetic_ibug68(), synthetic_ibug68(shift=(5, -3))])
    seq = LandmarkSequence(points=pts, topology="ibug68", frame_size=(256, 200), valid=[True, False])
    poses = to_openpose_face(seq)
    assert len(poses) == 2
    assert poses[1] == {"people": [], "canvas_width": 256, "canvas_height": 200}
    person = poses[0]["people"][0]
    assert set(person) == {
        "pose_keypoints_2d",
        "face_keypoints_2d",
        "hand_left_keypoints_2d",
        "hand_right_keypoints_2d",
    }
    assert person["pose_keypoints_2d"] == [] and person["hand_left_keypoints_2d"] == []
    face = np.asarray(person["face_keypoints_2d"]).reshape(70, 3)
    assert len(person["face_keypoints_2d"]) == 70 * 3
    np.testing.assert_allclose(face[:68, :2], pts[0, :, :2], atol=1e-3)  # round trip of the coordinates
    np.testing.assert_array_equal(face[:, 2], 1.0)
    right = (pts[0, 36, :2] + pts[0, 39, :2]) / 2  # subject's right eye: corners 36, 39
    left = (pts[0, 42, :2] + pts[0, 45, :2]) / 2
    np.testing.assert_allclose(face[68, :2], right, atol=1e-3)
    np.testing.assert_allclose(face[69, :2], left, atol=1e-3)
    norm = np.asarray(to_openpose_face(seq, normalized=True)[0]["people"][0]["face_keypoints_2d"]).reshape(70, 3)
    np.testing.assert_allclose(norm[:, :2] * [256, 200], face[:, :2], atol=1e-3)

    path = save_openpose_json(seq, tmp_path / "sub" / "pose.json")
    assert json.loads(path.read_text()) == poses
    assert [p.name for p in path.parent.iterdir()] == ["pose.json"]  # no temp file left behind
    with pytest.raises(LmdiffInputError):
        save_openpose_json(seq, tmp_path)


def test_openpose_face_export_missing_points_and_mediapipe_pupils():
    pts = synthetic_ibug68()
    pts[5] = np.nan
    face = np.asarray(to_openpose_face(seq_of(pts))[0]["people"][0]["face_keypoints_2d"]).reshape(70, 3)
    np.testing.assert_array_equal(face[5], [0.0, 0.0, 0.0])  # OpenPose's "missing"
    json.dumps(to_openpose_face(seq_of(pts)), allow_nan=False)

    mp = synthetic_mediapipe478()
    centres = [(mp[a, :2] + mp[b, :2]) / 2 for a, b in ((33, 133), (362, 263))]
    mp[468, :2], mp[473, :2] = centres[0] + (1.25, -0.5), centres[1] + (-0.75, 0.25)
    seq = seq_of(mp, "mediapipe478")
    face = np.asarray(to_openpose_face(seq)[0]["people"][0]["face_keypoints_2d"]).reshape(70, 3)
    np.testing.assert_allclose(face[68:, :2], [mp[468, :2], mp[473, :2]], atol=1e-3)  # iris centres inside the eyes
    np.testing.assert_allclose(face[:68, :2], seq.to_topology("ibug68").points[0, :, :2], atol=1e-3)
    mp[468, :2] = centres[0] + (0.0, 200.0)  # an iris point far outside its eye falls back to the eye centre
    face = np.asarray(to_openpose_face(seq_of(mp, "mediapipe478"))[0]["people"][0]["face_keypoints_2d"]).reshape(70, 3)
    np.testing.assert_allclose(face[68, :2], centres[0], atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# real data (optional)
# ---------------------------------------------------------------------------------------------------------------------
def test_real_photo_pupils_and_rendering(mediapipe_model):
    """MediaPipe on a real photo: the exported pupils land on the annotated ones (FRL template points 0 and 1 are the
    image-left and image-right pupils, i.e. the subject's right and left), and the iris rings are drawn there."""
    name = "3dsk_agata_neutral"
    image_path = shared_path(f"data/faces/img/{name}.jpg")
    annotation_path = shared_path(f"data/faces/lmk/{name}.json")
    mp = pytest.importorskip("mediapipe")
    from mediapipe.tasks.python import BaseOptions, vision
    from PIL import Image

    img = np.asarray(Image.open(image_path).convert("RGB"))
    options = vision.FaceLandmarkerOptions(base_options=BaseOptions(model_asset_path=str(mediapipe_model)), num_faces=1)
    with vision.FaceLandmarker.create_from_options(options) as landmarker:
        result = landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
    assert result.face_landmarks, "no face found in a frontal portrait"
    h, w = img.shape[:2]
    pts = np.array([[p.x * w, p.y * h, p.z * w] for p in result.face_landmarks[0]], np.float32)
    seq = LandmarkSequence(points=pts[None], topology="mediapipe478", frame_size=(w, h))
    annotated = np.asarray(json.loads(annotation_path.read_text())["points"], float)[:2]
    iod = np.linalg.norm(annotated[0] - annotated[1])
    pupils = MEDIAPIPE478.pupil_points(seq.points)[0, :, :2]
    assert np.linalg.norm(pupils - annotated, axis=1).max() < 0.05 * iod
    face = np.asarray(to_openpose_face(seq)[0]["people"][0]["face_keypoints_2d"]).reshape(70, 3)
    np.testing.assert_allclose(face[68:, :2], pupils, atol=1e-3)
    img_r = render_landmarks(seq, thickness=2.0)[0].numpy()
    for part, pupil in (("right_iris", pupils[0]), ("left_iris", pupils[1])):
        x0, y0 = (pupil - 0.15 * iod).astype(int)
        x1, y1 = (pupil + 0.15 * iod).astype(int)
        window = img_r[y0:y1, x0:x1].reshape(-1, 3)
        colour = np.array(PART_COLORS[part]) / 255
        assert (np.abs(window - colour).max(-1) < 1e-6).sum() > 10, part
    mesh = render_landmarks(seq, thickness=2.0, style="mesh")[0]
    assert (mesh.amax(-1) > 0).sum() > 3 * (torch.from_numpy(img_r).amax(-1) > 0).sum()
