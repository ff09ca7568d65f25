"""Where the time of one full-size section goes: GPU kernel time by kind, and the kernels that take the most.

    python bench/profile_section.py --out /tmp/profile              # full size on the GPU, eager
    python bench/profile_section.py --backend compile --steps 5
    python bench/profile_section.py --preset tiny --device cpu --steps 2

After a warm-up job, one one-section job (encoding, every sampling step, the VAE decode) runs under PyTorch's profiler.
The kernels are grouped by kind (matrix multiplications, attention, convolutions, normalization, the rest), with each
kind's share of the GPU's busy time, and the busy time against the section's wall time (how much the GPU waits on the
host). Writes profile.json and profile.md (the grouping and the top kernels); `--trace` also a Chrome trace.
"""

import argparse
import gzip
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "The girl dances gracefully, with clear movements, full of charm."
KINDS = (  # the first pattern a kernel's name matches names its kind
    ("attention", r"flash|fmha|attention|sdpa|cudnn.*mha"),
    ("convolution", r"conv|implicit_gemm|winograd"),
    ("matrix multiplication", r"gemm|matmul|\bmm\b|addmm|linear|cutlass|xmma|nvjet|scaled_mm"),
    ("normalization", r"norm"),
    ("memory copy", r"memcpy|memset|copy"),
)
TOP = 25


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, lowered)), "other (elementwise, RoPE, ...)")


def profile(preset: str, device: str, backend: str, steps: int, out: Path, trace: bool = False) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from diffusers_helper.acceleration.measure import synchronize
    from diffusers_helper.frontend.startup import default_resolution, load_engine, plan_for, quiet_libraries
    from diffusers_helper.media.buckets import find_nearest_bucket
    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.settings import GenerationSettings, ModelSettings

    quiet_libraries()
    models = ModelSettings(preset=preset, device=device, backend=backend)
    plan = plan_for(models)
    engine = load_engine(models, plan, None, keep_video=False)
    resolution = default_resolution(preset)
    height, width = find_nearest_bucket(544, 704, resolution=resolution)
    image = example_image(width, height)
    settings = GenerationSettings(prompt=PROMPT, seconds=1.2, steps=steps, resolution=resolution, step_cache="off")
    paths = JobPaths.for_video(Path(tempfile.mkdtemp()) / "profile.mp4")
    for _ in engine.generate(image, settings, paths, overwrite=True):  # warm-up: compiles, caches, allocations
        pass
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device.type == "cuda" else [])
    synchronize()
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in engine.generate(image, settings, paths, overwrite=True):
            pass
        synchronize()
    wall = time.perf_counter() - started
    if trace:
        profiler.export_chrome_trace(str(out / "trace.json"))
        with open(out / "trace.json", "rb") as raw, gzip.open(out / "trace.json.gz", "wb") as packed:
            shutil.copyfileobj(raw, packed)
        (out / "trace.json").unlink()
    on_device = plan.device.type == "cuda"
    return {
        "preset": preset, "backend": backend, "steps": steps, "device": torch.cuda.get_device_name() if on_device
        else "cpu", "torch": torch.__version__, "section_wall_s": wall, **kernel_time(profiler, on_device),
    }  # fmt: skip


def kernel_time(profiler, on_device: bool) -> dict:
    """A finished profile's kernel time (CPU op time off the GPU): busy seconds, seconds by kind, the top kernels."""
    import torch

    kernels: dict[str, float] = {}
    for event in profiler.key_averages():
        seconds = (event.self_device_time_total if on_device else event.self_cpu_time_total) / 1e6
        if seconds > 0 and (not on_device or event.device_type == torch.autograd.DeviceType.CUDA):
            kernels[event.key] = kernels.get(event.key, 0.0) + seconds
    by_kind: dict[str, float] = {}
    for name, seconds in kernels.items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + seconds
    top = sorted(kernels.items(), key=lambda item: -item[1])[:TOP]
    return {
        "busy_s": sum(kernels.values()),
        "by_kind_s": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "top_kernels": [{"name": name[:120], "seconds": seconds, "kind": kind_of(name)} for name, seconds in top],
    }


def report(result: dict) -> str:
    busy, wall = result["busy_s"], result["section_wall_s"]
    lines = [f"One section ({result['steps']} steps, {result['backend']}, {result['device']}): {wall:.2f} s wall, "
             f"{busy:.2f} s of kernel time ({busy / wall:.0%} busy)", ""]  # fmt: skip
    return "\n".join(lines + kernel_tables(result))


def kernel_tables(kernels: dict) -> list[str]:
    """`kernel_time`'s figures as two markdown tables: time by kind with its share, then the top kernels."""
    busy = kernels["busy_s"]
    lines = ["| kind | seconds | share |", "|---|---|---|"]
    lines += [f"| {kind} | {seconds:.3f} | {seconds / busy:.1%} |" for kind, seconds in kernels["by_kind_s"].items()]
    lines += ["", "| kernel | kind | seconds |", "|---|---|---|"]
    lines += [f"| `{k['name']}` | {k['kind']} | {k['seconds']:.3f} |" for k in kernels["top_kernels"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("full-random", "tiny"), default="full-random")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backend", choices=("eager", "compile"), default="eager")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("/tmp/profile"))
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace (large at full size)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = profile(args.preset, args.device, args.backend, args.steps, args.out, args.trace)
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    (args.out / "profile.md").write_text(report(result) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
