"""The `lmdiff` command line. Exit codes: 0 success, 2 user error (one line on stderr), 1 internal error."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from .errors import LmdiffInputError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def _progress(total: int | None, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False, disable=None)


def _with_progress(frames, total: int, desc: str):
    """Pass frames through while a progress bar counts them."""
    with _progress(total, desc) as bar:
        for frame in frames:
            bar.update(1)
            yield frame


def _output(path: str, suffixes: tuple[str, ...], what: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise LmdiffInputError(f"{what} {out} must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise LmdiffInputError(f"{what} {out} is a directory; expected a file path")
    if not out.parent.is_dir():
        raise LmdiffInputError(f"cannot write {what} {out}: its folder {out.parent} does not exist")
    return out


def _face_selector(value: str):
    if value == "largest":
        return value
    try:
        return int(value)
    except ValueError:
        raise LmdiffInputError(f"--face must be 'largest' or a face index (0 = leftmost), got {value!r}") from None


def _open_landmarker(args, video: bool):
    from .detectors import MEDIAPIPE_MODEL_ENV, load_landmarker

    name = args.detector
    if name == "auto":
        name = "mediapipe" if (args.model or os.environ.get(MEDIAPIPE_MODEL_ENV)) else "dlib"
    return load_landmarker(name, args.model, video=video)


def _extract(args, source: Path, max_frames=None):
    """Landmarks of an image or a video file, smoothed for video unless --no-smooth."""
    from .detectors import detect_image, extract_landmarks
    from .media import frame_count, iter_frames, probe_video, read_image
    from .smoothing import smooth_landmarks

    face = _face_selector(args.face)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        image = read_image(source)
        with _open_landmarker(args, video=False) as landmarker:
            return detect_image(image, landmarker, face, source=str(source)), None
    info = probe_video(source)
    total = frame_count(info.duration, args.fps)
    if max_frames is not None:
        total = min(total, max_frames)
    with _open_landmarker(args, video=True) as landmarker, _progress(total, "landmarks") as bar:
        seq = extract_landmarks(
            iter_frames(source, args.fps, max_frames=total),
            landmarker,
            args.fps,
            face,
            args.max_gap,
            str(source),
            progress=lambda n: bar.update(1),
        )
    return (seq if args.no_smooth else smooth_landmarks(seq)), info


def _write_preview(path: Path, frames, seq, canonical, fps: float, audio=None) -> None:
    from .media import write_video
    from .preview import landmark_preview

    frames = _with_progress(landmark_preview(frames, seq, canonical), len(seq), "preview")
    if path.suffix.lower() == ".png":
        from PIL import Image

        partial = path.with_name(f".{path.name}.part")
        try:
            Image.fromarray(next(frames)).save(partial, format="PNG")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    else:
        write_video(path, frames, fps, audio=audio)


def cmd_landmarks(args) -> None:
    from .canonical import canonicalize
    from .media import iter_frames, read_audio, read_image

    source = Path(args.input)
    out = _output(args.output, (".npz",), "landmark file")
    preview = _output(args.preview, (".mp4", ".png"), "preview") if args.preview else None
    seq, info = _extract(args, source)
    canonical = canonicalize(seq)
    # Both outputs appear together or not at all: the landmarks wait under a temporary name for the preview.
    partial = (canonical if args.canonical else seq).save(out.with_name(f".{out.stem}.part.npz"))
    try:
        if preview is not None:
            if info is None:
                frames = [read_image(source)]
                audio = None
            else:
                frames = iter_frames(source, args.fps, max_frames=len(seq))
                audio = read_audio(source) if info.has_audio else None
            _write_preview(preview, frames, seq, canonical, args.fps, audio)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
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
        audio = demo_speech(args.seconds)
        _talking_head(args, audio, out, image=demo_portrait())
        return
    _landmark_demo(args, out)


def _landmark_demo(args, out: Path) -> None:
    from .canonical import canonicalize, head_pose
    from .demo import DEMO_FPS, demo_frames, demo_motion, demo_speech
    from .detectors import extract_landmarks
    from .smoothing import smooth_landmarks

    n_frames = int(round(args.seconds * DEMO_FPS))
    started = time.perf_counter()
    with _open_landmarker(args, video=True) as landmarker, _progress(n_frames, "landmarks") as bar:
        frames = list(demo_frames(n_frames))  # a few seconds: small enough to keep for the preview pass
        seq = extract_landmarks(frames, landmarker, DEMO_FPS, progress=lambda n: bar.update(1), source="demo clip")
    seq = smooth_landmarks(seq)
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
    from .dataset import prepare_dataset

    with _progress(None, "clips") as bar:

        def progress(done, total, clip_id, status):
            bar.total = total
            bar.n = done
            bar.set_postfix_str(f"{clip_id}: {status}")
            bar.refresh()

        report = prepare_dataset(
            args.sources,
            args.output,
            lambda: _open_landmarker(args, video=True),
            features=args.features,
            crop_size=args.crop_size,
            val_fraction=args.val_fraction,
            min_seconds=args.min_seconds,
            fps=args.fps,
            max_gap=args.max_gap,
            face=_face_selector(args.face),
            progress=progress,
        )
    print(report.summary() if hasattr(report, "summary") else report)


def _reference_landmarks(args, path: Path):
    """One frame of reference landmarks from a .npz (the most closed-mouth valid frame) or a portrait image."""
    from .landmarks import LandmarkSequence

    if path.suffix.lower() == ".npz":
        seq = LandmarkSequence.load(path)
        candidates = np.flatnonzero(seq.valid)
        if candidates.size == 0:
            raise LmdiffInputError(f"reference landmarks {path} have no valid frame")
        return seq[int(candidates[np.argmin(seq.mouth_opening()[candidates])])], None
    from .detectors import detect_image
    from .media import read_image

    image = read_image(path)
    with _open_landmarker(args, video=False) as landmarker:
        return detect_image(image, landmarker, _face_selector(args.face), source=str(path)), image


def cmd_a2l(args) -> None:
    from .canonical import canonicalize, uncanonicalize
    from .media import read_audio
    from .motion import add_blinks, apply_head_motion, blink_curve, generate_head_motion
    from .pipelines.a2l import AudioToLandmarksPipeline

    out = _output(args.output, (".npz",), "landmark file")
    preview = _output(args.preview, (".mp4",), "preview") if args.preview else None
    audio = read_audio(args.audio)
    reference, image = _reference_landmarks(args, Path(args.reference))
    if reference.space == "image":
        reference = canonicalize(reference)
    pipeline = AudioToLandmarksPipeline.from_pretrained(args.checkpoint)
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
        )
    n = len(talking)
    if args.pose_from:
        driving_seq, _ = _extract(args, Path(args.pose_from))
        driving = canonicalize(driving_seq).fit_length(n)
        talking = talking.replace(pose=driving.pose, image_size=driving.image_size)
    else:
        talking = apply_head_motion(talking, generate_head_motion(n, talking.fps, pipeline.motion_stats, args.seed))
    talking = add_blinks(talking, blink_curve(n, talking.fps, pipeline.motion_stats, args.seed))
    if preview is not None:
        posed = uncanonicalize(talking)
        if image is None or args.pose_from:
            image = np.zeros((posed.frame_size[1], posed.frame_size[0], 3), np.uint8)
        frames = (image for _ in range(n))
        _write_preview(preview, frames, posed, talking, talking.fps, audio)
    talking.save(out)
    print(f"{out}: {talking}")


def cmd_generate(args) -> None:
    from .media import read_audio, read_image

    out = _output(args.output, (".mp4",), "video")
    audio = read_audio(args.audio)
    image = read_image(args.image) if args.image else None
    _talking_head(args, audio, out, image=image, video=args.video)


def _talking_head(args, audio: np.ndarray, out: Path, image=None, video=None) -> None:
    """Speech + a portrait or a video -> `out` (mp4 with the speech), with the checkpoints the arguments name."""
    from .autoencoders import load_autoencoder
    from .checkpoints import BUNDLED_A2L, BUNDLED_L2V
    from .media import write_video
    from .pipelines.a2l import AudioToLandmarksPipeline
    from .pipelines.l2v import LandmarkToVideoPipeline
    from .pipelines.talking_head import TalkingHeadPipeline

    a2l = AudioToLandmarksPipeline.from_pretrained(args.a2l or BUNDLED_A2L)
    l2v = LandmarkToVideoPipeline.from_pretrained(args.l2v or BUNDLED_L2V, sampler=args.sampler)
    if args.size:
        l2v.crop_size = args.size
    needed = l2v.unet.config.autoencoder
    if args.vae is None and needed != "pixel":
        raise LmdiffInputError(f"this L2V model works on {needed} latents: pass that autoencoder with --vae PATH")
    l2v.set_autoencoder(load_autoencoder(args.vae or "pixel"))
    pipeline = TalkingHeadPipeline(a2l, l2v)
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
            mode=args.mode,
            crop_size=args.size or 256,
        )
        write_video(out, frames, a2l.fps, audio=audio)
    print(f"{out}: {n} frames at {a2l.fps:g} fps with the speech")


def cmd_eval(args) -> None:
    from .evaluation import EvalNetworks, EvalWeights, evaluate, evaluate_folder

    pred, gt = Path(args.pred), Path(args.gt)
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
            summary = evaluate_folder(pred, gt, landmarker, args.output, fps=args.fps, networks=networks)
        print(f"{args.output}: {len(summary['pairs'])} pairs scored, means in summary.md")
        return
    for name, path in (("--pred", pred), ("--gt", gt)):
        if not path.is_file():
            raise LmdiffInputError(f"{name} {path} is not a video file (give two files, or two folders)")
    networks = EvalNetworks(weights)
    with _open_landmarker(args, video=True) as landmarker:
        report = evaluate(pred, gt, landmarker, args.output, fps=args.fps, networks=networks)
    p, b = report["prediction"], report["baselines"]
    print(
        f"{args.output}: {report['frames']} frames; mouth PSNR {p['psnr_mouth']:.2f} dB (frozen lower face "
        f"{b['frozen_lower_face']['psnr_mouth']:.2f}), mouth-opening correlation {p['mouth_opening_correlation']:.3f}"
    )


def cmd_download_model(args) -> None:
    import urllib.request

    from .detectors import MEDIAPIPE_MODEL_NAME, MEDIAPIPE_MODEL_URL

    folder = Path(args.dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MEDIAPIPE_MODEL_NAME
    partial = target.with_name(target.name + ".part")
    try:
        urllib.request.urlretrieve(MEDIAPIPE_MODEL_URL, partial)
        os.replace(partial, target)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LmdiffInputError(f"could not download {MEDIAPIPE_MODEL_URL}: {exc}") from None
    print(f"{target}\nuse it with --model {target} or: export LMDIFF_MEDIAPIPE_MODEL={target}")


def _add_detector_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--detector",
        choices=("auto", "mediapipe", "dlib", "insightface"),
        default="auto",
        help="landmark detector; auto = mediapipe when a model is given (--model or $LMDIFF_MEDIAPIPE_MODEL), else dlib",
    )
    p.add_argument("--model", help="detector model: MediaPipe .task file, dlib .dat file or insightface root folder")
    p.add_argument(
        "--face", default="largest", help="which face to follow: 'largest' or an index from the left (default largest)"
    )
    p.add_argument("--fps", type=float, default=25.0, help="frame rate to resample video to (default 25)")
    p.add_argument(
        "--max-gap", type=int, default=12, help="longest run of frames without a face to fill in (default 12)"
    )
    p.add_argument("--no-smooth", action="store_true", help="keep the raw detector output (no One Euro smoothing)")


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
        help="quality: the L2V U-Net generates the face; fast: the lower face is rebuilt from the person's own frames "
        "(retrieved by lip shape and warped, no U-Net; a portrait is dubbed as a still). Default quality",
    )
    p.add_argument("--a2l", help="A2L checkpoint folder (default: the bundled checkpoints/a2l)")
    p.add_argument("--l2v", help="L2V checkpoint folder (default: the bundled checkpoints/l2v)")
    p.add_argument("--vae", help="autoencoder the L2V model was trained with (a TAESD-family folder or a VAE file)")
    p.add_argument("--steps", type=int, default=20, help="L2V sampling steps")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance on the landmarks")
    p.add_argument("--sampler", choices=("ddim", "dpm++", "unipc"), default="ddim")
    p.add_argument("--size", type=int, help="face crop size (default: the L2V checkpoint's; fast mode: 256)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdiff", description="Audio-driven talking heads with landmark-guided diffusion."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("landmarks", help="detect face landmarks in a video or image")
    p.add_argument("input", help="video or image file")
    p.add_argument("-o", "--output", required=True, help="landmark file (.npz)")
    p.add_argument("--preview", help="side-by-side preview: frame with landmarks | canonical landmarks (.mp4 or .png)")
    p.add_argument("--canonical", action="store_true", help="save the pose-free canonical landmarks (with their pose)")
    _add_detector_args(p)
    p.set_defaults(func=cmd_landmarks)

    p = sub.add_parser("render", help="render a landmark file to a conditioning video")
    p.add_argument("input", help="landmark file (.npz)")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    p.add_argument("--size", type=int, default=512, help="output width and height (default 512)")
    p.add_argument("--audio", help="audio to mux in (fitted to the landmark sequence's length)")
    p.add_argument("--style", choices=("parts", "mesh"), default="parts")
    p.add_argument("--thickness", type=float, default=2.0)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("crop", help="aligned, stabilised face crops of a video")
    p.add_argument("input", help="video file")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    p.add_argument("--size", type=int, default=256, help="crop size in pixels (default 256)")
    p.add_argument("--landmarks", help="use this landmark file instead of detecting")
    _add_detector_args(p)
    p.set_defaults(func=cmd_crop)

    p = sub.add_parser("demo", help="a talking-head video of the bundled portrait and speech-like audio (no downloads)")
    p.add_argument("-o", "--output", default="lmdiff_demo.mp4", help="video (default lmdiff_demo.mp4)")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument(
        "--landmarks-only",
        action="store_true",
        help="run only the landmark pipeline on the portrait moved by a known head motion (preview + .npz)",
    )
    _add_generation_args(p, image_mode="still")
    _add_detector_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare", help="turn talking videos into an A2L/L2V training set")
    p.add_argument("sources", nargs="+", help="video files or folders of videos")
    p.add_argument("-o", "--output", required=True, help="dataset folder (created; an existing one is resumed)")
    p.add_argument(
        "--features", default="logmel", help="audio features: logmel, or a local wav2vec2/HuBERT/Whisper folder"
    )
    p.add_argument("--crop-size", type=int, default=256, help="face crops for the L2V stage (0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of clips in the validation split")
    p.add_argument("--min-seconds", type=float, default=2.0, help="skip clips shorter than this")
    _add_detector_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("a2l", help="speech -> talking landmarks with a trained A2L checkpoint")
    p.add_argument("--audio", required=True, help="speech (wav, mp3, flac, m4a or a video with sound)")
    p.add_argument("--reference", required=True, help="the speaker: a portrait image or a landmark file (.npz)")
    p.add_argument("--checkpoint", required=True, help="A2L checkpoint folder (a training run's final/)")
    p.add_argument("-o", "--output", required=True, help="landmark file (.npz): canonical landmarks with their pose")
    p.add_argument("--pose-from", help="take head pose from this video instead of generating it")
    p.add_argument("--preview", help="preview video (.mp4) with the speech")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20, help="diffusion sampling steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance on the audio (diffusion A2L)")
    _add_detector_args(p)
    p.set_defaults(func=cmd_a2l)

    p = sub.add_parser("generate", help="speech + a portrait (one-shot) or a video (dubbing) -> talking-head video")
    p.add_argument("--audio", required=True, help="speech (wav, mp3, flac, m4a or a video with sound)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="portrait to animate (one-shot)")
    source.add_argument("--video", help="video to dub (its lower face is regenerated)")
    p.add_argument("-o", "--output", required=True, help="video file (.mp4)")
    _add_generation_args(p, image_mode="one-shot")
    _add_detector_args(p)
    p.set_defaults(func=cmd_generate)

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
    _add_detector_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("download-model", help="download the MediaPipe face landmarker model (needs internet)")
    p.add_argument("name", choices=("mediapipe",))
    p.add_argument("--dir", default="~/.cache/lmdiff", help="folder to save it in (default ~/.cache/lmdiff)")
    p.set_defaults(func=cmd_download_model)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("GLOG_minloglevel", "2")  # keep MediaPipe's C++ log lines out of the terminal
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except LmdiffInputError as exc:
        print(f"lmdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmdiff {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
