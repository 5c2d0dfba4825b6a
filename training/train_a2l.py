"""Train an A2L model (A2LLSTM or A2LDiffusion) on a dataset made by `lmdiff prepare`.

    accelerate launch training/train_a2l.py --config training/configs/a2l_lstm_tiny_cpu.yaml \
        --data DATASET_DIR --out RUN_DIR [--max-steps N] [--resume]

The run folder gets `checkpoints/step_NNNNNN/` (full state: model, optimizer, LR schedule, EMA, RNG, step; the last
two are kept), `metrics.jsonl` (training loss and validation: mouth landmark distance and mouth-opening correlation
with the ground truth), and `final/`, the EMA model as an `AudioToLandmarksPipeline` checkpoint for `lmdiff a2l`.

Batches are split across processes (`split_batches`), and every random draw of a step (diffusion noise, timesteps,
audio dropout) is made for the whole global batch from (seed, step) and sliced per process, so N processes give the
same result as one process with the same global batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from checkpoint import TrainingState, publish_folder
from trainer_common import global_random, load_config, resume_checkpoint, run_training_steps, start_run

from lmdiff_core.audio_features import load_feature_extractor
from lmdiff_core.data.a2l_dataset import A2LWindowDataset
from lmdiff_core.data.store import clip_arrays, load_index
from lmdiff_core.motion import dataset_motion_stats
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.models import A2LLSTM, A2LDiffusion
from lmdiff_core.motion import MotionStats
from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline

MODEL_CLASSES = {"A2LLSTM": A2LLSTM, "A2LDiffusion": A2LDiffusion}


def load_a2l_config(path) -> dict:
    config = load_config(path)
    if config["model"].get("class") not in MODEL_CLASSES:
        raise LmdiffInputError(f"{path}: model.class must be one of {sorted(MODEL_CLASSES)}")
    return config


def build_model(config: dict, dataset: A2LWindowDataset):
    sample = dataset[0]
    k, layers, dim = sample["audio"].shape[1:]
    args = dict(config["model"].get("args", {}))
    args.update(n_points=sample["landmarks"].shape[1], audio_dim=dim, audio_sub_frames=k, audio_layers=layers)
    cls = MODEL_CLASSES[config["model"]["class"]]
    if cls is A2LDiffusion:
        args.update(window=config["data"]["window"], prev_frames=config["data"]["prev_frames"])
        args.setdefault("lip_indices", tuple(lip_indices(config["data"]["topology"])))
        args.setdefault("displacement_scale", displacement_scale(dataset))
    model = cls(**args)
    model.audio_norm.set_statistics(*feature_statistics(dataset))
    return model


def _spread(dataset: A2LWindowDataset, samples: int) -> np.ndarray:
    return np.linspace(0, len(dataset) - 1, min(samples, len(dataset))).astype(int)


def feature_statistics(dataset: A2LWindowDataset, samples: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std [L, D] of the audio features over training windows."""
    audio = np.concatenate(
        [dataset[i]["audio"].reshape(-1, *dataset[i]["audio"].shape[-2:]) for i in _spread(dataset, samples)]
    )
    return torch.from_numpy(audio.mean(0)), torch.from_numpy(audio.std(0))


def lip_indices(topology: str) -> np.ndarray:
    from lmdiff_core.topology import get_topology

    topo = get_topology(topology)
    return np.union1d(topo.part_indices("outer_lips"), topo.part_indices("inner_lips"))


def displacement_scale(dataset: A2LWindowDataset, samples: int = 64) -> float:
    """1 / std of landmark displacements from the reference over some training windows (the diffusion target)."""
    disp = np.concatenate(
        [(dataset[i]["landmarks"] - dataset[i]["reference"][None]).ravel() for i in _spread(dataset, samples)]
    )
    return float(1.0 / max(disp.std(), 1e-3))


