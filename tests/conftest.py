"""Test set-up: offline hub settings and the one way tests reach the real media and weights in ../shared."""

import os
from pathlib import Path

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
