"""A video writer for the engine that keeps the frames in memory instead of encoding an MP4."""

from pathlib import Path

import numpy as np


class FrameSink:
    """Keeps the frames of every call (the engine rewrites the video after each section)."""

    def __init__(self) -> None:
        self.calls: list[np.ndarray] = []

    def __call__(self, frames: np.ndarray, path: Path, fps: int, crf: int) -> None:
        self.calls.append(frames.copy())

    @property
    def last(self) -> np.ndarray:
        return self.calls[-1]
