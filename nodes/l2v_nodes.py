"""Landmarks-to-video nodes: load an L2V checkpoint, crop faces, sample new face crops, paste them back."""

from __future__ import annotations

import numpy as np

from ..lmdiff_core.errors import LmdiffInputError
from .edit_nodes import SEED
from .landmark_nodes import LANDMARKS
from .models import L2V, autoencoder_names, autoencoder_source, checkpoint_names, checkpoint_path
from .runtime import (
    DEVICES,
    PRECISIONS,
    LoadedPipeline,
    Progress,
    check_interrupted,
    offload_device,
    torch_device,
    torch_dtype,
)

L2V_MODEL = "LMDIFF_L2V_MODEL"
CROP_INFO = "LMDIFF_CROP_INFO"
L2V_SAMPLERS = ("ddim", "dpm++", "unipc")  # lmdiff_core.pipelines.schedulers.SAMPLERS less the training "ddpm"
L2V_MODES = ("dub", "one_shot")  # lmdiff_core.pipelines.l2v.MODES
PASTE_MASKS = ("face", "lower_face", "mouth", "crop")  # masks.MASK_NAMES plus the whole crop
CHUNK = 16  # frames cropped or pasted at once


class LoadL2VModel:
    """A landmarks-to-video checkpoint from models/lmdiff/l2v with the autoencoder it was trained on."""

    CATEGORY = "lmdiff/l2v"
    RETURN_TYPES = (L2V_MODEL,)
    RETURN_NAMES = ("l2v_model",)
    FUNCTION = "load"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (checkpoint_names(L2V), {"tooltip": "A checkpoint folder (with lmdiff_l2v.json)"}),
                "autoencoder": (
                    autoencoder_names(),
                    {"tooltip": "From models/vae or vae_approx (TAESD pair, AutoencoderKL); auto: pixel-space models"},
                ),
                "precision": (list(PRECISIONS),),
                "device": (list(DEVICES),),
            }
        }

    def load(self, model, autoencoder, precision, device):
        from ..lmdiff_core.autoencoders import load_autoencoder
        from ..lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline

        run_device = torch_device(device)
        dtype = torch_dtype(precision, run_device)
        waiting = offload_device(run_device)
        pipeline = LandmarkToVideoPipeline.from_pretrained(checkpoint_path(L2V, model), device=waiting, dtype=dtype)
        source = autoencoder_source(autoencoder, pipeline.unet.config.autoencoder)
        pipeline.set_autoencoder(load_autoencoder(source, device=waiting, dtype=dtype))
        return (LoadedPipeline(pipeline, run_device, (pipeline.unet, pipeline.autoencoder)),)


def _bchw(images):
    """IMAGE [B, H, W, 3] -> [B, 3, H, W] (a view)."""
    return images[..., :3].permute(0, 3, 1, 2)


def _stretch(count: int, n: int, what: str) -> np.ndarray:
    """Index array giving n items from `count`: the same ones, or one item repeated."""
    if count == n:
        return np.arange(n)
    if count == 1:
        return np.zeros(n, dtype=int)
    raise LmdiffInputError(f"{what} has {count} frames for {n}: give 1 or {n} (Fit Length matches lengths)")


class FaceCrop:
    """Aligned square face crops that follow the landmarks (stable boxes), and the crop info to paste them back."""

    CATEGORY = "lmdiff/l2v"
    RETURN_TYPES = ("IMAGE", CROP_INFO)
    RETURN_NAMES = ("crops", "crop_info")
    FUNCTION = "crop"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "landmarks": (LANDMARKS, {"tooltip": "Landmarks of these images (same count)"}),
                "size": ("INT", {"default": 256, "min": 64, "max": 2048, "step": 8}),
                "scale": (
                    "FLOAT",
                    {"default": 3.2, "min": 1.0, "max": 8.0, "step": 0.05, "tooltip": "Box side / face size"},
                ),
                "smoothing": (
                    "FLOAT",
                    {"default": 0.15, "min": 0.0, "max": 2.0, "step": 0.01, "tooltip": "Box smoothing (s)"},
                ),
            }
        }

    def crop(self, images, landmarks, size, scale, smoothing):
        import torch

        from ..lmdiff_core.crop import compute_crop_track, crop_frames

        n = len(landmarks)
        if images.shape[0] != n:
            raise LmdiffInputError(f"{images.shape[0]} images for {n} landmark frames: they must match")
        height, width = images.shape[1:3]
        if landmarks.frame_size != (width, height):
            raise LmdiffInputError(
                f"the landmarks were found in {landmarks.frame_size[0]}x{landmarks.frame_size[1]} frames, the images "
                f"are {width}x{height}"
            )
        track = compute_crop_track(landmarks, size, scale=scale, smoothing=smoothing)
        progress, crops = Progress(n), []
        for start in range(0, n, CHUNK):
            index = np.arange(start, min(start + CHUNK, n))
            crops.append(crop_frames(_bchw(images[start : index[-1] + 1]), track, index))
            progress(index[-1] + 1)
        return (torch.cat(crops).permute(0, 2, 3, 1), track)


