"""train_l2v.py end to end: l2v_tiny_cpu on one real clip (TAESD latents) beats frozen lips on held-out frames."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.data.prepare import prepare_dataset
from lmdiff_core.detectors import load_landmarker
from lmdiff_core.data.l2v_dataset import L2VFrameDataset
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline, sample_window

from .conftest import shared_path

REPO = Path(__file__).resolve().parents[1]
CLIP = "edtalk_woman_en"


def _train(config: Path, data: Path, out: Path, *extra, launch: bool = True) -> subprocess.CompletedProcess:
    """train_l2v.py through `accelerate launch` (which turns any failure into exit 1), or run directly."""
    command = [sys.executable]
    if launch:
        command += ["-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "--num_machines", "1"]
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(REPO / "training" / "train_l2v.py"), "--config", str(config), "--data", str(data)]
    command += ["--out", str(out), "--autoencoder", str(shared_path("weights/taesd")), *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="2")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


def _psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.expand_as(a).bool()
    mse = ((a[m] - b[m]) ** 2).mean().item()
    return 10 * math.log10(1 / mse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mediapipe_model):
    root = tmp_path_factory.mktemp("l2v_train")
    data = root / "data"
    prepare_dataset(
        [shared_path(f"data/clips/{CLIP}.mp4")],
        data,
        lambda: load_landmarker("mediapipe", mediapipe_model),
        crop_size=128,
        val_fraction=0.0,
    )
    config = yaml.safe_load((REPO / "training/configs/l2v_tiny_cpu.yaml").read_text())
    config["train"].update(max_steps=250, val_every=250, checkpoint_every=125)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _train(path, data, root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "run", path


def test_generation_beats_frozen_lips_on_held_out_frames(trained):
    """First 70% of the clip trains; on the last 30%, crops generated from the true landmarks and the masked target
    have a higher mouth-region PSNR than the target with frame 0 (of that part) pasted under the same mask."""
    data, run, _ = trained
    pipe = LandmarkToVideoPipeline.from_pretrained(
        run / "final", autoencoder=load_autoencoder(shared_path("weights/taesd"))
    )
    held_out = L2VFrameDataset(data, split="all", frames=(0.7, 1.0), window=2, size=128, topology="ibug68")
    ae, unet = pipe.autoencoder, pipe.unet
    first = held_out.range_start_crop(0)
    generated, frozen = [], []
    for i in range(0, len(held_out), max(1, len(held_out) // 6)):
        item = held_out[i]
        noise = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(i)).expand(2, -1, -1, -1)
        latents = sample_window(
            unet,
            pipe.scheduler,
            noise,
            item["condition"],
            ae.encode(item["pose_reference"]),
            item["pose_mask"],
            ae.encode(item["identity"][None]).expand(2, -1, -1, -1),
            10,
        )
        out, target, mouth = ae.decode(latents), item["target"], item["mouth_mask"]
        generated.append(_psnr(out, target, mouth))
        frozen.append(_psnr(first.expand_as(target), target, mouth))
    gen, base = sum(generated) / len(generated), sum(frozen) / len(frozen)
    assert gen > base + 1.0, (gen, base)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["val_mouth_psnr"] > logged[-1]["val_mouth_psnr_frozen_lips"]


def test_run_folder_is_protected_and_resumable(trained):
    data, run, config = trained
    again = _train(config, data, run, launch=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_000125", "step_000250"]
    resumed = _train(config, data, run, "--resume", "--max-steps", "260")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 260 and (run / "checkpoints" / "step_000260").is_dir()


def test_lora_fine_tune_changes_the_weights_by_low_rank_updates_only(trained, tmp_path):
    """A `lora:` run on the trained checkpoint: final/ holds the merged weights. Every LoRA-targeted weight moved by
    a matrix of rank <= the LoRA rank (checked by SVD), every other weight is exactly the base's."""
    data, run, config_path = trained
    rank = 2
    config = yaml.safe_load(config_path.read_text())
    config["lora"] = {"base": str(run / "final"), "rank": rank, "alpha": rank}
    config["train"].update(max_steps=30, val_every=1000, checkpoint_every=1000, lr=5e-3)
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _train(path, data, tmp_path / "lora", launch=False)
    assert result.returncode == 0, result.stderr[-3000:]
    base = LandmarkToVideoPipeline.from_pretrained(run / "final").unet.state_dict()
    tuned = LandmarkToVideoPipeline.from_pretrained(tmp_path / "lora" / "final").unet.state_dict()
    assert base.keys() == tuned.keys()
    targets = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight", "conv1.weight", "conv2.weight")
    moved = 0
    for name, weight in base.items():
        delta = (tuned[name] - weight).reshape(weight.shape[0], -1) if weight.ndim > 1 else tuned[name] - weight
        if name.endswith(targets):
            singular = torch.linalg.svdvals(delta.double())
            assert (singular[rank:] <= 1e-4 * max(singular[0].item(), 1e-12)).all(), name
            moved += bool(singular[0] > 1e-6)
        else:
            assert torch.equal(tuned[name], weight), name
    assert moved > 10
