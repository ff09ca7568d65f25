"""Running jobs for an interactive front end: one at a time, on a worker thread, with ticks while the engine is
busy (so a page can show a compile's elapsed time).

A front end's consumer can go away in the middle of a job (a cancelled request, a closed page). The job is then
told to stop at its next step, and the next job waits until that worker has finished before it starts, so two
jobs never share an engine.
"""

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..pipeline.events import WAITING, Event, Failed, StageStarted

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tick:
    """Nothing new from the engine for a while; a chance to refresh status displays."""


class JobRunner:
    """One job at a time on a worker thread; one runner per process (per engine)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def run(self, job: Callable[[], Iterator[Event]], stop: threading.Event) -> Iterator[Event | Tick]:
        """The job's events (and ticks). If the consumer stops iterating early, the job's `stop` is set."""
        inbox: queue.Queue = queue.Queue()
        done = object()

        def pump() -> None:
            try:
                for event in job():
                    inbox.put(event)
            except Exception as error:  # the engine reports its own failures; this is everything around it
                logger.debug("job failed", exc_info=True)
                inbox.put(Failed(f"{type(error).__name__}: {error}"))
            finally:
                inbox.put(done)

        thread = threading.Thread(target=pump, daemon=True, name="framepack-job")
        while not self._start(thread):
            yield StageStarted(WAITING)
            self.join(self.interval)
        finished = False
        try:
            while True:
                try:
                    item = inbox.get(timeout=self.interval)
                except queue.Empty:
                    yield Tick()
                    continue
                if item is done:
                    finished = True
                    return
                yield item
        finally:
            if not finished:  # the consumer left: the job stops at its next step; the next job waits for it
                stop.set()

    def _start(self, thread: threading.Thread) -> bool:
        with self._guard:
            if self._thread is not None and self._thread.is_alive():
                return False
            self._thread = thread
            thread.start()
            return True

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running job's worker; True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()
