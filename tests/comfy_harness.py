"""A ComfyUI-like harness for the node pack, without ComfyUI.

- `load_pack` imports the pack the way ComfyUI's `load_custom_node` does: `spec_from_file_location` under a module
  name derived from the pack's path, so only relative imports work inside it.
- `StandInFolderPaths` stands in for ComfyUI's `folder_paths` module (model folders, input and output folders),
  with the behaviour observed in a real server: a folder set lists files by extension, recursively, as relative
  paths.
- `CORE_STAND_INS` are minimal equivalents of the core and third-party nodes the workflows use (LoadImage,
  LoadAudio, LoadVideo, GetVideoComponents, CreateVideo, SaveVideo, VideoHelperSuite's Load Video and Video
  Combine, comfyui_controlnet_aux's Save Pose Keypoints): same input names, types and outputs, plain
  implementations (PIL, soundfile, PyAV through lmdiff_core.media).
- `run_api_workflow` executes an API-format graph in topological order, after validating every input against the
  node's INPUT_TYPES (required inputs, combo choices, number ranges, link types) as ComfyUI's validation does.
- `ui_to_api` turns a UI-format workflow back into API format (widget values matched by order), to check that the
  UI files and their API twins describe the same graph.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .test_l2v_model import TINY  # the U-Net config of the model tests

PACK_ROOT = Path(__file__).resolve().parents[1]
PYTORCH_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}


def pack_module_name(root: Path = PACK_ROOT) -> str:
    """ComfyUI's module name for a pack directory: its full path with '.' replaced by '_x_'."""
    return str(root).replace(".", "_x_")


def load_pack(root: Path = PACK_ROOT):
    """Import the pack as ComfyUI does (once per process)."""
    name = pack_module_name(root)
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, root / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


# ---------------------------------------------------------------------------------------------------------------------
# folder_paths stand-in
# ---------------------------------------------------------------------------------------------------------------------
class StandInFolderPaths(types.ModuleType):
    """The parts of ComfyUI's folder_paths the pack and the stand-in nodes use."""

    def __init__(self, base: Path):
        super().__init__("folder_paths")
        self.base = Path(base)
        self.models_dir = str(self.base / "models")
        self.supported_pt_extensions = set(PYTORCH_EXTENSIONS)
        self.folder_names_and_paths = {
            "vae": ([str(self.base / "models" / "vae")], set(PYTORCH_EXTENSIONS)),
            "vae_approx": ([str(self.base / "models" / "vae_approx")], set(PYTORCH_EXTENSIONS)),
        }
        for name in ("models", "input", "output"):
            (self.base / name).mkdir(parents=True, exist_ok=True)

    def get_folder_paths(self, name):
        return list(self.folder_names_and_paths[name][0])

    def get_filename_list(self, name):
        paths, extensions = self.folder_names_and_paths[name]
        found = set()
        for folder in paths:
            for directory, _, files in os.walk(folder, followlinks=True):
                for file in files:
                    if not extensions or Path(file).suffix.lower() in extensions:
                        found.add(os.path.relpath(os.path.join(directory, file), folder))
        return sorted(found)

    def get_full_path(self, name, filename):
        for folder in self.folder_names_and_paths[name][0]:
            path = os.path.join(folder, filename)
            if os.path.isfile(path):
                return path
        return None

    def get_input_directory(self):
        return str(self.base / "input")

    def get_output_directory(self):
        return str(self.base / "output")

    def get_annotated_filepath(self, name):
        return os.path.join(self.get_input_directory(), name)

    def output_path(self, prefix: str, extension: str) -> Path:
        """Next free output file for a filename prefix (ComfyUI numbers them _00001_, _00002_, ...)."""
        counter = 1
        while (path := Path(self.get_output_directory()) / f"{prefix}_{counter:05}_.{extension}").exists():
            counter += 1
        return path


# ---------------------------------------------------------------------------------------------------------------------
# stand-ins for core and third-party nodes
# ---------------------------------------------------------------------------------------------------------------------
def _folder_paths():
    return sys.modules["folder_paths"]


def _input_files(*suffixes):
    folder = Path(_folder_paths().get_input_directory())
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in suffixes)


def _frames_uint8(images):
    return (images[..., :3].clamp(0, 1) * 255).round().to(dtype=__import__("torch").uint8).cpu().numpy()


