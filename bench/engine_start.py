"""From models loaded to the first step on cached transformer engines: Torch-TensorRT's own engine set-up against
the product's loader (TensorRT's Python API), with TensorRT-RTX's kernel cache cold and warm.

    python bench/engine_start.py --limit 16 --out DIR

First a process builds the engines of one job (one section, `--steps` steps, the transformer's blocks as engines at
that GPU memory limit) unless DIR already holds them; the engine files are then read once, so that no variant pays
for the disk alone; then each variant runs the same job in a fresh process of its own:
- `torch-tensorrt`: engine files unpickled as plain pickles do, each engine set up by Torch-TensorRT's C++ runtime
  (the product's loader before this bench existed);
- `loader, kernels cold`: the product's loader with no TensorRT-RTX kernel cache (removed first);
- `loader, kernels kept`: the same again, with the kernel cache the previous process left.
Prints one JSON line per process and a Markdown table: models' load, the first step (engines loaded, each checked
against PyTorch once, the step), the engines' loads alone, the later steps' median and the GPU's peak.
"""

import argparse
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

VARIANTS = ("build", "torch-tensorrt", "loader, kernels cold", "loader, kernels kept")


def _load_as_plain_pickle(backend, path: Path, kernels: Path | None = None):
    with open(path, "rb") as file:
        return pickle.load(file)


def run(variant: str, limit: float | None, steps: int, out: Path) -> dict:
    """One job of one section in this process, as `variant` loads its engines."""
    from timeline import ONE_PROMPT, run_job

    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.acceleration.tensorrt_backend import TorchTensorRTBackend
    from diffusers_helper.frontend.startup import default_resolution, load_engine, plan_for, quiet_libraries
    from diffusers_helper.media.images import example_image
    from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    quiet_libraries()
    if variant == "torch-tensorrt":
        TorchTensorRTBackend.load = _load_as_plain_pickle
    models = ModelSettings(preset="full-random", gpu_memory_limit_gb=limit, backend="compile",
                           tensorrt=TensorRTOptions(transformer=True))  # fmt: skip
    runtime = TensorRTRuntime(EngineCache(out / "engines"))
    started = time.perf_counter()
    engine = load_engine(models, plan_for(models), runtime, keep_video=False)
    models_s = time.perf_counter() - started
    settings = GenerationSettings(prompt=ONE_PROMPT, seconds=1.2, steps=steps, step_cache="off",
                                  resolution=default_resolution("full-random"))  # fmt: skip
    row = run_job(engine, runtime, example_image(704, 544), settings, out, variant.replace(" ", "_").replace(",", ""))
    status = runtime.status["transformer"]
    return {**row, "variant": variant, "limit_gb": limit, "models_s": round(models_s, 1), "engine": status.engine,
            "engines_loaded": status.loads, "load_s": round(sum(status.load_seconds), 2),
            "kernel_files": len(list((out / "engines").glob("*.kernels")))}  # fmt: skip


def _child(variant: str, args) -> dict:
    command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps), "--out", str(args.out)]
    if args.limit is not None:
        command += ["--limit", str(args.limit)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(f"{variant} failed:\n{result.stderr[-4000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=float, help="GPU memory limit in GB (default: none)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/engine_start"))
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run(args.child, args.limit, args.steps, args.out)), flush=True)
        return
    engines = args.out / "engines"
    rows = [] if list(engines.glob("*.engine")) else [_child("build", args)]
    for path in sorted(engines.glob("*.engine")):
        with open(path, "rb") as file:
            while file.read(1 << 26):
                pass
    for path in engines.glob("*.kernels"):
        path.unlink()
    rows += [_child(variant, args) for variant in VARIANTS[1:]]
    print("| process | engines loaded | models loaded s | first step s | engines' loads s | s/step (median) | "
          "peak GPU GiB |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for row in rows:
        print(f"| {row['variant']} | {row['engines_loaded']} | {row['models_s']} | {row['s_first_step']} | "
              f"{row['load_s']} | {row['s_per_step_median']} | {row['device_gb_peak']} |")  # fmt: skip


if __name__ == "__main__":
    main()
