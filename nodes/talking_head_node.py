"""The all-in-one node: speech + a portrait (one-shot) or video frames (dubbing) -> talking-head frames."""

from __future__ import annotations

from .a2l_nodes import A2L_MODEL
from .edit_nodes import SEED
from .l2v_nodes import L2V_MODEL, L2V_SAMPLERS
from .landmark_nodes import LANDMARKER
from .runtime import Progress, check_interrupted


class TalkingHead:
    """Speech + a portrait (one image: one-shot, with generated head motion and blinks) or video frames (dubbing:
    the lower face is regenerated, the video loops to the audio's length). Gives ceil(duration x fps) frames, the
    audio and the frame rate, ready for Create Video or Video Combine."""

    CATEGORY = "lmdiff"
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    RETURN_NAMES = ("images", "audio", "fps")
    FUNCTION = "generate"
    DESCRIPTION = __doc__

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "a2l_model": (A2L_MODEL,),
                "l2v_model": (L2V_MODEL,),
                "landmarker": (LANDMARKER,),
                "audio": ("AUDIO",),
                "images": ("IMAGE", {"tooltip": "A portrait (one image) or the frames of the video to dub"}),
                "fps": ("FLOAT", {"default": 25.0, "min": 1.0, "max": 120.0, "step": 0.01, "tooltip": "Video frames"}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200}),
                "sampler": (list(L2V_SAMPLERS),),
                "guidance": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 10.0, "step": 0.05}),
                "seed": SEED,
            },
            "optional": {
                "mode": (
                    ["quality", "fast"],
                    {
                        "tooltip": "fast: the lower face is rebuilt from the person's own frames (retrieved by lip "
                        "shape and warped; no model; a portrait stays still); quality: with a refiner L2V model "
                        "(bundled-refiner) the same, refined in a few steps (its own; `steps` is for other L2V "
                        "models), with another L2V model that model generates the face"
                    },
                ),
                "portrait_mode": (
                    ["one_shot", "still"],
                    {
                        "tooltip": "For one image: one_shot (head motion, blinks, whole face generated) or still (only "
                        "the lips and jaw move, the photo's other pixels are kept)"
                    },
                ),
            },
        }

    def generate(
        self,
        a2l_model,
        l2v_model,
        landmarker,
        audio,
        images,
        fps,
        steps,
        sampler,
        guidance,
        seed,
        portrait_mode="one_shot",
        mode="quality",
    ):
        import numpy as np

        from ..lmdiff_core.comfy_io import audio_duration, audio_from_comfy, frames_to_image, image_to_frames
        from ..lmdiff_core.media import frame_count
        from ..lmdiff_core.pipelines.talking_head import TalkingHeadPipeline

        speech, frames = audio_from_comfy(audio), image_to_frames(images)
        dubbing = len(frames) > 1
        l2v_model.pipeline.set_sampler(sampler)
        progress = Progress(1)

        def report(stage, done, total):  # one bar: the A2L frames, then the L2V (or fast mode's) frames
            progress(done + (total if stage in ("l2v", "fast") else 0), 2 * total)

        with a2l_model.running() as a2l, l2v_model.running() as l2v, landmarker.open(video=dubbing) as detector:
            source = {"video": frames, "video_fps": float(fps)} if dubbing else {"image": frames[0]}
            out, n = TalkingHeadPipeline(a2l, l2v).generate(
                speech,
                detector,
                **source,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seed,
                image_mode=portrait_mode,
                n_frames=frame_count(audio_duration(audio), a2l.fps),
                progress=report,
                on_step=check_interrupted,
                mode=mode,
            )
            result = []
            for frame in out:
                check_interrupted()
                result.append(frame)
        return (frames_to_image(np.stack(result)), audio, float(a2l.fps))
