"""Tests for lmdiff_core.data (prepare, store) and the dataset statistics on short clips cut from the real talking clips, with real MediaPipe landmarks.

Expected values come from independent computations: frame counts from `media.frame_count` of the probed duration,
features recomputed from the audio, window counts from the clip lengths, landmarks compared with a separate MediaPipe
detection (IMAGE mode) on the source frames and on the stored crops, the split from SHA-1 directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from lmdiff_core import motion, smoothing
from lmdiff_core.data import a2l_dataset, prepare, store
from lmdiff_core.audio_features import LogMelFeatures
from lmdiff_core.canonical import CANONICAL_EYE_MID, CANONICAL_INTER_OCULAR, apply_transform, to_model_units
from lmdiff_core.detectors import load_landmarker
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.media import fit_audio_to_frames, frame_count, iter_frames, probe_video, read_audio, write_video
from lmdiff_core.topology import convert_points, get_topology

from .conftest import shared_path  # the one way tests reach ../shared

FPS = 25
GOOD = {  # clip id (the stem of a file given as a source) -> seconds kept
    "edtalk_woman_en": 3.2,
    "macron_fr": 3.6,
    "pcavs_00002": 3.0,
}
BAD = {  # clip id -> reason expected in report.json
    "mead_silent": "no_audio",
    "not_a_video": "unreadable",
    "short": "too_short",
    "noise": "no_face",
}
MP = get_topology("mediapipe478")


# ----------------------------------------------------------------------------------------------------------------------
# inputs: short clips cut from the real ones
# ----------------------------------------------------------------------------------------------------------------------
def _cut(source: Path, target: Path, seconds: float, audio: np.ndarray | None) -> None:
    n = frame_count(seconds, FPS)
    frames = np.stack(list(iter_frames(source, FPS, max_frames=n)))
    write_video(target, frames, FPS, audio=None if audio is None else audio[: round(seconds * 16000)])


def _make_sources(folder: Path) -> Path:
    src = folder / "src"
    src.mkdir()
    clips = shared_path("data/clips")
    av = shared_path("data/clips_more/av")
    silent = shared_path("data/clips_more/video_only/dreamtalk_mead_W009_front_neutral_level1_001.mp4")
    for name in ("edtalk_woman_en", "macron_fr"):
        mp4 = clips / f"{name}.mp4"
        _cut(mp4, src / f"{name}.mp4", GOOD[name], read_audio(mp4))
    # clips_more/av: the mp4 is silent, its speech is the .wav beside it -> kept that way (audio="auto" finds it)
    _cut(av / "pcavs_00002.mp4", src / "pcavs_00002.mp4", GOOD["pcavs_00002"], None)
    speech, rate = soundfile.read(av / "pcavs_00002.wav", dtype="float32")
    soundfile.write(src / "pcavs_00002.wav", speech[: round(GOOD["pcavs_00002"] * rate)], rate)
    _cut(silent, src / "mead_silent.mp4", 2.4, None)
    (src / "not_a_video.mp4").write_text("this is a text file, not a video\n")
    _cut(clips / "macron_fr.mp4", src / "short.mp4", 1.0, read_audio(clips / "macron_fr.mp4"))
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(60, 128, 128, 3), dtype=np.uint8)
    write_video(src / "noise.mp4", noise, FPS, audio=0.1 * np.sin(np.arange(60 * 640) / 7.0).astype(np.float32))
    return src


def _sources(src: Path, ids) -> list[Path]:
    return [src / f"{c}.mp4" for c in ids]


class CountingFactory:
    """landmarker_factory that counts the landmarkers it makes (one per clip that reaches detection)."""

    def __init__(self, model: Path, interrupt_at: int | None = None):
        self.model = model
        self.calls = 0
        self.interrupt_at = interrupt_at

    def __call__(self):
        self.calls += 1
        lm = load_landmarker("mediapipe", self.model)
        if self.interrupt_at is None:
            return lm
        return _Interrupting(lm, self.interrupt_at)


class _Interrupting:
    """A landmarker that raises KeyboardInterrupt on its Nth frame (as Ctrl-C would)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.seen = inner, n, 0
        self.topology = inner.topology

    def detect(self, frame, timestamp_ms=None):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt
        return self.inner.detect(frame, timestamp_ms)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mediapipe_model):
    root = tmp_path_factory.mktemp("dataset")
    src = _make_sources(root)
    factory = CountingFactory(mediapipe_model)
    out = root / "out"
    sources = _sources(src, [*GOOD, *BAD])
    report = prepare.prepare_dataset(sources, out, factory, crop_size=256, val_fraction=0.1, min_seconds=2.0)
    return {"root": root, "src": src, "sources": sources, "out": out, "report": report, "factory": factory}


