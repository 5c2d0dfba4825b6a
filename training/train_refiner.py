"""Train the quality-mode refiner (an `L2VUNet` with ``extra_references``: fast mode's warped retrieval) on real clips.

    python training/train_refiner.py --config training/configs/refiner_default_cpu.yaml --shared ../shared/data \
        --cache /tmp/refiner/cache --out RUN_DIR [--max-steps N] [--resume]

Pairs come from `lmdiff_core.refiner_data` (built once into --cache): target frame t of a clip, the warp of the same
clip's frames at least 2 s away. Loss: x0 mean squared error in pixel space, weighted 1 inside the paste mask (the
lower face fast mode pastes), `outside_weight` elsewhere, plus `mouth_weight` x the error in the mouth. The noisy
input is the target (standard diffusion) or, for a share `warped_start` of the items, the warped reference noised to
timestep t <= `max_timestep` (what inference starts from). Validation (`val` clips, people never trained on): the
refined crop (inference exactly as in quality mode) against the target in the paste mask, next to fast mode's warp.
The run folder gets checkpoints, `metrics.jsonl`, `final/` (EMA) and `best/` (the best validation mouth PSNR).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import yaml
from checkpoint import TrainingState
from train_l2v import build_unet, ema_pipeline, mouth_psnr
from trainer_common import global_random, load_config, resume_checkpoint, run_training_steps, start_run

from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
from lmdiff_core.pipelines.schedulers import make_scheduler
from lmdiff_core.refiner_data import RefinerPairs, build_cache

MEDIAPIPE = Path("weights/mediapipe_face_landmarker/face_landmarker_v2_with_blendshapes.task")


def clip_lists(shared: Path, data_cfg: dict) -> tuple[list[Path], list[Path]]:
    """(training clips, validation clips): the mp4s of the config's folders under `shared`, without the excluded
    clips and people (`exclude`, `exclude_prefix`); validation = `val` (which must be excluded from training)."""
    clips = sorted(p for folder in data_cfg["folders"] for p in (Path(shared) / folder).glob("*.mp4"))
    if not clips:
        raise LmdiffInputError(f"no mp4 clips in {data_cfg['folders']} under {shared}")
    excluded = lambda p: p.stem in data_cfg.get("exclude", []) or p.stem.startswith(  # noqa: E731
        tuple(data_cfg.get("exclude_prefix", []))
    )
    val = [p for p in clips if p.stem in data_cfg.get("val", [])]
    if len(val) != len(data_cfg.get("val", [])):
        raise LmdiffInputError(f"validation clips {data_cfg.get('val')} not all found under {shared}")
    if not all(excluded(p) for p in val):
        raise LmdiffInputError("every validation clip must be excluded from training (exclude or exclude_prefix)")
    return [p for p in clips if not excluded(p)], val


def encode_batch(autoencoder, batch: dict) -> dict:
    """The latents of a batch's images: target, warped reference, masked pose reference, identity."""
    mask = batch["pose_mask"]
    masked = batch["target"] * (1 - mask) + 0.5 * mask
    with torch.no_grad():
        return {name: autoencoder.encode(x) for name, x in
                (("target", batch["target"]), ("warped", batch["warped"]), ("pose", masked),
                 ("identity", batch["identity"]))}


def loss_weights(batch: dict, size: tuple[int, int], train: dict) -> torch.Tensor:
    """Per-pixel loss weights [B, 1, h, w] at latent resolution: 1 in the paste mask, `outside_weight` elsewhere,
    + `mouth_weight` in the mouth."""
    w = batch["paste_mask"] + train.get("outside_weight", 0.1) * (1 - batch["paste_mask"])
    w = w + train.get("mouth_weight", 0.0) * batch["mouth_mask"]
    return torch.nn.functional.interpolate(w, size=size, mode="area")


def compute_loss(model, batch, autoencoder, noise_scheduler, step: int, config: dict, accelerator) -> torch.Tensor:
    train = config["train"]
    latents = encode_batch(autoencoder, batch)
    clean = latents["target"]
    b = clean.shape[0]
    world, rank, seed = accelerator.num_processes, accelerator.process_index, train.get("seed", 0)
    noise = global_random(step, seed, b * world, tuple(clean.shape[1:]), rank, world, "noise").to(clean)
    t = global_random(step, seed, b * world, (), rank, world, "t", high=train.get("max_timestep", 1000) + 1)
    # True with probability warped_start: start from the warped reference (as at inference), else from the target
    share = train.get("warped_start", 0.5)
    from_warped = global_random(step, seed, b * world, (), rank, world, "one_shot", p=1 - share)
    start = torch.where(from_warped[:, None, None, None].to(clean.device), latents["warped"], clean)
    noisy = noise_scheduler.add_noise(start, noise, t.to(clean.device))
    mask = batch["pose_mask"]
    output = model(noisy, t, batch["condition"], latents["pose"], mask, latents["identity"],
                   references=latents["warped"])
    weights = loss_weights(batch, clean.shape[-2:], train)
    return (((output.float() - clean.float()) ** 2).mean(1, keepdim=True) * weights).sum() / weights.sum()


