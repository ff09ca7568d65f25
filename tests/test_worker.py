"""The job runner with real threads: events pass through with ticks, a consumer that leaves stops its job, and the
next job waits until the previous worker is done, so two jobs never share an engine."""

import threading
import time

import numpy as np

from diffusers_helper.frontend.worker import JobRunner, Tick
from diffusers_helper.pipeline.events import WAITING, Failed, SectionFinished, StageStarted, StepProgress

PREVIEW = np.zeros((1, 1, 3), np.uint8)


def slow_events():
    yield StepProgress(1, 2, 1, 2, PREVIEW)
    time.sleep(0.35)  # e.g. an engine compiling
    yield SectionFinished(1, 2, None, 33)


def test_events_pass_through_in_order_with_ticks_while_the_engine_is_busy():
    received = list(JobRunner(interval=0.1).run(slow_events, threading.Event()))
    kinds = [type(item).__name__ for item in received]
    assert kinds[0] == "StepProgress" and kinds[-1] == "SectionFinished"
    assert kinds.count("Tick") >= 2 and set(kinds[1:-1]) == {"Tick"}


class Engine:
    """Counts jobs running at once; each job runs steps until its stop event is set (or 200 steps)."""

    def __init__(self) -> None:
        self.active = self.most_active = self.steps = 0
        self.lock = threading.Lock()

    def job(self, stop: threading.Event):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            for step in range(200):
                if stop.is_set():
                    return
                self.steps += 1
                time.sleep(0.01)
                yield StepProgress(1, 1, step + 1, 200, PREVIEW)
        finally:
            with self.lock:
                self.active -= 1


def test_a_consumer_that_leaves_stops_its_job_and_the_next_job_waits_for_it():
    runner, engine = JobRunner(interval=0.05), Engine()
    first_stop, second_stop = threading.Event(), threading.Event()
    first = runner.run(lambda: engine.job(first_stop), first_stop)
    for event in first:
        if isinstance(event, StepProgress) and event.step == 3:
            break
    first.close()  # as Gradio closes a cancelled request's generator
    assert first_stop.is_set()
    second = list(runner.run(lambda: engine.job(second_stop), second_stop))
    assert engine.most_active == 1
    assert engine.steps < 200 + 200  # the first job stopped early
    assert isinstance(second[-1], StepProgress) and second[-1].step == 200
    assert not second_stop.is_set()  # a job that ran to its end leaves its event alone


def test_a_second_consumer_sees_that_it_waits():
    runner, engine = JobRunner(interval=0.02), Engine()
    stops = threading.Event(), threading.Event()
    first = runner.run(lambda: engine.job(stops[0]), stops[0])
    next(first)
    waiting = runner.run(lambda: engine.job(stops[1]), stops[1])
    assert next(waiting) == StageStarted(WAITING)
    stops[0].set()
    list(first)
    assert any(isinstance(event, StepProgress) for event in waiting)
    assert engine.most_active == 1


def test_an_error_around_the_engine_becomes_a_failed_event():
    def broken():
        yield Tick()
        raise RuntimeError("could not load the other variant")

    events = list(JobRunner(interval=0.05).run(broken, threading.Event()))
    assert events[-1] == Failed("RuntimeError: could not load the other variant")
