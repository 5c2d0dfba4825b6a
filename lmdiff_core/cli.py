"""The `lmdiff` command line. Exit codes: 0 success, 2 user error (one line on stderr), 1 internal error."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import LmdiffInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
DEFAULT_FPS = 25.0
DEFAULT_MAX_GAP = 12


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False, disable=None)


def _with_progress(frames, total: int, desc: str):
    """Pass frames through while a progress bar counts them."""
    with _progress(total, desc) as bar:
        for frame in frames:
            bar.update(1)
            yield frame


def _writable(folder: Path, what: str, target: Path) -> None:
    """Refuse `target` when a file cannot be created in `folder` (tried for real: permissions, read-only disks)."""
    probe = folder / f".lmdiff-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.open("x").close()
        probe.unlink()
    except OSError as exc:
        raise LmdiffInputError(f"cannot write {what} {target}: its folder {folder} is not writable ({exc.strerror})")


def _output(path: str, suffixes: tuple[str, ...], what: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise LmdiffInputError(f"{what} {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise LmdiffInputError(f"{what} {out} is a directory; expected a file path")
    if not out.parent.is_dir():
        raise LmdiffInputError(f"cannot write {what} {out}: its folder {out.parent} does not exist")
    _writable(out.parent, what, out)
    return out


def _output_folder(path: str, what: str) -> Path:
    """An output folder (created later by the command, with its parents): not a file, and writable."""
    out = Path(path).expanduser()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise LmdiffInputError(f"{what} {out}: {existing} is a file; expected a folder (new or existing)")
    _writable(existing, what, out)
    return out


def _given(args, *names: str) -> list[str]:
    """The options among `names` that this run's command has and that the user set to other than their default."""
    return [
        f"--{n.replace('_', '-')}" for n in names if hasattr(args, n) and getattr(args, n) != args.parser.get_default(n)
    ]


def _refuse(args, names: tuple[str, ...], why: str) -> None:
    """Refuse options that would do nothing in this run, rather than ignore them."""
    given = _given(args, *names)
    if given:
        raise LmdiffInputError(f"{' and '.join(given)} {'does' if len(given) == 1 else 'do'} nothing {why}")


def _fps(args) -> float:
    return DEFAULT_FPS if args.fps is None else args.fps


def _max_gap(args) -> int:
    return DEFAULT_MAX_GAP if args.max_gap is None else args.max_gap


def _face_selector(value: str | None):
    if value is None or value == "largest":
        return "largest"
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise LmdiffInputError(f"--face must be 'largest' or a face index (0 = leftmost), got {value!r}")
    return index


def _open_landmarker(args, video: bool):
    from .detectors import MEDIAPIPE_MODEL_ENV, load_landmarker

    name = args.detector or "auto"
    if name == "auto":
        name = "mediapipe" if (args.model or os.environ.get(MEDIAPIPE_MODEL_ENV)) else "dlib"
    return load_landmarker(name, args.model, video=video)


def _extract(args, source: Path, fps: float | None = None):
    """Landmarks of an image or a video file (at `fps`, default --fps), smoothed for video unless --no-smooth."""
    from .detectors import detect_image, extract_landmarks
    from .media import frame_count, iter_frames, probe_video, read_image
    from .smoothing import smooth_detections

    face = _face_selector(args.face)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        _refuse(args, ("fps", "max_gap", "no_smooth"), f"for an image ({source}); they apply to videos")
        image = read_image(source)
        with _open_landmarker(args, video=False) as landmarker:
            return detect_image(image, landmarker, face, source=str(source)), None
    fps = _fps(args) if fps is None else fps
    info = probe_video(source)
    total = frame_count(info.duration, fps)
    with _open_landmarker(args, video=True) as landmarker, _progress(total, "landmarks") as bar:
        seq = extract_landmarks(
            iter_frames(source, fps), landmarker, fps, face, _max_gap(args), str(source), lambda n: bar.update(1)
        )
    return (seq if args.no_smooth else smooth_detections(seq)), info


def _write_preview(path: Path, frames, seq, canonical, fps: float, audio=None) -> None:
    from .media import write_video
    from .preview import landmark_preview

    frames = _with_progress(landmark_preview(frames, seq, canonical), len(seq), "preview")
    if path.suffix.lower() == ".png":
        from PIL import Image

        with atomic_write(path) as partial:
            Image.fromarray(next(frames)).save(partial, format="PNG")
    else:
        write_video(path, frames, fps, audio=audio)


