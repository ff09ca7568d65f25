"""Engines built ahead of time: for each chosen (variant, bucket, latent window), one short job of that shape.

A one-step, one-section job runs every wrapped component at exactly the shapes a real job of that bucket and window
uses, so the runtime builds (or finds) each engine the same way a real job would, checks it against PyTorch and
stores it. An engine already in the cache loads instead of building, so a run that was interrupted resumes where
it stopped; what a later job needs and no prebuild made is still built just in time.
"""

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from ..acceleration.measure import DeviceMemoryPeak
from ..media.buckets import bucket_options
from ..settings import FPS, GenerationSettings, InvalidSettings, ModelSettings

PROMPT = "a person walks along a beach at sunset, the camera follows smoothly"


@dataclass(frozen=True)
class BuildItem:
    variant: str
    bucket: tuple[int, int]  # (height, width)
    window: int

    def describe(self) -> str:
        return f"{self.variant} {self.bucket[0]}x{self.bucket[1]} window {self.window}"


def parse_bucket(text: str) -> tuple[int, int]:
    """'544x704' (height x width, each a multiple of 16) as a tuple; InvalidSettings otherwise."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise InvalidSettings(f"a bucket is HEIGHTxWIDTH such as 544x704, got {text!r}") from None
    if height % 16 or width % 16 or not (64 <= height <= 2048 and 64 <= width <= 2048):
        raise InvalidSettings(f"bucket sides must be multiples of 16 in [64, 2048], got {text!r}")
    return height, width


def plan_items(
    variants: list[str], buckets: list[tuple[int, int]] | None, windows: list[int], resolution: int
) -> list[BuildItem]:
    """Every combination; no buckets named: every bucket of `resolution` (FramePack's 640 set, scaled)."""
    for window in windows:
        GenerationSettings(prompt="", latent_window=window)  # InvalidSettings for a window out of range
    chosen = buckets or list(bucket_options(resolution))
    return [BuildItem(v, b, w) for v in variants for b in chosen for w in windows]


def _one_section(item: BuildItem, resolution: int) -> GenerationSettings:
    seconds = item.window * 4 / FPS  # exactly one section
    return GenerationSettings(prompt=PROMPT, variant=item.variant, seconds=seconds, steps=1, latent_window=item.window,
                              resolution=resolution, step_cache="off")  # fmt: skip


def prebuild(
    models: ModelSettings,
    items: list[BuildItem],
    resolution: int,
    load: Callable[[ModelSettings], object],
    say: Callable[[str], None],
) -> Iterator[dict]:
    """Run each item's job with the models `load(settings)` returns (one load per variant); yields a record per item:
    what it took and what each component built or loaded. Failures of single engines fall back as in any job and
    are reported in the record, with the GPU's peak memory use while the item ran; a job that fails ends the run with
    its message."""
    from ..media.images import example_image
    from ..media.job_files import JobPaths
    from ..pipeline.events import Failed

    started, built_seconds, engine, variant = time.perf_counter(), [], None, None
    for index, item in enumerate(items, 1):
        if item.variant != variant:
            engine, variant = None, item.variant
            say(f"loading models for {item.variant}")
            engine = load(replace(models, variant=item.variant))
        runtime = engine.models.runtime
        before = _counts(runtime)
        say(f"[{index}/{len(items)}] {item.describe()}{_estimate(built_seconds, len(items) - index + 1)}")
        item_started = time.perf_counter()
        height, width = item.bucket
        with DeviceMemoryPeak() as peak, tempfile.TemporaryDirectory(prefix="framepack-prebuild-") as scratch:
            paths = JobPaths.for_video(Path(scratch) / "prebuild.mp4")
            for event in engine.generate(example_image(width, height), _one_section(item, resolution), paths):
                if isinstance(event, Failed):
                    raise RuntimeError(f"{item.describe()}: {event.message}")
        seconds = time.perf_counter() - item_started
        after = _counts(runtime)
        compiled = {c: after[c][0] - before.get(c, (0, 0))[0] for c in after if after[c][0] > before.get(c, (0, 0))[0]}
        loaded = {c: after[c][1] - before.get(c, (0, 0))[1] for c in after if after[c][1] > before.get(c, (0, 0))[1]}
        if compiled:
            built_seconds.append(seconds)
        record = {"item": item.describe(), "seconds": round(seconds, 1), "compiled": compiled, "loaded": loaded,
                  "components": {c: s.describe() for c, s in runtime.status.items()}}  # fmt: skip
        memory = ""
        if peak.gigabytes is not None:
            record["peak_gpu_gb"] = round(peak.gigabytes, 2)
            memory = f", peak GPU memory {peak.gigabytes:.1f} GB"
        say(
            f"[{index}/{len(items)}] {item.describe()}: {seconds:.0f}s{memory}, "
            f"{_summary(compiled, loaded, runtime.status)}"
        )
        yield record
    say(f"done: {len(items)} item(s) in {time.perf_counter() - started:.0f}s")


def _counts(runtime) -> dict[str, tuple[int, int]]:
    return {component: (status.compiles, status.loads) for component, status in runtime.status.items()}


def _estimate(built_seconds: list[float], left: int) -> str:
    if not built_seconds:
        return " (the first build sets the estimate; a full-size transformer takes minutes)"
    return f" (at most about {sum(built_seconds) / len(built_seconds) * left / 60:.0f} min left)"


def _summary(compiled: dict, loaded: dict, status: dict) -> str:
    """What the item built and found, and which components run in PyTorch and why (an engine that lost to PyTorch,
    a fallback)."""
    in_pytorch = [f"{c} in PyTorch ({s.reason})" for c, s in status.items() if s.engine == "pytorch"]
    parts = [f"built {', '.join(compiled)}" if compiled else "", f"found {', '.join(loaded)}" if loaded else ""]
    return "; ".join(part for part in [*parts, *in_pytorch] if part) or "every engine already in memory"
