"""A2L end to end on real clips: dataset, Accelerate training (1 and 2 processes, resume), pipeline and CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import yaml

from lmdiff_core import LandmarkSequence, LmdiffInputError
from lmdiff_core.canonical import CANONICAL_SIZE, mean_face, to_model_units
from lmdiff_core.data.prepare import prepare_dataset
from lmdiff_core.data.store import clip_arrays, load_index
from lmdiff_core.detectors import load_landmarker
from lmdiff_core.media import frame_count, iter_frames, read_audio, write_video
from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
from lmdiff_core.topology import convert_points, get_topology

from .conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "training" / "configs"
LIPS = np.union1d(get_topology("ibug68").part_indices("outer_lips"), get_topology("ibug68").part_indices("inner_lips"))
CLIPS = {"edtalk_woman_en": 8.0, "macron_fr": 8.0, "edtalk_man_en": 8.0, "cnn_anchor_en": 6.0}
HELD_OUT = "edtalk_man_en"


def _cut(name: str, seconds: float, folder: Path) -> Path:
    """The first seconds of a real clip, with its own speech, as a new mp4."""
    source = shared_path(f"data/clips/{name}.mp4")
    frames = list(iter_frames(source, 25.0, max_frames=int(seconds * 25)))
    audio = read_audio(shared_path(f"data/clips/{name}.wav"))
    return write_video(folder / f"{name}.mp4", frames, 25.0, audio=audio)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, mediapipe_model):
    folder = tmp_path_factory.mktemp("a2l")
    videos = folder / "videos"
    videos.mkdir()
    for name, seconds in CLIPS.items():
        _cut(name, seconds, videos)
    out = folder / "dataset"
    report = prepare_dataset(
        [videos], out, lambda: load_landmarker("mediapipe", mediapipe_model), crop_size=0, val_clips=[HELD_OUT]
    )
    assert not report.failed
    return out


def _config(tmp_path: Path, base: str, **train) -> Path:
    config = yaml.safe_load((CONFIGS / base).read_text())
    config["train"].update(train)
    path = tmp_path / base
    path.write_text(yaml.safe_dump(config))
    return path


def _train(
    config: Path, data: Path, out: Path, *extra, processes: int = 1, timeout: int = 600
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--cpu"]
    if processes == 1:
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [
        str(REPO / "training" / "train_a2l.py"),
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command + list(extra), capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _truth(dataset: Path, clip_id: str) -> np.ndarray:
    index = load_index(dataset)
    return convert_points(clip_arrays(dataset, clip_id)["points"], index["topology"], "ibug68")


def _mouth_error(pipeline, dataset: Path, clip_id: str, features=None) -> float:
    truth = _truth(dataset, clip_id)
    arrays = clip_arrays(dataset, clip_id)
    reference = LandmarkSequence(truth[:1], "ibug68", frame_size=CANONICAL_SIZE, space="canonical")
    pred = pipeline.predict_features(arrays["features"] if features is None else features, reference)
    return float(np.linalg.norm(to_model_units(pred.points)[:, LIPS] - to_model_units(truth)[:, LIPS], axis=-1).mean())


def _mean_face() -> LandmarkSequence:
    return LandmarkSequence(mean_face("ibug68")[None], "ibug68", frame_size=CANONICAL_SIZE, space="canonical")


def _clip_id(dataset: Path, stem: str) -> str:
    return next(c["id"] for c in load_index(dataset)["clips"] if c["id"].endswith(stem))


@pytest.fixture(scope="module")
def lstm_run(dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lstm")
    run = tmp / "run"
    _train(_config(tmp, "a2l_lstm_tiny_cpu.yaml", max_steps=300, val_every=150, checkpoint_every=150), dataset, run)
    return run


def test_lstm_learns_the_training_mouths(lstm_run, dataset):
    """After a short run the model beats 'the mouth never moves' (the reference) on its training clips."""
    pipeline = AudioToLandmarksPipeline.from_pretrained(lstm_run / "final")
    for stem in ("edtalk_woman_en", "macron_fr"):
        clip = _clip_id(dataset, stem)
        truth = to_model_units(_truth(dataset, clip))
        still = float(np.linalg.norm(truth[:, LIPS] - truth[:1, LIPS], axis=-1).mean())
        assert _mouth_error(pipeline, dataset, clip) < 0.8 * still, stem
    records = [json.loads(line) for line in (lstm_run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_mouth_open_corr" in r for r in records)


def test_checkpoint_round_trip_and_exact_frame_counts(lstm_run, tmp_path):
    pipeline = AudioToLandmarksPipeline.from_pretrained(lstm_run / "final")
    reference = _mean_face()
    speech = read_audio(shared_path("data/speech/speech_fr_macron.wav"))
    for seconds in (0.21, 1.0, 3.37, 11.86):
        audio = speech[: int(round(seconds * 16000))]
        out = pipeline(audio, reference)
        assert len(out) == frame_count(len(audio) / 16000, 25.0) and out.space == "canonical"
    with pytest.raises(LmdiffInputError, match="at least 0.2 s"):  # no syllable to animate
        pipeline(speech[:480], reference)
    pipeline.save_pretrained(tmp_path / "copy")
    again = AudioToLandmarksPipeline.from_pretrained(tmp_path / "copy")
    np.testing.assert_array_equal(again(speech[:32000], reference).points, pipeline(speech[:32000], reference).points)


def test_silence_gives_a_still_closed_mouth(lstm_run):
    pipeline = AudioToLandmarksPipeline.from_pretrained(lstm_run / "final")
    speech = read_audio(shared_path("data/speech/speech_en_hdtf_radio34.wav"))[: 4 * 16000]
    audio = np.concatenate([speech[:32000], np.zeros(32000, np.float32), speech[32000:]])
    face = _mean_face()
    out = pipeline(audio, face)
    silent = out.points[55:95]  # well inside the 2 s of zeros (frames 50-100)
    np.testing.assert_allclose(silent, np.repeat(face.points, len(silent), 0), atol=1e-3)


DIFFUSION_RUN = dict(max_steps=40, log_every=1, val_every=1000)


@pytest.fixture(scope="module")
def diffusion_whole(dataset, tmp_path_factory):
    """An uninterrupted 40-step run of the tiny diffusion recipe, the reference for the resume tests."""
    tmp = tmp_path_factory.mktemp("whole")
    _train(_config(tmp, "a2l_diffusion_tiny_cpu.yaml", checkpoint_every=20, **DIFFUSION_RUN), dataset, tmp / "run")
    return tmp / "run"


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(run: Path, whole: Path) -> None:
    """Bit for bit: the same step, loss and learning rate records (each step once) and the same final weights."""
    from safetensors.numpy import load_file

    curve = lambda r: [(x["step"], x["loss"], x["lr"]) for x in _records(r)]  # noqa: E731
    assert curve(run) == curve(whole)
    name = "diffusion_pytorch_model.safetensors"
    wa, wb = load_file(whole / "final" / name), load_file(run / "final" / name)
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


class _Planted:
    """Unpickling this creates `path`: proof that a file was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_diffusion_training_resumes_on_the_same_loss_curve_without_unpickling(dataset, diffusion_whole, tmp_path):
    """A run stopped at step 20 and resumed gives the uninterrupted run's records and weights bit for bit. Its
    checkpoint holds only safetensors and JSON files, and resuming ignores pickles planted where Accelerate keeps
    its state (a pickle there that runs code when loaded)."""
    import pickle

    from safetensors import safe_open

    config = _config(tmp_path, "a2l_diffusion_tiny_cpu.yaml", checkpoint_every=20, **DIFFUSION_RUN)
    split = tmp_path / "split"
    _train(config, dataset, split, "--max-steps", "20")
    checkpoint = split / "checkpoints" / "step_000020"
    for path in checkpoint.iterdir():
        assert path.suffix in (".json", ".safetensors"), path.name
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            safe_open(str(path), "pt").keys()
    sentinel = tmp_path / "unpickled"
    payload = pickle.dumps(_Planted(sentinel))
    pickle.loads(payload)  # the plant works: loading it runs code
    assert sentinel.exists()
    sentinel.unlink()
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        (checkpoint / name).write_bytes(payload)
    _train(config, dataset, split, "--resume")
    assert not sentinel.exists()
    _assert_same_run(split, diffusion_whole)
    losses = _losses(split)
    assert np.mean([losses[s] for s in range(31, 41)]) < np.mean([losses[s] for s in range(1, 11)])  # the loss falls


