"""The ComfyUI node pack, loaded the way ComfyUI loads it, on real media with tiny test-made checkpoints.

ComfyUI is not installed: `tests/comfy_harness.py` stands in for folder_paths and for the core nodes that load
inputs (LoadImage, LoadAudio, VideoHelperSuite's Load Video); `comfy.utils` / `comfy.model_management` are stood in
for only where progress and cancelling are tested.
"""

import importlib
import inspect
import math
import os
import subprocess
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .comfy_harness import (
    INPUTS,
    PACK_ROOT,
    LoadAudio,
    LoadImage,
    StandInFolderPaths,
    VHS_LoadVideo,
    comfy_environment,
    make_tiny_a2l,
    pack_module_name,
)
from .conftest import shared_path, truncated_mp4

NODE_IDS = {
    "LmdiffLoadLandmarker",
    "LmdiffExtractLandmarks",
    "LmdiffLoadA2LModel",
    "LmdiffAudioToLandmarks",
    "LmdiffSmoothLandmarks",
    "LmdiffTransferPose",
    "LmdiffMouthGain",
    "LmdiffAddBlinks",
    "LmdiffAddHeadMotion",
    "LmdiffFrontalize",
    "LmdiffFitLength",
    "LmdiffRenderLandmarks",
    "LmdiffLandmarksToPoseKeypoint",
    "LmdiffFaceCrop",
    "LmdiffPasteBack",
    "LmdiffLoadL2VModel",
    "LmdiffL2VSampler",
    "LmdiffTalkingHead",
    "LmdiffAppearanceBankReference",
    "LmdiffLoadVideo",
    "LmdiffLoadAudio",
}
HEAVY = ("torch", "diffusers", "transformers", "mediapipe", "librosa", "kornia", "scipy", "dlib", "insightface", "av")


@pytest.fixture(scope="module")
def comfy():
    from .comfy_harness import one_torch_thread

    env = comfy_environment()
    with env.installed(), one_torch_thread():
        yield env


def run(env, node_id: str, **inputs):
    node = env.node(node_id)
    return getattr(node, node.FUNCTION)(**inputs)


def pack_module(env, name: str):
    return importlib.import_module(f"{env.pack.__name__}.{name}")


def expected_frames(audio: dict, fps: float) -> int:
    """ceil(duration x fps) of a ComfyUI AUDIO, computed here from its sample count."""
    return math.ceil(round(audio["waveform"].shape[-1] / audio["sample_rate"] * fps, 9))


@pytest.fixture(scope="module")
def media(comfy):
    """Inputs as ComfyUI nodes give them, the loaded models, and the video's landmarks."""
    video = VHS_LoadVideo().load(INPUTS["video"], 25, 0, 0, 1)[0]
    landmarker = run(comfy, "LmdiffLoadLandmarker", backend="mediapipe", model="default")[0]
    return SimpleNamespace(
        portrait=LoadImage().load(INPUTS["portrait"])[0],
        speech=LoadAudio().load(INPUTS["speech"])[0],
        video=video,
        landmarker=landmarker,
        a2l=run(comfy, "LmdiffLoadA2LModel", model="tiny_a2l", precision="fp32", device="auto")[0],
        l2v=run(comfy, "LmdiffLoadL2VModel", model="tiny_l2v", autoencoder="auto", precision="auto", device="auto")[0],
        video_landmarks=extract(comfy, landmarker, video),
    )


def extract(env, landmarker, images, fps=25.0):
    return run(env, "LmdiffExtractLandmarks", landmarker=landmarker, images=images, fps=fps, face="largest",
               face_index=0, max_gap=12)[0]  # fmt: skip


def a2l_landmarks(env, media, fps=25.0, **reference):
    reference = reference or {"reference_image": media.portrait, "landmarker": media.landmarker}
    return run(env, "LmdiffAudioToLandmarks", a2l_model=media.a2l, audio=media.speech, fps=fps, steps=1,
               guidance=1.5, seed=0, **reference)  # fmt: skip


