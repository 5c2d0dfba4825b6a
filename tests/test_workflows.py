"""The example workflows: UI format in example_workflows/, API format in example_workflows/api/, executed on real media.

The API graphs run in `comfy_harness.run_api_workflow` (validation, then topological execution) with the pack's
nodes and stand-ins for the core and third-party nodes (LoadImage, LoadAudio, LoadVideo, GetVideoComponents,
CreateVideo, SaveVideo, VideoHelperSuite, comfyui_controlnet_aux's Save Pose Keypoints). The test stands in tiny
checkpoints for the bundled ones and samples with 2 steps.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from .comfy_harness import (
    FRONTEND_ONLY_NODES,
    INPUTS,
    SPEECH_SECONDS,
    comfy_environment,
    input_specs,
    is_link,
    is_widget,
    run_api_workflow,
    ui_to_api,
    widget_names,
)

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
NAMES = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
TINY = {"LmdiffLoadA2LModel": "tiny_a2l", "LmdiffLoadL2VModel": "tiny_l2v"}
SAVERS = {"SaveVideo", "VHS_VideoCombine", "SavePoseKpsAsJsonFile"}
PREVIEWS = {"LoadImage", "LoadVideo", "VHS_LoadVideo", "SaveVideo", "VHS_VideoCombine"}  # the frontend draws one below
PREVIEW_HEIGHT, TITLE_HEIGHT = 300, 30  # a 256 px preview in a 320 px wide node; the title bar sits above `pos`


@pytest.fixture(scope="module")
def comfy():
    from .comfy_harness import one_torch_thread

    env = comfy_environment()
    with env.installed(), one_torch_thread():
        yield env


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_workflows_cover_the_four_uses():
    uses = {name: {node["class_type"] for node in load(WORKFLOWS / "api" / f"{name}.json").values()} for name in NAMES}
    assert len(uses) == 4
    assert any({"LoadImage", "LmdiffTalkingHead", "SaveVideo"} <= nodes for nodes in uses.values())  # portrait
    assert any(
        {"VHS_LoadVideo", "LmdiffL2VSampler", "LmdiffPasteBack", "VHS_VideoCombine"} <= nodes for nodes in uses.values()
    )
    assert any({"LmdiffRenderLandmarks", "LmdiffLandmarksToPoseKeypoint"} <= nodes for nodes in uses.values())
    assert any({"LmdiffTransferPose", "LmdiffMouthGain", "LmdiffAddBlinks"} <= nodes for nodes in uses.values())


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_and_api_twin_describe_the_same_graph(comfy, name):
    ui = load(WORKFLOWS / f"{name}.json")
    assert {"last_node_id", "last_link_id", "nodes", "links", "version"} <= ui.keys()
    assert ui_to_api(ui, comfy.classes()) == load(WORKFLOWS / "api" / f"{name}.json")
    for link in ui["links"]:  # [id, from node, from slot, to node, to slot, type]: both ends agree
        source = next(node for node in ui["nodes"] if node["id"] == link[1])
        target = next(node for node in ui["nodes"] if node["id"] == link[3])
        assert link[0] in source["outputs"][link[2]]["links"] and target["inputs"][link[4]]["link"] == link[0]


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_has_the_current_widgets_a_thumbnail_and_no_overlap(comfy, name):
    from itertools import combinations

    from PIL import Image

    ui, classes, boxes = load(WORKFLOWS / f"{name}.json"), comfy.classes(), []
    for node in ui["nodes"]:
        if node["type"] not in FRONTEND_ONLY_NODES:
            cls, values = classes[node["type"]], node["widgets_values"]
            if isinstance(values, dict):  # VideoHelperSuite: by name
                linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
                required = cls.INPUT_TYPES()["required"]
                assert {n for n, (kind, _) in input_specs(cls).items() if is_widget(kind) and n in required} - linked <= (
                    set(values)
                ), node["type"]
            else:
                assert len(values) == len(widget_names(cls)), node["type"]
        (x, y), (w, h) = node["pos"], node["size"]
        boxes.append((node["type"], x, y - TITLE_HEIGHT, x + w, y + h + PREVIEW_HEIGHT * (node["type"] in PREVIEWS)))
    for a, b in combinations(boxes, 2):
        assert a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2], (a, b)
    with Image.open(WORKFLOWS / f"{name}.jpg") as thumbnail:  # the template browser's card
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 128


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_inputs_outputs_and_models(name):
    graph = load(WORKFLOWS / "api" / f"{name}.json")
    files = [
        v
        for node in graph.values()
        for k, v in node["inputs"].items()
        if k in ("image", "audio", "video", "file") and isinstance(v, str)
    ]
    assert files and set(files) <= set(INPUTS.values())
    savers = [node for node in graph.values() if node["class_type"] in SAVERS]
    assert savers and all(node["inputs"]["filename_prefix"] == "lmdiff" for node in savers)
    assert all(node["inputs"]["model"] == "bundled" for node in graph.values() if node["class_type"] in TINY)


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_and_gives_one_frame_per_frame_period_of_audio(comfy, name):
    from lmdiff_core.media import read_video

    graph = load(WORKFLOWS / "api" / f"{name}.json")
    for node in graph.values():
        if node["class_type"] in TINY:
            node["inputs"]["model"] = TINY[node["class_type"]]
        if "steps" in node["inputs"]:
            node["inputs"]["steps"] = 2
    output = Path(comfy.folder_paths.get_output_directory())
    before = set(output.iterdir())
    outputs, _ = run_api_workflow(graph, comfy.classes())
    written = sorted(set(output.iterdir()) - before)

    n = math.ceil(round(SPEECH_SECONDS * 25, 9))
    for node_id, node in graph.items():
        if node["class_type"].startswith("Lmdiff"):
            for value in outputs[node_id]:
                if hasattr(value, "shape") and value.ndim == 4:  # an IMAGE
                    assert value.shape[-1] == 3 and 0.0 <= value.min() and value.max() <= 1.0
    saved_images = [
        outputs[node["inputs"]["images"][0]][node["inputs"]["images"][1]]
        for node in graph.values()
        if node["class_type"] in ("CreateVideo", "VHS_VideoCombine") and is_link(node["inputs"]["images"])
    ]
    assert saved_images and all(images.shape == (n, 256, 256, 3) for images in saved_images)

    videos = [path for path in written if path.suffix == ".mp4"]
    assert len(videos) == 1 and videos[0].name.startswith("lmdiff_")
    video = read_video(videos[0], fps=None)
    assert video.frames.shape == (n, 256, 256, 3) and video.fps == 25.0
    assert abs(len(video.audio) / 16000 - SPEECH_SECONDS) < 0.1
    for path in (p for p in written if p.suffix == ".json"):
        keypoints = json.loads(path.read_text())
        assert path.name.startswith("lmdiff_") and len(keypoints) == n
        face = np.array(keypoints[0]["people"][0]["face_keypoints_2d"]).reshape(-1, 3)
        assert face.shape == (70, 3) and keypoints[0]["canvas_width"] == 256
