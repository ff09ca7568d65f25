import time

import numpy as np

from diffusers_helper.frontend.worker import events_with_ticks
from diffusers_helper.pipeline.events import SectionFinished, StepProgress


def slow_events():
    yield StepProgress(1, 2, 1, 2, np.zeros((1, 1, 3), np.uint8))
    time.sleep(0.35)  # e.g. an engine compiling
    yield SectionFinished(1, 2, None, 33)


def test_events_pass_through_in_order_with_ticks_while_the_engine_is_busy():
    received = list(events_with_ticks(slow_events(), interval=0.1))
    kinds = [type(item).__name__ for item in received]
    assert kinds[0] == "StepProgress" and kinds[-1] == "SectionFinished"
    assert kinds.count("Tick") >= 2 and set(kinds[1:-1]) == {"Tick"}
