"""Running the queue: a worker claims the next job from the store, runs it on its loaded engine, keeps the store told
(sections done, the video so far), and ends it in exactly one state.

A job names its input files by path, with each file's SHA-256 taken when it was queued: a file that moved or
changed fails that job with one line instead of making a different video. A cancel asked for while a job runs
stops it after the current step, as End does, keeping its video so far.
"""

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..media.images import load_input_image
from ..media.job_files import JobPaths, file_sha256, settings_from_record
from ..pipeline.events import Event, Failed, Finished, SectionFinished, StepProgress
from ..settings import GenerationSettings, InvalidSettings
from .store import Job, JobState, JobStore

logger = logging.getLogger(__name__)


def job_record(settings: GenerationSettings, image: Path | None) -> dict:
    """What the store keeps of a job: its settings in a sidecar's form, its start image, and the SHA-256 of every
    file it reads (InvalidSettings for one that cannot be read)."""
    recorded = {name: value for name, value in settings.to_dict().items() if name != "loras"}
    files = [path for path in (image, settings.end_image, settings.extend) if path is not None]
    files += [lora.path for lora in settings.loras]
    hashes = {}
    for path in files:
        try:
            hashes[str(Path(path).resolve())] = file_sha256(path)
        except OSError as error:
            raise InvalidSettings(f"cannot read {path}: {error.strerror or error}") from error
    return {
        "settings": {name: str(value) if isinstance(value, Path) else value for name, value in recorded.items()},
        "input_image": None if image is None else str(Path(image).resolve()),
        "loras": [{"path": str(Path(lora.path).resolve()), "scale": lora.scale} for lora in settings.loras],
        "inputs": hashes,
    }


def changed_inputs(record: dict) -> str | None:
    """Why a queued job's input files are not the ones it was queued with, in one line; None when they are."""
    for path, digest in record.get("inputs", {}).items():
        try:
            now = file_sha256(path)
        except OSError:
            return f"{path} is gone since the job was queued"
        if now != digest:
            return f"{path} changed since the job was queued"
    return None


class QueueWorker:
    """One process's worker: its engine, the store, and `stop` (set by Ctrl-C/SIGTERM) for the job it runs."""

    def __init__(self, engine, store: JobStore, worker: str, stop: threading.Event, say: Callable[[str], None]):
        self.engine, self.store, self.worker, self.stop, self.say = engine, store, worker, stop, say
        self._running: tuple[int, threading.Event] | None = None  # the job being run, and its cancel event

    def cancel_running(self, job_id: int) -> bool:
        """Stop the job after its current step if it is the one running here (a cancel asked for in the store
        reaches it at its next step anyway); whether it was."""
        running = self._running
        if running is None or running[0] != job_id:
            return False
        running[1].set()
        return True

    def events(self, job: Job, image, settings: GenerationSettings, paths: JobPaths, stop) -> Iterator[Event]:
        """The engine's events for one job; a front end adds its own part (loading other models, live progress)."""
        return self.engine.generate(image, settings, paths, stop)

    def run(self, watch: bool = False, poll_seconds: float = 2.0) -> list[JobState]:
        """Jobs until the queue is empty (or, with `watch`, until stopped); the states they ended in."""
        for job_id in self.store.recover():
            self.say(f"job {job_id} was running when its worker stopped: now stopped (`jobs.py retry {job_id}`)")
        ended = []
        while not self.stop.is_set():
            job = self.store.claim(self.worker)
            if job is None:
                if not watch:
                    break
                self.stop.wait(poll_seconds)
                continue
            ended.append(self.run_job(job))
        return ended

    def run_job(self, job: Job) -> JobState:
        """One claimed job to its end; the state it ended in."""
        self.say(f"job {job.id}: {job.settings['settings'].get('prompt', '')[:60]!r}")
        try:
            settings, image_path = settings_from_record(job.settings, f"job {job.id}")
            problem = changed_inputs(job.settings)
            if problem:
                raise InvalidSettings(problem)
            image = None if image_path is None else load_input_image(Path(image_path))
        except InvalidSettings as error:
            return self._end(job, JobState.FAILED, error=str(error))
        cancelled = threading.Event()
        stop = _EitherEvent(self.stop, cancelled)
        output = job.settings.get("output")
        paths = JobPaths.for_video(Path(output)) if output else JobPaths.new_job(job.outputs)
        self._running = (job.id, cancelled)
        try:
            return self._follow(job, self.events(job, image, settings, paths, stop), cancelled)
        finally:
            self._running = None

    def _follow(self, job: Job, events: Iterator[Event], cancelled: threading.Event) -> JobState:
        for event in events:
            if isinstance(event, StepProgress) and not cancelled.is_set() and self.store.get(job.id).cancel_requested:
                cancelled.set()
            elif isinstance(event, SectionFinished):
                self.store.progress(job.id, event.section, event.sections, event.video)
            elif isinstance(event, Failed):
                return self._end(job, JobState.FAILED, error=event.message)
            elif isinstance(event, Finished):
                state = JobState.DONE if not event.stopped else JobState.CANCELLED if cancelled.is_set() else (
                    JobState.STOPPED)  # fmt: skip
                return self._end(job, state, event.video)
        return self._end(job, JobState.FAILED, error="the job ended without a result")

    def _end(self, job: Job, state: JobState, video: Path | None = None, error: str | None = None) -> JobState:
        self.store.finish(job.id, state, video, error)
        self.say(f"job {job.id} {state.value}" + (f": {video}" if video else "") + (f": {error}" if error else ""))
        return state


class _EitherEvent:
    """Set when either event is: what a job's `stop` is, for Ctrl-C and a cancel alike."""

    def __init__(self, first: threading.Event, second: threading.Event) -> None:
        self._events = (first, second)

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)
