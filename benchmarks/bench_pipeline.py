"""Speed and memory of the whole talking-head pipeline (dubbing a real clip), stage by stage.

For each U-Net size, crop size (256, 512) and number of sampling steps (1, 4, 25), in a fresh process: dub the first
--frames frames of a real clip with its own speech through `TalkingHeadPipeline` (A2L: the bundled checkpoint, or
a random LSTM without it; L2V: a U-Net of the named configuration with random weights, which cost the same time as
trained ones) and write the mp4. Reports the seconds of each stage (landmarks, a2l, crop, encode, denoise, decode,
paste_back, write_video), frames/s of the whole run and of L2V alone, and peak memory (resident-memory growth on
a CPU, peak allocated on a GPU).

Usage: python benchmarks/bench_pipeline.py [--models default base] [--sizes 256 512] [--steps 1 4 25] [--frames 12]
       [--autoencoder PATH] [--device cpu|cuda] [--name cpu_2core] [--merge]
Writes benchmarks/results/pipeline_<name>.json with the machine described.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml
from bench_landmarks import machine

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHARED = REPO.parent / "shared"
MEDIAPIPE = SHARED / "weights" / "mediapipe_face_landmarker" / "face_landmarker_v2_with_blendshapes.task"
MODEL_CONFIGS = {"default": "l2v_default_cpu.yaml", "base": "l2v_base_gpu.yaml"}
STAGES = ("landmarks", "a2l", "crop", "encode", "denoise", "decode", "paste_back", "write_video")


def run_case(case: dict, queue) -> None:
    import torch

    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_A2L
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.media import iter_frames, read_audio, write_video
    from lmdiff_core.models import A2LLSTM, L2VUNet
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.schedulers import make_scheduler
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline
    from lmdiff_core.pipelines.timing import StageTimer

    torch.manual_seed(0)
    device = torch.device(case["device"])
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    autoencoder = load_autoencoder(case["autoencoder"], device=device, dtype=dtype)
    config = yaml.safe_load((REPO / "training" / "configs" / MODEL_CONFIGS[case["model"]]).read_text())
    args = dict(config["model"]["args"])
    args.update(
        latent_channels=autoencoder.latent_channels, downscale=autoencoder.downscale, autoencoder=autoencoder.kind
    )
    unet = L2VUNet(**args).to(device, dtype).eval()
    window, overlap = config["data"]["window"], config["data"].get("overlap", 1)
    l2v = LandmarkToVideoPipeline(
        unet, make_scheduler(unet, "ddim"), autoencoder, case["size"], "ibug68", window, overlap
    )
    if BUNDLED_A2L.is_dir():
        a2l = AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L)
    else:
        a2l = AudioToLandmarksPipeline(A2LLSTM(hidden_size=96, num_layers=1).eval())
    pipeline = TalkingHeadPipeline(a2l, l2v)
    timer = l2v.timer = StageTimer()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(case["clip"])
        frames = list(iter_frames(clip, 25.0, max_frames=case["frames"]))
        audio = read_audio(clip.with_suffix(".wav"))[: case["frames"] * 640]
        video = Path(tmp) / "source.mp4"
        write_video(video, frames, 25.0, audio=audio)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        with load_landmarker("mediapipe", MEDIAPIPE, num_faces=1) as landmarker:
            out, n = pipeline.generate(audio, landmarker, video=video, num_inference_steps=case["steps"], seed=0)
            frames_out = list(out)  # the L2V stages run here (timed inside the pipeline)
        with timer("write_video"):
            write_video(Path(tmp) / "out.mp4", frames_out, 25.0, audio=audio)
        total = time.perf_counter() - started
    seconds = {stage: round(timer.seconds.get(stage, 0.0), 3) for stage in STAGES}
    l2v_seconds = sum(seconds[s] for s in ("crop", "encode", "denoise", "decode", "paste_back"))
    result = {
        **case,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "latent": [autoencoder.latent_channels, case["size"] // autoencoder.downscale],
        "frames_out": n,
        "seconds": seconds,
        "slowest_stage": max(seconds, key=seconds.get),
        "total_seconds": round(total, 3),
        "frames_per_second": round(n / total, 3),
        "l2v_frames_per_second": round(n / l2v_seconds, 3),
        "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1),
    }
    if device.type == "cuda":
        result["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    queue.put(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["default"], choices=list(MODEL_CONFIGS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 4, 25])
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--clip", default=str(SHARED / "data" / "clips" / "cnn_anchor_en.mp4"))
    parser.add_argument("--autoencoder", default=str(SHARED / "weights" / "taef2"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="cpu_2core")
    parser.add_argument("--merge", action="store_true", help="replace only these cases in an existing results file")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = []
    for model in args.models:
        for size in args.sizes:
            for steps in args.steps:
                case = dict(
                    model=model,
                    size=size,
                    steps=steps,
                    frames=args.frames,
                    clip=args.clip,
                    autoencoder=args.autoencoder,
                    device=args.device,
                )
                queue = ctx.Queue()
                proc = ctx.Process(target=run_case, args=(case, queue))
                proc.start()
                result = queue.get()
                proc.join()
                results.append(result)
                print(
                    json.dumps(
                        {
                            k: result[k]
                            for k in (
                                "model",
                                "size",
                                "steps",
                                "frames_per_second",
                                "slowest_stage",
                                "seconds",
                                "peak_rss_growth_mib",
                            )
                        }
                    ),
                    flush=True,
                )
    path = RESULTS / f"pipeline_{args.name}.json"
    if args.merge and path.is_file():
        key = lambda r: (r["model"], r["size"], r["steps"])  # noqa: E731
        new = {key(r) for r in results}
        results = sorted([r for r in json.loads(path.read_text())["results"] if key(r) not in new] + results, key=key)
    report = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
