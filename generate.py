"""Headless FramePack: one image and a prompt in, an MP4 out, with a progress bar.

Exit codes: 0 done, 1 failure, 2 bad input, 130 stopped by Ctrl-C, 143 stopped by SIGTERM (the video so far is
kept in both cases, and its JSON says "stopped").
"""

import argparse
import contextlib
import dataclasses
import itertools
import logging
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from diffusers_helper.frontend.signals import EXIT_STOPPED, Interrupted, stop_on_signals

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EPILOG = """exit codes:
  0    the video is complete
  1    the job failed (models could not load, generation failed); the message says why
  2    bad input (settings, image, output path, LoRA files); nothing was written
  130  stopped with Ctrl-C: the first stops after the current step, a second at once
  143  stopped by SIGTERM (a second SIGTERM or Ctrl-C stops at once)
  Stopped jobs keep the video so far; their JSON says "stopped" and no temporary file is left behind.

examples:
  python generate.py --preset tiny --image example.png --prompt "a cat walks" --seconds 2
  python generate.py --image photo.jpg --prompt "The girl dances gracefully." --seconds 5 --enable-tensorrt
  python generate.py --image photo.jpg --prompt "A cat turns." --lora loras/turn.safetensors:0.8 --lora loras/style.safetensors
  python generate.py --variant f1 --extend outputs/cat.mp4 --prompt "The cat walks away." --seconds 3
"""


