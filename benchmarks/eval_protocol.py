"""The project's fixed evaluation protocol: generate the held-back end of each dev clip and score it with
`lmdiff eval` (`lmdiff_core.evaluation.evaluate`), next to the trivial baselines that evaluate makes from the ground
truth (first frame held, frozen lower face, the ground truth shifted by 5 frames, the ground truth itself).

Clips: the 7 talking clips of ../shared/data/clips (mp4 + 16 kHz wav) by default; --more adds the 18 clips of
../shared/data/clips_more/av; --clips NAME... picks clips by name from both folders. Each clip is split in time: the
first 70% of its frames are the context, the rest is the test part (the first --max-seconds of it; 0 = all of it).
The context is only used by the optional fine-tune; nothing of the test part is ever shown to a model except its
audio, and in dubbing its frames, whose lower face the pipeline masks out.

Modes (each scored against the ground-truth test part, re-encoded like the prediction: H.264 crf 18 with its audio):
  dub       dubbing self-reenactment: `TalkingHeadPipeline.generate(audio=test audio, video=test-part frames)`; the
            head pose, eyes and crop come from the real frames, the lips and jaw from A2L, L2V regenerates the lower
            face.
  one_shot  the clip's frame 0 as a portrait + the test audio (image_mode "one_shot": generated head motion and
            blinks, the whole face crop generated).
  still     the clip's frame 0 + the test audio, image_mode "still" (only lips and jaw move). Not in the default
            modes: it costs as much as dubbing.
  dub_fast  dubbing as `dub` in the pipeline's fast mode: the lower face rebuilt from an appearance bank built from
            the context part only (`bank_from_video=False`: no test frame is ever retrievable), no U-Net.
  dub_fast_true   upper-bound diagnostic: as dub_fast, but the target lips are the test part's own (true)
            landmarks instead of A2L's; the bank is still the context only.
  still_fast      frame 0 dubbed as a still in fast mode, the bank = frame 0 only (what a one-shot user gives).
  dub_quality     as dub_fast in the pipeline's quality mode with the bundled refiner (checkpoints/refiner): fast
            mode's warp refined by the refiner U-Net before paste-back; the bank is the context only.
  dub_quality_true   as dub_fast_true (the test part's own landmarks as the target), refined as dub_quality.
Optional fine-tune (--finetune-steps N > 0), per clip, on its context only (written to an mp4 + wav and prepared with
`lmdiff_core.data.prepare.prepare_dataset`, as `lmdiff prepare` does): L2V by `training/train_l2v.py` with a `lora:`
section on the bundled checkpoint (LoRA rank 8, merged into the run's final/; a copy of the context is the
trainer's validation split, which it needs), A2L by a short loop over `train_a2l.compute_loss` on the bundled LSTM's
own weights (`train_a2l.py` always starts from new weights). --finetune-parts picks l2v, a2l or both.

Whether each clip's person was in the bundled checkpoints' training set comes from their model cards
(checkpoints/a2l/README.md, checkpoints/l2v/README.md): 25 dev clips (these 7 + clips_more/av), whole clips, 3 held
out (pcavs_00086, pcavs_620900105, pcavs_741400104). For a "seen" clip the test part itself was in the training set.

Deterministic: fixed seeds, a fresh landmarker for every detection pass.

Usage: python benchmarks/eval_protocol.py [--clips NAME...] [--more] [--modes dub one_shot still] [--max-seconds 0.8]
       [--steps 10] [--seed 0] [--finetune-steps 0] [--finetune-parts l2v a2l] [--landmarker TASK] [--name cpu_2core]
       [--work-dir DIR] [--results-dir benchmarks/results]
Writes RESULTS_DIR/eval_protocol_<name>.json (machine, settings, checkpoints, per clip and mode the metrics and
baselines from evaluate, timings) and eval_protocol_<name>.md (mean tables, held-out and seen clips apart); the
videos and evaluate's reports (metrics.json, report.md, plots) stay in WORK_DIR/<clip>/<mode>/.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("LMDIFF_SHARED", REPO.parent / "shared"))
MEDIAPIPE = SHARED / "weights" / "mediapipe_face_landmarker" / "face_landmarker_v2_with_blendshapes.task"
CLIP_DIRS = {"clips": "data/clips", "more": "data/clips_more/av"}

FPS = 25.0
SAMPLE_RATE = 16000
SAMPLES_PER_FRAME = int(SAMPLE_RATE / FPS)
CONTEXT_FRACTION = 0.7
MODES = ("dub", "one_shot", "still", "dub_fast", "dub_fast_true", "still_fast", "dub_quality", "dub_quality_true")
FAST_MODES = ("dub_fast", "dub_fast_true", "still_fast")
REFINER_MODES = ("dub_quality", "dub_quality_true")  # quality mode with the bundled refiner
CONTEXT_MODES = ("dub_fast", "dub_fast_true", *REFINER_MODES)  # their bank is the context part
BANK_CROP = 256  # px, the fast modes' face crops
DEFAULT_MODES = ("dub", "one_shot")
DEFAULT_MAX_SECONDS = 0.8
DEFAULT_STEPS = 10

# The bundled checkpoints' training split (both model cards): 25 dev clips, whole clips, these 3 held out.
HELD_OUT = ("pcavs_00086", "pcavs_620900105", "pcavs_741400104")
TRAINING_SOURCES = ("data/clips", "data/clips_more/av")

# fine-tune settings
LORA_RANK = 8
L2V_FINETUNE_LR = 1e-3
VAL_COPY = "_valcopy"
A2L_FINETUNE_LR = 2e-4
A2L_FINETUNE_BATCH = 8
A2L_MIN_WINDOW = 25

SUMMARY_KEYS = (
    "psnr_mouth", "ssim_mouth", "lmd_mouth", "mouth_opening_correlation", "csim", "cpbd", "frame_difference_error_mouth"
)
SUMMARY_LABELS = (
    "mouth PSNR (dB)", "mouth SSIM", "LMD mouth", "mouth-opening corr.", "CSIM", "CPBD", "flicker (frame-diff. error)"
)
GROUPS = ("held_out", "seen", "all")
GROUP_TITLES = {
    "held_out": "held-out clips (people not in the bundled checkpoints' training set)",
    "seen": "clips seen in training (the whole clip, test part included, was in the bundled checkpoints' training set)",
    "all": "all clips",
}


def number(value: float) -> str:
    """How the markdown writes every number (the test reads them back through this)."""
    return f"{value:.4g}"


# -- clips ---------------------------------------------------------------------------------------------------------
def find_clips(names: list[str] | None, more: bool) -> list[Path]:
    """The clips' mp4 files: by name from both folders, or all of data/clips (+ clips_more/av with `more`)."""
    folders = [SHARED / CLIP_DIRS["clips"]] + ([SHARED / CLIP_DIRS["more"]] if more or names else [])
    available = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.glob("*.mp4")):
                available.setdefault(path.stem, path)
    if not names:
        chosen = [p for p in available.values() if more or p.parent == SHARED / CLIP_DIRS["clips"]]
        if not chosen:
            sys.exit(f"eval_protocol: no clip found in {folders[0]}")
        return chosen
    missing = [n for n in names if n not in available]
    if missing:
        sys.exit(f"eval_protocol: unknown clips {missing}; available: {sorted(available)}")
    return [available[n] for n in names]