def compute_loss(model, batch, step: int, config: dict, accelerator, noise_scheduler):
    train = config["train"]
    target, reference = batch["landmarks"], batch["reference"]
    lips = torch.from_numpy(lip_indices(config["data"]["topology"]))
    weights = torch.ones(target.shape[2], device=target.device)
    weights[lips] = train.get("lip_weight", 1.0)
    weights = weights / weights.mean()
    unwrapped = accelerator.unwrap_model(model)
    if isinstance(unwrapped, A2LLSTM):
        pred = model(batch["audio"], reference)
        error = (pred - target).abs().sum(-1)
        velocity = ((pred[:, 1:] - pred[:, :-1]) - (target[:, 1:] - target[:, :-1])).abs().sum(-1)
        return (error * weights).mean() + train.get("velocity_weight", 0.5) * (velocity * weights).mean()
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = target.shape[0] * world
    seed = train.get("seed", 0)
    clean = unwrapped.landmarks_to_sample(target, reference)
    noise = global_random(step, seed, global_batch, tuple(clean.shape[1:]), rank, world, "noise").to(clean)
    t = global_random(step, seed, global_batch, (), rank, world, "t", high=noise_scheduler.config.num_train_timesteps)
    keep_audio = global_random(step, seed, global_batch, (), rank, world, "mask", p=unwrapped.config.audio_dropout)
    t = t.to(clean.device)
    noisy = noise_scheduler.add_noise(clean, noise, t)
    # Prev dropout: some windows are trained without the previous frames, as the first window is sampled.
    keep_prev = global_random(step, seed, global_batch, (), rank, world, "prev", p=train.get("prev_dropout", 0.0))
    prev_mask = batch["prev_mask"] & keep_prev.to(clean.device)[:, None]
    output = model(
        noisy, t, batch["audio"], reference, batch["prev"], audio_mask=keep_audio.to(clean.device), prev_mask=prev_mask
    )
    kind = unwrapped.config.prediction_type
    goal = {"v_prediction": lambda: noise_scheduler.get_velocity(clean, noise, t), "epsilon": lambda: noise}.get(
        kind, lambda: clean
    )()
    return (((output - goal) ** 2).sum(-1) * weights).mean()


