import time

import numpy as np

from diffusers_helper.frontend.progress import ProgressText
from diffusers_helper.frontend.worker import Tick, events_with_ticks
from diffusers_helper.pipeline.events import Finished, SectionFinished, StepProgress


def slow_events():
    yield StepProgress(1, 2, 1, 2, np.zeros((1, 1, 3), np.uint8))
    time.sleep(0.35)  # e.g. an engine compiling
    yield SectionFinished(1, 2, None, 33)


def test_events_pass_through_in_order_with_ticks_while_the_engine_is_busy():
    received = list(events_with_ticks(slow_events(), interval=0.1))
    kinds = [type(item).__name__ for item in received]
    assert kinds[0] == "StepProgress" and kinds[-1] == "SectionFinished"
    assert kinds.count("Tick") >= 2 and set(kinds[1:-1]) == {"Tick"}


def test_progress_text_counts_steps_frames_and_time_left():
    progress = ProgressText(sections=2, steps=4)
    assert progress.text().startswith("preparing")
    progress.update(StepProgress(1, 2, 4, 4, np.zeros((1, 1, 3), np.uint8)))
    progress.update(SectionFinished(1, 2, None, 33))
    progress.update(Tick())
    assert progress.fraction == 0.5
    line = progress.text()
    assert line.startswith("section 1 of 2 · step 4/4 · 33 frames so far (1.1 s) · elapsed 0:00")
    assert "left" in line
    assert progress.final(Finished(None, 0, 0, 2, stopped=True)).startswith("stopped before the first section")
    assert "stopped after 1 of 2 sections" in progress.final(Finished("x.mp4", 33, 1, 2, stopped=True))
