"""Tests of the `lmdiff` command line on real clips and portraits from ../shared/data.

Successful commands run in-process through `lmdiff_core.cli.main` (one import of torch and MediaPipe for the file);
every failing command runs as a real subprocess (`python -m lmdiff_core.cli`) so that the exit code, stderr and the
absence of tracebacks and output files are what a user sees. Outputs are checked by decoding them with PyAV and
Pillow directly, against the source media and counts computed here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
from PIL import Image

from lmdiff_core.canonical import mean_face
from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V
from lmdiff_core.cli import main
from lmdiff_core.demo import demo_motion
from lmdiff_core.landmarks import LandmarkSequence
from lmdiff_core.media import frame_count
from lmdiff_core.topology import MEDIAPIPE478

from .conftest import shared_path, truncated_mp4

CLIP = "data/clips/edtalk_woman_en.mp4"  # 10.00 s, 256x256, 25 fps, AAC
CLIP_WAV = "data/clips/edtalk_woman_en.wav"  # the same 10 s, 16 kHz mono
SPEECH = "data/speech/speech_en_hdtf_radio34.wav"  # 8.00 s
PORTRAIT = "data/images/portrait_woman_b.png"  # 474x474
FPS = 5.0  # 10 s at 5 fps: 50 frames, quick to detect


# -- helpers -------------------------------------------------------------------------------------------------------------


@dataclass
class Decoded:
    frames: list[np.ndarray]
    audio_seconds: float | None  # decoded samples / sample rate, None without an audio stream
    fps: float


def decode(path: Path) -> Decoded:
    """All frames and the audio length of a media file, read with PyAV (independently of lmdiff_core.media)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    audio_seconds = None
    with av.open(str(path)) as container:
        if container.streams.audio:
            stream = container.streams.audio[0]
            samples = sum(f.samples for f in container.decode(stream))
            audio_seconds = samples / stream.rate
    return Decoded(frames, audio_seconds, fps)


def video_duration(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.duration * stream.time_base)


