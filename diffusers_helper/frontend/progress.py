"""The progress line people read: the stage, section and step, frames so far, elapsed and estimated time left.

The estimate counts what a section really costs: the measured time per step for the steps still to come, and the
measured decode-and-write time of a finished section for every section still to decode. Until the first section
has been decoded that second part is unknown, so the line says "at least".
"""

import statistics
import time
from collections.abc import Callable

from ..pipeline.events import (
    DECODING,
    SAMPLING,
    Event,
    Failed,
    Finished,
    Notice,
    SectionFinished,
    StageStarted,
    StepProgress,
)
from ..settings import FPS
from .queue import Tick


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}:{seconds:02d}"


class ProgressText:
    def __init__(self, sections: int, steps: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sections, self.steps, self.clock = sections, steps, clock
        self.started = clock()
        self.stage: StageStarted | None = None
        self.stage_since = self.started
        self.last_step: StepProgress | None = None
        self.last_step_at = self.started
        self.steps_done = 0
        self.sampling_seconds = 0.0
        self.section_ends: list[float] = []  # seconds from the start of decoding to the section's MP4 on disk
        self.sampling_since: float | None = None
        self.decoding_since: float | None = None
        self.frames = 0
        self.notices: list[str] = []

    def update(self, event: Event | Tick) -> None:
        now = self.clock()
        if isinstance(event, StageStarted):
            self.stage, self.stage_since = event, now
            if event.stage == SAMPLING:
                self.last_step_at = now
                self.sampling_since = self.sampling_since or now
            elif event.stage == DECODING:
                self.decoding_since = now
        elif isinstance(event, StepProgress):
            self.sampling_seconds += now - self.last_step_at
            self.last_step, self.last_step_at = event, now
            self.steps_done += 1
        elif isinstance(event, SectionFinished):
            self.frames = event.frames
            if self.decoding_since is not None:
                self.section_ends.append(now - self.decoding_since)
                self.decoding_since = None
        elif isinstance(event, Notice):
            self.notices.append(event.message)

    def seconds_left(self) -> tuple[float, bool] | None:
        """(seconds, exact) where exact is False while no section's decoding has been measured; None before the
        first step."""
        if self.steps_done == 0 or self.stage is None:
            return None
        step = self.sampling_seconds / self.steps_done
        finish = statistics.mean(self.section_ends) if self.section_ends else 0.0
        current = self.stage.section
        if self.stage.stage == SAMPLING:
            done = self.last_step.step if self.last_step and self.last_step.section == current else 0
            this_section = (self.steps - done) * step + finish
        else:
            this_section = max(finish - (self.clock() - self.stage_since), 0.0)
        later_sections = (self.sections - current) * (self.steps * step + finish)
        return this_section + later_sections, bool(self.section_ends)

    @property
    def fraction(self) -> float:
        left = self.seconds_left()
        if left is None or self.sampling_since is None:
            return 0.0
        spent = self.clock() - self.sampling_since
        return spent / (spent + left[0]) if spent + left[0] > 0 else 0.0

    def text(self) -> str:
        elapsed = f"elapsed {_clock(self.clock() - self.started)}"
        if self.stage is None or not self.stage.section:
            return f"{self.stage.stage if self.stage else 'starting'} · {elapsed}"
        where = f"section {self.stage.section} of {self.sections}"
        if self.stage.stage == SAMPLING:
            step = self.last_step.step if self.last_step and self.last_step.section == self.stage.section else 0
            doing = f"sampling step {step}/{self.steps}"
        else:
            doing = self.stage.stage
        parts = [where, doing, f"{self.frames} frames so far ({self.frames / FPS:.1f} s)", elapsed, self.left_text()]
        return " · ".join(part for part in parts if part)

    def left_text(self) -> str | None:
        left = self.seconds_left()
        return None if left is None else f"{'about' if left[1] else 'at least'} {_clock(left[0])} left"

    def final(self, event: Finished | Failed) -> str:
        elapsed = _clock(self.clock() - self.started)
        if isinstance(event, Failed):
            return f"failed: {event.message}"
        if event.video is None:
            return f"stopped before the first section finished · elapsed {elapsed}"
        video = f"{event.frames} frames ({event.frames / FPS:.1f} s)"
        if event.stopped:
            return f"stopped after {event.sections_done} of {event.sections} sections: {video} · elapsed {elapsed}"
        return f"done: {video} · elapsed {elapsed}"
