"""What a running job reports: the engine yields these, the CLI and the UI render them."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StepProgress:
    section: int  # 1-based, in generation order
    sections: int
    step: int  # 1-based
    steps: int
    preview: np.ndarray  # uint8 (h, frames * w, 3): the current denoised estimate at latent resolution


@dataclass(frozen=True)
class SectionFinished:
    section: int
    sections: int
    video: Path  # the MP4 so far, complete and playable
    frames: int


@dataclass(frozen=True)
class Finished:
    video: Path | None  # None when stopped before the first section finished
    frames: int
    sections_done: int
    sections: int
    stopped: bool


@dataclass(frozen=True)
class Failed:
    message: str


Event = StepProgress | SectionFinished | Finished | Failed