def run_in_process(argv: list[str]) -> tuple[int, str]:
    """(exit code, stdout) of `lmdiff argv` run through cli.main."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


def apply_pose(seq: LandmarkSequence) -> np.ndarray:
    """Canonical points mapped into their frames with their 4x4 poses, by hand."""
    p = seq.points.astype(np.float64)
    homogeneous = np.concatenate([p, np.ones(p.shape[:2] + (1,))], axis=2)
    return np.einsum("tij,tnj->tni", seq.pose, homogeneous)[..., :3]


def eye_line_degrees(points: np.ndarray) -> np.ndarray:
    """Angle of the line from the right to the left outer eye corner (mediapipe478), per frame."""
    d = points[:, 263, :2] - points[:, 33, :2]
    return np.degrees(np.arctan2(d[:, 1], d[:, 0]))


def files_under(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders)."""
    return {str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


# -- successful runs ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def clip_landmarks(workdir, mediapipe_model):
    """`lmdiff landmarks CLIP -o out.npz --preview prev.mp4 --model M --fps 5`."""
    out, preview = workdir / "out.npz", workdir / "prev.mp4"
    code, stdout = run_in_process(
        ["landmarks", shared_path(CLIP), "-o", out, "--preview", preview, "--model", mediapipe_model, "--fps", FPS]
    )
    return code, stdout, out, preview


def test_landmarks_of_a_clip(clip_landmarks):
    code, stdout, out, _ = clip_landmarks
    assert code == 0
    assert str(out) in stdout
    seq = LandmarkSequence.load(out)
    duration = video_duration(shared_path(CLIP))
    assert duration == pytest.approx(10.0, abs=0.01)
    assert len(seq) == frame_count(duration, FPS) == 50
    assert seq.fps == FPS and seq.frame_size == (256, 256)
    assert seq.topology == "mediapipe478" and seq.space == "image" and seq.pose is None
    assert seq.valid.all() and seq.blendshapes.shape == (50, 52)


def test_landmarks_of_a_clip_sit_on_the_face(clip_landmarks, mediapipe_model):
    """Frame 0's landmarks agree with a separate, unsmoothed MediaPipe detection on the decoded source frame."""
    from lmdiff_core.detectors import detect_image, load_landmarker

    seq = LandmarkSequence.load(clip_landmarks[2])
    first = decode(shared_path(CLIP)).frames[0]
    with load_landmarker("mediapipe", mediapipe_model, video=False) as lm:
        reference = detect_image(first, lm)
    iod = float(reference.inter_ocular()[0])
    error = np.linalg.norm(seq.points[0, :, :2] - reference.points[0, :, :2], axis=1).mean() / iod
    assert error < 0.05, f"mean landmark distance {error:.3f} inter-ocular distances"


def test_landmarks_preview_video(clip_landmarks):
    _, _, out, preview = clip_landmarks
    seq = LandmarkSequence.load(out)
    video = decode(preview)
    source = decode(shared_path(CLIP))
    assert len(video.frames) == len(seq) == 50
    assert video.frames[0].shape == (256, 2 * 256, 3)  # frame | canonical panel
    assert video.fps == pytest.approx(FPS)
    assert video.audio_seconds == pytest.approx(len(seq) / FPS, abs=0.1)
    # The left panel is the source frame shown at k / fps (source index 5k at 25 fps), with thin lines on it.
    right_time, later = [], []
    for k, frame in enumerate(video.frames):
        left = frame[:, :256].astype(np.int16)
        diff = np.abs(left - source.frames[5 * k]).mean(-1)
        assert np.median(diff) < 4, f"preview frame {k} is not source frame {5 * k}"
        right_time.append(diff.mean())
        later.append(np.abs(left - source.frames[min(5 * k + 5, len(source.frames) - 1)]).mean())
    assert np.mean(right_time) < np.mean(later)
    # The right panel is a drawing on black: mostly dark, with some lit lines.
    panel = np.stack([f[:, 256:] for f in video.frames[::10]]).max(-1)
    lit = (panel > 100).mean()
    assert 0.003 < lit < 0.3, lit


def test_landmarks_canonical(clip_landmarks, workdir, mediapipe_model):
    plain = LandmarkSequence.load(clip_landmarks[2])
    out = workdir / "canonical.npz"
    code, _ = run_in_process(
        ["landmarks", shared_path(CLIP), "-o", out, "--model", mediapipe_model, "--fps", FPS, "--canonical"]
    )
    assert code == 0
    seq = LandmarkSequence.load(out)
    assert seq.space == "canonical" and len(seq) == len(plain) and seq.fps == FPS
    assert seq.pose.shape == (len(seq), 4, 4) and seq.image_size == (256, 256)
    # Each pose is a similarity (scaled rotation) ...
    linear = seq.pose[:, :3, :3]
    scale = np.cbrt(np.linalg.det(linear))
    rot = linear / scale[:, None, None]
    np.testing.assert_allclose(rot @ rot.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rot.shape), atol=1e-6)
    # ... that takes the canonical points back onto the image-space landmarks of the same clip.
    np.testing.assert_allclose(apply_pose(seq), plain.points, atol=1e-3)


def test_landmarks_of_a_portrait_with_dlib(workdir):
    image_path = shared_path(PORTRAIT)
    out, preview = workdir / "portrait.npz", workdir / "portrait.png"
    code, stdout = run_in_process(["landmarks", image_path, "-o", out, "--detector", "dlib", "--preview", preview])
    assert code == 0
    with Image.open(image_path) as image:
        width, height = image.size
    seq = LandmarkSequence.load(out)
    assert len(seq) == 1 and seq.topology == "ibug68" and seq.frame_size == (width, height)
    xy = seq.points[0, :, :2]
    assert (xy > 0).all() and (xy[:, 0] < width).all() and (xy[:, 1] < height).all()
    assert seq.inter_ocular()[0] > 0.1 * width
    with Image.open(preview) as png:
        assert png.format == "PNG"
        assert png.size == (width + height, height)  # portrait | square canonical panel


