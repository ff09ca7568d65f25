"""Does a prompt timeline make the transformer recompile or rebuild? One process, one engine: a one-prompt job,
then the same job with a 3-part timeline (each section its own prompt, each a different number of tokens), then the
one-prompt job again. For each job: median seconds per step, its first step, the graphs torch.compile made and the
TensorRT engines built while it ran, and the GPU's peak memory (the driver's count, engines and builds included).

    python bench/timeline.py --backend compile --limit 24
    python bench/timeline.py --tensorrt --backend compile --limit 24
    python bench/timeline.py --preset tiny --device cpu --backend eager --steps 2     # a smoke test, no GPU
Prints one JSON line per job and a Markdown table; `--verbose` also the runtime's log, each line with the GPU memory
in use then (the device's, and PyTorch's reserved and allocated), and the traceback of a fall back.
"""

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ONE_PROMPT = "The girl dances gracefully, with clear movements, full of charm."
TIMELINE = (
    "[0s: The girl stands still and looks at the camera.] "
    "[1.2s: The girl raises both arms slowly above her head, smiling, as the wind moves her hair.] "
    "[2.4s: The girl dances gracefully, with clear movements, full of charm, turning around twice.]"
)
SECONDS = 3.6  # three sections of the default latent window
GIB = 1024**3


class WithMemory(logging.Handler):
    """Each log line with the GPU memory in use when it was written."""

    def emit(self, record: logging.LogRecord) -> None:
        import torch

        free, total = torch.cuda.mem_get_info()
        memory = (f"device {(total - free) / GIB:.2f} GB, reserved {torch.cuda.memory_reserved() / GIB:.2f}, "
                  f"allocated {torch.cuda.memory_allocated() / GIB:.2f}")  # fmt: skip
        print(f"[{memory}] {record.name}: {self.format(record)}", flush=True)


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_job(engine, runtime, image, settings, out: Path, name: str) -> dict:
    import torch

    from diffusers_helper.acceleration.measure import DeviceMemoryPeak
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.pipeline.events import SAMPLING, Failed, StageStarted, StepProgress

    def synchronize() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    graphs, builds = graphs_compiled(), _builds(runtime)
    step_times, last = [], None
    with DeviceMemoryPeak() as peak:
        for event in engine.generate(image, settings, JobPaths.for_video(out / f"{name}.mp4"), overwrite=True):
            synchronize()
            now = time.perf_counter()
            if isinstance(event, StageStarted) and event.stage == SAMPLING:
                last = now
            elif isinstance(event, StepProgress):
                step_times.append(now - last)
                last = now
            elif isinstance(event, Failed):
                raise SystemExit(f"{name} failed: {event.message}")
    return {
        "job": name,
        "steps": len(step_times),
        "s_per_step_median": round(statistics.median(step_times), 4),
        "s_first_step": round(step_times[0], 3),
        "graphs_compiled": graphs_compiled() - graphs,
        "engines_built": _builds(runtime) - builds,
        "device_gb_peak": None if peak.gigabytes is None else round(peak.gigabytes, 2),
    }


def _builds(runtime) -> int:
    return 0 if runtime is None else len(runtime.status["transformer"].compile_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limit", type=float, help="GPU memory limit in GB (default: none)")
    parser.add_argument("--backend", choices=("eager", "auto", "compile"), default="compile")
    parser.add_argument("--tensorrt", action="store_true", help="the transformer's blocks as TensorRT engines")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/timeline"))
    parser.add_argument("--verbose", action="store_true", help="the runtime's log with the GPU memory (CUDA only)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.frontend.startup import default_resolution, load_engine, plan_for, quiet_libraries
    from diffusers_helper.media.images import example_image
    from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    quiet_libraries()
    if args.verbose:
        handler = WithMemory()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("diffusers_helper").addHandler(handler)
        logging.getLogger("diffusers_helper").setLevel(logging.DEBUG)
    models = ModelSettings(preset=args.preset, device=args.device, gpu_memory_limit_gb=args.limit,
                           backend=args.backend, tensorrt=TensorRTOptions(transformer=args.tensorrt))  # fmt: skip
    runtime = TensorRTRuntime(EngineCache(args.out / "engines")) if args.tensorrt else None
    started = time.perf_counter()
    engine = load_engine(models, plan_for(models), runtime, keep_video=False)
    print(f"loaded in {time.perf_counter() - started:.1f} s: {engine.models.describe()}", flush=True)
    resolution = default_resolution(args.preset)
    image = example_image(704, 544)
    one = GenerationSettings(prompt=ONE_PROMPT, seconds=SECONDS, steps=args.steps, step_cache="off",
                             resolution=resolution)  # fmt: skip
    timeline = GenerationSettings(prompt=TIMELINE, seconds=SECONDS, steps=args.steps, step_cache="off",
                                  resolution=resolution)  # fmt: skip
    rows = []
    for name, settings in (("one prompt", one), ("3-part timeline", timeline), ("one prompt again", one)):
        row = run_job(engine, runtime, image, settings, args.out, name.replace(" ", "_"))
        print(json.dumps(row), flush=True)
        rows.append(row)
    baseline = statistics.mean([rows[0]["s_per_step_median"], rows[2]["s_per_step_median"]])
    print(f"\ntransformer: {engine.models.backends()['transformer']}; {torch.__version__}")
    print("| job | steps | s/step (median) | first step s | graphs compiled | engines built | peak GPU GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['job']} | {row['steps']} | {row['s_per_step_median']} | {row['s_first_step']} | "
              f"{row['graphs_compiled']} | {row['engines_built']} | {row['device_gb_peak']} |")  # fmt: skip
    print(f"timeline / one prompt (mean of both runs): {rows[1]['s_per_step_median'] / baseline:.4f}")


if __name__ == "__main__":
    main()
