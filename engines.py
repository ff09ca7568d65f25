"""TensorRT engines ahead of time: build them for chosen variants, buckets and windows; list and prune the cache.

Exit codes: 0 done, 1 a build job failed or the cache would not let `prune` remove a file, 2 bad input, 130 stopped
by Ctrl-C (engines finished so far stay cached; running `build` again resumes).
"""

import argparse
import datetime
import functools
import json
import logging
import sys
import time

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 130
COMPONENTS = ("transformer", "text_encoders", "vae")
EPILOG = """The cache is FRAMEPACK_TENSORRT_CACHE_DIR (default Cache/tensorrt_engines); jobs, the app and this command
share it, so an engine built here loads in every later process instead of compiling.

examples:
  python engines.py build --buckets 544x704 --windows 9               # the transformer for one bucket
  python engines.py build --variants framepack f1 --components transformer vae
  python engines.py list
  python engines.py prune --unused-days 30
"""


def build_parser() -> argparse.ArgumentParser:
    from diffusers_helper.frontend.startup import OneLineParser, add_model_source_arguments
    from diffusers_helper.settings import VARIANTS

    parser = OneLineParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    build = commands.add_parser("build", help="build engines for variants x buckets x windows (resumable)")
    build.add_argument("--variants", nargs="+", choices=VARIANTS, default=["framepack"],
                       help="model variants (default: %(default)s)")  # fmt: skip
    build.add_argument("--buckets", nargs="+", metavar="HxW",
                       help="buckets as HEIGHTxWIDTH, e.g. 544x704 (default: every bucket of --resolution)")  # fmt: skip
    build.add_argument("--resolution", type=int, help="the bucket set (default: the preset's, 640 for real models)")
    build.add_argument("--windows", nargs="+", type=int, default=[9], help="latent windows (default: %(default)s)")
    build.add_argument("--components", nargs="+", choices=COMPONENTS, default=["transformer"],
                       help="what to build: transformer, text_encoders (LLaMA and CLIP), vae (default: %(default)s)")  # fmt: skip
    add_model_source_arguments(build.add_argument_group("models"))
    build.add_argument("--verbose", action="store_true", help="log every step and tracebacks")
    commands.add_parser("list", help="what the cache holds: component, input shapes, size, last use; rejections")
    prune = commands.add_parser("prune", help="remove engines (an engine another process is using stays)")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true",
                       help="every engine, the records of rejected engines, and torch.compile's code")  # fmt: skip
    which.add_argument("--unused-days", type=float, metavar="DAYS",
                       help="engines and torch.compile's code not used for this many days")  # fmt: skip
    which.add_argument("--max-gb", type=float, metavar="GB",
                       help="engines, least recently used first, until they fit")  # fmt: skip
    prune.add_argument("--component", help="only this component's engines (e.g. transformer)")
    return parser


def _cache():
    from diffusers_helper.acceleration.engine_cache import EngineCache, default_cache_dir

    return EngineCache(default_cache_dir())


def _speeds(cache):
    from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecords

    return SpeedRecords(cache.directory / SPEED_RECORDS_FILE)


def list_engines() -> int:
    """What the cache holds, most recently used first; reading it changes nothing."""
    from diffusers_helper.acceleration.compiled_blocks import COMPILED_CODE_DIR, compiled_code_files
    from diffusers_helper.acceleration.speed_policy import engine_speedups

    cache = _cache()
    records, speeds = cache.describe(), _speeds(cache)
    if not records:
        print(f"{cache.directory}: no engines")
    else:
        print(f"{cache.directory}: {len(records)} engine(s), {_gb(sum(r['bytes'] for r in records))}")
        for record in reversed(records):  # most recently used first
            print(_engine_line(record, engine_speedups(speeds, record)))
    for record in cache.rejections():  # engines that gave wrong results or failed to build
        print(f"{record['key']}  {record.get('component', '?'):<15} rejected on {record.get('gpu', '?')}: "
              f"{record['rejected']} (`prune --all` lets it be built again)")  # fmt: skip
    for key, problem in cache.unreadable():
        print(f"{key}  {problem}: a later run rebuilds it (`prune --all` removes it now)")
    code = compiled_code_files(cache.directory / COMPILED_CODE_DIR)
    if code:
        print(f"{cache.directory / COMPILED_CODE_DIR}: torch.compile's code, {len(code)} file(s), "
              f"{_gb(sum(path.stat().st_size for path in code))}")  # fmt: skip
    return EXIT_OK


def _gb(count: int) -> str:
    return f"{count / 1024**3:.2f} GB"


def _engine_line(record: dict, speedups: dict[str, float]) -> str:
    used = datetime.datetime.fromtimestamp(record["last_used"]).strftime("%Y-%m-%d %H:%M")
    shapes = " ".join("x".join(str(side) for side in shape) for shape, _ in record.get("inputs", []))
    speed = ", ".join(f"{speedup:.2f}x PyTorch ({versus})" for versus, speedup in speedups.items())
    return (f"{record['key']}  {record.get('component', '?'):<15} {_gb(record['bytes']):>10}  "
            f"used {used}  on {record.get('gpu', '?')}  {speed or 'speed not measured'}  inputs {shapes}")  # fmt: skip


