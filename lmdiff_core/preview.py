"""Side-by-side landmark previews: the frame with its landmarks drawn on, and the pose-free canonical landmarks."""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np

from .landmarks import LandmarkSequence
from .render import draw_landmarks_on_frames, iter_rendered_frames


def _thickness(height: int) -> float:
    return max(1.0, height / 256)


def landmark_preview(
    frames: Iterable[np.ndarray], seq: LandmarkSequence, canonical: LandmarkSequence | None = None, batch_size: int = 16
) -> Iterator[np.ndarray]:
    """Yield preview frames: each input frame with `seq` drawn over it, next to the render of `canonical` if given.

    The canonical panel is as tall as the frame (square). Frames are consumed and produced in batches.
    """
    height = seq.frame_size[1]
    canonical_frames = (
        iter_rendered_frames(canonical, size=height, thickness=_thickness(height), batch_size=batch_size)
        if canonical is not None
        else None
    )
    batch, start = [], 0

    def flush():
        nonlocal start
        drawn = draw_landmarks_on_frames(np.stack(batch), seq[start : start + len(batch)], thickness=_thickness(height))
        drawn = np.asarray(drawn)
        for frame in drawn:
            yield frame if canonical_frames is None else np.concatenate([frame, next(canonical_frames)], axis=1)
        start += len(batch)
        batch.clear()

    for frame in frames:
        batch.append(frame)
        if len(batch) == batch_size:
            yield from flush()
    if batch:
        yield from flush()
