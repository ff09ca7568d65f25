"""A job queue that survives restarts: add jobs, list them, run them, cancel, retry, reorder, export and import.

Exit codes: 0 done, 1 a job failed or the store could not be used, 2 bad input, 130/143 stopped by Ctrl-C/SIGTERM
(the running job stops after its current step and keeps its video so far; the rest stay queued).
"""

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from diffusers_helper.frontend.signals import EXIT_STOPPED, Interrupted, stop_on_signals

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
EPILOG = """The store is outputs/jobs.sqlite3 unless --jobs-db says otherwise; `jobs.py run` works through it until it
is empty (--watch: keeps waiting for new jobs), and a job that was running when its worker stopped comes back as
stopped, to be retried.

examples:
  python jobs.py add --preset tiny --image example.png --prompt "a cat walks" --seconds 2
  python jobs.py add --file jobs.jsonl                 # one job a line, each shaped like a job's JSON
  python jobs.py list
  python jobs.py run --preset tiny
  python jobs.py retry 3
"""


def build_parser() -> argparse.ArgumentParser:
    from diffusers_helper.frontend.startup import OneLineParser, add_model_arguments, device_list
    from diffusers_helper.settings import OUTPUTS_DIR

    parser = OneLineParser(description=__doc__.splitlines()[0], epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--jobs-db", type=Path, default=OUTPUTS_DIR / "jobs.sqlite3",
                        help="the job store (default: outputs/jobs.sqlite3 in the checkout)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add = commands.add_parser("add", help="queue a job (generate.py's job flags) or the jobs of a JSONL file",
                              add_help=False)  # fmt: skip
    add.add_argument("--file", type=Path, help="one job a line, each shaped like a job's JSON")
    commands.add_parser("list", help="every job: id, state, prompt, progress, video")
    run = commands.add_parser("run", help="run the queued jobs, one after the other")
    run.add_argument("--watch", action="store_true", help="keep waiting for new jobs once the queue is empty")
    run.add_argument("--workers", type=int, help="worker processes, each loading its own models and claiming jobs "
                     "from the store (default: one per --devices entry, else 1)")  # fmt: skip
    run.add_argument("--devices", type=device_list, metavar="0,1",
                     help="the GPUs the workers run on, in turn (each worker sees one, by CUDA_VISIBLE_DEVICES)")  # fmt: skip
    run.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)  # a worker that --workers started
    add_model_arguments(run)
    for name, text in (("cancel", "cancel a queued job, or stop a running one after its current step"),
                       ("retry", "queue a stopped, failed or cancelled job again")):  # fmt: skip
        command = commands.add_parser(name, help=text)
        command.add_argument("id", type=int)
    move = commands.add_parser("move", help="move a queued job earlier (or, negative, later) in the queue")
    move.add_argument("id", type=int)
    move.add_argument("places", type=int, help="how many places earlier; negative: later")
    for name, text in (("export", "write every job to a JSONL file"), ("import", "queue the jobs of a JSONL file")):
        command = commands.add_parser(name, help=text)
        command.add_argument("file", type=Path)
    return parser