@pytest.mark.parametrize(
    "n_frames, audio, audio_seconds",
    [(20, CLIP_WAV, 10.0), (50, SPEECH, 8.0)],
    ids=["audio-trimmed", "audio-padded"],
)
def test_render(clip_landmarks, workdir, n_frames, audio, audio_seconds):
    seq = LandmarkSequence.load(clip_landmarks[2])[:n_frames]
    source = seq.save(workdir / f"render_{n_frames}.npz")
    out = workdir / f"render_{n_frames}.mp4"
    wav, rate = soundfile.read(shared_path(audio))
    assert len(wav) / rate == pytest.approx(audio_seconds)
    code, stdout = run_in_process(["render", source, "-o", out, "--size", 256, "--audio", shared_path(audio)])
    assert code == 0 and str(out) in stdout
    video = decode(out)
    assert len(video.frames) == n_frames
    assert video.frames[0].shape == (256, 256, 3)
    assert video.audio_seconds == pytest.approx(n_frames / seq.fps, abs=0.1)
    # The drawing covers the face parts of frame 0 (frame 256 px -> output 256 px: no scaling).
    lit = np.argwhere(video.frames[0].max(-1) > 100)
    drawn = np.concatenate([MEDIAPIPE478.part_indices(p) for p in MEDIAPIPE478.parts])
    xy = seq.points[0, drawn, :2]
    np.testing.assert_allclose(lit.min(0)[::-1], xy.min(0), atol=3)
    np.testing.assert_allclose(lit.max(0)[::-1] + 1, xy.max(0), atol=3)


def test_demo(workdir, mediapipe_model):
    out = workdir / "demo.mp4"
    code, stdout = run_in_process(["demo", "-o", out, "--seconds", 1, "--model", mediapipe_model, "--landmarks-only"])
    assert code == 0 and str(out) in stdout
    video = decode(out)
    assert len(video.frames) == 25
    assert video.audio_seconds == pytest.approx(1.0, abs=0.1)
    seq = LandmarkSequence.load(workdir / "demo.npz")
    assert len(seq) == 25 and seq.space == "canonical" and seq.pose is not None and seq.valid.all()
    # The demo rolls the portrait by a known angle: the eye line in the frame turns the other way (y is down) ...
    applied = demo_motion(25).roll
    image_angle = eye_line_degrees(apply_pose(seq))
    error = np.abs((image_angle - image_angle.mean()) + (applied - applied.mean())).mean()
    assert error < 0.5, f"eye-line angle misses the applied roll by {error:.2f} deg on average"
    # ... while the canonical landmarks keep it nearly level.
    assert eye_line_degrees(seq.points).std() < 0.5 * image_angle.std()


def test_help_exits_0():
    top = subprocess.run(
        [sys.executable, "-m", "lmdiff_core.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert top.returncode == 0
    for command in ("landmarks", "render", "crop", "demo", "download-model"):
        assert command in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "lmdiff_core.cli", "landmarks", "--help"], capture_output=True, text=True, timeout=60
    )
    assert sub.returncode == 0 and "--preview" in sub.stdout and "--canonical" in sub.stdout


# -- failing runs (subprocesses) ---------------------------------------------------------------------------------------


def _write_inputs(folder: Path) -> None:
    (folder / "notes.mp4").write_text("this is a text file, not a video\n")
    (folder / "folder.mp4").mkdir()
    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "grey.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "tiny.png")
    soundfile.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    face = mean_face("ibug68").astype(np.float32)
    LandmarkSequence(np.repeat(face[None], 10, axis=0), "ibug68", fps=25, frame_size=(512, 512)).save(
        folder / "face.npz"
    )
    # Checkpoint folders whose settings file is corrupt or lacks a key.
    for name, text in (
        ("corrupt_a2l/lmdiff_a2l.json", '{"model_class": "A2LLSTM", "topol'),
        ("incomplete_a2l/lmdiff_a2l.json", _without("topology", BUNDLED_A2L / "lmdiff_a2l.json")),
        ("incomplete_l2v/lmdiff_l2v.json", _without("topology", BUNDLED_L2V / "lmdiff_l2v.json")),
    ):
        (folder / name).parent.mkdir()
        (folder / name).write_text(text)
    # A folder no file can be written in (for root, who may write anywhere, the read-only /sys).
    readonly = folder / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)


def _without(key: str, path: Path) -> str:
    info = json.loads(path.read_text())
    del info[key]
    return json.dumps(info)


def _readonly(folder: Path) -> Path:
    readonly = folder / "readonly"
    return readonly if not os.access(readonly, os.W_OK) else Path("/sys")


