"""Tests for lmdiff_core.conditioning and data.l2v_dataset on a small dataset prepared here from a real clip with real MediaPipe landmarks.

Expected values come from independent computations: the frame -> crop matrices applied by hand to the stored pose
and points, a separate MediaPipe detection (IMAGE mode) on the stored crops, point-to-segment distances computed
here from the topology's polylines, the crops read directly with `load_crops`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmdiff_core.data import prepare, store
from lmdiff_core.data.l2v_dataset import L2VFrameDataset
from lmdiff_core import conditioning as l2v
from lmdiff_core import masks
from lmdiff_core.canonical import apply_transform
from lmdiff_core.crop import CropTrack, face_masks, transform_landmarks
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import frame_count, iter_frames, read_audio, write_video
from lmdiff_core.render import PART_COLORS
from lmdiff_core.topology import get_topology

from .conftest import shared_path  # the one way tests reach ../shared

FPS = 25
CLIP = "edtalk_woman_en"  # opens her mouth wide within the first two seconds
SECONDS = 1.92  # 48 frames
CROP = 96
MP = get_topology("mediapipe478")
LIPS = np.concatenate([MP.part_indices("outer_lips"), MP.part_indices("inner_lips")])
EYES = np.concatenate([MP.part_indices("right_eye"), MP.part_indices("left_eye")])
CHIN = (152, 148, 377, 176, 400)  # lowest contour points


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mediapipe_model):
    from lmdiff_core.detectors import load_landmarker

    root = tmp_path_factory.mktemp("l2v")
    src = root / f"{CLIP}.mp4"
    mp4 = shared_path(f"data/clips/{CLIP}.mp4")
    n = frame_count(SECONDS, FPS)
    write_video(src, np.stack(list(iter_frames(mp4, FPS, max_frames=n))), FPS, audio=read_audio(mp4)[: n * 640])
    out = root / "out"
    report = prepare.prepare_dataset(
        [src], out, lambda: load_landmarker("mediapipe", mediapipe_model), crop_size=CROP, min_seconds=1.0
    )
    assert report.done == [CLIP], report.summary()
    crops, matrices = store.load_crops(out, CLIP)
    seq = store.clip_sequence(out, CLIP)
    return {"out": out, "n": n, "crops": crops, "matrices": matrices, "seq": seq, "root": root}


@pytest.fixture(scope="module")
def crop_seq(prepared):
    return l2v.crop_landmarks(prepared["seq"], prepared["matrices"], CROP)


def _at(mask: torch.Tensor, xy: np.ndarray) -> np.ndarray:
    """Values of a [S, S] mask at the pixels holding the points xy [K, 2] (pixel (i, j) covers [j, j+1) x [i, i+1));
    points outside the image are left out."""
    s = mask.shape[-1]
    ij = np.floor(xy).astype(int)
    inside = ((ij >= 0) & (ij < s)).all(axis=1)
    return mask.numpy()[ij[inside, 1], ij[inside, 0]]


def _segments(topology: str, xy: np.ndarray, parts=None) -> np.ndarray:
    """[K, 2, 2] line segments of the topology's part polylines (closed ones closed) for one frame's points xy."""
    topo = get_topology(topology)
    segs = []
    for part, lines in topo.parts.items():
        if parts is not None and part not in parts:
            continue
        for line in lines:
            idx = list(line.indices) + ([line.indices[0]] if line.closed else [])
            segs += [(xy[a], xy[b]) for a, b in zip(idx[:-1], idx[1:])]
    return np.asarray(segs, dtype=np.float64)


def _distance_to_segments(points: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Distance of each point [P, 2] to the nearest segment [K, 2, 2]."""
    a, b = segs[:, 0], segs[:, 1]
    d = b - a
    t = np.einsum("pki,ki->pk", points[:, None] - a[None], d) / np.maximum(np.einsum("ki,ki->k", d, d), 1e-12)
    closest = a[None] + np.clip(t, 0, 1)[..., None] * d[None]
    return np.linalg.norm(points[:, None] - closest, axis=-1).min(axis=1)