def run_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """`run` in worker processes of their own, each on its GPU (round robin over --devices), the store shared:
    Ctrl-C and SIGTERM reach each worker once (the first stops its job after the current step, a second at once)."""
    from diffusers_helper.frontend.startup import model_settings

    devices = args.devices or []
    count = args.workers if args.workers is not None else max(len(devices), 1)
    if count < 1:
        print(f"error: --workers must be 1 or more, got {count}", file=sys.stderr)
        return EXIT_BAD_INPUT
    model_settings(args)  # bad model flags are one line here, not one per worker
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--in-process"]
    children = []
    for number in range(count):
        environment = dict(os.environ)
        if devices:
            environment["CUDA_VISIBLE_DEVICES"] = devices[number % len(devices)]
        children.append(subprocess.Popen(command, env=environment, start_new_session=True))

    def forward(signum, frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in EXIT_STOPPED}
    try:
        codes = [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    stopped = [code for code in codes if code in EXIT_STOPPED.values()]
    if stopped:
        return stopped[0]
    failed = [code for code in codes if code != EXIT_OK]
    return (failed[0] if failed[0] > 0 else EXIT_FAILURE) if failed else EXIT_OK  # < 0: a worker killed by a signal


def jobs_from_flags(flags: list[str]) -> list[tuple[dict, Path]]:
    """`add` with generate.py's job flags, checked as generate.py checks them (InvalidSettings): each job's record
    and outputs folder."""
    import generate
    from diffusers_helper.jobs.worker import job_record
    from diffusers_helper.settings import InvalidSettings

    parser = generate.build_parser()
    args = parser.parse_args(flags)
    if args.from_job is not None:  # an earlier job's values, the flags given over them
        parser.set_defaults(**generate.earlier_job(args.from_job))
        args = parser.parse_args(flags)
    if args.image is None and args.extend is None:
        raise InvalidSettings("the following arguments are required: --image (or --extend)")
    settings = generate.job_settings(args)
    generate.checked_inputs(args, settings)  # refused now, not when its turn comes
    jobs = []
    for settings, paths in generate.numbered_jobs(args, settings):
        record = job_record(settings, args.image)
        if args.output is not None:
            record["output"] = str(paths.video.resolve())
        jobs.append((record, args.outputs))
    return jobs


def jobs_from_file(path: Path) -> list[tuple[dict, Path]]:
    """Every line's job of a JSONL file, each checked (InvalidSettings names the first bad line)."""
    from diffusers_helper.media.job_files import settings_from_record
    from diffusers_helper.settings import OUTPUTS_DIR, InvalidSettings

    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidSettings(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from error
    jobs = []
    for number, line in enumerate(lines, start=1):
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise InvalidSettings(f"{where}: not JSON ({error})") from error
        settings_from_record(record, where)
        jobs.append((record, Path(record.get("outputs") or OUTPUTS_DIR)))
    return jobs


def queue(store, jobs: list[tuple[dict, Path]]) -> int:
    ids = [store.add(record, outputs) for record, outputs in jobs]
    print(
        "queued no jobs" if not ids else f"queued job {ids[0]}" if len(ids) == 1 else f"queued jobs {ids[0]}-{ids[-1]}"
    )
    return EXIT_OK


def list_jobs(store) -> int:
    jobs = store.jobs()
    if not jobs:
        print(f"{store.path}: no jobs")
    for job in jobs:
        total = job.sections_total
        progress = f"{job.sections_done}/{total} sections" if total else "-"
        prompt = job.settings.get("settings", {}).get("prompt", "")
        prompt = prompt if len(prompt) <= 40 else prompt[:39] + "…"
        detail = job.error or (str(job.video) if job.video else "")
        print(f"{job.id:>5}  {job.state.value:<9}  {prompt:<40}  {progress:<13}  {detail}".rstrip())
    return EXIT_OK


def export_jobs(store, path: Path) -> int:
    lines = [json.dumps({**job.settings, "outputs": str(job.outputs)}) for job in store.jobs()]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    print(f"{path}: {len(lines)} job(s)")
    return EXIT_OK


def run_jobs(store, args: argparse.Namespace) -> int:
    from diffusers_helper.frontend.startup import load_engine, model_settings, plan_for, runtime_for
    from diffusers_helper.jobs.store import JobState, this_worker
    from diffusers_helper.jobs.worker import QueueWorker
    from diffusers_helper.models.components import ModelsUnavailable

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.INFO)
    models = model_settings(args)
    plan, runtime = plan_for(models), runtime_for(models)
    stop, received = threading.Event(), []
    try:
        with stop_on_signals(stop, received):
            try:
                engine = load_engine(models, plan, runtime)
            except ModelsUnavailable as error:
                print(f"error: {error}", file=sys.stderr)
                return EXIT_FAILURE
            worker = QueueWorker(engine, store, this_worker(), stop, print)
            ended = worker.run(watch=args.watch)
    except Interrupted as interrupted:
        print(f"stopped at once ({interrupted}); the video so far is kept", file=sys.stderr)
        return EXIT_STOPPED[interrupted.signum]
    if received:
        return EXIT_STOPPED[received[0]]
    return EXIT_FAILURE if JobState.FAILED in ended else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    from diffusers_helper.frontend.startup import quiet_libraries
    from diffusers_helper.jobs.store import JobStore, JobStoreError
    from diffusers_helper.settings import InvalidSettings

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    quiet_libraries()
    if rest and args.command != "add":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in ("add", "import"):  # every job checked before the store is opened (or made)
            jobs = jobs_from_file(args.file) if args.file else jobs_from_flags(rest)
            return queue(JobStore(args.jobs_db), jobs)
        store = JobStore(args.jobs_db)
        if args.command == "list":
            return list_jobs(store)
        if args.command == "export":
            return export_jobs(store, args.file)
        if args.command == "cancel":
            state = store.cancel(args.id)
            print(f"job {args.id}: " + ("cancelled" if state.value == "cancelled" else "stops after its current step"))
            return EXIT_OK
        if args.command == "move":
            store.move(args.id, args.places)
            return list_jobs(store)
        if args.command == "retry":
            store.retry(args.id)
            print(f"job {args.id} queued again")
            return EXIT_OK
        if args.in_process or (args.workers in (None, 1) and not args.devices):
            return run_jobs(store, args)
        return run_workers(args, sys.argv[1:] if argv is None else argv)
    except JobStoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except InvalidSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    from diffusers_helper.frontend.startup import run_script

    run_script(main)
