"""Per-component TensorRT figures on a CUDA GPU: compile time, load-from-cache time (a second process),
speed against PyTorch (same inputs, warm-up, median), and which components fell back and why.

    python bench/tensorrt_components.py [--tiny-only]      # the mid-size stack, then every tiny component
    python bench/tensorrt_components.py --full-size        # the full-size VAE (encoder, decoder), LLaMA and CLIP
                                                           # as engines: a job builds them, a fresh process loads them
Prints JSON lines.
"""

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.acceleration.measure import median_seconds, relative_error
from diffusers_helper.acceleration.speed_policy import engine_speedups
from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecords
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import HostParking, plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer
from tests.gpu.midsize import mid_size_transformer, stack_inputs


def median_ms(function, runs: int = 20, warmup: int = 3) -> float:
    return median_seconds(function, runs, warmup) * 1000


def environment(runtime: TensorRTRuntime) -> dict:
    info = runtime.environment()
    return {key: info.get(key) for key in ("gpu", "compute_capability", "torch", "torch_tensorrt", "build", "tensorrt")}


def mid_size_stack(cache_dir: Path) -> dict:
    transformer = mid_size_transformer()
    runtime = TensorRTRuntime(EngineCache(cache_dir))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    with torch.no_grad():  # PyTorch first: once the engine has passed its check, it holds the weights
        pytorch_out = stack.stack(hidden, text, temb, cos, sin)[0]
        pytorch_ms = median_ms(lambda: stack.stack(hidden, text, temb, cos, sin))
        engine_out = stack(hidden, text, temb, None, (cos, sin))[0]
        status = runtime.status["transformer"]
        engine_ms = median_ms(lambda: stack(hidden, text, temb, None, (cos, sin)))
    second = subprocess.run([sys.executable, "-m", "tests.gpu.midsize", str(cache_dir)], cwd=REPO,
                            capture_output=True, text=True, check=True)  # fmt: skip
    reloaded = json.loads(second.stdout.strip().splitlines()[-1])
    return {
        "component": "transformer block stack, mid-size (2 dual + 4 single blocks, width 3072, 4400 + 750 tokens, bf16)",
        "engine": status.engine, "reason": status.reason,
        "compile_s": round(status.compile_seconds[0], 1) if status.compile_seconds else None,
        "second_process": {"compiles": reloaded["compiles"], "loads": reloaded["loads"], "load_s": [round(s, 2) for s in reloaded["load_seconds"]]},
        "pytorch_ms": round(pytorch_ms, 2), "tensorrt_ms": round(engine_ms, 2), "speedup": round(pytorch_ms / engine_ms, 3),
        "relative_error": round(relative_error(engine_out, pytorch_out), 5), **environment(runtime),
    }  # fmt: skip


def tiny_engine(cache_dir: Path | None) -> tuple[FramePackEngine, TensorRTRuntime | None]:
    plan = plan_memory("cuda")
    components = load_components("framepack", ensure_tiny_models(), plan.dtypes())
    runtime = TensorRTRuntime(EngineCache(cache_dir)) if cache_dir else None
    everything = TensorRTOptions(vae=True, text_encoders=True, transformer=True)
    models = assemble(components, plan, ModelSettings(preset="tiny", tensorrt=everything), runtime)
    return FramePackEngine(models, write_video=lambda *args: None), runtime


def generate_seconds(engine: FramePackEngine, out: Path) -> float:
    settings = GenerationSettings(prompt="a cat walks", seconds=2.0, steps=6, resolution=TINY_RESOLUTION)
    torch.cuda.synchronize()
    started = time.perf_counter()
    last = list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(out / "x.mp4"), overwrite=True))[
        -1
    ]
    torch.cuda.synchronize()
    assert last.frames == 73, last
    return time.perf_counter() - started