def _complete(run: Path) -> list[Path]:
    """Checkpoint folders under their final name (a rename publishes them only once `checkpoint.json` is written)."""
    root = run / "checkpoints"
    found = sorted(p for p in root.glob("step_*") if "." not in p.name)
    for folder in found:
        marker = json.loads((folder / "checkpoint.json").read_text())
        assert all((folder / f).stat().st_size == size for f, size in marker["files"].items()), folder
    return found


def _logged_steps(run: Path) -> list[int]:
    """The steps in metrics.jsonl so far (a line being written is skipped)."""
    path, steps = run / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def _leftovers(run: Path) -> list[Path]:
    """Folders being written or removed under checkpoints/."""
    return list((run / "checkpoints").glob("step_*.*"))


def _files(folder: Path) -> int:
    try:
        return len(list(folder.iterdir()))
    except FileNotFoundError:  # renamed meanwhile
        return 0


def _kill_and_resume(config: Path, data: Path, run: Path, plan: list, seed: int) -> list[str]:
    """Run train_a2l.py (directly, so that SIGKILL reaches the trainer itself) and kill it once per entry of `plan`,
    resuming each time: ("save", k) kills while a checkpoint is being written, once its `.partial` folder holds k
    files (13 = all, marker included, not yet renamed); ("delete",) while an old checkpoint is being removed;
    ("random",) at a random moment up to 2 s later. Each kill waits until the run has logged a random step (spread
    over steps 3-33, increasing) and 3 steps since its start. Then lets the run finish. Returns what each kill hit."""
    import random
    import signal
    import time

    rng = random.Random(seed)
    targets = sorted(rng.sample(range(3, 34), len(plan)))
    command = [sys.executable, str(REPO / "training" / "train_a2l.py"), "--config", str(config)]
    command += ["--data", str(data), "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    hits = []
    for kill, target in zip([*plan, None], [*targets, 0]):
        done = _complete(run)
        start = int(done[-1].name[5:]) if done else 0
        delay = rng.uniform(0, 2)
        pause = {"LMDIFF_TEST_CHECKPOINT_PAUSE": "0.1"} if kill else {}
        with open(run.parent / "stderr.txt", "w") as log:
            args = ["--resume"] if done else []
            process = subprocess.Popen(command + args, env=dict(env, **pause), stderr=log)
        deadline = time.monotonic() + 600
        stale = {p.name for p in _leftovers(run)}  # until the new run has removed them
        while kill is not None and process.poll() is None and time.monotonic() < deadline:
            entries = _leftovers(run)
            stale &= {p.name for p in entries}
            fresh = [p for p in entries if p.name not in stale]
            if max(_logged_steps(run), default=0) < max(target, start + 3):
                hit = []
            elif kill[0] == "save":
                hit = [p for p in fresh if p.name.endswith(".partial") and _files(p) >= kill[1]]
            elif kill[0] == "delete":
                hit = [p for p in fresh if p.name.endswith(".deleting")]
            else:
                hit = ["random"]
                time.sleep(delay)
            if hit:
                process.send_signal(signal.SIGKILL)
                process.wait()
                where = [h if isinstance(h, str) else h.relative_to(run).as_posix() for h in hit]
                hits.append(f"{kill} from step {start}: at {where}, last logged step {max(_logged_steps(run))}")
                break
            time.sleep(0.01)
        code = process.wait(timeout=600)
        stderr = (run.parent / "stderr.txt").read_text()
        assert code == (-signal.SIGKILL if kill else 0), (kill, code, stderr[-3000:])
        if done:  # the newest complete checkpoint, whatever half-written folder is newer
            assert f"resuming from {done[-1]}\n" in stderr, stderr[-3000:]
        _complete(run)
    return hits


@pytest.mark.parametrize(
    ("plan", "seed"),
    [
        pytest.param([("save", 7), ("random",)], 0, id="2kills"),
        pytest.param(
            [("random",), ("save", 2), ("save", 13), ("delete",), ("save", 11)], 1, marks=pytest.mark.slow, id="5kills"
        ),
    ],
)
def test_killed_training_resumes_on_the_same_loss_curve(dataset, diffusion_whole, tmp_path, plan, seed):
    """SIGKILL a run (checkpoint every 2 steps) mid-save, mid-removal of an old checkpoint and at random moments,
    resuming each time: every resume takes the newest complete checkpoint, and the run ends with the uninterrupted
    run's records (no step twice) and weights, bit for bit; no half-written folder is left."""
    config = _config(tmp_path, "a2l_diffusion_tiny_cpu.yaml", checkpoint_every=2, **DIFFUSION_RUN)
    run = tmp_path / "run"
    hits = _kill_and_resume(config, dataset, run, plan, seed)
    print("\n".join(hits))
    assert len(hits) == len(plan)
    _assert_same_run(run, diffusion_whole)
    assert _records(run) == _records(diffusion_whole)  # the validation at the last step too
    assert [p.name for p in _complete(run)] == ["step_000038", "step_000040"]
    assert not _leftovers(run) and not list(run.glob("*.partial"))


def test_two_processes_match_one_with_the_same_global_batch(dataset, tmp_path):
    from safetensors.numpy import load_file

    config = _config(tmp_path, "a2l_diffusion_tiny_cpu.yaml", max_steps=5, val_every=1000, checkpoint_every=1000)
    one, two = tmp_path / "one", tmp_path / "two"
    _train(config, dataset, one, processes=1)
    _train(config, dataset, two, processes=2)
    wa = load_file(one / "final" / "diffusion_pytorch_model.safetensors")
    wb = load_file(two / "final" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst < 1e-4, worst
    np.testing.assert_allclose(list(_losses(one).values()), list(_losses(two).values()), rtol=1e-4)


def test_a2l_cli_and_bad_inputs(lstm_run, tmp_path, images_dir):
    from lmdiff_core.cli import main

    portrait = images_dir / "portrait_woman_a.jpg"
    speech = shared_path("data/speech/speech_de.wav")
    out = tmp_path / "talk.npz"
    code = main(
        [
            "a2l",
            "--audio",
            str(speech),
            "--reference",
            str(portrait),
            "--checkpoint",
            str(lstm_run / "final"),
            "-o",
            str(out),
            "--preview",
            str(tmp_path / "talk.mp4"),
            "--detector",
            "dlib",
        ]
    )
    assert code == 0
    talking = LandmarkSequence.load(out)
    assert len(talking) == frame_count(9.34, 25.0) and talking.pose is not None
    assert (tmp_path / "talk.mp4").is_file()

    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0, np.float32), 16000)
    grey = tmp_path / "grey.png"
    from PIL import Image

    Image.fromarray(np.full((256, 256, 3), 127, np.uint8)).save(grey)
    cases = [
        (["--audio", str(empty), "--reference", str(portrait), "--checkpoint", str(lstm_run / "final")], "empty.wav"),
        (["--audio", str(speech), "--reference", str(grey), "--checkpoint", str(lstm_run / "final")], "no face"),
        (["--audio", str(speech), "--reference", str(portrait), "--checkpoint", str(tmp_path)], "not an lmdiff A2L"),
    ]
    for args, expected in cases:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "lmdiff_core.cli",
                "a2l",
                *args,
                "-o",
                str(tmp_path / "bad.npz"),
                "--detector",
                "dlib",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "bad.npz").exists()


