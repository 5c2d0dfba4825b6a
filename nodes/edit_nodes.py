"""Landmark editing nodes: smooth, transfer pose, mouth gain, blinks, head motion, frontalize, fit length."""

from __future__ import annotations

from ..lmdiff_core.errors import LmdiffInputError
from ..lmdiff_core.landmarks import FIT_MODES
from .landmark_nodes import LANDMARKS

CATEGORY = "lmdiff/editing"
SEED = ("INT", {"default": 0, "min": 0, "max": 2**32 - 1, "control_after_generate": True})
TRANSFER_PARTS = ("face", "lips_and_jaw")  # lmdiff_core.editing.TRANSFER_PARTS (not imported: it loads scipy)


class _LandmarkEdit:
    """Shared shape of the editing nodes: landmarks in, landmarks out."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LANDMARKS,)
    RETURN_NAMES = ("landmarks",)
    FUNCTION = "edit"


class SmoothLandmarks(_LandmarkEdit):
    """Remove detector jitter without delaying the lips or blinks (zero-phase One Euro filter)."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "min_cutoff": (
                    "FLOAT",
                    {"default": 0.7, "min": 0.05, "max": 30.0, "step": 0.05, "tooltip": "Hz; lower is smoother"},
                ),
                "beta": (
                    "FLOAT",
                    {"default": 0.02, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Speed response"},
                ),
                "lips_min_cutoff": (
                    "FLOAT",
                    {
                        "default": 8.0,
                        "min": 0.05,
                        "max": 30.0,
                        "step": 0.05,
                        "tooltip": "Hz, for lips, eyelids, irises",
                    },
                ),
            }
        }

    def edit(self, landmarks, min_cutoff, beta, lips_min_cutoff):
        from ..lmdiff_core.smoothing import smooth_landmarks

        return (smooth_landmarks(landmarks, min_cutoff=min_cutoff, beta=beta, fast_min_cutoff=lips_min_cutoff),)


class TransferPose(_LandmarkEdit):
    """Pose the face like the driving landmarks, frame by frame (lips_and_jaw: keep the driving face, dubbing)."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "driving_landmarks": (LANDMARKS,),
                "parts": (list(TRANSFER_PARTS), {"tooltip": "face: reenactment; lips_and_jaw: only lips and jaw"}),
                "fit": (list(FIT_MODES), {"default": "loop", "tooltip": "How driving landmarks fill a longer take"}),
            }
        }

    def edit(self, landmarks, driving_landmarks, parts, fit):
        from ..lmdiff_core.editing import transfer_pose

        return (transfer_pose(landmarks, driving_landmarks, parts, fit),)


class MouthGain(_LandmarkEdit):
    """Amplify (> 1) or damp (< 1) lip and jaw motion; 0 holds the mouth at rest."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "gain": ("FLOAT", {"default": 1.3, "min": 0.0, "max": 4.0, "step": 0.05}),
            }
        }

    def edit(self, landmarks, gain):
        from ..lmdiff_core.editing import mouth_gain

        return (mouth_gain(landmarks, gain),)


class AddBlinks(_LandmarkEdit):
    """Close and reopen the eyes at random (Poisson) times."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "blinks_per_minute": ("FLOAT", {"default": 15.0, "min": 0.5, "max": 120.0, "step": 0.5}),
                "blink_seconds": ("FLOAT", {"default": 0.25, "min": 0.08, "max": 2.0, "step": 0.01}),
                "seed": SEED,
            }
        }

    def edit(self, landmarks, blinks_per_minute, blink_seconds, seed):
        from ..lmdiff_core.motion import MotionStats, add_blinks, blink_curve

        stats = MotionStats(blinks_per_minute=blinks_per_minute, blink_seconds=blink_seconds)
        return (add_blinks(landmarks, blink_curve(len(landmarks), landmarks.fps, stats, seed)),)


class AddHeadMotion(_LandmarkEdit):
    """Smooth random head motion (angle spread in degrees, time scale in seconds) on top of each frame's pose."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        angle = {"min": 0.0, "max": 30.0, "step": 0.1}
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "yaw": ("FLOAT", {"default": 4.0, **angle}),
                "pitch": ("FLOAT", {"default": 3.0, **angle}),
                "roll": ("FLOAT", {"default": 2.0, **angle}),
                "time_scale": ("FLOAT", {"default": 1.2, "min": 0.1, "max": 10.0, "step": 0.1}),
                "seed": SEED,
            }
        }

    def edit(self, landmarks, yaw, pitch, roll, time_scale, seed):
        from ..lmdiff_core.editing import add_head_motion
        from ..lmdiff_core.motion import MotionStats

        stats = MotionStats(yaw_std=yaw, pitch_std=pitch, roll_std=roll, time_scale=time_scale)
        return (add_head_motion(landmarks, stats, seed),)


class Frontalize(_LandmarkEdit):
    """Turn the head to face the camera (strength 0..1); position, size and expression stay."""

    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05}),
            }
        }

    def edit(self, landmarks, strength):
        from ..lmdiff_core.editing import frontalize

        return (frontalize(landmarks, strength),)


class FitLength:
    """Match the length of an audio (ceil(duration x fps) frames) or a frame count: longer inputs are trimmed,
    shorter ones looped, ping-ponged or held; images given along are fitted the same way."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (LANDMARKS, "IMAGE", "INT")
    RETURN_NAMES = ("landmarks", "images", "frame_count")
    FUNCTION = "fit"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "landmarks": (LANDMARKS,),
                "mode": (list(FIT_MODES), {"default": "loop"}),
                "frame_count": (
                    "INT",
                    {"default": 25, "min": 1, "max": 1_000_000, "tooltip": "Used when no audio is connected"},
                ),
            },
            "optional": {
                "audio": ("AUDIO", {"tooltip": "Fit to this audio at the landmarks' frame rate"}),
                "images": ("IMAGE", {"tooltip": "Frames that go with the landmarks (same count)"}),
            },
        }

    def fit(self, landmarks, mode, frame_count, audio=None, images=None):
        import torch

        from ..lmdiff_core.comfy_io import audio_duration
        from ..lmdiff_core.landmarks import fit_indices
        from ..lmdiff_core.media import frame_count as frames_for

        n = frame_count if audio is None else frames_for(audio_duration(audio), landmarks.fps)
        index = fit_indices(len(landmarks), n, mode)
        if images is not None:
            if images.shape[0] != len(landmarks):
                raise LmdiffInputError(
                    f"{images.shape[0]} images for {len(landmarks)} landmark frames: they must match"
                )
            images = images[torch.from_numpy(index)]
        return (landmarks[index], images, n)
