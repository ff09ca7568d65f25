"""What each TensorRT component runs on, and what a long step under way is doing (for status lines and logs).

At full size a build, a load or a refit takes minutes: the status says what and for how long (and, for a build, how
far it is), and the log repeats it every 30 s, so neither the app nor a terminal looks frozen.
"""

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .tensorrt_backend import BuildProgress

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0


class EngineSource(enum.Enum):
    """How an engine that passed its check came to be."""

    BUILT = "built"
    LOADED = "loaded"
    REFITTED = "refitted"


@dataclass
class ComponentStatus:
    """What one component runs on, for status displays and the benchmarks."""

    engine: str = "pytorch"  # "tensorrt" once an engine served, "pytorch" otherwise
    reason: str = "not requested"
    busy: str | None = None  # what a long step under way does (compiling, loading, refitting an engine), since when,
    busy_since: float | None = None  # and how long it took the last time, where that is known
    busy_expected_seconds: float | None = None
    build: BuildProgress | None = None  # the build under way, which says how far it is
    engines: int = 0
    compiles: int = 0
    loads: int = 0
    refits: int = 0
    compile_seconds: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    refit_seconds: list[float] = field(default_factory=list)
    relative_errors: list[float] = field(default_factory=list)  # each engine checked, against PyTorch
    pytorch_weights_on_cpu: bool = False  # the engine holds the weights on the GPU; PyTorch's copy waits on the CPU

    @property
    def fell_back(self) -> bool:
        """The component runs in PyTorch for the rest of the process."""
        return self.reason.startswith("fell back")

    def describe(self) -> str:
        if self.busy is not None:
            elapsed = time.perf_counter() - self.busy_since
            expected = "" if self.busy_expected_seconds is None else f" of about {self.busy_expected_seconds:.0f}s"
            detail = self.build.describe() if self.build is not None else None
            return f"{self.busy}... {elapsed:.0f}s{expected}" + (f"; {detail}" if detail else "")
        parked = "; PyTorch weights on the CPU" if self.pytorch_weights_on_cpu and self.engine == "tensorrt" else ""
        return f"{'TensorRT' if self.engine == 'tensorrt' else 'PyTorch'} ({self.reason}{parked})"


@contextlib.contextmanager
def busy(
    component: str, status: ComponentStatus, activity: str, expected_seconds: float | None = None
) -> Iterator[None]:
    """While the block runs, the status says `activity` and the log repeats the status every 30 s."""
    status.busy, status.busy_since, status.busy_expected_seconds = activity, time.perf_counter(), expected_seconds
    try:
        with Heartbeat(lambda: f"TensorRT {component}: still {status.describe()}"):
            yield
    finally:
        status.busy = status.busy_since = status.busy_expected_seconds = status.build = None


class Heartbeat:
    """Logs `message()` every `every` seconds until the block ends."""

    def __init__(self, message: Callable[[], str], every: float = HEARTBEAT_SECONDS) -> None:
        self.message, self.every = message, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            logger.info("%s", self.message())

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
