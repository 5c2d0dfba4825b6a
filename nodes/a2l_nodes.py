"""Audio-to-landmarks nodes: load an A2L checkpoint, turn speech into talking landmarks."""

from __future__ import annotations

from ..lmdiff_core.errors import LmdiffInputError
from .edit_nodes import SEED
from .landmark_nodes import LANDMARKER, LANDMARKS
from .models import A2L, checkpoint_names, checkpoint_path
from .runtime import DEVICES, PRECISIONS, LoadedPipeline, Progress, check_interrupted, torch_device, torch_dtype

A2L_MODEL = "LMDIFF_A2L_MODEL"


class LoadA2LModel:
    """An audio-to-landmarks checkpoint from models/lmdiff/a2l (or a bundled one)."""

    CATEGORY = "lmdiff/a2l"
    RETURN_TYPES = (A2L_MODEL,)
    RETURN_NAMES = ("a2l_model",)
    FUNCTION = "load"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (checkpoint_names(A2L), {"tooltip": "A checkpoint folder (with lmdiff_a2l.json)"}),
                "precision": (list(PRECISIONS), {"default": "fp32"}),
                "device": (list(DEVICES),),
            }
        }

    def load(self, model, precision, device):
        from ..lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline

        run_device = torch_device(device)
        pipeline = AudioToLandmarksPipeline.from_pretrained(
            checkpoint_path(A2L, model), device="cpu", dtype=torch_dtype(precision, run_device)
        )
        return (LoadedPipeline(pipeline, run_device, (pipeline.model,)),)


class AudioToLandmarks:
    """Talking landmarks for speech: ceil(duration x fps) frames of the reference face, in the reference image's
    frame (or posed like pose_landmarks). Connect a reference image with a landmarker, or reference landmarks."""

    CATEGORY = "lmdiff/a2l"
    RETURN_TYPES = (LANDMARKS, "FLOAT")
    RETURN_NAMES = ("landmarks", "fps")
    FUNCTION = "generate"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a2l_model": (A2L_MODEL,),
                "audio": ("AUDIO",),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Sampling steps (diffusion A2L)"}),
                "guidance": ("FLOAT", {"default": 3.0, "min": 1.0, "max": 10.0, "step": 0.05}),
                "seed": SEED,
            },
            "optional": {
                "reference_image": ("IMAGE", {"tooltip": "The speaker's portrait (needs a landmarker)"}),
                "landmarker": (LANDMARKER,),
                "reference_landmarks": (
                    LANDMARKS,
                    {"tooltip": "The speaker's landmarks; the most closed mouth is used"},
                ),
                "pose_landmarks": (LANDMARKS, {"tooltip": "Head pose to follow, frame by frame (looped)"}),
            },
        }

    def generate(
        self,
        a2l_model,
        audio,
        fps,
        steps,
        guidance,
        seed,
        reference_image=None,
        landmarker=None,
        reference_landmarks=None,
        pose_landmarks=None,
    ):
        from ..lmdiff_core.canonical import canonicalize, uncanonicalize
        from ..lmdiff_core.comfy_io import audio_duration, audio_from_comfy
        from ..lmdiff_core.editing import pose_from
        from ..lmdiff_core.media import frame_count

        reference, rest = _reference(reference_image, landmarker, reference_landmarks)
        duration = audio_duration(audio)
        n = frame_count(duration, fps)
        with a2l_model.running() as pipeline:
            talking = pipeline(
                audio_from_comfy(audio),
                canonicalize(reference) if reference.space == "image" else reference,
                n_frames=frame_count(duration, pipeline.fps),
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
                progress=Progress(n),
                rest=rest,
                on_step=check_interrupted,
            )
        if talking.fps != fps:
            talking = talking.resample(fps, n_frames=n)
        if pose_landmarks is not None:
            return (uncanonicalize(pose_from(talking, pose_landmarks)), float(fps))
        return (uncanonicalize(talking), float(fps))


def _reference(image, landmarker, landmarks):
    """(reference, rest): the speaker's landmarks from a portrait (rest None), or from landmarks their
    `speaker_references` (frames across their mouth openings, and the most closed mouth)."""
    from ..lmdiff_core.comfy_io import image_to_frames
    from ..lmdiff_core.detectors import detect_image
    from ..lmdiff_core.pipelines.a2l import speaker_references

    if (image is None) == (landmarks is None):
        raise LmdiffInputError("connect either a reference image (with a landmarker) or reference landmarks")
    if landmarks is not None:
        return speaker_references(landmarks)
    if landmarker is None:
        raise LmdiffInputError("the reference image needs a landmarker: connect Load Landmarker")
    with landmarker.open(video=False) as detector:
        return detect_image(image_to_frames(image)[0], detector, source="the reference image"), None