def _run(argv: list, timeout: int = 300) -> subprocess.CompletedProcess:
    """`lmdiff argv` as a subprocess, without $LMDIFF_MEDIAPIPE_MODEL (--detector auto means dlib here)."""
    env = {k: v for k, v in os.environ.items() if k != "LMDIFF_MEDIAPIPE_MODEL"}
    return subprocess.run(
        [sys.executable, "-m", "lmdiff_core.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


# name: (argv with {d} = the case's folder, {clip}, {model}, {wav}, {portrait}, {a2l} (bundled), {ro} (a folder
#        no file can be written in); substring the error line must contain;
#        files put at output paths beforehand, which a failed run must leave byte-identical)
BAD_INPUTS = {
    "text-file-as-mp4": (
        ["landmarks", "{d}/notes.mp4", "-o", "{d}/out.npz", "--preview", "{d}/prev.mp4", "--model", "{model}"],
        "notes.mp4",
        (),
    ),
    "no-face": (
        ["landmarks", "{d}/grey.png", "-o", "{d}/out.npz", "--preview", "{d}/prev.png", "--model", "{model}"],
        "no face",
        (),
    ),
    "directory-as-input": (
        ["landmarks", "{d}/folder.mp4", "-o", "{d}/out.npz", "--model", "{model}"],
        "folder.mp4",
        (),
    ),
    "1x1-image": (["landmarks", "{d}/tiny.png", "-o", "{d}/out.npz", "--model", "{model}"], "1x1", ()),
    "missing-file": (["landmarks", "{d}/missing.mp4", "-o", "{d}/out.npz", "--model", "{model}"], "missing.mp4", ()),
    "unknown-face": (["landmarks", "{clip}", "-o", "{d}/out.npz", "--model", "{model}", "--face", "foo"], "foo", ()),
    "bad-output-suffix": (["landmarks", "{clip}", "-o", "{d}/out.txt", "--model", "{model}"], "out.txt", ()),
    "bad-preview-suffix": (
        ["landmarks", "{clip}", "-o", "{d}/out.npz", "--preview", "{d}/prev.gif", "--model", "{model}"],
        "prev.gif",
        (),
    ),
    "missing-output-folder": (
        ["landmarks", "{clip}", "-o", "{d}/nowhere/out.npz", "--model", "{model}"],
        "nowhere",
        (),
    ),
    "missing-model": (["landmarks", "{clip}", "-o", "{d}/out.npz", "--model", "{d}/missing.task"], "missing.task", ()),
    "zero-fps": (["landmarks", "{clip}", "-o", "{d}/out.npz", "--model", "{model}", "--fps", "0"], "fps", ()),
    "render-video-as-landmarks": (["render", "{clip}", "-o", "{d}/r.mp4"], "edtalk_woman_en.mp4", ()),
    # An existing output survives a failed run byte for byte (these also check that no new file appears).
    "no-face-default-detector-keeps-outputs": (
        ["landmarks", "{d}/noise.png", "-o", "{d}/out.npz", "--preview", "{d}/prev.png"],
        "no face",
        ("out.npz", "prev.png"),
    ),
    "text-file-as-mp4-keeps-outputs": (
        ["landmarks", "{d}/notes.mp4", "-o", "{d}/out.npz", "--preview", "{d}/prev.mp4", "--model", "{model}"],
        "notes.mp4",
        ("out.npz", "prev.mp4"),
    ),
    "render-empty-wav-keeps-output": (
        ["render", "{d}/face.npz", "-o", "{d}/r.mp4", "--audio", "{d}/empty.wav"],
        "empty.wav",
        ("r.mp4",),
    ),
    # D2: output-side mistakes are found before any work, naming the path.
    "landmarks-unwritable-folder": (
        ["landmarks", "{clip}", "-o", "{ro}/out.npz", "--model", "{model}"],
        "is not writable",
        (),
    ),
    "a2l-unwritable-folder": (
        ["a2l", "--audio", "{wav}", "--reference", "{portrait}", "--checkpoint", "{a2l}", "-o", "{ro}/out.npz"],
        "is not writable",
        (),
    ),
    "prepare-unwritable-folder": (["prepare", "{clip}", "-o", "{ro}/ds", "--model", "{model}"], "is not writable", ()),
    "eval-unwritable-folder": (
        ["eval", "--pred", "{clip}", "--gt", "{clip}", "-o", "{ro}/report", "--model", "{model}"],
        "is not writable",
        (),
    ),
    "generate-unwritable-folder": (
        ["generate", "--audio", "{wav}", "--image", "{portrait}", "-o", "{ro}/out.mp4"],
        "is not writable",
        (),
    ),
    "eval-output-is-a-file": (
        ["eval", "--pred", "{clip}", "--gt", "{clip}", "-o", "{d}/report.txt", "--model", "{model}"],
        "report.txt is a file",
        ("report.txt",),
    ),
    "generate-zero-steps": (
        ["generate", "--audio", "{wav}", "--image", "{portrait}", "-o", "{d}/g.mp4", "--steps", "0"],
        "argument --steps: expected a whole number of at least 1, got '0'",
        (),
    ),
    # D4: a checkpoint's settings file that is not JSON or lacks a key.
    "a2l-corrupt-settings": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{d}/face.npz",
            "--checkpoint",
            "{d}/corrupt_a2l",
            "-o",
            "{d}/o.npz",
        ],
        "corrupt_a2l/lmdiff_a2l.json is not valid JSON",
        (),
    ),
    "a2l-settings-without-topology": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{d}/face.npz",
            "--checkpoint",
            "{d}/incomplete_a2l",
            "-o",
            "{d}/o.npz",
        ],
        "incomplete_a2l/lmdiff_a2l.json lacks the key 'topology'",
        (),
    ),
    "generate-l2v-settings-without-topology": (
        ["generate", "--audio", "{wav}", "--image", "{portrait}", "--l2v", "{d}/incomplete_l2v", "-o", "{d}/g.mp4"],
        "incomplete_l2v/lmdiff_l2v.json lacks the key 'topology'",
        (),
    ),
    # D8 / D1: a face index beyond the faces there are; options that would do nothing are refused.
    "face-index-beyond-the-faces": (
        ["landmarks", "{portrait}", "-o", "{d}/out.npz", "--face", "2", "--detector", "dlib"],
        "no face with index 2 (found 1",
        (),
    ),
    "negative-face-index": (["landmarks", "{clip}", "-o", "{d}/out.npz", "--face", "-1"], "got '-1'", ()),
    "fps-for-an-image": (
        ["landmarks", "{portrait}", "-o", "{d}/out.npz", "--fps", "10", "--detector", "dlib"],
        "--fps does nothing for an image",
        (),
    ),
    "a2l-max-gap-without-pose-from": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{portrait}",
            "--checkpoint",
            "{a2l}",
            "-o",
            "{d}/o.npz",
            "--max-gap",
            "3",
        ],
        "--max-gap does nothing without --pose-from",
        (),
    ),
    "a2l-has-no-fps": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{portrait}",
            "--checkpoint",
            "{a2l}",
            "-o",
            "{d}/o.npz",
            "--fps",
            "30",
        ],
        "unrecognized arguments: --fps 30",
        (),
    ),
    "generate-image-with-no-smooth": (
        ["generate", "--audio", "{wav}", "--image", "{portrait}", "-o", "{d}/g.mp4", "--no-smooth"],
        "--no-smooth does nothing with --image",
        (),
    ),
    "a2l-lstm-with-guidance": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{portrait}",
            "--checkpoint",
            "{a2l}",
            "-o",
            "{d}/o.npz",
            "--guidance",
            "5",
        ],
        "--guidance does nothing with",
        (),
    ),
    "a2l-landmark-reference-with-model": (
        [
            "a2l",
            "--audio",
            "{wav}",
            "--reference",
            "{d}/face.npz",
            "--checkpoint",
            "{a2l}",
            "-o",
            "{d}/o.npz",
            "--model",
            "{model}",
        ],
        "--model does nothing with a landmark-file --reference",
        (),
    ),
    "generate-video-with-image-mode": (
        ["generate", "--audio", "{wav}", "--video", "{clip}", "-o", "{d}/g.mp4", "--image-mode", "still"],
        "--image-mode does nothing with --video",
        (),
    ),
    "crop-landmarks-with-face": (
        ["crop", "{clip}", "--landmarks", "{d}/face.npz", "--face", "1", "-o", "{d}/c.mp4"],
        "--face does nothing with --landmarks",
        (),
    ),
    "demo-landmarks-only-with-steps": (
        ["demo", "--landmarks-only", "--steps", "5", "-o", "{d}/demo.mp4"],
        "--steps does nothing with --landmarks-only",
        (),
    ),
    "eval-has-no-no-smooth": (
        ["eval", "--pred", "{clip}", "--gt", "{clip}", "-o", "{d}/r", "--no-smooth"],
        "unrecognized arguments: --no-smooth",
        (),
    ),
}


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    before: dict
    after: dict