def _mono(audio):
    return audio["waveform"][0].mean(0).numpy().astype(np.float32), int(audio["sample_rate"])


def _write_mp4(path: Path, images, fps, audio=None):
    from lmdiff_core.media import write_video

    samples, rate = _mono(audio) if audio is not None else (None, 16000)
    write_video(path, _frames_uint8(images), float(fps), audio=samples, sample_rate=rate)
    return path


class LoadImage:
    UI_WIDGETS = ("image", "$upload")
    RETURN_TYPES = ("IMAGE", "MASK")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (_input_files(".png", ".jpg", ".jpeg", ".webp"),)}}

    def load(self, image):
        import torch
        from PIL import Image

        with Image.open(_folder_paths().get_annotated_filepath(image)) as picture:
            rgba = np.asarray(picture.convert("RGBA"), dtype=np.float32) / 255.0
        return torch.from_numpy(rgba[None, ..., :3].copy()), torch.from_numpy(1.0 - rgba[None, ..., 3])


class LoadAudio:
    UI_WIDGETS = ("audio",)
    RETURN_TYPES = ("AUDIO",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": (_input_files(".wav", ".flac", ".mp3"),)}}

    def load(self, audio):
        import soundfile
        import torch

        samples, rate = soundfile.read(_folder_paths().get_annotated_filepath(audio), dtype="float32", always_2d=True)
        return ({"waveform": torch.from_numpy(samples.T.copy())[None], "sample_rate": rate},)


class LoadVideo:
    """Core LoadVideo; its VIDEO stands in as a dict holding the file's path."""

    UI_WIDGETS = ("file", "$upload")
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"file": (_input_files(".mp4", ".mov", ".webm", ".mkv"),)}}

    def load(self, file):
        return ({"path": Path(_folder_paths().get_annotated_filepath(file))},)


def _video_components(path: Path, fps=None):
    import torch

    from lmdiff_core.media import read_video

    video = read_video(path, fps=fps)
    images = torch.from_numpy(video.frames).float() / 255.0
    audio = None
    if video.audio is not None:
        audio = {"waveform": torch.from_numpy(video.audio)[None, None], "sample_rate": video.sample_rate}
    return images, audio, float(video.fps)


class GetVideoComponents:
    UI_WIDGETS = ()
    RETURN_TYPES = ("IMAGE", "AUDIO", "FLOAT")
    FUNCTION = "split"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"video": ("VIDEO",)}}

    def split(self, video):
        return _video_components(video["path"])


class CreateVideo:
    """Core CreateVideo; its VIDEO stands in as a dict of the components."""

    UI_WIDGETS = ("fps",)
    RETURN_TYPES = ("VIDEO",)
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"images": ("IMAGE",), "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0})},
            "optional": {"audio": ("AUDIO",)},
        }

    def create(self, images, fps, audio=None):
        return ({"images": images, "fps": fps, "audio": audio},)


class SaveVideo:
    UI_WIDGETS = ("filename_prefix", "format", "codec")
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "video": ("VIDEO",),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                "format": (["auto", "mp4"],),
                "codec": (["auto", "h264"],),
            }
        }

    def save(self, video, filename_prefix, format, codec):
        path = _write_mp4(
            _folder_paths().output_path(filename_prefix, "mp4"), video["images"], video["fps"], video["audio"]
        )
        return {"ui": {"images": [{"filename": path.name, "subfolder": "", "type": "output"}], "animated": (True,)}}


class VHS_LoadVideo:
    UI_WIDGETS = None  # VideoHelperSuite stores its widget values as a dict
    RETURN_TYPES = ("IMAGE", "INT", "AUDIO", "VHS_VIDEOINFO")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        number = ("INT", {"default": 0, "min": 0})
        return {
            "required": {
                "video": (_input_files(".mp4", ".mov", ".webm", ".mkv"),),
                "force_rate": ("FLOAT", {"default": 0, "min": 0, "max": 60}),
                "custom_width": number,
                "custom_height": number,
                "frame_load_cap": number,
                "skip_first_frames": number,
                "select_every_nth": ("INT", {"default": 1, "min": 1}),
            },
            "optional": {"format": (["AnimateDiff", "None"], {"default": "AnimateDiff"})},  # (a shorter list)
        }

    def load(self, video, force_rate, frame_load_cap, skip_first_frames, select_every_nth, **_):
        images, audio, fps = _video_components(_folder_paths().get_annotated_filepath(video), force_rate or None)
        images = images[skip_first_frames::select_every_nth]
        if frame_load_cap:
            images = images[:frame_load_cap]
        info = {"loaded_fps": fps / select_every_nth, "loaded_frame_count": len(images)}
        return images, len(images), audio, info