class _TeaCacheFlag(argparse.Action):
    """--teacache / --no-teacache, from before there was a choice of step caches: --step-cache teacache / off."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, "off" if option_string == "--no-teacache" else "teacache")


def build_parser() -> argparse.ArgumentParser:
    from diffusers_helper.frontend.startup import OneLineParser, add_model_arguments
    from diffusers_helper.settings import OUTPUTS_DIR, STEP_CACHES, GenerationSettings

    defaults = GenerationSettings(prompt="")
    parser = OneLineParser(
        description="Generate a FramePack video from one image and a prompt, or continue a video.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    job = parser.add_argument_group("job")
    job.add_argument("--image", type=Path,
                     help="the start image (required unless --extend, --from or --tensorrt-info)")  # fmt: skip
    job.add_argument("--extend", type=Path, metavar="VIDEO",
                     help="continue this video (any video file; resampled to 30 fps and cut to its bucket): the "
                          "new sections follow its last frames, and the MP4 holds its frames, then the new ones "
                          "(default: none)")  # fmt: skip
    job.add_argument(
        "--extend-only-new", action="store_true", help="with --extend, write only the new frames (default: off)"
    )
    job.add_argument("--from", dest="from_job", type=Path, metavar="JOB.json",
                     help="every setting of an earlier job, from its JSON (or its MP4, with the JSON beside it), "
                          "with its input image as used; the flags given beside it override single values "
                          "(default: none)")  # fmt: skip
    job.add_argument(
        "--count",
        type=int,
        default=1,
        help="how many videos, with the seeds --seed, --seed + 1, ... (default: %(default)s)",
    )
    job.add_argument("--end-image", type=Path, help="the last frame to aim at (framepack variant only; default: none)")
    job.add_argument(
        "--end-strength",
        type=float,
        default=defaults.end_strength,
        help="how strongly the video's end holds to --end-image, in [0, 1] (default: %(default)s)",
    )
    job.add_argument("--prompt", default="",
                     help="what happens in the video, or a timeline: '[0s: a cat sits] [2s: the cat stands up]' "
                          "(default: empty)")  # fmt: skip
    job.add_argument(
        "--prompt-blend",
        type=int,
        default=defaults.prompt_blend,
        help="sections over which a timeline's prompts fade into each other (default: %(default)s)",
    )
    job.add_argument("--negative-prompt", default=defaults.negative_prompt,
                     help="what to avoid; used only when --cfg > 1 (default: empty)")  # fmt: skip
    job.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    job.add_argument("--seconds", type=float, default=defaults.seconds,
                     help="video length in seconds, (0, 120] (default: %(default)s)")  # fmt: skip
    job.add_argument("--steps", type=int, default=defaults.steps,
                     help="sampling steps per section, 1-100; best left alone (default: %(default)s)")  # fmt: skip
    job.add_argument("--cfg", type=float, default=defaults.cfg,
                     help="real CFG scale, 1-32; 1 turns it off (default: %(default)s)")  # fmt: skip
    job.add_argument("--distilled-cfg", type=float, default=defaults.distilled_cfg,
                     help="distilled guidance, 1-32 (default: %(default)s)")  # fmt: skip
    job.add_argument("--cfg-rescale", type=float, default=defaults.cfg_rescale,
                     help="guidance rescale, 0-1 (default: %(default)s)")  # fmt: skip
    job.add_argument("--latent-window", type=int, default=defaults.latent_window,
                     help="latent frames per section, 1-33 (default: %(default)s)")  # fmt: skip
    job.add_argument("--resolution", type=int,
                     help="bucket resolution, 128-1280 (default: 640; 128 with --preset tiny)")  # fmt: skip
    caching = job.add_mutually_exclusive_group()
    caching.add_argument("--step-cache", choices=STEP_CACHES, default=defaults.step_cache,
                         help="skip transformer steps that change little, with TeaCache or MagCache: faster, often "
                              "slightly worse hands and fingers (default: %(default)s)")  # fmt: skip
    caching.add_argument("--teacache", "--no-teacache", action=_TeaCacheFlag, dest="step_cache",
                         default=argparse.SUPPRESS,
                         help="kept from earlier versions: --step-cache teacache, or off with --no-teacache "
                              "(default: not given)")  # fmt: skip
    job.add_argument("--teacache-threshold", type=float, default=defaults.teacache_threshold,
                     help="TeaCache's threshold, (0, 1]: higher skips more (default: %(default)s)")  # fmt: skip
    job.add_argument("--magcache-threshold", type=float, default=defaults.magcache_threshold,
                     help="MagCache's error threshold, (0, 1]: higher skips more (default: %(default)s)")  # fmt: skip
    job.add_argument("--magcache-max-skips", type=int, default=defaults.magcache_max_skips,
                     help="MagCache's most steps skipped in a row, 1-10 (default: %(default)s)")  # fmt: skip
    job.add_argument("--magcache-retention", type=float, default=defaults.magcache_retention,
                     help="the fraction of each section's first steps MagCache always computes, [0, 1] "
                          "(default: %(default)s)")  # fmt: skip
    job.add_argument("--crf", type=int, default=defaults.crf,
                     help="H.264 quality, 0 (lossless) to 51; 16 for black outputs (default: %(default)s)")  # fmt: skip
    job.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                     help="a LoRA for the transformer (diffusers/PEFT or kohya/musubi-tuner safetensors) and its "
                          "scale, in [-10, 10]; repeat to mix several (default: none; scale 1.0)")  # fmt: skip
    output = parser.add_argument_group("output")
    target = output.add_mutually_exclusive_group()
    target.add_argument("--output", type=Path, help="the MP4 to write; its PNG and JSON go beside it (default: a new "
                        "job name in --outputs)")  # fmt: skip
    target.add_argument("--outputs", type=Path, default=OUTPUTS_DIR,
                        help="directory for an auto-named job (default: outputs/ in the checkout)")  # fmt: skip
    output.add_argument("--overwrite", action="store_true",
                        help="replace an earlier job's MP4, PNG and JSON at --output (default: refuse)")  # fmt: skip
    output.add_argument("--verbose", action="store_true", help="debug logging, with tracebacks (default: off)")
    add_model_arguments(parser, several_gpus=True)
    return parser


def job_settings(args: argparse.Namespace):
    from diffusers_helper.frontend.startup import default_resolution
    from diffusers_helper.settings import GenerationSettings, LoraChoice

    resolution = default_resolution(args.preset) if args.resolution is None else args.resolution
    return GenerationSettings(
        prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, seconds=args.seconds,
        steps=args.steps, cfg=args.cfg, distilled_cfg=args.distilled_cfg, cfg_rescale=args.cfg_rescale,
        latent_window=args.latent_window, variant=args.variant, resolution=resolution, step_cache=args.step_cache,
        teacache_threshold=args.teacache_threshold, magcache_threshold=args.magcache_threshold,
        magcache_max_skips=args.magcache_max_skips, magcache_retention=args.magcache_retention, crf=args.crf,
        loras=tuple(LoraChoice.parse(text) for text in args.lora), end_image=args.end_image,
        end_strength=args.end_strength, prompt_blend=args.prompt_blend, extend=args.extend,
        extend_only_new=args.extend_only_new,
    )  # fmt: skip


def checked_inputs(args: argparse.Namespace, settings):
    """The job's files read now, before any model loads (the start image, returned; LoRAs, the video to extend, the
    end image), and the output paths checked; InvalidSettings names the first that will not do."""
    from diffusers_helper.media.images import load_input_image
    from diffusers_helper.media.job_files import ensure_writable_dir
    from diffusers_helper.media.video import check_video
    from diffusers_helper.models.lora import read_lora
    from diffusers_helper.settings import InvalidSettings

    for choice in settings.loras:  # how they fit the model is checked once it is loaded
        read_lora(choice.path)
    image = None if args.image is None else load_input_image(args.image)
    if settings.extend is not None:  # its frames are read in the job
        check_video(settings.extend, "the video to extend")
    if settings.end_image is not None:
        load_input_image(settings.end_image, "end image")
    if args.count < 1:
        raise InvalidSettings(f"--count must be 1 or more, got {args.count}")
    for _, paths in numbered_jobs(args, settings):
        ensure_writable_dir(paths.video.parent)
        paths.check(args.overwrite, inputs=[path for path in (args.image, settings.end_image, settings.extend) if path])
    return image


def numbered_jobs(args: argparse.Namespace, settings) -> list:
    """(settings, paths) of each video `--count` asks for: seeds from `--seed` on; with `--output x.mp4`, the
    videos after the first are x_2.mp4, x_3.mp4, ..."""
    from diffusers_helper.media.job_files import JobPaths

    jobs = []
    for number in range(args.count):
        if args.output is None:
            paths = JobPaths.new_job(args.outputs)
            while paths in [taken for _, taken in jobs]:  # named in the same millisecond, by the same chance
                paths = JobPaths.new_job(args.outputs)
        else:
            name = args.output if number == 0 else args.output.with_name(f"{args.output.stem}_{number + 1}.mp4")
            paths = JobPaths.for_video(name)
        jobs.append((dataclasses.replace(settings, seed=settings.seed + number), paths))
    return jobs


def earlier_job(path: Path) -> dict:
    """The flags' values that make an earlier job again (its settings, and its start image as used), from its JSON
    or its MP4; InvalidSettings for a file that is neither."""
    from diffusers_helper.media.job_files import read_job
    from diffusers_helper.settings import InvalidSettings

    try:
        job = read_job(path)
    except InvalidSettings as error:
        raise InvalidSettings(f"--from {error}") from error
    values = {name: value for name, value in job.settings.to_dict().items() if name != "loras"}  # the flags' names
    values["lora"] = [f"{lora.path}:{lora.scale}" for lora in job.settings.loras]
    if job.image is not None:
        values["image"] = job.image
    return values


def _run(engine, image, settings, paths, stop: threading.Event, overwrite: bool) -> int | None:
    """Run the job with a progress bar; the exit code, or None when it was stopped."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from diffusers_helper.frontend.progress import ProgressText
    from diffusers_helper.pipeline.events import Failed, Finished, SectionFinished, StageStarted, StepProgress

    events = engine.generate(image, settings, paths, stop, overwrite=overwrite)
    first = next(events)
    if isinstance(first, Failed):  # refused before it started (a bad LoRA): no progress bar
        return _failed(first)
    progress = ProgressText(settings.sections, settings.steps)
    bar_format = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"
    bar = tqdm(total=settings.sections * settings.steps, bar_format=bar_format, dynamic_ncols=True, file=sys.stderr)
    with bar, logging_redirect_tqdm():  # log lines go above the bar, never onto it
        for event in itertools.chain([first], events):
            progress.update(event)
            if isinstance(event, StageStarted) and event.section:
                bar.set_description(f"section {event.section}/{event.sections} {event.stage}")
            elif isinstance(event, StepProgress):
                bar.update(1)
            if isinstance(event, StepProgress | SectionFinished) and progress.left_text():
                bar.set_postfix_str(progress.left_text(), refresh=False)
            if isinstance(event, Failed):
                bar.close()
                return _failed(event)
            if isinstance(event, Finished):
                bar.close()
                if event.video is None:
                    print("stopped before the first section finished; no video written", file=sys.stderr)
                    return None if event.stopped else EXIT_FAILURE
                stopped = f", stopped after {event.sections_done} of {event.sections} sections" if event.stopped else ""
                print(f"{event.video}: {event.frames} frames{stopped}")
                logging.getLogger("diffusers_helper").info("%s", progress.final(event))
                return None if event.stopped else EXIT_OK
    return EXIT_FAILURE


