"""L2V design measurements on the dev clips: how the U-Net should see the identity reference, and what each
temporal-coherence mechanism of `LandmarkToVideoPipeline` changes.

identity: trains three small pixel-space U-Nets (`training/train_l2v.py`, 64 px crops), identical except for how
    they see the identity reference (concatenated to the input, reference attention, both), on the training clips
    of a prepared dataset, then scores each on the validation clips (people never seen in training): mouth-region
    PSNR of dubbing and crop PSNR of one-shot generation, from ground-truth landmarks.
temporal: dubbing self-reenactment of the validation clips' videos (ground-truth landmarks, the clip's own frames)
    with an L2V checkpoint under mechanism variants: frames denoised one by one with fresh noise; + the same initial
    noise for every frame; + windows denoised together (temporal attention); + overlapping windows conditioned on
    the previous window and blended (the default). Scores, inside the mouth region of the face crop: PSNR, the
    temporal error (RMS difference between the output's and the ground truth's frame-to-frame changes, in 8-bit
    levels) and the flicker ratio (mean frame-to-frame change of the output / of the ground truth; 1 = as much
    motion as the real video).

Usage:
    python benchmarks/l2v_ablations.py identity --data DATASET [--steps 600]
    python benchmarks/l2v_ablations.py temporal --data DATASET [--checkpoint checkpoints/l2v] [--frames 100]
DATASET is made by `lmdiff prepare ... --crop-size 128` (the identity runs resize its crops to 64 px). Results are
merged into benchmarks/results/l2v_ablations_<name>.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_landmarks import machine

from lmdiff_core import metrics
from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.checkpoints import BUNDLED_L2V
from lmdiff_core.crop import crop_frames, face_masks
from lmdiff_core.data.store import load_index
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.data.l2v_dataset import L2VFrameDataset
from lmdiff_core.media import iter_frames
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline, sample_window
from lmdiff_core.smoothing import smooth_landmarks

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared"
MEDIAPIPE = SHARED / "weights" / "mediapipe_face_landmarker" / "face_landmarker_v2_with_blendshapes.task"

IDENTITY_VARIANTS = {
    "concat_and_attention": {},
    "concat_only": {
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"],
    },
    "attention_only": {"identity_concat": False},
}
IDENTITY_CONFIG = {
    "autoencoder": "pixel",
    "model": {
        "args": {
            "block_out_channels": [32, 64, 128],
            "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
            "layers_per_block": 1,
            "num_attention_heads": 4,
            "cross_attention_dim": 128,
            "norm_num_groups": 16,
            "temporal_attention": False,
            "prediction_type": "sample",
        }
    },
    "data": {"size": 64, "window": 1, "identity_gap": 25, "topology": "ibug68"},
    "train": {
        "batch_size": 8,
        "lr": 1.0e-3,
        "lr_schedule": "cosine",
        "warmup_steps": 50,
        "ema_decay": 0.99,
        "mouth_weight": 4.0,
        "condition_dropout": 0.1,
        "one_shot": 0.3,
        "grad_clip": 1.0,
        "mixed_precision": "no",
        "cpu": True,
        "seed": 0,
        "log_every": 50,
        "val_every": 100000,
        "checkpoint_every": 100000,
    },
}


# -- identity ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_identity(pipeline: LandmarkToVideoPipeline, dataset: L2VFrameDataset, items: int, steps: int) -> dict:
    """Dubbing mouth PSNR and one-shot crop / mouth PSNR on `items` held-out frames, from ground-truth landmarks."""
    unet, ae = pipeline.unet, pipeline.autoencoder
    picks = torch.linspace(0, len(dataset) - 1, min(items, len(dataset))).round().long().tolist()
    dub, one_shot, targets, mouths = [], [], [], []
    for i in picks:
        item = dataset[i]
        target, mask = item["target"], item["pose_mask"]
        noise = torch.randn(
            (1, ae.latent_channels, *[s // ae.downscale for s in target.shape[-2:]]),
            generator=torch.Generator().manual_seed(i),
        )
        identity = ae.encode(item["identity"][None])
        condition = item["condition"]
        for pose, pose_mask, out in (
            (ae.encode(item["pose_reference"]), mask, dub),
            (identity, torch.ones_like(mask), one_shot),
        ):
            latents = sample_window(unet, pipeline.scheduler, noise, condition, pose, pose_mask, identity, steps)
            out.append(ae.decode(latents))
        dub[-1] = target * (1 - mask) + dub[-1] * mask
        targets.append(target)
        mouths.append(item["mouth_mask"])
    d, o, t, m = (torch.cat(x) for x in (dub, one_shot, targets, mouths))
    return {
        "dub_mouth_psnr": metrics.psnr(d, t, m),
        "one_shot_crop_psnr": metrics.psnr(o, t),
        "one_shot_mouth_psnr": metrics.psnr(o, t, m),
        "frames": len(t),
    }


def run_identity(args) -> dict:
    results = {"steps": args.steps, "crop_size": 64, "autoencoder": "pixel", "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in IDENTITY_VARIANTS.items():
            config = json.loads(json.dumps(IDENTITY_CONFIG))
            config["model"]["args"].update(overrides)
            config["train"]["max_steps"] = args.steps
            config_path = Path(tmp) / f"{name}.yaml"
            config_path.write_text(yaml.safe_dump(config))
            out = Path(tmp) / name
            started = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "train_l2v.py",
                    "--config",
                    str(config_path),
                    "--data",
                    str(args.data),
                    "--out",
                    str(out),
                ],
                cwd=REPO / "training",
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            train_s = time.perf_counter() - started
            pipeline = LandmarkToVideoPipeline.from_pretrained(out / "final", load_autoencoder("pixel"))
            val = L2VFrameDataset(args.data, split="val", window=1, identity_gap=25, seed=1, size=64, topology="ibug68")
            scores = score_identity(pipeline, val, args.items, args.sample_steps)
            params = sum(p.numel() for p in pipeline.unet.parameters())
            results["variants"][name] = {**scores, "parameters": params, "train_seconds": round(train_s, 1)}
            print(name, results["variants"][name], flush=True)
    return results


# -- temporal ------------------------------------------------------------------------------------------------------
TEMPORAL_VARIANTS = {
    "per_frame_fresh_noise": dict(window=1, overlap=0, shared_noise=False),
    "per_frame_shared_noise": dict(window=1, overlap=0, shared_noise=True),
    "windows_shared_noise": dict(window=None, overlap=0, shared_noise=True),
    "windows_overlap_shared_noise (default)": dict(window=None, overlap=None, shared_noise=True),
    "windows_overlap_fresh_noise": dict(window=None, overlap=None, shared_noise=False),
}


def temporal_scores(pred: torch.Tensor, truth: torch.Tensor, mouth: torch.Tensor) -> dict:
    """pred, truth [T, 3, S, S] in [0, 1]; mouth [1, 1, S, S] region (fixed over time)."""
    dp, dt = pred.diff(dim=0), truth.diff(dim=0)
    m = mouth.expand_as(dp)
    change_error = metrics.frame_difference_error(pred, truth, mouth) ** 0.5 * 255
    flicker = float((dp.abs() * m).sum() / ((dt.abs() * m).sum()).clamp(min=1e-8))
    return {
        "mouth_psnr": metrics.psnr(pred, truth, mouth),
        "temporal_error_8bit": change_error,
        "flicker_ratio": flicker,
    }


def run_temporal(args) -> dict:
    pipeline = LandmarkToVideoPipeline.from_pretrained(args.checkpoint, load_autoencoder(args.autoencoder))
    default_window, default_overlap = pipeline.window, pipeline.overlap
    index = load_index(args.data)
    clips = [c for c in index["clips"] if c["split"] == "val"]
    per_variant: dict[str, list[dict]] = {name: [] for name in TEMPORAL_VARIANTS}
    for clip in clips:
        frames = np.stack(list(iter_frames(clip["source"], 25.0, max_frames=args.frames)))
        with load_landmarker("mediapipe", MEDIAPIPE, num_faces=1) as landmarker:
            source = smooth_landmarks(extract_landmarks(frames, landmarker, 25.0, source=clip["source"]))
        opening = source.mouth_opening()
        identity_frame = int(np.argsort(opening)[len(opening) // 2])
        identity = pipeline.reference_crop(frames[identity_frame], source[identity_frame])
        track = pipeline.crop_track(source)
        truth = crop_frames(frames, track)
        mouth = face_masks(source, track, parts=("mouth",))["mouth"].amax(dim=0, keepdim=True)
        frozen = truth[:1].expand_as(truth)  # baseline: the first frame's mouth held (frozen lips)
        per_variant.setdefault("baseline_frozen_lips", []).append(
            {"clip": clip["id"], **temporal_scores(frozen, truth, mouth)}
        )
        for name, variant in TEMPORAL_VARIANTS.items():
            pipeline.window = variant["window"] or default_window
            pipeline.overlap = default_overlap if variant["overlap"] is None else variant["overlap"]
            started = time.perf_counter()
            out = np.stack(
                list(
                    pipeline.generate(
                        frames,
                        source,
                        source,
                        identity,
                        "dub",
                        args.steps,
                        1.0,
                        0,
                        shared_noise=variant["shared_noise"],
                    )
                )
            )
            seconds = time.perf_counter() - started
            scores = temporal_scores(crop_frames(out, track), truth, mouth)
            per_variant[name].append({"clip": clip["id"], **scores, "seconds": round(seconds, 1)})
            print(clip["id"], name, scores, flush=True)
    summary = {
        name: {
            key: float(np.mean([r[key] for r in rows]))
            for key in ("mouth_psnr", "temporal_error_8bit", "flicker_ratio")
        }
        for name, rows in per_variant.items()
    }
    return {
        "checkpoint": str(args.checkpoint),
        "steps": args.steps,
        "frames_per_clip": args.frames,
        "window": default_window,
        "overlap": default_overlap,
        "summary": summary,
        "per_clip": per_variant,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("identity", "temporal"))
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=None, help="training steps (identity) / sampling steps")
    parser.add_argument("--sample-steps", type=int, default=10)
    parser.add_argument("--items", type=int, default=48)
    parser.add_argument("--checkpoint", type=Path, default=BUNDLED_L2V)
    parser.add_argument("--autoencoder", default="pixel")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--name", default="cpu_2core")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.what == "identity":
        args.steps = args.steps or 600
        section = run_identity(args)
    else:
        args.steps = args.steps or 10
        section = run_temporal(args)
    path = RESULTS / f"l2v_ablations_{args.name}.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report.update(
        {
            "machine": machine(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dataset_clips": [c["id"] for c in load_index(args.data)["clips"]],
            args.what: section,
        }
    )
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