class VHS_VideoCombine:
    UI_WIDGETS = None
    RETURN_TYPES = ("VHS_FILENAMES",)
    FUNCTION = "combine"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "frame_rate": ("FLOAT", {"default": 8, "min": 1, "step": 1}),
                "loop_count": ("INT", {"default": 0, "min": 0, "max": 100}),
                "filename_prefix": ("STRING", {"default": "AnimateDiff"}),
                "format": (["image/gif", "image/webp", "video/h264-mp4", "video/h265-mp4", "video/webm"],),
                "pingpong": ("BOOLEAN", {"default": False}),
                "save_output": ("BOOLEAN", {"default": True}),
            },
            "optional": {"audio": ("AUDIO",)},
        }

    def combine(self, images, frame_rate, filename_prefix, audio=None, **_):
        path = _write_mp4(_folder_paths().output_path(filename_prefix, "mp4"), images, frame_rate, audio)
        return {
            "ui": {"gifs": [{"filename": path.name, "subfolder": "", "type": "output"}]},
            "result": ((True, [str(path)]),),
        }


class SavePoseKpsAsJsonFile:
    UI_WIDGETS = ("filename_prefix",)
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"pose_kps": ("POSE_KEYPOINT",), "filename_prefix": ("STRING", {"default": "PoseKeypoint"})}
        }

    def save(self, pose_kps, filename_prefix):
        path = _folder_paths().output_path(filename_prefix, "json")
        path.write_text(json.dumps(pose_kps))
        return {}


CORE_STAND_INS = {
    cls.__name__: cls
    for cls in (
        LoadImage,
        LoadAudio,
        LoadVideo,
        GetVideoComponents,
        CreateVideo,
        SaveVideo,
        VHS_LoadVideo,
        VHS_VideoCombine,
        SavePoseKpsAsJsonFile,
    )
}


# ---------------------------------------------------------------------------------------------------------------------
# validation and execution of API-format graphs
# ---------------------------------------------------------------------------------------------------------------------
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")
FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # never sent to the server


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def input_specs(cls) -> dict:
    """{name: (type, options)} of a node class, required inputs first (the order of its widgets)."""
    declared = cls.INPUT_TYPES()
    specs = {}
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return specs


def is_widget(kind) -> bool:
    return isinstance(kind, list) or kind in WIDGET_TYPES


def validate_node(node_id: str, graph: dict, classes: dict) -> list[str]:
    """ComfyUI-style validation errors of one node of an API graph (empty when valid)."""
    node = graph[node_id]
    cls = classes[node["class_type"]]
    declared = cls.INPUT_TYPES()
    errors = [
        f"{node_id}: missing required input {name!r}" for name in declared["required"] if name not in node["inputs"]
    ]
    specs = input_specs(cls)
    for name, value in node["inputs"].items():
        if name not in specs:
            continue  # ComfyUI ignores inputs a node does not declare
        kind, options = specs[name]
        if is_link(value):
            source = graph[value[0]]
            produced = classes[source["class_type"]].RETURN_TYPES[value[1]]
            expected = "COMBO" if isinstance(kind, list) else kind
            if produced != expected and "*" not in (produced, expected):
                errors.append(f"{node_id}.{name}: link gives {produced}, the input takes {expected}")
        elif isinstance(kind, list):
            if value not in kind:
                errors.append(f"{node_id}.{name}: {value!r} is not one of {kind}")
        elif kind in ("INT", "FLOAT"):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or (kind == "INT" and value != int(value))
            ):
                errors.append(f"{node_id}.{name}: {value!r} is not {kind}")
            elif not options.get("min", -np.inf) <= value <= options.get("max", np.inf):
                errors.append(f"{node_id}.{name}: {value} is outside [{options.get('min')}, {options.get('max')}]")
        elif kind == "BOOLEAN" and not isinstance(value, bool):
            errors.append(f"{node_id}.{name}: {value!r} is not BOOLEAN")
        elif kind == "STRING" and not isinstance(value, str):
            errors.append(f"{node_id}.{name}: {value!r} is not STRING")
        elif not is_widget(kind):
            errors.append(f"{node_id}.{name}: a {kind} input needs a link, got {value!r}")
    return errors


