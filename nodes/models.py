"""Model folders of the pack: ComfyUI/models/lmdiff/{a2l,l2v,landmarker}, plus the standard vae and vae_approx.

The folders are registered with ComfyUI's folder_paths when the pack loads (extra_model_paths.yaml entries under the
same names are kept) and listed filtered by file type. A checkpoint is a folder holding its marker file
(`lmdiff_a2l.json` or `lmdiff_l2v.json`); the bundled checkpoints are offered after the folder's. A model name from a
widget resolves only inside these folders: an absolute path or a name with `..` is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..lmdiff_core.checkpoints import BUNDLED_A2L, BUNDLED_A2L_DIFFUSION, BUNDLED_L2V, BUNDLED_REFINER
from ..lmdiff_core.detectors import DETECTORS
from ..lmdiff_core.errors import LmdiffInputError
from .runtime import comfy_module

A2L, L2V, LANDMARKER = "lmdiff_a2l", "lmdiff_l2v", "lmdiff_landmarker"
SUBFOLDERS = {A2L: "a2l", L2V: "l2v", LANDMARKER: "landmarker"}
EXTENSIONS = {A2L: {".json"}, L2V: {".json"}, LANDMARKER: {".task", ".dat", ".onnx"}}
MARKERS = {A2L: "lmdiff_a2l.json", L2V: "lmdiff_l2v.json"}  # the pipelines' CHECKPOINT_INFO files
BUNDLED = "bundled"
# The checkpoints shipped with the pack, by the name the loaders offer (when the model folder holds none).
BUNDLED_PATHS = {
    A2L: {BUNDLED: BUNDLED_A2L, "bundled-diffusion": BUNDLED_A2L_DIFFUSION},
    L2V: {BUNDLED: BUNDLED_L2V, "bundled-refiner": BUNDLED_REFINER},  # the refiner: quality mode of Talking Head
}
AUTOENCODER_FOLDERS = ("vae", "vae_approx")
AUTO, PIXEL, DEFAULT = "auto", "pixel", "default"
LANDMARKER_BACKENDS = (AUTO, *DETECTORS)
BACKEND_OF_SUFFIX = {".task": "mediapipe", ".dat": "dlib", ".onnx": "insightface"}


def _folder_paths():
    return comfy_module("folder_paths")


def register_model_folders() -> None:
    """Add models/lmdiff/{a2l,l2v,landmarker} to ComfyUI's folder_paths, each listing only its file types."""
    folder_paths = _folder_paths()
    if folder_paths is None:
        return
    for key, sub in SUBFOLDERS.items():
        default = os.path.join(folder_paths.models_dir, "lmdiff", sub)
        paths = list(folder_paths.folder_names_and_paths.get(key, ([], set()))[0])
        if default not in paths:
            paths.append(default)
        folder_paths.folder_names_and_paths[key] = (paths, set(EXTENSIONS[key]))


def model_folders(key: str) -> list[Path]:
    """The folders registered under `key` (none outside ComfyUI)."""
    folder_paths = _folder_paths()
    if folder_paths is None or key not in folder_paths.folder_names_and_paths:
        return []
    return [Path(p) for p in folder_paths.get_folder_paths(key)]


def _listed(key: str) -> list[str]:
    folder_paths = _folder_paths()
    if folder_paths is None or key not in folder_paths.folder_names_and_paths:
        return []
    return [Path(name).as_posix() for name in folder_paths.get_filename_list(key)]


def bundled_checkpoint(key: str, name: str = BUNDLED) -> Path | None:
    """The checkpoint shipped with the pack under `name` (checkpoints/a2l, a2l_diffusion, l2v), if it is there."""
    path = BUNDLED_PATHS[key].get(name)
    return path if path is not None and (path / MARKERS[key]).is_file() else None


def checkpoint_names(key: str) -> list[str]:
    """Checkpoint folders (relative names) in the `key` folders, then the installed bundled checkpoints (always
    offered, so the example workflows keep working once the user adds models)."""
    marker = MARKERS[key]
    bundled = [name for name in BUNDLED_PATHS[key] if bundled_checkpoint(key, name) is not None]
    found = {str(PurePosixPath(f).parent) for f in _listed(key) if PurePosixPath(f).name == marker} - {"."}
    return sorted(found - set(bundled)) + bundled


def landmarker_names() -> list[str]:
    """Load Landmarker's choices: "default" and the model files in models/lmdiff/landmarker."""
    return [DEFAULT, *_listed(LANDMARKER)]


def autoencoder_names() -> list[str]:
    """Load L2V Model's autoencoder choices: "auto", "pixel" and the files in models/vae and models/vae_approx."""
    return [AUTO, PIXEL, *sorted({name for key in AUTOENCODER_FOLDERS for name in _listed(key)})]


