"""The app's side of the job store: the worker thread that runs the store's jobs in the app's process, the live events
of those jobs for the pages that follow them, copies of uploaded inputs kept with their jobs, and the queue's view.

A page puts its job into the store and follows it: where this process runs it, through its live events (previews,
steps); where another worker process does, or while it waits, through its row in the store. The queue outlives the
page and the process: a page that closes leaves its job to run, and after a restart the worker takes up what is
still queued.
"""

import hashlib
import logging
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..jobs.store import FINISHED, Job, JobState, JobStore, this_worker
from ..jobs.worker import QueueWorker
from ..media.atomic_files import replacing
from ..media.job_files import JobPaths, file_sha256
from ..pipeline.events import Event, Failed
from ..settings import GenerationSettings

logger = logging.getLogger(__name__)

THUMBNAIL_PIXELS = 192
INPUTS_FOLDER = "job_inputs"  # in the outputs folder: uploads kept with their jobs, and the queue's thumbnails


@dataclass(frozen=True)
class Tick:
    """Nothing new from the engine for a while; a chance to refresh status displays."""


@dataclass(frozen=True)
class JobOver:
    """The worker is done with a job (its last event, if it had any, came before)."""

    state: JobState


class LiveJobs:
    """The events of the jobs this process runs, for the pages that queued them. A page's feed exists from the moment
    its job is in the store, so no event is lost to a worker that claims the job at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: dict[int, queue.Queue] = {}

    def add(self, add_job: Callable[[], int]) -> tuple[int, queue.Queue]:
        """Queue a job (`add_job` puts it in the store and returns its id) and open its feed."""
        with self._lock:
            job_id = add_job()
            feed = self._feeds[job_id] = queue.Queue()
        return job_id, feed

    def publish(self, job_id: int, item: Event | JobOver) -> None:
        with self._lock:
            feed = self._feeds.get(job_id)
        if feed is not None:
            feed.put(item)

    def over(self, job_id: int, state: JobState) -> None:
        with self._lock:
            feed = self._feeds.pop(job_id, None)
        if feed is not None:
            feed.put(JobOver(state))


def follow(
    feed: queue.Queue, job_row: Callable[[], Job], here: str, interval: float = 1.0
) -> Iterator[Event | Tick | Job]:
    """A queued job as its page sees it: its live events while this process (worker `here`) runs it, ticks while
    nothing new comes, and otherwise its store row every `interval` (where it waits, how far another worker has got);
    ends after its last event, or when the store says it is over."""
    while True:
        try:
            item = feed.get(timeout=interval)
        except queue.Empty:
            job = job_row()
            yield Tick() if job.state is JobState.RUNNING and job.worker == here else job
            if job.state in FINISHED:
                return
            continue
        if isinstance(item, JobOver):
            return
        yield item


class AppWorker(QueueWorker):
    """The app's queue worker: a thread of its own that claims the store's jobs, runs each on the app's engine
    (loading the models it asks for), and hands every event to the page following that job."""

    def __init__(self, app, store_path: Path, live: LiveJobs, poll_seconds: float = 0.2) -> None:
        super().__init__(None, None, this_worker(), threading.Event(), logger.info)
        self.app, self.store_path, self.live, self.poll_seconds = app, store_path, live, poll_seconds
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="framepack-queue")
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end; True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _serve(self) -> None:
        self.store = JobStore(self.store_path)  # a connection of this thread's own
        try:
            self.run(watch=True, poll_seconds=self.poll_seconds)
        finally:
            self.store.close()

    def events(self, job: Job, image, settings: GenerationSettings, paths: JobPaths, stop) -> Iterator[Event]:
        preserve = job.settings.get("models", {}).get("gpu_memory_preservation")
        models = self.app.models_for(
            settings, self.app.models.gpu_memory_preservation if preserve is None else preserve
        )
        for event in self.app.job(image, settings, models, paths, stop):
            self.live.publish(job.id, event)
            yield event

    def run_job(self, job: Job) -> JobState:
        try:
            state = super().run_job(job)
        except Exception as error:  # this job's failure, said in the store and on its page; the queue goes on
            logger.warning("job %s failed", job.id, exc_info=True)
            message = f"{type(error).__name__}: {error}"
            self.live.publish(job.id, Failed(message))
            state = self._end(job, JobState.FAILED, error=message)
        self.live.over(job.id, state)
        return state


def kept_input(path: Path, folder: Path) -> Path:
    """A copy of an uploaded input in `folder`, named by its content, for a job that waits longer than the upload
    lives (a browser's upload is a temporary file)."""
    path = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / f"{file_sha256(path)[:16]}_{path.name}"
    if not copy.is_file():
        with replacing(copy) as temporary:  # a copy cut off midway is never taken for a whole one
            shutil.copyfile(path, temporary)
    return copy


def thumbnail(job: Job, folder: Path) -> Path:
    """A small picture of the job's start image in `folder` (made once), or a plain one where it has none."""
    source = job.settings.get("input_image")
    folder.mkdir(parents=True, exist_ok=True)
    if source:
        target = folder / f"thumb-{hashlib.sha256(source.encode()).hexdigest()[:20]}.jpg"
        if target.is_file():
            return target
        try:
            with Image.open(source) as image:
                image.convert("RGB").resize(_fitted(image.size)).save(target, quality=85)
            return target
        except (OSError, UnidentifiedImageError):
            pass  # gone or unreadable: the job itself will say so when it runs
    plain = folder / "thumb-none.png"
    if not plain.is_file():
        Image.new("RGB", (THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), (64, 64, 64)).save(plain)
    return plain


def _fitted(size: tuple[int, int]) -> tuple[int, int]:
    scale = THUMBNAIL_PIXELS / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def caption(job: Job, ahead: int | None = None) -> str:
    """One line for a job in the queue or the history."""
    prompt = job.settings.get("settings", {}).get("prompt", "")
    prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
    if job.state is JobState.QUEUED:
        where = "next" if not ahead else f"{ahead} ahead"
        return f"#{job.id} · queued ({where}) · {prompt}"
    if job.state is JobState.RUNNING:
        total = f"{job.sections_done}/{job.sections_total} sections" if job.sections_total else "starting"
        return f"#{job.id} · running, {total} · {prompt}"
    return f"#{job.id} · {job.state.value} · {prompt}"
