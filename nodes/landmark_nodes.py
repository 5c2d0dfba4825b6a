"""Landmark nodes: load a detector, extract landmarks from frames, render them, export OpenPose keypoints."""

from __future__ import annotations

from ..lmdiff_core.errors import LmdiffInputError
from .models import AUTO, LANDMARKER_BACKENDS, landmarker_choice, landmarker_names
from .runtime import Progress

LANDMARKS = "LMDIFF_LANDMARKS"
LANDMARKER = "LMDIFF_LANDMARKER"
RENDER_STYLES = ("parts", "mesh")  # lmdiff_core.render.STYLES (not imported: render loads torch)
RENDER_BATCH = 64


class LoadLandmarker:
    """A face landmark detector: MediaPipe (478 points, blendshapes), dlib or insightface (68 points)."""

    CATEGORY = "lmdiff/landmarks"
    RETURN_TYPES = (LANDMARKER,)
    RETURN_NAMES = ("landmarker",)
    FUNCTION = "load"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backend": (
                    list(LANDMARKER_BACKENDS),
                    {
                        "default": AUTO,
                        "tooltip": "auto: MediaPipe when its face_landmarker.task is in models/lmdiff/landmarker (or "
                        "$LMDIFF_MEDIAPIPE_MODEL), else dlib (its model comes with requirements.txt)",
                    },
                ),
                "model": (
                    landmarker_names(),
                    {
                        "tooltip": "A file in models/lmdiff/landmarker. default: the MediaPipe .task there (or "
                        "$LMDIFF_MEDIAPIPE_MODEL), dlib's predictor from its PyPI package, insightface's "
                        "models/buffalo_l pack."
                    },
                ),
            }
        }

    def load(self, backend, model):
        choice = landmarker_choice(backend, model)
        choice.open(video=False).close()  # a wrong or unreadable model fails here, with its own message
        return (choice,)


class ExtractLandmarks:
    """Landmarks of one face through the frames (one image: that image's face)."""

    CATEGORY = "lmdiff/landmarks"
    RETURN_TYPES = (LANDMARKS,)
    RETURN_NAMES = ("landmarks",)
    FUNCTION = "extract"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarker": (LANDMARKER,),
                "images": ("IMAGE",),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01}),
                "face": (["largest", "index"], {"tooltip": "The largest face, or face_index counted from the left"}),
                "face_index": ("INT", {"default": 0, "min": 0, "max": 32}),
                "max_gap": (
                    "INT",
                    {"default": 12, "min": 0, "max": 250, "tooltip": "Longest run of frames without a face to fill"},
                ),
            }
        }

    def extract(self, landmarker, images, fps, face, face_index, max_gap):
        from ..lmdiff_core.comfy_io import image_to_frames
        from ..lmdiff_core.detectors import detect_image, extract_landmarks

        frames = image_to_frames(images)
        selector = "largest" if face == "largest" else int(face_index)
        if len(frames) == 1:
            with landmarker.open(video=False) as detector:
                return (detect_image(frames[0], detector, selector, source="the image").replace(fps=float(fps)),)
        progress = Progress(len(frames))
        with landmarker.open(video=True) as detector:
            seq = extract_landmarks(frames, detector, fps, selector, max_gap, "the images input", progress=progress)
        return (seq,)


class RenderLandmarks:
    """Draw landmarks as ControlNet-style images (black background), or over the given images."""

    CATEGORY = "lmdiff/landmarks"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("images",)
    FUNCTION = "render"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "width": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": "0: the landmarks' frame width"}),
                "height": ("INT", {"default": 0, "min": 0, "max": 8192, "tooltip": "0: the landmarks' frame height"}),
                "thickness": ("FLOAT", {"default": 2.0, "min": 0.5, "max": 32.0, "step": 0.5}),
                "style": (list(RENDER_STYLES), {"tooltip": "mesh: the full MediaPipe tessellation (478 points only)"}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Draw over these frames (their size wins over width and height)"}),
                "opacity": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            },
        }

    def render(self, landmarks, width, height, thickness, style, images=None, opacity=1.0):
        import torch

        from ..lmdiff_core.render import draw_landmarks_on_frames, render_landmarks

        n = len(landmarks)
        if images is not None and images.shape[0] not in (1, n):
            raise LmdiffInputError(f"{images.shape[0]} images for {n} landmark frames: give 1 or {n} images")
        size = (
            None
            if width == 0 and height == 0
            else (width or landmarks.frame_size[0], height or landmarks.frame_size[1])
        )
        progress = Progress(n)
        chunks = []
        for start in range(0, n, RENDER_BATCH):
            part = landmarks[start : start + RENDER_BATCH]
            if images is None:
                chunks.append(render_landmarks(part, size, thickness, style))
            else:
                frames = images if images.shape[0] > 1 else images.expand(n, -1, -1, -1)
                chunks.append(
                    draw_landmarks_on_frames(frames[start : start + len(part)], part, thickness, style, opacity)
                )
            progress(start + len(part))
        return (torch.cat(chunks),)


class LandmarksToPoseKeypoint:
    """OpenPose face keypoints (POSE_KEYPOINT, as comfyui_controlnet_aux makes them): 68 points plus two pupils."""

    CATEGORY = "lmdiff/landmarks"
    RETURN_TYPES = ("POSE_KEYPOINT",)
    RETURN_NAMES = ("pose_keypoint",)
    FUNCTION = "convert"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "normalized": (
                    "BOOLEAN",
                    {"default": True, "tooltip": "Coordinates in 0..1 of the canvas (controlnet_aux's convention)"},
                ),
            }
        }

    def convert(self, landmarks, normalized):
        from ..lmdiff_core.render import to_openpose_face

        return (to_openpose_face(landmarks, normalized=normalized),)
