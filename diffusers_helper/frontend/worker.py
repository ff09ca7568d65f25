"""Running a job for an interactive front end: events from a worker thread, with ticks while the engine is busy
(so a page can show a compile's elapsed time)."""

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from ..pipeline.events import Event


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
