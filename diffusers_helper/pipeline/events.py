"""What a running job reports: the engine yields these, the CLI and the UI render them."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOADING = "loading models"
READING_VIDEO = "reading the video to extend"
ENCODING = "encoding the prompt and image"
APPLYING_LORAS = "applying LoRAs"
SAMPLING = "sampling"
DECODING = "decoding"
WRITING = "writing the MP4"


@dataclass(frozen=True)
class StageStarted:
    """A new phase of the job; `section` (1-based) for the phases that belong to one section, else 0."""

    stage: str  # one of the constants above
    section: int = 0
    sections: int = 0


@dataclass(frozen=True)
class StepProgress:
    section: int  # 1-based, in generation order
    sections: int
    step: int  # 1-based
    steps: int
    preview: np.ndarray  # uint8 RGB: the current denoised estimate's frames in a grid, scaled up to be seen


@dataclass(frozen=True)
class SectionFinished:
    section: int
    sections: int
    video: Path  # the MP4 so far, complete and playable
    frames: int


@dataclass(frozen=True)
class Notice:
    """Something the user should know that does not stop the job (said once per job)."""

    message: str


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
    bad_input: bool = False  # the job's own settings are at fault (a bad LoRA file, ...), found before it started


Event = StageStarted | StepProgress | SectionFinished | Notice | Finished | Failed
