"""`lmdiff eval`: score a generated video against its ground truth, next to trivial baselines made from the ground
truth itself, and write `metrics.json`, `report.md` and PNG plots.

Baselines (every report has them, so a number can be read against them): the ground truth itself; its first frame
held; its frozen lower face (frame 0's pixels under every frame's lower-face mask, the look of a dub with frozen
lips); the ground truth delayed by 5 frames (audio and video shifted by 0.2 s).

Handling of mismatched inputs (recorded under "handling" in the report): a prediction of another frame size is resized
to the ground truth's; videos of different lengths are truncated to the shorter; frames where no face is found are
filled from their neighbours by the landmark tracker and their share is reported as the face rate.

Learned metrics run when their weights are given (`EvalWeights`; nothing is downloaded): CSIM by ArcFace (else dlib's
face descriptor), FID and LPIPS / tLP (`learned_metrics`), LSE-C / LSE-D with SyncNet (`syncnet`; the prediction's own
audio track, or the ground truth's when it has none). Without weights a report says "not computed: no weights".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics
from .masks import masks_from_points
from .detectors import FaceSelector, Landmarker, extract_landmarks
from .errors import LmdiffInputError
from .landmarks import LandmarkSequence
from .media import iter_frames, read_audio

SHIFT_FRAMES = 5
CHUNK = 32
NOT_COMPUTED = "not computed: no weights"


@dataclass
class EvalWeights:
    """Paths of the weights of the learned metrics (None: that metric is not computed)."""

    arcface: str | Path | None = None  # ArcFace .onnx of an insightface pack (w600k_r50.onnx)
    inception: str | Path | None = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth
    lpips: str | Path | None = None  # torchvision's alexnet/vgg16 backbone file (or a combined LPIPS state dict)
    lpips_linear: str | Path | None = None  # the lpips package's weights/v0.1/alex.pth or vgg.pth
    lpips_net: str = "alex"
    syncnet: str | Path | None = None  # syncnet_python's syncnet_v2.model


class EvalNetworks:
    """The networks of `EvalWeights`, loaded once (for a whole folder of pairs); `not_computed` says what is missing."""

    def __init__(self, weights: EvalWeights | None = None, device: str = "cpu"):
        from . import learned_metrics, syncnet

        weights = weights or EvalWeights()
        self.not_computed: dict[str, str] = {}
        if weights.arcface is not None:
            self.encoder = metrics.ArcFaceEncoder(weights.arcface)
        else:
            try:
                self.encoder = metrics.IdentityEncoder()
            except ImportError:
                self.encoder = None
                self.not_computed["csim"] = "not computed: dlib is not installed (pip install lmdiff[dlib])"
        self.inception = (
            None if weights.inception is None else learned_metrics.load_inception(weights.inception, device)
        )
        self.lpips = (
            None
            if weights.lpips is None
            else learned_metrics.load_lpips(weights.lpips, weights.lpips_linear, weights.lpips_net, device)
        )
        self.syncnet = None if weights.syncnet is None else syncnet.load_syncnet(weights.syncnet, device)
        for names, net in (
            (("fid",), self.inception),
            (("lpips", "tlp"), self.lpips),
            (("lse_c", "lse_d"), self.syncnet),
        ):
            if net is None:
                self.not_computed.update(dict.fromkeys(names, NOT_COMPUTED))

    def truth_terms(self, truth: np.ndarray) -> dict:
        """What the learned metrics need of the ground truth, computed once for all the rows of a report."""
        from . import learned_metrics

        terms = {}
        if self.inception is not None:
            terms["truth_stats"] = learned_metrics.inception_stats(truth, self.inception, name="ground truth")
        if self.lpips is not None:
            terms["truth_changes"] = learned_metrics.lpips_changes(truth, self.lpips)
        return terms


def _learned_scores(pred, pred_seq, truth, networks: EvalNetworks, audio, terms: dict) -> dict:
    from . import learned_metrics, syncnet

    out = {}
    if networks.inception is not None:
        out["fid"] = learned_metrics.fid(pred, truth, networks.inception, truth_stats=terms["truth_stats"])
    if networks.lpips is not None:
        out["lpips"] = float(learned_metrics.lpips(pred, truth, networks.lpips).mean())
        out["tlp"] = learned_metrics.tlp(pred, truth, networks.lpips, truth_changes=terms["truth_changes"])
    if networks.syncnet is not None and audio is not None:
        sync = syncnet.lse(pred, audio, pred_seq, networks.syncnet)
        out.update(lse_c=sync["lse_c"], lse_d=sync["lse_d"], sync_offset=sync["offset"])
    return out


def _read(path: Path, fps: float) -> np.ndarray:
    frames = list(iter_frames(path, fps))
    if not frames:
        raise LmdiffInputError(f"{path} holds no video frame")
    return np.stack(frames)


def _resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 [T, H, W, 3] -> [T, size[1], size[0], 3] (bilinear, antialiased)."""
    out = []
    for start in range(0, len(frames), CHUNK):
        x = torch.from_numpy(frames[start : start + CHUNK]).permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(size[1], size[0]), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def _masks(seq: LandmarkSequence, parts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    w, h = seq.frame_size
    return masks_from_points(seq.points, seq.valid, seq.topology, w, h, parts=parts)


def score(
    pred: np.ndarray,
    pred_seq: LandmarkSequence,
    truth: np.ndarray,
    truth_seq: LandmarkSequence,
    networks: EvalNetworks | None = None,
    audio: np.ndarray | None = None,
    truth_terms: dict | None = None,
) -> dict:
    """Metrics of `pred` (uint8 [T, H, W, 3]) with its landmarks against the ground truth's (same shape and length);
    CSIM and the learned metrics with the `networks` that are loaded (LSE with `audio`, 16 kHz mono; `truth_terms`:
    `networks.truth_terms(truth)` when already computed)."""
    encoder = None if networks is None else networks.encoder
    if networks is not None and truth_terms is None:
        truth_terms = networks.truth_terms(truth)
    mouth = _masks(truth_seq, ("mouth",))["mouth"]
    per_frame, sums = [], {"full": 0.0, "mouth": 0.0, "mouth_area": 0.0, "ssim": 0.0, "ssim_mouth": 0.0}
    for start in range(0, len(truth), CHUNK):
        p, t = metrics.as_frames(pred[start : start + CHUNK]), metrics.as_frames(truth[start : start + CHUNK])
        m = mouth[start : start + CHUNK]
        err = (p - t) ** 2
        per_frame += metrics.frame_psnr(p, t).tolist()
        sums["full"] += float(err.mean(dim=(1, 2, 3)).sum())
        sums["mouth"] += float((err * m).sum())
        sums["mouth_area"] += float(m.expand_as(err).sum())
        sums["ssim"] += metrics.ssim(p, t) * len(p)
        sums["ssim_mouth"] += metrics.ssim(p, t, m) * len(p)
    n = len(truth)
    to_db = lambda mse: math.inf if mse == 0 else 10 * math.log10(1 / mse)  # noqa: E731
    jitter_pred, jitter_truth = metrics.landmark_jitter(pred_seq), metrics.landmark_jitter(truth_seq)
    finite = [v for v in per_frame if math.isfinite(v)]  # frames identical to the truth have an infinite PSNR
    return {
        "psnr": float(np.mean(finite)) if finite else math.inf,  # per-frame PSNR averaged, as papers report it
        "psnr_pooled": to_db(sums["full"] / n),  # PSNR of the MSE pooled over all frames
        "psnr_mouth": to_db(sums["mouth"] / max(sums["mouth_area"], 1e-8)),  # pooled over the mouth pixels of all frames
        "ssim": sums["ssim"] / n,
        "ssim_mouth": sums["ssim_mouth"] / n,
        "lmd": metrics.landmark_distance(pred_seq, truth_seq),
        "lmd_mouth": metrics.landmark_distance(pred_seq, truth_seq, "mouth"),
        "mouth_opening_correlation": metrics.mouth_opening_correlation(pred_seq, truth_seq),
        "frame_difference_error_mouth": _frame_difference(pred, truth, mouth),
        "landmark_jitter_ratio": jitter_pred / max(jitter_truth, 1e-12),
        "cpbd": float(np.mean([metrics.cpbd(f) for f in pred[:: max(1, len(pred) // 8)]])),
        "csim": float("nan") if encoder is None else metrics.csim(encoder, pred, pred_seq, truth, truth_seq),
        **({} if networks is None else _learned_scores(pred, pred_seq, truth, networks, audio, truth_terms)),
        "per_frame_psnr": [min(v, 100.0) for v in per_frame],  # capped for plotting: identical frames at 100 dB
    }


def _frame_difference(pred: np.ndarray, truth: np.ndarray, mask: torch.Tensor) -> float:
    total, area = 0.0, 0.0
    for start in range(0, len(truth) - 1, CHUNK):
        stop = min(start + CHUNK + 1, len(truth))
        p, t = metrics.as_frames(pred[start:stop]), metrics.as_frames(truth[start:stop])
        err = (p.diff(dim=0) - t.diff(dim=0)) ** 2
        m = mask[start + 1 : stop].expand_as(err)
        total, area = total + float((err * m).sum()), area + float(m.sum())
    return total / max(area, 1e-8)


def baselines(
    truth: np.ndarray, truth_seq: LandmarkSequence, landmarker: Landmarker
) -> dict[str, tuple[np.ndarray, LandmarkSequence]]:
    """The trivial predictions made from the ground truth (see the module docstring), with their landmarks (the
    frozen lower face's are detected in its frames)."""
    n = len(truth)
    lower = _masks(truth_seq, ("lower_face",))["lower_face"][:, 0, :, :, None].numpy()
    frozen = (truth * (1 - lower) + truth[:1] * lower).round().astype(np.uint8)
    shifted = np.maximum(np.arange(n) - SHIFT_FRAMES, 0)
    held = np.zeros(n, dtype=int)
    return {
        "ground_truth": (truth, truth_seq),
        "first_frame_held": (truth[held], truth_seq[held]),
        "frozen_lower_face": (frozen, extract_landmarks(frozen, landmarker, truth_seq.fps, source="frozen lower face")),
        f"shifted_{SHIFT_FRAMES}_frames": (truth[shifted], truth_seq[shifted]),
    }


def _speech(pred_path: Path, gt_path: Path) -> tuple[np.ndarray | None, str | None]:
    """(16 kHz mono audio, its source) for LSE: the prediction's own track, else the ground truth's."""
    for path in (pred_path, gt_path):
        try:
            return read_audio(path), str(path)
        except LmdiffInputError:
            continue
    return None, None


def evaluate(
    pred_path,
    gt_path,
    landmarker: Landmarker,
    out_dir,
    fps: float = 25.0,
    networks: EvalNetworks | None = None,
    face: FaceSelector = "largest",
    max_gap: int = 12,
) -> dict:
    """Score `pred_path` against `gt_path` and write the report into `out_dir` (see the module docstring);
    `networks` (default: dlib CSIM only) says which learned metrics run; `face` and `max_gap` as in
    `detectors.extract_landmarks`."""
    pred_path, gt_path, out_dir = Path(pred_path), Path(gt_path), Path(out_dir)
    networks = EvalNetworks() if networks is None else networks
    pred, truth = _read(pred_path, fps), _read(gt_path, fps)
    handling = {"pred_frames": len(pred), "gt_frames": len(truth)}
    if pred.shape[1:3] != truth.shape[1:3]:
        handling["resized_pred_from"] = [pred.shape[2], pred.shape[1]]
        pred = _resize(pred, (truth.shape[2], truth.shape[1]))
    n = min(len(pred), len(truth))
    if len(pred) != len(truth):
        handling["truncated_to"] = n
    pred, truth = pred[:n], truth[:n]
    if n < 3:
        raise LmdiffInputError(f"the videos give only {n} frames to compare: at least 3 are needed")
    seqs = {}
    for name, frames, path in (("pred", pred, pred_path), ("gt", truth, gt_path)):
        seqs[name] = extract_landmarks(frames, landmarker, fps, face, max_gap, source=str(path))
        handling[f"{name}_face_rate"] = float(np.mean(seqs[name].valid & ~seqs[name].interpolated))
    not_computed = dict(networks.not_computed)
    audio, audio_source = None, None
    if networks.syncnet is not None:
        audio, audio_source = _speech(pred_path, gt_path)
        if audio is None:
            not_computed.update(dict.fromkeys(("lse_c", "lse_d"), "not computed: neither video has an audio track"))
    encoder = networks.encoder
    terms = networks.truth_terms(truth)
    report = {
        "pred": str(pred_path),
        "gt": str(gt_path),
        "frames": n,
        "fps": fps,
        "landmarker": type(landmarker).__name__,
        "identity_embedding": None if encoder is None else encoder.name,
        "sync_audio": audio_source,
        "handling": handling,
        "prediction": score(pred, seqs["pred"], truth, seqs["gt"], networks, audio, terms),
        "baselines": {
            name: score(f, s, truth, seqs["gt"], networks, audio, terms)
            for name, (f, s) in baselines(truth, seqs["gt"], landmarker).items()
        },
        "not_computed": not_computed,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _plots(report, pred, seqs["pred"], truth, seqs["gt"], out_dir)
    (out_dir / "metrics.json").write_text(to_json(report))
    (out_dir / "report.md").write_text(markdown(report))
    return report


VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")


def evaluate_folder(
    pred_dir,
    gt_dir,
    landmarker: Landmarker,
    out_dir,
    fps: float = 25.0,
    networks: EvalNetworks | None = None,
    face: FaceSelector = "largest",
    max_gap: int = 12,
) -> dict:
    """Batch mode: every video in `pred_dir` against the ground-truth video of the same name (any video suffix) in
    `gt_dir`; one report per pair in `out_dir/<name>/`, and `summary.json` / `summary.md` with the means over the
    pairs scored. A pair that cannot be scored (LmdiffInputError) is listed under "failed" with its reason, and the
    others go on."""
    pred_dir, gt_dir, out_dir = Path(pred_dir), Path(gt_dir), Path(out_dir)
    truths = {p.stem: p for p in sorted(gt_dir.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES}
    preds = [p for p in sorted(pred_dir.iterdir()) if p.suffix.lower() in VIDEO_SUFFIXES]
    pairs = [(p, truths[p.stem]) for p in preds if p.stem in truths]
    if not pairs:
        raise LmdiffInputError(f"no video in {pred_dir} has a ground truth of the same name in {gt_dir}")
    networks = EvalNetworks() if networks is None else networks
    reports, failed = {}, {}
    for p, g in pairs:
        try:
            reports[p.stem] = evaluate(p, g, landmarker, out_dir / p.stem, fps, networks, face, max_gap)
        except LmdiffInputError as exc:
            failed[p.stem] = str(exc)
    means = {}
    if reports:
        keys = table_keys(next(iter(reports.values())))
        rows = {"**prediction**": "prediction", **{name: name for name in next(iter(reports.values()))["baselines"]}}
        for label, key in rows.items():
            values = [r["prediction"] if key == "prediction" else r["baselines"][key] for r in reports.values()]
            means[label] = {k: float(np.mean([v[k] for v in values])) for k in keys}
    summary = {
        "pairs": {p.stem: [str(p), str(g)] for p, g in pairs if p.stem in reports},
        "failed": failed,
        "unmatched": [str(p) for p in preds if p.stem not in truths],
        "means": means,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(to_json(summary))
    lines = [f"# lmdiff eval: {len(reports)} pairs, means", ""]
    if reports:
        lines += ["| video | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(f"{v[k]:.4g}" for k in keys) + " |" for label, v in means.items()]
    if failed:
        lines += ["", f"Failed ({len(failed)}):", *(f"- {name}: {why}" for name, why in failed.items())]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def _finite(value):
    """`value` (nested dicts, lists, numbers) with NaN and +-Infinity as None: JSON has no such numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.ndarray):
        return _finite(value.tolist())
    if isinstance(value, (np.generic, torch.Tensor)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def to_json(report: dict) -> str:
    """A report as strict JSON text (readable by any JSON parser): a number that is not finite (e.g. PSNR of
    identical frames, a correlation of a constant signal) is written as null."""
    return json.dumps(_finite(report), indent=1, allow_nan=False) + "\n"


TABLE_KEYS = (
    "psnr",
    "psnr_mouth",
    "ssim",
    "ssim_mouth",
    "lmd",
    "lmd_mouth",
    "mouth_opening_correlation",
    "frame_difference_error_mouth",
    "landmark_jitter_ratio",
    "cpbd",
    "csim",
)
LEARNED_TABLE_KEYS = ("fid", "lpips", "tlp", "lse_c", "lse_d")


def table_keys(report: dict) -> tuple[str, ...]:
    """The columns of a report's table: the fixed ones and the learned metrics it has."""
    return TABLE_KEYS + tuple(k for k in LEARNED_TABLE_KEYS if k in report["prediction"])


def markdown(report: dict) -> str:
    """The report's table: the prediction and every baseline, one row each."""
    keys = table_keys(report)
    lines = [
        f"# lmdiff eval: {Path(report['pred']).name} vs {Path(report['gt']).name}",
        "",
        f"{report['frames']} frames at {report['fps']:g} fps; landmarks by {report['landmarker']}; CSIM by "
        f"{report['identity_embedding']}; "
        f"handling: {json.dumps(report['handling'])}",
        "",
        "| video | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    rows = {"**prediction**": report["prediction"], **report["baselines"]}
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[k]:.4g}" for k in keys) + " |")
    if report["not_computed"]:
        missing = ", ".join(f"{k} ({why})" for k, why in report["not_computed"].items())
        lines += ["", f"Not computed: {missing}"]
    lines.append("")
    return "\n".join(lines)


def _plots(report, pred, pred_seq, truth, truth_seq, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .render import draw_landmarks_on_frames

    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(report["prediction"]["per_frame_psnr"], label="prediction")
    for name in ("first_frame_held", "frozen_lower_face"):
        ax.plot(report["baselines"][name]["per_frame_psnr"], label=name, alpha=0.6)
    ax.set(xlabel="frame", ylabel="PSNR (dB)", title="per-frame PSNR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "psnr_per_frame.png", dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.plot(truth_seq.mouth_opening(), label="ground truth")
    ax.plot(pred_seq.mouth_opening(), label="prediction")
    ax.set(xlabel="frame", ylabel="mouth opening (IOD)", title="mouth opening over time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "mouth_opening.png", dpi=100)
    plt.close(fig)
    picks = np.linspace(0, len(truth) - 1, 6).round().astype(int)
    rows = [
        draw_landmarks_on_frames(frames[picks], seq[picks], opacity=0.8)
        for frames, seq in ((truth, truth_seq), (pred, pred_seq))
    ]
    sheet = np.concatenate([np.concatenate(list(np.asarray(r)), axis=1) for r in rows], axis=0)
    from PIL import Image

    Image.fromarray(sheet).save(out_dir / "contact_sheet.png")
