"""A full-size job (the full-random preset: real sizes, random weights) at each GPU memory limit, one fresh process
per limit: seconds per step and per section, where a section's time goes, peak GPU memory, peak host RSS, pinned
host memory, load time.

    python bench/full_size.py                                  # resident, then 24, 16, 12, 8 and 6 GB
    python bench/full_size.py --limits 8 6 --seconds 1 --steps 4 --out /tmp/full
    python bench/full_size.py --backend auto                   # the blocks as --backend runs them (default: eager)
    python bench/full_size.py --fp8 --backend auto --limits resident 24
    python bench/full_size.py --tensorrt --backend compile --limits 16   # the blocks the plan keeps resident as engines
Prints a table; writes full_size.jsonl and full_size.md (the table) into --out.
"""

import argparse
import json
import logging
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GIB = 1024**3


def run_one(
    limit: float | None, seconds: float, steps: int, backend: str, fp8: bool, tensorrt: bool, out: Path
) -> dict:
    """One job in this process; the figures as a dict. With `tensorrt`, the transformer's engines are built in the
    job's first step (a cache of their own under `out`) and serve whether or not they are faster."""
    import torch

    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.acceleration.measure import DeviceMemoryPeak, gpu_memory_in_use
    from diffusers_helper.frontend.startup import load_engine, plan_for, quiet_libraries
    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.pipeline.events import (
        DECODING,
        ENCODING,
        SAMPLING,
        WRITING,
        Finished,
        SectionFinished,
        StageStarted,
        StepProgress,
    )
    from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.DEBUG)  # a failure's traceback goes to stderr
    models = ModelSettings(preset="full-random", device="cuda", gpu_memory_limit_gb=limit, backend=backend, fp8=fp8,
                           tensorrt=TensorRTOptions(transformer=tensorrt))  # fmt: skip
    plan = plan_for(models)
    runtime = TensorRTRuntime(EngineCache(out / "engines")) if tensorrt else None
    started = time.perf_counter()
    engine = load_engine(
        models, plan, runtime, keep_video=False
    )  # no PyAV on the GPU machine: MP4s are timed on the CPU
    torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    settings = GenerationSettings(prompt="The girl dances gracefully, with clear movements, full of charm.",
                                  seconds=seconds, steps=steps, step_cache="off")  # fmt: skip
    image = example_image(704, 544)  # the 544 x 704 bucket (19,257 latent tokens with the history)
    torch.cuda.reset_peak_memory_stats()
    marks: list[tuple[str, int, float]] = []
    step_times: list[float] = []
    last_step = None
    device_peak, serving_peak = DeviceMemoryPeak(), 0
    with device_peak:
        for event in engine.generate(image, settings, JobPaths.for_video(out / f"job_{limit}.mp4"), overwrite=True):
            torch.cuda.synchronize()
            now = time.perf_counter()
            if isinstance(event, StageStarted):
                marks.append((event.stage, event.section, now))
                last_step = now if event.stage == SAMPLING else last_step
            elif isinstance(event, StepProgress):
                step_times.append(now - last_step)
                last_step = now
                if len(step_times) > 1:  # after the first step, which builds any engines
                    serving_peak = max(serving_peak, gpu_memory_in_use())
            elif isinstance(event, SectionFinished):
                marks.append(("done", event.section, now))
            elif isinstance(event, Finished):
                marks.append(("finished", 0, now))
            else:
                stages = [f"{stage} {section}" for stage, section, _ in marks]
                assert not hasattr(event, "message"), f"{event} after {stages[-1] if stages else 'loading'}"
    stage_seconds: dict[str, float] = {}
    for (stage, _, begin), (_, _, end) in zip(marks, marks[1:], strict=False):
        if stage in (ENCODING, SAMPLING, DECODING, WRITING):
            stage_seconds[stage] = stage_seconds.get(stage, 0.0) + end - begin
    sections = settings.sections
    return {
        "limit_gb": limit, "placement": engine.models.placement.describe(), "plan": plan.describe(),
        "load_s": round(load_s, 1), "steps_per_section": steps, "sections": sections,
        "s_per_step_median": round(statistics.median(step_times), 3),
        "s_per_step_first": round(step_times[0], 3),
        "s_per_section": round((stage_seconds[SAMPLING] + stage_seconds[DECODING]) / sections, 2),
        "encoding_s": round(stage_seconds[ENCODING], 2),
        "sampling_s_per_section": round(stage_seconds[SAMPLING] / sections, 2),
        "decoding_s_per_section": round(stage_seconds[DECODING] / sections, 2),
        "peak_gpu_allocated_gb": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_gpu_reserved_gb": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2),
        "pinned_host_gb": round(engine.models.placement.pinned_bytes / GIB, 2),
        "peak_gpu_device_gb": round(device_peak.gigabytes, 2),  # every allocator's: TensorRT's builder included
        "gpu_device_gb_serving": round(serving_peak / GIB, 2),  # at the ends of steps after the first
        "transformer": engine.models.backends()["transformer"],
        "engine_builds_s": runtime.status["transformer"].compile_seconds if runtime else None,
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
    }  # fmt: skip