def prune_engines(args: argparse.Namespace) -> int:
    """Remove the engines asked for, the lock files they leave and, with no component named, entries whose record
    cannot be read and torch.compile's code (all of it, or what was unused for the days given); `--all` also forgets
    rejections and the engines' measured speeds."""
    from diffusers_helper.acceleration.compiled_blocks import COMPILED_CODE_DIR, prune_compiled_code

    cache = _cache()
    records = [r for r in cache.describe() if args.component in (None, r.get("component"))]
    if args.all:
        chosen = records
    elif args.unused_days is not None:
        if not args.unused_days >= 0:
            print(f"error: --unused-days must be 0 or more, got {args.unused_days}", file=sys.stderr)
            return EXIT_BAD_INPUT
        chosen = [r for r in records if r["last_used"] < time.time() - args.unused_days * 86400]
    else:
        if not args.max_gb >= 0:
            print(f"error: --max-gb must be 0 or more, got {args.max_gb}", file=sys.stderr)
            return EXIT_BAD_INPUT
        excess, chosen = sum(r["bytes"] for r in records) - args.max_gb * 1024**3, []
        for record in records:  # least recently used first
            if excess <= 0:
                break
            chosen.append(record)
            excess -= record["bytes"]
    try:
        removed = set(cache.prune([r["key"] for r in chosen]))
        freed = sum(r["bytes"] for r in chosen if r["key"] in removed)
        busy = len(chosen) - len(removed)
        print(f"removed {len(removed)} engine(s), {_gb(freed)}" + (f"; {busy} in use stayed" if busy else ""))
        if args.component is None:
            unreadable = cache.prune([key for key, _ in cache.unreadable()])
            if unreadable:
                print(f"removed {len(unreadable)} entr{'y' if len(unreadable) == 1 else 'ies'} whose record could "
                      "not be read")  # fmt: skip
        if args.all:
            rejected = [r["key"] for r in cache.rejections() if args.component in (None, r.get("component"))]
            if rejected:
                print(f"removed {len(cache.prune(rejected))} rejection record(s): those engines will be built again")
            which = {"candidate": "tensorrt", **({"component": args.component} if args.component else {})}
            forgotten = _speeds(cache).forget(which)
            if forgotten:
                print(f"forgot {forgotten} measured engine speed(s): engines will be timed again")
            cache.prune_locks()
        if args.component is None and args.max_gb is None:
            unused = None if args.all else args.unused_days * 86400
            files, freed = prune_compiled_code(cache.directory / COMPILED_CODE_DIR, unused)
            if files:
                print(f"removed {files} file(s) of torch.compile's code, {_gb(freed)}")
    except OSError as error:
        print(f"error: cannot prune {cache.directory}: {error.strerror or error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def build_engines(args: argparse.Namespace) -> int:
    from diffusers_helper.frontend.prebuild import parse_bucket, plan_items, prebuild
    from diffusers_helper.frontend.startup import default_resolution, load_engine, plan_for, quiet_libraries
    from diffusers_helper.models.components import ModelsUnavailable
    from diffusers_helper.settings import InvalidSettings, ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    quiet_libraries()
    try:
        tensorrt = TensorRTOptions(**{component: component in args.components for component in COMPONENTS})
        # One-step jobs that exist to build engines: compiling the blocks as well would only cost time.
        models = ModelSettings(variant=args.variants[0], preset=args.preset, models_dir=args.models,
                               device=args.device, tensorrt=tensorrt, gpu_memory_limit_gb=args.gpu_memory_limit,
                               gpu_memory_preservation=args.gpu_memory_preservation, backend="eager")  # fmt: skip
        resolution = args.resolution or default_resolution(args.preset)
        buckets = [parse_bucket(text) for text in args.buckets] if args.buckets else None
        items = plan_items(args.variants, buckets, args.windows, resolution)
        plan = plan_for(models)
        runtime = TensorRTRuntime(only_if_faster=True)  # each new engine is timed, so `list` shows its speed
        unavailable = runtime.availability()
        if unavailable:
            raise InvalidSettings(f"TensorRT cannot run here: {unavailable}")
    except InvalidSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{len(items)} item(s) into {runtime.cache.directory}", flush=True)
    try:
        loader = functools.partial(load_engine, plan=plan, runtime=runtime, keep_video=False)
        for record in prebuild(models, items, resolution, loader, _say):
            logging.getLogger("diffusers_helper").debug("%s", json.dumps(record))
    except ModelsUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("stopped; engines finished so far stay cached, and `build` again resumes", file=sys.stderr)
        return EXIT_STOPPED
    for line in runtime.report():
        print(f"tensorrt: {line}")
    return EXIT_OK


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    from diffusers_helper.settings import InvalidSettings

    args = build_parser().parse_args(argv)
    try:
        if args.command == "list":
            return list_engines()
        if args.command == "prune":
            return prune_engines(args)
    except InvalidSettings as error:  # a cache variable that names a file
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return build_engines(args)


if __name__ == "__main__":
    from diffusers_helper.frontend.startup import run_script

    run_script(main)
