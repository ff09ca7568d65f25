"""When a TensorRT engine serves: only where it runs at least MIN_TENSORRT_SPEEDUP times as fast as PyTorch does.

An engine that only ties costs its build, its loads (minutes at full size) and its checks for nothing. So, unless
every engine that matches PyTorch is wanted (`--tensorrt-always`), each new engine is timed once against how PyTorch
runs that component (`versus`: eager, or the compiled blocks), on the inputs of its check, and the measurement is
remembered (speed_records). A later process trusts the record: an engine that lost is not even loaded, and for a
shape with no engine in the cache, an engine of the same component built for another shape (same code, settings, GPU
and versions) that lost means none is built.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ..settings import MIN_TENSORRT_SPEEDUP
from .measure import median_seconds
from .speed_records import SpeedRecord, SpeedRecords

logger = logging.getLogger(__name__)

TIMED_RUNS = 3  # calls timed, each way
# What an engine's speed depends on besides its input shapes: engines of one component that share these run alike.
SAME_ENGINE = ("component", "code", "settings", "gpu", "compute_capability", "versions")


def speed_key(ingredients: dict, versus: str) -> dict:
    """What an engine's speed is remembered by: its cache key's ingredients but the weights (which do not change the
    speed), and how PyTorch ran."""
    return {"candidate": "tensorrt", "versus": versus, "inputs": ingredients.get("inputs"),
            **{name: ingredients.get(name) for name in SAME_ENGINE}}  # fmt: skip


@dataclass(frozen=True)
class SlowerThanPyTorch:
    """Why a signature runs in PyTorch: its engine (or, `other_shape`, one for another shape) measured too slow."""

    speedup: float
    versus: str
    other_shape: bool = False

    def reason(self) -> str:
        which = "an engine of it for another input shape" if self.other_shape else "its engine"
        kept = "so none is built for this one" if self.other_shape else "measured once, kept in the engine cache"
        return (f"{which} measured {self.speedup:.2f}x the speed of PyTorch ({self.versus}) on this GPU, under the "
                f"{MIN_TENSORRT_SPEEDUP:.2f}x it must reach; {kept}")  # fmt: skip


class EngineSpeedPolicy:
    def __init__(self, records: SpeedRecords, only_if_faster: bool) -> None:
        self.records = records
        self.only_if_faster = only_if_faster

    def known_slower(self, ingredients: dict, versus: str, engine_cached: bool) -> SlowerThanPyTorch | None:
        """What the records say before anything is loaded or built: this shape's engine lost, or (no engine of this
        shape in the cache, none measured) the component's engines lose here at other shapes."""
        if not self.only_if_faster:
            return None
        measured = self.records.lookup(speed_key(ingredients, versus))
        if measured is not None:
            return SlowerThanPyTorch(measured.speedup, versus) if measured.speedup < MIN_TENSORRT_SPEEDUP else None
        if engine_cached:
            return None
        same = {name: value for name, value in speed_key(ingredients, versus).items() if name != "inputs"}
        elsewhere = self.records.matching(same)
        if elsewhere and elsewhere[-1][1].speedup < MIN_TENSORRT_SPEEDUP:
            return SlowerThanPyTorch(elsewhere[-1][1].speedup, versus, other_shape=True)
        return None

    def needs_timing(self, ingredients: dict, versus: str) -> bool:
        """Whether a new engine of this signature must be timed: nothing is known of its speed yet."""
        return self.only_if_faster and self.records.lookup(speed_key(ingredients, versus)) is None

    def time_pytorch(self, call: Callable[[], object]) -> float:
        return median_seconds(call, TIMED_RUNS)

    def judge(
        self, component: str, engine: Callable[[], object], pytorch_seconds: float, ingredients: dict, versus: str
    ) -> SlowerThanPyTorch | None:
        """Time the engine on the inputs PyTorch was timed on and remember the result; what it means for serving."""
        measured = SpeedRecord(pytorch_seconds, median_seconds(engine, TIMED_RUNS))
        logger.info("TensorRT %s engine: %.3fs a call against PyTorch's %.3fs (%s): %.2fx", component,
                    measured.candidate_seconds, pytorch_seconds, versus, measured.speedup)  # fmt: skip
        try:
            self.records.remember(speed_key(ingredients, versus), measured)
        except OSError as error:
            logger.warning("TensorRT %s: could not keep the engine's speed in %s (%s); the next process measures it "
                           "again", component, self.records.path, error)  # fmt: skip
        return SlowerThanPyTorch(measured.speedup, versus) if measured.speedup < MIN_TENSORRT_SPEEDUP else None


def engine_speedups(records: SpeedRecords, ingredients: dict) -> dict[str, float]:
    """The speed-ups measured for an engine of these ingredients, by how PyTorch ran (for `engines.py list`)."""
    wanted = {name: value for name, value in speed_key(ingredients, "").items() if name != "versus"}
    return {key["versus"]: record.speedup for key, record in records.matching(wanted)}
