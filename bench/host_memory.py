"""A job's peak host memory against what the memory plan expects of it, per resolution (tiny preset, CPU).

    python bench/host_memory.py --resolutions 480 640 1000 --seconds 1

Each resolution runs one job (1 step, no step cache) of a 960x640 photo in a fresh process, since a process's peak
resident memory only grows. Prints, per resolution, the bucket, the peak over the loaded models and the plan's
`job_host_bytes`, as JSON lines.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GB = 1024**3


def one_job(resolution: int, seconds: float) -> dict:
    from diffusers_helper.frontend.startup import load_engine, plan_for, quiet_libraries
    from diffusers_helper.media.buckets import find_nearest_bucket
    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.placement import job_host_bytes
    from diffusers_helper.settings import GenerationSettings, ModelSettings

    quiet_libraries()
    models = ModelSettings(preset="tiny", device="cpu", backend="eager")
    plan = plan_for(models)
    engine = load_engine(models, plan, None, keep_video=False)
    image = example_image(960, 640)
    settings = GenerationSettings(prompt="a cat walks", seconds=seconds, steps=1, resolution=resolution,
                                  step_cache="off")  # fmt: skip
    height, width = find_nearest_bucket(*image.shape[:2], resolution=resolution)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        events = list(engine.generate(image, settings, JobPaths.for_video(Path(directory) / "job.mp4")))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    planned = job_host_bytes(plan, engine.components.vae, height, width, settings.frames, settings.latent_window)
    return {"resolution": resolution, "bucket": f"{width}x{height}", "frames": settings.frames,
            "finished": type(events[-1]).__name__, "job_s": round(time.perf_counter() - started, 1),
            "models_gb": round(loaded / GB, 2), "peak_over_models_gb": round((peak - loaded) / GB, 2),
            "planned_gb": round(planned / GB, 2)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[480, 640, 1000])
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--job", type=int, help=argparse.SUPPRESS)  # one resolution, in this process
    args = parser.parse_args(argv)
    if args.job is not None:
        print(json.dumps(one_job(args.job, args.seconds)), flush=True)
        return 0
    for resolution in args.resolutions:
        command = [sys.executable, __file__, "--job", str(resolution), "--seconds", str(args.seconds)]
        result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, check=False)
        print(result.stdout.strip().splitlines()[-1] if result.returncode == 0 else json.dumps(
            {"resolution": resolution, "error": f"exit {result.returncode}"}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
