"""Test set-up: offline hub settings and the one way tests reach the real media and weights in ../shared."""

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ logging

SHARED = Path(os.environ.get("LMDIFF_SHARED", Path(__file__).resolve().parents[2] / "shared"))
MEDIAPIPE_TASK = "weights/mediapipe_face_landmarker/face_landmarker_v2_with_blendshapes.task"


def shared_path(relative: str) -> Path:
    """A file or folder under ../shared; skips the calling test with the reason when ../shared is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"real test media not available: {SHARED} is absent (set LMDIFF_SHARED to its location)")
    path = SHARED / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the shared test media")
    return path


def random_arcface_onnx(path, seed=0):
    """A randomly initialised stand-in for an ArcFace .onnx (no real weights can be obtained here): conv 8x8/8 ->
    flatten -> linear to 64 features, input [N, 3, 112, 112] like insightface's recognition models."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = numpy_helper.from_array(rng.normal(0, 0.1, (4, 3, 8, 8)).astype(np.float32), "conv_w")
    fc = numpy_helper.from_array(rng.normal(0, 0.05, (4 * 14 * 14, 64)).astype(np.float32), "fc_w")
    nodes = [
        helper.make_node("Conv", ["input.1", "conv_w"], ["c"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "fc_w"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "random_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 64])],
        initializer=[conv, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def truncated_mp4(folder: Path, seconds: int = 3) -> tuple[Path, int]:
    """(path, frames that decode): the first `seconds` of a real clip (25 fps, with its audio) written as a faststart
    mp4 (index first, as phones and web encoders write them), then cut after a quarter of its bytes, as an
    interrupted download or copy leaves it. The index still declares `seconds`; the frames are counted with PyAV."""
    import av

    from lmdiff_core.media import read_video, write_video

    video = read_video(shared_path("data/clips/edtalk_woman_en.mp4"))
    whole = write_video(folder / "whole.mp4", video.frames[: 25 * seconds], 25, audio=video.audio[: seconds * 16000])
    data = whole.read_bytes()
    path = folder / "truncated.mp4"
    path.write_bytes(data[: len(data) // 4])
    whole.unlink()
    decodable = 0
    with av.open(str(path)) as container:
        try:
            for _ in container.decode(video=0):
                decodable += 1
        except av.InvalidDataError:  # the packet cut in the middle
            pass
    assert 0 < decodable < 25 * seconds
    return path, decodable


@pytest.fixture(scope="session")
def mediapipe_model() -> Path:
    return shared_path(MEDIAPIPE_TASK)


@pytest.fixture(scope="session")
def clips_dir() -> Path:
    return shared_path("data/clips")


@pytest.fixture(scope="session")
def images_dir() -> Path:
    return shared_path("data/images")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow (minutes of training on all dev clips) run only with LMDIFF_SLOW=1."""
    if os.environ.get("LMDIFF_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: minutes of CPU training; run with LMDIFF_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
