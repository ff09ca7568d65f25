"""How accelerated paths are judged against PyTorch: output error, and time measured the same way for every path."""

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error, in float32."""
    expected, actual = expected.float(), actual.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def output_error(actual, expected) -> float:
    """The largest relative error over a module's outputs (one tensor, or a tuple of them)."""
    pairs = zip(_tensors(actual), _tensors(expected), strict=True)
    return max(relative_error(a, e) for a, e in pairs)


def psnr(actual: np.ndarray, expected: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 frames against reference frames, in dB (inf when identical)."""
    error = np.mean((actual.astype(np.float64) - expected.astype(np.float64)) ** 2)
    return float("inf") if error == 0 else float(10 * np.log10(255.0**2 / error))


def _tensors(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def median_seconds(function: Callable[[], object], runs: int = 5, warmup: int = 1) -> float:
    """The median of `runs` timed calls after `warmup` untimed ones; CUDA work is waited for, so a GPU call is
    timed to its end rather than to its launch."""
    for _ in range(warmup):
        function()
    timings = []
    for _ in range(runs):
        synchronize()
        started = time.perf_counter()
        function()
        synchronize()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def gpu_memory_in_use() -> int | None:
    """Bytes in use on the current GPU by the driver's count (every allocator's, every process's); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


class DeviceMemoryPeak:
    """The most GPU memory in use while the block runs, sampled every `every` seconds from the driver's count, since
    TensorRT's builder allocates outside PyTorch's allocator. `gigabytes` is None without CUDA."""

    def __init__(self, every: float = 0.2) -> None:
        self.every = every
        self.peak_bytes: int | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        self._sample_once()
        while not self._done.wait(self.every):
            self._sample_once()
        self._sample_once()  # as the block ends

    def _sample_once(self) -> None:
        in_use = gpu_memory_in_use()
        if in_use is not None:
            self.peak_bytes = max(self.peak_bytes or 0, in_use)

    @property
    def gigabytes(self) -> float | None:
        return None if self.peak_bytes is None else self.peak_bytes / 1024**3

    def __enter__(self) -> "DeviceMemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()
