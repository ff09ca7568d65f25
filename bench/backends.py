"""Every way this product can run FramePack, side by side on the same inputs: one fresh process per backend.

    python bench/backends.py                                  # full size on the GPU: every backend
    python bench/backends.py --configs eager compile --seconds 1 --steps 4 --out /tmp/backends
    python bench/backends.py --configs eager fp8 --extras attention   # eager's extra rows: attention only
    python bench/backends.py --preset tiny --device cpu --configs eager compile --seconds 1 --steps 2

For each backend (`eager`: PyTorch; `compile`: torch.compile of the transformer blocks; `fp8`: FP8 block linears,
compiled where faster; `tensorrt`: Torch-TensorRT engines for every component, each serving once it matches PyTorch,
eager blocks wherever the stack falls back; `fastest`: what every TensorRT flag gives by default, each engine serving
only where it measured faster than PyTorch, the blocks compiled where faster) it times, after a warm-up: text
encoding, image encoding and VAE encoding (medians), one transformer call (median, with its FLOPs counted by PyTorch
where no engine serves it, and the TFLOP/s that makes against the chip's bf16 matrix rate measured in the same run), a
job's steps (their mean) and sections (the VAE decode of a section separately), the time from Start to the first
preview, the whole video and its peak GPU memory. Eager's transformer output and video are the reference (saved in
--out): every other backend reports its output's relative error and its video's PSNR against them (the same seeded
weights and inputs in every process). Where torch.compile runs it also reports the first step after a prompt of
another length (the text's length is a dynamic size: a slow first step there is a recompile) and the graphs it made,
with the reasons it recompiled. The eager process also times a one-section job with the transformer's attention held
to each of PyTorch's kernels (flash, efficient, cuDNN) and jobs under the step caches (TeaCache at three thresholds,
MagCache); with random weights a step cache's skips show its mechanics, not the skips real weights would allow. Prints
a table; writes backends.jsonl, backends.md (the table) and backends.png (time per step and per section by row) into
--out.
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "The girl dances gracefully, with clear movements, full of charm."
CONFIGS = ("eager", "compile", "fp8", "tensorrt", "fastest")
REFERENCE = "eager_reference.pt"  # eager's transformer output and video, which the other processes compare with
ATTENTION_KERNELS = ("flash", "efficient", "cudnn")
EXTRAS = ("attention", "caches")  # the eager process's extra rows: attention kernels, step caches
STEP_CACHES = (("teacache", 0.1), ("teacache", 0.15), ("teacache", 0.25), ("magcache", 0.1))
CHART_COLUMNS = (("s_per_step", "seconds per step"), ("s_per_section", "seconds per section"))


def model_settings(config: str, preset: str, device: str):
    from diffusers_helper.settings import ModelSettings, TensorRTOptions

    if config in ("tensorrt", "fastest"):
        backend = "eager" if config == "tensorrt" else "auto"
        return ModelSettings(preset=preset, device=device, backend=backend, tensorrt=TensorRTOptions(True, True, True))
    if config == "fp8":
        return ModelSettings(preset=preset, device=device, fp8=True)  # what --fp8 gives: compiled where faster
    return ModelSettings(preset=preset, device=device, backend=config)


def run_config(
    config: str, preset: str, device: str, seconds: float, steps: int, runs: int, out: Path, extras: list[str]
) -> list[dict]:
    """One backend in this process: its component and job timings, and for eager the extras asked for."""
    import logging

    import torch

    from diffusers_helper.frontend.startup import (
        default_resolution,
        load_engine,
        plan_for,
        quiet_libraries,
        runtime_for,
    )
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    models = model_settings(config, preset, device)
    runtime = TensorRTRuntime() if config == "tensorrt" else runtime_for(models)
    if runtime is not None and runtime.availability():
        return [{"config": config, "error": f"not available: {runtime.availability()}"}]
    plan = plan_for(models)
    engine = load_engine(models, plan, runtime, keep_video=False)
    resolution = default_resolution(preset)
    image = bucket_image(resolution)
    settings = job_settings(seconds, steps, resolution)
    frames = []
    engine.write_video = lambda video, *_: frames.append(video)  # the frames so far, after every section
    row = {"config": config, **_components(engine, image, runs)}
    call, output = _transformer_call(engine, image, settings, runs)
    row.update(call)
    _job(engine, image, settings)  # warm-up: compiles and builds for every shape the video has
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    row.update(_job(engine, image, settings))
    if plan.device.type == "cuda":
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    row.update(_against_eager(config, out / REFERENCE, output, frames[-1]))
    if engine.models.compiled is not None:
        row.update(_new_prompt_length(engine, image, settings))
        row["torch_compile"] = _dynamo_report()
    row["backends"] = engine.models.backends()
    rows = [row]
    if config == "eager" and "attention" in extras:
        rows += _attention_kernels(engine, image, settings)
    if config == "eager" and "caches" in extras:
        rows += _step_caches(engine, image, settings)
    device_name = torch.cuda.get_device_name() if plan.device.type == "cuda" else "cpu"
    return [{**r, "device": device_name, "torch": torch.__version__, "preset": preset} for r in rows]


def _against_eager(config: str, reference: Path, output, video) -> dict:
    """Eager saves its transformer output and video; the others compare theirs with eager's."""
    import torch

    from diffusers_helper.acceleration.measure import psnr, relative_error

    if config == "eager":
        torch.save({"output": output.cpu(), "video": video}, reference)
        return {}
    if not reference.exists():
        return {}
    saved = torch.load(reference, weights_only=False)
    return {
        "error_vs_eager": relative_error(output.cpu(), saved["output"]),
        "psnr_vs_eager_db": psnr(video, saved["video"]),
    }