def _run_bad(name: str, folder: Path, clip: Path, model: Path) -> Result:
    argv, _, sentinels = BAD_INPUTS[name]
    folder.mkdir()
    _write_inputs(folder)
    for i, sentinel in enumerate(sentinels):
        (folder / sentinel).write_bytes(f"sentinel {i}: an earlier good output\n".encode() * 10)
    before = files_under(folder)
    inputs = dict(wav=shared_path(CLIP_WAV), portrait=shared_path(PORTRAIT), a2l=BUNDLED_A2L, ro=_readonly(folder))
    args = [a.format(d=folder, clip=clip, model=model, **inputs) for a in argv]
    proc = _run(args, timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr, before, files_under(folder))


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, mediapipe_model):
    """bad_run(name): the Result of the BAD_INPUTS command `name`, run once as a subprocess in its own folder."""
    root = tmp_path_factory.mktemp("bad")
    clip = shared_path(CLIP)
    results: dict[str, Result] = {}

    def get(name: str) -> Result:
        if name not in results:
            results[name] = _run_bad(name, root / name, clip, mediapipe_model)
        return results[name]

    return get


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(bad_run, name):
    result = bad_run(name)
    _, expected, _ = BAD_INPUTS[name]
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    command = BAD_INPUTS[name][0][0]
    assert last.startswith(f"lmdiff {command}: error: "), last
    assert expected in last, last
    assert result.stdout == ""
    # No output, no partial or temporary file, and sentinels byte-identical.
    changed = sorted(
        k for k in set(result.before) | set(result.after) if result.before.get(k, 0) != result.after.get(k, 0)
    )
    assert not changed, f"files created, removed or modified by the failed run: {changed}"


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_prints_exactly_one_line(bad_run, name):
    lines = bad_run(name).stderr.splitlines()
    assert len(lines) == 1, lines