def _failed(event) -> int:
    print(f"error: {event.message}", file=sys.stderr)
    return EXIT_BAD_INPUT if event.bad_input else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = given = parser.parse_args(argv)
    if args.from_job is not None:
        from diffusers_helper.settings import InvalidSettings

        try:
            parser.set_defaults(**earlier_job(args.from_job))
        except InvalidSettings as error:
            print(f"error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        args = parser.parse_args(argv)  # the flags given override the job's values
    if given.image is not None and given.extend is not None:
        parser.error("--image and --extend: a video to extend gives the job its start frame; give one of them")
    if given.image is not None:  # over an earlier extension's video
        args.extend, args.extend_only_new = None, given.extend_only_new
    elif args.extend is not None:  # over an earlier job's start image
        args.image = None
    if args.tensorrt_info:
        from diffusers_helper.frontend.startup import print_tensorrt_info

        return print_tensorrt_info()
    if args.image is None and args.extend is None:
        parser.error("the following arguments are required: --image (or --extend)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from diffusers_helper.frontend.startup import model_settings, plan_for, quiet_libraries, runtime_for
    from diffusers_helper.parallel.launch import check_gpus, launched_rank, ranks_joined, run_ranks
    from diffusers_helper.settings import InvalidSettings

    quiet_libraries()
    try:
        models = model_settings(args)
        check_gpus(models)
        settings = job_settings(args)
        image = checked_inputs(args, settings)
        if models.gpus > 1 and launched_rank() is None:  # this process starts the job's processes, one per GPU
            return run_ranks(__file__, sys.argv[1:] if argv is None else argv, models.gpus)
        with ranks_joined(models) as rank, _outputs_of_rank(args, rank):
            jobs = numbered_jobs(args, settings)
            plan = plan_for(models)
            runtime = runtime_for(models)
            if rank:
                return _follow(models, jobs, image, plan, runtime)
            return _run_answering_signals(args, models, jobs, image, plan, runtime)
    except InvalidSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _run_answering_signals(args, models, jobs, image, plan, runtime) -> int:
    stop, received = threading.Event(), []
    try:
        with stop_on_signals(stop, received):
            return _load_and_run(args, models, jobs, image, plan, runtime, stop, received)
    except Interrupted as interrupted:
        print(f"stopped at once ({interrupted}); the video so far is kept", file=sys.stderr)
        return EXIT_STOPPED[interrupted.signum]


@contextlib.contextmanager
def _outputs_of_rank(args: argparse.Namespace, rank: int) -> Iterator[None]:
    """The first rank writes the job's files where the flags say; another rank of a `--gpus` job makes the same video
    (its latents are the first rank's) into a scratch directory that goes when it ends. Ctrl-C is the first rank's to
    answer: torchrun then ends the others."""
    if rank == 0:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with tempfile.TemporaryDirectory(prefix=f"framepack-rank{rank}-") as scratch:
        args.outputs, args.output = Path(scratch), None
        yield


def _follow(models, jobs, image, plan, runtime) -> int:
    """Another rank's share of a `--gpus` run: the same jobs, in silence, the first rank's exit codes."""
    from diffusers_helper.frontend.startup import load_engine
    from diffusers_helper.pipeline.events import Failed, Finished

    engine = load_engine(models, plan, runtime)
    for settings, paths in jobs:
        for event in engine.generate(image, settings, paths, threading.Event(), overwrite=True):
            if isinstance(event, Failed):
                return _failed(event)
            if isinstance(event, Finished) and event.video is None:
                return EXIT_FAILURE
    return EXIT_OK


def _load_and_run(args, models, jobs, image, plan, runtime, stop: threading.Event, received: list) -> int:
    from diffusers_helper.frontend.startup import load_engine
    from diffusers_helper.models.components import ModelsUnavailable

    logging.getLogger("diffusers_helper").info("loading models: %s", models.describe_source())
    try:
        engine = load_engine(models, plan, runtime)
    except ModelsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    code = EXIT_OK
    for settings, paths in jobs:  # one after the other; a failed or stopped job ends the run
        code = None if stop.is_set() else _run(engine, image, settings, paths, stop, args.overwrite)
        if code != EXIT_OK:
            break
    for line in runtime.report() if runtime else []:
        print(f"tensorrt: {line}", file=sys.stderr)
    if engine.models.blocks() is not None:
        print(f"transformer blocks: {engine.models.blocks()}", file=sys.stderr)
    return EXIT_STOPPED[received[0]] if code is None else code


if __name__ == "__main__":
    from diffusers_helper.frontend.startup import run_script

    run_script(main)