def _new_prompt_length(engine, image, settings) -> dict:
    """A prompt of another length after the video: torch.compile's first step on the new text shape against the
    next step (the two are close unless the length recompiled the graphs)."""
    from diffusers_helper.acceleration.measure import synchronize
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.pipeline.events import StepProgress

    longer = job_settings(settings.latent_window * 4 / 30, 3, settings.resolution)
    longer = dataclasses.replace(longer, prompt=" ".join([PROMPT] * 3))
    steps, last = [], time.perf_counter()
    for event in engine.generate(image, longer, JobPaths.for_video(Path(tempfile.mkdtemp()) / "b.mp4"), overwrite=True):
        synchronize()
        now = time.perf_counter()
        if isinstance(event, StepProgress):
            steps.append(now - last)
        last = now
    return {"new_prompt_first_step_s": steps[0], "new_prompt_next_step_s": steps[-1]}


def _dynamo_report() -> dict:
    """How many graphs torch.compile made in this process, and why it recompiled (first reasons per function)."""
    from torch._dynamo.utils import counters, guard_failures

    reasons = {f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]})": failures[:5]
               for code, failures in guard_failures.items()}  # fmt: skip
    return {"graphs": counters["stats"]["unique_graphs"], "recompile_reasons": reasons}


def job_settings(seconds: float, steps: int, resolution: int, **changes):
    from diffusers_helper.settings import GenerationSettings

    chosen = {"step_cache": "off", **changes}
    return GenerationSettings(prompt=PROMPT, seconds=seconds, steps=steps, resolution=resolution, **chosen)


def bucket_image(resolution: int):
    from diffusers_helper.media.buckets import find_nearest_bucket
    from diffusers_helper.media.images import example_image

    height, width = find_nearest_bucket(544, 704, resolution=resolution)  # FramePack's 544x704 at 640
    return example_image(width, height)


def _components(engine, image, runs: int) -> dict:
    """Text, image and VAE encoding, each called on its own (the encoders are where the job would put them)."""
    import torch

    from diffusers_helper.acceleration.measure import median_seconds
    from diffusers_helper.pipeline.conditioning import encode_image, encode_text, image_to_tensor

    pipe, device, dtype = engine.pipe, engine.plan.device, engine.components.transformer.dtype
    pixels = image_to_tensor(image)
    with torch.no_grad():
        return {
            "text_encoding_s": median_seconds(lambda: encode_text(pipe, PROMPT, device, dtype), runs),
            "image_encoding_s": median_seconds(lambda: encode_image(pipe, image, device, dtype), runs),
            "vae_encoding_s": median_seconds(
                lambda: pipe.prepare_image_latents(pixels, dtype=torch.float32, device=device), runs
            ),
        }