def test_failed_preview_leaves_neither_output(tmp_path, images_dir, monkeypatch):
    """The landmark file and its preview appear together: a preview that fails takes the landmarks with it."""
    import lmdiff_core.cli as cli

    out = tmp_path / "out.npz"
    out.write_bytes(b"an earlier good result")

    def broken_preview(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(cli, "_write_preview", broken_preview)
    portrait = str(images_dir / "portrait_man_b.png")
    with pytest.raises(OSError, match="disk full"):
        main(["landmarks", portrait, "-o", str(out), "--preview", str(tmp_path / "p.png"), "--detector", "dlib"])
    assert out.read_bytes() == b"an earlier good result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_truncated_media_is_refused_unless_allowed(tmp_path, mediapipe_model):
    """D3: a faststart mp4 cut short (its index still says 3 s) is an error naming the file and the frame where
    decoding stopped, for its frames and for its sound; --allow-partial keeps exactly the frames that decode."""
    video, decodable = truncated_mp4(tmp_path)
    out = tmp_path / "out.npz"
    proc = _run(["landmarks", video, "-o", out, "--model", mediapipe_model])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{video} stops decoding after frame {decodable - 1} " in proc.stderr and "--allow-partial" in proc.stderr
    assert not out.exists()
    args = ["a2l", "--audio", video, "--reference", shared_path(PORTRAIT), "--checkpoint", BUNDLED_A2L, "-o", out]
    proc = _run(args)
    assert proc.returncode == 2 and f"audio {video} stops decoding at" in proc.stderr, proc.stderr
    assert not out.exists()
    code, _ = run_in_process(["landmarks", video, "-o", out, "--model", mediapipe_model, "--allow-partial"])
    assert code == 0
    assert len(LandmarkSequence.load(out)) == decodable  # not 75: no frame repeated past its own display time


def test_prepare_with_every_source_failing_exits_2(tmp_path):
    """D5: `lmdiff prepare` where no source gives a clip is an error, with the reasons in report.json."""
    (tmp_path / "notes.mp4").write_text("not a video\n")
    proc = _run(["prepare", tmp_path / "notes.mp4", "-o", tmp_path / "ds", "--detector", "dlib"])
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmdiff prepare: error: every source failed (1;") and "notes.mp4" in last, last
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "ds" / "report.json").read_text())
    assert report["done"] == [] and len(report["failed"]) == 1