def training_set(clip: Path) -> dict:
    """Whether the clip's person was in the bundled A2L / L2V training set (from the model cards)."""
    cards = {kind: (REPO / "checkpoints" / kind / "README.md").read_text() for kind in ("a2l", "l2v")}
    for kind, text in cards.items():  # the split this table encodes must still be the one the cards state
        missing = [name for name in HELD_OUT if name not in text]
        if missing:
            raise RuntimeError(f"checkpoints/{kind}/README.md no longer names the held-out clips {missing}")
    dev = any(clip.parent == (SHARED / source) for source in TRAINING_SOURCES)
    if clip.stem in HELD_OUT:
        status = "held_out"
    elif dev:
        status = "seen"
    else:
        status = "unknown"
    return {
        "status": status,
        "a2l": status == "seen" if status != "unknown" else None,
        "l2v": status == "seen" if status != "unknown" else None,
        "source": "model cards checkpoints/a2l/README.md and checkpoints/l2v/README.md: 25 dev clips "
        f"(whole clips) trained, {', '.join(HELD_OUT)} held out",
    }


def split_clip(path: Path, max_seconds: float, keep_context: bool) -> dict:
    """Frame 0, the context (only with `keep_context`) and the test part of a clip, with their audio."""
    from lmdiff_core.media import frame_count, iter_frames, probe_video, read_audio

    wav = path.with_suffix(".wav")
    audio = read_audio(wav if wav.is_file() else path)
    total = frame_count(probe_video(path).duration, FPS)
    context = int(round(CONTEXT_FRACTION * total))
    test_frames = total - context
    if max_seconds > 0:
        test_frames = min(test_frames, int(round(max_seconds * FPS)))
    first, context_frames, test = None, [], []
    for i, frame in enumerate(iter_frames(path, FPS, max_frames=context + test_frames)):
        if i == 0:
            first = frame
        if i < context:
            if keep_context:
                context_frames.append(frame)
        else:
            test.append(frame)
    if len(test) < 3:
        raise RuntimeError(f"the test part has {len(test)} frames (at least 3 are needed)")

    def span(start: int, frames: int) -> np.ndarray:
        part = audio[start * SAMPLES_PER_FRAME : (start + frames) * SAMPLES_PER_FRAME]
        return np.pad(part, (0, frames * SAMPLES_PER_FRAME - len(part))).astype(np.float32)

    return {
        "frame0": first,
        "context": np.stack(context_frames) if context_frames else None,
        "context_audio": span(0, context),
        "test": np.stack(test),
        "test_audio": span(context, len(test)),
        "frames_total": total,
        "frames_context": context,
        "frames_test": len(test),
        "test_start_seconds": context / FPS,
        "frame_size": [int(first.shape[1]), int(first.shape[0])],
    }


