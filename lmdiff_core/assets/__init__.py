"""Data files of lmdiff_core (the canonical mean face, the MediaPipe -> iBUG 68 map)."""

import sys
from importlib import resources
from importlib.abc import Traversable


def asset(name: str) -> Traversable:
    """A file of this folder, found through this module itself: ComfyUI imports the pack under a name derived from
    its path, so `lmdiff_core.assets` may not be importable by that name."""
    return resources.files(sys.modules[__name__]).joinpath(name)
