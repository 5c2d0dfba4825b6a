"""Train the L2V U-Net (landmarks -> face crops) on a dataset made by `lmdiff prepare` (with crops).

    accelerate launch training/train_l2v.py --config training/configs/l2v_tiny_cpu.yaml \
        --data DATASET_DIR --autoencoder VAE_PATH --out RUN_DIR [--max-steps N] [--resume]

Loss: the diffusion target (epsilon or v) on the latents, mean squared error, plus `mouth_weight` x the same error
inside the mouth region. Each item is a window of consecutive frames (one timestep per window, so the temporal
layers see one noise level); with probability `condition_dropout` the landmark image is blanked (classifier-free
guidance) and with probability `one_shot` the pose reference is the identity crop with everything to generate.

The run folder gets `checkpoints/step_NNNNNN/` (full state; the last two are kept), `metrics.jsonl` (loss, and on
held-out frames the mouth-region PSNR of generated crops next to the "frame 0's lower face" baseline) and `final/`,
the EMA model as a `LandmarkToVideoPipeline` checkpoint. With a `lora` section, a trained L2V checkpoint is
fine-tuned through peft LoRA adapters (e.g. on one identity) and `final/` holds the merged weights.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from checkpoint import TrainingState
from trainer_common import global_random, load_config, resume_checkpoint, run_training_steps, start_run

from lmdiff_core.autoencoders import load_autoencoder
from lmdiff_core.errors import LmdiffInputError
from lmdiff_core.data.l2v_dataset import L2VFrameDataset
from lmdiff_core.models import L2VUNet
from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline, sample_window
from lmdiff_core.pipelines.schedulers import make_scheduler

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


def build_unet(config: dict, autoencoder) -> L2VUNet:
    """A new U-Net for the autoencoder's latents, from SD1.5 weights when `model.sd15_unet` names them, or the
    trained L2V checkpoint `lora.base` with LoRA adapters."""
    model_cfg, lora = config["model"], config.get("lora")
    if lora:
        unet = L2VUNet.from_pretrained(Path(lora["base"]) / "unet")
        if unet.config.latent_channels != autoencoder.latent_channels:
            raise LmdiffInputError(f"lora.base {lora['base']} was trained on other latents than {autoencoder.kind}")
        from peft import LoraConfig

        unet.requires_grad_(False)
        rank = int(lora.get("rank", 8))
        unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=lora.get("alpha", rank), target_modules=LORA_TARGETS, init_lora_weights=True)
        )
        return unet
    args = dict(model_cfg.get("args", {}))
    args.update(
        latent_channels=autoencoder.latent_channels, downscale=autoencoder.downscale, autoencoder=autoencoder.kind
    )
    if model_cfg.get("sd15_unet"):  # SD1.5's block layout; only the settings that keep its weights usable
        keep = ("latent_channels", "downscale", "autoencoder", "temporal_attention", "prediction_type")
        return L2VUNet.from_sd15(model_cfg["sd15_unet"], **{k: args[k] for k in keep if k in args})
    return L2VUNet(**args)


class LatentEncoder:
    """Training images -> latents. With `cache`, each (clip, frame, role) is encoded once and kept in memory: on a
    CPU the autoencoder costs more than the U-Net, and a small data set's latents fit (`train.cache_latents`)."""

    def __init__(self, autoencoder, cache: bool):
        self.autoencoder = autoencoder
        self.store = {} if cache else None

    def __call__(self, images: torch.Tensor, keys: list | None = None) -> torch.Tensor:
        """[B, F, 3, S, S] or [B, 3, S, S] images (keys: one per image, flattened) -> latents, same leading shape."""
        flat = images.reshape(-1, *images.shape[-3:])
        if self.store is None or keys is None:
            latents = self.autoencoder.encode(flat)
        else:
            missing = [i for i, key in enumerate(keys) if key not in self.store]
            if missing:
                for i, latent in zip(missing, self.autoencoder.encode(flat[missing])):
                    self.store[keys[i]] = latent
            latents = torch.stack([self.store[key] for key in keys])
        return latents.reshape(*images.shape[:-3], *latents.shape[1:])


def _frame_keys(batch, role: str) -> list:
    frames = batch["target"].shape[1]
    return [(clip, int(start) + j, role) for clip, start in zip(batch["clip"], batch["start"]) for j in range(frames)]


