"""`A2LWindowDataset`: fixed-length windows of a prepared dataset (`data.store`) for the A2L trainer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import LmdiffInputError
from .store import load_index, read_a2l_file, split_entries, window_starts

try:  # a Dataset subclass when torch is there (it is a dependency; the guard keeps the readers importable alone)
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


class A2LWindowDataset(_TorchDataset):
    """Fixed-length windows of a prepared dataset for the A2L trainer.

    Loads the `.a2l.safetensors` of the clips in `split` ("train", "val" or "all"; never the crops), converts the
    canonical points to `topology` (None keeps the stored one) and to model units (`canonical.to_model_units`). Windows
    start at 0, stride, 2 * stride, ... (stride default window // 2) while a whole window fits; clips shorter than one
    window are left out and listed in `.skipped` (with a warning). A sample is a dict of torch tensors:

    - ``audio`` [W, k, L, D] float32: features of the window's frames;
    - ``landmarks`` [W, N, 3] float32: the target;
    - ``prev`` [P, N, 3] and ``prev_mask`` [P] bool: the P frames before the window; before the clip's start the first
      frame is repeated with mask False;
    - ``reference`` [N, 3]: the clip's first detected frame ("first"), or a random detected frame of the clip outside
      the window when it has one ("random"; seeded by (seed, epoch, index): the same frame for an index within an
      epoch, another one each epoch, see `set_epoch`);
    - ``detected`` [W] bool: frames with a detected (not gap-filled) face, for masking the loss;
    - ``clip_id`` str and ``start`` int.
    """

    def __init__(
        self,
        dataset_dir,
        split: str | None = "train",
        window: int = 32,
        prev_frames: int = 8,
        topology: str | None = "ibug68",
        reference: str = "first",
        seed: int = 0,
        stride: int | None = None,
    ):
        from ..canonical import to_model_units
        from ..topology import convert_points, get_topology

        if reference not in ("first", "random"):
            raise LmdiffInputError(f"reference must be 'first' or 'random', got {reference!r}")
        if not (isinstance(window, (int, np.integer)) and window >= 1):
            raise LmdiffInputError(f"window must be a positive number of frames, got {window!r}")
        if not (isinstance(prev_frames, (int, np.integer)) and prev_frames >= 0):
            raise LmdiffInputError(f"prev_frames must be zero or a positive number of frames, got {prev_frames!r}")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.index = load_index(self.dataset_dir)
        self.window = int(window)
        self.prev_frames = int(prev_frames)
        self.stride = max(1, self.window // 2) if stride is None else int(stride)
        if self.stride < 1:
            raise LmdiffInputError(f"stride must be at least 1, got {stride!r}")
        self.reference = reference
        self.seed = int(seed)
        self.epoch = 0
        stored = self.index.get("topology")
        self.topology = stored if topology is None else get_topology(topology).name
        self.fps = float(self.index["fps"])
        self.split = split
        self.clip_ids: list[str] = []
        self.skipped: list[tuple[str, int]] = []  # (clip id, n_frames) of clips shorter than a window
        self._points: list[np.ndarray] = []
        self._features: list[np.ndarray] = []
        self._detected: list[np.ndarray] = []
        clip_index, starts = [], []
        entries = split_entries(self.index, split)
        for entry in entries:
            if entry["n_frames"] < self.window:
                self.skipped.append((entry["id"], int(entry["n_frames"])))
                continue
            arrays, meta = read_a2l_file(
                self.dataset_dir / entry["files"]["a2l"], ("points", "features", "interpolated", "valid")
            )
            source_topology = meta.get("topology", stored)
            points = to_model_units(convert_points(arrays["points"], source_topology, self.topology))
            c = len(self.clip_ids)
            self.clip_ids.append(entry["id"])
            self._points.append(np.ascontiguousarray(points, dtype=np.float32))
            self._features.append(np.ascontiguousarray(arrays["features"], dtype=np.float32))
            self._detected.append(arrays["valid"] & ~arrays["interpolated"])
            s = window_starts(len(points), self.window, self.stride)
            clip_index.append(np.full(len(s), c, dtype=np.int64))
            starts.append(s)
        if self.skipped:
            warnings.warn(
                f"A2LWindowDataset: {len(self.skipped)} clip(s) of split {split!r} are shorter than the window of "
                f"{self.window} frames and are left out: " + ", ".join(f"{c} ({n})" for c, n in self.skipped[:10]),
                stacklevel=2,
            )
        self._clip = np.concatenate(clip_index) if clip_index else np.zeros(0, dtype=np.int64)
        self._start = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        if len(self._clip) == 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} has no window of {self.window} frames in split {split!r} "
                f"({len(entries)} clip(s) in the split, {len(self.skipped)} shorter than the window)"
            )

    def __len__(self) -> int:
        return len(self._clip)

    @property
    def windows(self) -> list[tuple[str, int]]:
        """(clip id, start) of every window, in index order."""
        return [(self.clip_ids[c], int(s)) for c, s in zip(self._clip, self._start)]

    def _reference_frame(self, c: int, start: int, index: int) -> int:
        detected = np.flatnonzero(self._detected[c])
        if len(detected) == 0:
            detected = np.arange(len(self._points[c]))
        if self.reference == "first":
            return int(detected[0])
        outside = detected[(detected < start) | (detected >= start + self.window)]
        pool = outside if len(outside) else detected
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(pool[rng.integers(len(pool))])

    def set_epoch(self, epoch: int) -> None:
        """Draw other random references from now on (the trainer calls this every epoch; reproducible per epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        import torch

        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} is out of range for a dataset of {len(self)} windows")
        index = int(index) % len(self)
        c, start = int(self._clip[index]), int(self._start[index])
        points = self._points[c]
        end = start + self.window
        prev_idx = np.arange(start - self.prev_frames, start)
        prev_mask = prev_idx >= 0
        prev = points[np.maximum(prev_idx, 0)]
        ref = self._reference_frame(c, start, index)
        return {
            "audio": torch.from_numpy(self._features[c][start:end].copy()),
            "landmarks": torch.from_numpy(points[start:end].copy()),
            "prev": torch.from_numpy(prev.copy()),
            "prev_mask": torch.from_numpy(prev_mask),
            "reference": torch.from_numpy(points[ref].copy()),
            "detected": torch.from_numpy(self._detected[c][start:end].copy()),
            "clip_id": self.clip_ids[c],
            "start": start,
        }


