"""The job runner with real threads: events pass through with ticks, a consumer that leaves stops its job, and the
next job waits until the previous worker is done, so two jobs never share an engine. The jobs move on only when the
test lets them (no sleeps to race)."""

import threading

import numpy as np

from diffusers_helper.frontend.worker import JobRunner, Tick
from diffusers_helper.pipeline.events import WAITING, Failed, SectionFinished, StageStarted, StepProgress

PREVIEW = np.zeros((1, 1, 3), np.uint8)
STEPS = 200


def test_events_pass_through_in_order_with_ticks_while_the_engine_is_busy():
    busy_done = threading.Event()

    def job():
        yield StepProgress(1, 2, 1, 2, PREVIEW)
        busy_done.wait()  # e.g. an engine compiling, for as long as the consumer keeps seeing ticks
        yield SectionFinished(1, 2, None, 33)

    received = []
    for item in JobRunner(interval=0.01).run(job, threading.Event()):
        received.append(item)
        if sum(isinstance(seen, Tick) for seen in received) == 3:
            busy_done.set()
    kinds = [type(item).__name__ for item in received]
    assert kinds[0] == "StepProgress" and kinds[-1] == "SectionFinished"
    assert kinds.count("Tick") >= 3 and set(kinds[1:-1]) == {"Tick"}


class Engine:
    """Counts jobs running at once; each job takes a step only when the test grants one (or 200 were granted), and
    ends when its stop event is set."""

    def __init__(self) -> None:
        self.active = self.most_active = self.steps = 0
        self.lock = threading.Lock()
        self.granted = threading.Semaphore(0)

    def job(self, stop: threading.Event):
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            for step in range(STEPS):
                self.granted.acquire()
                if stop.is_set():
                    return
                self.steps += 1
                yield StepProgress(1, 1, step + 1, STEPS, PREVIEW)
        finally:
            with self.lock:
                self.active -= 1

    def grant(self, steps: int = 1) -> None:
        self.granted.release(steps)


def test_a_consumer_that_leaves_stops_its_job_and_the_next_job_waits_for_it():
    runner, engine = JobRunner(interval=0.01), Engine()
    first_stop, second_stop = threading.Event(), threading.Event()
    first = runner.run(lambda: engine.job(first_stop), first_stop)
    engine.grant()
    for event in first:
        if isinstance(event, StepProgress):
            if event.step == 3:
                break
            engine.grant()
    first.close()  # as Gradio closes a cancelled request's generator
    assert first_stop.is_set()
    engine.grant(STEPS + 1)  # the first job's next step sees its stop; the rest are the second job's
    second = list(runner.run(lambda: engine.job(second_stop), second_stop))
    assert engine.most_active == 1
    assert engine.steps == 3 + STEPS  # the first job stopped where its consumer left
    assert isinstance(second[-1], StepProgress) and second[-1].step == STEPS
    assert not second_stop.is_set()  # a job that ran to its end leaves its event alone


def test_a_second_consumer_sees_that_it_waits():
    runner, engine = JobRunner(interval=0.01), Engine()
    stops = threading.Event(), threading.Event()
    first = runner.run(lambda: engine.job(stops[0]), stops[0])
    engine.grant()
    assert isinstance(next(first), StepProgress)  # the first job runs, and holds at its next step
    waiting = runner.run(lambda: engine.job(stops[1]), stops[1])
    assert next(waiting) == StageStarted(WAITING)
    stops[0].set()
    engine.grant()  # the first job's next step sees its stop
    list(first)
    engine.grant(STEPS)
    assert any(isinstance(event, StepProgress) for event in waiting)
    assert engine.most_active == 1


def test_an_error_around_the_engine_becomes_a_failed_event():
    def broken():
        yield Tick()
        raise RuntimeError("could not load the other variant")

    events = list(JobRunner(interval=0.05).run(broken, threading.Event()))
    assert events[-1] == Failed("RuntimeError: could not load the other variant")
