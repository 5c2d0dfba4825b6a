"""A2L speed and memory: frames/s and peak memory of both models, tiny and base sizes, for 10 s and 60 s of speech.

Usage: python benchmarks/bench_a2l.py --audio SPEECH.wav [--name cpu_2core]
Each case runs in its own process so its peak resident memory can be read; weights are random (speed does not
depend on them). Writes benchmarks/results/a2l_<name>.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
CASES = {
    "lstm_tiny": "a2l_lstm_tiny_cpu.yaml",
    "lstm_base": "a2l_lstm_base_gpu.yaml",
    "diffusion_tiny": "a2l_diffusion_tiny_cpu.yaml",
    "diffusion_base": "a2l_diffusion_base_gpu.yaml",
}


def run_case(config_name: str, audio_path: str, seconds: float, steps: int, device: str, queue) -> None:
    import torch

    from lmdiff_core import LandmarkSequence
    from lmdiff_core.canonical import CANONICAL_SIZE, mean_face
    from lmdiff_core.media import read_audio
    from lmdiff_core.models import A2LLSTM, A2LDiffusion
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline

    config = yaml.safe_load((CONFIGS / config_name).read_text())
    cls = {"A2LLSTM": A2LLSTM, "A2LDiffusion": A2LDiffusion}[config["model"]["class"]]
    args = dict(config["model"].get("args", {}))
    if cls is A2LDiffusion:
        args.update(window=config["data"]["window"], prev_frames=config["data"]["prev_frames"])
    torch.manual_seed(0)
    model = cls(**args).to(device)
    pipeline = AudioToLandmarksPipeline(model, window=config["data"]["window"])
    speech = read_audio(audio_path)
    audio = np.tile(speech, int(np.ceil(seconds * 16000 / len(speech))))[: int(seconds * 16000)]
    reference = LandmarkSequence(mean_face("ibug68")[None], "ibug68", frame_size=CANONICAL_SIZE, space="canonical")
    pipeline(audio[:16000], reference, num_inference_steps=2)  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = pipeline(audio, reference, num_inference_steps=steps)
    elapsed = time.perf_counter() - start
    queue.put(
        {
            "frames": len(out),
            "seconds": elapsed,
            "frames_per_s": len(out) / elapsed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            "parameters": sum(p.numel() for p in model.parameters()),
            "sampling_steps": steps if cls is A2LDiffusion else None,
        }
    )


def machine() -> dict:
    import os
    import platform

    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio", required=True, help="a speech recording (tiled to the benchmark lengths)")
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="diffusion sampling steps")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 60.0])
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = {}
    for case, config in CASES.items():
        for seconds in args.seconds:
            queue = ctx.Queue()
            proc = ctx.Process(target=run_case, args=(config, args.audio, seconds, args.steps, args.device, queue))
            proc.start()
            results[f"{case}_{seconds:g}s"] = queue.get()
            proc.join()
            print(case, seconds, results[f"{case}_{seconds:g}s"], flush=True)
    report = {
        "benchmark": "a2l",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "device": args.device,
        "note": "random weights; diffusion uses DDIM with classifier-free guidance (2 model passes per step)",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"a2l_{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
