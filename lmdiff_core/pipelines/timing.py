"""Wall time per pipeline stage, for benchmarks: `pipeline.timer = StageTimer()`, run, read `timer.seconds`."""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch


class StageTimer:
    """Seconds per named stage, summed over calls. CUDA is synchronised at both ends of a stage, so GPU work is
    counted in the stage that queued it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str):
        _sync()
        started = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[stage] += time.perf_counter() - started


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def stage(timer: StageTimer | None, name: str):
    """`timer(name)`, or a no-op context when no timer is set."""
    return nullcontext() if timer is None else timer(name)
