"""Tests for lmdiff_core.crop on real clips with real MediaPipe landmarks (detected here, independently of
lmdiff_core.detectors), checked against independent computations (scipy hulls, scikit-image polygon fill, PSNR,
MediaPipe re-detection on the crops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdiff_core.crop import (
    CropTrack,
    compute_crop_track,
    crop_frames,
    face_masks,
    paste_back,
    transform_landmarks,
)
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.masks import rasterize_polygons
from lmdiff_core.topology import get_topology

from .conftest import MEDIAPIPE_TASK, SHARED  # the one way tests reach ../shared

CLIPS = SHARED / "data" / "clips"
FACE_MODEL = SHARED / MEDIAPIPE_TASK
needs_media = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared (real test media) is absent")

N_FRAMES = 100  # 4 s at 25 fps
MP = get_topology("mediapipe478")
PUPILS = list(MP.pupils)
OVAL = list(MP.part_indices("contour"))
OUTER_LIPS = list(MP.part_indices("outer_lips"))
EYES = list(MP.part_indices("right_eye")) + list(MP.part_indices("left_eye"))
NOSE_TIP, CHIN = 1, 199  # 199: the chin, inside the oval (152 is its boundary)


# ------------------------------------------------------------------------------------------------------------------
# real data: frames + MediaPipe landmarks
# ------------------------------------------------------------------------------------------------------------------
def _landmarker(mode: str):
    from mediapipe.tasks.python import BaseOptions, vision

    return vision.FaceLandmarker.create_from_options(
        vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(FACE_MODEL)),
            running_mode=vision.RunningMode.VIDEO if mode == "video" else vision.RunningMode.IMAGE,
            num_faces=1,
        )
    )


def _to_points(result, width: int, height: int) -> np.ndarray | None:
    if not result.face_landmarks:
        return None
    return np.array([[p.x * width, p.y * height, p.z * width] for p in result.face_landmarks[0]], dtype=np.float32)


def _detect_image(image: np.ndarray) -> np.ndarray | None:
    import mediapipe as mp

    with _landmarker("image") as lm:
        result = lm.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
    return _to_points(result, image.shape[1], image.shape[0])


def _load_clip(name: str, n_frames: int = N_FRAMES):
    import av
    import mediapipe as mp

    frames, points, valid = [], [], []
    with av.open(str(CLIPS / f"{name}.mp4")) as container, _landmarker("video") as lm:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= n_frames:
                break
            rgb = frame.to_ndarray(format="rgb24")
            h, w = rgb.shape[:2]
            result = lm.detect_for_video(
                mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)), i * 40
            )
            p = _to_points(result, w, h)
            frames.append(rgb)
            points.append(np.zeros((MP.n_points, 3), np.float32) if p is None else p)
            valid.append(p is not None)
    frames = np.stack(frames)
    seq = LandmarkSequence(np.stack(points), topology="mediapipe478", fps=25, frame_size=(w, h), valid=np.array(valid))
    assert seq.valid.mean() > 0.95, f"{name}: MediaPipe found a face in only {seq.valid.mean():.0%} of the frames"
    return frames, seq


_CACHE: dict[str, tuple[np.ndarray, LandmarkSequence]] = {}


def clip(name: str):
    if name not in _CACHE:
        _CACHE[name] = _load_clip(name)
    return _CACHE[name]


# 256x256 HDTF-style crop, and 512x910 portrait video with a small face
REAL_CLIPS = ["edtalk_woman_en", "latentsync_man_a"]


def _hull_mask(points_xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """Independent convex-hull fill: scipy hull + scikit-image polygon (pixel centres at i + 0.5)."""
    from scipy.spatial import ConvexHull
    from skimage.draw import polygon

    hull = points_xy[ConvexHull(points_xy).vertices]
    mask = np.zeros((height, width), dtype=bool)
    rr, cc = polygon(hull[:, 1] - 0.5, hull[:, 0] - 0.5, shape=(height, width))
    mask[rr, cc] = True
    return mask


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ------------------------------------------------------------------------------------------------------------------
# 1. paste back an unmodified crop
# ------------------------------------------------------------------------------------------------------------------
@needs_media
@pytest.mark.parametrize("name", REAL_CLIPS)
@pytest.mark.parametrize("size", [256, 512])
def test_paste_back_of_unmodified_crop_reproduces_the_face(name, size):
    from scipy.ndimage import binary_erosion

    frames, seq = clip(name)
    h, w = frames.shape[1:3]
    track = compute_crop_track(seq, size=size)
    idx = np.arange(0, N_FRAMES, 10)
    x = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float() / 255
    crops = crop_frames(x, track, idx)
    assert crops.shape == (len(idx), 3, size, size) and crops.dtype == torch.float32

    out, masks = paste_back(x, crops, track, idx, mask="face", feather=0)
    assert out.shape == x.shape and masks.shape == (len(idx), 1, h, w)
    # outside the pasted mask the frame is untouched, bit for bit
    outside = (masks == 0).expand_as(x)
    assert torch.equal(out[outside], x[outside])
    got, ref = [], []
    for j, t in enumerate(idx):
        face = _hull_mask(seq.points[t, OVAL, :2], w, h)  # independent face region in the frame
        m = masks[j, 0].numpy()
        inner = binary_erosion(face, iterations=2)  # the mask's edge is soft over ~1-2 px after resampling
        assert (m[inner] > 0.99).mean() > 0.99, "the frame-space face mask does not cover the face"
        got.append(out[j].permute(1, 2, 0).numpy()[face])
        ref.append(x[j].permute(1, 2, 0).numpy()[face])
        psnr = _psnr(got[-1], ref[-1])
        assert psnr >= 38.0, f"{name} crop {size} frame {t}: face PSNR {psnr:.1f} dB"
    psnr = _psnr(np.concatenate(got), np.concatenate(ref))
    assert psnr >= 40.0, f"{name} crop {size}: face PSNR {psnr:.1f} dB over {len(idx)} frames"

    # and a replaced crop really lands there: a flat colour pasted with a hard mask shows inside the face
    colour = torch.tensor([0.1, 0.9, 0.3]).view(1, 3, 1, 1)
    out2, masks2 = paste_back(x, colour.expand_as(crops).clone(), track, idx, mask="face", feather=0)
    full = masks2[:, 0] >= 0.999
    assert full.float().mean() > 0.02
    assert torch.allclose(out2.permute(0, 2, 3, 1)[full], colour.view(3).expand(int(full.sum()), 3), atol=2e-3)


@needs_media
def test_paste_back_feathering_and_chunks():
    frames, seq = clip("edtalk_woman_en")
    track = compute_crop_track(seq, size=256)
    x = torch.from_numpy(frames[:8]).permute(0, 3, 1, 2).float() / 255
    crops = crop_frames(frames[:8], track, np.arange(8))  # uint8 numpy [B, H, W, 3] input
    assert torch.allclose(crops, crop_frames(x, track, np.arange(8)), atol=1e-5)
    # chunked processing gives what one batch gives
    chunked = torch.cat([crop_frames(x[i : i + 3], track, np.arange(i, min(i + 3, 8))) for i in range(0, 8, 3)])
    assert torch.allclose(chunked, crops, atol=1e-6)

    black = torch.zeros_like(crops)
    _, hard = paste_back(x, black, track, np.arange(8), mask="lower_face", feather=0)
    _, soft = paste_back(x, black, track, np.arange(8), mask="lower_face", feather=6)
    partial_hard = ((hard > 0.02) & (hard < 0.98)).sum()
    partial_soft = ((soft > 0.02) & (soft < 0.98)).sum()
    assert partial_soft > 3 * partial_hard  # feathering widens the transition band
    assert abs(float(soft.sum() - hard.sum())) < 0.1 * float(hard.sum())  # the 0.5 level stays on the boundary
    # a user mask tensor works and a zero mask changes nothing
    out, m = paste_back(x, black, track, np.arange(8), mask=torch.zeros(8, 256, 256))
    assert torch.equal(out, x) and float(m.abs().sum()) == 0.0
    # antialiasing: a 1-px checkerboard crop at 2.7 crop px per frame px pastes as flat grey, not as aliasing
    track512 = compute_crop_track(seq, size=512)
    yy, xx = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    checker = ((yy + xx) % 2).float().expand(8, 3, 512, 512).contiguous()
    grey = {}
    for aa in (True, False):
        out, m = paste_back(x, checker, track512, np.arange(8), mask="face", feather=0, antialias=aa)
        inside = m[:, 0] > 0.999
        grey[aa] = float(out.permute(0, 2, 3, 1)[inside].std())
    assert grey[True] < 0.05 and grey[False] > 2 * grey[True], grey
    # the caller's frames are never modified
    before = x.clone()
    paste_back(x, black, track, np.arange(8), mask="face")
    assert torch.equal(x, before)


# ------------------------------------------------------------------------------------------------------------------
# 2. box stability
# ------------------------------------------------------------------------------------------------------------------
def _box_centres_sides(track: CropTrack) -> tuple[np.ndarray, np.ndarray]:
    """Box centre and side in frame pixels recovered from the matrices alone."""
    lin = track.matrices[:, :, :2]
    scale = np.sqrt(np.abs(np.linalg.det(lin)))
    centre = np.linalg.solve(lin, (track.size / 2 - track.matrices[:, :, 2])[..., None])[..., 0]
    return centre, track.size / scale


@needs_media
@pytest.mark.parametrize("name", REAL_CLIPS)
def test_smoothed_boxes_are_stable_and_follow_the_face(name):
    _, seq = clip(name)
    raw = compute_crop_track(seq, size=256, smoothing=0)
    smooth = compute_crop_track(seq, size=256)
    rc, rs = _box_centres_sides(raw)
    sc, ss = _box_centres_sides(smooth)
    jitter = lambda a: float(np.std(np.diff(a, n=2, axis=0)))  # noqa: E731
    assert jitter(sc) < jitter(rc) / 3, (jitter(sc), jitter(rc))
    assert jitter(ss) < jitter(rs) / 3, (jitter(ss), jitter(rs))
    face_size = seq.inter_ocular()
    dist = np.linalg.norm(sc - rc, axis=1) / face_size
    assert dist.mean() < 0.1 and dist.max() < 0.4, (dist.mean(), dist.max())
    assert np.abs(np.log(ss / rs)).max() < 0.15
    # the whole face oval is inside the crop in every frame
    crop_pts = transform_landmarks(seq, smooth).points[:, OVAL, :2]
    assert crop_pts.min() > 0 and crop_pts.max() < 256


def test_invalid_frames_take_interpolated_boxes():
    seq = _synthetic_seq(20)
    valid = np.ones(20, bool)
    valid[8:12] = False
    pts = seq.points.copy()
    pts[8:12] = 1e4  # garbage where the detector failed
    track = compute_crop_track(seq.replace(points=pts, valid=valid), size=128, smoothing=0)
    clean = compute_crop_track(seq, size=128, smoothing=0)
    c, _ = _box_centres_sides(track)
    c0, _ = _box_centres_sides(clean)
    expected = c0[7] + (c0[12] - c0[7]) * (np.arange(8, 12) - 7)[:, None] / 5
    assert np.allclose(c[8:12], expected, atol=1e-6)
    assert list(track.valid) == list(valid)
    masks = face_masks(seq.replace(points=pts, valid=valid), track)
    assert all(float(m[8:12].sum()) == 0 for m in masks.values())  # nothing is pasted where no face is known


# ------------------------------------------------------------------------------------------------------------------
# 3. alignment
# ------------------------------------------------------------------------------------------------------------------
def _eye_angles_deg(points: np.ndarray) -> np.ndarray:
    d = points[:, PUPILS[1], :2] - points[:, PUPILS[0], :2]
    return np.degrees(np.arctan2(d[:, 1], d[:, 0]))


@needs_media
@pytest.mark.parametrize("name", REAL_CLIPS)
def test_eyes_land_at_the_same_crop_position(name):
    _, seq = clip(name)
    size = 256
    crop_seq = transform_landmarks(seq, compute_crop_track(seq, size=size))
    eyes = crop_seq.points[:, PUPILS, :2]
    assert eyes.std(axis=0).max() < 0.025 * size
    assert np.abs(eyes - eyes.mean(axis=0)).max() < 0.08 * size
    assert np.abs(_eye_angles_deg(crop_seq.points)).max() < 3.0
    # eyes in the upper half, symmetric about the vertical centre line
    assert 0.25 * size < eyes[..., 1].mean() < 0.5 * size
    assert abs(eyes[..., 0].mean() - size / 2) < 0.05 * size

    # roll the real landmarks by up to 35 degrees: the aligned crop still has a horizontal eye line
    t = np.linspace(0, 1, len(seq))
    roll = np.radians(35) * np.sin(np.pi * t)
    w, h = seq.frame_size
    c = np.array([w / 2, h / 2])
    rot = np.stack([np.stack([np.cos(roll), -np.sin(roll)], 1), np.stack([np.sin(roll), np.cos(roll)], 1)], 1)
    pts = seq.points.copy()
    pts[..., :2] = np.einsum("tij,tnj->tni", rot, seq.points[..., :2] - c) + c
    rolled = seq.replace(points=pts)
    aligned = transform_landmarks(rolled, compute_crop_track(rolled, size=size)).points
    assert np.abs(_eye_angles_deg(aligned)).max() < 3.0
    unaligned = transform_landmarks(rolled, compute_crop_track(rolled, size=size, align_rotation=False)).points
    assert np.abs(_eye_angles_deg(unaligned)).max() > 25.0


# ------------------------------------------------------------------------------------------------------------------
# 4. masks
# ------------------------------------------------------------------------------------------------------------------
@needs_media
@pytest.mark.parametrize("name", REAL_CLIPS)
def test_masks_nest_and_cover_the_right_landmarks(name):
    from scipy.spatial import ConvexHull

    _, seq = clip(name)
    size = 256
    track = compute_crop_track(seq, size=size)
    idx = np.arange(0, N_FRAMES, 7)
    masks = face_masks(seq, track, idx)
    assert set(masks) == {"face", "lower_face", "mouth"}
    face, lower, mouth = (masks[k][:, 0].numpy() > 0.5 for k in ("face", "lower_face", "mouth"))
    assert masks["face"].shape == (len(idx), 1, size, size)
    crop_pts = transform_landmarks(seq, track).points[idx, :, :2]

    assert not (lower & ~face).any()
    assert not (mouth & ~lower).any()
    for j in range(len(idx)):
        n_face, n_lower, n_mouth = face[j].sum(), lower[j].sum(), mouth[j].sum()
        assert 0 < n_mouth < n_lower < n_face
        assert 0.3 < n_lower / n_face < 0.75
        p = crop_pts[j]
        at = lambda m, ids: m[np.floor(p[ids, 1]).astype(int), np.floor(p[ids, 0]).astype(int)]  # noqa: E731
        assert at(mouth[j], OUTER_LIPS).all()
        assert at(lower[j], [NOSE_TIP, CHIN]).all()
        assert not at(lower[j], EYES).any()
        assert at(face[j], EYES).all()
        # the face mask is the hull of the face oval (and lips): compare with an independent fill
        ref = _hull_mask(np.concatenate([p[OVAL], p[OUTER_LIPS]]), size, size)
        iou = (face[j] & ref).sum() / (face[j] | ref).sum()
        assert iou > 0.98, iou
        # the mouth is the lip hull dilated by r = 0.15 x mouth width: Steiner's formula A + P r + pi r^2
        hull = ConvexHull(p[OUTER_LIPS].astype(np.float64))
        r = 0.15 * np.linalg.norm(p[MP.mouth_corners[0]] - p[MP.mouth_corners[1]])
        expected = hull.volume + hull.area * r + np.pi * r * r
        assert abs(n_mouth - expected) < 0.03 * expected + hull.area, (n_mouth, expected)

    # frame-space masks (no track) match crop-space masks pasted back
    frame_masks = face_masks(seq, None, idx)["face"][:, 0].numpy() > 0.5
    h, w = seq.frame_size[1], seq.frame_size[0]
    ref = _hull_mask(np.concatenate([seq.points[idx[0], OVAL, :2], seq.points[idx[0], OUTER_LIPS, :2]]), w, h)
    assert (frame_masks[0] & ref).sum() / (frame_masks[0] | ref).sum() > 0.98


def test_rasterize_polygons_matches_skimage():
    from skimage.draw import polygon

    rng = np.random.default_rng(0)
    # a non-convex star and a random triangle, sub-pixel vertices
    a = np.linspace(0, 2 * np.pi, 10, endpoint=False)
    radius = np.where(np.arange(10) % 2 == 0, 40.3, 17.1)
    star = np.stack([60.2 + radius * np.cos(a), 55.7 + radius * np.sin(a)], 1)
    tri = np.concatenate([rng.uniform(5, 115, (3, 2)), np.repeat(rng.uniform(5, 115, (1, 2)), 7, axis=0)])
    polys = np.stack([star, tri])
    got = rasterize_polygons(polys, 120, 110).numpy()
    for poly, mask in zip(polys, got):
        ref = np.zeros((110, 120), bool)
        rr, cc = polygon(poly[:, 1] - 0.5, poly[:, 0] - 0.5, shape=(110, 120))
        ref[rr, cc] = True
        assert (mask != ref).sum() <= 0.02 * ref.sum() + 2, (mask != ref).sum()


def test_ibug68_landmarks_work():
    # iBUG-68 built from MediaPipe vertices (a rough vertex map, enough to exercise the jaw-line code path)
    mp2ibug = [
        127,
        234,
        93,
        132,
        58,
        136,
        150,
        176,
        152,
        400,
        379,
        365,
        288,
        361,
        323,
        454,
        356,
        70,
        63,
        105,
        66,
        107,
        336,
        296,
        334,
        293,
        300,
        168,
        197,
        5,
        4,
        75,
        97,
        2,
        326,
        305,
        33,
        160,
        158,
        133,
        153,
        144,
        362,
        385,
        387,
        263,
        373,
        380,
        61,
        39,
        37,
        0,
        267,
        269,
        291,
        405,
        314,
        17,
        84,
        181,
        78,
        82,
        13,
        312,
        308,
        317,
        14,
        87,
    ]
    mp_seq = _synthetic_seq(5) if not SHARED.is_dir() else clip("edtalk_woman_en")[1][:5]
    seq = LandmarkSequence(mp_seq.points[:, mp2ibug], topology="ibug68", fps=25, frame_size=mp_seq.frame_size)
    track = compute_crop_track(seq, size=128)
    masks = face_masks(seq, track)
    face, lower, mouth = (masks[k][:, 0] > 0.5 for k in ("face", "lower_face", "mouth"))
    assert not (lower & ~face).any() and not (mouth & ~lower).any()
    assert (mouth.sum((1, 2)) > 0).all() and (lower.sum((1, 2)) < face.sum((1, 2))).all()
    # the raised brows give the jaw-line hull a forehead: the eyes are inside the face mask
    crop = transform_landmarks(seq, track).points
    for t in range(len(seq)):
        for i in range(36, 48):
            assert face[t, int(crop[t, i, 1]), int(crop[t, i, 0])]


# ------------------------------------------------------------------------------------------------------------------
# 5. landmark transforms
# ------------------------------------------------------------------------------------------------------------------
@needs_media
def test_transform_landmarks_round_trip_and_redetection():
    frames, seq = clip("latentsync_man_a")
    track = compute_crop_track(seq, size=512)
    crop_seq = transform_landmarks(seq, track)
    assert crop_seq.frame_size == (512, 512) and crop_seq.topology == seq.topology
    back = transform_landmarks(crop_seq, track, inverse=True)
    assert back.frame_size == seq.frame_size
    assert np.abs(back.points[..., :2] - seq.points[..., :2]).max() < 1e-3
    assert np.abs(back.points[..., 2] - seq.points[..., 2]).max() < 1e-3
    # indices: a chunk of landmarks maps like the full sequence
    part = transform_landmarks(seq[10:20], track, indices=np.arange(10, 20))
    assert np.allclose(part.points, crop_seq.points[10:20], atol=1e-4)

    # independent check of crop_frames + transform_landmarks: MediaPipe on the crop finds the face where the
    # transformed landmarks say it is
    idx = np.array([5, 50, 95])
    crops = crop_frames(frames[idx], track, idx)
    for j, t in enumerate(idx):
        image = (crops[j].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        found = _detect_image(image)
        assert found is not None
        err = np.linalg.norm(found[:, :2] - crop_seq.points[t, :, :2], axis=1)
        inter_ocular = np.linalg.norm(crop_seq.points[t, 33, :2] - crop_seq.points[t, 263, :2])
        assert np.median(err) < 0.05 * inter_ocular, (t, np.median(err), inter_ocular)


# ------------------------------------------------------------------------------------------------------------------
# 6. bad inputs
# ------------------------------------------------------------------------------------------------------------------
def _synthetic_seq(t: int = 10, frame_size=(320, 240)) -> LandmarkSequence:
    """A plausible frontal mediapipe478 face built from the canonical proportions of the real landmark layout."""
    rng = np.random.default_rng(1)
    pts = np.zeros((t, MP.n_points, 3), np.float32)
    cx, cy = frame_size[0] / 2, frame_size[1] / 2
    a = np.linspace(0, 2 * np.pi, len(OVAL), endpoint=False)
    pts[:, :, 0], pts[:, :, 1] = cx, cy + 10
    pts[:, OVAL, 0] = cx + 55 * np.sin(a)
    pts[:, OVAL, 1] = cy + 10 - 70 * np.cos(a)
    b = np.linspace(0, 2 * np.pi, len(OUTER_LIPS), endpoint=False)
    pts[:, OUTER_LIPS, 0] = cx + 18 * np.cos(b)
    pts[:, OUTER_LIPS, 1] = cy + 30 + 6 * np.sin(b)
    pts[:, MP.mouth_corners[0], :2] = (cx - 18, cy + 30)
    pts[:, MP.mouth_corners[1], :2] = (cx + 18, cy + 30)
    right_eye = list(MP.part_indices("right_eye")) + [PUPILS[0]]  # the subject's right: image left
    left_eye = list(MP.part_indices("left_eye")) + [PUPILS[1]]
    pts[:, right_eye, 0], pts[:, right_eye, 1] = cx - 22, cy - 15
    pts[:, left_eye, 0], pts[:, left_eye, 1] = cx + 22, cy - 15
    pts[..., :2] += rng.normal(0, 0.3, (t, 1, 2)).astype(np.float32)
    return LandmarkSequence(pts, topology="mediapipe478", fps=25, frame_size=frame_size)


def test_bad_inputs_raise_clear_errors():
    seq = _synthetic_seq(10)
    for size in (0, -256, 4, 256.0, "256", True):
        with pytest.raises(LmdiffInputError, match="size"):
            compute_crop_track(seq, size=size)
    for scale in (0, -1.0, float("nan"), "3"):
        with pytest.raises(LmdiffInputError, match="scale"):
            compute_crop_track(seq, scale=scale)
    with pytest.raises(LmdiffInputError, match="smoothing"):
        compute_crop_track(seq, smoothing=-1)
    with pytest.raises(LmdiffInputError, match="no valid face"):
        compute_crop_track(seq.replace(valid=np.zeros(10, bool)))
    with pytest.raises(LmdiffInputError, match="LandmarkSequence"):
        compute_crop_track(np.zeros((10, 478, 3)))

    track = compute_crop_track(seq, size=64)
    frames = torch.rand(4, 3, 240, 320)
    with pytest.raises(LmdiffInputError, match="indices has 3 entries"):
        crop_frames(frames, track, [0, 1, 2])
    with pytest.raises(LmdiffInputError, match="indices is required"):
        crop_frames(frames, track)
    with pytest.raises(LmdiffInputError, match=r"indices must lie in \[0, 10\)"):
        crop_frames(frames, track, [0, 1, 2, 10])
    with pytest.raises(LmdiffInputError, match="320x240"):
        crop_frames(torch.rand(4, 3, 100, 100), track, [0, 1, 2, 3])
    with pytest.raises(LmdiffInputError, match=r"\[B, 3, H, W\]"):
        crop_frames(torch.rand(4, 240, 320, 3), track, [0, 1, 2, 3])
    with pytest.raises(LmdiffInputError, match="padding"):
        crop_frames(frames, track, [0, 1, 2, 3], padding="wrap")
    with pytest.raises(LmdiffInputError, match="CropTrack"):
        crop_frames(frames, "track", [0, 1, 2, 3])

    crops = crop_frames(frames, track, [0, 1, 2, 3])
    with pytest.raises(LmdiffInputError, match="crops hold 3 items"):
        paste_back(frames, crops[:3], track, [0, 1, 2, 3])
    with pytest.raises(LmdiffInputError, match="mask must be one of"):
        paste_back(frames, crops, track, [0, 1, 2, 3], mask="eyes")
    with pytest.raises(LmdiffInputError, match="feather"):
        paste_back(frames, crops, track, [0, 1, 2, 3], feather=-1)
    with pytest.raises(LmdiffInputError, match="needs landmarks"):
        paste_back(frames, crops, CropTrack(track.matrices, 64, (320, 240)), [0, 1, 2, 3], mask="mouth")
    with pytest.raises(LmdiffInputError, match="mask tensor"):
        paste_back(frames, crops, track, [0, 1, 2, 3], mask=torch.ones(3, 1, 64, 64))

    with pytest.raises(LmdiffInputError, match="frame_size"):
        transform_landmarks(seq.replace(frame_size=(100, 100)), track)
    with pytest.raises(LmdiffInputError, match="batch has 5 frames but the crop track has 10"):
        transform_landmarks(seq[:5], track)
    with pytest.raises(LmdiffInputError, match="unknown mask"):
        face_masks(seq, track, parts=("nose",))
    with pytest.raises(LmdiffInputError, match="matrices"):
        CropTrack(np.zeros((3, 3, 3)), 64, (320, 240))


def test_synthetic_sequence_end_to_end():
    """Runs without ../shared: crop, masks and paste-back on a synthetic face."""
    seq = _synthetic_seq(6)
    track = compute_crop_track(seq, size=96)
    frames = torch.rand(6, 3, 240, 320)
    crops = crop_frames(frames, track, np.arange(6))
    out, masks = paste_back(frames, crops, track, np.arange(6), mask="lower_face")
    assert out.shape == frames.shape and masks.shape == (6, 1, 240, 320)
    assert 0 < float(masks.mean()) < 0.5
    # a 2x-resolution crop (e.g. a model's output) pastes into the same place
    big = torch.nn.functional.interpolate(crops, scale_factor=2, mode="bilinear")
    _, masks_big = paste_back(frames, big, track, np.arange(6), mask="lower_face")
    assert float((masks_big - masks).abs().mean()) < 0.01
