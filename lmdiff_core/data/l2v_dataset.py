"""`L2VFrameDataset`: training items for the L2V model from a prepared dataset (`data.store`), with the conditioning
inputs built by `conditioning` exactly as inference builds them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..conditioning import crop_landmarks, pose_reference, render_condition
from ..errors import LmdiffInputError
from ..landmarks import LandmarkSequence
from ..masks import check_crop_size, mouth_weight_mask
from ..topology import get_topology
from .store import load_index, open_safetensors, read_clip_sequence, split_entries, window_starts

try:  # a Dataset subclass when torch is there (as in data.a2l_dataset)
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # pragma: no cover
    _TorchDataset = object


def _frame_range(frames, n: int, clip_id: str) -> tuple[int, int]:
    """(lo, hi) frames of a clip from `frames`: None (all), (start, stop) ints (frame indices; stop None or past the
    end = the clip's end) or, when either is a float, fractions in [0, 1] of the clip's length (rounded to frames)."""
    if frames is None:
        return 0, n
    if not (isinstance(frames, (tuple, list)) and len(frames) == 2):
        raise LmdiffInputError(f"frames must be a (start, stop) pair, got {frames!r}")
    a, b = frames
    numbers = [v for v in (a, b) if v is not None]
    if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in numbers):
        raise LmdiffInputError(f"frames must be a (start, stop) pair of frame indices or fractions, got {frames!r}")
    if any(isinstance(v, (float, np.floating)) for v in numbers):
        a = 0.0 if a is None else float(a)
        b = 1.0 if b is None else float(b)
        if not (0.0 <= a < b <= 1.0):
            raise LmdiffInputError(f"frames as fractions must satisfy 0 <= start < stop <= 1, got {frames!r}")
        return int(round(a * n)), int(round(b * n))
    a = 0 if a is None else int(a)
    b = n if b is None else int(b)
    if a < 0 or b <= a:
        raise LmdiffInputError(f"frames must satisfy 0 <= start < stop, got {frames!r}")
    if a >= n:
        raise LmdiffInputError(f"frames {frames!r} start past the end of clip {clip_id!r} ({n} frames)")
    return a, min(b, n)


class L2VFrameDataset(_TorchDataset):
    """Training items for the L2V model from a prepared dataset folder (`data.prepare.prepare_dataset`, crop_size > 0).

    dataset_dir: the folder. split: "train", "val" or "all" (None = "all"). clips: optional list of clip ids (each
    must exist and be in the split). frames: optional (start, stop) range used in every clip, as frame indices (stop
    None or past the end = the clip's end) or as fractions of the clip's length (when either is a float: (0.0, 0.7)
    and (0.7, 1.0) split every clip into two disjoint parts); windows and identity frames stay inside it. window: consecutive
    frames per item (> 1 for temporal layers); windows start every `stride` frames (default max(1, window // 2)).
    identity_gap: the identity reference frame lies in the same clip and range, at least this many frames from every
    frame of the window (a detected, not gap-filled frame when there is one), drawn with a generator seeded by
    (seed, epoch, index): the same frame for an item within an epoch, others after `set_epoch`. Windows without any
    such frame are left out. size: side of the returned images (default the stored crop size; crops are resized with
    antialiased bilinear interpolation and landmarks scaled). topology: the landmark topology the condition images
    are drawn in (default the dataset's; "ibug68" for a model driven by A2L output).

    A clip whose range is shorter than a window, or has no window with an identity frame, is an error when it was
    asked for by name (`clips`), else it is left out with a warning (listed in `.skipped`); no item at all is an error.

    An item is a dict: "target" [F, 3, S, S], "condition" [F, 3, S, S] (`render_condition`), "pose_reference"
    [F, 3, S, S] and "pose_mask" [F, 1, S, S] (`pose_reference`), "identity" [3, S, S], "mouth_mask" [F, 1, S, S]
    (`mouth_weight_mask`), all float32 in [0, 1]; "clip" str, "start" int (the window's first frame in the clip) and
    "identity_frame" int. Crops are read from disk per item (only the frames needed); landmarks are kept in memory.
    """

    def __init__(
        self,
        dataset_dir,
        split: str | None = "train",
        clips: Sequence[str] | None = None,
        frames: tuple | None = None,
        window: int = 1,
        identity_gap: int = 25,
        seed: int = 0,
        size: int | None = None,
        stride: int | None = None,
        thickness: float | None = None,
        topology: str | None = None,
    ):
        if isinstance(window, bool) or not (isinstance(window, (int, np.integer)) and window >= 1):
            raise LmdiffInputError(f"window must be a positive number of frames, got {window!r}")
        if isinstance(identity_gap, bool) or not (isinstance(identity_gap, (int, np.integer)) and identity_gap >= 0):
            raise LmdiffInputError(f"identity_gap must be a number of frames >= 0, got {identity_gap!r}")
        if stride is not None and (isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1):
            raise LmdiffInputError(f"stride must be a positive number of frames, got {stride!r}")
        self.dataset_dir = Path(dataset_dir).expanduser()
        self.index = load_index(self.dataset_dir)
        self.window = int(window)
        self.identity_gap = int(identity_gap)
        self.stride = max(1, self.window // 2) if stride is None else int(stride)
        self.seed = int(seed)
        self.epoch = 0
        self.split = "all" if split is None else split
        self.frames = frames
        self.crop_size = int(self.index.get("crop_size") or 0)
        if self.crop_size <= 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} was prepared without crops (crop_size 0); L2V training needs face "
                "crops: prepare it again with a crop size (lmdiff prepare --crop-size 256)"
            )
        self.size = self.crop_size if size is None else check_crop_size(size, "size")
        self.thickness = thickness
        self.topology = self.index.get("topology")
        self.condition_topology = self.topology if topology is None else get_topology(topology).name

        entries = split_entries(self.index, self.split)
        if clips is not None:
            if isinstance(clips, str):
                clips = [clips]
            known = {e["id"]: e for e in self.index["clips"]}
            in_split = {e["id"] for e in entries}
            chosen = []
            for cid in clips:
                if cid not in known:
                    listed = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
                    raise LmdiffInputError(f"dataset {self.dataset_dir} has no clip {cid!r} (its clips: {listed})")
                if cid not in in_split:
                    raise LmdiffInputError(
                        f"clip {cid!r} is in split {known[cid]['split']!r}, not {self.split!r}: "
                        "pass split='all' to use clips of any split"
                    )
                chosen.append(known[cid])
            entries = chosen
        named = clips is not None

        self.clip_ids: list[str] = []
        self.ranges: list[tuple[int, int]] = []
        self.skipped: list[tuple[str, str]] = []  # (clip id, reason)
        self._files: list[Path] = []
        self._seqs: list[LandmarkSequence] = []  # crop-space landmarks of each clip's range, at the stored crop size
        self._detected: list[np.ndarray] = []
        item_clip, item_start = [], []
        for entry in entries:
            cid = entry["id"]
            rel = (entry.get("files") or {}).get("crops")
            if not rel:
                raise LmdiffInputError(
                    f"clip {cid!r} of dataset {self.dataset_dir} has no crops (prepared with crop_size 0)"
                )
            n = int(entry["n_frames"])
            lo, hi = _frame_range(frames, n, cid)
            if hi - lo < self.window:
                reason = f"its frame range {lo}..{hi} ({hi - lo} frames) is shorter than the window of {self.window}"
                if named:
                    raise LmdiffInputError(f"clip {cid!r}: {reason}")
                self.skipped.append((cid, reason))
                continue
            starts = window_starts(hi - lo, self.window, self.stride) + lo
            gap = self.identity_gap
            ok = (starts - gap >= lo) | (starts + self.window - 1 + gap <= hi - 1)
            if not ok.any():
                reason = (
                    f"no frame of its range {lo}..{hi} is {gap} frames from a window of {self.window} "
                    "(lower identity_gap or widen the range)"
                )
                if named:
                    raise LmdiffInputError(f"clip {cid!r}: {reason}")
                self.skipped.append((cid, reason))
                continue
            path = self.dataset_dir / rel
            matrices = self._read(path, "matrices", lo, hi)
            seq = read_clip_sequence(self.dataset_dir, entry, self.index)[lo:hi]
            c = len(self.clip_ids)
            self.clip_ids.append(cid)
            self.ranges.append((lo, hi))
            self._files.append(path)
            self._seqs.append(crop_landmarks(seq, matrices, self.crop_size))
            self._detected.append(seq.valid & ~seq.interpolated)
            item_clip.append(np.full(int(ok.sum()), c, dtype=np.int64))
            item_start.append(starts[ok])
        if self.skipped:
            warnings.warn(
                f"L2VFrameDataset: {len(self.skipped)} clip(s) left out: "
                + "; ".join(f"{c}: {r}" for c, r in self.skipped[:10]),
                stacklevel=2,
            )
        self._clip = np.concatenate(item_clip) if item_clip else np.zeros(0, dtype=np.int64)
        self._start = np.concatenate(item_start) if item_start else np.zeros(0, dtype=np.int64)
        if len(self._clip) == 0:
            raise LmdiffInputError(
                f"dataset {self.dataset_dir} has no window of {self.window} frames with an identity frame "
                f"{self.identity_gap} frames away in split {self.split!r}"
                + (f", frames {frames!r}" if frames is not None else "")
                + f" ({len(entries)} clip(s) considered, {len(self.skipped)} left out)"
            )

    @staticmethod
    def _read(path: Path, name: str, start: int, stop: int) -> np.ndarray:
        with open_safetensors(path) as f:
            return np.asarray(f.get_slice(name)[start:stop])

    def __len__(self) -> int:
        return len(self._clip)

    @property
    def items(self) -> list[tuple[str, int]]:
        """(clip id, start) of every item, in index order."""
        return [(self.clip_ids[c], int(s)) for c, s in zip(self._clip, self._start)]

    def set_epoch(self, epoch: int) -> None:
        """Draw other identity frames from now on (the trainer calls this every epoch; reproducible per epoch)."""
        self.epoch = int(epoch)

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} is out of range for a dataset of {len(self)} items")
        return int(index) % len(self)

    def identity_frame(self, index: int) -> int:
        """The identity reference frame (in the clip) of item `index` for the current epoch."""
        index = self._index(index)
        c, start = int(self._clip[index]), int(self._start[index])
        lo, hi = self.ranges[c]
        frames = np.arange(lo, hi)
        allowed = (frames <= start - self.identity_gap) | (frames >= start + self.window - 1 + self.identity_gap)
        detected = allowed & self._detected[c]
        pool = frames[detected] if detected.any() else frames[allowed]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return int(pool[rng.integers(len(pool))])

    def range_start_crop(self, index: int) -> torch.Tensor:
        """[3, S, S]: the crop of the first frame of item `index`'s clip range (the frozen-lips baseline's source)."""
        c = int(self._clip[self._index(index)])
        lo = self.ranges[c][0]
        return self._images(self._read(self._files[c], "crops", lo, lo + 1))[0]

    def _images(self, crops: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(crops)).float().div_(255.0)
        if self.size != self.crop_size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        return x

    def __getitem__(self, index: int) -> dict:
        index = self._index(index)
        c, start = int(self._clip[index]), int(self._start[index])
        lo = self.ranges[c][0]
        ident = self.identity_frame(index)
        with open_safetensors(self._files[c]) as f:
            part = f.get_slice("crops")
            window = np.asarray(part[start : start + self.window])
            identity = np.asarray(part[ident : ident + 1])
        target = self._images(window)
        seq = self._seqs[c][start - lo : start - lo + self.window]
        s = self.size
        masked, mask = pose_reference(target, seq)
        return {
            "target": target,
            "condition": render_condition(seq.to_topology(self.condition_topology), s, thickness=self.thickness),
            "pose_reference": masked,
            "pose_mask": mask,
            "identity": self._images(identity)[0],
            "mouth_mask": mouth_weight_mask(seq, s),
            "clip": self.clip_ids[c],
            "start": start,
            "identity_frame": ident,
        }
