"""`lmdiff eval` on a real clip: report files, baselines ordered as they must be, mismatched inputs handled."""

import json
import math

import numpy as np
import pytest

from lmdiff_core.cli import main
from lmdiff_core.media import read_video, write_video

from .conftest import shared_path


def strict_json(path):
    """The JSON file at `path`, refusing the NaN / Infinity that Python writes by default and JSON does not have."""

    def refuse(constant):
        raise ValueError(f"{path} holds the bare {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    clip = read_video(shared_path("data/clips/edtalk_woman_en.mp4"))
    gt = write_video(root / "gt.mp4", clip.frames[:40], 25)
    # a "prediction": the ground truth with frame 0's mouth region frozen and a little noise, 8 frames short,
    # at another size
    frames = clip.frames[:32].astype(np.float64)
    frames[:, 150:210, 90:170] = frames[:1, 150:210, 90:170]
    frames += np.random.default_rng(0).normal(0, 2, frames.shape)
    small = np.clip(frames, 0, 255).astype(np.uint8)[:, ::2, ::2]
    pred = write_video(root / "pred.mp4", small, 25)
    return root, pred, gt


def test_eval_report(videos, mediapipe_model, capsys):
    root, pred, gt = videos
    out = root / "report"
    assert main(["eval", "--pred", str(pred), "--gt", str(gt), "-o", str(out), "--model", str(mediapipe_model)]) == 0
    report = strict_json(out / "metrics.json")
    for name in ("metrics.json", "report.md", "psnr_per_frame.png", "mouth_opening.png", "contact_sheet.png"):
        assert (out / name).stat().st_size > 0
    handling = report["handling"]
    assert handling["truncated_to"] == report["frames"] == 32 and handling["resized_pred_from"] == [128, 128]
    assert handling["gt_face_rate"] == 1.0
    base = report["baselines"]
    truth = base["ground_truth"]
    assert truth["psnr"] is None  # infinite (identical frames): null, as JSON has no Infinity
    assert truth["lmd"] == 0 and truth["mouth_opening_correlation"] == pytest.approx(1)
    # a 5-frame delay keeps the frames sharp but breaks sync; holding the first frame is worse than freezing the mouth
    assert base["shifted_5_frames"]["mouth_opening_correlation"] < 0.9
    assert base["first_frame_held"]["psnr"] < base["frozen_lower_face"]["psnr"]
    assert base["frozen_lower_face"]["psnr_mouth"] < base["frozen_lower_face"]["psnr"]
    assert len(report["prediction"]["per_frame_psnr"]) == 32
    assert report["not_computed"]["fid"] == "not computed: no weights" and "csim" not in report["not_computed"]
    assert report["identity_embedding"] == "dlib_face_descriptor"
    assert truth["csim"] == pytest.approx(1.0, abs=1e-6) and 0.8 < report["prediction"]["csim"] < 1.0
    table = (out / "report.md").read_text()
    assert "**prediction**" in table and "frozen_lower_face" in table
    assert f"{report['prediction']['psnr_mouth']:.4g}" in table
    assert "mouth PSNR" in capsys.readouterr().out


def test_eval_bad_inputs(videos, tmp_path, mediapipe_model, capsys):
    root, pred, gt = videos
    common = ["-o", str(tmp_path / "r"), "--model", str(mediapipe_model)]
    assert main(["eval", "--pred", str(root / "missing.mp4"), "--gt", str(gt), *common]) == 2
    assert "--pred" in capsys.readouterr().err
    blank = write_video(tmp_path / "blank.mp4", np.full((20, 128, 128, 3), 90, np.uint8), 25)
    assert main(["eval", "--pred", str(blank), "--gt", str(gt), *common]) == 2
    assert "face" in capsys.readouterr().err.lower()


def test_eval_batch_mode(videos, tmp_path, mediapipe_model):
    root, pred, gt = videos
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    for name in ("a", "b"):
        (tmp_path / "pred" / f"{name}.mp4").write_bytes(pred.read_bytes())
        (tmp_path / "gt" / f"{name}.mp4").write_bytes(gt.read_bytes())
    (tmp_path / "pred" / "extra.mp4").write_bytes(pred.read_bytes())  # no ground truth: listed, not scored
    out = tmp_path / "reports"
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out)]
    assert main([*args, "--model", str(mediapipe_model)]) == 0
    summary = strict_json(out / "summary.json")
    assert (
        sorted(summary["pairs"]) == ["a", "b"]
        and summary["failed"] == {}
        and summary["unmatched"][0].endswith("extra.mp4")
    )
    single = json.loads((out / "a" / "metrics.json").read_text())
    assert summary["means"]["**prediction**"]["psnr_mouth"] == pytest.approx(single["prediction"]["psnr_mouth"])
    assert (out / "summary.md").read_text().count("\n| ") == 6  # header + the prediction + 4 baselines


