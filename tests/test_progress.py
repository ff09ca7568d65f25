"""The progress line, driven by a fake clock: stages, steps, frames, and an estimate that counts decoding."""

import numpy as np
import pytest

from diffusers_helper.frontend.progress import ProgressText
from diffusers_helper.frontend.queue import Tick
from diffusers_helper.pipeline.events import (
    DECODING,
    ENCODING,
    LOADING,
    SAMPLING,
    WRITING,
    Failed,
    Finished,
    Notice,
    SectionFinished,
    StageStarted,
    StepProgress,
)

PREVIEW = np.zeros((1, 1, 3), np.uint8)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(section: int, index: int) -> StepProgress:
    return StepProgress(section, 3, index, 4, PREVIEW)


def test_each_stage_has_its_own_words():
    clock = Clock()
    progress = ProgressText(sections=3, steps=4, clock=clock)
    assert progress.text() == "starting · elapsed 0:00"
    progress.update(StageStarted(LOADING))
    assert progress.text().startswith("loading models · elapsed")
    progress.update(StageStarted(ENCODING))
    assert progress.text().startswith("encoding the prompt and image")
    progress.update(StageStarted(SAMPLING, 1, 3))
    progress.update(step(1, 1))
    assert progress.text().startswith("section 1 of 3 · sampling step 1/4 · 0 frames so far (0.0 s)")
    progress.update(StageStarted(DECODING, 1, 3))
    assert progress.text().startswith("section 1 of 3 · decoding ·")
    progress.update(StageStarted(WRITING, 1, 3))
    assert progress.text().startswith("section 1 of 3 · writing the MP4 ·")


def test_the_estimate_counts_decoding_once_it_has_been_measured():
    clock = Clock()
    progress = ProgressText(sections=3, steps=4, clock=clock)
    progress.update(StageStarted(SAMPLING, 1, 3))
    for index in range(1, 5):  # 2 s a step
        clock.now += 2
        progress.update(step(1, index))
    # no decode measured yet: 2 more sections of 4 steps at 2 s, and a lower bound
    assert progress.seconds_left() == (16.0, False)
    assert "at least 0:16 left" in progress.text()
    progress.update(StageStarted(DECODING, 1, 3))
    clock.now += 6  # decoding and writing the first section take 6 s
    progress.update(StageStarted(WRITING, 1, 3))
    progress.update(SectionFinished(1, 3, "x.mp4", 33))
    progress.update(StageStarted(SAMPLING, 2, 3))
    clock.now += 2
    progress.update(step(2, 1))
    # this section: 3 steps + its decode (6 + 6 s); the last: 4 steps + decode (8 + 6 s)
    assert progress.seconds_left() == (26.0, True)
    assert "section 2 of 3 · sampling step 1/4 · 33 frames so far (1.1 s)" in progress.text()
    assert "about 0:26 left" in progress.text()
    for index in range(2, 5):
        clock.now += 2
        progress.update(step(2, index))
    progress.update(StageStarted(DECODING, 2, 3))
    clock.now += 4
    progress.update(Tick())
    assert progress.seconds_left() == (2.0 + 14.0, True)  # 2 s of this decode left, then the last section
    assert 0 < progress.fraction < 1


def test_final_words_for_done_stopped_and_failed():
    progress = ProgressText(sections=2, steps=4, clock=Clock())
    progress.update(Notice("the prompt is 300 tokens long"))
    assert progress.notices == ["the prompt is 300 tokens long"]
    assert progress.final(Finished("x.mp4", 73, 2, 2, stopped=False)).startswith("done: 73 frames (2.4 s)")
    stopped = progress.final(Finished("x.mp4", 33, 1, 2, stopped=True))
    assert stopped.startswith("stopped after 1 of 2 sections: 33 frames") and "done" not in stopped
    assert progress.final(Finished(None, 0, 0, 2, stopped=True)).startswith("stopped before the first section")
    assert progress.final(Failed("out of GPU memory")) == "failed: out of GPU memory"


@pytest.mark.parametrize("event", [Tick(), Notice("x")])
def test_events_without_progress_change_nothing(event):
    progress = ProgressText(sections=1, steps=1, clock=Clock())
    progress.update(event)
    assert progress.seconds_left() is None and progress.fraction == 0.0
