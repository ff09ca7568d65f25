"""Time the tiny preset end to end on a CUDA GPU, resident and offloaded; prints one JSON line per run.

python bench/tiny_cuda.py
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, ModelSettings


def run(variant: str, free_gb: float | None, step_cache: str, out: Path) -> dict:
    plan = plan_memory("cuda", free_gb=free_gb)
    components = load_components(variant, ensure_tiny_models(), plan.dtypes())
    engine = FramePackEngine(
        assemble(components, plan, ModelSettings(variant, preset="tiny")), write_video=lambda *args: None
    )
    settings = GenerationSettings(
        prompt="a cat walks", seconds=2, resolution=TINY_RESOLUTION, variant=variant, step_cache=step_cache
    )
    timings = []
    for _ in range(4):  # the first run warms up kernels
        torch.cuda.synchronize()
        started = time.perf_counter()
        last = list(engine.generate(example_image(), settings, JobPaths.for_video(out / "bench.mp4"), overwrite=True))[
            -1
        ]
        torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
        assert isinstance(last, Finished), last
    return {
        "variant": variant, "offload": plan.offload, "step_cache": step_cache, "frames": last.frames,
        "seconds_per_video_median_after_warmup": round(statistics.median(timings[1:]), 3),
        "first_run_s": round(timings[0], 3), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }  # fmt: skip


def main() -> None:
    out = Path("/tmp/bench-tiny")
    out.mkdir(exist_ok=True)
    for variant, free_gb, step_cache in [
        ("framepack", None, "teacache"),
        ("f1", None, "teacache"),
        ("framepack", None, "magcache"),
        ("framepack", None, "off"),
        ("framepack", 8.0, "teacache"),
    ]:
        print(json.dumps(run(variant, free_gb, step_cache, out)), flush=True)


if __name__ == "__main__":
    main()