def test_prepare_obeys_no_smooth(tmp_path, mediapipe_model):
    """D1: `prepare --no-smooth` stores the detector's raw landmarks (the default smooths them)."""
    from lmdiff_core.data.store import clip_sequence
    from lmdiff_core.media import read_video, write_video

    video = read_video(shared_path(CLIP))
    source = write_video(tmp_path / "clip.mp4", video.frames[:50], 25, audio=video.audio[: 2 * 16000])
    sequences = {}
    for name, extra in (("smooth", []), ("raw", ["--no-smooth"])):
        argv = ["prepare", source, "-o", tmp_path / name, "--model", mediapipe_model, "--crop-size", 0, "--fps", 10]
        code, _ = run_in_process([*argv, "--min-seconds", 1, *extra])
        assert code == 0
        sequences[name] = clip_sequence(tmp_path / name, "clip")
        assert json.loads((tmp_path / name / "index.json").read_text())["smoothing"] == (
            "none" if extra else "canonical"
        )
    smooth, raw = sequences["smooth"], sequences["raw"]
    assert len(smooth) == len(raw) == 20
    # Smoothing makes the landmarks steadier from frame to frame than the raw detections.
    jitter = {k: np.abs(np.diff(s.points, n=2, axis=0)).mean() for k, s in sequences.items()}
    assert jitter["smooth"] < 0.9 * jitter["raw"], jitter


def test_prepare_val_clips_are_always_validation(tmp_path, mediapipe_model):
    """`prepare --val-clips` puts the named clips (by file stem) in the validation split whatever their hash."""
    from lmdiff_core.media import read_video, write_video

    video = read_video(shared_path(CLIP))
    sources = [
        write_video(tmp_path / f"{name}.mp4", video.frames[:30], 25, audio=video.audio[: 30 * 640])
        for name in ("alpha", "beta")
    ]
    argv = ["prepare", *sources, "-o", tmp_path / "ds", "--model", mediapipe_model, "--crop-size", 0, "--fps", 10]
    code, _ = run_in_process([*argv, "--min-seconds", 1, "--val-fraction", 0, "--val-clips", "beta"])
    assert code == 0
    splits = {c["id"]: c["split"] for c in json.loads((tmp_path / "ds" / "index.json").read_text())["clips"]}
    assert splits == {"alpha": "train", "beta": "val"}


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, mediapipe_model):
    """D6: a run stopped with SIGTERM (as services and schedulers stop jobs) removes its hidden partial files and leaves
    the earlier outputs byte for byte."""
    out, preview = tmp_path / "out.npz", tmp_path / "prev.mp4"
    out.write_bytes(b"an earlier good result")
    preview.write_bytes(b"an earlier good preview")
    env = {k: v for k, v in os.environ.items() if k != "LMDIFF_MEDIAPIPE_MODEL"}
    argv = ["landmarks", shared_path(CLIP), "-o", out, "--preview", preview, "--model", mediapipe_model]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmdiff_core.cli", *map(str, argv)], stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        deadline = time.monotonic() + 240
        while not any(p.name.startswith(".") for p in tmp_path.iterdir()):  # a partial file is being written
            assert proc.poll() is None and time.monotonic() < deadline, "no partial file appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == "lmdiff landmarks: terminated; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "prev.mp4"]
    assert out.read_bytes() == b"an earlier good result" and preview.read_bytes() == b"an earlier good preview"


def test_a2l_preview_only_after_the_landmarks(tmp_path, monkeypatch):
    """D6: `a2l --preview` makes the preview only once the landmarks are saved: a run whose landmarks cannot be saved
    leaves an earlier preview (and landmark file) as they were, and no partial file."""
    out, preview = tmp_path / "out.npz", tmp_path / "prev.mp4"
    out.write_bytes(b"an earlier good result")
    preview.write_bytes(b"an earlier good preview")

    def disk_full(self, path):
        raise OSError(f"disk full writing {path}")

    monkeypatch.setattr(LandmarkSequence, "save", disk_full)
    args = ["a2l", "--audio", shared_path(SPEECH), "--reference", shared_path(PORTRAIT), "--checkpoint", BUNDLED_A2L]
    with pytest.raises(OSError, match="disk full"):
        main([*map(str, args), "-o", str(out), "--preview", str(preview), "--detector", "dlib"])
    assert out.read_bytes() == b"an earlier good result" and preview.read_bytes() == b"an earlier good preview"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz", "prev.mp4"]
