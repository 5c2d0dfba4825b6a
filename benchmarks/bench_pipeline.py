"""Speed and memory of the whole talking-head pipeline (dubbing a real clip), stage by stage.

For each U-Net size, crop size (256, 512) and number of sampling steps (1, 4, 25), in a fresh process: dub the first
--frames frames of a real clip with its own speech through `TalkingHeadPipeline` (A2L: the bundled checkpoint, or
a random LSTM without it; L2V: a U-Net of the named configuration with random weights, which cost the same time as
trained ones) and write the mp4. Reports the seconds of each stage (landmarks, a2l, crop, encode, denoise, decode,
paste_back, write_video), frames/s of the whole run and of L2V alone, and peak memory (resident-memory growth on
a CPU, peak allocated on a GPU).

Memory against audio length (--lengths 10 600): a portrait (the clip's first frame) animated in "still" mode for
10 s and for 10 min of speech (the clip's audio repeated), streamed into an mp4 as the frames come, with the bundled
A2L and the tiny L2V U-Net on the weightless pixel autoencoder at 1 step and 64 px crops, in 256 x 256 frames, so
that the run is short; the model's size does not change whether memory grows with the length. Peak resident memory of each run, in a fresh process.

Fast mode (--fast): dub the first --frames frames of the clip (an mp4 on disk) with its speech in
`TalkingHeadPipeline.generate(mode="fast")` at each --sizes crop size: decode, landmarks, A2L (the bundled
checkpoint), the appearance bank (built from the video itself), retrieval, warp, paste-back and writing the mp4, each
timed (frames decoded for the output pass, and the A2L features, fall in "untimed": total minus the timed stages);
frames/s end to end. With --lengths, memory against length in fast mode too: the portrait dubbed as a still for
10 s and 10 min of speech, 128 px crops. Quality mode (--quality): the same run in `mode="quality"` with the bundled
refiner (checkpoints/refiner, its own steps), which adds the refiner's encode, denoise and decode stages.

Usage: python benchmarks/bench_pipeline.py [--models default base] [--sizes 256 512] [--steps 1 4 25] [--frames 12]
       [--autoencoder PATH] [--device cpu|cuda] [--name cpu_2core] [--merge]
       python benchmarks/bench_pipeline.py --lengths 10 600 [--fast] [--device cpu|cuda] [--name cpu_2core]
       python benchmarks/bench_pipeline.py --fast|--quality [--sizes 256 512] [--frames 250] [--name cpu_2core]
Writes benchmarks/results/pipeline_<name>.json (pipeline_{fast,quality}_<name>.json, pipeline_memory[_fast]_<name>.json)
with
the machine described.
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
FAST_STAGES = ("landmarks", "bank", "a2l", "retrieve", "crop", "warp", "paste_back", "write_video")
QUALITY_STAGES = ("landmarks", "bank", "a2l", "retrieve", "crop", "warp", "encode", "denoise", "decode", "paste_back",
                  "write_video")


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


def run_fast_case(case: dict, queue) -> None:
    import torch

    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_L2V, BUNDLED_REFINER
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.media import iter_frames, read_audio, write_video
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline
    from lmdiff_core.pipelines.timing import StageTimer

    torch.manual_seed(0)
    quality = case["mode"] == "quality"
    # the L2V holds the timer; fast mode does not run it, quality mode runs the refiner
    l2v = LandmarkToVideoPipeline.from_pretrained(BUNDLED_REFINER if quality else BUNDLED_L2V)
    l2v.set_autoencoder(load_autoencoder("pixel"))
    pipeline = TalkingHeadPipeline(AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L), l2v)
    timer = l2v.timer = StageTimer()
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(case["clip"])
        frames = list(iter_frames(clip, 25.0, max_frames=case["frames"]))
        audio = read_audio(clip.with_suffix(".wav"))[: len(frames) * 640]
        video = Path(tmp) / "source.mp4"
        write_video(video, frames, 25.0, audio=audio)
        frame_size = list(frames[0].shape[1::-1])
        del frames
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        with load_landmarker("mediapipe", MEDIAPIPE, num_faces=1) as landmarker:
            out, n = pipeline.generate(
                audio, landmarker, video=video, mode=case["mode"], crop_size=case["size"], seed=0
            )
            with timer("write_video"):  # the output pass (retrieve, crop, warp, [refiner,] paste_back) runs inside
                write_video(Path(tmp) / "out.mp4", out, 25.0, audio=audio)
        total = time.perf_counter() - started
    stages = QUALITY_STAGES if quality else FAST_STAGES
    seconds = {stage: round(timer.seconds.get(stage, 0.0), 3) for stage in stages}
    inner = sum(seconds[s] for s in stages if s not in ("landmarks", "bank", "a2l", "write_video"))
    seconds["write_video"] = round(seconds["write_video"] - inner, 3)  # the encoder alone
    seconds["untimed"] = round(total - sum(seconds.values()), 3)
    queue.put(
        {
            **case,
            "frame_size": frame_size,
            "frames_out": n,
            "seconds": seconds,
            "ms_per_frame": {k: round(1000 * v / n, 2) for k, v in seconds.items()},
            "total_seconds": round(total, 3),
            "frames_per_second": round(n / total, 2),
            "threads": torch.get_num_threads(),
            "peak_rss_growth_mib": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, 1),
        }
    )


def fast_speed(args, mode: str = "fast") -> None:
    results = []
    for size in args.sizes:
        case = dict(mode=mode, size=size, frames=args.frames, clip=args.clip)
        results.append(_in_fresh_process(run_fast_case, case))
        print(json.dumps(results[-1]), flush=True)
    _write(RESULTS / f"pipeline_{mode}_{args.name}.json", __doc__.split("\n\n")[2], results)


def _write(path: Path, what: str, results: list) -> None:
    report = {
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "what": what.replace("\n", " "),
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")


def run_length_case(case: dict, queue) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.checkpoints import BUNDLED_A2L
    from lmdiff_core.detectors import load_landmarker
    from lmdiff_core.media import iter_frames, read_audio, write_video
    from lmdiff_core.models import L2VUNet
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.schedulers import make_scheduler
    from lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

    torch.manual_seed(0)
    device = torch.device(case["device"])
    autoencoder = load_autoencoder("pixel", device=device)
    config = yaml.safe_load((REPO / "training" / "configs" / "l2v_tiny_cpu.yaml").read_text())
    args = dict(config["model"]["args"])
    args.update(latent_channels=autoencoder.latent_channels, downscale=autoencoder.downscale, autoencoder="pixel")
    unet = L2VUNet(**args).to(device).eval()
    window, overlap = config["data"]["window"], config["data"].get("overlap", 1)
    l2v = LandmarkToVideoPipeline(
        unet, make_scheduler(unet, "ddim"), autoencoder, case["size"], "ibug68", window, overlap
    )
    pipeline = TalkingHeadPipeline(AudioToLandmarksPipeline.from_pretrained(BUNDLED_A2L), l2v)
    clip = Path(case["clip"])
    first = next(iter_frames(clip, 25.0, max_frames=1))
    portrait = np.asarray(Image.fromarray(first).resize((case["frame"], case["frame"]), Image.LANCZOS))
    speech = read_audio(clip.with_suffix(".wav"))
    audio = np.resize(speech, int(case["seconds"] * 16000))  # the clip's speech repeated to the length
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, load_landmarker("mediapipe", MEDIAPIPE, num_faces=1) as landmarker:
        mode = dict(mode="fast", crop_size=case["size"]) if case.get("mode") == "fast" else {}
        frames, n = pipeline.generate(
            audio, landmarker, image=portrait, image_mode="still", num_inference_steps=1, seed=0, **mode
        )
        write_video(Path(tmp) / "out.mp4", frames, 25.0, audio=audio)  # frames are encoded as they come
    total = time.perf_counter() - started
    result = {
        **case,
        "frames_out": n,
        "frame_size": list(portrait.shape[1::-1]),
        "total_seconds": round(total, 1),
        "frames_per_second": round(n / total, 2),
        "rss_before_mib": round(before / 1024, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    result["peak_rss_growth_mib"] = round(result["peak_rss_mib"] - result["rss_before_mib"], 1)
    if device.type == "cuda":
        result["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    queue.put(result)


def _in_fresh_process(target, case: dict) -> dict:
    queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(case, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def memory_against_length(args) -> None:
    results = []
    for seconds in args.lengths:
        case = dict(seconds=seconds, size=64, frame=256, steps=1, clip=args.clip, device=args.device)
        if args.fast:
            case.update(mode="fast", size=128)
        results.append(_in_fresh_process(run_length_case, case))
        print(json.dumps(results[-1]), flush=True)
    name = f"pipeline_memory_fast_{args.name}.json" if args.fast else f"pipeline_memory_{args.name}.json"
    _write(RESULTS / name, __doc__.split("\n\n")[2], results)


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
    parser.add_argument("--lengths", nargs="+", type=float, help="seconds of audio: measure memory against length")
    parser.add_argument("--fast", action="store_true", help="fast mode (appearance bank, no U-Net)")
    parser.add_argument("--quality", action="store_true", help="quality mode with the bundled refiner")
    args = parser.parse_args()
    if args.lengths:
        return memory_against_length(args)
    if args.fast or args.quality:
        return fast_speed(args, "quality" if args.quality else "fast")
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
                result = _in_fresh_process(run_case, case)
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
    _write(path, __doc__.split("\n\n")[1], results)


if __name__ == "__main__":
    main()