def test_eval_with_every_learned_metric(tmp_path, mediapipe_model):
    """Plumbing of the learned metrics with randomly initialised networks (no real FID / LPIPS / SyncNet / ArcFace
    weights can be obtained here), saved to files and passed as paths: every row gets every metric, the ground truth
    against itself scores FID ~0, LPIPS 0 and tLP 0, and nothing is reported as not computed."""
    import torch
    from safetensors.torch import save_file

    from lmdiff_core import learned_metrics, syncnet
    from lmdiff_core.media import read_audio

    from .conftest import random_arcface_onnx

    clip = read_video(shared_path("data/clips/edtalk_woman_en.mp4"))
    audio = read_audio(shared_path("data/clips/edtalk_woman_en.wav"))[: 12 * 640]
    gt = write_video(tmp_path / "gt.mp4", clip.frames[:12], 25, audio=audio)
    frames = clip.frames[:12].copy()
    frames[:, 150:210, 90:170] = frames[:1, 150:210, 90:170]
    pred = write_video(tmp_path / "pred.mp4", frames, 25, audio=audio)
    torch.manual_seed(0)
    inception = learned_metrics.FIDInceptionV3()
    for module in inception.modules():  # He init keeps a deep random network's features from collapsing
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    lpips = learned_metrics.LPIPS("alex")
    for head in lpips.lins:  # non-negative heads: a distance is a sum of non-negative terms
        head.model[1].weight.data.abs_()
    files = {}
    for name, net in (
        ("inception", inception),
        ("lpips", lpips),
        ("syncnet", syncnet.SyncNet()),
    ):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, files[name])
    arcface = random_arcface_onnx(tmp_path / "arcface.onnx")
    out = tmp_path / "report"
    args = ["eval", "--pred", str(pred), "--gt", str(gt), "-o", str(out), "--model", str(mediapipe_model)]
    args += ["--arcface", str(arcface), *(f"--{k}={v}" for k, v in files.items())]
    assert main(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["not_computed"] == {} and report["identity_embedding"] == "arcface:arcface.onnx"
    assert report["sync_audio"] == str(pred)
    for row in (report["prediction"], *report["baselines"].values()):
        assert all(math.isfinite(row[k]) for k in ("fid", "lpips", "tlp", "lse_c", "lse_d", "csim"))
    truth = report["baselines"]["ground_truth"]
    assert abs(truth["fid"]) < 1e-6 and truth["lpips"] == 0 and truth["tlp"] == 0
    assert truth["csim"] == pytest.approx(1.0, abs=1e-6)
    assert report["prediction"]["lpips"] > 0 and report["prediction"]["fid"] > 1e-6
    table = (out / "report.md").read_text()
    assert "| lse_d |" in table and f"{report['prediction']['lse_d']:.4g}" in table and "Not computed" not in table


def test_eval_batch_mode_goes_on_past_an_unusable_pair(videos, tmp_path, mediapipe_model, capsys):
    """D7: a pair that cannot be scored (no face in the prediction) is listed with its reason in summary.json and
    summary.md; the other pairs are scored and their means written; the exit status is 2."""
    root, pred, gt = videos
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
    write_video(tmp_path / "pred" / "a_blank.mp4", np.full((20, 128, 128, 3), 90, np.uint8), 25)  # sorts first
    (tmp_path / "pred" / "b.mp4").write_bytes(pred.read_bytes())
    for name in ("a_blank", "b"):
        (tmp_path / "gt" / f"{name}.mp4").write_bytes(gt.read_bytes())
    out = tmp_path / "reports"
    args = ["eval", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "-o", str(out)]
    assert main([*args, "--model", str(mediapipe_model)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 pairs failed" in err and "a_blank: no face found" in err, err
    summary = strict_json(out / "summary.json")
    assert list(summary["pairs"]) == ["b"] and list(summary["failed"]) == ["a_blank"]
    assert "no face found" in summary["failed"]["a_blank"]
    single = strict_json(out / "b" / "metrics.json")
    assert summary["means"]["**prediction**"]["psnr_mouth"] == pytest.approx(single["prediction"]["psnr_mouth"])
    assert summary["means"]["ground_truth"]["psnr"] is None  # the mean of infinities: null
    assert "a_blank: no face found" in (out / "summary.md").read_text()
    assert not (out / "a_blank" / "metrics.json").exists()