def angles(env, seq) -> np.ndarray:
    canonical = env.core("canonical")
    pose = canonical.head_pose(canonical.canonicalize(seq))
    return np.stack([pose["yaw"], pose["pitch"], pose["roll"]], axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# loading and declarations
# ---------------------------------------------------------------------------------------------------------------------
def test_loading_the_pack_imports_no_heavy_library():
    """ComfyUI start-up: import the pack and read every node's declarations, in a fresh interpreter."""
    script = f"""
import importlib.util, sys
name = {pack_module_name()!r}
spec = importlib.util.spec_from_file_location(name, {str(PACK_ROOT / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
for cls in pack.NODE_CLASS_MAPPINGS.values():
    cls.INPUT_TYPES()
print(len(pack.NODE_CLASS_MAPPINGS), sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(NODE_IDS)), "[]"], done.stdout


def test_the_pack_runs_its_own_core_when_lmdiff_core_is_not_importable(tmp_path):
    """A clone in custom_nodes with only requirements.txt installed: no importable `lmdiff_core`. The pack's nodes still
    find the core's data files, and the default landmarker (dlib, no model download) finds the portrait's face."""
    from PIL import Image

    from lmdiff_core.editing import frontalize
    from lmdiff_core.landmarks import LandmarkSequence

    portrait = tmp_path / "portrait.png"
    with Image.open(shared_path("data/images/portrait_woman_a.jpg")) as image:
        image.convert("RGB").resize((256, 256), Image.LANCZOS).save(portrait)
    script = f"""
import importlib.util, sys
import numpy as np, torch
from PIL import Image
sys.modules["lmdiff_core"] = None  # `import lmdiff_core` fails: only the pack's own copy can be used
name = {pack_module_name()!r}
spec = importlib.util.spec_from_file_location(name, {str(PACK_ROOT / "__init__.py")!r})
pack = importlib.util.module_from_spec(spec)
sys.modules[name] = pack
spec.loader.exec_module(pack)
nodes = {{key: cls() for key, cls in pack.NODE_CLASS_MAPPINGS.items()}}
image = torch.from_numpy(np.asarray(Image.open({str(portrait)!r}), dtype=np.float32) / 255)[None]
landmarker = nodes["LmdiffLoadLandmarker"].load("auto", "default")[0]
seq = nodes["LmdiffExtractLandmarks"].extract(landmarker, image, 25.0, "largest", 0, 12)[0]
seq.save({str(tmp_path / "found.npz")!r})
nodes["LmdiffFrontalize"].edit(seq, 1.0)[0].save({str(tmp_path / "front.npz")!r})
print(landmarker.backend)
"""
    env = {key: value for key, value in os.environ.items() if key != "LMDIFF_MEDIAPIPE_MODEL"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/", env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["dlib"]
    found = LandmarkSequence.load(tmp_path / "found.npz")
    assert (len(found), found.topology, found.frame_size) == (1, "ibug68", (256, 256))
    eyes = found.points[0, 36:48, :2].mean(0)  # the eyes sit in the upper middle of this portrait
    assert 64 < eyes[0] < 192 and 40 < eyes[1] < 160, eyes
    np.testing.assert_allclose(LandmarkSequence.load(tmp_path / "front.npz").points, frontalize(found, 1.0).points,
                               atol=1e-4)  # fmt: skip


def test_every_node_declares_what_comfyui_reads(comfy):
    mappings = comfy.pack.NODE_CLASS_MAPPINGS
    assert set(mappings) == NODE_IDS
    assert set(comfy.pack.NODE_DISPLAY_NAME_MAPPINGS) == NODE_IDS
    assert len(set(comfy.pack.NODE_DISPLAY_NAME_MAPPINGS.values())) == len(NODE_IDS)
    for node_id, cls in mappings.items():
        declared = cls.INPUT_TYPES()
        assert set(declared) <= {"required", "optional", "hidden"} and declared["required"], node_id
        inputs = {name: spec for section in declared.values() for name, spec in section.items()}
        for name, spec in inputs.items():
            kind, options = spec[0], spec[1] if len(spec) > 1 else {}
            if isinstance(kind, list):
                assert kind and options.get("default", kind[0]) in kind, (node_id, name)
            else:
                assert isinstance(kind, str) and kind == kind.upper(), (node_id, name)
            if kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (node_id, name)
        assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), node_id
        parameters = dict(inspect.signature(getattr(cls, cls.FUNCTION)).parameters)
        parameters.pop("self")
        assert set(parameters) == set(inputs), node_id
        needed = {p for p, v in parameters.items() if v.default is inspect.Parameter.empty}
        assert needed == set(declared["required"]), node_id
        assert cls.CATEGORY.startswith("lmdiff") and cls.DESCRIPTION.strip(), node_id


def test_node_choices_match_the_core(comfy):
    l2v_nodes, landmark_nodes = pack_module(comfy, "nodes.l2v_nodes"), pack_module(comfy, "nodes.landmark_nodes")
    edit_nodes, models = pack_module(comfy, "nodes.edit_nodes"), pack_module(comfy, "nodes.models")
    l2v, a2l = comfy.core("pipelines.l2v"), comfy.core("pipelines.a2l")
    assert set(l2v_nodes.L2V_SAMPLERS) <= set(comfy.core("pipelines.schedulers").SAMPLERS)
    assert l2v_nodes.L2V_MODES == l2v.MODES
    assert l2v_nodes.PASTE_MASKS[:-1] == comfy.core("masks").MASK_NAMES
    assert landmark_nodes.RENDER_STYLES == comfy.core("render").STYLES
    assert edit_nodes.TRANSFER_PARTS == comfy.core("editing").TRANSFER_PARTS
    assert models.MARKERS == {models.A2L: a2l.CHECKPOINT_INFO, models.L2V: l2v.CHECKPOINT_INFO}
    crop = comfy.core("crop")
    face_crop = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffFaceCrop"].INPUT_TYPES()["required"]
    assert (face_crop["scale"][1]["default"], face_crop["smoothing"][1]["default"]) == (
        crop.DEFAULT_SCALE,
        crop.DEFAULT_SMOOTHING,
    )
    stats = comfy.core("motion").MotionStats()
    blinks = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffAddBlinks"].INPUT_TYPES()["required"]
    motion = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffAddHeadMotion"].INPUT_TYPES()["required"]
    assert (blinks["blinks_per_minute"][1]["default"], blinks["blink_seconds"][1]["default"]) == (
        stats.blinks_per_minute,
        stats.blink_seconds,
    )
    assert [motion[k][1]["default"] for k in ("yaw", "pitch", "roll", "time_scale")] == [
        stats.yaw_std,
        stats.pitch_std,
        stats.roll_std,
        stats.time_scale,
    ]


# ---------------------------------------------------------------------------------------------------------------------
# model folders
# ---------------------------------------------------------------------------------------------------------------------
def test_model_folders_are_registered_with_their_file_types(comfy, tmp_path):
    registry = comfy.folder_paths.folder_names_and_paths
    for key, sub, extensions in (
        ("lmdiff_a2l", "a2l", {".json"}),
        ("lmdiff_l2v", "l2v", {".json"}),
        ("lmdiff_landmarker", "landmarker", {".task", ".dat", ".onnx"}),
    ):
        assert registry[key] == ([str(comfy.base / "models" / "lmdiff" / sub)], extensions)
    stray = comfy.base / "models" / "lmdiff" / "landmarker" / "notes.txt"
    stray.write_text("not a model")
    try:
        landmarkers = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffLoadLandmarker"].INPUT_TYPES()["required"]["model"][0]
    finally:
        stray.unlink()
    assert landmarkers[0] == "default" and "face_landmarker.task" in landmarkers and "notes.txt" not in landmarkers
    a2l = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffLoadA2LModel"].INPUT_TYPES()["required"]["model"][0]
    l2v = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffLoadL2VModel"].INPUT_TYPES()["required"]
    assert a2l == ["tiny_a2l", "bundled", "bundled-diffusion"]
    assert l2v["model"][0] == ["tiny_l2v", "bundled", "bundled-refiner"]
    autoencoders = l2v["autoencoder"][0]
    assert autoencoders[:2] == ["auto", "pixel"] and "taesd_decoder.safetensors" in autoencoders

    fresh = StandInFolderPaths(tmp_path)  # a ComfyUI whose extra_model_paths.yaml already names lmdiff_a2l
    fresh.folder_names_and_paths["lmdiff_a2l"] = ([str(tmp_path / "elsewhere")], set())
    previous = sys.modules["folder_paths"]
    sys.modules["folder_paths"] = fresh
    try:
        pack_module(comfy, "nodes.models").register_model_folders()
    finally:
        sys.modules["folder_paths"] = previous
    own = str(tmp_path / "models" / "lmdiff" / "a2l")
    assert fresh.folder_names_and_paths["lmdiff_a2l"] == ([str(tmp_path / "elsewhere"), own], {".json"})


def test_the_bundled_checkpoints_are_offered_after_the_folders_own(comfy, tmp_path, monkeypatch):
    models = pack_module(comfy, "nodes.models")
    loader = comfy.pack.NODE_CLASS_MAPPINGS["LmdiffLoadA2LModel"]
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "lmdiff_a2l", ([str(empty)], {".json"}))
    monkeypatch.setitem(models.BUNDLED_PATHS, models.A2L, {"bundled": tmp_path / "not_there"})
    assert loader.INPUT_TYPES()["required"]["model"][0] == []
    with pytest.raises(ValueError, match="bundled checkpoint is not installed"):
        run(comfy, "LmdiffLoadA2LModel", model="bundled", precision="fp32", device="cpu")

    bundled = {"bundled": make_tiny_a2l(tmp_path / "bundled"), "bundled-diffusion": tmp_path / "not_there"}
    monkeypatch.setitem(models.BUNDLED_PATHS, models.A2L, bundled)
    assert loader.INPUT_TYPES()["required"]["model"][0] == ["bundled"]  # only the installed ones
    loaded = run(comfy, "LmdiffLoadA2LModel", model="bundled", precision="fp32", device="cpu")[0]
    assert type(loaded.pipeline).__name__ == "AudioToLandmarksPipeline"

    monkeypatch.undo()
    monkeypatch.setitem(models.BUNDLED_PATHS, models.A2L, {"bundled": tmp_path / "bundled"})
    assert loader.INPUT_TYPES()["required"]["model"][0] == ["tiny_a2l", "bundled"]  # the folder's first


@pytest.mark.parametrize(
    "node_id, inputs",
    [
        ("LmdiffLoadA2LModel", {"model": "../lmdiff/a2l/tiny_a2l", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadA2LModel", {"model": "tiny_a2l/../tiny_a2l", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadA2LModel", {"model": "..\\a2l\\tiny_a2l", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadA2LModel", {"model": "/etc", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadA2LModel", {"model": "C:\\models\\a2l", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadA2LModel", {"model": "~/a2l", "precision": "fp32", "device": "cpu"}),
        ("LmdiffLoadLandmarker", {"backend": "mediapipe", "model": "../landmarker/face_landmarker.task"}),
        (
            "LmdiffLoadL2VModel",
            {
                "model": "tiny_l2v",
                "autoencoder": "../vae_approx/taesd_decoder.safetensors",
                "precision": "fp32",
                "device": "cpu",
            },
        ),  # fmt: skip
    ],
)
def test_model_names_outside_the_model_folders_are_refused(comfy, node_id, inputs):
    with pytest.raises(ValueError) as error:
        run(comfy, node_id, **inputs)
    message = str(error.value)
    assert "refused" in message and "\n" not in message


def test_landmarker_choices_resolve_inside_the_landmarker_folder(comfy, tmp_path, monkeypatch):
    models = pack_module(comfy, "nodes.models")
    folder = comfy.base / "models" / "lmdiff" / "landmarker"
    monkeypatch.delenv("LMDIFF_MEDIAPIPE_MODEL", raising=False)
    assert models.landmarker_choice("mediapipe", "default").model_path == folder / "face_landmarker.task"
    assert models.landmarker_choice("dlib", "default").model_path is None  # the predictor shipped with dlib's extra
    assert models.landmarker_choice("auto", "default") == models.landmarker_choice("mediapipe", "default")
    assert models.landmarker_choice("auto", "face_landmarker.task").backend == "mediapipe"
    pack = folder / "models" / "antelopev2"
    pack.mkdir(parents=True)
    (pack / "detector.onnx").write_bytes(b"")
    (folder / "loose.onnx").write_bytes(b"")
    try:
        insightface = models.landmarker_choice("insightface", "models/antelopev2/detector.onnx")
        assert (insightface.model_path, dict(insightface.options)) == (folder, {"name": "antelopev2"})
        with pytest.raises(ValueError, match="pack folder"):
            models.landmarker_choice("insightface", "loose.onnx")
        with pytest.raises(ValueError, match="buffalo_l"):
            models.landmarker_choice("insightface", "default")
    finally:
        (pack / "detector.onnx").unlink()
        (folder / "loose.onnx").unlink()
        for empty in (pack, pack.parent):
            empty.rmdir()
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "lmdiff_landmarker", ([str(tmp_path)], {".task"}))
    with pytest.raises(ValueError, match="models/lmdiff/landmarker") as error:
        models.landmarker_choice("mediapipe", "default")
    assert "\n" not in str(error.value) and "lmdiff download-model" not in str(error.value)
    assert models.landmarker_choice("auto", "default") == models.landmarker_choice("dlib", "default")  # no .task
    (tmp_path / "notes.task.txt").write_text("")
    with pytest.raises(ValueError, match="not a landmarker model"):
        models.landmarker_choice("auto", "notes.task.txt")


def test_errors_reach_comfyui_under_their_short_name(comfy, media):
    """ComfyUI shows an error as `<module>.<qualname>: message`, or just the qualname for module builtins."""
    import pickle

    with pytest.raises(ValueError) as error:
        extract(comfy, media.landmarker, torch.full((3, 64, 64, 3), 0.5))
    kind = type(error.value)
    assert (kind.__module__, kind.__qualname__) == ("builtins", "LmdiffInputError")
    assert str(error.value) == "no face found in any of the 3 frames of the images input"
    again = pickle.loads(pickle.dumps(error.value))
    assert type(again) is kind and again.args == error.value.args


# ---------------------------------------------------------------------------------------------------------------------
# runtime services
# ---------------------------------------------------------------------------------------------------------------------
def test_runtime_services_fall_back_without_comfyui(comfy):
    runtime = pack_module(comfy, "nodes.runtime")
    assert "comfy" not in sys.modules
    runtime.Progress(3)(2)
    runtime.check_interrupted()
    cpu = torch.device("cpu")
    assert runtime.torch_device("cpu") == cpu and runtime.offload_device(cpu) == cpu
    assert runtime.torch_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.torch_dtype("auto", cpu) == torch.float32
    assert runtime.torch_dtype("bf16", cpu) == torch.bfloat16 and runtime.torch_dtype("fp16", cpu) == torch.float16
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            runtime.torch_device("cuda")


class Cancelled(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def comfy_stand_ins(cancel_after: int | None = None):
    """comfy, comfy.utils and comfy.model_management modules recording progress and cancelling on request."""
    updates, checks = [], []
    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            updates.append((value, total or self.total))

    utils.ProgressBar = ProgressBar
    management = types.ModuleType("comfy.model_management")

    def throw_exception_if_processing_interrupted():
        checks.append(len(updates))
        if cancel_after is not None and len(checks) > cancel_after:
            raise Cancelled

    management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    management.get_torch_device = lambda: torch.device("cpu")
    management.unet_offload_device = lambda: torch.device("cpu")
    management.soft_empty_cache = lambda: None
    root = types.ModuleType("comfy")
    root.utils, root.model_management = utils, management
    return {"comfy": root, "comfy.utils": utils, "comfy.model_management": management}, updates


def test_progress_bars_and_cancel_inside_the_loops(comfy, media, monkeypatch):
    frames = media.video[:10]
    modules, updates = comfy_stand_ins()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    extract(comfy, media.landmarker, frames)
    assert updates == [(i, 10) for i in range(1, 11)]

    seq = media.video_landmarks[:10]
    crops, info = run(comfy, "LmdiffFaceCrop", images=frames, landmarks=seq, size=64, scale=3.2, smoothing=0.15)
    updates.clear()
    run(comfy, "LmdiffL2VSampler", l2v_model=media.l2v, crops=crops, crop_info=info, landmarks=seq, identity=crops,
        mode="dub", steps=1, sampler="ddim", guidance=1.0, seed=0)  # fmt: skip
    assert updates and updates[-1] == (10, 10) and [u[0] for u in updates] == sorted(u[0] for u in updates)

    modules, updates = comfy_stand_ins(cancel_after=3)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    with pytest.raises(Cancelled):
        extract(comfy, media.landmarker, frames)
    assert updates == [(i, 10) for i in range(1, 4)]  # stopped inside the loop, at the fourth frame

    modules, updates = comfy_stand_ins()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert len(extract(comfy, media.landmarker, frames)) == 10  # the next run is not affected


def interrupt_after_the_first_step(unet, monkeypatch):
    """ComfyUI stand-ins whose Cancel flag is raised when `unet` finishes its first forward; counts the forwards."""
    modules, _ = comfy_stand_ins()
    state = {"forwards": 0, "interrupted": False}

    def forward_done(*_):
        state["forwards"] += 1
        state["interrupted"] = True

    def throw_exception_if_processing_interrupted():
        if state["interrupted"]:
            raise Cancelled

    modules["comfy.model_management"].throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return state, unet.register_forward_hook(forward_done)


@pytest.mark.parametrize("node", ["LmdiffL2VSampler", "LmdiffTalkingHead"])
def test_cancel_stops_within_one_denoising_step(comfy, media, monkeypatch, node):
    seq = media.video_landmarks[:10]
    if node == "LmdiffL2VSampler":
        crops, info = run(comfy, "LmdiffFaceCrop", images=media.video[:10], landmarks=seq, size=64, scale=3.2,
                          smoothing=0.15)  # fmt: skip
        inputs = dict(l2v_model=media.l2v, crops=crops, crop_info=info, landmarks=seq, identity=crops, mode="dub")
    else:
        inputs = dict(a2l_model=media.a2l, l2v_model=media.l2v, landmarker=media.landmarker, audio=media.speech,
                      images=media.portrait, fps=25.0)  # fmt: skip
    state, hook = interrupt_after_the_first_step(media.l2v.pipeline.unet, monkeypatch)
    try:
        with pytest.raises(Cancelled):
            run(comfy, node, steps=8, sampler="ddim", guidance=1.0, seed=0, **inputs)
    finally:
        hook.remove()
    assert state["forwards"] == 1  # not the window's 8 steps


# ---------------------------------------------------------------------------------------------------------------------
# nodes on real media
# ---------------------------------------------------------------------------------------------------------------------
def test_extract_landmarks_gives_the_library_landmarks(comfy, media, mediapipe_model):
    from lmdiff_core.detectors import extract_landmarks, load_landmarker

    seq = media.video_landmarks
    assert (len(seq), seq.topology, seq.frame_size, seq.fps) == (25, "mediapipe478", (256, 256), 25.0)
    frames = (media.video.numpy() * 255).round().astype(np.uint8)
    with load_landmarker("mediapipe", mediapipe_model) as landmarker:
        expected = extract_landmarks(frames, landmarker, 25.0)
    np.testing.assert_allclose(seq.points, expected.points, atol=1e-3)
    one = extract(comfy, media.landmarker, media.portrait, fps=30.0)
    assert (len(one), one.frame_size, one.fps) == (1, (256, 256), 30.0)


def test_render_and_pose_keypoint_nodes(comfy, media):
    seq = media.video_landmarks
    images = run(comfy, "LmdiffRenderLandmarks", landmarks=seq, width=0, height=0, thickness=2.0, style="parts")[0]
    assert images.shape == (25, 256, 256, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    lit = (images.amax(-1) > 0).numpy()
    x0, y0 = np.floor(seq.points[..., :2].min((0, 1))).astype(int) - 3
    x1, y1 = np.ceil(seq.points[..., :2].max((0, 1))).astype(int) + 3
    inside = lit[:, max(y0, 0) : y1, max(x0, 0) : x1].sum()
    assert inside > 0 and inside == lit.sum()  # drawn only around the face
    small = run(comfy, "LmdiffRenderLandmarks", landmarks=seq, width=128, height=96, thickness=1.0, style="mesh")[0]
    assert small.shape == (25, 96, 128, 3)
    over = run(comfy, "LmdiffRenderLandmarks", landmarks=seq, width=0, height=0, thickness=2.0, style="parts",
               images=media.video, opacity=1.0)[0]  # fmt: skip
    assert over.shape == media.video.shape
    assert torch.equal(over[:, :y0], media.video[:, :y0])

    keypoints = run(comfy, "LmdiffLandmarksToPoseKeypoint", landmarks=seq, normalized=True)[0]
    assert len(keypoints) == 25 and keypoints[0]["canvas_width"] == 256 and keypoints[0]["canvas_height"] == 256
    face = np.array(keypoints[7]["people"][0]["face_keypoints_2d"]).reshape(-1, 3)
    assert face.shape == (70, 3) and (face[:, 2] == 1).all() and (0 <= face[:, :2]).all() and (face[:, :2] <= 1).all()
    ibug = seq.to_topology("ibug68").points[7, :, :2]
    np.testing.assert_allclose(face[:68, :2] * 256, ibug, atol=1e-3)


def test_face_crop_and_paste_back(comfy, media):
    seq, video = media.video_landmarks, media.video
    crops, info = run(comfy, "LmdiffFaceCrop", images=video, landmarks=seq, size=128, scale=3.2, smoothing=0.15)
    assert crops.shape == (25, 128, 128, 3) and len(info) == 25
    inside = comfy.core("crop").transform_landmarks(seq, info).points[..., :2]
    assert (inside > 0).all() and (inside < 128).all()  # the whole face is in its crop

    def paste(crops, mask):
        return run(comfy, "LmdiffPasteBack", images=video, crops=crops, crop_info=info, mask=mask, feather=4.0)

    same, face = paste(crops, "face")
    assert same.shape == video.shape and face.shape == (25, 256, 256)
    assert torch.equal(same[face == 0], video[face == 0])
    assert (same - video).abs().mean() < 0.01  # the crops went out and back: only resampling differences
    black, mouth = paste(torch.zeros_like(crops), "mouth")
    assert torch.equal(black[mouth == 0], video[mouth == 0])
    assert black[mouth > 0.99].max() < 0.01 and 0 < (mouth > 0).sum() < (face > 0).sum()
    _, whole = paste(crops, "crop")
    assert (whole > 0).sum() > (face > 0).sum()
    one = run(comfy, "LmdiffPasteBack", images=video[:1], crops=crops[:5], crop_info=info[0:1], mask="face",
              feather=4.0)[0]  # fmt: skip
    assert one.shape == (5, 256, 256, 3)


def test_audio_to_landmarks_gives_ceil_duration_times_fps_frames(comfy, media):
    portrait = extract(comfy, media.landmarker, media.portrait).to_topology("ibug68")
    for fps in (25.0, 30.0):
        seq, out_fps = a2l_landmarks(comfy, media, fps=fps)
        assert len(seq) == expected_frames(media.speech, fps) and out_fps == fps == seq.fps
        assert seq.space == "image" and seq.frame_size == (256, 256)
        # the untrained tiny model returns its reference: the portrait's own landmarks on every frame
        np.testing.assert_allclose(seq.points[..., :2], np.repeat(portrait.points[..., :2], len(seq), 0), atol=0.05)

    posed, _ = a2l_landmarks(comfy, media, reference_landmarks=media.video_landmarks,
                             pose_landmarks=media.video_landmarks)  # fmt: skip
    n = expected_frames(media.speech, 25.0)
    assert len(posed) == n and posed.frame_size == (256, 256)
    looped = media.video_landmarks[np.arange(n) % len(media.video_landmarks)]
    np.testing.assert_allclose(angles(comfy, posed), angles(comfy, looped), atol=1.5)


def test_editing_nodes_apply_the_core_edits(comfy, media):
    seq = media.video_landmarks
    editing, motion = comfy.core("editing"), comfy.core("motion")

    def edit(node_id, **inputs):
        return run(comfy, node_id, landmarks=seq, **inputs)[0]

    smooth = comfy.core("smoothing")
    smoothed = edit("LmdiffSmoothLandmarks", min_cutoff=0.7, beta=0.02, lips_min_cutoff=8.0)
    assert smooth.jitter(smoothed) < smooth.jitter(seq)
    np.testing.assert_array_equal(edit("LmdiffMouthGain", gain=1.7).points, editing.mouth_gain(seq, 1.7).points)
    np.testing.assert_array_equal(edit("LmdiffFrontalize", strength=0.6).points, editing.frontalize(seq, 0.6).points)
    stats = motion.MotionStats(blinks_per_minute=90.0, blink_seconds=0.3)
    blinked = edit("LmdiffAddBlinks", blinks_per_minute=90.0, blink_seconds=0.3, seed=4)
    np.testing.assert_array_equal(blinked.points, motion.add_blinks(seq, motion.blink_curve(25, 25.0, stats, 4)).points)
    moved = edit("LmdiffAddHeadMotion", yaw=6.0, pitch=1.0, roll=0.5, time_scale=0.8, seed=2)
    stats = motion.MotionStats(yaw_std=6.0, pitch_std=1.0, roll_std=0.5, time_scale=0.8)
    np.testing.assert_array_equal(moved.points, editing.add_head_motion(seq, stats, 2).points)
    posed = run(comfy, "LmdiffTransferPose", landmarks=seq[:1], driving_landmarks=seq, parts="face", fit="loop")[0]
    np.testing.assert_array_equal(posed.points, editing.transfer_pose(seq[:1], seq, "face", "loop").points)

    n = expected_frames(media.speech, 25.0)
    for mode in ("loop", "pingpong", "hold"):
        fitted, images, count = run(comfy, "LmdiffFitLength", landmarks=seq, mode=mode, frame_count=1,
                                    audio=media.speech, images=media.video)  # fmt: skip
        index = comfy.core("landmarks").fit_indices(25, n, mode)
        assert count == n == len(fitted) == images.shape[0]
        assert torch.equal(images, media.video[index]) and np.array_equal(fitted.points, seq.points[index])
    counted, none, count = run(comfy, "LmdiffFitLength", landmarks=seq, mode="loop", frame_count=7)
    assert len(counted) == count == 7 and none is None


def test_l2v_sampler_and_paste_back_dub_a_video(comfy, media):
    seq, frames = media.video_landmarks[:8], media.video[:8]
    crops, info = run(comfy, "LmdiffFaceCrop", images=frames, landmarks=seq, size=96, scale=3.2, smoothing=0.15)
    target = run(comfy, "LmdiffMouthGain", landmarks=seq, gain=2.5)[0]

    def sample(seed):
        return run(comfy, "LmdiffL2VSampler", l2v_model=media.l2v, crops=crops, crop_info=info, landmarks=target,
                   identity=crops, mode="dub", steps=1, sampler="ddim", guidance=1.0, seed=seed)[0]  # fmt: skip

    out = sample(0)
    assert out.shape == crops.shape
    difference = (out - crops).abs().mean((0, 3))
    assert difference[:24].mean() < 0.02 < difference[60:84].mean()  # forehead kept, mouth redrawn
    assert torch.equal(out, sample(0)) and not torch.equal(out, sample(1))
    pasted, mask = run(comfy, "LmdiffPasteBack", images=frames, crops=out, crop_info=info, mask="face", feather=4.0)
    assert pasted.shape == frames.shape and torch.equal(pasted[mask == 0], frames[mask == 0])


def test_l2v_sampler_one_shot_animates_a_portrait(comfy, media):
    portrait = extract(comfy, media.landmarker, media.portrait)
    talking, _ = a2l_landmarks(comfy, media)
    moving = run(comfy, "LmdiffAddHeadMotion", landmarks=talking, yaw=4.0, pitch=3.0, roll=2.0, time_scale=1.2,
                 seed=0)[0]  # fmt: skip
    crop, info = run(comfy, "LmdiffFaceCrop", images=media.portrait, landmarks=portrait, size=64, scale=3.2,
                     smoothing=0.0)  # fmt: skip
    out = run(comfy, "LmdiffL2VSampler", l2v_model=media.l2v, crops=crop, crop_info=info, landmarks=moving,
              identity=crop, mode="one_shot", steps=1, sampler="dpm++", guidance=1.0, seed=0)[0]  # fmt: skip
    n = expected_frames(media.speech, 25.0)
    assert out.shape == (n, 64, 64, 3)
    frames, mask = run(comfy, "LmdiffPasteBack", images=media.portrait, crops=out, crop_info=info, mask="crop",
                       feather=2.0)  # fmt: skip
    assert frames.shape == (n, 256, 256, 3) and mask.shape == (n, 256, 256)
    assert torch.equal(frames[mask == 0], media.portrait.expand(n, -1, -1, -1)[mask == 0])


@pytest.mark.parametrize("source", ["portrait", "video"])
def test_talking_head_node(comfy, media, source):
    images = media.portrait if source == "portrait" else media.video
    frames, audio, fps = run(comfy, "LmdiffTalkingHead", a2l_model=media.a2l, l2v_model=media.l2v,
                             landmarker=media.landmarker, audio=media.speech, images=images, fps=25.0, steps=1,
                             sampler="ddim", guidance=1.0, seed=0)  # fmt: skip
    n = expected_frames(media.speech, 25.0)
    assert frames.shape == (n, 256, 256, 3) and audio is media.speech and fps == 25.0
    if source == "video":  # dubbing keeps the (looped) video above the face
        looped = media.video[np.arange(n) % media.video.shape[0]]
        assert (frames[:, :40] - looped[:, :40]).abs().mean() < 0.02


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_give_one_clear_message_and_the_next_call_runs(comfy, media):
    from lmdiff_core.detectors import dlib_model_path

    landmarker_folder = comfy.base / "models" / "lmdiff" / "landmarker"
    a2l_folder = comfy.base / "models" / "lmdiff" / "a2l"
    dat = landmarker_folder / "shape_predictor_68_face_landmarks.dat"  # a dlib model, offered to MediaPipe
    not_a2l = a2l_folder / "an_l2v_checkpoint"  # an L2V checkpoint where an A2L one belongs
    silent = {"waveform": torch.zeros(1, 1, 0), "sample_rate": 16000}
    blank = torch.full((4, 128, 128, 3), 0.5)

    def a2l(audio):
        return run(comfy, "LmdiffAudioToLandmarks", a2l_model=media.a2l, audio=audio, fps=25.0, steps=1,
                   guidance=1.5, seed=0, reference_image=media.portrait, landmarker=media.landmarker)  # fmt: skip

    def talking_head(audio, images):
        return run(comfy, "LmdiffTalkingHead", a2l_model=media.a2l, l2v_model=media.l2v, landmarker=media.landmarker,
                   audio=audio, images=images, fps=25.0, steps=1, sampler="ddim", guidance=1.0, seed=0)  # fmt: skip

    def fit(audio):
        return run(comfy, "LmdiffFitLength", landmarks=media.video_landmarks, mode="loop", frame_count=1, audio=audio)

    def load_a2l(name):
        return run(comfy, "LmdiffLoadA2LModel", model=name, precision="fp32", device="cpu")

    def load_l2v(autoencoder):
        return run(comfy, "LmdiffLoadL2VModel", model="tiny_l2v", autoencoder=autoencoder, precision="fp32",
                   device="cpu")  # fmt: skip

    cases = [  # (failing call, words one of which the message holds, the call that must work afterwards)
        (lambda: a2l(silent), ("empty",), lambda: a2l(media.speech)),
        (lambda: talking_head(silent, media.portrait), ("empty",), lambda: talking_head(media.speech, media.portrait)),
        (lambda: fit(silent), ("empty",), lambda: fit(media.speech)),
        (
            lambda: extract(comfy, media.landmarker, blank),
            ("no face",),
            lambda: extract(comfy, media.landmarker, media.video),
        ),
        (
            lambda: talking_head(media.speech, blank[:1]),
            ("no face",),
            lambda: talking_head(media.speech, media.portrait),
        ),
        (lambda: talking_head(media.speech, blank), ("no face",), lambda: talking_head(media.speech, media.video[:6])),
        (
            lambda: run(comfy, "LmdiffLoadLandmarker", backend="mediapipe", model=dat.name),
            ("mediapipe",),
            lambda: run(comfy, "LmdiffLoadLandmarker", backend="dlib", model=dat.name),
        ),
        (
            lambda: run(comfy, "LmdiffLoadLandmarker", backend="dlib", model="face_landmarker.task"),
            ("dlib could not load",),
            lambda: run(comfy, "LmdiffLoadLandmarker", backend="mediapipe", model="face_landmarker.task"),
        ),
        (lambda: load_l2v("taesd_decoder.safetensors"), ("does not match",), lambda: load_l2v("pixel")),
        (lambda: load_a2l(not_a2l.name), ("not an lmdiff checkpoint",), lambda: load_a2l("tiny_a2l")),
        (lambda: load_a2l("../a2l/tiny_a2l"), ("refused",), lambda: load_a2l("tiny_a2l")),
    ]
    try:
        os.symlink(dlib_model_path(), dat)
        os.symlink(comfy.base / "models" / "lmdiff" / "l2v" / "tiny_l2v", not_a2l)
        for index, (failing, words, working) in enumerate(cases):
            with pytest.raises(ValueError) as error:
                failing()
            message = str(error.value)
            assert "\n" not in message and any(word in message.lower() for word in words), (index, message)
            assert working() is not None, index
    finally:
        dat.unlink(missing_ok=True)
        not_a2l.unlink(missing_ok=True)


def test_talking_head_node_fast_mode_dubs_the_video(comfy, media):
    frames, _, _ = run(comfy, "LmdiffTalkingHead", a2l_model=media.a2l, l2v_model=media.l2v,
                       landmarker=media.landmarker, audio=media.speech, images=media.video, fps=25.0, steps=1,
                       sampler="ddim", guidance=1.0, seed=0, mode="fast")  # fmt: skip
    n = expected_frames(media.speech, 25.0)
    looped = media.video[np.arange(n) % media.video.shape[0]]
    assert frames.shape == (n, 256, 256, 3)
    assert (frames[:, :40] - looped[:, :40]).abs().max() < 1 / 255 + 1e-6  # above the face: the video's own pixels
    assert (frames - looped).abs().amax(dim=(1, 2, 3)).min() > 0.05  # every frame's mouth was redone


def test_appearance_bank_reference_node_warps_the_best_match(comfy, media):
    fast = comfy.core("pipelines.fast")
    bank_module = comfy.core("appearance_bank")
    refs = run(comfy, "LmdiffAppearanceBankReference", bank_images=media.video, bank_landmarks=media.video_landmarks,
               target_landmarks=media.video_landmarks, crop_size=128, blend=1)[0]  # fmt: skip
    assert refs.shape == (25, 128, 128, 3)
    frames = (media.video.numpy() * 255).round().astype(np.uint8)
    bank = bank_module.AppearanceBank.build(frames, media.video_landmarks, 128)
    expected = torch.cat(list(fast.warped_references(bank, media.video_landmarks, 1))).permute(0, 2, 3, 1)
    torch.testing.assert_close(refs, expected)
    # each frame's own lips are in the bank: its best match is itself (or a frame with the same lips and pose)
    retrieval = fast.retrieve_for(bank, media.video_landmarks, 1)
    assert (retrieval.best_cost < 1e-6).all()


def test_media_nodes_refuse_partial_media_unless_allowed(comfy, media):
    """A truncated faststart mp4 in the input folder: an error naming the file and the last frame that decoded,
    unless allow_partial, which keeps exactly the frames PyAV decodes (and audio of their length)."""
    folder = comfy.base / "input" / "partial"
    folder.mkdir(exist_ok=True)
    path, decodable = truncated_mp4(folder)
    name = "lmdiff_truncated.mp4"
    (comfy.base / "input" / name).unlink(missing_ok=True)
    path.rename(comfy.base / "input" / name)
    try:
        assert name in comfy.pack.NODE_CLASS_MAPPINGS["LmdiffLoadVideo"].INPUT_TYPES()["required"]["video"][0]
        with pytest.raises(ValueError, match=rf"{name} stops decoding after frame {decodable - 1} ") as error:
            run(comfy, "LmdiffLoadVideo", video=name, fps=25.0, allow_partial=False)
        assert type(error.value).__name__ == "LmdiffInputError" and "\n" not in str(error.value)
        with pytest.raises(ValueError, match=rf"audio .*{name} stops decoding at"):
            run(comfy, "LmdiffLoadAudio", audio=name, allow_partial=False)
        frames, audio, fps = run(comfy, "LmdiffLoadVideo", video=name, fps=25.0, allow_partial=True)
        assert frames.shape[0] == decodable and fps == 25.0
        assert audio["waveform"].shape[-1] == decodable * 640 and audio["sample_rate"] == 16000
        (partial,) = run(comfy, "LmdiffLoadAudio", audio=name, allow_partial=True)
        assert 0 < partial["waveform"].shape[-1] < 3 * 16000
    finally:
        (comfy.base / "input" / name).unlink(missing_ok=True)
    whole, speech, _ = run(comfy, "LmdiffLoadVideo", video=INPUTS["video"], fps=0.0, allow_partial=False)
    clip = comfy.core("media").read_video(comfy.input_path("video"), fps=None)
    assert torch.equal(whole, comfy.core("comfy_io").frames_to_image(clip.frames))
    assert speech["waveform"].shape[-1] == len(clip.frames) * 640
    with pytest.raises(ValueError, match="outside ComfyUI's input folder"):
        run(comfy, "LmdiffLoadAudio", audio="../output/x.wav", allow_partial=False)