# -- models --------------------------------------------------------------------------------------------------------
def bundled_pipelines():
    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline

    a2l = AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L)
    l2v = LandmarkToVideoPipeline.from_pretrained(BUNDLED_L2V)
    l2v.set_autoencoder(load_autoencoder("pixel"))
    return a2l, l2v


def bundled_refiner():
    """The bundled quality-mode refiner (an L2V pipeline, pixel space)."""
    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_REFINER
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline

    return LandmarkToVideoPipeline.from_pretrained(BUNDLED_REFINER, autoencoder=load_autoencoder("pixel"))


def checkpoint_info(folder: Path) -> dict:
    """Path and the SHA-256 of every file of a checkpoint folder (the model card excepted)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(p.read_bytes()).digest())
    return {"path": _shown(folder), "sha256": digest.hexdigest(), "files": len(files)}


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    for base, label in ((REPO, ""), (SHARED.resolve(), "../shared/")):
        try:
            return label + path.relative_to(base).as_posix()
        except ValueError:
            pass
    return str(path)


def _write_wav(path: Path, audio: np.ndarray) -> None:
    from scipy.io import wavfile

    wavfile.write(path, SAMPLE_RATE, np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16))


def finetune(name: str, parts: dict, args, work: Path) -> tuple:
    """(a2l, l2v, info): the bundled pipelines fine-tuned on the clip's context (see the module docstring)."""
    import torch
    import yaml

    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_L2V
    from lmdiff_core.data.prepare import prepare_dataset
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.media import write_video
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline

    a2l, l2v = bundled_pipelines()
    info = {"steps": args.finetune_steps, "parts": list(args.finetune_parts), "context_frames": parts["frames_context"]}
    source = work / "context"
    source.mkdir(parents=True, exist_ok=True)
    video = source / f"{name}.mp4"
    write_video(video, parts["context"], FPS, audio=parts["context_audio"])
    _write_wav(video.with_suffix(".wav"), parts["context_audio"])
    # train_l2v.py validates at its last step, so the dataset needs a validation split; a second copy of the context
    # is it (a sanity check on training frames, not a held-out score: the test part stays unseen)
    copy = source / f"{name}{VAL_COPY}.mp4"
    for suffix in (".mp4", ".wav"):
        shutil.copyfile(video.with_suffix(suffix), copy.with_suffix(suffix))
    data = work / "dataset"
    started = time.perf_counter()
    report = prepare_dataset(
        [video, copy],
        data,
        lambda: load_landmarker("mediapipe", args.landmarker),
        features=a2l.features.config(),
        crop_size=l2v.crop_size,
        val_fraction=0.0,
        val_clips=[copy.stem],
    )
    if report.failed:
        failure = report.failed[0]
        raise RuntimeError(f"prepare of the context failed: {failure.reason}: {failure.message}")
    info["prepare_seconds"] = round(time.perf_counter() - started, 1)

    if "l2v" in args.finetune_parts:
        steps = args.finetune_steps
        config = yaml.safe_load((REPO / "training" / "configs" / "l2v_default_cpu.yaml").read_text())
        config["lora"] = {"base": str(BUNDLED_L2V), "rank": LORA_RANK, "alpha": LORA_RANK}
        config["train"].update(
            max_steps=steps,
            lr=L2V_FINETUNE_LR,
            warmup_steps=min(20, steps // 5),
            val_every=steps,
            checkpoint_every=steps,
            log_every=max(1, steps // 10),
            seed=args.seed,
        )
        config_path = work / "l2v_lora.yaml"
        config_path.write_text(yaml.safe_dump(config))
        run = work / "l2v_run"
        started = time.perf_counter()
        command = [sys.executable, "train_l2v.py", "--config", str(config_path), "--data", str(data)]
        done = subprocess.run(
            command + ["--out", str(run)], cwd=REPO / "training", capture_output=True, text=True, env=_child_env()
        )
        if done.returncode != 0:
            raise RuntimeError(f"train_l2v.py failed (exit {done.returncode}): {done.stderr.strip()[-1500:]}")
        log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        l2v = LandmarkToVideoPipeline.from_pretrained(run / "final")
        l2v.set_autoencoder(load_autoencoder("pixel"))
        info["l2v"] = {
            "trainer": "training/train_l2v.py (lora section, base = the bundled L2V)",
            "lora_rank": LORA_RANK,
            "lr": L2V_FINETUNE_LR,
            "validation": "the trainer's val_mouth_psnr is on a copy of the context (training frames)",
            "seconds": round(time.perf_counter() - started, 1),
            "first_loss": log[0]["loss"],
            "last": log[-1],
        }
    if "a2l" in args.finetune_parts:
        started = time.perf_counter()
        info["a2l"] = finetune_a2l(a2l, data, parts["frames_context"], args.finetune_steps, args.seed)
        info["a2l"]["seconds"] = round(time.perf_counter() - started, 1)
    torch.manual_seed(args.seed)
    return a2l, l2v, info


class _OneProcess:
    """What `train_a2l.compute_loss` asks of an Accelerator, for one process."""

    num_processes, process_index = 1, 0

    @staticmethod
    def unwrap_model(model):
        return model


def finetune_a2l(a2l, data: Path, frames: int, steps: int, seed: int) -> dict:
    """`steps` AdamW steps on the bundled A2L LSTM's own weights with the trainer's loss, on windows of the context
    (`frames` long)."""
    import torch
    from torch.utils.data import default_collate

    sys.path.insert(0, str(REPO / "training"))
    from train_a2l import compute_loss, load_a2l_config

    from lmdiff_core.data.a2l_dataset import A2LWindowDataset
    from lmdiff_core.models import A2LLSTM

    model = a2l.model
    if not isinstance(model, A2LLSTM):
        raise RuntimeError("A2L fine-tuning here supports the LSTM model only")
    config = load_a2l_config(REPO / "training" / "configs" / "a2l_lstm_default_cpu.yaml")
    data_cfg = config["data"]
    dataset = A2LWindowDataset(
        data,
        "train",
        window=min(data_cfg["window"], a2l.window, max(A2L_MIN_WINDOW, frames // 2)),  # a short context: >1 window
        prev_frames=data_cfg["prev_frames"],
        topology=a2l.topology,
        reference=data_cfg.get("reference", "random"),
        seed=seed,
    )
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=A2L_FINETUNE_LR)
    model.train()
    losses = []
    for step in range(steps):
        dataset.set_epoch(step)
        picks = torch.randperm(len(dataset), generator=generator)[:A2L_FINETUNE_BATCH].tolist()
        batch = default_collate([dataset[i] for i in picks])
        loss = compute_loss(model, batch, step, config, _OneProcess, None)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["train"].get("grad_clip", 1.0))
        optimizer.step()
        losses.append(float(loss))
    model.eval()
    return {
        "trainer": "train_a2l.compute_loss on the bundled LSTM's weights (AdamW, constant lr)",
        "lr": A2L_FINETUNE_LR,
        "batch": min(A2L_FINETUNE_BATCH, len(dataset)),
        "windows": len(dataset),
        "window": dataset.window,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


# -- one clip ------------------------------------------------------------------------------------------------------
def run_mode(pipeline, mode: str, parts: dict, args, out: Path, bar) -> dict:
    """Generate the test part in `mode`, write it, score it against the ground truth; the mode's record."""
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.evaluation import evaluate
    from lmdiff_core.media import write_video

    out.mkdir(parents=True, exist_ok=True)
    pred = out / "prediction.mp4"
    audio = parts["test_audio"]

    def progress(stage, done, total):
        bar.set_postfix_str(f"{mode}: {stage} {done}/{total}", refresh=True)

    started = time.perf_counter()
    if mode in ("dub_fast_true", "dub_quality_true"):
        write_video(pred, true_lips_fast(parts, args, pipeline.l2v if mode == "dub_quality_true" else None), FPS,
                    audio=audio)
    elif mode in FAST_MODES or mode in REFINER_MODES:
        dubbing = mode in ("dub_fast", "dub_quality")
        with load_landmarker("mediapipe", args.landmarker, video=dubbing) as landmarker:
            source = dict(video=parts["test"], bank_frames=parts["context"], bank_from_video=False)
            frames, n = pipeline.generate(
                audio,
                landmarker,
                **(source if dubbing else dict(image=parts["frame0"])),
                seed=args.seed,
                n_frames=parts["frames_test"],
                progress=progress,
                mode="quality" if mode in REFINER_MODES else "fast",
                crop_size=BANK_CROP,
            )
            write_video(pred, frames, FPS, audio=audio)
    else:
        _generate_quality(pipeline, mode, parts, args, pred, progress)
    generate_seconds = time.perf_counter() - started
    bar.set_postfix_str(f"{mode}: evaluate", refresh=True)
    started = time.perf_counter()
    with load_landmarker("mediapipe", args.landmarker, video=True) as landmarker:
        report = evaluate(pred, parts["gt_path"], landmarker, out / "report", fps=FPS)
    strip = lambda values: {k: v for k, v in values.items() if k != "per_frame_psnr"}  # noqa: E731
    return {
        "status": "ok",
        "prediction_video": _shown(pred),
        "report": _shown(out / "report" / "metrics.json"),
        "frames": report["frames"],
        "handling": report["handling"],
        "identity_embedding": report["identity_embedding"],
        "metrics": strip(report["prediction"]),
        "baselines": {name: strip(values) for name, values in report["baselines"].items()},
        "seconds": {"generate": round(generate_seconds, 1), "evaluate": round(time.perf_counter() - started, 1)},
    }


def _generate_quality(pipeline, mode: str, parts: dict, args, pred: Path, progress) -> None:
    """The U-Net modes (dub, one_shot, still) written to `pred`."""
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.media import write_video

    with load_landmarker("mediapipe", args.landmarker, video=mode == "dub") as landmarker:
        source = dict(video=parts["test"], video_fps=FPS) if mode == "dub" else dict(image=parts["frame0"])
        frames, n = pipeline.generate(
            parts["test_audio"],
            landmarker,
            **source,
            num_inference_steps=args.steps,
            seed=args.seed,
            image_mode="still" if mode == "still" else "one_shot",
            n_frames=parts["frames_test"],
            progress=progress,
        )
        write_video(pred, frames, FPS, audio=parts["test_audio"])


def true_lips_fast(parts: dict, args, refiner_l2v=None):
    """dub_fast_true's frames: the test part re-rendered in fast mode with its own landmarks as the target, from a
    bank of the context part only; dub_quality_true's with `refiner_l2v` (a refiner `LandmarkToVideoPipeline`)."""
    from lmdiff_core.appearance_bank import AppearanceBank
    from lmdiff_core.detectors import extract_landmarks, load_landmarker
    from lmdiff_core.pipelines.fast import render_fast
    from lmdiff_core.pipelines.quality import Refiner
    from lmdiff_core.smoothing import smooth_detections

    def landmarks(frames):
        with load_landmarker("mediapipe", args.landmarker, video=True) as landmarker:
            return smooth_detections(extract_landmarks(frames, landmarker, FPS, max_gap=None))

    bank = AppearanceBank.build(parts["context"], landmarks(parts["context"]), BANK_CROP)
    source = landmarks(parts["test"]).to_topology("ibug68")
    refine = None if refiner_l2v is None else Refiner.for_bank(refiner_l2v, bank, args.seed)
    return render_fast(parts["test"], source, source, bank, refine=refine)


def _generate_default(name: str):
    """The default of a `TalkingHeadPipeline.generate` argument (what the protocol ran with)."""
    import inspect

    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

    return inspect.signature(TalkingHeadPipeline.generate).parameters[name].default


def run_clip(path: Path, args, work: Path, bar) -> dict:
    from lmdiff_core.media import write_video
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

    name = path.stem
    record = {"clip": _shown(path), "training_set": training_set(path)}
    started = time.perf_counter()
    try:
        keep_context = args.finetune_steps > 0 or bool(set(args.modes) & set(CONTEXT_MODES))
        parts = split_clip(path, args.max_seconds, keep_context=keep_context)
        record.update(
            {k: parts[k] for k in ("frames_total", "frames_context", "frames_test", "test_start_seconds", "frame_size")}
        )
        clip_dir = work / name
        clip_dir.mkdir(parents=True, exist_ok=True)
        parts["gt_path"] = clip_dir / "ground_truth.mp4"
        write_video(parts["gt_path"], parts["test"], FPS, audio=parts["test_audio"])
        record["ground_truth_video"] = _shown(parts["gt_path"])
        if args.finetune_steps > 0:
            bar.set_postfix_str("fine-tune", refresh=True)
            a2l, l2v, record["finetune"] = finetune(name, parts, args, clip_dir / "finetune")
        else:
            a2l, l2v = bundled_pipelines()
    except Exception as exc:  # a failed clip is recorded, the protocol goes on
        bar.update(len(args.modes))
        return {**record, "status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": _trace()}
    pipeline = TalkingHeadPipeline(a2l, l2v)
    refined = TalkingHeadPipeline(a2l, bundled_refiner()) if set(args.modes) & set(REFINER_MODES) else None
    record["modes"] = {}
    for mode in args.modes:
        _seed_everything(args.seed)
        try:
            chosen = refined if mode in REFINER_MODES else pipeline
            record["modes"][mode] = run_mode(chosen, mode, parts, args, clip_dir / mode, bar)
        except Exception as exc:
            record["modes"][mode] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": _trace()}
        bar.update(1)
    ok = [m for m in record["modes"].values() if m["status"] == "ok"]
    record["status"] = "ok" if len(ok) == len(args.modes) else ("partial" if ok else "failed")
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def _trace() -> str:
    return "".join(traceback.format_exc().splitlines(keepends=True)[-6:])


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- summary -------------------------------------------------------------------------------------------------------
def mean(values: list[float]) -> float:
    """Mean over clips, NaN values (a metric that is undefined for a clip, e.g. the correlation of a still mouth)
    left out; NaN when none is left."""
    kept = [float(v) for v in values if not math.isnan(float(v))]
    return sum(kept) / len(kept) if kept else float("nan")


def summarise(clips: dict, modes: list[str]) -> dict:
    """Per group (held_out, seen, all) and mode: the clips scored and the mean of SUMMARY_KEYS for the prediction
    and each baseline."""
    summary = {}
    for group in GROUPS:
        summary[group] = {}
        for mode in modes:
            chosen = {
                name: c["modes"][mode]
                for name, c in clips.items()
                if c.get("modes", {}).get(mode, {}).get("status") == "ok"
                and (group == "all" or c["training_set"]["status"] == group)
            }
            names, records = list(chosen), list(chosen.values())
            if not records:
                summary[group][mode] = {"clips": [], "rows": {}}
                continue
            rows = {"prediction": {k: mean([r["metrics"][k] for r in records]) for k in SUMMARY_KEYS}}
            for baseline in records[0]["baselines"]:
                rows[baseline] = {k: mean([r["baselines"][baseline][k] for r in records]) for k in SUMMARY_KEYS}
            summary[group][mode] = {"clips": names, "rows": rows}
    return summary


def markdown(report: dict) -> str:
    settings, summary = report["settings"], report["summary"]
    cap = f"the first {settings['max_seconds']:g} s of it" if settings["max_seconds"] > 0 else "all of it"
    lines = [
        f"# lmdiff evaluation protocol: {report['name']}",
        "",
        f"{len(report['clips'])} clips, each split in time: first {settings['context_fraction']:.0%} context, the "
        f"test part is the rest ({cap}). Modes: {', '.join(settings['modes'])}; {settings['steps']} sampling steps "
        f"({settings['sampler']}), seed {settings['seed']}; fine-tune on the context: "
        + (
            f"{settings['finetune_steps']} steps of {', '.join(settings['finetune_parts'])}"
            if settings["finetune_steps"]
            else "none (the bundled checkpoints as they are)"
        )
        + f". Scored by `lmdiff_core.evaluation.evaluate` (CSIM: {report['identity_embedding']}). Machine: "
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores, torch threads "
        f"{report['machine']['torch_threads']}; total {report['seconds']['total'] / 60:.1f} min.",
        "",
        "Means over clips (a metric undefined for a clip, e.g. the mouth-opening correlation of a still mouth, is left "
        "out of its mean). Rows under a mode: the prediction, then evaluate's baselines made from that clip's ground "
        "truth. Higher is better except LMD.",
    ]
    header = "| mode | video | clips | " + " | ".join(SUMMARY_LABELS) + " |"
    counted = {group: sorted({n for b in summary[group].values() for n in b["clips"]}) for group in GROUPS}
    for group in GROUPS:
        if group == "all" and not (counted["held_out"] and counted["seen"]):
            continue  # one group only: "all" would repeat it
        blocks = summary[group]
        lines += ["", f"## {GROUP_TITLES[group]}: {len(counted[group])} clips", ""]
        if not counted[group]:
            lines.append("No clip of this group in this run.")
            continue
        lines += [", ".join(counted[group]), "", header, "|---" * (len(SUMMARY_KEYS) + 3) + "|"]
        for mode, block in blocks.items():
            for row, values in block["rows"].items():
                label = "**prediction**" if row == "prediction" else row
                cells = " | ".join(number(values[k]) for k in SUMMARY_KEYS)
                lines.append(f"| {mode} | {label} | {len(block['clips'])} | {cells} |")
    lines += [
        "",
        "## Per clip (prediction)",
        "",
        "| clip | training set | frames (context / test) | mode | " + " | ".join(SUMMARY_LABELS) + " | seconds |",
        "|---" * (len(SUMMARY_KEYS) + 5) + "|",
    ]
    failures = []
    for name, clip in report["clips"].items():
        status = clip["training_set"]["status"].replace("_", "-")
        if clip["status"] == "failed" and "modes" not in clip:
            failures.append(f"- {name}: {clip['error']}")
            continue
        for mode, result in clip["modes"].items():
            frames = f"{clip['frames_context']} / {clip['frames_test']}"
            if result["status"] != "ok":
                failures.append(f"- {name} ({mode}): {result['error']}")
                continue
            cells = " | ".join(number(result["metrics"][k]) for k in SUMMARY_KEYS)
            seconds = result["seconds"]["generate"] + result["seconds"]["evaluate"]
            lines.append(f"| {name} | {status} | {frames} | {mode} | {cells} | {seconds:.0f} |")
    if failures:
        lines += ["", "## Failed", ""] + failures
    lines += [
        "",
        "Not computed (no weights here): " + ", ".join(report["not_computed"]) + ". Per clip and mode, evaluate's "
        "report (all metrics, baselines, plots) is in the work folder named in the JSON.",
        "",
    ]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", nargs="+", help="clip names (stems) from data/clips and data/clips_more/av")
    parser.add_argument("--more", action="store_true", help="add the 18 clips of data/clips_more/av")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help=f"cap on the test part (seconds from its start; 0 = the whole 30%%; default {DEFAULT_MAX_SECONDS})",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="L2V sampling steps (DDIM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune-steps", type=int, default=0, help="fine-tune steps on each clip's context")
    parser.add_argument("--finetune-parts", nargs="+", choices=("l2v", "a2l"), default=["l2v", "a2l"])
    parser.add_argument("--landmarker", default=str(MEDIAPIPE), help="MediaPipe face landmarker .task file")
    parser.add_argument("--name", default="cpu_2core", help="results name: eval_protocol_<name>.json / .md")
    parser.add_argument("--work-dir", help="videos and evaluate reports (default: a folder in the temp dir)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    args = parser.parse_args(argv)
    if args.max_seconds < 0 or args.steps < 1 or args.finetune_steps < 0:
        parser.error("--max-seconds must be >= 0, --steps >= 1, --finetune-steps >= 0")
    if not Path(args.landmarker).is_file():
        parser.error(f"--landmarker {args.landmarker} is not a file")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")
    args = parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_landmarks import machine
    from tqdm.auto import tqdm

    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V, BUNDLED_REFINER
    from lmdiff_core.evaluation import NOT_COMPUTED

    _seed_everything(args.seed)
    clips = find_clips(args.clips, args.more)
    work = Path(args.work_dir or Path(tempfile.gettempdir()) / f"lmdiff_eval_protocol_{args.name}")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    records = {}
    with tqdm(total=len(clips) * len(args.modes), desc="eval protocol", unit="run") as bar:
        for path in clips:
            bar.set_description(path.stem)
            records[path.stem] = run_clip(path, args, work, bar)
            r = records[path.stem]
            tqdm.write(f"{path.stem}: {r['status']}" + (f" ({r['error']})" if "error" in r else ""))
    total = time.perf_counter() - started
    embedding = next(
        (m["identity_embedding"] for c in records.values() for m in c.get("modes", {}).values() if m["status"] == "ok"),
        None,
    )
    report = {
        "name": args.name,
        "machine": {**machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "settings": {
            "clips": [_shown(p) for p in clips],
            "context_fraction": CONTEXT_FRACTION,
            "max_seconds": args.max_seconds,
            "fps": FPS,
            "modes": args.modes,
            "steps": args.steps,
            "sampler": "ddim",
            "guidance_scale": 1.0,
            "a2l_guidance_scale": _generate_default("a2l_guidance_scale"),
            "bank_crop": BANK_CROP,
            "seed": args.seed,
            "finetune_steps": args.finetune_steps,
            "finetune_parts": args.finetune_parts if args.finetune_steps else [],
            "landmarker": _shown(Path(args.landmarker)),
            "work_dir": str(work),
            "command": "python benchmarks/eval_protocol.py " + " ".join(sys.argv[1:] if argv is None else argv),
        },
        "checkpoints": {
            "a2l": checkpoint_info(BUNDLED_A2L),
            "l2v": checkpoint_info(BUNDLED_L2V),
            **({"refiner": checkpoint_info(BUNDLED_REFINER)} if set(args.modes) & set(REFINER_MODES) else {}),
        },
        "identity_embedding": embedding,
        "not_computed": {name: NOT_COMPUTED for name in ("fid", "lpips", "tlp", "lse_c", "lse_d")},
        "seconds": {"total": round(total, 1), "per_clip": {n: r.get("seconds") for n, r in records.items()}},
        "summary_keys": list(SUMMARY_KEYS),
        "summary": summarise(records, args.modes),
        "clips": records,
    }
    from lmdiff_core.evaluation import to_json

    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"eval_protocol_{args.name}.json"
    path.write_text(to_json(report))  # strict JSON: a metric that is not finite is null
    path.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {path} and {path.with_suffix('.md').name} in {total / 60:.1f} min")
    return 0 if any(r["status"] != "failed" for r in records.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