def tiny_components(cache_dir: Path) -> dict:
    """Build every engine, load them all in a fresh runtime, then time whole tiny videos against PyTorch."""
    builder, built = tiny_engine(cache_dir)
    generate_seconds(builder, cache_dir)
    loader, loaded = tiny_engine(cache_dir)
    generate_seconds(loader, cache_dir)
    plain, _ = tiny_engine(None)
    generate_seconds(plain, cache_dir)  # warm-up
    pytorch = statistics.median(generate_seconds(plain, cache_dir) for _ in range(3))
    tensorrt = statistics.median(generate_seconds(loader, cache_dir) for _ in range(3))
    return {
        "component": "tiny preset, every flag, 2 s video (6 steps)",
        "video_s": {"pytorch": round(pytorch, 3), "tensorrt": round(tensorrt, 3), "speedup": round(pytorch / tensorrt, 3)},
        "components": {
            name: {
                "engine": loaded.status[name].engine, "reason": loaded.status[name].reason,
                "compile_s": [round(t, 1) for t in status.compile_seconds],
                "second_runtime_compiles": loaded.status[name].compiles,
                "load_s": [round(t, 2) for t in loaded.status[name].load_seconds],
            }
            for name, status in built.status.items()
        },
    }  # fmt: skip


def full_size_job(cache_dir: Path) -> dict:
    """One 544x704 job (one section, 2 steps) on the full-size random models with the VAE and both text encoders as
    engines, the runtime as the app makes it (an engine serves only where it measured faster than PyTorch): what
    each component ran on and what its engines took, and the device memory at the job's peak."""
    from bench.tensorrt_transformer import PROMPTS, run_job
    from diffusers_helper.acceleration.measure import DeviceMemoryPeak
    from diffusers_helper.frontend.startup import load_engine, plan_for, quiet_libraries

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.INFO)  # builds, loads and checks, as they happen
    models = ModelSettings(preset="full-random", device="cuda", tensorrt=TensorRTOptions(vae=True, text_encoders=True))
    runtime = TensorRTRuntime(EngineCache(cache_dir), only_if_faster=True)
    engine = load_engine(models, plan_for(models), runtime, keep_video=False)
    started = time.perf_counter()
    with DeviceMemoryPeak() as peak:
        run_job(engine, GenerationSettings(prompt=PROMPTS[1], seconds=1.2, steps=2, step_cache="off"))
    return {
        "job_s": round(time.perf_counter() - started, 1), "device_gb_peak": round(peak.gigabytes, 2),
        "components": {
            name: {"engine": status.engine, "reason": status.reason, "compiles": status.compiles, "loads": status.loads,
                   "compile_s": [round(t, 1) for t in status.compile_seconds],
                   "load_s": [round(t, 1) for t in status.load_seconds],
                   "relative_errors": [round(e, 5) for e in status.relative_errors]}
            for name, status in runtime.status.items()
        },
        **environment(runtime),
    }  # fmt: skip


def full_size_components(cache_dir: Path) -> dict:
    """The full-size job twice, each in a fresh process: the first builds the engines, the second loads them; then
    per engine what the cache recorded (build and save time, size, the runtime's timing against PyTorch)."""
    runs = []
    for _ in ("build", "load"):
        result = subprocess.run([sys.executable, __file__, "--job", str(cache_dir)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True, check=False)  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError("the full-size job failed (its log is above)")
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    speeds = SpeedRecords(cache_dir / SPEED_RECORDS_FILE)
    engines = [
        {key: record.get(key) for key in ("component", "inputs", "build_seconds", "save_seconds")}
        | {"speedups": engine_speedups(speeds, record), "file_gb": round(record["bytes"] / 1024**3, 2)}
        for record in EngineCache(cache_dir).describe()
    ]
    return {"full_size": "VAE encoder and decoder, LLaMA, CLIP as engines, 544x704", "built": runs[0],
            "fresh_process": runs[1], "engines": engines}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny components")
    parser.add_argument("--full-size", action="store_true", help="the full-size VAE and text encoders as engines")
    parser.add_argument("--job", type=Path, help=argparse.SUPPRESS)  # one full-size job with this engine cache
    args = parser.parse_args()
    if args.job:
        print(json.dumps(full_size_job(args.job)), flush=True)
        return
    with tempfile.TemporaryDirectory() as directory:
        if args.full_size:
            print(json.dumps(full_size_components(Path(directory) / "full")), flush=True)
            return
        if not args.tiny_only:
            print(json.dumps(mid_size_stack(Path(directory) / "stack")), flush=True)
        print(json.dumps(tiny_components(Path(directory) / "tiny")), flush=True)


if __name__ == "__main__":
    main()
