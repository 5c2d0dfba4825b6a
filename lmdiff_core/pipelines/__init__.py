"""Pipelines: the loops that run lmdiff's models over whole clips."""

from .a2l import AudioToLandmarksPipeline

__all__ = ["AudioToLandmarksPipeline"]