def _job(engine, image, settings) -> dict:
    """A whole video: mean step, sampling and decode per section, and the total, from the job's own events."""
    import statistics

    from diffusers_helper.acceleration.measure import synchronize
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.pipeline.events import DECODING, Failed, StageStarted, StepProgress

    marks, steps, first_preview = [], [], None
    paths = JobPaths.for_video(Path(tempfile.mkdtemp()) / "bench.mp4")
    started = last = time.perf_counter()
    for event in engine.generate(image, settings, paths, overwrite=True):
        synchronize()
        now = time.perf_counter()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        if isinstance(event, StepProgress):
            steps.append(now - last)
            if first_preview is None:
                first_preview = now - started
        if isinstance(event, (StageStarted, StepProgress)):
            last = now
        if isinstance(event, StageStarted):
            marks.append((event.stage, now))
    total = time.perf_counter() - started
    decodes = [after - at for (stage, at), (_, after) in zip(marks, marks[1:]) if stage == DECODING]
    sections = len(decodes)
    record = json.loads(paths.sidecar.read_text())
    return {
        "s_per_step": statistics.mean(steps[1:] or steps),  # a mean: a step cache's skips and a recompile count
        "s_per_section": (sum(steps) + sum(decodes)) / sections,
        "vae_decode_s_per_section": statistics.median(decodes),
        "video_s": total,
        "first_preview_s": first_preview,  # from Start to the first step's preview: encoding and one step
        "sections": sections,
        "step_cache": record.get("step_cache"),
    }


def capture_transformer_inputs(engine, image, settings) -> tuple[tuple, dict]:
    """The transformer's arguments in a one-step job of one section at `settings`' resolution: a job's real inputs."""
    captured = []

    def capture(module, args, kwargs) -> None:
        captured.append((args, kwargs))

    handle = engine.components.transformer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _job(engine, image, job_settings(settings.latent_window * 4 / 30, 1, settings.resolution))
    finally:
        handle.remove()
    return captured[0]