def test_a_checkpoint_of_the_wrong_kind_is_refused(lstm_run, tmp_path):
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(lstm_run / "final", wrong)
    info = json.loads((wrong / "lmdiff_a2l.json").read_text())
    info["model_class"] = "A2LDiffusion"
    (wrong / "lmdiff_a2l.json").write_text(json.dumps(info))
    with pytest.raises(LmdiffInputError, match="A2LLSTM"):
        AudioToLandmarksPipeline.from_pretrained(wrong)


def test_overfitting_one_clip_beats_the_mean_mouth_by_far(tmp_path, mediapipe_model):
    videos = tmp_path / "videos"
    videos.mkdir()
    _cut("macron_fr", 6.0, videos)
    data = tmp_path / "one"
    prepare_dataset([videos], data, lambda: load_landmarker("mediapipe", mediapipe_model), crop_size=0, val_fraction=0)
    run = tmp_path / "run"
    _train(
        _config(
            tmp_path,
            "a2l_lstm_tiny_cpu.yaml",
            max_steps=600,
            batch_size=4,
            val_every=10_000,
            checkpoint_every=10_000,
            ema_decay=0.9,
        ),
        data,
        run,
    )
    clip = load_index(data)["clips"][0]["id"]
    truth = to_model_units(_truth(data, clip))
    mean_mouth = float(np.linalg.norm(truth[:, LIPS] - truth[:, LIPS].mean(0), axis=-1).mean())
    error = _mouth_error(AudioToLandmarksPipeline.from_pretrained(run / "final"), data, clip)
    assert error < 0.5 * mean_mouth, (error, mean_mouth)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "steps"),
    [("a2l_lstm_tiny_cpu.yaml", 1000), ("a2l_diffusion_default_cpu.yaml", None)],
    ids=["lstm", "diffusion"],
)
def test_held_out_sync_beats_shuffled_audio(tmp_path, mediapipe_model, config, steps):
    """All dev clips, one held out: its predicted mouth opening follows the real one far better than with shuffled
    audio (the diffusion recipe takes about 40 min on a 2-core CPU)."""
    data = tmp_path / "dev"
    sources = [shared_path("data/clips"), shared_path("data/clips_more/av")]
    prepare_dataset(
        sources, data, lambda: load_landmarker("mediapipe", mediapipe_model), crop_size=0, val_clips=[HELD_OUT]
    )
    run = tmp_path / "run"
    _train(_config(tmp_path, config, **({} if steps is None else {"max_steps": steps})), data, run, timeout=5400)
    pipeline = AudioToLandmarksPipeline.from_pretrained(run / "final")
    clip = _clip_id(data, HELD_OUT)
    arrays = clip_arrays(data, clip)
    truth = LandmarkSequence(_truth(data, clip), "ibug68", frame_size=CANONICAL_SIZE, space="canonical")
    shuffled = arrays["features"][np.random.default_rng(0).permutation(len(arrays["features"]))]
    corr = []
    for features in (arrays["features"], shuffled):
        pred = pipeline.predict_features(features, truth[:1])
        corr.append(float(np.corrcoef(truth.mouth_opening(), pred.mouth_opening())[0, 1]))
    assert corr[0] > corr[1] + 0.2 and corr[0] > 0.3, corr