def _save_with_preview(seq, out: Path, preview: Path | None, write_preview) -> None:
    """Save landmarks `seq` at `out` and, with a `preview` path, call `write_preview()`. The landmarks are written
    first under a temporary name, so the preview is made only for landmarks that saved, and both appear together:
    a failed run leaves earlier files as they were."""
    with atomic_write(out, suffix=".npz") as partial:
        seq.save(partial)
        if preview is not None:
            write_preview()


def cmd_landmarks(args) -> None:
    from .canonical import canonicalize
    from .media import iter_frames, read_audio, read_image

    source = Path(args.input)
    out = _output(args.output, (".npz",), "landmark file")
    preview = _output(args.preview, (".mp4", ".png"), "preview") if args.preview else None
    seq, info = _extract(args, source)
    canonical = canonicalize(seq)

    def write_preview():
        if info is None:
            frames, audio = [read_image(source)], None
        else:
            frames = iter_frames(source, seq.fps, max_frames=len(seq))
            audio = read_audio(source) if info.has_audio else None
        _write_preview(preview, frames, seq, canonical, seq.fps, audio)

    _save_with_preview(canonical if args.canonical else seq, out, preview, write_preview)
    print(f"{out}: {seq}")


def cmd_render(args) -> None:
    from .landmarks import LandmarkSequence
    from .media import read_audio, write_video

    seq = LandmarkSequence.load(args.input)
    out = _output(args.output, (".mp4",), "video")
    audio = read_audio(args.audio) if args.audio else None
    from .render import iter_rendered_frames

    frames = iter_rendered_frames(seq, size=args.size, thickness=args.thickness, style=args.style)
    write_video(out, _with_progress(frames, len(seq), "render"), seq.fps, audio=audio)
    print(
        f"{out}: {len(seq)} frames at {args.size}x{args.size}, {seq.fps:g} fps"
        + (", with audio" if audio is not None else "")
    )


