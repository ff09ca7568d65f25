"""What the CLI and the app share at start-up: the model and acceleration flags, and turning them into an engine.

Light at import (the flags are parsed before torch and the models load); the heavy modules load in the functions.
"""

import argparse
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ..settings import (
    ATTENTION_CHOICES,
    BACKENDS,
    DEVICES,
    MIN_TENSORRT_SPEEDUP,
    PRESETS,
    VARIANTS,
    GenerationSettings,
    InvalidSettings,
    ModelSettings,
    TensorRTOptions,
)

if TYPE_CHECKING:
    from ..models.placement import MemoryPlan
    from ..pipeline.engine import FramePackEngine
    from ..tensorrt_runtime import TensorRTRuntime


EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class OneLineParser(argparse.ArgumentParser):
    """Flags that do not parse are one line on stderr and exit code 2, as every other bad input is."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def run_script(main: Callable[[], int]) -> NoReturn:
    """Run a front end's `main` and exit with its code. Ctrl-C before the front end handles signals itself (while
    torch and the models' libraries import) stops it with one line, not a traceback; once `main` is over, a late
    signal changes nothing."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("stopped (Ctrl-C)", file=sys.stderr)
        code = EXIT_INTERRUPTED
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)


def add_model_arguments(parser: argparse.ArgumentParser, several_gpus: bool = False) -> None:
    """The model flags; `several_gpus`: also `--gpus` (one job over several GPUs, which only the CLI launches)."""
    models = parser.add_argument_group("models")
    models.add_argument(
        "--variant",
        choices=VARIANTS,
        default="framepack",
        help="framepack: generates end to start (anti-drifting); f1: generates forward (default: %(default)s)",
    )
    add_model_source_arguments(models)
    models.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="how the transformer's blocks run when they are not a TensorRT engine, and what such an engine is "
        "timed against: auto = torch.compile where it measured faster than PyTorch on this GPU (measured once, "
        "remembered beside the engine cache; PyTorch on the CPU), compile = always torch.compile, eager = plain "
        "PyTorch (default: %(default)s)",
    )
    models.add_argument(
        "--attention",
        choices=ATTENTION_CHOICES,
        default="sdpa",
        help="the transformer's attention kernel: sdpa = PyTorch's, as FramePack runs it (FramePack's exact video); "
        "auto = the fastest installed kernel that matches it on this GPU (measured once per size, remembered "
        "beside the engine cache); cudnn, flash (flash-attn), flash3 (FlashAttention 3), sage (SageAttention 2, "
        "8-bit: a slightly different video); see docs/attention.md (default: %(default)s)",
    )
    models.add_argument(
        "--fp8",
        action="store_true",
        help="the transformer blocks' matrix multiplications in FP8 (torchao, row-wise scales; modulation, "
        "embedders and output head stay bf16): faster, and the transformer's weights 15.6 GB instead of 24 at full "
        "size, streamed like bf16 ones where the GPU holds less, on GPUs with FP8 (Ada, Hopper, Blackwell); "
        "slightly different video; needs torchao; no LoRAs (default: off)",
    )
    if several_gpus:
        models.add_argument(
            "--gpus",
            type=int,
            default=1,
            help="split each pass of the transformer over this many CUDA GPUs of this machine (context parallelism: "
            "one process per GPU, started through torchrun; every GPU also runs the encoders and the VAE) "
            "(default: %(default)s)",
        )
    tensorrt = parser.add_argument_group("TensorRT (see docs/tensorrt.md)")
    tensorrt.add_argument(
        "--enable-tensorrt", action="store_true", help="TensorRT engines for the VAE encoder and decoder (default: off)"
    )
    tensorrt.add_argument(
        "--tensorrt-text-encoders", action="store_true", help="also the LLaMA and CLIP text encoders (default: off)"
    )
    tensorrt.add_argument(
        "--tensorrt-transformer", action="store_true", help="also the transformer's block stack (default: off)"
    )
    tensorrt.add_argument(
        "--tensorrt-always",
        action="store_true",
        help="use every engine that matches PyTorch, even one that measured no faster than PyTorch on this GPU "
        f"(default: an engine serves only where it ran at least {MIN_TENSORRT_SPEEDUP}x PyTorch's speed, measured "
        "once and kept in the engine cache)",
    )
    tensorrt.add_argument(
        "--tensorrt-info", action="store_true", help="print GPU, versions and engine cache, then exit"
    )


def device_list(text: str) -> list[str]:
    """`--devices 0,1`: GPU numbers, each worker seeing one (by CUDA_VISIBLE_DEVICES)."""
    devices = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in devices):
        raise argparse.ArgumentTypeError(f"GPU numbers separated by commas, e.g. 0,1; got {text!r}")
    return devices


def model_flags(argv: list[str]) -> list[str]:
    """The model flags among a command line's (`add_model_arguments`' own), as given: what a worker process that
    loads the same models is started with."""
    parser = argparse.ArgumentParser(add_help=False)
    add_model_arguments(parser)
    flags, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        action = parser._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is None:
            continue
        flags.append(token)
        if action.nargs == 0 or "=" in token:
            continue
        while rest and not rest[0].startswith("--"):
            flags.append(rest.pop(0))
            if action.nargs is None:
                break
    return flags


