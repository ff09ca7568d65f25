"""Running a job for an interactive front end: events from a worker thread, ticks while the engine is busy
(so a page can show a compile's elapsed time), and the progress line people read."""

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .events import Event, Failed, Finished, SectionFinished, StepProgress
from .settings import FPS


@dataclass(frozen=True)
class Tick:
    """Nothing new from the engine for a while; a chance to refresh status displays."""


def events_with_ticks(events: Iterator[Event], interval: float = 1.0) -> Iterator[Event | Tick]:
    """Consume `events` on a worker thread and pass them on, with a Tick whenever `interval` passes quietly."""
    inbox: queue.Queue = queue.Queue()
    done = object()

    def pump() -> None:
        try:
            for event in events:
                inbox.put(event)
        finally:
            inbox.put(done)

    threading.Thread(target=pump, daemon=True, name="framepack-job").start()
    while True:
        try:
            item = inbox.get(timeout=interval)
        except queue.Empty:
            yield Tick()
            continue
        if item is done:
            return
        yield item


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