def _mp_image_detector(model: Path):
    from mediapipe.tasks.python import BaseOptions, vision

    return vision.FaceLandmarker.create_from_options(
        vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model)),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=1,
            output_face_blendshapes=True,
        )
    )


def _mp_detect(detector, image: np.ndarray):
    import mediapipe as mp

    result = detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
    if not result.face_landmarks:
        return None, result
    h, w = image.shape[:2]
    return np.array([[p.x * w, p.y * h] for p in result.face_landmarks[0]]), result


def _files_of(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "clips").iterdir())}


# ----------------------------------------------------------------------------------------------------------------------
# prepare: report, index, arrays
# ----------------------------------------------------------------------------------------------------------------------
def test_report_lists_exactly_the_bad_clips(prepared):
    report = prepared["report"]
    assert sorted(report.done) == sorted(GOOD)
    assert report.skipped_existing == []
    assert {f.clip_id: f.reason for f in report.failed} == BAD
    on_disk = json.loads((prepared["out"] / "report.json").read_text())
    assert {f["clip_id"]: f["reason"] for f in on_disk["failed"]} == BAD
    assert all(f["message"] for f in on_disk["failed"])
    # the landmarker is only made for clips that pass the cheap checks: the good ones and the faceless one
    assert prepared["factory"].calls == len(GOOD) + 1
    assert report.interrupted is False


def test_index_entries(prepared):
    out, src = prepared["out"], prepared["src"]
    index = store.load_index(out)
    assert index["fps"] == FPS and index["topology"] == "mediapipe478" and index["crop_size"] == 256
    assert index["features"] == LogMelFeatures().config()
    assert index["blendshape_names"] == list(store.BLENDSHAPE_NAMES)
    entries = {e["id"]: e for e in index["clips"]}
    assert sorted(entries) == sorted(GOOD)
    for cid, e in entries.items():
        video = src / f"{cid}.mp4"
        assert e["source"] == str(video.resolve())
        assert e["n_frames"] == frame_count(probe_video(video).duration, FPS) == frame_count(GOOD[cid], FPS)
        assert e["speaker"] == video.stem
        assert e["split"] in ("train", "val")
        # the fraction of frames with a detected face (pcavs_00002 loses it for 8 frames, filled in)
        interpolated = store.clip_arrays(out, cid)["interpolated"]
        assert e["face_rate"] == pytest.approx(1.0 - interpolated.mean(), abs=1e-5) and e["face_rate"] > 0.8
        assert (out / e["files"]["a2l"]).is_file() and (out / e["files"]["crops"]).is_file()
        assert (out / "clips" / f"{cid}.json").is_file()
    assert entries["pcavs_00002"]["audio_source"] == str((src / "pcavs_00002.wav").resolve())
    assert entries["macron_fr"]["audio_source"] == entries["macron_fr"]["source"]
    assert not list((out / "clips").glob(".*"))  # no temporary files left


