"""How accelerated paths are judged against PyTorch: output error, and time measured the same way for every path."""

import statistics
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