def compute_loss(
    model, batch, encoder: LatentEncoder, noise_scheduler, step: int, config: dict, accelerator
) -> torch.Tensor:
    train = config["train"]
    b, f = batch["target"].shape[:2]
    world, rank = accelerator.num_processes, accelerator.process_index
    seed = train.get("seed", 0)
    with torch.no_grad():
        clean = encoder(batch["target"], _frame_keys(batch, "target"))  # [B, F, C, h, w]
        pose = encoder(batch["pose_reference"], _frame_keys(batch, "pose"))
        identity_keys = [(c, int(i), "target") for c, i in zip(batch["clip"], batch["identity_frame"])]
        identity = encoder(batch["identity"], identity_keys)  # [B, C, h, w]
    one_shot = ~global_random(step, seed, b * world, (), rank, world, "one_shot", p=train.get("one_shot", 0.0))
    keep_condition = global_random(
        step, seed, b * world, (), rank, world, "mask", p=train.get("condition_dropout", 0.0)
    )
    pose_mask = batch["pose_mask"]
    one = one_shot.to(clean.device)[:, None, None, None, None]
    pose = torch.where(one, identity[:, None].expand_as(pose), pose)
    pose_mask = torch.where(one, torch.ones_like(pose_mask), pose_mask)
    condition = batch["condition"] * keep_condition.to(clean.device)[:, None, None, None, None]
    noise = global_random(step, seed, b * world, tuple(clean.shape[1:]), rank, world, "noise").to(clean)
    t = global_random(step, seed, b * world, (), rank, world, "t", high=noise_scheduler.config.num_train_timesteps)
    t = t.to(clean.device)[:, None].expand(b, f).reshape(-1)
    flat = lambda x: x.reshape(b * f, *x.shape[2:])  # noqa: E731
    noisy = noise_scheduler.add_noise(flat(clean), flat(noise), t)
    output = model(
        noisy,
        t,
        flat(condition),
        flat(pose),
        flat(pose_mask),
        identity[:, None].expand(b, f, *identity.shape[1:]).reshape(b * f, *identity.shape[1:]),
        num_frames=f,
    )
    kind = accelerator.unwrap_model(model).config.prediction_type
    if kind == "v_prediction":
        goal = noise_scheduler.get_velocity(flat(clean), flat(noise), t)
    else:
        goal = flat(clean) if kind == "sample" else flat(noise)
    error = (output.float() - goal.float()) ** 2
    mouth = F.interpolate(flat(batch["mouth_mask"]), size=error.shape[-2:], mode="area")
    return error.mean() + train.get("mouth_weight", 0.0) * (error * mouth).sum() / (mouth.sum() * error.shape[1] + 1)