def test_a2l_arrays(prepared, mediapipe_model):
    out = prepared["out"]
    from safetensors.numpy import load_file

    detector = _mp_image_detector(mediapipe_model)
    extractor = LogMelFeatures()
    for cid in GOOD:
        entry = next(e for e in store.load_index(out)["clips"] if e["id"] == cid)
        t = entry["n_frames"]
        stored = load_file(str(out / entry["files"]["a2l"]))
        assert "crops" not in stored  # A2L never loads the crops
        assert stored["points"].shape == (t, 478, 3) and stored["points"].dtype == np.float32
        assert stored["pose"].shape == (t, 4, 4)
        assert stored["blendshapes"].shape == (t, 52)
        assert stored["valid"].dtype == bool and stored["valid"].all()
        assert stored["interpolated"].shape == (t,)
        # features: recomputed independently from the clip's audio, fitted to the frames
        assert stored["features"].shape == (t, 4, 1, 80) and stored["features"].dtype == np.float32
        speech = fit_audio_to_frames(read_audio(entry["audio_source"]), t, FPS)
        np.testing.assert_allclose(stored["features"], extractor(speech, t), atol=1e-4)
        assert stored["audio"].shape == (len(speech),)
        # canonical: the outer eye corners sit where the canonical frame puts them
        pts = stored["points"].astype(np.float64)
        iod = np.linalg.norm(pts[:, 33, :2] - pts[:, 263, :2], axis=1)
        assert abs(np.median(iod) - CANONICAL_INTER_OCULAR) < 0.1 * CANONICAL_INTER_OCULAR
        mid = (pts[:, 33, :2] + pts[:, 263, :2]) / 2
        assert np.linalg.norm(np.median(mid, axis=0) - CANONICAL_EYE_MID) < 10
        # pose puts them back on the face: compare with an independent detection on the source frame
        k = t // 2
        frame = list(iter_frames(entry["source"], FPS, max_frames=k + 1))[k]
        ref, _ = _mp_detect(detector, frame)
        assert ref is not None
        image_pts = apply_transform(stored["pose"][k : k + 1].astype(np.float64), pts[k : k + 1])[0, :, :2]
        ref_iod = np.linalg.norm(ref[33] - ref[263])
        error = np.linalg.norm(image_pts - ref, axis=1) / ref_iod
        # (detectors disagree most on the face outline of the small 224 px clip; the rigid points agree closely)
        assert error[list(MP.stable)].mean() < 0.06 and error.mean() < 0.12, (cid, error.mean())
    detector.close()


def test_crops_show_the_face(prepared, mediapipe_model):
    out = prepared["out"]
    detector = _mp_image_detector(mediapipe_model)
    from safetensors.numpy import load_file

    for cid in GOOD:
        arrays = store.clip_arrays(out, cid, crops=True)
        crops, matrices = arrays["crops"], arrays["crop_matrices"]
        t = arrays["entry"]["n_frames"]
        assert crops.shape == (t, 3, 256, 256) and crops.dtype == np.uint8
        assert matrices.shape == (t, 2, 3)
        # the streamed file is an ordinary safetensors file
        whole = load_file(str(out / arrays["entry"]["files"]["crops"]))
        np.testing.assert_array_equal(whole["crops"], crops)
        part, part_m = store.load_crops(out, cid, 10, 20)
        np.testing.assert_array_equal(part, crops[10:20])
        np.testing.assert_array_equal(part_m, matrices[10:20])
        for k in (0, t - 1):
            crop = crops[k].transpose(1, 2, 0)
            found, _ = _mp_detect(detector, crop)
            assert found is not None, f"no face in crop {k} of {cid}"
            image_pts = apply_transform(arrays["pose"][k : k + 1].astype(np.float64), arrays["points"][k : k + 1])[0]
            expected = image_pts[:, :2] @ matrices[k][:, :2].T + matrices[k][:, 2]
            iod = np.linalg.norm(found[33] - found[263])
            assert 40 < iod < 140  # a face, at the crop's scale
            assert np.linalg.norm(found - expected, axis=1).mean() < 0.1 * iod, cid
    detector.close()


def test_blendshape_names_match_mediapipe(prepared, mediapipe_model):
    detector = _mp_image_detector(mediapipe_model)
    frame = next(iter(iter_frames(prepared["src"] / "macron_fr.mp4", FPS, max_frames=1)))
    _, result = _mp_detect(detector, frame)
    detector.close()
    names = tuple(c.category_name for c in result.face_blendshapes[0])
    assert names == store.BLENDSHAPE_NAMES
    assert names[motion.EYE_BLINK_LEFT] == "eyeBlinkLeft" and names[motion.EYE_BLINK_RIGHT] == "eyeBlinkRight"
    assert (motion.EYE_BLINK_LEFT, motion.EYE_BLINK_RIGHT) == (9, 10)


