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
    from diffusers_helper.frontend.startup import add_model_arguments
    from diffusers_helper.settings import OUTPUTS_DIR, GenerationSettings

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
    parser.add_argument("--resolution", type=int, help="bucket resolution (default 640, tiny preset 128)")
    parser.add_argument("--teacache", action=argparse.BooleanOptionalAction, default=defaults.teacache)
    parser.add_argument("--teacache-threshold", type=float, default=defaults.teacache_threshold)
    parser.add_argument("--crf", type=int, default=defaults.crf, help="H.264 quality, 0 (lossless) to 51")
    parser.add_argument("--gpu-memory-preservation", type=float, default=defaults.gpu_memory_preservation,
                        help="GB to keep free when offloading")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="debug logging, with tracebacks of fallbacks")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--output", type=Path, help="the MP4 to write (PNG and JSON go beside it)")
    target.add_argument("--outputs", type=Path, default=OUTPUTS_DIR, help="directory for an auto-named job")
    add_model_arguments(parser)
    return parser


def _settings(args: argparse.Namespace):
    from diffusers_helper.frontend.startup import default_resolution
    from diffusers_helper.settings import GenerationSettings

    resolution = args.resolution or default_resolution(args.preset)
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

    from diffusers_helper.pipeline.events import Failed, Finished, SectionFinished, StepProgress

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

    from diffusers_helper.frontend.startup import load_engine, models_dir, tensorrt_options
    from diffusers_helper.media.images import load_input_image
    from diffusers_helper.media.job_files import JobPaths, ensure_writable_dir
    from diffusers_helper.models.components import ModelsUnavailable
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.settings import InvalidSettings
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    try:
        tensorrt = tensorrt_options(args)
        settings = _settings(args)
        image = load_input_image(args.image)
        paths = JobPaths.for_video(args.output) if args.output else JobPaths.new_job(args.outputs)
        ensure_writable_dir(paths.video.parent)
        source = models_dir(args)
        plan = plan_memory(args.device, settings.gpu_memory_preservation)
    except (InvalidSettings, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    runtime = TensorRTRuntime() if tensorrt.enabled else None
    try:
        engine = load_engine(settings.variant, source, plan, tensorrt, runtime)
    except ModelsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    stop = threading.Event()
    _stop_on_ctrl_c(stop)
    code = _run(engine, image, settings, paths, stop)
    for line in runtime.report() if runtime else []:
        print(f"tensorrt: {line}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