def add_model_source_arguments(models: argparse._ArgumentGroup) -> None:
    """Where the models come from and where they run: shared by every command that loads them."""
    models.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when PyTorch sees a GPU (default: %(default)s)"
    )
    source = models.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="tiny: small random models built offline, for trying it out; full-random: every model at its real "
        "size with random weights, for speed and memory tests (both make noise); default: the real models from the hub",
    )
    source.add_argument(
        "--models", type=Path, help="a local copy of the models in the hub layout DIR/<owner>/<repo> (default: none)"
    )
    models.add_argument(
        "--gpu-memory-limit",
        type=float,
        metavar="GB",
        help="never use more GPU memory than this, and plan for it (6 GB up to the card's size; default: no limit)",
    )
    models.add_argument(
        "--gpu-memory-preservation",
        type=float,
        metavar="GB",
        default=ModelSettings().gpu_memory_preservation,
        help="GPU memory to keep free for activations, 0-128: more keeps fewer weights on the GPU (slower); raise it "
        "on out-of-memory errors (default: %(default)s)",
    )


def quiet_libraries() -> None:
    """Library progress bars and notices (truncated prompts, deprecations) would repeat or drown our own."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def print_tensorrt_info() -> int:
    """`--tensorrt-info`: GPU, versions and the engine cache as JSON; exit code 2 for a bad cache variable."""
    import json
    import sys

    from ..settings import InvalidSettings
    from ..tensorrt_runtime import TensorRTRuntime

    try:
        print(json.dumps(TensorRTRuntime().environment(), indent=2))
    except InvalidSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def model_settings(args: argparse.Namespace) -> ModelSettings:
    """The flags as validated settings; InvalidSettings names the flag (or the engine cache variable) that is
    wrong."""
    from ..acceleration.engine_cache import default_cache_dir

    tensorrt = TensorRTOptions.from_flags(
        args.enable_tensorrt, args.tensorrt_text_encoders, args.tensorrt_transformer, args.tensorrt_always
    )
    settings = ModelSettings(
        variant=args.variant, preset=args.preset, models_dir=args.models, device=args.device, tensorrt=tensorrt,
        gpu_memory_limit_gb=args.gpu_memory_limit, gpu_memory_preservation=args.gpu_memory_preservation,
        backend=args.backend, attention=args.attention, fp8=args.fp8, gpus=getattr(args, "gpus", 1),
    )  # fmt: skip
    if tensorrt.enabled or settings.backend != "eager":  # engines and measured speeds live in the cache directory
        default_cache_dir()
    return settings


def runtime_for(settings: ModelSettings) -> "TensorRTRuntime | None":
    """The TensorRT runtime the settings ask for (None without TensorRT): engines serve where they are faster than
    PyTorch, or wherever they match it with `--tensorrt-always`."""
    from ..tensorrt_runtime import TensorRTRuntime

    if not settings.tensorrt.enabled:
        return None
    return TensorRTRuntime(only_if_faster=not settings.tensorrt.always)


def plan_for(settings: ModelSettings, free_gb: float | None = None) -> "MemoryPlan":
    """The memory plan for these models; InvalidSettings when it cannot work (a bad limit, the full-size preset
    without a GPU, whose float32 weights would need about 90 GB of RAM)."""
    from ..acceleration.attention import check_attention
    from ..models.placement import grow_cuda_segments, plan_memory

    grow_cuda_segments()
    plan = plan_memory(settings.device, settings.gpu_memory_preservation, settings.gpu_memory_limit_gb, free_gb,
                       tensorrt_transformer=settings.tensorrt.enabled and settings.tensorrt.transformer)  # fmt: skip
    if settings.preset == "full-random" and plan.device.type == "cpu":
        raise InvalidSettings("the full-random preset needs a CUDA GPU; on the CPU use --preset tiny")
    check_attention(settings.attention, plan.device)
    return plan


def default_resolution(preset: str | None) -> int:
    """The bucket resolution a preset is made for: the tiny models are cheap at 128, real ones want 640."""
    from ..models.tiny_preset import TINY_RESOLUTION

    return TINY_RESOLUTION if preset == "tiny" else GenerationSettings(prompt="").resolution


def load_engine(
    settings: ModelSettings, plan: "MemoryPlan", runtime: "TensorRTRuntime | None", keep_video: bool = True
) -> "FramePackEngine":
    """Load the components (presets are built on first use), wrap them as the settings ask, place them. Without
    `keep_video` the engine writes no MP4 (engine prebuilds, benchmarks: the frames are not wanted)."""
    from ..models.assembly import assemble
    from ..models.components import load_components
    from ..models.full_size_preset import full_size_components
    from ..models.placement import apply_limit, return_freed_host_memory, weight_store
    from ..models.tiny_preset import ensure_tiny_models
    from ..pipeline.engine import FramePackEngine

    apply_limit(plan)
    return_freed_host_memory()
    if settings.preset == "full-random":
        components = full_size_components(settings.variant, plan.dtypes(), weight_store(plan))
    else:
        source = ensure_tiny_models() if settings.preset == "tiny" else settings.models_dir
        components = load_components(settings.variant, source, plan.dtypes())
    models = assemble(components, plan, settings, runtime)
    return FramePackEngine(models) if keep_video else FramePackEngine(models, write_video=_discard_video)


def _discard_video(*args) -> None:
    return None
