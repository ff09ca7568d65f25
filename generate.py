"""Headless FramePack: one image and a prompt in, an MP4 out, with a progress bar.

Exit codes: 0 done, 1 failure, 2 bad input, 130 stopped by Ctrl-C (the video so far is kept).
"""

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def build_parser() -> argparse.ArgumentParser:
    from diffusers_helper.paths import OUTPUTS_DIR
    from diffusers_helper.settings import DEVICES, VARIANTS, GenerationSettings

    defaults = GenerationSettings(prompt="")
    parser = _Parser(description="Generate a FramePack video from one image and a prompt.")
    parser.add_argument("--image", type=Path, help="the start image (required unless --tensorrt-info)")
    parser.add_argument("--prompt", default="", help="what happens in the video")
    parser.add_argument("--negative-prompt", default=defaults.negative_prompt, help="used only when --cfg > 1")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="video length, (0, 120]")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="sampling steps per section, 1-100")
    parser.add_argument("--cfg", type=float, default=defaults.cfg, help="real CFG scale; 1 turns it off")
    parser.add_argument("--distilled-cfg", type=float, default=defaults.distilled_cfg, help="distilled guidance")
    parser.add_argument("--cfg-rescale", type=float, default=defaults.cfg_rescale, help="guidance rescale, 0-1")
    parser.add_argument("--latent-window", type=int, default=defaults.latent_window, help="latent frames per section")
    parser.add_argument(
        "--variant", choices=VARIANTS, default=defaults.variant, help="framepack: end to start; f1: forward"
    )
    parser.add_argument("--resolution", type=int, help="bucket resolution (default 640, tiny preset 128)")
    parser.add_argument("--teacache", action=argparse.BooleanOptionalAction, default=defaults.teacache)
    parser.add_argument("--teacache-threshold", type=float, default=defaults.teacache_threshold)
    parser.add_argument("--crf", type=int, default=defaults.crf, help="H.264 quality, 0 (lossless) to 51")
    parser.add_argument("--gpu-memory-preservation", type=float, default=defaults.gpu_memory_preservation,
                        help="GB to keep free when offloading")  # fmt: skip
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--verbose", action="store_true", help="debug logging, with tracebacks of fallbacks")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", type=Path, help="the MP4 to write (PNG and JSON go beside it)")
    target.add_argument("--outputs", type=Path, default=OUTPUTS_DIR, help="directory for an auto-named job")
    tensorrt = parser.add_argument_group("TensorRT (see docs/tensorrt.md)")
    tensorrt.add_argument(
        "--enable-tensorrt", action="store_true", help="TensorRT engines for the VAE encoder and decoder"
    )
    tensorrt.add_argument("--tensorrt-text-encoders", action="store_true", help="also the LLaMA and CLIP text encoders")
    tensorrt.add_argument("--tensorrt-transformer", action="store_true", help="also the transformer's block stack")
    tensorrt.add_argument(
        "--tensorrt-info", action="store_true", help="print GPU, versions and engine cache, then exit"
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--preset", choices=("tiny",), help="tiny: small random models built offline, for trying it out"
    )
    source.add_argument("--models", type=Path, help="a local copy of the models in the hub layout <owner>/<repo>")
    return parser


def _settings(args: argparse.Namespace):
    from diffusers_helper.settings import GenerationSettings
    from diffusers_helper.tiny_preset import TINY_RESOLUTION

    resolution = args.resolution or (TINY_RESOLUTION if args.preset == "tiny" else 640)
    return GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, seconds=args.seconds,
        steps=args.steps, cfg=args.cfg, distilled_cfg=args.distilled_cfg, cfg_rescale=args.cfg_rescale,
        latent_window=args.latent_window, variant=args.variant, resolution=resolution, teacache=args.teacache,
        teacache_threshold=args.teacache_threshold, crf=args.crf, gpu_memory_preservation=args.gpu_memory_preservation,
    )  # fmt: skip


def _quiet_libraries() -> None:
    """Library progress bars and notices would drown the CLI's own progress bar."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def _stop_on_ctrl_c(stop: threading.Event) -> None:
    """First Ctrl-C: finish between steps and keep the video so far; second: quit at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        print("\nstopping after the current step (Ctrl-C again to quit now)", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, handler)


def _run(engine, image, settings, paths, stop: threading.Event) -> int:
    from tqdm import tqdm

    from diffusers_helper.events import Failed, Finished, SectionFinished, StepProgress

    with tqdm(total=settings.sections * settings.steps, unit="step", dynamic_ncols=True) as bar:
        for event in engine.generate(image, settings, paths, stop):
            if isinstance(event, StepProgress):
                bar.set_description(f"section {event.section}/{event.sections}")
                bar.update(1)
            elif isinstance(event, SectionFinished):
                bar.set_postfix(frames=event.frames)
            elif isinstance(event, Failed):
                bar.close()
                print(f"error: {event.message}", file=sys.stderr)
                return EXIT_FAILURE
            elif isinstance(event, Finished):
                bar.close()
                if event.video is None:
                    print("stopped before the first section finished; no video written", file=sys.stderr)
                    return EXIT_STOPPED
                note = f" (stopped after {event.sections_done} of {event.sections} sections)" if event.stopped else ""
                print(f"{event.video}: {event.frames} frames{note}")
                return EXIT_STOPPED if event.stopped else EXIT_OK
    return EXIT_FAILURE


def _print_tensorrt_info() -> int:
    import json

    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    print(json.dumps(TensorRTRuntime().environment(), indent=2))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tensorrt_info:
        return _print_tensorrt_info()
    if args.image is None:
        parser.error("the following arguments are required: --image")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    _quiet_libraries()

    from diffusers_helper.engine import FramePackEngine
    from diffusers_helper.images import load_input_image
    from diffusers_helper.loading import ModelsUnavailable, load_components
    from diffusers_helper.memory import plan_memory
    from diffusers_helper.outputs import JobPaths, ensure_writable_dir
    from diffusers_helper.settings import InvalidSettings
    from diffusers_helper.tensorrt_runtime import TensorRTOptions, TensorRTRuntime, accelerate
    from diffusers_helper.tiny_preset import ensure_tiny_models

    try:
        tensorrt = TensorRTOptions(args.enable_tensorrt, args.tensorrt_text_encoders, args.tensorrt_transformer)
        settings = _settings(args)
        image = load_input_image(args.image)
        paths = JobPaths.for_video(args.output) if args.output else JobPaths.new_job(args.outputs)
        ensure_writable_dir(paths.video.parent)
        if args.models and not args.models.is_dir():
            raise InvalidSettings(f"models directory not found: {args.models}")
        plan = plan_memory(args.device, settings.gpu_memory_preservation)
    except (InvalidSettings, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    models_dir = ensure_tiny_models() if args.preset == "tiny" else args.models
    try:
        components = load_components(settings.variant, models_dir, plan.dtypes())
    except ModelsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    runtime = TensorRTRuntime() if tensorrt.enabled else None
    if runtime:
        accelerate(components, tensorrt, runtime, offloading=plan.offload)
    engine = FramePackEngine(components, plan)
    stop = threading.Event()
    _stop_on_ctrl_c(stop)
    code = _run(engine, image, settings, paths, stop)
    for line in runtime.report() if runtime else []:
        print(f"tensorrt: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