def topological_order(graph: dict) -> list[str]:
    needs = {nid: {v[0] for v in node["inputs"].values() if is_link(v)} for nid, node in graph.items()}
    ready = deque(sorted(nid for nid, deps in needs.items() if not deps))
    order = []
    while ready:
        nid = ready.popleft()
        order.append(nid)
        for other, deps in needs.items():
            if nid in deps:
                deps.discard(nid)
                if not deps and other not in order and other not in ready:
                    ready.append(other)
    if len(order) != len(graph):
        raise ValueError(f"the graph has a cycle or a dangling link: ran {order} of {sorted(graph)}")
    return order


def run_api_workflow(graph: dict, classes: dict) -> tuple[dict, dict]:
    """Validate, then execute an API graph; returns (outputs per node, ui results of output nodes)."""
    errors = [error for nid in graph for error in validate_node(nid, graph, classes)]
    if errors:
        raise AssertionError("the workflow does not validate:\n" + "\n".join(errors))
    outputs, ui = {}, {}
    for nid in topological_order(graph):
        node = graph[nid]
        cls = classes[node["class_type"]]
        kwargs = {k: outputs[v[0]][v[1]] if is_link(v) else v for k, v in node["inputs"].items()}
        result = getattr(cls(), cls.FUNCTION)(**kwargs)
        if isinstance(result, dict):
            ui[nid] = result.get("ui", {})
            result = result.get("result", ())
        assert isinstance(result, tuple) and len(result) == len(cls.RETURN_TYPES), (nid, node["class_type"])
        outputs[nid] = result
    return outputs, ui


# ---------------------------------------------------------------------------------------------------------------------
# UI format -> API format
# ---------------------------------------------------------------------------------------------------------------------
def widget_names(cls) -> list[str]:
    """The frontend's widget order: widget inputs in INPUT_TYPES order, a control value after each seed widget.
    Names starting with '$' are frontend-only widgets (upload buttons) with no API input."""
    explicit = getattr(cls, "UI_WIDGETS", None)
    if explicit is not None:
        return list(explicit)
    names = []
    for name, (kind, options) in input_specs(cls).items():
        if is_widget(kind):
            names.append(name)
            if options.get("control_after_generate"):
                names.append("$control_after_generate")
    return names


def ui_to_api(workflow: dict, classes: dict) -> dict:
    """The API graph of a UI workflow (active nodes only; links as [source id, output slot])."""
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0 or node["type"] in FRONTEND_ONLY_NODES:
            continue
        cls = classes[node["type"]]
        inputs = {}
        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k != "videopreview"})  # VideoHelperSuite
        else:
            for name, value in zip(widget_names(cls), values):
                if not name.startswith("$"):
                    inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph


# ---------------------------------------------------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def make_tiny_a2l(folder: Path) -> Path:
    """An untrained A2L LSTM checkpoint (it returns the reference face) on log-mel features."""
    import torch

    from lmdiff_core.models import A2LLSTM
    from lmdiff_core.pipelines.a2l import AudioToLandmarksPipeline

    torch.manual_seed(0)
    return AudioToLandmarksPipeline(A2LLSTM(hidden_size=16, num_layers=1)).save_pretrained(folder)


def make_tiny_l2v(folder: Path, crop_size: int = 64) -> Path:
    """A random-weight pixel-space L2V checkpoint whose guider and temporal layers are not zero."""
    import torch

    from lmdiff_core.autoencoders import load_autoencoder
    from lmdiff_core.models import L2VUNet
    from lmdiff_core.pipelines.l2v import LandmarkToVideoPipeline
    from lmdiff_core.pipelines.schedulers import make_scheduler

    torch.manual_seed(0)
    pixel = load_autoencoder("pixel")
    unet = L2VUNet(latent_channels=pixel.latent_channels, downscale=pixel.downscale, autoencoder="pixel", **TINY)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "zero_conv" in name or "to_out" in name or "conv_out" in name:
                p.normal_(0, 0.05)
    pipeline = LandmarkToVideoPipeline(
        unet.eval(), make_scheduler(unet), pixel, crop_size=crop_size, window=4, overlap=1
    )
    return pipeline.save_pretrained(folder)