def check_model_name(name) -> str:
    """`name` if it is a plain relative name; absolute paths and names with `..` are refused."""
    if not isinstance(name, str) or not name.strip():
        raise LmdiffInputError(f"a model name must be a non-empty text, got {name!r}")
    posix = PurePosixPath(name.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(name).drive or ".." in posix.parts or name.startswith("~"):
        raise LmdiffInputError(
            f"model name {name!r} is refused: choose a model from the list (names inside the model folders; "
            "absolute paths and '..' are not allowed)"
        )
    return name


def find_model(keys: tuple[str, ...], name: str) -> Path:
    """The file or folder `name` inside the folders registered under `keys`."""
    check_model_name(name)
    folders = [folder for key in keys for folder in model_folders(key)]
    for folder in folders:
        candidate = folder / name
        if candidate.exists():
            return candidate
    where = ", ".join(str(f) for f in folders) or "no model folder (folder_paths is only there inside ComfyUI)"
    raise LmdiffInputError(f"model {name!r} was not found in {where}")


def checkpoint_path(key: str, name: str) -> Path:
    """The checkpoint folder of a widget's checkpoint name (or the bundled one)."""
    if name in BUNDLED_PATHS[key]:
        path = bundled_checkpoint(key, name)
        if path is None:
            raise LmdiffInputError(
                f"the bundled checkpoint is not installed (expected {BUNDLED_PATHS[key][name]}): put a checkpoint "
                f"folder in models/lmdiff/{SUBFOLDERS[key]}"
            )
        return path
    path = find_model((key,), name)
    if not (path / MARKERS[key]).is_file():
        raise LmdiffInputError(
            f"{name!r} in models/lmdiff/{SUBFOLDERS[key]} is not an lmdiff checkpoint: expected a folder with "
            f"{MARKERS[key]}"
        )
    return path


def autoencoder_source(name: str, trained_on: str) -> str | Path:
    """What `load_autoencoder` takes for a widget's autoencoder name; "auto" suits a model trained in pixel space."""
    if name == AUTO:
        if trained_on != PIXEL:
            raise LmdiffInputError(
                f"this L2V model works on {trained_on} latents: choose that autoencoder (models/vae or vae_approx)"
            )
        return PIXEL
    if name == PIXEL:
        return PIXEL
    path = find_model(AUTOENCODER_FOLDERS, name)
    return path.parent if (path.parent / "config.json").is_file() else path  # a file of a diffusers folder


@dataclass(frozen=True)
class LandmarkerChoice:
    """What Load Landmarker outputs: a backend and its model, opened afresh by every node that detects faces."""

    backend: str
    model_path: Path | None = None
    options: tuple[tuple[str, str], ...] = ()  # keyword arguments of the backend's landmarker

    def open(self, video: bool):
        """A new `Landmarker` (VIDEO mode tracks faces across frames; use it for one sequence only)."""
        from ..lmdiff_core.detectors import InsightFaceLandmarker, load_landmarker

        if self.backend == "insightface":
            return InsightFaceLandmarker(self.model_path, **dict(self.options))
        return load_landmarker(self.backend, self.model_path, video=video)


def landmarker_choice(backend: str, name: str) -> LandmarkerChoice:
    """Resolve a Load Landmarker widget pair; "default" is the MediaPipe .task in the landmarker folder (or
    $LMDIFF_MEDIAPIPE_MODEL), dlib's predictor from its PyPI package, or the insightface buffalo_l pack in the folder.
    "auto" is MediaPipe when its model is there, else dlib; with a named file, the backend its type belongs to."""
    from ..lmdiff_core.detectors import find_mediapipe_model

    if backend not in LANDMARKER_BACKENDS:
        raise LmdiffInputError(f"unknown landmark detector {backend!r}, expected one of {LANDMARKER_BACKENDS}")
    if backend == AUTO:
        if name != DEFAULT:
            backend = BACKEND_OF_SUFFIX.get(PurePosixPath(name).suffix.lower(), "")
            if backend not in DETECTORS:
                raise LmdiffInputError(f"{name!r} is not a landmarker model: expected a .task, .dat or .onnx file")
        else:
            try:
                return LandmarkerChoice("mediapipe", find_mediapipe_model(None, search_dirs=model_folders(LANDMARKER)))
            except LmdiffInputError:
                return LandmarkerChoice("dlib")
    if name != DEFAULT:
        path = find_model((LANDMARKER,), name)
        if backend == "insightface":  # <root>/models/<pack>/*.onnx
            if path.parent.parent.name != "models":
                raise LmdiffInputError(f"insightface needs a model pack folder: {name!r} is not in models/<pack>/")
            return LandmarkerChoice(backend, path.parents[2], (("name", path.parent.name),))
        return LandmarkerChoice(backend, path)
    if backend == "mediapipe":
        try:
            return LandmarkerChoice(backend, find_mediapipe_model(None, search_dirs=model_folders(LANDMARKER)))
        except LmdiffInputError:
            raise LmdiffInputError(
                "no MediaPipe face landmarker model: put MediaPipe's face_landmarker.task in "
                "models/lmdiff/landmarker or set LMDIFF_MEDIAPIPE_MODEL, or choose the auto or dlib backend"
            ) from None
    if backend == "insightface":
        roots = [f for f in model_folders(LANDMARKER) if (f / "models" / "buffalo_l").is_dir()]
        if not roots:
            raise LmdiffInputError("insightface needs the buffalo_l pack in models/lmdiff/landmarker/models/buffalo_l")
        return LandmarkerChoice(backend, roots[0])
    return LandmarkerChoice(backend)