class L2VSampler:
    """New face crops showing the landmarks: dub keeps the crop above the mouth, one_shot redraws the whole face
    of the identity. The landmarks are in the frames the crops came from; crop_info and the crops come from Face Crop."""

    CATEGORY = "lmdiff/l2v"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("crops",)
    FUNCTION = "sample"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "l2v_model": (L2V_MODEL,),
                "crops": ("IMAGE",),
                "crop_info": (CROP_INFO,),
                "landmarks": (LANDMARKS, {"tooltip": "Target landmarks, one per output frame"}),
                "identity": ("IMAGE", {"tooltip": "Face crop(s) of the person; the middle one is used"}),
                "mode": (list(L2V_MODES),),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "sampler": (list(L2V_SAMPLERS),),
                "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 10.0, "step": 0.05}),
                "seed": SEED,
            }
        }

    def sample(self, l2v_model, crops, crop_info, landmarks, identity, mode, steps, sampler, guidance, seed):
        import torch.nn.functional as F

        from ..lmdiff_core.comfy_io import frames_to_image, image_to_frames
        from ..lmdiff_core.crop import transform_landmarks

        n = len(landmarks)
        if crops.shape[0] != len(crop_info):
            raise LmdiffInputError(f"{crops.shape[0]} crops for crop info of {len(crop_info)} frames: they must match")
        index = _stretch(len(crop_info), n, "the crops")
        track = crop_info[index]
        source = transform_landmarks(track.landmarks, track)
        target = transform_landmarks(landmarks, track)
        pipeline = l2v_model.pipeline
        reference = _bchw(identity[identity.shape[0] // 2 : identity.shape[0] // 2 + 1]).float()
        reference = F.interpolate(reference, size=(pipeline.crop_size,) * 2, mode="bilinear", antialias=True)[0]
        pipeline.set_sampler(sampler)
        progress, frames = Progress(n), image_to_frames(crops)
        with l2v_model.running():
            out = list(
                pipeline.generate(
                    (frames[i] for i in index),
                    source,
                    target,
                    reference.clamp(0, 1),
                    mode,
                    steps,
                    guidance,
                    seed,
                    progress=progress,
                    on_step=check_interrupted,
                )
            )
        return (frames_to_image(np.stack(out)),)


class PasteBack:
    """Blend face crops back into their frames under a feathered mask; also gives that mask."""

    CATEGORY = "lmdiff/l2v"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("images", "mask")
    FUNCTION = "paste"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The frames the crops came from (one image is reused)"}),
                "crops": ("IMAGE",),
                "crop_info": (CROP_INFO,),
                "mask": (list(PASTE_MASKS), {"tooltip": "Region of the crop pasted (from the crop info's landmarks)"}),
                "feather": (
                    "FLOAT",
                    {"default": 4.0, "min": 0.0, "max": 64.0, "step": 0.5, "tooltip": "Mask blur in crop pixels"},
                ),
            }
        }

    def paste(self, images, crops, crop_info, mask, feather):
        import torch

        from ..lmdiff_core.crop import paste_back

        n = crops.shape[0]
        frame_of = torch.from_numpy(_stretch(images.shape[0], n, "images"))
        track = crop_info[_stretch(len(crop_info), n, "the crop info")]
        size = crops.shape[1]
        progress, pasted, masks = Progress(n), [], []
        for start in range(0, n, CHUNK):
            index = np.arange(start, min(start + CHUNK, n))
            region = torch.ones(len(index), 1, size, size) if mask == "crop" else mask
            frames = _bchw(images[frame_of[index]])
            out, out_mask = paste_back(frames, _bchw(crops[index]), track, index, region, feather)
            pasted.append(out.permute(0, 2, 3, 1))
            masks.append(out_mask[:, 0])
            progress(index[-1] + 1)
        return (torch.cat(pasted), torch.cat(masks))