# ======================================================================================================================
# crop-space landmarks
# ======================================================================================================================
def test_crop_landmarks_match_the_matrices_and_the_faces_in_the_crops(prepared, crop_seq, mediapipe_model):
    seq, m = prepared["seq"], prepared["matrices"]
    assert crop_seq.space == "image" and crop_seq.frame_size == (CROP, CROP) and len(crop_seq) == prepared["n"]
    # the stored matrices applied by hand to the stored pose and canonical points
    image = apply_transform(seq.pose, seq.points)[..., :2]
    by_hand = np.einsum("tij,tnj->tni", m[:, :, :2], image) + m[:, None, :, 2]
    np.testing.assert_allclose(crop_seq.points[..., :2], by_hand, atol=1e-3)
    # the same as crop.transform_landmarks of the image-space sequence
    from lmdiff_core.canonical import uncanonicalize

    img_seq = uncanonicalize(seq)
    via_track = transform_landmarks(img_seq, CropTrack(m, CROP, img_seq.frame_size))
    np.testing.assert_allclose(crop_seq.points, via_track.points, atol=1e-4)
    np.testing.assert_allclose(l2v.crop_landmarks(img_seq, m, CROP).points, crop_seq.points, atol=1e-4)

    # an independent detection on the stored crops (upscaled 3x: MediaPipe wants more than 96 px) finds the face there
    import mediapipe as mp
    from mediapipe.tasks.python import BaseOptions, vision

    detector = vision.FaceLandmarker.create_from_options(
        vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(mediapipe_model)),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=1,
        )
    )
    try:
        opening = crop_seq.mouth_opening()
        for t in (0, int(np.argmax(opening)), prepared["n"] - 1):
            crop = torch.from_numpy(prepared["crops"][t : t + 1]).float()
            big = torch.nn.functional.interpolate(crop, scale_factor=3, mode="bicubic").clamp(0, 255)
            image = np.ascontiguousarray(big[0].permute(1, 2, 0).round().to(torch.uint8).numpy())
            result = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=image))
            assert result.face_landmarks, f"no face found in crop {t}"
            found = np.array([[p.x * CROP, p.y * CROP] for p in result.face_landmarks[0]])  # back to 96 px
            ours = crop_seq.points[t, :, :2]
            iod = np.linalg.norm(found[33] - found[263])
            assert 20 < iod < 50  # a face at the crop's scale
            for part in (LIPS, EYES):
                assert np.linalg.norm(found[part].mean(0) - ours[part].mean(0)) < 0.1 * iod
            assert np.linalg.norm(found - ours, axis=1).mean() < 0.1 * iod
            # and the mouth landmarks' mean lies inside the mouth mask drawn in the frame and moved into the crop
            track = CropTrack(m, CROP, img_seq.frame_size)
            mouth = face_masks(img_seq, track, [t], parts=("mouth",))["mouth"][0, 0]
            assert _at(mouth, ours[LIPS].mean(0, keepdims=True)).tolist() == [1.0]
    finally:
        detector.close()


# ======================================================================================================================
# pose reference
# ======================================================================================================================
def test_pose_mask_hides_every_mouth_of_the_clip_and_keeps_the_eyes(prepared, crop_seq):
    crops = torch.from_numpy(prepared["crops"]).float() / 255.0
    masked, mask = l2v.pose_reference(crops, crop_seq)
    hard = masks.pose_mask(crop_seq, CROP)
    assert masked.shape == crops.shape and mask.shape == (len(crops), 1, CROP, CROP)
    assert masked.dtype == torch.float32 and mask.dtype == torch.float32
    assert float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert torch.all(mask >= hard)  # feathered outward only
    xy = crop_seq.points[..., :2]
    widest = int(np.argmax(crop_seq.mouth_opening()))
    assert crop_seq.mouth_opening()[widest] > 0.2  # the clip does open the mouth wide
    for t in range(len(crops)):
        m = hard[t, 0]
        assert np.all(_at(m, xy[t, LIPS]) == 1), t  # the target's mouth
        assert np.all(_at(m, xy[widest, LIPS]) == 1), t  # the widest-open mouth of the clip, in the aligned crop
        assert np.all(_at(m, xy[widest, list(CHIN)]) == 1), t  # and its chin (where it stays inside the crop)
        assert np.all(_at(mask[t, 0], xy[t, EYES]) < 1 / 512), t  # the eyes stay visible (< half an 8-bit level)
        assert 0.15 < float(m.mean()) < 0.6
    # outside the mask the pose reference is the target exactly; inside the hard mask it is 0.5 grey
    out = (mask == 0).expand_as(crops)
    assert out.any() and torch.equal(masked[out], crops[out])
    inside = (hard == 1).expand_as(crops)
    assert torch.all(masked[inside] == 0.5)
    # uint8 crops give the same; a hard edge without feathering
    masked_u8, mask_u8 = l2v.pose_reference(torch.from_numpy(prepared["crops"]), crop_seq)
    assert torch.allclose(masked_u8, masked) and torch.equal(mask_u8, mask)
    _, hard_edge = l2v.pose_reference(crops, crop_seq, feather=0)
    assert torch.equal(hard_edge, hard)


