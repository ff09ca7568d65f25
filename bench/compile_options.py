"""What Inductor's options do for the compiled blocks: one transformer call, eager against the blocks compiled under
each option set, in one process on the same inputs; and where the compiled call's GPU time goes.

    python bench/compile_options.py --out /tmp/compile_options     # full size on the GPU: default, coordinate descent
    python bench/compile_options.py --options default max_autotune_gemm
    python bench/compile_options.py --preset tiny --device cpu --runs 1

The inputs are a job's (captured from a one-step job at the 640 bucket, the blocks held eager). Each option set
compiles the blocks anew (Inductor's on-disk cache may serve a compile seen before on this machine) and reports its
first call (the compile), the median call after it, the speed-up over eager and the output's relative error against
eager's. The first option set's compiled call also runs under PyTorch's profiler: kernel time by kind and the top
kernels, per call. Writes compile_options.json and compile_options.md into --out.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

OPTION_SETS = {  # torch._inductor.config settings
    "default": {},
    "coordinate_descent": {"coordinate_descent_tuning": True},  # tunes the generated kernels' launch sizes
    "max_autotune_gemm": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"},  # Triton GEMMs
}
PROFILED_CALLS = 2


def run(preset: str, device: str, option_sets: list[str], runs: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.backends import bucket_image, capture_transformer_inputs, job_settings
    from bench.profile_section import kernel_time
    from diffusers_helper.acceleration.measure import median_seconds, output_error, synchronize
    from diffusers_helper.frontend.startup import default_resolution, load_engine, plan_for, quiet_libraries
    from diffusers_helper.settings import ModelSettings

    quiet_libraries()
    models = ModelSettings(preset=preset, device=device, backend="compile")
    engine = load_engine(models, plan_for(models), None, keep_video=False)
    resolution = default_resolution(preset)
    with torch.compiler.set_stance("force_eager"):
        args, kwargs = capture_transformer_inputs(engine, bucket_image(resolution), job_settings(1.2, 1, resolution))
    transformer = engine.components.transformer

    def call():
        return transformer(*args, **kwargs)

    rows, profiled = [], None
    with torch.no_grad():
        with torch.compiler.set_stance("force_eager"):
            expected = call()
            eager = median_seconds(call, runs)
        rows.append({"options": "eager", "call_s": eager})
        for name in option_sets:
            torch._dynamo.reset()
            with torch._inductor.config.patch(OPTION_SETS[name]):
                synchronize()
                started = time.perf_counter()
                output = call()
                synchronize()
                first = time.perf_counter() - started
                seconds = median_seconds(call, runs)
                rows.append({"options": name, "first_call_s": first, "call_s": seconds, "speedup": eager / seconds,
                             "error_vs_eager": output_error(output, expected),
                             "compiled": engine.models.compiled.describe()})  # fmt: skip
                if profiled is None:
                    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
                    with profile(activities=activities) as profiler:
                        for _ in range(PROFILED_CALLS):
                            call()
                        synchronize()
                    profiled = {"options": name, **_per_call(kernel_time(profiler, device == "cuda"))}
    return {"preset": preset, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__, "rows": rows, "profile": profiled}  # fmt: skip


def _per_call(kernels: dict) -> dict:
    return {
        "busy_s": kernels["busy_s"] / PROFILED_CALLS,
        "by_kind_s": {kind: seconds / PROFILED_CALLS for kind, seconds in kernels["by_kind_s"].items()},
        "top_kernels": [{**k, "seconds": k["seconds"] / PROFILED_CALLS} for k in kernels["top_kernels"]],
    }


def report(result: dict) -> str:
    from bench.profile_section import kernel_tables

    lines = [f"One transformer call ({result['preset']}, {result['device']}, torch {result['torch']})", "",
             "| blocks | first call s | call s | vs eager | error vs eager |", "|---|---|---|---|---|"]  # fmt: skip
    for row in result["rows"]:
        first, speedup, error = row.get("first_call_s"), row.get("speedup"), row.get("error_vs_eager")
        lines.append(f"| {row['options']} | {'' if first is None else f'{first:.1f}'} | {row['call_s']:.4f} | "
                     f"{'1.00x' if speedup is None else f'{speedup:.3f}x'} | {'' if error is None else f'{error:.2e}'} |")  # fmt: skip
    profiled = result["profile"]
    lines += ["", f"Kernel time of one compiled call ({profiled['options']}): {profiled['busy_s']:.3f} s", ""]
    return "\n".join(lines + kernel_tables(profiled))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("full-random", "tiny"), default="full-random")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--options", nargs="+", choices=tuple(OPTION_SETS), default=["default", "coordinate_descent"])
    parser.add_argument("--runs", type=int, default=5, help="timed calls per row (median)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compile_options"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.preset, args.device, args.options, args.runs)
    (args.out / "compile_options.json").write_text(json.dumps(result, indent=1))
    (args.out / "compile_options.md").write_text(report(result) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