def mouth_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB) of pred vs target inside mask, over the batch [B, 3, S, S] / mask [B, 1, S, S]."""
    m = mask.expand_as(pred)
    mse = float(((pred - target) ** 2 * m).sum() / m.sum().clamp(min=1))
    return 10 * math.log10(1.0 / max(mse, 1e-10))


@torch.no_grad()
def evaluate_heldout(pipeline: LandmarkToVideoPipeline, dataset: L2VFrameDataset, steps: int = 10, items: int = 4):
    """Mouth-region PSNR on held-out windows: generated from the true landmarks and the masked pose reference, and
    the frozen-lips baseline (the range's first frame pasted under the same mask)."""
    unet, ae = pipeline.unet, pipeline.autoencoder
    picks = torch.linspace(0, len(dataset) - 1, min(items, len(dataset))).round().long().tolist()
    generated, frozen, targets, masks = [], [], [], []
    for i in picks:
        item = dataset[i]
        f = item["target"].shape[0]
        noise = torch.randn(
            (1, ae.latent_channels, *[s // ae.downscale for s in item["target"].shape[-2:]]),
            generator=torch.Generator().manual_seed(i),
        ).expand(f, -1, -1, -1)
        latents = sample_window(
            unet,
            pipeline.scheduler,
            noise.to(unet.device, unet.dtype),
            item["condition"].to(unet.device, unet.dtype),
            ae.encode(item["pose_reference"]).to(unet.device, unet.dtype),
            item["pose_mask"].to(unet.device, unet.dtype),
            ae.encode(item["identity"][None]).expand(f, -1, -1, -1).to(unet.device, unet.dtype),
            steps,
        )
        out = ae.decode(latents.float()).cpu()
        mask = item["pose_mask"]
        generated.append(item["target"] * (1 - mask) + out * mask)
        frozen.append(item["target"] * (1 - mask) + dataset.range_start_crop(i)[None] * mask)
        targets.append(item["target"])
        masks.append(item["mouth_mask"])
    g, z, t, m = (torch.cat(x) for x in (generated, frozen, targets, masks))
    return {
        "val_mouth_psnr": mouth_psnr(g, t, m),
        "val_mouth_psnr_frozen_lips": mouth_psnr(z, t, m),
        "val_frames": len(t),
    }


def make_dataset(data_dir, data_cfg: dict, part: str, seed: int) -> L2VFrameDataset:
    """The training ("train") or held-out ("val") frames: a `frames` range in the config splits every clip in time
    (train on its start, validate on its end); otherwise the dataset's own split is used."""
    split_at = data_cfg.get("split_at")
    frames = None if split_at is None else ((0.0, float(split_at)) if part == "train" else (float(split_at), 1.0))
    return L2VFrameDataset(
        data_dir,
        split=("all" if split_at is not None else part),
        clips=data_cfg.get("clips"),
        frames=frames,
        window=data_cfg.get("window", 1),
        identity_gap=data_cfg.get("identity_gap", 25),
        seed=seed,
        size=data_cfg.get("size"),
        topology=data_cfg.get("topology", "ibug68"),
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train the lmdiff L2V model (run with accelerate launch).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True, help="dataset folder made by `lmdiff prepare` (with crops)")
    parser.add_argument("--autoencoder", help="autoencoder path (overrides the config's autoencoder)")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--max-steps", type=int, help="override train.max_steps")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run folder's newest complete checkpoint"
    )
    args = parser.parse_args(argv)
    try:
        return train(args)
    except LmdiffInputError as exc:
        print(f"train_l2v: error: {exc}", file=sys.stderr)
        return 2


def train(args) -> int:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    config = load_config(args.config)
    train_cfg, data_cfg = config["train"], config["data"]
    max_steps = args.max_steps or train_cfg["max_steps"]
    run_dir, data_dir = Path(args.out), Path(args.data)
    resume_from = resume_checkpoint(run_dir, args.resume)
    ae_path = args.autoencoder or config.get("autoencoder")
    if not ae_path:
        raise LmdiffInputError("no autoencoder: pass --autoencoder PATH (a TAESD-family folder or a VAE file)")

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
    autoencoder = load_autoencoder(ae_path, device=accelerator.device)
    dataset = make_dataset(data_dir, data_cfg, "train", seed)
    val_dataset = make_dataset(data_dir, data_cfg, "val", seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)
    if len(loader) == 0:
        raise LmdiffInputError(f"{data_dir}: fewer training windows ({len(dataset)}) than one batch ({batch_size})")
    unet = build_unet(config, autoencoder)
    if train_cfg.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg["lr"], weight_decay=train_cfg.get("weight_decay", 0.0))
    lr_scheduler = get_scheduler(
        train_cfg.get("lr_schedule", "cosine"),
        optimizer,
        num_warmup_steps=train_cfg.get("warmup_steps", 0),
        num_training_steps=max_steps,
    )
    encoder = LatentEncoder(autoencoder, train_cfg.get("cache_latents", False))
    ema = EMAModel(params, decay=train_cfg.get("ema_decay", 0.999))
    model, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    state = TrainingState(accelerator, model, optimizer, lr_scheduler, ema)
    noise_scheduler = make_scheduler(accelerator.unwrap_model(model), "ddpm")
    start_run(state, run_dir, resume_from)
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "autoencoder": str(ae_path)}))

    settings = dict(
        crop_size=dataset.size,
        topology=data_cfg.get("topology", "ibug68"),
        window=data_cfg.get("window", 1) if data_cfg.get("window", 1) > 1 else 8,
        overlap=data_cfg.get("overlap", 2),
    )
    completed = run_training_steps(
        state,
        loader,
        dataset,
        params,
        max_steps,
        train_cfg,
        run_dir,
        loss_fn=lambda batch: compute_loss(model, batch, encoder, noise_scheduler, state.step, config, accelerator),
        validate_fn=lambda: evaluate_heldout(ema_pipeline(accelerator, model, ema, autoencoder, settings), val_dataset),
        default_every=200,
    )
    if not completed:
        return 130
    if accelerator.is_main_process:
        ema_pipeline(accelerator, model, ema, autoencoder, settings).save_pretrained(run_dir / "final")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def ema_pipeline(accelerator, model, ema, autoencoder, settings: dict) -> LandmarkToVideoPipeline:
    """A pipeline around a copy of the U-Net carrying the EMA weights (LoRA adapters merged in)."""
    unwrapped = accelerator.unwrap_model(model)
    copy = L2VUNet.from_config(unwrapped.config)
    trainable = [name for name, p in unwrapped.named_parameters() if p.requires_grad]
    source = unwrapped
    if getattr(unwrapped, "_hf_peft_config_loaded", False):
        import copy as copying

        source = copying.deepcopy(unwrapped)
        ema.copy_to([p for p in source.parameters() if p.requires_grad])
        source.fuse_lora()
        source.unload_lora()
        copy.load_state_dict(source.state_dict())
    else:
        copy.load_state_dict(unwrapped.state_dict())
        ema.copy_to([p for name, p in copy.named_parameters() if name in set(trainable)])
    copy.eval()
    return LandmarkToVideoPipeline(copy.float(), make_scheduler(copy, "ddim"), autoencoder, **settings)


if __name__ == "__main__":
    sys.exit(main())