# ---------------------------------------------------------------------------------------------------------------------
# the environment the node and workflow tests share
# ---------------------------------------------------------------------------------------------------------------------
SPEECH_SECONDS = 1.61  # 40.25 frames at 25 fps: the last frame is a partial one
VIDEO_FRAMES = 25
INPUTS = {"portrait": "lmdiff_portrait.png", "speech": "lmdiff_speech.wav", "video": "lmdiff_video.mp4"}
MEDIAPIPE_TASK = "weights/mediapipe_face_landmarker/face_landmarker_v2_with_blendshapes.task"


def prepare_base(base: Path, shared_path, mediapipe: bool = True) -> None:
    """A ComfyUI-like base folder: models/ with tiny checkpoints, the MediaPipe model (unless `mediapipe` is False)
    and TAESD; input/ with the three files the API workflows name (a 256 px portrait, SPEECH_SECONDS of speech,
    VIDEO_FRAMES of a talking clip); an empty output/."""
    from PIL import Image

    from lmdiff_core.media import read_audio, read_video, write_video

    models, inputs = base / "models", base / "input"
    for folder in (models / "lmdiff" / "landmarker", models / "vae_approx", inputs, base / "output"):
        folder.mkdir(parents=True, exist_ok=True)
    make_tiny_a2l(models / "lmdiff" / "a2l" / "tiny_a2l")
    make_tiny_l2v(models / "lmdiff" / "l2v" / "tiny_l2v")
    if mediapipe:
        os.symlink(shared_path(MEDIAPIPE_TASK), models / "lmdiff" / "landmarker" / "face_landmarker.task")
    for role in ("encoder", "decoder"):
        name = f"taesd_{role}.safetensors"
        os.symlink(shared_path(f"weights/taesd/{name}"), models / "vae_approx" / name)
    with Image.open(shared_path("data/images/portrait_woman_a.jpg")) as image:
        image.convert("RGB").resize((256, 256), Image.LANCZOS).save(inputs / INPUTS["portrait"])
    speech = read_audio(shared_path("data/speech/speech_en_hdtf_radio34.wav"))
    import soundfile

    soundfile.write(inputs / INPUTS["speech"], speech[8000 : 8000 + round(SPEECH_SECONDS * 16000)], 16000)
    clip = read_video(shared_path("data/clips/edtalk_woman_en.mp4"))
    write_video(inputs / INPUTS["video"], clip.frames[:VIDEO_FRAMES], 25, audio=clip.audio[: VIDEO_FRAMES * 640])


class ComfyEnvironment:
    """A prepared base folder (`prepare_base`) and the pack loaded against a stand-in folder_paths over it."""

    def __init__(self, base: Path, shared_path):
        self.base = Path(base)
        prepare_base(self.base, shared_path)
        self.folder_paths = StandInFolderPaths(self.base)
        with self.installed():
            self.pack = load_pack()

    @contextmanager
    def installed(self):
        """Context in which `import folder_paths` gives the stand-in (only that key of sys.modules is touched)."""
        previous = sys.modules.get("folder_paths")
        sys.modules["folder_paths"] = self.folder_paths
        try:
            yield self
        finally:
            if previous is None:
                del sys.modules["folder_paths"]
            else:
                sys.modules["folder_paths"] = previous

    def node(self, node_id: str):
        """A new instance of a pack node."""
        return self.pack.NODE_CLASS_MAPPINGS[node_id]()

    def core(self, module: str):
        """A module of the pack's own copy of lmdiff_core (its classes are the ones the nodes check against)."""
        return importlib.import_module(f"{self.pack.__name__}.lmdiff_core.{module}")

    def classes(self) -> dict:
        return {**CORE_STAND_INS, **self.pack.NODE_CLASS_MAPPINGS}

    def input_path(self, key: str) -> Path:
        return self.base / "input" / INPUTS[key]


_ENVIRONMENT: list = []  # (TemporaryDirectory, ComfyEnvironment), built once per test session


def comfy_environment() -> ComfyEnvironment:
    """The session's ComfyEnvironment (tiny checkpoints and inputs are made once)."""
    if not _ENVIRONMENT:
        import tempfile

        from .conftest import shared_path

        folder = tempfile.TemporaryDirectory(prefix="lmdiff_comfy_")
        _ENVIRONMENT.append((folder, ComfyEnvironment(Path(folder.name), shared_path)))
    return _ENVIRONMENT[0][1]


@contextmanager
def one_torch_thread():
    """Tiny models run fastest on one thread; two threads contend badly on a busy 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