def test_pose_mask_does_not_follow_the_jaw(prepared, crop_seq):
    """Opening the jaw of a closed-mouth frame (everything under the lip line moved down by 0.3 eye distances)
    must leave the mask's outline as it was, while crop.face_masks' lower_face (the target's own outline) moves."""
    t = int(np.argmin(crop_seq.mouth_opening()))
    one = crop_seq[t]
    xy = one.points[0, :, :2].astype(np.float64)
    right, left = MP.eye_centers(xy)
    mid, eye = (right + left) / 2, left - right
    down = np.array([-eye[1], eye[0]]) / np.linalg.norm(eye)
    depth = (xy - mid) @ down
    upper, lower = MP.inner_lips
    moved = one.points.copy()
    below = depth > (depth[upper] + depth[lower]) / 2  # the lower lip, the jaw and the chin
    below[[upper, lower]] = False, True
    moved[0, below, :2] += 0.3 * np.linalg.norm(eye) * down
    opened = one.replace(points=moved)
    assert opened.mouth_opening()[0] > one.mouth_opening()[0] + 0.2
    before, after = masks.pose_mask(one, CROP), masks.pose_mask(opened, CROP)
    assert np.all(_at(after[0, 0], moved[0, LIPS, :2]) == 1)  # the opened mouth is hidden too
    iou = float((before * after).sum() / ((before + after) > 0).sum())
    assert iou > 0.995
    own = [face_masks(s, parts=("lower_face",))["lower_face"] for s in (one, opened)]
    assert float((own[0] * own[1]).sum() / ((own[0] + own[1]) > 0).sum()) < 0.95  # the test can tell


def test_pose_mask_at_another_resolution_ibug68_and_invalid_frames(crop_seq):
    small = masks.pose_mask(crop_seq[:4], 48)
    assert small.shape == (4, 1, 48, 48)
    xy = crop_seq.points[:4, :, :2] * 48 / CROP  # the 96 px landmarks serve a 48 px mask
    for t in range(4):
        assert np.all(_at(small[t, 0], xy[t, LIPS]) == 1)
    ibug = crop_seq[:4].to_topology("ibug68")  # the other topology: same region
    ib = get_topology("ibug68")
    lips68 = np.concatenate([ib.part_indices("outer_lips"), ib.part_indices("inner_lips")])
    m68, m478 = masks.pose_mask(ibug, CROP), masks.pose_mask(crop_seq[:4], CROP)
    for t in range(4):
        assert np.all(_at(m68[t, 0], ibug.points[t, lips68, :2]) == 1)
        assert np.all(_at(masks.mouth_weight_mask(ibug[t], CROP)[0, 0], ibug.points[t, lips68, :2]) == 1)
    assert float((m68 * m478).sum() / ((m68 + m478) > 0).sum()) > 0.85
    invalid = crop_seq[:2].replace(valid=np.array([True, False]))
    m = masks.pose_mask(invalid, CROP)
    assert m[0].sum() > 0 and m[1].sum() == 0


# ======================================================================================================================
# condition
# ======================================================================================================================
_COLOURS = {part: np.array(c, dtype=np.float64) / 255.0 for part, c in PART_COLORS.items()}


