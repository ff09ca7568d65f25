"""A queue worker on the tiny preset that holds still at a chosen moment, for the tests that kill it there.

    python -m tests.support.queue_worker DB MARKER {mp4,store}
Runs the store's jobs; at the second section's MP4 write (halfway through its frames) or at the second progress
write to the store (its statements run, its transaction not committed), it creates MARKER and sleeps.
"""

import contextlib
import sys
import threading
import time
from pathlib import Path

import numpy as np

from diffusers_helper.jobs.store import JobStore, this_worker
from diffusers_helper.jobs.worker import QueueWorker
from diffusers_helper.media.video import write_mp4
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.settings import ModelSettings

SECOND = 2


def hold(marker: Path) -> None:
    marker.touch()
    time.sleep(600)


def pausing_writer(marker: Path):
    """write_mp4, holding still halfway through the frames of its second video."""
    calls = []

    class Frames(np.ndarray):
        def __iter__(self):
            for index, frame in enumerate(super().__iter__()):
                if index == len(self) // 2:
                    hold(marker)
                yield frame

    def write(frames, path, fps, crf):
        calls.append(path)
        write_mp4(frames.view(Frames) if len(calls) == SECOND else frames, path, fps, crf)

    return write


def pause_progress_writes(marker: Path) -> None:
    """The store's second progress write holds still inside its transaction, before the commit."""
    transaction, progress = JobStore._transaction, JobStore.progress
    writes = []

    @contextlib.contextmanager
    def held(self):
        with transaction(self) as db:
            yield db
            if writes and len(writes) == SECOND and writes[-1] == "open":
                hold(marker)

    def counted(self, *args, **kwargs):
        writes.append("open")
        try:
            return progress(self, *args, **kwargs)
        finally:
            writes[-1] = "closed"

    JobStore._transaction, JobStore.progress = held, counted


def main() -> None:
    database, marker, moment = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", ensure_tiny_models(), plan.dtypes()), plan,
                      ModelSettings(preset="tiny"))  # fmt: skip
    engine = FramePackEngine(models, write_video=pausing_writer(marker) if moment == "mp4" else None)
    if moment == "store":
        pause_progress_writes(marker)
    QueueWorker(engine, JobStore(database), this_worker(), threading.Event(), print).run()


if __name__ == "__main__":
    main()
