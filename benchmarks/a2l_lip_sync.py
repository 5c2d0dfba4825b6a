"""A2L lip sync on held-out people, silent stretches, and the speed / memory of Whisper-base features.

Usage: python benchmarks/a2l_lip_sync.py [--data DATASET --checkpoint NAME=FOLDER ...] [--name cpu_2core]
    [--speech SPEECH.wav --speed-checkpoint FOLDER] [--cache FOLDER]
(each run adds its checkpoints / speed cases to the results file of that name, replacing entries of the same name)

DATASET is a folder made by `lmdiff prepare` (any features: each checkpoint computes its own from the clips' stored
16 kHz audio). For every checkpoint and every clip of the validation split (people held out of training):

- mouth-opening r: Pearson correlation between the predicted and the real inner-lip gap per frame, and mouth LMD:
  mean distance of the lip landmarks in inter-ocular units, the real first frame as the reference; both for the
  clip's own audio features and for the same features in shuffled frame order (a control with no sync left).
  The model runs without the pipeline's silence gate here, so the numbers are the model's own.
- silent stretches (every clip, the pipeline as users run it, silence gate included): frames that
  `silence_gate` marks fully silent; mean mouth opening and mean lip motion (lip landmark speed, inter-ocular units
  per frame) there, predicted and real, beside the same numbers in speech.

With ``--speech``: the Whisper-base encoder's CPU time per minute of audio (1 and 2 threads), the whole A2L run
(features included) on 60 s of speech with ``--speed-checkpoint``, as a multiple of real time on 2 threads, and the
peak memory of A2L on 10 s and 10 min of speech (each in its own process). Writes
benchmarks/results/a2l_lip_sync_<name>.json and .md.
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

RESULTS = Path(__file__).resolve().parent / "results"


def _reference(truth):
    return truth[:1]


def clip_scores(pipeline, truth, features, audio, steps: int) -> dict:
    """Real vs shuffled-feature r and mouth LMD (no silence gate), and silent-stretch statistics (gate on)."""
    from lmdiff_core.canonical import to_model_units
    from lmdiff_core.pipelines.a2l import silence_gate
    from lmdiff_core.topology import get_topology

    topo = get_topology(pipeline.topology)
    lips = np.union1d(topo.part_indices("outer_lips"), topo.part_indices("inner_lips"))  # as the trainer's lip loss
    shuffled = features[np.random.default_rng(0).permutation(len(features))]
    out = {"frames": len(truth)}
    real_open = truth.mouth_opening()
    for label, feats in (("audio", features), ("shuffled", shuffled)):
        pred = pipeline.predict_features(feats, _reference(truth), num_inference_steps=steps, seed=0)
        opening = pred.mouth_opening()
        out[f"r_{label}"] = float(np.corrcoef(real_open, opening)[0, 1]) if opening.std() > 0 else 0.0
        diff = to_model_units(pred.points)[:, lips] - to_model_units(truth.points)[:, lips]
        out[f"mouth_lmd_{label}"] = float(np.linalg.norm(diff, axis=-1).mean())
    gate = silence_gate(audio, len(truth), pipeline.fps, 16000)
    silent = gate >= 1.0
    out["silent_frames"] = int(silent.sum())
    if silent.any() and (~silent).any():
        pred = pipeline.predict_features(features, _reference(truth), silence=gate, num_inference_steps=steps, seed=0)
        pred_lips, true_lips = to_model_units(pred.points)[:, lips], to_model_units(truth.points)[:, lips]
        speed_p = np.r_[0.0, np.linalg.norm(np.diff(pred_lips, axis=0), axis=-1).mean(axis=1)]
        speed_t = np.r_[0.0, np.linalg.norm(np.diff(true_lips, axis=0), axis=-1).mean(axis=1)]
        open_p = pred.mouth_opening()
        for where, mask in (("silence", silent), ("speech", ~silent)):
            out[f"opening_pred_{where}"] = float(open_p[mask].mean())
            out[f"opening_real_{where}"] = float(real_open[mask].mean())
            out[f"motion_pred_{where}"] = float(speed_p[mask].mean())
            out[f"motion_real_{where}"] = float(speed_t[mask].mean())
    return out


def lip_sync(data: Path, checkpoints: dict[str, Path], cache: Path | None, steps: int) -> dict:
    from lmdiff_core import LandmarkSequence
    from lmdiff_core.audio_features import FeatureCache
    from lmdiff_core.canonical import CANONICAL_SIZE
    from lmdiff_core.data.store import clip_arrays, load_index
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline
    from lmdiff_core.topology import convert_points

    index = load_index(data)
    results = {}
    for name, folder in checkpoints.items():
        pipeline = AudioToLandmarksPipeline.from_pretrained(folder)
        feature_cache = FeatureCache(cache) if cache else None
        rows = {}
        for clip in index["clips"]:
            arrays = clip_arrays(data, clip["id"])
            points = convert_points(arrays["points"], index["topology"], pipeline.topology)
            truth = LandmarkSequence(points, pipeline.topology, frame_size=CANONICAL_SIZE, space="canonical")
            audio = arrays["audio"]  # float32, 16 kHz
            n = len(truth)
            if feature_cache is not None:
                features = feature_cache.get_or_compute(pipeline.features, audio, n)
            else:
                features = pipeline.features(audio, n)
            rows[clip["id"]] = {"split": clip["split"], **clip_scores(pipeline, truth, features, audio, steps)}
            print(name, clip["id"], rows[clip["id"]], flush=True)
        held = [r for r in rows.values() if r["split"] == "val"]
        results[name] = {
            "checkpoint": str(folder),
            "features": pipeline.features.config(),
            "clips": rows,
            "held_out_mean": {
                k: float(np.mean([r[k] for r in held]))
                for k in ("r_audio", "r_shuffled", "mouth_lmd_audio", "mouth_lmd_shuffled")
            },
            "train_mean_r_audio": float(np.mean([r["r_audio"] for r in rows.values() if r["split"] == "train"])),
        }
    return results


def _speed_case(kind: str, checkpoint: str, speech: str, seconds: float, threads: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    from lmdiff_core import LandmarkSequence
    from lmdiff_core.audio_features import load_feature_extractor
    from lmdiff_core.canonical import CANONICAL_SIZE, mean_face
    from lmdiff_core.media import read_audio
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline

    voice = read_audio(speech)
    audio = np.tile(voice, int(np.ceil(seconds * 16000 / len(voice))))[: int(seconds * 16000)]
    if kind == "encoder":
        features = load_feature_extractor("whisper-base")
        features(audio[:16000])  # loads the weights
        start = time.perf_counter()
        features(audio)
        queue.put({"seconds_audio": seconds, "threads": threads, "wall_s_per_min_audio": (time.perf_counter() - start) * 60 / seconds})
        return
    pipeline = AudioToLandmarksPipeline.from_pretrained(checkpoint)
    reference = LandmarkSequence(mean_face("ibug68")[None], "ibug68", frame_size=CANONICAL_SIZE, space="canonical")
    pipeline(audio[:16000], reference)  # loads the encoder weights; then features + model, end to end
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = pipeline(audio, reference)
    elapsed = time.perf_counter() - start
    queue.put(
        {
            "seconds_audio": seconds,
            "threads": threads,
            "frames": len(out),
            "wall_s": elapsed,
            "x_real_time": seconds / elapsed,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_rss_before_run_mib": before / 1024,
        }
    )


def speed(checkpoint: Path, speech: Path) -> dict:
    ctx = mp.get_context("spawn")
    results = {}
    cases = [("encoder", 60.0, 1), ("encoder", 60.0, 2), ("a2l", 60.0, 1), ("a2l", 60.0, 2), ("a2l", 10.0, 2), ("a2l", 600.0, 2)]
    for kind, seconds, threads in cases:
        queue = ctx.Queue()
        proc = ctx.Process(target=_speed_case, args=(kind, str(checkpoint), str(speech), seconds, threads, queue))
        proc.start()
        results[f"{kind}_{seconds:g}s_{threads}threads"] = queue.get()
        proc.join()
        print(kind, seconds, threads, results[f"{kind}_{seconds:g}s_{threads}threads"], flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [f"# A2L lip sync and Whisper-base cost ({report['machine']['cpu']}, {report['date']})", ""]
    names = list(report["lip_sync"])
    held = [c for c, r in report["lip_sync"][names[0]]["clips"].items() if r["split"] == "val"] if names else []
    lines += [
        "Held-out clips: mouth-opening r with the clip's audio (with its audio features in shuffled order); mouth LMD",
        "(lip landmarks, inter-ocular units) with the audio (shuffled).",
        "",
        "| checkpoint | " + " | ".join(held) + " | mean r | mean mouth LMD |",
        "|---|" + "---|" * (len(held) + 2),
    ]
    for name in names:
        result = report["lip_sync"][name]
        cells = [f"{result['clips'][c]['r_audio']:.2f} ({result['clips'][c]['r_shuffled']:.2f})" for c in held]
        mean = result["held_out_mean"]
        cells += [
            f"**{mean['r_audio']:.2f}** ({mean['r_shuffled']:.2f})",
            f"{mean['mouth_lmd_audio']:.4f} ({mean['mouth_lmd_shuffled']:.4f})",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Silent stretches (all clips with some; pipeline with its silence gate): mean mouth opening and lip motion, predicted vs real.", ""]
    lines += ["| checkpoint | silent frames | opening pred / real (silence) | opening pred / real (speech) | motion pred / real (silence) | motion pred / real (speech) |", "|---|---|---|---|---|---|"]
    for name in names:
        rows = [r for r in report["lip_sync"][name]["clips"].values() if "opening_pred_silence" in r]
        if not rows:
            continue
        w = np.array([r["silent_frames"] for r in rows], float)

        def avg(key, weights=w):
            return float(np.average([r[key] for r in rows], weights=weights))

        lines.append(
            f"| {name} | {int(w.sum())} in {len(rows)} clips | {avg('opening_pred_silence'):.3f} / {avg('opening_real_silence'):.3f} | "
            f"{avg('opening_pred_speech'):.3f} / {avg('opening_real_speech'):.3f} | {avg('motion_pred_silence'):.4f} / "
            f"{avg('motion_real_silence'):.4f} | {avg('motion_pred_speech'):.4f} / {avg('motion_real_speech'):.4f} |"
        )
    if report.get("speed"):
        lines += ["", f"Speed and memory ({report['speed_checkpoint']}, {report['machine']['cores']} cores):", ""]
        if report.get("speed_note"):
            lines += [report["speed_note"], ""]
        for key, value in report["speed"].items():
            lines.append(f"- {key}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items()))
    return "\n".join(lines) + "\n"


def main():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench_a2l import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="dataset folder made by `lmdiff prepare`")
    parser.add_argument("--checkpoint", action="append", default=[], help="NAME=FOLDER (repeatable)")
    parser.add_argument("--speech", type=Path, help="speech recording for the speed and memory cases")
    parser.add_argument("--speed-checkpoint", type=Path, help="A2L checkpoint for the speed and memory cases")
    parser.add_argument("--cache", type=Path, help="feature cache folder")
    parser.add_argument("--steps", type=int, default=25, help="diffusion sampling steps")
    parser.add_argument("--name", default="cpu_2core")
    args = parser.parse_args()
    path = RESULTS / f"a2l_lip_sync_{args.name}.json"
    report = json.loads(path.read_text()) if path.is_file() else {"benchmark": "a2l_lip_sync", "lip_sync": {}}
    report.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), machine=machine())
    if args.checkpoint:
        checkpoints = {k: Path(v) for k, v in (item.split("=", 1) for item in args.checkpoint)}
        report["data"] = str(args.data)
        report["lip_sync"].update(lip_sync(args.data, checkpoints, args.cache, args.steps))
    if args.speech:
        report["speed_checkpoint"] = str(args.speed_checkpoint)
        report["speed"] = speed(args.speed_checkpoint, args.speech)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown(report))


if __name__ == "__main__":
    main()