def _classify(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pixel centres [P, 2], part name [P]) of the lit pixels of one [3, S, S] image with a clear colour."""
    rgb = img.transpose(1, 2, 0).astype(np.float64)
    peak = rgb.max(axis=2)
    rows, cols = np.nonzero(peak > 0.35)
    norm = rgb[rows, cols] / peak[rows, cols, None]
    names = list(_COLOURS)
    dist = np.stack([np.abs(norm - _COLOURS[p] / _COLOURS[p].max()).max(axis=1) for p in names], axis=1)
    best = dist.argmin(axis=1)
    return np.stack([cols + 0.5, rows + 0.5], axis=1), np.array(names)[best]


@pytest.mark.parametrize("topology", ["mediapipe478", "ibug68"])
def test_render_condition_draws_each_part_on_its_landmarks(crop_seq, topology):
    seq = crop_seq[::12].to_topology(topology)
    for size in (CROP, 64):
        cond = l2v.render_condition(seq, size)
        assert cond.shape == (len(seq), 3, size, size) and cond.dtype == torch.float32
        assert float(cond.min()) >= 0 and float(cond.max()) <= 1
        reach = max(1.0, size / 128) / 2 + 1.0  # half the documented line width, antialiasing, rounding
        for t in range(len(seq)):
            img = cond[t].numpy()
            xy = seq.points[t, :, :2].astype(np.float64) * size / CROP
            # nothing lit far from every part polyline
            lit = np.argwhere(img.max(axis=0) > 0)[:, ::-1] + 0.5
            assert len(lit) > 0
            assert _distance_to_segments(lit, _segments(topology, xy)).max() <= reach
            # every clearly coloured pixel lies on a polyline of the part of its colour
            centres, parts = _classify(img)
            for part in ("outer_lips", "inner_lips", "right_eye", "left_eye", "right_brow", "nose", "contour"):
                here = centres[parts == part]
                assert len(here) > 0, (topology, part)
                assert _distance_to_segments(here, _segments(topology, xy, [part])).max() <= reach, part
            # lip pixels at the lip landmarks: every outer-lip point has a lip-coloured pixel within 1.5 px
            lips = centres[np.isin(parts, ["outer_lips", "inner_lips"])]
            outer = xy[get_topology(topology).part_indices("outer_lips")]
            gaps = np.linalg.norm(outer[:, None] - lips[None], axis=-1).min(axis=1)
            assert gaps.max() <= 1.5
    with pytest.raises(LmdiffInputError, match="size"):
        l2v.render_condition(crop_seq[:1], 4)


def test_mouth_weight_mask(crop_seq):
    m = masks.mouth_weight_mask(crop_seq, CROP)
    assert m.shape == (len(crop_seq), 1, CROP, CROP) and set(torch.unique(m).tolist()) <= {0.0, 1.0}
    hard = masks.pose_mask(crop_seq, CROP)
    for t in range(0, len(crop_seq), 7):
        xy = crop_seq.points[t, :, :2]
        assert np.all(_at(m[t, 0], xy[LIPS]) == 1) and np.all(_at(m[t, 0], xy[EYES]) == 0)
        assert np.all(_at(m[t, 0], xy[list(CHIN)]) == 0)
        assert torch.all(hard[t] >= m[t])  # the mouth is inside the region the model generates
        assert 0.01 < float(m[t].mean()) < 0.12


# ======================================================================================================================
# dataset
# ======================================================================================================================
def test_dataset_items(prepared, crop_seq):
    out, n = prepared["out"], prepared["n"]
    data = L2VFrameDataset(out, split="all", window=3, identity_gap=8, seed=1)
    assert len(data) == n - 2 and data.items[:2] == [(CLIP, 0), (CLIP, 1)]  # stride 1 = max(1, 3 // 2)
    for i in (0, 17, len(data) - 1):
        item = data[i]
        start = item["start"]
        assert item["clip"] == CLIP and start == data.items[i][1]
        for key, channels in (("target", 3), ("condition", 3), ("pose_reference", 3), ("pose_mask", 1)):
            assert item[key].shape == (3, channels, CROP, CROP) and item[key].dtype == torch.float32, key
        assert item["mouth_mask"].shape == (3, 1, CROP, CROP) and item["identity"].shape == (3, CROP, CROP)
        want = torch.from_numpy(prepared["crops"][start : start + 3]).float() / 255.0
        assert torch.equal(item["target"], want)
        window_seq = crop_seq[start : start + 3]
        assert torch.equal(item["condition"], l2v.render_condition(window_seq, CROP))
        masked, mask = l2v.pose_reference(want, window_seq)
        assert torch.equal(item["pose_reference"], masked) and torch.equal(item["pose_mask"], mask)
        assert torch.equal(item["mouth_mask"], masks.mouth_weight_mask(window_seq, CROP))
        ident = item["identity_frame"]
        assert min(abs(ident - f) for f in range(start, start + 3)) >= 8
        assert torch.equal(item["identity"], torch.from_numpy(prepared["crops"][ident]).float() / 255.0)

    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)))
    assert batch["target"].shape == (2, 3, 3, CROP, CROP) and batch["identity"].shape == (2, 3, CROP, CROP)
    assert batch["clip"] == [CLIP, CLIP] and batch["start"].tolist() == [0, 1]

    # window 1 (the default) at a smaller training size: resized crops, landmarks scaled with them
    small = L2VFrameDataset(out, split="all", identity_gap=8, size=48)
    assert len(small) == n
    item = small[5]
    assert item["target"].shape == (1, 3, 48, 48) and item["identity"].shape == (3, 48, 48)
    full = torch.from_numpy(prepared["crops"][5:6]).float() / 255.0
    want = torch.nn.functional.interpolate(full, size=(48, 48), mode="bilinear", antialias=True)
    assert torch.allclose(item["target"], want, atol=1e-6)
    assert torch.equal(item["mouth_mask"], masks.mouth_weight_mask(crop_seq[5], 48))
    assert np.all(_at(item["pose_mask"][0, 0], crop_seq.points[5, LIPS, :2] * 0.5) == 1)


def test_dataset_identity_frames_are_seeded_per_epoch(prepared):
    out, n = prepared["out"], prepared["n"]
    gap = 10
    a = L2VFrameDataset(out, split="all", identity_gap=gap, seed=3)
    b = L2VFrameDataset(out, split="all", identity_gap=gap, seed=3)
    first = [a.identity_frame(i) for i in range(len(a))]
    assert first == [b.identity_frame(i) for i in range(len(b))]
    for i, f in enumerate(first):
        start = a.items[i][1]
        assert 0 <= f < n and abs(f - start) >= gap
    assert len(set(first)) > 5
    a.set_epoch(1)
    second = [a.identity_frame(i) for i in range(len(a))]
    assert sum(x != y for x, y in zip(first, second)) > len(a) // 2
    assert all(abs(f - a.items[i][1]) >= gap for i, f in enumerate(second))
    a.set_epoch(0)
    assert [a.identity_frame(i) for i in range(len(a))] == first
    other = L2VFrameDataset(out, split="all", identity_gap=gap, seed=4)
    assert [other.identity_frame(i) for i in range(len(other))] != first
    assert a[7]["identity_frame"] == first[7]


def test_dataset_frame_ranges(prepared):
    out, n = prepared["out"], prepared["n"]
    cut = int(round(0.7 * n))
    train = L2VFrameDataset(out, split="all", clips=[CLIP], frames=(0.0, 0.7), window=2, identity_gap=4)
    test = L2VFrameDataset(out, split="all", clips=[CLIP], frames=(0.7, 1.0), window=2, identity_gap=4)
    assert train.ranges == [(0, cut)] and test.ranges == [(cut, n)]
    for data, lo, hi in ((train, 0, cut), (test, cut, n)):
        starts = [s for _, s in data.items]
        assert starts == list(range(lo, hi - 1))  # every window inside the range, stride 1
        for epoch in (0, 1):
            data.set_epoch(epoch)
            for i, s in enumerate(starts):
                f = data.identity_frame(i)
                assert lo <= f < hi and min(abs(f - s), abs(f - s - 1)) >= 4
    ints = L2VFrameDataset(out, split="all", frames=(10, 30), window=4, identity_gap=5, stride=4)
    assert ints.ranges == [(10, 30)] and [s for _, s in ints.items] == [10, 14, 18, 22, 26]
    assert all(10 <= ints.identity_frame(i) < 30 for i in range(len(ints)))
    item = ints[1]
    assert item["start"] == 14 and torch.equal(
        item["target"], torch.from_numpy(prepared["crops"][14:18]).float() / 255.0
    )
    # a stop past the end is the clip's end
    assert L2VFrameDataset(out, split="all", frames=(40, 1000), identity_gap=2).ranges == [(40, n)]
    # a short range leaves out the windows that have no identity frame far enough
    tight = L2VFrameDataset(out, split="all", frames=(0, 12), identity_gap=6)
    assert [s for _, s in tight.items] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    tighter = L2VFrameDataset(out, split="all", frames=(0, 10), identity_gap=6)
    assert [s for _, s in tighter.items] == [0, 1, 2, 3, 6, 7, 8, 9]


def _without_crops(prepared, folder: Path) -> Path:
    shutil.copytree(prepared["out"], folder, ignore=shutil.ignore_patterns("*.crops.safetensors", ".prepare.lock"))
    for path in [folder / "index.json", folder / "clips" / f"{CLIP}.json"]:
        data = json.loads(path.read_text())
        if "crop_size" in data:
            data["crop_size"] = 0
        for entry in data.get("clips", [data]):
            entry["files"]["crops"] = None
        path.write_text(json.dumps(data))
    return folder


def test_bad_inputs(prepared, crop_seq, tmp_path):
    out, n = prepared["out"], prepared["n"]
    no_crops = _without_crops(prepared, tmp_path / "no_crops")
    with pytest.raises(LmdiffInputError, match="without crops"):
        L2VFrameDataset(no_crops, split="all")
    with pytest.raises(LmdiffInputError, match="has no clip 'nobody'.*edtalk_woman_en"):
        L2VFrameDataset(out, split="all", clips=["nobody"])
    split = store.load_index(out)["clips"][0]["split"]
    other = "val" if split == "train" else "train"
    with pytest.raises(LmdiffInputError, match=f"is in split '{split}', not '{other}'"):
        L2VFrameDataset(out, split=other, clips=[CLIP])
    with pytest.raises(LmdiffInputError, match="shorter than the window of 8"):
        L2VFrameDataset(out, split="all", clips=[CLIP], frames=(0, 5), window=8)
    with pytest.warns(UserWarning, match="left out"), pytest.raises(LmdiffInputError, match="no window of 60"):
        L2VFrameDataset(out, split="all", window=n + 12)
    with pytest.raises(LmdiffInputError, match="identity_gap"):
        L2VFrameDataset(out, split="all", clips=[CLIP], identity_gap=n)
    for frames in ((5, 2), (0.5, 1.5), (-1, 4), (n, n + 5), "all"):
        with pytest.raises(LmdiffInputError, match="frames"):
            L2VFrameDataset(out, split="all", frames=frames)
    for kwargs in ({"window": 0}, {"identity_gap": -1}, {"size": 4}, {"split": "test"}, {"stride": 0}):
        with pytest.raises(LmdiffInputError):
            L2VFrameDataset(out, **kwargs)
    with pytest.raises(LmdiffInputError, match="does not exist"):
        L2VFrameDataset(tmp_path / "nowhere")
    with pytest.raises(LmdiffInputError, match="crops must be"):
        l2v.pose_reference(torch.zeros(2, 3, 8, 9), crop_seq[:2])
    with pytest.raises(LmdiffInputError, match="2 crops for 3 landmark frames"):
        l2v.pose_reference(torch.zeros(2, 3, 96, 96), crop_seq[:3])
    with pytest.raises(LmdiffInputError, match="matrices"):
        l2v.crop_landmarks(prepared["seq"], prepared["matrices"][:3], CROP)
    with pytest.raises(LmdiffInputError, match="crop-space"):
        masks.mouth_weight_mask(prepared["seq"], CROP)
