"""What the CLI and the app share at start-up: the model and acceleration flags, and turning them into an engine.

Light at import (the flags are parsed before torch and the models load); the heavy modules load in the functions.
"""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings import DEVICES, PRESETS, VARIANTS, GenerationSettings, ModelSettings, TensorRTOptions

if TYPE_CHECKING:
    from ..models.placement import MemoryPlan
    from ..pipeline.engine import FramePackEngine
    from ..tensorrt_runtime import TensorRTRuntime


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--variant",
        choices=VARIANTS,
        default="framepack",
        help="framepack: generates end to start (anti-drifting); f1: generates forward (default: %(default)s)",
    )
    models.add_argument(
        "--device", choices=DEVICES, default="auto", help="auto: CUDA when PyTorch sees a GPU (default: %(default)s)"
    )
    source = models.add_mutually_exclusive_group()
    source.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="tiny: small random models built offline, for trying it out (the video is noise); "
        "default: the real models from the hub",
    )
    source.add_argument(
        "--models", type=Path, help="a local copy of the models in the hub layout DIR/<owner>/<repo> (default: none)"
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
        "--tensorrt-info", action="store_true", help="print GPU, versions and engine cache, then exit"
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
    """The flags as validated settings; InvalidSettings names the flag that is wrong."""
    tensorrt = TensorRTOptions(args.enable_tensorrt, args.tensorrt_text_encoders, args.tensorrt_transformer)
    return ModelSettings(
        variant=args.variant, preset=args.preset, models_dir=args.models, device=args.device, tensorrt=tensorrt
    )


def default_resolution(preset: str | None) -> int:
    """The bucket resolution a preset is made for: the tiny models are cheap at 128, real ones want 640."""
    from ..models.tiny_preset import TINY_RESOLUTION

    return TINY_RESOLUTION if preset == "tiny" else GenerationSettings(prompt="").resolution


def load_engine(settings: ModelSettings, plan: "MemoryPlan", runtime: "TensorRTRuntime | None") -> "FramePackEngine":
    """Load the components (the tiny preset is written on first use), wrap them as the settings ask, place them."""
    from ..models.assembly import assemble
    from ..models.components import load_components
    from ..models.tiny_preset import ensure_tiny_models
    from ..pipeline.engine import FramePackEngine

    source = ensure_tiny_models() if settings.preset == "tiny" else settings.models_dir
    components = load_components(settings.variant, source, plan.dtypes())
    return FramePackEngine(assemble(components, plan, settings, runtime))