def _transformer_call(engine, image, settings, runs: int) -> tuple:
    """One transformer call with a job's real inputs (captured from a one-step job), timed, and its FLOPs counted by
    PyTorch's FlopCounterMode unless a TensorRT engine serves it: achieved TFLOP/s against the chip's bf16 matrix
    rate measured here too. Returns the row and the call's output."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusers_helper.acceleration.measure import median_seconds

    transformer = engine.components.transformer
    args, kwargs = capture_transformer_inputs(engine, image, settings)
    with torch.no_grad():
        output = transformer(*args, **kwargs)
        seconds = median_seconds(lambda: transformer(*args, **kwargs), runs)
        row = {"transformer_call_s": seconds}
        stack = engine.models.runtime.status.get("transformer") if engine.models.runtime is not None else None
        if stack is None or stack.engine != "tensorrt":  # the counter sees no FLOPs inside a TensorRT engine
            # Counted with compiled code held eager: torch.compile meeting the counter's dispatch mode would run
            # that code eagerly for the rest of the process, the jobs included.
            with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
                transformer(*args, **kwargs)
            flops = counter.get_total_flops()
            row.update(transformer_tflop=flops / 1e12, achieved_tflops=flops / seconds / 1e12)
    if engine.plan.device.type == "cuda":
        row["chip_bf16_matmul_tflops"] = _matmul_tflops()
    return row, output[0] if isinstance(output, tuple) else output.sample


def _matmul_tflops(size: int = 8192) -> float:
    import torch

    from diffusers_helper.acceleration.measure import median_seconds

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    return 2 * size**3 / median_seconds(lambda: a @ b, runs=20, warmup=5) / 1e12


def _attention_kernels(engine, image, settings) -> list[dict]:
    """A one-section job with the transformer's attention held to each of PyTorch's kernels in turn, through
    diffusers' attention dispatch (the LLaMA text encoder is a transformers model and keeps PyTorch's choice: flash and
    cuDNN cannot take its mask)."""
    from diffusers.models.attention_dispatch import attention_backend

    one_section = job_settings(settings.latent_window * 4 / 30, settings.steps, settings.resolution)
    rows = []
    for name in ATTENTION_KERNELS:
        row = {"config": f"eager, {name} attention"}
        try:
            with attention_backend(f"_native_{name}"):
                row.update(_job(engine, image, one_section))
        except RuntimeError as error:
            row["error"] = str(error).strip().splitlines()[0][:200]
        rows.append(row)
    return rows


def _step_caches(engine, image, settings) -> list[dict]:
    rows = []
    for cache, threshold in STEP_CACHES:
        changes = {"step_cache": cache, f"{cache}_threshold": threshold}
        job = _job(engine, image, job_settings(settings.seconds, settings.steps, settings.resolution, **changes))
        rows.append({"config": f"eager, {cache} {threshold}", **job})
    return rows


def table(rows: list[dict]) -> str:
    eager = next((r for r in rows if r["config"] == "eager" and "error" not in r), None)
    columns = ("s_per_step", "s_per_section", "video_s", "first_preview_s", "vae_decode_s_per_section", "text_encoding_s",
               "image_encoding_s", "vae_encoding_s", "transformer_call_s", "achieved_tflops", "peak_gpu_gb", "error_vs_eager",
               "psnr_vs_eager_db")  # fmt: skip
    lines = ["| backend | " + " | ".join(columns) + " | step vs eager | step cache (computed/skipped) |",
             "|" + "---|" * (len(columns) + 3)]  # fmt: skip
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['config']} | {row['error']} |" + " |" * (len(columns) + 1))
            continue
        values = [_cell(row.get(c), c) for c in columns]
        ratio = f"{eager['s_per_step'] / row['s_per_step']:.2f}x" if eager else ""
        cache = row.get("step_cache") or {}
        counts = f"{cache.get('computed')}/{cache.get('skipped')}" if "computed" in cache else ""
        lines.append(f"| {row['config']} | " + " | ".join(values) + f" | {ratio} | {counts} |")
    return "\n".join(lines)


def _cell(value, column: str) -> str:
    if not isinstance(value, float):
        return ""
    return f"{value:.2e}" if column == "error_vs_eager" else f"{value:.3f}"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if "error" not in r]
    labels = [r["config"] for r in measured]
    figure, axes = plt.subplots(1, len(CHART_COLUMNS), figsize=(12, 1 + 0.45 * len(labels)), sharey=True)
    for axis, (column, title) in zip(axes, CHART_COLUMNS, strict=True):
        axis.barh(labels, [r[column] for r in measured], color="#4c72b0")
        axis.set_title(title)
    axes[0].invert_yaxis()  # the rows top to bottom as in the table (the axes share it)
    device = measured[0].get("device", "") if measured else ""
    figure.suptitle(f"FramePack by backend ({device}, {measured[0].get('preset', '') if measured else ''})")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--preset", choices=("full-random", "tiny"), default="full-random")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per component (median)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/backends"))
    parser.add_argument("--extras", nargs="*", choices=EXTRAS, default=list(EXTRAS),
                        help="what the eager process also times (default: all)")  # fmt: skip
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: run one backend, print its rows
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        rows = run_config(
            args.one, args.preset, args.device, args.seconds, args.steps, args.runs, args.out, args.extras
        )
        print("RESULT " + json.dumps(rows), flush=True)
        return 0
    rows = []
    for config in args.configs:
        print(f"{config}:", flush=True)
        command = [sys.executable, __file__, "--one", config, "--preset", args.preset, "--device", args.device,
                   "--seconds", str(args.seconds), "--steps", str(args.steps), "--runs", str(args.runs),
                   "--out", str(args.out), "--extras", *args.extras]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        found = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if found:
            produced = json.loads(found[-1].removeprefix("RESULT "))
        else:
            produced = [{"config": config, "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:200]}]
            (args.out / f"stderr_{config}.log").write_text(result.stderr[-20000:])
        for row in produced:
            print(json.dumps(row), flush=True)
        rows += produced
    with open(args.out / "backends.jsonl", "a") as log:
        log.writelines(json.dumps(row) + "\n" for row in rows)
    (args.out / "backends.md").write_text(table(rows) + "\n")
    chart(rows, args.out / "backends.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