def table(rows: list[dict]) -> str:
    header = ("| limit | transformer blocks resident | s/step | s/section (sampling + decode) | encode s | "
              "peak GPU (allocated / reserved) GB | peak host RSS GB | pinned GB | load s |")  # fmt: skip
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['limit_gb'] or 'none'} | failed: {row['error']} |" + " |" * 7)
            continue
        blocks = row["placement"].split("transformer: ")[-1].split(" blocks")[0] if "of" in row["placement"] else "60"
        lines.append(
            f"| {row['limit_gb'] or 'none (resident)'} | {blocks} | {row['s_per_step_median']} | "
            f"{row['s_per_section']} ({row['sampling_s_per_section']} + {row['decoding_s_per_section']}) | "
            f"{row['encoding_s']} | {row['peak_gpu_allocated_gb']} / {row['peak_gpu_reserved_gb']} | "
            f"{row['peak_host_rss_gb']} | {row['pinned_host_gb']} | {row['load_s']} |"
        )
    return "\n".join(lines)


def _heartbeat(label: str) -> threading.Event:
    done = threading.Event()

    def beat() -> None:
        started = time.perf_counter()
        while not done.wait(30):
            print(f"  ... {label}: {time.perf_counter() - started:.0f} s", flush=True)

    threading.Thread(target=beat, daemon=True).start()
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limits", nargs="*", default=["resident", "24", "16", "12", "8", "6"])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("/tmp/full_size"))
    parser.add_argument("--backend", choices=("eager", "auto", "compile"), default="eager")
    parser.add_argument("--fp8", action="store_true", help="the blocks' linears in FP8, as --fp8 runs them")
    parser.add_argument("--tensorrt", action="store_true", help="the transformer's stack as TensorRT engines")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run one limit, print its JSON
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        limit = None if args.one == "resident" else float(args.one)
        print(
            "RESULT "
            + json.dumps(run_one(limit, args.seconds, args.steps, args.backend, args.fp8, args.tensorrt, args.out)),
            flush=True,
        )
        return
    rows = []
    for limit in args.limits:
        print(f"limit {limit}:", flush=True)
        command = [sys.executable, __file__, "--one", limit, "--seconds", str(args.seconds), "--steps",
                   str(args.steps), "--backend", args.backend, "--out", str(args.out), *(["--fp8"] if args.fp8 else []),
                   *(["--tensorrt"] if args.tensorrt else [])]  # fmt: skip
        done = _heartbeat(f"limit {limit}")
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        done.set()
        found = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            row = json.loads(found[-1].removeprefix("RESULT "))
        else:
            error = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
            row = {"limit_gb": None if limit == "resident" else float(limit), "error": error}
            (args.out / f"stderr_{limit}.log").write_text(result.stderr[-20000:])
        print(json.dumps(row), flush=True)
        rows.append(row)
        with open(args.out / "full_size.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")
    (args.out / "full_size.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
