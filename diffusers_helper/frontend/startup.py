"""What the CLI and the app share at start-up: the model and acceleration flags, and turning them into an engine.

Light at import (the flags are parsed before torch and the models load); the heavy modules load in the functions.
"""

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..settings import DEVICES, VARIANTS, GenerationSettings, InvalidSettings, TensorRTOptions

if TYPE_CHECKING:
    from ..models.placement import MemoryPlan
    from ..pipeline.engine import FramePackEngine
    from ..tensorrt_runtime import TensorRTRuntime


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variant", choices=VARIANTS, default="framepack", help="framepack: end to start; f1: forward")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=("tiny",), help="tiny: small random models built offline, for trying it out"
    )
    source.add_argument("--models", type=Path, help="a local copy of the models in the hub layout <owner>/<repo>")
    tensorrt = parser.add_argument_group("TensorRT (see docs/tensorrt.md)")
    tensorrt.add_argument(
        "--enable-tensorrt", action="store_true", help="TensorRT engines for the VAE encoder and decoder"
    )
    tensorrt.add_argument("--tensorrt-text-encoders", action="store_true", help="also the LLaMA and CLIP text encoders")
    tensorrt.add_argument("--tensorrt-transformer", action="store_true", help="also the transformer's block stack")
    tensorrt.add_argument(
        "--tensorrt-info", action="store_true", help="print GPU, versions and engine cache, then exit"
    )


def tensorrt_options(args: argparse.Namespace) -> TensorRTOptions:
    return TensorRTOptions(args.enable_tensorrt, args.tensorrt_text_encoders, args.tensorrt_transformer)


def default_resolution(preset: str | None) -> int:
    """The bucket resolution a preset is made for: the tiny models are cheap at 128, real ones want 640."""
    from ..models.tiny_preset import TINY_RESOLUTION

    return TINY_RESOLUTION if preset == "tiny" else GenerationSettings(prompt="").resolution


def models_dir(args: argparse.Namespace) -> Path | None:
    """Where to load from: the tiny preset (written on first use), a local copy, or None for the hub."""
    from ..models.tiny_preset import ensure_tiny_models

    if args.models and not args.models.is_dir():
        raise InvalidSettings(f"models directory not found: {args.models}")
    return ensure_tiny_models() if args.preset == "tiny" else args.models


def load_engine(
    variant: str, source: Path | None, plan: "MemoryPlan", options: TensorRTOptions, runtime: "TensorRTRuntime | None"
) -> "FramePackEngine":
    """Load the components, swap in the TensorRT wrappers the options ask for, and place everything."""
    from ..models.assembly import assemble
    from ..models.components import load_components
    from ..pipeline.engine import FramePackEngine

    components = load_components(variant, source, plan.dtypes())
    return FramePackEngine(assemble(components, plan, options, runtime))
