"""benchmarks/eval_protocol.py: the protocol run end to end on one real clip (a tiny test part, 1 sampling step) writes
a results JSON and markdown whose numbers are evaluate()'s, and a failed clip is recorded, not fatal."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "eval_protocol.py"
CLIP = "edtalk_woman_en"
MODES = ("dub", "one_shot", "still", "dub_fast", "dub_fast_true", "dub_quality", "dub_quality_true")
KEYS = (
    "psnr_mouth", "ssim_mouth", "lmd_mouth", "mouth_opening_correlation", "csim", "cpbd", "frame_difference_error_mouth"
)


def _protocol():
    spec = importlib.util.spec_from_file_location("eval_protocol", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _refuse_non_json(constant):
    raise ValueError(f"bare {constant} in a results file: not JSON")


def _same(a, b) -> bool:
    """Equal numbers, NaN equal to NaN (a metric undefined for a still mouth)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _cell(value) -> str:
    """A number as the markdown tables write it; null in the JSON is a value that was not finite (inf or nan)."""
    return "inf|-inf|nan" if value is None else format(value, ".4g")


def _cells_match(cells: list[str], values: list) -> bool:
    return len(cells) == len(values) and all(c in _cell(v).split("|") for c, v in zip(cells, values))


def _table_rows(markdown: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines()
        if line.startswith("| ") and not line.startswith("| mode |") and not line.startswith("| clip |")
    ]


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory, mediapipe_model):
    shared_path(f"data/clips/{CLIP}.mp4")
    root = tmp_path_factory.mktemp("eval_protocol")
    command = [sys.executable, str(SCRIPT), "--clips", CLIP, "--max-seconds", "0.4", "--steps", "1"]
    command += ["--modes", *MODES, "--landmarker", str(mediapipe_model), "--name", "test"]
    command += ["--work-dir", str(root / "work"), "--results-dir", str(root / "results")]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def test_results_files_hold_evaluates_numbers(protocol_run):
    results = protocol_run / "results"
    report = json.loads((results / "eval_protocol_test.json").read_text(), parse_constant=_refuse_non_json)
    markdown = (results / "eval_protocol_test.md").read_text()
    clip = report["clips"][CLIP]
    assert clip["status"] == "ok"
    assert clip["training_set"]["status"] == "seen"  # the model cards: all 7 dev clips were trained on
    assert clip["frames_test"] == 10 and clip["frames_context"] == round(0.7 * clip["frames_total"])
    assert report["settings"]["steps"] == 1 and report["settings"]["modes"] == list(MODES)
    assert set(report["checkpoints"]) == {"a2l", "l2v", "refiner"} and "cpu" in report["machine"]

    for mode in MODES:
        result = clip["modes"][mode]
        assert result["status"] == "ok", result.get("error")
        written = json.loads((protocol_run / "work" / CLIP / mode / "report" / "metrics.json").read_text())
        assert written["frames"] == result["frames"] == 10
        for name, values in written["prediction"].items():
            if name != "per_frame_psnr":
                assert _same(result["metrics"][name], values), (mode, name)
        assert written["baselines"].keys() == result["baselines"].keys()
        for baseline, values in written["baselines"].items():
            for name, value in values.items():
                if name != "per_frame_psnr":
                    assert _same(result["baselines"][baseline][name], value), (mode, baseline, name)
        # one clip: its numbers are the means
        rows = report["summary"]["seen"][mode]["rows"]
        assert report["summary"]["seen"][mode]["clips"] == [CLIP]
        assert report["summary"]["held_out"][mode]["clips"] == []
        for key in KEYS:
            assert _same(rows["prediction"][key], result["metrics"][key])
            for baseline in written["baselines"]:
                assert _same(rows[baseline][key], result["baselines"][baseline][key])

    # every number in the markdown tables is the JSON's (4 significant digits)
    summary_rows, clip_rows = 0, 0
    for cells in _table_rows(markdown):
        if cells[0] == CLIP:  # per clip: clip | training set | frames | mode | KEYS... | seconds
            values = report["clips"][CLIP]["modes"][cells[3]]["metrics"]
            assert cells[1] == "seen" and cells[2] == "175 / 10"
            assert _cells_match(cells[4 : 4 + len(KEYS)], [values[k] for k in KEYS]), cells
            clip_rows += 1
        else:  # summary: mode | video | clips | KEYS...
            mode, video = cells[0], cells[1].strip("*")
            values = report["summary"]["seen"][mode]["rows"][video]
            assert cells[2] == "1"
            assert _cells_match(cells[3:], [values[k] for k in KEYS]), cells
            summary_rows += 1
    assert clip_rows == len(MODES)
    assert summary_rows == len(MODES) * (1 + len(clip["modes"]["dub"]["baselines"]))
    assert "No clip of this group in this run." in markdown  # no held-out clip among the 7 default clips


def test_failed_clip_is_recorded_and_left_out_of_the_means():
    protocol = _protocol()
    metrics = {k: 0.5 for k in protocol.SUMMARY_KEYS}
    ok = {
        "status": "ok",
        "training_set": {"status": "held_out"},
        "frames_context": 70,
        "frames_test": 30,
        "modes": {
            "dub": {
                "status": "ok",
                "metrics": {**metrics, "csim": float("nan")},
                "baselines": {"frozen_lower_face": metrics},
                "seconds": {"generate": 1.0, "evaluate": 2.0},
            }
        },
    }
    failed = {"status": "failed", "training_set": {"status": "held_out"}, "error": "RuntimeError: no face"}
    clips = {"a": ok, "b": failed}
    summary = protocol.summarise(clips, ["dub"])
    assert summary["held_out"]["dub"]["clips"] == ["a"]
    assert summary["held_out"]["dub"]["rows"]["prediction"]["psnr_mouth"] == 0.5
    assert math.isnan(summary["held_out"]["dub"]["rows"]["prediction"]["csim"])
    assert summary["seen"]["dub"]["clips"] == []
    report = {
        "name": "t",
        "settings": dict(
            context_fraction=0.7, max_seconds=1.0, modes=["dub"], steps=1, sampler="ddim", seed=0, finetune_steps=0
        ),
        "summary": summary,
        "clips": clips,
        "identity_embedding": None,
        "machine": {"cpu": "x", "cores": 2, "torch_threads": 1},
        "seconds": {"total": 60.0},
        "not_computed": {"fid": "not computed"},
    }
    text = protocol.markdown(report)
    assert "- b: RuntimeError: no face" in text
    assert "| a | held-out | 70 / 30 | dub | 0.5 |" in text
