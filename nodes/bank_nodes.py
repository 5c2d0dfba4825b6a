"""Appearance-bank node: the person's own face crops retrieved by lip shape and pose and warped onto target
landmarks, as IMAGE (what the fast mode pastes; see them, edit them, or feed them to other nodes)."""

from __future__ import annotations

from .landmark_nodes import LANDMARKS
from .runtime import Progress


class AppearanceBankReference:
    """Warped references: for each frame of the target landmarks, the bank frames whose lips and head pose match
    best, warped onto the target's face geometry and blended, as face crops (the target's own stable crop boxes)."""

    CATEGORY = "lmdiff/l2v"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("references",)
    FUNCTION = "warp"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "bank_images": ("IMAGE", {"tooltip": "Frames of the person (the video to dub, or a portrait)"}),
                "bank_landmarks": (LANDMARKS, {"tooltip": "Their landmarks (Extract Landmarks on bank_images)"}),
                "target_landmarks": (LANDMARKS, {"tooltip": "Image-space landmarks to warp onto, one per output"}),
                "crop_size": ("INT", {"default": 256, "min": 64, "max": 1024, "step": 8}),
                "blend": ("INT", {"default": 3, "min": 1, "max": 8, "tooltip": "Bank frames blended per output"}),
            }
        }

    def warp(self, bank_images, bank_landmarks, target_landmarks, crop_size, blend):
        import torch

        from ..lmdiff_core.appearance_bank import AppearanceBank
        from ..lmdiff_core.comfy_io import image_to_frames
        from ..lmdiff_core.errors import LmdiffInputError
        from ..lmdiff_core.pipelines.fast import warped_references

        frames = image_to_frames(bank_images)
        if len(frames) != len(bank_landmarks):
            raise LmdiffInputError(f"bank_images has {len(frames)} frames but bank_landmarks {len(bank_landmarks)}")
        if target_landmarks.space != "image":
            raise LmdiffInputError("target_landmarks must be image-space landmarks (not canonical)")
        bank = AppearanceBank.build(frames, bank_landmarks, int(crop_size), source="bank_images")
        progress = Progress(len(target_landmarks))
        chunks = warped_references(bank, target_landmarks, int(blend), progress=progress)
        return (torch.cat([c.permute(0, 2, 3, 1) for c in chunks]).float(),)
