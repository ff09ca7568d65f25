"""The progress line people read: section, step, frames so far, elapsed and estimated time left."""

import time

from ..pipeline.events import Event, Failed, Finished, SectionFinished, StepProgress
from ..settings import FPS
from .worker import Tick


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class ProgressText:
    """The line under the progress bar: section, step, frames so far, elapsed and estimated time left."""

    def __init__(self, sections: int, steps: int) -> None:
        self.sections, self.steps = sections, steps
        self.started = time.perf_counter()
        self.frames = 0
        self.last: StepProgress | None = None

    def update(self, event: Event | Tick) -> None:
        if isinstance(event, StepProgress):
            self.last = event
        elif isinstance(event, SectionFinished):
            self.frames = event.frames

    @property
    def fraction(self) -> float:
        if self.last is None:
            return 0.0
        return ((self.last.section - 1) * self.steps + self.last.step) / (self.sections * self.steps)

    def text(self) -> str:
        elapsed = time.perf_counter() - self.started
        if self.last is None:
            return f"preparing (encoding the prompt and image) · elapsed {_clock(elapsed)}"
        left = elapsed / self.fraction * (1 - self.fraction)
        return (
            f"section {self.last.section} of {self.sections} · step {self.last.step}/{self.steps} · "
            f"{self.frames} frames so far ({self.frames / FPS:.1f} s) · elapsed {_clock(elapsed)} · "
            f"about {_clock(left)} left"
        )

    def final(self, event: Finished | Failed) -> str:
        elapsed = _clock(time.perf_counter() - self.started)
        if isinstance(event, Failed):
            return f"failed: {event.message}"
        if event.video is None:
            return f"stopped before the first section finished · elapsed {elapsed}"
        stopped = f" (stopped after {event.sections_done} of {event.sections} sections)" if event.stopped else ""
        return f"done: {event.frames} frames ({event.frames / FPS:.1f} s){stopped} · elapsed {elapsed}"