@torch.no_grad()
def refine_items(pipeline: LandmarkToVideoPipeline, batch: dict) -> torch.Tensor:
    """Refined crops [B, 3, S, S] of cached pairs, sampled exactly as quality mode samples (`quality.sdedit`)."""
    from lmdiff_core.pipelines.quality import sdedit, sdedit_timesteps

    unet, ae = pipeline.unet, pipeline.autoencoder
    latents = encode_batch(ae, batch)
    settings = pipeline.refine
    noise = torch.randn((1, *latents["target"].shape[1:]), generator=torch.Generator().manual_seed(0))
    timesteps = sdedit_timesteps(unet.config.num_train_timesteps, settings["strength"], settings["steps"])

    def denoise(sample, t):
        return unet(sample, t, batch["condition"], latents["pose"], batch["pose_mask"], latents["identity"],
                    references=latents["warped"])

    out = sdedit(denoise, latents["warped"], noise, pipeline.scheduler.alphas_cumprod, timesteps)
    return ae.decode(out.float())


def evaluate_val(pipeline: LandmarkToVideoPipeline, dataset: RefinerPairs, items: int = 24) -> dict:
    """Validation PSNR (dB) in the mouth and in the paste mask of the refined crops and of fast mode's warp."""
    picks = torch.linspace(0, len(dataset) - 1, min(items, len(dataset))).round().long().tolist()
    scores = {"refined": [], "warped": []}
    for chunk in range(0, len(picks), 8):
        batch = torch.utils.data.default_collate([dataset[i] for i in picks[chunk : chunk + 8]])
        refined = refine_items(pipeline, batch)
        for name, images in (("refined", refined), ("warped", batch["warped"])):
            scores[name].append((images, batch["target"], batch["mouth_mask"], batch["paste_mask"]))
    out = {"val_items": len(picks)}
    for name, parts in scores.items():
        pred, target, mouth, paste = (torch.cat(x) for x in zip(*parts))
        suffix = "" if name == "refined" else "_fast"
        out[f"val_mouth_psnr{suffix}"] = mouth_psnr(pred, target, mouth)
        out[f"val_lower_face_psnr{suffix}"] = mouth_psnr(pred, target, paste)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the lmdiff quality-mode refiner.")
    parser.add_argument("--config", required=True)
    parser.add_argument("--shared", required=True, help="the shared folder (clips under the config's data.folders)")
    parser.add_argument("--cache", required=True, help="folder of the precomputed pairs (built when missing)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    args = parser.parse_args(argv)
    try:
        return train(args)
    except LmdiffInputError as exc:
        print(f"train_refiner: error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    config = load_config(args.config)
    train_cfg, data_cfg = config["train"], config["data"]
    max_steps = args.max_steps or train_cfg["max_steps"]
    run_dir, shared = Path(args.out), Path(args.shared)
    resume_from = resume_checkpoint(run_dir, args.resume)
    train_clips, val_clips = clip_lists(shared, data_cfg)
    build_cache(val_clips + train_clips, Path(args.cache), shared / MEDIAPIPE, data_cfg["size"], data_cfg["max_pairs"])
    dataset = RefinerPairs(args.cache, [p.stem for p in train_clips])
    val_dataset = RefinerPairs(args.cache, [p.stem for p in val_clips])

    accelerator = Accelerator(
        mixed_precision=train_cfg.get("mixed_precision", "no"),
        gradient_accumulation_steps=train_cfg.get("grad_accum", 1),
        cpu=train_cfg.get("cpu", False),
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True),
    )
    set_seed(train_cfg.get("seed", 0))
    autoencoder = load_autoencoder(config.get("autoencoder", "pixel"), device=accelerator.device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train_cfg["batch_size"], shuffle=True, drop_last=True, num_workers=0
    )
    unet = build_unet(config, autoencoder)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg["lr"], weight_decay=train_cfg.get("weight_decay", 0.0))
    lr_scheduler = get_scheduler(
        train_cfg.get("lr_schedule", "cosine"), optimizer, num_warmup_steps=train_cfg.get("warmup_steps", 0),
        num_training_steps=max_steps,
    )
    ema = EMAModel(params, decay=train_cfg.get("ema_decay", 0.999))
    model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    state = TrainingState(accelerator, model, optimizer, lr_scheduler, ema)
    noise_scheduler = make_scheduler(accelerator.unwrap_model(model), "ddpm")
    start_run(state, run_dir, resume_from)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    settings = dict(crop_size=dataset.size, topology="ibug68", refine=dict(config.get("refine", {})) or None)
    best = {"psnr": -math.inf}

    def validate() -> dict:
        pipeline = ema_pipeline(accelerator, model, ema, autoencoder, settings)
        record = evaluate_val(pipeline, val_dataset)
        if accelerator.is_main_process and record["val_mouth_psnr"] > best["psnr"]:
            best["psnr"] = record["val_mouth_psnr"]
            pipeline.save_pretrained(run_dir / "best")
            record["best"] = True
        return record

    completed = run_training_steps(
        state, loader, dataset, params, max_steps, train_cfg, run_dir,
        loss_fn=lambda batch: compute_loss(model, batch, autoencoder, noise_scheduler, state.step, config, accelerator),
        validate_fn=validate,
        default_every=200,
    )
    if not completed:
        return 130
    if accelerator.is_main_process:
        ema_pipeline(accelerator, model, ema, autoencoder, settings).save_pretrained(run_dir / "final")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