@torch.no_grad()
def validate(pipeline: AudioToLandmarksPipeline, data_dir: Path, index: dict, max_clips: int = 4) -> dict:
    """Mouth landmark distance (inter-ocular units) and mouth-opening correlation on whole validation clips."""
    from lmdiff_core import LandmarkSequence
    from lmdiff_core.canonical import CANONICAL_SIZE, from_model_units, to_model_units
    from lmdiff_core.topology import convert_points

    clips = [c for c in index["clips"] if c["split"] == "val"][:max_clips]
    if not clips:
        return {}
    lmd, corr = [], []
    for clip in clips:
        arrays = clip_arrays(data_dir, clip["id"])
        truth = to_model_units(convert_points(arrays["points"], index["topology"], pipeline.topology))
        reference = LandmarkSequence(
            from_model_units(truth[:1]), pipeline.topology, frame_size=CANONICAL_SIZE, space="canonical"
        )
        pred = pipeline.predict_features(arrays["features"], reference, num_inference_steps=10)
        pred = to_model_units(pred.points)
        lips = lip_indices(pipeline.topology)
        lmd.append(float(np.linalg.norm(pred[:, lips] - truth[:, lips], axis=-1).mean()))
        seq_t = LandmarkSequence(
            from_model_units(truth), pipeline.topology, space="canonical", frame_size=CANONICAL_SIZE
        )
        seq_p = LandmarkSequence(
            from_model_units(pred), pipeline.topology, space="canonical", frame_size=CANONICAL_SIZE
        )
        a, b = seq_t.mouth_opening(), seq_p.mouth_opening()
        corr.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0)
    return {"val_mouth_lmd": float(np.mean(lmd)), "val_mouth_open_corr": float(np.mean(corr)), "val_clips": len(clips)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train an lmdiff A2L model (run with accelerate launch).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="dataset folder made by `lmdiff prepare`")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run folder's newest complete checkpoint"
    )
    args = parser.parse_args(argv)
    try:
        return train(args)
    except LmdiffInputError as exc:
        print(f"train_a2l: error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    config = load_a2l_config(args.config)
    train_cfg, data_cfg = config["train"], config["data"]
    max_steps = args.max_steps or train_cfg["max_steps"]
    run_dir, data_dir = Path(args.out), Path(args.data)
    index = load_index(data_dir)
    resume_from = resume_checkpoint(run_dir, args.resume)

    accelerator = Accelerator(
        mixed_precision=train_cfg.get("mixed_precision", "no"),
        gradient_accumulation_steps=train_cfg.get("grad_accum", 1),
        cpu=train_cfg.get("cpu", False),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )
    seed = train_cfg.get("seed", 0)
    set_seed(seed)
    batch_size = train_cfg["batch_size"]
    if batch_size % accelerator.num_processes:
        raise LmdiffInputError(
            f"train.batch_size {batch_size} must divide by the {accelerator.num_processes} processes"
        )
    dataset = A2LWindowDataset(
        data_dir,
        "train",
        window=data_cfg["window"],
        prev_frames=data_cfg["prev_frames"],
        topology=data_cfg["topology"],
        reference=data_cfg.get("reference", "random"),
        seed=seed,
        stride=data_cfg.get("stride"),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    if len(loader) == 0:
        raise LmdiffInputError(f"{data_dir}: fewer training windows ({len(dataset)}) than one batch ({batch_size})")
    model = build_model(config, dataset)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_cfg["lr"], weight_decay=train_cfg.get("weight_decay", 0.0)
    )
    lr_scheduler = get_scheduler(
        train_cfg.get("lr_schedule", "cosine"),
        optimizer,
        num_warmup_steps=train_cfg.get("warmup_steps", 0),
        num_training_steps=max_steps,
    )
    ema = EMAModel(model.parameters(), decay=train_cfg.get("ema_decay", 0.999))
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    state = TrainingState(accelerator, model, optimizer, lr_scheduler, ema)
    noise_scheduler = None
    if isinstance(accelerator.unwrap_model(model), A2LDiffusion):
        from lmdiff_core.pipelines.schedulers import make_scheduler

        noise_scheduler = make_scheduler(accelerator.unwrap_model(model), "ddpm")
    start_run(state, run_dir, resume_from)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    features = load_feature_extractor(index["features"])
    motion = MotionStats.from_summary(dataset_motion_stats(data_dir, "train")["summary"])
    params = list(accelerator.unwrap_model(model).parameters())
    completed = run_training_steps(
        state,
        loader,
        dataset,
        params,
        max_steps,
        train_cfg,
        run_dir,
        loss_fn=lambda batch: compute_loss(model, batch, state.step, config, accelerator, noise_scheduler),
        validate_fn=lambda: validate(
            ema_pipeline(accelerator, model, ema, features, data_cfg, motion), data_dir, index
        ),
        default_every=100,
    )
    if not completed:
        return 130
    if accelerator.is_main_process:
        pipeline = ema_pipeline(accelerator, model, ema, features, data_cfg, motion)
        partial = run_dir / "final.partial"
        pipeline.save_pretrained(partial)
        publish_folder(partial, run_dir / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def ema_pipeline(accelerator, model, ema, features, data_cfg, motion) -> AudioToLandmarksPipeline:
    """A pipeline around a copy of the model carrying the EMA weights (the training model is untouched)."""
    unwrapped = accelerator.unwrap_model(model)
    copy = type(unwrapped).from_config(unwrapped.config)
    copy.load_state_dict(unwrapped.state_dict())
    ema.copy_to(copy.parameters())
    return AudioToLandmarksPipeline(
        copy.float(), features, data_cfg["topology"], motion_stats=motion, window=data_cfg["window"]
    )


if __name__ == "__main__":
    sys.exit(main())
