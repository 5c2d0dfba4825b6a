"""ComfyUI nodes: thin adapters over `lmdiff_core` (torch, MediaPipe and diffusers load when a node first runs)."""

from .a2l_nodes import AudioToLandmarks, LoadA2LModel
from .bank_nodes import AppearanceBankReference
from .edit_nodes import AddBlinks, AddHeadMotion, FitLength, Frontalize, MouthGain, SmoothLandmarks, TransferPose
from .l2v_nodes import FaceCrop, L2VSampler, LoadL2VModel, PasteBack
from .landmark_nodes import ExtractLandmarks, LandmarksToPoseKeypoint, LoadLandmarker, RenderLandmarks
from .media_nodes import LoadAudio, LoadVideo
from .models import register_model_folders
from .talking_head_node import TalkingHead

_NODES = {
    "LmdiffLoadVideo": (LoadVideo, "Load Video"),
    "LmdiffLoadAudio": (LoadAudio, "Load Audio"),
    "LmdiffLoadLandmarker": (LoadLandmarker, "Load Landmarker"),
    "LmdiffExtractLandmarks": (ExtractLandmarks, "Extract Landmarks"),
    "LmdiffLoadA2LModel": (LoadA2LModel, "Load A2L Model"),
    "LmdiffAudioToLandmarks": (AudioToLandmarks, "Audio to Landmarks"),
    "LmdiffSmoothLandmarks": (SmoothLandmarks, "Smooth Landmarks"),
    "LmdiffTransferPose": (TransferPose, "Transfer Pose"),
    "LmdiffMouthGain": (MouthGain, "Mouth Gain"),
    "LmdiffAddBlinks": (AddBlinks, "Add Blinks"),
    "LmdiffAddHeadMotion": (AddHeadMotion, "Add Head Motion"),
    "LmdiffFrontalize": (Frontalize, "Frontalize Landmarks"),
    "LmdiffFitLength": (FitLength, "Fit Length"),
    "LmdiffRenderLandmarks": (RenderLandmarks, "Render Landmarks"),
    "LmdiffLandmarksToPoseKeypoint": (LandmarksToPoseKeypoint, "Landmarks to POSE_KEYPOINT"),
    "LmdiffFaceCrop": (FaceCrop, "Face Crop"),
    "LmdiffPasteBack": (PasteBack, "Paste Back"),
    "LmdiffLoadL2VModel": (LoadL2VModel, "Load L2V Model"),
    "LmdiffL2VSampler": (L2VSampler, "L2V Sampler"),
    "LmdiffAppearanceBankReference": (AppearanceBankReference, "Appearance Bank Reference"),
    "LmdiffTalkingHead": (TalkingHead, "Talking Head"),
}

NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: f"{name} (lmdiff)" for node_id, (_, name) in _NODES.items()}

register_model_folders()