# ----------------------------------------------------------------------------------------------------------------------
# resume and interruption
# ----------------------------------------------------------------------------------------------------------------------
def test_rerun_skips_everything(prepared, mediapipe_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    before = _files_of(out)
    factory = CountingFactory(mediapipe_model)
    report = prepare.prepare_dataset(prepared["sources"], out, factory)
    assert sorted(report.skipped_existing) == sorted(GOOD) and report.done == []
    assert factory.calls == 1  # only the faceless clip is tried again (failures are not remembered)
    assert _files_of(out) == before


def test_resume_after_deletion_and_interruption(prepared, mediapipe_model, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    sources = _sources(prepared["src"], GOOD)
    victim = "macron_fr"
    rest = sorted(c for c in GOOD if c != victim)
    for path in (out / "clips").glob(f"{victim}.*"):
        path.unlink()
    others = _files_of(out)

    # 1. interrupted while detecting landmarks (KeyboardInterrupt on the 20th frame)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(sources, out, CountingFactory(mediapipe_model, interrupt_at=20))
    assert _files_of(out) == others  # nothing partial, the others untouched
    assert sorted(e["id"] for e in store.load_index(out)["clips"]) == rest
    assert json.loads((out / "report.json").read_text())["interrupted"] is True

    # 2. interrupted while writing the crops (second batch of the streamed crop file)
    import lmdiff_core.crop as crop_module

    real = crop_module.crop_frames
    batches = {"n": 0}

    def interrupting_crop_frames(*args, **kwargs):
        batches["n"] += 1
        if batches["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(crop_module, "crop_frames", interrupting_crop_frames)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(sources, out, CountingFactory(mediapipe_model))
    monkeypatch.setattr(crop_module, "crop_frames", real)
    assert batches["n"] == 2
    assert _files_of(out) == others
    assert sorted(e["id"] for e in store.load_index(out)["clips"]) == rest

    # 3. the rerun computes only the missing clip
    factory = CountingFactory(mediapipe_model)
    report = prepare.prepare_dataset(sources, out, factory)
    assert report.done == [victim] and sorted(report.skipped_existing) == rest
    assert factory.calls == 1
    after = _files_of(out)
    assert {k: v for k, v in after.items() if not k.startswith(victim + ".")} == others  # mtimes unchanged
    assert sorted(e["id"] for e in store.load_index(out)["clips"]) == sorted(GOOD)
    # the recomputed clip equals the one computed the first time (a deterministic pipeline)
    again, original = store.clip_arrays(out, victim), store.clip_arrays(prepared["out"], victim)
    np.testing.assert_allclose(again["points"], original["points"], atol=1e-3)
    np.testing.assert_array_equal(again["features"], original["features"])


def test_changed_settings_are_refused(prepared, mediapipe_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    with pytest.raises(LmdiffInputError, match="crop_size"):
        prepare.prepare_dataset([prepared["src"]], out, CountingFactory(mediapipe_model), crop_size=128)
    with pytest.raises(LmdiffInputError, match="features"):
        prepare.prepare_dataset(
            [prepared["src"]], out, CountingFactory(mediapipe_model), features={"kind": "logmel", "n_mels": 40}
        )


# ----------------------------------------------------------------------------------------------------------------------
# split
# ----------------------------------------------------------------------------------------------------------------------
def _sha1_split(clip_id: str, fraction: float) -> str:
    h = int(hashlib.sha1(clip_id.encode()).hexdigest()[:16], 16) / 2**64
    return "val" if h < fraction else "train"


def test_split_is_deterministic(prepared, mediapipe_model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared["out"], out)
    sources = _sources(prepared["src"], GOOD)

    def splits(folder=out):
        return {e["id"]: e["split"] for e in store.load_index(folder)["clips"]}

    # other orders of the sources (and another fraction): everything is skipped, the split follows SHA-1 of the id
    for order in (sources, sources[::-1], [sources[1], sources[2], sources[0]]):
        report = prepare.prepare_dataset(order, out, CountingFactory(mediapipe_model), val_fraction=0.5)
        assert sorted(report.skipped_existing) == sorted(GOOD)
        assert splits() == {c: _sha1_split(c, 0.5) for c in GOOD}
    forward = splits()

    # a clip removed: a dataset of only two of the clips (resumed from their sidecars alone, no index.json)
    fewer = tmp_path / "fewer"
    (fewer / "clips").mkdir(parents=True)
    kept = ["edtalk_woman_en", "pcavs_00002"]
    for cid in kept:
        for path in (out / "clips").glob(f"{cid}.*"):
            shutil.copy2(path, fewer / "clips" / path.name)
    report = prepare.prepare_dataset(
        _sources(prepared["src"], kept[::-1]), fewer, CountingFactory(mediapipe_model), val_fraction=0.5
    )
    assert sorted(report.skipped_existing) == kept
    assert splits(fewer) == {c: forward[c] for c in kept}

    # val_clips override: by id, or by the source's path or stem
    prepare.prepare_dataset(sources, out, CountingFactory(mediapipe_model), val_fraction=0.0, val_clips=["macron_fr"])
    assert splits() == {c: "val" if c == "macron_fr" else "train" for c in GOOD}
    report = prepare.prepare_dataset(
        sources, out, CountingFactory(mediapipe_model), val_fraction=0.0, val_clips=[str(sources[2]), "nope"]
    )
    assert splits() == {c: "val" if c == "pcavs_00002" else "train" for c in GOOD}
    assert report.unmatched_val_clips == ["nope"]


def test_split_function_ignores_other_clips():
    ids = [f"speaker{i}/clip{j}" for i in range(50) for j in range(4)]
    first = {c: prepare.assign_split(c, 0.2) for c in ids}
    assert first == {c: _sha1_split(c, 0.2) for c in ids}
    assert 0.1 < np.mean([s == "val" for s in first.values()]) < 0.3
    assert prepare.assign_split(ids[0], 0.0, val_clips=[ids[0]]) == "val"
    assert prepare.assign_split(ids[0], 1.0) == "val" and prepare.assign_split(ids[0], 0.0) == "train"


def test_clip_ids_are_stable_and_unique(tmp_path):
    for folder in ("a/x", "b/x"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "talk.mp4").write_bytes(b"")
        (tmp_path / folder / "talk.mov").write_bytes(b"")
    (tmp_path / "a" / "odd name (1).mkv").write_bytes(b"")
    found = prepare.find_videos([tmp_path / "a", tmp_path / "b"])
    ids = [c.clip_id for c in found]
    assert len(set(ids)) == len(ids) == 5
    assert "a__odd_name_1" in ids and "a__x__talk_mp4" in ids and "b__x__talk_mov" in ids
    assert [c.clip_id for c in prepare.find_videos([tmp_path / "b", tmp_path / "a"])] == ids[3:] + ids[:3]
    assert [c.clip_id for c in prepare.find_videos([tmp_path / "a" / "x" / "talk.mp4"])] == ["talk"]
    with pytest.raises(LmdiffInputError, match="does not exist"):
        prepare.find_videos([tmp_path / "missing"])


# ----------------------------------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------------------------------
def test_load_index_errors(tmp_path):
    with pytest.raises(LmdiffInputError, match="does not exist"):
        store.load_index(tmp_path / "nothing")
    with pytest.raises(LmdiffInputError, match="no index.json"):
        store.load_index(tmp_path)
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(LmdiffInputError, match="not valid JSON"):
        store.load_index(tmp_path)
    (tmp_path / "index.json").write_text('{"clips": []}')
    with pytest.raises(LmdiffInputError, match="not an lmdiff dataset"):
        store.load_index(tmp_path)
    with pytest.raises(LmdiffInputError, match="is a file"):
        store.load_index(tmp_path / "index.json")


def test_window_dataset(prepared):
    out = prepared["out"]
    window, prev, stride = 32, 8, 16
    data = a2l_dataset.A2LWindowDataset(out, split="all", window=window, prev_frames=prev, topology="ibug68")
    lengths = {e["id"]: e["n_frames"] for e in store.load_index(out)["clips"]}
    expected = sum((t - window) // stride + 1 for t in lengths.values())
    assert len(data) == expected == len(data.windows)
    stored = {c: store.clip_arrays(out, c) for c in lengths}
    for i in (0, 1, len(data) - 1):
        s = data[i]
        cid, start = s["clip_id"], s["start"]
        pts = stored[cid]["points"]
        want = to_model_units(convert_points(pts[start : start + window], "mediapipe478", "ibug68"))
        np.testing.assert_allclose(s["landmarks"].numpy(), want, atol=1e-6)
        assert s["landmarks"].shape == (window, 68, 3)
        np.testing.assert_array_equal(s["audio"].numpy(), stored[cid]["features"][start : start + window])
        idx = np.arange(start - prev, start)
        want_prev = to_model_units(convert_points(pts[np.maximum(idx, 0)], "mediapipe478", "ibug68"))
        np.testing.assert_allclose(s["prev"].numpy(), want_prev, atol=1e-6)
        np.testing.assert_array_equal(s["prev_mask"].numpy(), idx >= 0)
        first = int(np.flatnonzero(~stored[cid]["interpolated"])[0])
        want_ref = to_model_units(convert_points(pts[first], "mediapipe478", "ibug68"))
        np.testing.assert_allclose(s["reference"].numpy(), want_ref, atol=1e-6)
    assert data[0]["start"] == 0 and not data[0]["prev_mask"].any()
    assert data[1]["start"] == stride and data[1]["prev_mask"].all()

    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=2, shuffle=False)))
    assert batch["audio"].shape == (2, window, 4, 1, 80) and batch["audio"].dtype == torch.float32
    assert batch["landmarks"].shape == (2, window, 68, 3) and batch["prev"].shape == (2, prev, 68, 3)
    assert batch["reference"].shape == (2, 68, 3) and batch["prev_mask"].dtype == torch.bool
    assert len(batch["clip_id"]) == 2 and batch["start"].tolist() == [0, stride]

    # random references: deterministic per index, from the same clip, outside the window
    rand = a2l_dataset.A2LWindowDataset(out, split="all", window=window, reference="random", seed=3, topology=None)
    again = a2l_dataset.A2LWindowDataset(out, split="all", window=window, reference="random", seed=3, topology=None)
    refs = []
    for i in range(len(rand)):
        a, b = rand[i], again[i]
        np.testing.assert_array_equal(a["reference"].numpy(), b["reference"].numpy())
        units = to_model_units(stored[a["clip_id"]]["points"])
        hit = np.flatnonzero(np.all(np.abs(units - a["reference"].numpy()) < 1e-6, axis=(1, 2)))
        assert len(hit) and not (a["start"] <= hit[0] < a["start"] + window)
        refs.append(hit[0])
    assert len(set(refs)) > 1
    assert rand[0]["landmarks"].shape == (window, 478, 3)


def test_window_dataset_never_reads_crops(prepared, tmp_path):
    out = tmp_path / "no_crops"
    shutil.copytree(prepared["out"], out, ignore=shutil.ignore_patterns("*.crops.safetensors"))
    data = a2l_dataset.A2LWindowDataset(out, split="all", window=32)
    assert len(data) > 0 and data[len(data) - 1]["audio"].shape == (32, 4, 1, 80)


def test_window_dataset_skips_short_clips(prepared):
    out = prepared["out"]
    lengths = {e["id"]: e["n_frames"] for e in store.load_index(out)["clips"]}
    window = sorted(lengths.values())[1]  # the shortest clip is shorter than this window
    with pytest.warns(UserWarning, match="shorter than the window"):
        data = a2l_dataset.A2LWindowDataset(out, split="all", window=window)
    assert [c for c, _ in data.skipped] == [min(lengths, key=lengths.get)]
    assert len(data) == sum((t - window) // (window // 2) + 1 for t in lengths.values() if t >= window)
    with pytest.raises(LmdiffInputError, match="no window"):
        with pytest.warns(UserWarning):
            a2l_dataset.A2LWindowDataset(out, split="all", window=max(lengths.values()) + 1)


def test_clip_sequence_and_motion_stats(prepared):
    out = prepared["out"]
    seq = store.clip_sequence(out, "macron_fr")
    assert seq.space == "canonical" and seq.topology == "mediapipe478" and len(seq) == 90
    assert seq.image_size == (512, 512) and seq.blendshapes.shape == (90, 52)
    stats = motion.dataset_motion_stats(out, split="all")
    assert sorted(stats["clips"]) == sorted(GOOD)
    assert stats["blendshape_indices"] == {"eyeBlinkLeft": 9, "eyeBlinkRight": 10}
    summary = stats["summary"]
    for key in ("yaw_std", "pitch_std", "roll_std", "time_scale", "shift_std", "yaw_velocity", "blinks_per_minute"):
        assert np.isfinite(summary[key]), key
    assert 0 < summary["yaw_std"] < 30 and 0 < summary["roll_std"] < 30
    assert 0 < summary["time_scale"] <= 3.6 and 0 < summary["shift_std"] < 1
    assert summary["seconds"] == pytest.approx(sum(GOOD.values()))
    for clip in stats["clips"].values():
        assert clip["blinks"] >= 0 and all(0 < d <= 1.0 for d in clip["blink_durations"])
        if clip["blink_seconds"] is not None:
            assert np.isfinite(clip["blink_seconds"])
    assert sum(c["blinks"] for c in stats["clips"].values()) >= 1  # these 10 s hold at least one blink


def test_blink_runs():
    fps = 25.0
    closure = np.full(200, 0.1)
    closure[10:13] = 0.7  # a blink of 3 frames
    closure[40:42] = 0.6  # one blink flickering across the threshold: 2 + 2 frames, one frame apart
    closure[42] = 0.45
    closure[43:45] = 0.6
    closure[100:160] = 0.8  # 2.4 s closed: not a blink
    shapes = np.zeros((200, 52), np.float32)
    shapes[:, motion.EYE_BLINK_LEFT] = closure
    shapes[:, motion.EYE_BLINK_RIGHT] = closure
    blinks, long_closures = motion.blink_runs(shapes, fps)
    assert blinks == [(10, 13), (40, 45)] and long_closures == [(100, 160)]
    shapes[:, motion.EYE_BLINK_RIGHT] = 0.1  # one eye only (a wink at 0.7 -> mean 0.4): no blink
    assert motion.blink_runs(shapes, fps)[0] == []


def test_canonical_smoothing_keeps_head_motion_out_of_the_mouth(prepared, mediapipe_model):
    """Smoothing image-space landmarks before canonicalising lags the slow-filtered points (nose, forehead) behind
    the fast ones (eyes, lips) in quick nods, which moves the canonical mouth; smoothing after canonicalising does
    not. Reference: the unsmoothed canonical landmarks."""
    from lmdiff_core.canonical import canonicalize
    from lmdiff_core.detectors import extract_landmarks

    with load_landmarker("mediapipe", mediapipe_model) as lm:
        seq = extract_landmarks(iter_frames(prepared["src"] / "macron_fr.mp4", FPS), lm)
    lips = MP.part_indices("outer_lips")
    raw = canonicalize(seq).points[:, lips, :2].mean(1)
    shift = {}
    for mode in ("canonical", "image"):
        smoothed = smoothing.smooth_clip(seq, mode)
        shift[mode] = np.linalg.norm(smoothed.points[:, lips, :2].mean(1) - raw, axis=1) / CANONICAL_INTER_OCULAR
    assert shift["canonical"].mean() < 0.01 and shift["canonical"].max() < 0.03
    assert shift["image"].max() > 2 * shift["canonical"].max()
    # the pose is smoothed too: less frame-to-frame jitter than the raw fit, and no lasting offset
    from lmdiff_core.canonical import head_pose

    raw_pose, smooth_pose = head_pose(canonicalize(seq)), head_pose(smoothing.smooth_clip(seq, "canonical"))
    for axis in ("yaw", "pitch", "roll"):
        assert np.abs(np.diff(smooth_pose[axis], 2)).mean() < 0.5 * np.abs(np.diff(raw_pose[axis], 2)).mean()
        assert abs(np.mean(smooth_pose[axis] - raw_pose[axis])) < 0.5


def test_prepare_refuses_bad_arguments(prepared, mediapipe_model, tmp_path):
    factory = CountingFactory(mediapipe_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LmdiffInputError, match="no video files"):
        prepare.prepare_dataset([empty], tmp_path / "out", factory)
    with pytest.raises(LmdiffInputError, match="val_fraction"):
        prepare.prepare_dataset(prepared["sources"], tmp_path / "out", factory, val_fraction=1.5)
    with pytest.raises(LmdiffInputError, match="smooth"):
        prepare.prepare_dataset(prepared["sources"], tmp_path / "out", factory, smooth="fast")
    # one run per dataset folder at a time
    out = tmp_path / "locked"
    out.mkdir()
    held = prepare._lock_folder(out)
    try:
        with pytest.raises(LmdiffInputError, match="another"):
            prepare.prepare_dataset(prepared["sources"], out, factory)
    finally:
        prepare._unlock_folder(held)
    assert factory.calls == 0


def test_refeature_dataset_recomputes_features_from_the_stored_audio(prepared, tmp_path):
    """Other features for the same clips: landmarks and split unchanged, features = the extractor on each clip's
    stored audio (computed here independently), and an existing copy is never overwritten."""
    src, out = prepared["out"], tmp_path / "refeatured"
    extractor = LogMelFeatures(n_mels=40, sub_frames=2)
    prepare.refeature_dataset(src, out, extractor)
    before, after = store.load_index(src), store.load_index(out)
    assert after["features"]["n_mels"] == 40 and after["crop_size"] == 0
    assert [(c["id"], c["split"], c["n_frames"]) for c in after["clips"]] == [
        (c["id"], c["split"], c["n_frames"]) for c in before["clips"]
    ]
    for clip in before["clips"]:
        old, new = store.clip_arrays(src, clip["id"]), store.clip_arrays(out, clip["id"])
        np.testing.assert_array_equal(new["points"], old["points"])
        assert new["features"].shape == (clip["n_frames"], 2, 1, 40)
        np.testing.assert_allclose(new["features"], extractor(old["audio"], clip["n_frames"]), atol=1e-5)
    with pytest.raises(LmdiffInputError, match="already holds a dataset"):
        prepare.refeature_dataset(src, out, extractor)


def test_training_and_inference_landmarks_come_from_one_smoothing(prepared, mediapipe_model, tmp_path, monkeypatch):
    """The landmarks `lmdiff prepare` stores (the crops and the L2V conditions follow them, A2L trains on their
    canonical form) and those the talking-head pipeline derives from a video at inference are the same function of
    the detections (`smoothing.smooth_detections`): given the same detections of a real clip, the pipeline's
    landmarks are the stored ones put back into the frames, to float precision, while the former inference order
    (image-space smoothing) is measurably off."""
    from lmdiff_core import detectors
    from lmdiff_core.canonical import uncanonicalize
    from lmdiff_core.detectors import extract_landmarks
    from lmdiff_core.pipelines import talking_head

    entry = next(e for e in store.load_index(prepared["out"])["clips"] if e["id"] == "macron_fr")
    video = Path(entry["source"])
    with load_landmarker("mediapipe", mediapipe_model) as lm:
        raw = extract_landmarks(iter_frames(video, FPS), lm, FPS, max_gap=12)
    # both paths get these very detections (MediaPipe is not bit-reproducible from run to run)
    monkeypatch.setattr(detectors, "extract_landmarks", lambda *args, **kwargs: raw)
    monkeypatch.setattr(talking_head, "extract_landmarks", lambda *args, **kwargs: raw)
    prepare.prepare_dataset([video], tmp_path / "out", CountingFactory(mediapipe_model), crop_size=0)
    stored = uncanonicalize(store.clip_sequence(tmp_path / "out", "macron_fr")).points[..., :2]
    inference = talking_head._video_landmarks(video, None, FPS, "macron_fr", max_gap=12).points[..., :2]
    assert inference.shape == stored.shape == raw.points[..., :2].shape
    iod = float(np.median(raw.inter_ocular()))
    assert np.abs(inference - stored).max() / iod < 1e-4
    image_order = smoothing.smooth_landmarks(raw).points[..., :2]
    assert np.abs(image_order - stored).max() / iod > 3e-3