def cmd_crop(args) -> None:
    import torch

    from .crop import compute_crop_track, crop_frames
    from .landmarks import LandmarkSequence
    from .media import iter_frames, probe_video, read_audio, write_video

    source = Path(args.input)
    out = _output(args.output, (".mp4",), "video")
    info = probe_video(source)
    if args.landmarks:
        _refuse(args, DETECTOR_OPTIONS, "with --landmarks (they are for detecting landmarks)")
        seq = LandmarkSequence.load(args.landmarks)
    else:
        seq, _ = _extract(args, source)
    track = compute_crop_track(seq, size=args.size)

    def crops():
        batch, start = [], 0
        for frame in iter_frames(source, seq.fps, max_frames=len(seq)):
            batch.append(frame)
            if len(batch) == 16:
                yield from crop_frames(np.stack(batch), track, torch.arange(start, start + 16))
                start += 16
                batch.clear()
        if batch:
            yield from crop_frames(np.stack(batch), track, torch.arange(start, start + len(batch)))

    as_uint8 = ((c.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy() for c in crops())
    audio = read_audio(source) if info.has_audio else None
    write_video(out, _with_progress(as_uint8, len(seq), "crop"), seq.fps, audio=audio)
    print(f"{out}: {len(seq)} aligned {args.size}x{args.size} face crops")


def cmd_demo(args) -> None:
    """The bundled portrait + speech-like audio -> a talking-head video with the bundled checkpoints; with
    --landmarks-only, the landmark pipeline on the portrait moved by a known head motion."""
    from .demo import demo_portrait, demo_speech

    out = _output(args.output, (".mp4",), "video")
    if not args.landmarks_only:
        _talking_head(args, _talking_head_pipeline(args), demo_speech(args.seconds), out, image=demo_portrait())
        return
    _refuse(args, GENERATION_OPTIONS, "with --landmarks-only (they are for generating)")
    _landmark_demo(args, out)


def _landmark_demo(args, out: Path) -> None:
    from .canonical import canonicalize, head_pose
    from .demo import DEMO_FPS, demo_frames, demo_motion, demo_speech
    from .detectors import extract_landmarks
    from .smoothing import smooth_detections

    n_frames = int(round(args.seconds * DEMO_FPS))
    started = time.perf_counter()
    with _open_landmarker(args, video=True) as landmarker, _progress(n_frames, "landmarks") as bar:
        frames = list(demo_frames(n_frames))  # a few seconds: small enough to keep for the preview pass
        seq = extract_landmarks(frames, landmarker, DEMO_FPS, progress=lambda n: bar.update(1), source="demo clip")
    seq = smooth_detections(seq)
    canonical = canonicalize(seq)
    _write_preview(out, frames, seq, canonical, DEMO_FPS, demo_speech(n_frames / DEMO_FPS))
    npz = out.with_suffix(".npz")
    canonical.save(npz)
    applied = demo_motion(n_frames).roll
    recovered = head_pose(canonical)["roll"]
    # The portrait's own roll is the offset; what canonicalisation must recover is the applied change.
    error = np.abs((recovered - recovered.mean()) + (applied - applied.mean())).mean()
    print(
        f"{out}: {n_frames} frames ({seq.topology}, {int(seq.valid.sum())} with a face) in "
        f"{time.perf_counter() - started:.1f} s; landmarks in {npz}\n"
        f"head roll applied to the portrait: {applied.min():+.1f} to {applied.max():+.1f} deg; "
        f"recovered from the landmarks with a mean error of {error:.2f} deg"
    )


def cmd_prepare(args) -> None:
    from .data.prepare import prepare_dataset

    output = _output_folder(args.output, "dataset folder")
    with _open_landmarker(args, video=True):  # a bad --detector or --model fails here, not once per clip
        pass
    with _progress(None, "clips") as bar:

        def progress(done, total, clip_id, status):
            bar.total = total
            bar.n = done
            bar.set_postfix_str(f"{clip_id}: {status}")
            bar.refresh()

        report = prepare_dataset(
            args.sources,
            output,
            lambda: _open_landmarker(args, video=True),
            features=args.features,
            crop_size=args.crop_size,
            val_fraction=args.val_fraction,
            val_clips=args.val_clips,
            min_seconds=args.min_seconds,
            fps=_fps(args),
            max_gap=_max_gap(args),
            face=_face_selector(args.face),
            smooth="none" if args.no_smooth else "canonical",
            progress=progress,
        )
    print(report.summary())
    if report.failed and not (report.done or report.skipped_existing):
        first = report.failed[0]
        raise LmdiffInputError(
            f"every source failed ({len(report.failed)}; reasons in {output / 'report.json'}), "
            f"e.g. {first.source}: {first.message}"
        )


def _reference_landmarks(args, path: Path):
    """(reference, rest, image): from a .npz track its `speaker_references` (no image), from a portrait image its
    landmarks (rest None)."""
    from .landmarks import LandmarkSequence
    from .pipelines.a2l import speaker_references

    if path.suffix.lower() == ".npz":
        seq = LandmarkSequence.load(path)
        if not seq.valid.any():
            raise LmdiffInputError(f"reference landmarks {path} have no valid frame")
        return (*speaker_references(seq), None)
    from .detectors import detect_image
    from .media import read_image

    image = read_image(path)
    with _open_landmarker(args, video=False) as landmarker:
        return detect_image(image, landmarker, _face_selector(args.face), source=str(path)), None, image


def cmd_a2l(args) -> None:
    from .canonical import canonicalize, uncanonicalize
    from .media import read_audio
    from .editing import pose_from
    from .motion import natural_motion
    from .pipelines.a2l import AudioToLandmarksPipeline

    out = _output(args.output, (".npz",), "landmark file")
    preview = _output(args.preview, (".mp4",), "preview") if args.preview else None
    if not args.pose_from:
        _refuse(args, ("max_gap", "no_smooth"), "without --pose-from (they apply to its video)")
        if Path(args.reference).suffix.lower() == ".npz":
            _refuse(args, DETECTOR_OPTIONS, "with a landmark-file --reference and no --pose-from (nothing to detect)")
    from .checkpoints import BUNDLED_A2L

    checkpoint = args.checkpoint or BUNDLED_A2L
    pipeline = AudioToLandmarksPipeline.from_pretrained(checkpoint)
    if not pipeline.is_diffusion:
        _refuse(args, ("steps", "guidance"), f"with {checkpoint}: it is not a diffusion A2L model")
    audio = read_audio(args.audio)
    reference, rest, image = _reference_landmarks(args, Path(args.reference))
    if reference.space == "image":
        reference = canonicalize(reference)
    with _progress(None, "a2l") as bar:

        def progress(done, total):
            bar.total, bar.n = total, done
            bar.refresh()

        talking = pipeline(
            audio,
            reference,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            progress=progress,
            rest=rest,
        )
    n = len(talking)
    if args.pose_from:
        talking = pose_from(talking, _extract(args, Path(args.pose_from), fps=talking.fps)[0])
    talking = natural_motion(talking, pipeline.motion_stats, args.seed, head_motion=not args.pose_from)

    def write_preview():
        posed = uncanonicalize(talking)
        still = image
        if still is None or args.pose_from:
            still = np.zeros((posed.frame_size[1], posed.frame_size[0], 3), np.uint8)
        _write_preview(preview, (still for _ in range(n)), posed, talking, talking.fps, audio)

    _save_with_preview(talking, out, preview, write_preview)
    print(f"{out}: {talking}")


def cmd_generate(args) -> None:
    from .media import read_audio, read_image

    out = _output(args.output, (".mp4",), "video")
    if args.image:
        _refuse(args, ("max_gap", "no_smooth"), "with --image (they apply to a --video)")
    else:
        _refuse(args, ("image_mode",), "with --video (it applies to an --image)")
    pipeline = _talking_head_pipeline(args)
    audio = read_audio(args.audio)
    image = read_image(args.image) if args.image else None
    _talking_head(args, pipeline, audio, out, image=image, video=args.video)


def _talking_head_pipeline(args):
    """The A2L + L2V pipeline of the checkpoints the arguments name (loaded before any media is read)."""
    from .autoencoders import load_autoencoder
    from .checkpoints import BUNDLED_A2L, BUNDLED_REFINER
    from .pipelines.a2l import AudioToLandmarksPipeline
    from .pipelines.l2v import LandmarkToVideoPipeline
    from .pipelines.talking_head import TalkingHeadPipeline

    a2l = AudioToLandmarksPipeline.from_pretrained(args.a2l or BUNDLED_A2L)
    l2v = LandmarkToVideoPipeline.from_pretrained(args.l2v or BUNDLED_REFINER, sampler=args.sampler)
    if args.size:
        l2v.crop_size = args.size
    needed = l2v.unet.config.autoencoder
    if args.vae is None and needed != "pixel":
        raise LmdiffInputError(f"this L2V model works on {needed} latents: pass that autoencoder with --vae PATH")
    l2v.set_autoencoder(load_autoencoder(args.vae or "pixel"))
    return TalkingHeadPipeline(a2l, l2v)


def _talking_head(args, pipeline, audio: np.ndarray, out: Path, image=None, video=None) -> None:
    """Speech + a portrait or a video -> `out` (mp4 with the speech) through `pipeline`."""
    from .media import write_video

    fps = getattr(args, "fps", None) or pipeline.a2l.fps
    with _open_landmarker(args, video=image is None) as landmarker, _progress(None, "generate") as bar:

        def progress(stage, done, total):
            bar.set_description(stage)
            bar.total, bar.n = total, done
            bar.refresh()

        frames, n = pipeline.generate(
            audio,
            landmarker,
            image=image,
            video=video,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            image_mode=args.image_mode.replace("-", "_"),
            progress=progress,
            face=_face_selector(getattr(args, "face", None)),
            max_gap=_max_gap(args) if hasattr(args, "max_gap") else DEFAULT_MAX_GAP,
            smooth=not getattr(args, "no_smooth", False),
            fps=fps,
            mode=args.mode,
            crop_size=args.size or 256,
        )
        write_video(out, frames, fps, audio=audio)
    print(f"{out}: {n} frames at {fps:g} fps with the speech")


def cmd_eval(args) -> None:
    from .evaluation import EvalNetworks, EvalWeights, evaluate, evaluate_folder

    pred, gt = Path(args.pred), Path(args.gt)
    output = _output_folder(args.output, "report folder")
    tracking = dict(fps=_fps(args), face=_face_selector(args.face), max_gap=_max_gap(args))
    weights = EvalWeights(
        arcface=args.arcface,
        inception=args.inception,
        lpips=args.lpips,
        lpips_linear=args.lpips_linear,
        lpips_net=args.lpips_net,
        syncnet=args.syncnet,
    )
    if pred.is_dir() and gt.is_dir():
        networks = EvalNetworks(weights)
        with _open_landmarker(args, video=True) as landmarker:
            summary = evaluate_folder(pred, gt, landmarker, output, networks=networks, **tracking)
        print(f"{output}: {len(summary['pairs'])} pairs scored, means in summary.md")
        if summary["failed"]:
            failed = "; ".join(f"{name}: {why}" for name, why in summary["failed"].items())
            raise LmdiffInputError(
                f"{len(summary['failed'])} of {len(summary['failed']) + len(summary['pairs'])} pairs failed "
                f"(listed in {output / 'summary.json'}): {failed}"
            )
        return
    for name, path in (("--pred", pred), ("--gt", gt)):
        if not path.is_file():
            raise LmdiffInputError(f"{name} {path} is not a video file (give two files, or two folders)")
    networks = EvalNetworks(weights)
    with _open_landmarker(args, video=True) as landmarker:
        report = evaluate(pred, gt, landmarker, output, networks=networks, **tracking)
    p, b = report["prediction"], report["baselines"]
    print(
        f"{output}: {report['frames']} frames; mouth PSNR {p['psnr_mouth']:.2f} dB (frozen lower face "
        f"{b['frozen_lower_face']['psnr_mouth']:.2f}), mouth-opening correlation {p['mouth_opening_correlation']:.3f}"
    )


def cmd_download_model(args) -> None:
    import urllib.request

    from .detectors import MEDIAPIPE_MODEL_NAME, MEDIAPIPE_MODEL_URL

    folder = Path(args.dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MEDIAPIPE_MODEL_NAME
    try:
        with atomic_write(target) as partial:
            urllib.request.urlretrieve(MEDIAPIPE_MODEL_URL, partial)
    except OSError as exc:
        raise LmdiffInputError(f"could not download {MEDIAPIPE_MODEL_URL}: {exc}") from None
    print(f"{target}\nuse it with --model {target} or: export LMDIFF_MEDIAPIPE_MODEL={target}")


DETECTOR_OPTIONS = ("detector", "model", "face", "fps", "max_gap", "no_smooth")
GENERATION_OPTIONS = ("image_mode", "a2l", "l2v", "vae", "steps", "guidance", "sampler", "size", "seed")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument as the CLI reports every user error: one line, exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, minimum, what: str):
    """An argparse type: a `kind` number of at least `minimum` (above it when `minimum` is a float)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > minimum if kind is float else value >= minimum):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _number(int, 1, "a whole number of at least 1")
_non_negative_int = _number(int, 0, "a whole number of at least 0")
_positive_float = _number(float, 0.0, "a number above 0")


def _add_detector_args(p: argparse.ArgumentParser, options: tuple[str, ...] = DETECTOR_OPTIONS) -> None:
    """The detector options among `options` (a command offers only those it obeys)."""
    p.add_argument(
        "--detector",
        choices=("auto", "mediapipe", "dlib", "insightface"),
        help="landmark detector; auto (default) = mediapipe when a model is given (--model or "
        "$LMDIFF_MEDIAPIPE_MODEL), else dlib",
    )
    p.add_argument("--model", help="detector model: MediaPipe .task file, dlib .dat file or insightface root folder")
    if "face" in options:
        p.add_argument("--face", help="which face to follow: 'largest' (default) or an index from the left, from 0")
    if "fps" in options:
        p.add_argument("--fps", type=_positive_float, help="frame rate to resample video to (default 25)")
    if "max_gap" in options:
        p.add_argument(
            "--max-gap",
            type=_non_negative_int,
            help=f"longest run of frames without a face to fill in (default {DEFAULT_MAX_GAP})",
        )
    if "no_smooth" in options:
        p.add_argument("--no-smooth", action="store_true", help="keep the raw detector output (no One Euro smoothing)")


def _add_allow_partial(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="use what decodes of a truncated or damaged video or audio file (default: refuse it)",
    )


def _add_generation_args(p, image_mode: str) -> None:
    p.add_argument(
        "--image-mode",
        choices=("one-shot", "still"),
        default=image_mode,
        help="for a portrait: one-shot (head motion and blinks, the whole face generated) or still (only the lips "
        f"and jaw move; the photo's other pixels are kept). Default {image_mode}",
    )
    p.add_argument(
        "--mode",
        choices=("quality", "fast"),
        default="quality",
        help="fast: the lower face is rebuilt from the person's own frames (retrieved by lip shape and warped, no "
        "U-Net; a portrait is dubbed as a still); quality: the same, refined by the L2V refiner (the bundled one), "
        "or with a plain L2V checkpoint (--l2v) the U-Net generates the face. Default quality",
    )
    p.add_argument("--a2l", help="A2L checkpoint folder (default: the bundled checkpoints/a2l)")
    p.add_argument("--l2v", help="L2V checkpoint folder (default: the bundled refiner, checkpoints/refiner)")
    p.add_argument("--vae", help="autoencoder the L2V model was trained with (a TAESD-family folder or a VAE file)")
    p.add_argument(
        "--steps", type=_positive_int, default=20, help="L2V sampling steps (a refiner samples with its own settings)"
    )
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the landmarks")
    p.add_argument("--sampler", choices=("ddim", "dpm++", "unipc"), default="ddim")
    p.add_argument("--size", type=_positive_int, help="face crop size (default: the L2V checkpoint's; fast mode: 256)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmdiff", description="Audio-driven talking heads with landmark-guided diffusion.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("landmarks", help="detect face landmarks in a video or image")
    p.add_argument("input", help="video or image file")
    p.add_argument("-o", "--output", required=True, help="landmark file (.npz)")
    p.add_argument("--preview", help="side-by-side preview: frame with landmarks | canonical landmarks (.mp4 or .png)")
    p.add_argument("--canonical", action="store_true", help="save the pose-free canonical landmarks (with their pose)")
    _add_detector_args(p)
    _add_allow_partial(p)
    p.set_defaults(func=cmd_landmarks, parser=p)

    p = sub.add_parser("render", help="render a landmark file to a conditioning video")
    p.add_argument("input", help="landmark file (.npz)")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    p.add_argument("--size", type=_positive_int, default=512, help="output width and height (default 512)")
    p.add_argument("--audio", help="audio to mux in (fitted to the landmark sequence's length)")
    p.add_argument("--style", choices=("parts", "mesh"), default="parts")
    p.add_argument("--thickness", type=_positive_float, default=2.0)
    _add_allow_partial(p)
    p.set_defaults(func=cmd_render, parser=p)

    p = sub.add_parser("crop", help="aligned, stabilised face crops of a video")
    p.add_argument("input", help="video file")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    p.add_argument("--size", type=_positive_int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--landmarks", help="use this landmark file instead of detecting")
    _add_detector_args(p)
    _add_allow_partial(p)
    p.set_defaults(func=cmd_crop, parser=p)

    p = sub.add_parser("demo", help="a talking-head video of the bundled portrait and speech-like audio (no downloads)")
    p.add_argument("-o", "--output", default="lmdiff_demo.mp4", help="video (default lmdiff_demo.mp4)")
    p.add_argument("--seconds", type=_positive_float, default=4.0)
    p.add_argument(
        "--landmarks-only",
        action="store_true",
        help="run only the landmark pipeline on the portrait moved by a known head motion (preview + .npz)",
    )
    _add_generation_args(p, image_mode="still")
    _add_detector_args(p, options=())
    p.set_defaults(func=cmd_demo, parser=p)

    p = sub.add_parser("prepare", help="turn talking videos into an A2L/L2V training set")
    p.add_argument("sources", nargs="+", help="video files or folders of videos")
    p.add_argument("-o", "--output", required=True, help="dataset folder (created; an existing one is resumed)")
    p.add_argument(
        "--features",
        default="logmel",
        help="audio features: logmel, whisper-base (the lmdiff[speech] extra), or a local wav2vec2/HuBERT/Whisper folder",
    )
    p.add_argument("--crop-size", type=_non_negative_int, default=256, help="face crops for the L2V stage (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of clips in the validation split")
    p.add_argument(
        "--val-clips", nargs="+", default=[], metavar="CLIP",
        help="clip ids or file stems always in the validation split",
    )
    p.add_argument("--min-seconds", type=float, default=2.0, help="skip clips shorter than this")
    _add_detector_args(p)
    _add_allow_partial(p)
    p.set_defaults(func=cmd_prepare, parser=p)

    p = sub.add_parser("a2l", help="speech -> talking landmarks with a trained A2L checkpoint")
    p.add_argument("--audio", required=True, help="speech (wav, mp3, flac, m4a or a video with sound)")
    p.add_argument("--reference", required=True, help="the speaker: a portrait image or a landmark file (.npz)")
    p.add_argument("--checkpoint", help="A2L checkpoint folder (default: the bundled checkpoints/a2l)")
    p.add_argument("-o", "--output", required=True, help="landmark file (.npz): canonical landmarks with their pose")
    p.add_argument("--pose-from", help="take head pose from this video instead of generating it")
    p.add_argument("--preview", help="preview video (.mp4) with the speech")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=20, help="diffusion sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance on the audio (diffusion A2L)")
    _add_detector_args(p, options=("face", "max_gap", "no_smooth"))  # --pose-from is read at the checkpoint's fps
    _add_allow_partial(p)
    p.set_defaults(func=cmd_a2l, parser=p)

    p = sub.add_parser("generate", help="speech + a portrait (one-shot) or a video (dubbing) -> talking-head video")
    p.add_argument("--audio", required=True, help="speech (wav, mp3, flac, m4a or a video with sound)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="portrait to animate (one-shot)")
    source.add_argument("--video", help="video to dub (its lower face is regenerated)")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    _add_generation_args(p, image_mode="one-shot")
    _add_detector_args(p)
    _add_allow_partial(p)
    p.set_defaults(func=cmd_generate, parser=p)

    p = sub.add_parser("eval", help="score a generated video against its ground truth, with baselines")
    p.add_argument("--pred", required=True, help="generated video, or a folder of them")
    p.add_argument("--gt", required=True, help="ground-truth video, or a folder with a video of the same name each")
    p.add_argument("-o", "--output", required=True, help="report folder (metrics.json, report.md, plots)")
    weights = p.add_argument_group("learned metrics (each runs only when its weights are given; nothing is downloaded)")
    weights.add_argument("--arcface", help="ArcFace .onnx of an insightface pack (e.g. w600k_r50.onnx) for CSIM")
    weights.add_argument("--inception", help="FID Inception weights (pytorch-fid's pt_inception-2015-12-05-*.pth)")
    weights.add_argument("--lpips", help="LPIPS backbone weights (torchvision alexnet/vgg16 file) for LPIPS and tLP")
    weights.add_argument("--lpips-linear", help="LPIPS linear heads (the lpips package's weights/v0.1/alex.pth)")
    weights.add_argument("--lpips-net", choices=("alex", "vgg"), default="alex", help="LPIPS backbone (default alex)")
    weights.add_argument("--syncnet", help="SyncNet weights (syncnet_python's syncnet_v2.model) for LSE-C / LSE-D")
    _add_detector_args(p, options=("face", "fps", "max_gap"))
    _add_allow_partial(p)
    p.set_defaults(func=cmd_eval, parser=p)

    p = sub.add_parser("download-model", help="download the MediaPipe face landmarker model (needs internet)")
    p.add_argument("name", choices=("mediapipe",))
    p.add_argument("--dir", default="~/.cache/lmdiff", help="folder to save it in (default ~/.cache/lmdiff)")
    p.set_defaults(func=cmd_download_model, parser=p)
    return parser


class _Terminated(KeyboardInterrupt):
    """SIGTERM (how services and schedulers stop a job), raised like Ctrl-C so that partial files are removed."""


def _on_sigterm(signum, frame):
    raise _Terminated


def main(argv=None) -> int:
    from .media import allow_partial_media

    os.environ.setdefault("GLOG_minloglevel", "2")  # keep MediaPipe's C++ log lines out of the terminal
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:  # reported by the command's own parser: "lmdiff a2l: error: unrecognized arguments: --fps 30"
        args.parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        with allow_partial_media(getattr(args, "allow_partial", False)):
            args.func(args)
    except LmdiffInputError as exc:
        print(f"lmdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"lmdiff {args.command}: {how}; nothing was written", file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(exc, _Terminated) else 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