def test_diffusion_sampling_is_seeded():
    """Same seed, same landmarks; another seed, other landmarks (a random-weight tiny model, no training needed)."""
    import torch

    from lmdiff_core.models import A2LDiffusion

    torch.manual_seed(0)
    model = A2LDiffusion(d_model=32, n_heads=2, n_layers=1, window=16, prev_frames=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    pipeline = AudioToLandmarksPipeline(model)
    audio = read_audio(shared_path("data/speech/speech_de.wav"))[: 2 * 16000]
    a, b = (
        pipeline(audio, _mean_face(), seed=1, num_inference_steps=3),
        pipeline(audio, _mean_face(), seed=1, num_inference_steps=3),
    )
    c = pipeline(audio, _mean_face(), seed=2, num_inference_steps=3)
    np.testing.assert_array_equal(a.points, b.points)
    assert np.abs(a.points - c.points).max() > 1e-3
    assert len(a) == 50


@pytest.mark.parametrize(("checkpoint", "floor"), [("a2l", 0.4), ("a2l_diffusion", 0.3)])
def test_bundled_checkpoints_follow_a_held_out_speaker(mediapipe_model, checkpoint, floor):
    """The bundled A2L checkpoints on a person they never saw (pcavs_00086, held out of their training): the predicted
    mouth opening follows the real one (landmarks detected here, independently of the training data) clearly better
    than the same model fed the audio features in shuffled order."""
    from lmdiff_core.canonical import canonicalize
    from lmdiff_core.detectors import extract_landmarks
    from lmdiff_core.smoothing import smooth_landmarks

    clip = shared_path("data/clips_more/av/pcavs_00086.mp4")
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        truth = canonicalize(smooth_landmarks(extract_landmarks(iter_frames(clip, 25.0), landmarker, 25.0)))
    truth = truth.to_topology("ibug68")
    pipeline = AudioToLandmarksPipeline.from_pretrained(REPO / "checkpoints" / checkpoint)
    features = pipeline.features(read_audio(clip.with_suffix(".wav")), len(truth))
    shuffled = features[np.random.default_rng(0).permutation(len(features))]
    corr = [
        float(np.corrcoef(truth.mouth_opening(), pipeline.predict_features(f, truth[:1]).mouth_opening())[0, 1])
        for f in (features, shuffled)
    ]
    assert corr[0] > floor and corr[0] > corr[1] + 0.3, corr
