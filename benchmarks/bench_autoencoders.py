"""Tiny image autoencoders (TAESD, TAEF1, TAEF2) on aligned face crops of real clips: reconstruction PSNR over the
whole crop and inside the mouth mask, encode / decode speed and latent shape, at crop sizes 128, 256 and 512.

Frames are sampled at --sample-fps from the start of each clip, landmarks come from MediaPipe, crops from
`compute_crop_track` + `crop_frames` and the mouth mask from `face_masks`.

Usage: python benchmarks/bench_autoencoders.py [--clips A.mp4 B.mp4 ...] [--frames 8] [--name cpu_2core]
Writes benchmarks/results/autoencoders_<name>.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import diffusers
import numpy as np
import torch
from bench_landmarks import machine

from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.crop import compute_crop_track, crop_frames, face_masks
from lmdiff_core.detectors import extract_landmarks, load_landmarker
from lmdiff_core.media import iter_frames

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_CLIPS = ("cnn_anchor_en.mp4", "macron_fr.mp4", "latentsync_man_a.mp4")
KINDS = ("taesd", "taef1", "taef2")


def face_crops(clip: Path, model: Path, n_frames: int, sample_fps: float, sizes) -> dict[int, tuple]:
    """{size: (crops [N, 3, S, S], mouth masks [N, 1, S, S])} of the first `n_frames` frames at `sample_fps`."""
    frames = np.stack(list(iter_frames(clip, sample_fps, max_frames=n_frames)))
    with load_landmarker("mediapipe", model, num_faces=1) as landmarker:
        seq = extract_landmarks(frames, landmarker, fps=sample_fps, source=str(clip))
    out = {}
    for size in sizes:
        track = compute_crop_track(seq, size=size)
        out[size] = (crop_frames(frames, track), face_masks(seq, track, parts=("mouth",))["mouth"])
    return out


def psnr(decoded: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    """Per-image PSNR in dB (images in [0, 1]); with a mask [N, 1, H, W], over the masked pixels only."""
    squared = (decoded - target) ** 2
    if mask is None:
        mse = squared.flatten(1).mean(1)
    else:
        mse = (squared * mask).flatten(1).sum(1) / (mask.flatten(1).sum(1) * 3)
    return (10 * torch.log10(1 / mse)).numpy()


def timed_ms_per_frame(fn, x: torch.Tensor, batch_size: int) -> tuple[float, torch.Tensor]:
    """(milliseconds per frame, fn(x)) after a one-frame warm-up."""
    fn(x[:1], batch_size=batch_size)
    start = time.perf_counter()
    result = fn(x, batch_size=batch_size)
    return (time.perf_counter() - start) * 1000 / len(x), result


def bench_autoencoder(autoencoder, crops: torch.Tensor, mouth: torch.Tensor, batch_size: int) -> dict:
    encode_ms, latents = timed_ms_per_frame(autoencoder.encode, crops, batch_size)
    decode_ms, decoded = timed_ms_per_frame(autoencoder.decode, latents, batch_size)
    has_mouth = mouth.flatten(1).sum(1) > 0
    return {
        "psnr_db": float(psnr(decoded, crops).mean()),
        "psnr_mouth_db": float(psnr(decoded[has_mouth], crops[has_mouth], mouth[has_mouth]).mean()),
        "encode_ms_per_frame": encode_ms,
        "decode_ms_per_frame": decode_ms,
        "latent_shape": list(latents.shape[1:]),
        "latent_std": float(latents.std()),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", nargs="+", type=Path, default=[SHARED / "data/clips" / c for c in DEFAULT_CLIPS])
    parser.add_argument(
        "--model",
        type=Path,
        default=SHARED / "weights/mediapipe_face_landmarker/face_landmarker_v2_with_blendshapes.task",
        help="MediaPipe face_landmarker .task",
    )
    parser.add_argument(
        "--weights", type=Path, default=SHARED / "weights", help="folder holding taesd/, taef1/, taef2/"
    )
    parser.add_argument("--frames", type=int, default=5, help="frames per clip")
    parser.add_argument("--sample-fps", type=float, default=2.0, help="frame sampling rate (spreads mouth shapes)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256, 512])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--name", default="cpu_2core", help="machine label for the result file name")
    args = parser.parse_args()

    load_before = os.getloadavg()
    per_clip = [face_crops(clip, args.model, args.frames, args.sample_fps, args.sizes) for clip in args.clips]
    autoencoders = {kind: load_autoencoder(args.weights / kind) for kind in KINDS}
    results = {}
    for size in args.sizes:
        crops = torch.cat([clip[size][0] for clip in per_clip])
        mouth = torch.cat([clip[size][1] for clip in per_clip])
        results[str(size)] = {
            kind: bench_autoencoder(autoencoder, crops, mouth, args.batch_size)
            for kind, autoencoder in autoencoders.items()
        }
        print(size, json.dumps(results[str(size)]), flush=True)
    result = {
        "benchmark": "autoencoders",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine(), "diffusers": diffusers.__version__},
        "load_average_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "clips": [clip.name for clip in args.clips],
        "frames_per_clip": args.frames,
        "sample_fps": args.sample_fps,
        "batch_size": args.batch_size,
        "crop": "compute_crop_track defaults (whole face, eye-aligned), crop_frames bilinear + antialias",
        "mouth_mask": "face_masks 'mouth': outer-lip hull dilated by 0.15 x mouth width",
        "psnr": "mean over frames of per-frame PSNR (dB) of decode(encode(crop)) against the crop",
        "results_by_crop_size": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"autoencoders_{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
