"""FramePack in the browser: Gradio controls in, engine events out. No generation logic lives here.

    python demo_gradio.py --preset tiny          # offline, on the CPU
    python demo_gradio.py --enable-tensorrt      # real models (see README.md)

Jobs go into the job store shared with jobs.py; each page follows its own, and its End stops only its own.
"""

import argparse
import dataclasses
import gc
import html
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("diffusers_helper.app")

QUICK_PROMPT_LABEL = "Quick prompts"
TIMELINE_HELP = (
    "One prompt for the whole video, or a timeline from 0s, as the video plays: "
    "[0s: a cat sits] [2s: the cat stands up] [4s-6s: the cat walks away]"
)
MAX_VIDEOS = 20  # the app's "Number of videos"
STEP_CACHE_CHOICES = {"TeaCache": "teacache", "MagCache": "magcache", "Off": "off"}  # label: settings value
INVERTED_ORDER_NOTE = (
    "Note that the ending actions will be generated before the starting actions due to the inverted sampling. "
    "If the starting action is not in the video, you just need to wait, and it will be generated later."
)


def progress_html(fraction: float, text: str, notices: list[str] = ()) -> str:
    notes = "".join(f"<div>note: {html.escape(notice)}</div>" for notice in notices)
    return (
        f'<progress value="{fraction * 100:.0f}" max="100" style="width:100%"></progress>'
        f"<div>{html.escape(text)}</div>{notes}"
    )


def completed(event) -> bool:
    """Whether a job's last event says it made its whole video."""
    from diffusers_helper.pipeline.events import Finished

    return isinstance(event, Finished) and not event.stopped


def recorded_loras(folder: Path, available: list[str], loras: tuple) -> tuple[list[str], str, list[str]]:
    """An earlier job's LoRAs as the page's picks (names in the folder, their scales as text) and the names of those
    the folder no longer has."""
    names = [lora.path.relative_to(folder).as_posix() if lora.path.is_relative_to(folder) else lora.path.name
             for lora in loras]  # fmt: skip
    found = [(name, lora.scale) for name, lora in zip(names, loras, strict=True) if name in available]
    scales = ", ".join(f"{scale:g}" for _, scale in found) if any(scale != 1 for _, scale in found) else ""
    return [name for name, _ in found], scales, [name for name in names if name not in available]


def lora_choices(folder: Path, available: list[str], names: list[str] | None, scales: str | None) -> tuple:
    """The page's LoRA picks as job settings: names from the folder's list, and a scale each from the scales box
    (comma-separated, in the order picked; empty for 1.0 each). InvalidSettings in one line otherwise."""
    from diffusers_helper.settings import InvalidSettings, LoraChoice

    names = list(names or [])
    for name in names:
        if name not in available:
            raise InvalidSettings(f"LoRA {name!r} is not in {folder}; refresh the list")
    texts = [text.strip() for text in scales.split(",")] if scales and scales.strip() else ["1"] * len(names)
    if len(texts) != len(names):
        raise InvalidSettings(
            f"LoRA scales: give one per chosen LoRA, in the order chosen ({len(names)} chosen, {len(texts)} given), "
            "or none for 1.0 each"
        )
    values = []
    for text in texts:
        try:
            values.append(float(text))
        except ValueError:
            raise InvalidSettings(f"LoRA scales: {text!r} is not a number") from None
    return tuple(LoraChoice(folder / name, value) for name, value in zip(names, values, strict=True))


def build_parser() -> argparse.ArgumentParser:
    from diffusers_helper.frontend.startup import OneLineParser, add_model_arguments, device_list
    from diffusers_helper.settings import OUTPUTS_DIR

    parser = OneLineParser(description="The FramePack app.")
    parser.add_argument("--server", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--share", action="store_true", help="also publish a public Gradio link (off by default)")
    parser.add_argument("--inbrowser", action="store_true", help="open a browser tab")
    parser.add_argument("--outputs", type=Path, default=OUTPUTS_DIR, help="where videos go; the only folder served")
    parser.add_argument("--loras", type=Path, help="folder of LoRA .safetensors files offered on the page "
                        "(default: loras/ in the checkout)")  # fmt: skip
    parser.add_argument("--jobs-db", type=Path, help="the job store, shared with jobs.py (default: jobs.sqlite3 in "
                        "--outputs)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="processes running the queue: this app's own and "
                        "N-1 more, each loading its own models (default: 1)")  # fmt: skip
    parser.add_argument("--devices", type=device_list, metavar="0,1", help="the GPUs of the further workers, in "
                        "turn (this app's own runs on --device)")  # fmt: skip
    parser.add_argument("--verbose", action="store_true", help="debug logging, with tracebacks")
    add_model_arguments(parser, several_gpus=True)
    return parser


class App:
    """The engine behind the page: one per process. Jobs go into the job store; its worker thread runs them one at a
    time, switching the loaded variant when a job asks for another, and each page follows its own."""

    def __init__(self, args: argparse.Namespace, followers=None) -> None:
        """`followers`: the JobChannel to the other ranks of a `--gpus` run, which run each job with this one."""
        from diffusers_helper.frontend.queue import AppWorker, LiveJobs
        from diffusers_helper.frontend.startup import (
            default_resolution,
            load_engine,
            model_settings,
            plan_for,
            runtime_for,
        )
        from diffusers_helper.jobs.store import JobStore
        from diffusers_helper.settings import LORAS_DIR, InvalidSettings

        if args.loras is not None and not args.loras.is_dir():
            raise InvalidSettings(f"LoRA folder not found: {args.loras}")
        self.outputs = args.outputs
        self.loras = args.loras or LORAS_DIR
        self.store_path = args.jobs_db or Path(args.outputs) / "jobs.sqlite3"
        JobStore(self.store_path).close()  # a bad or locked store is one line now, not when the first job comes
        self.models = model_settings(args)
        self.followers = followers
        self.runtime = runtime_for(self.models)
        self._plan_for, self._load_engine = plan_for, load_engine
        plan = plan_for(self.models)
        self.free_gb = plan.budget_gb  # measured once, before the models take their share
        self.engine = load_engine(self.models, plan, self.runtime)
        self.resolution = default_resolution(self.models.preset)
        self.live = LiveJobs()
        self.worker = AppWorker(self, self.store_path, self.live)
        self._owned: dict[str, list[int]] = {}  # each page's (session's) jobs, for its End button
        self.workers: list[subprocess.Popen] = []  # the queue's further worker processes
        self.worker.start()

    def start_workers(self, count: int, devices: list[str] | None, flags: list[str]) -> None:
        """`count` more worker processes on the same store (`jobs.py run --watch` with the app's model flags), on
        `devices` in turn."""
        command = [sys.executable, str(Path(__file__).resolve().parent / "jobs.py"), "--jobs-db",
                   str(self.store_path), "run", "--watch", "--in-process", *flags]  # fmt: skip
        for number in range(count):
            environment = dict(os.environ)
            if devices:
                environment["CUDA_VISIBLE_DEVICES"] = devices[number % len(devices)]
            self.workers.append(subprocess.Popen(command, env=environment, start_new_session=True))  # our signals alone

    def lora_files(self) -> list[str]:
        """The LoRA files in the folder now, by their paths inside it."""
        if not self.loras.is_dir():
            return []
        return sorted(path.relative_to(self.loras).as_posix() for path in self.loras.rglob("*.safetensors"))

    def store(self):
        """A connection to the job store for the calling thread (a page's handlers run on several); a context
        manager that closes it."""
        from diffusers_helper.jobs.store import JobStore

        return JobStore(self.store_path)

    def records(self, settings, image_path: Path | None, preserve_gb: float, count: int) -> list[dict]:
        """The store's records of a page's `count` jobs (seeds seed, seed + 1, ...), their uploads copied next to the
        outputs so a job that waits past the upload's life still finds them."""
        from diffusers_helper.errors import describe_error
        from diffusers_helper.frontend.queue import INPUTS_FOLDER, kept_input
        from diffusers_helper.jobs.worker import job_record
        from diffusers_helper.settings import InvalidSettings

        kept = Path(self.outputs) / INPUTS_FOLDER
        try:
            copies = {name: kept_input(getattr(settings, name), kept) for name in ("end_image", "extend")
                      if getattr(settings, name) is not None}  # fmt: skip
            image = kept_input(image_path, kept) if image_path else None
        except OSError as error:
            raise InvalidSettings(
                f"cannot keep a copy of the job's files in {kept}: {describe_error(error)}"
            ) from error
        settings = dataclasses.replace(settings, **copies)
        records = []
        for number in range(count):
            record = job_record(dataclasses.replace(settings, seed=settings.seed + number), image)
            record["models"] = {"gpu_memory_preservation": preserve_gb}
            records.append(record)
        return records

    def submit(self, session: str, records: list[dict]) -> list[tuple[int, object]]:
        """Queue a page's jobs; each one's id and live feed."""
        with self.store() as store:
            followed = [self.live.add(lambda r=record: store.add(r, self.outputs)) for record in records]
        self._owned.setdefault(session, []).extend(job_id for job_id, _ in followed)
        return followed

    def end(self, session: str) -> None:
        """The page's End: each of its jobs that still waits is cancelled, and the running one stops after its
        current step (keeping its video so far)."""
        from diffusers_helper.jobs.store import JobRefused

        with self.store() as store:
            for job_id in self._owned.pop(session, []):
                try:
                    self.cancel(store, job_id)
                except JobRefused:
                    pass  # over already

    def cancel(self, store, job_id: int):
        """Cancel a queued job, or stop a running one after its current step (at once where this process runs it);
        its state after the call (JobRefused for a job that is over)."""
        self.worker.cancel_running(job_id)
        return store.cancel(job_id)

    def stop_all(self) -> None:
        """The running job stops at its next step; the queued ones stay queued for the next start."""
        self.worker.stop.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the worker, wait for the running job to end at a step, and if it cannot, record it as stopped."""
        self.stop_all()
        for process in self.workers:
            process.terminate()  # SIGTERM: each stops its running job after the current step
        logger.info("waiting up to %.0f s for the running job to stop", timeout)
        if not self.worker.join(timeout) and self.engine is not None:
            self.engine.record_interruption()
        elif self.followers is not None:
            self.followers.send(None)  # the other ranks end with this one
        for process in self.workers:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()  # its job is marked stopped when the queue next starts

    def models_for(self, settings, preserve_gb: float):
        """The model settings a job needs: its variant, and the page's "GPU memory to preserve" (which decides where
        the weights live); InvalidSettings out of range."""
        return dataclasses.replace(self.models, variant=settings.variant, gpu_memory_preservation=preserve_gb)

    def job(self, image, settings, models, paths, stop: threading.Event) -> Iterator:
        """The job's events: loading first when its model settings change what is loaded or where it lives, then the
        engine's."""
        from diffusers_helper.models.components import ModelsUnavailable
        from diffusers_helper.parallel.launch import AgreedStop
        from diffusers_helper.pipeline.events import LOADING, Failed, StageStarted

        if self.followers is not None:
            self.followers.send((image, settings, models))
            stop = AgreedStop(stop)
        plan = self._plan_for(models, self.free_gb or None)
        engine = self.engine
        if engine is None or engine.components.variant != settings.variant or engine.plan != plan:
            yield StageStarted(LOADING)
            self.models = models
            self.engine = engine = None
            release_memory()  # the old models go before the new ones load
            try:
                self.engine = self._load_engine(self.models, plan, self.runtime)
            except ModelsUnavailable as error:
                yield Failed(str(error))
                return
        yield from self.engine.generate(image, settings, paths, stop)

    def status(self) -> str:
        """Which models run where, and what each TensorRT component runs on."""
        models = f"**Models:** {self.engine.models.describe()}" if self.engine else "**Models:** loading"
        if self.engine is not None:
            applied = self.engine.models.loras.applied
            mix = ", ".join(f"{lora.path.name} x{scale:g}" for lora, scale in applied) or "none"
            models += f"\n\n**LoRAs:** {mix}"
            if self.engine.models.blocks() is not None:
                models += f"\n\n**Transformer blocks:** {self.engine.models.blocks()}"
        if self.runtime is None:
            return f"{models}\n\n**TensorRT:** off (start with --enable-tensorrt)"
        lines = self.runtime.report() or ["no component has run yet"]
        return f"{models}\n\n**TensorRT:**\n" + "\n".join(f"- {line}" for line in lines)


def release_memory() -> None:
    """Collect models held only by reference cycles (hooks point back at their modules) and return their GPU memory."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_ui(app: App):
    import gradio as gr

    from diffusers_helper.frontend.progress import ProgressText
    from diffusers_helper.frontend.queue import INPUTS_FOLDER, caption, follow, thumbnail
    from diffusers_helper.jobs.store import FINISHED, Job, JobRefused, JobState
    from diffusers_helper.media.images import load_input_image
    from diffusers_helper.media.job_files import read_job, settings_from_record
    from diffusers_helper.pipeline.events import Failed, Finished, SectionFinished, StepProgress
    from diffusers_helper.settings import QUICK_PROMPTS, VARIANTS, GenerationSettings, InvalidSettings

    defaults = GenerationSettings(prompt="")
    thumbnails = Path(app.outputs) / INPUTS_FOLDER

    def start() -> tuple:
        return gr.update(interactive=False), gr.update(interactive=True)

    def idle() -> tuple:
        return gr.update(interactive=True), gr.update(interactive=False)

    def end(request: gr.Request) -> dict:
        app.end(request.session_hash)
        return gr.update(interactive=False)

    def page_jobs(image_path, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale,
                  preserve, step_cache, crf, variant, resolution, lora_names, lora_scales, end_image_path,
                  end_strength, prompt_blend, extend_path, extend_only_new, count, teacache_threshold,
                  magcache_threshold, magcache_max_skips, magcache_retention) -> tuple:  # fmt: skip
        """The page's controls as a job's settings and the store's records of its `count` jobs; InvalidSettings in
        one line for anything a job cannot run with."""
        if image_path and extend_path:
            raise InvalidSettings("a video to extend gives the job its start frame: clear the start image or the "
                                  "video")  # fmt: skip
        if not image_path and not extend_path:
            raise InvalidSettings("upload a start image (or a video to extend) first")
        if image_path:
            load_input_image(Path(image_path))  # a bad upload is refused now, not when its turn comes
        if not 1 <= int(count) <= MAX_VIDEOS:
            raise InvalidSettings(f"number of videos must be in [1, {MAX_VIDEOS}], got {count}")
        settings = GenerationSettings(
            prompt=prompt, negative_prompt=negative_prompt, seed=int(seed), seconds=float(seconds),
            steps=int(steps), cfg=float(cfg), distilled_cfg=float(distilled_cfg), cfg_rescale=float(rescale),
            latent_window=int(window), variant=variant, resolution=int(resolution), step_cache=step_cache,
            crf=int(crf), loras=lora_choices(app.loras, app.lora_files(), lora_names, lora_scales),
            end_image=Path(end_image_path) if end_image_path and variant == "framepack" else None,
            end_strength=float(end_strength), prompt_blend=int(prompt_blend),
            extend=Path(extend_path) if extend_path else None, extend_only_new=bool(extend_only_new),
            teacache_threshold=float(teacache_threshold), magcache_threshold=float(magcache_threshold),
            magcache_max_skips=int(magcache_max_skips), magcache_retention=float(magcache_retention),
        )  # fmt: skip
        app.models_for(settings, float(preserve))
        image = Path(image_path) if image_path else None
        return settings, app.records(settings, image, float(preserve), int(count))

    def row_text(job: Job) -> str:
        """What a page says of its job from the store: where it waits, how far another worker has got, how it
        ended where this page did not see it run."""
        if job.state is JobState.QUEUED:
            with app.store() as store:
                ahead = store.ahead(job.id)
            return f"job {job.id}: waiting in the queue, " + (f"{ahead} job(s) ahead" if ahead else "next")
        if job.state is JobState.RUNNING:
            total = f"{job.sections_done} of {job.sections_total} sections" if job.sections_total else "starting"
            return f"job {job.id}: running on {job.worker}, {total}"
        return f"job {job.id}: {job.state.value}" + (f": {job.error}" if job.error else "")

    def job_row(job_id: int) -> Job:
        with app.store() as store:
            return store.get(job_id)

    def generate(image_path, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale,
                 preserve, step_cache, crf, variant, resolution, lora_names=None, lora_scales="",
                 end_image_path=None, end_strength=1.0, prompt_blend=0, extend_path=None, extend_only_new=False,
                 count=1, teacache_threshold=0.15, magcache_threshold=0.1, magcache_max_skips=2,
                 magcache_retention=0.25, request: gr.Request = None):  # fmt: skip
        try:
            settings, records = page_jobs(image_path, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale, preserve,
                    step_cache, crf, variant, resolution, lora_names, lora_scales, end_image_path, end_strength,
                    prompt_blend, extend_path, extend_only_new, count, teacache_threshold, magcache_threshold,
                    magcache_max_skips, magcache_retention)  # fmt: skip
        except InvalidSettings as error:
            yield None, None, progress_html(0, f"error: {error}"), app.status(), gr.update()
            return
        video = preview = None
        yield video, preview, progress_html(0, "queued"), app.status(), gr.update(visible=False)
        followed = app.submit(request.session_hash, records)
        for number, (job_id, feed) in enumerate(followed):  # one after the other, as the queue runs them
            which = f"video {number + 1} of {len(followed)} · " if len(followed) > 1 else ""
            progress = ProgressText(settings.sections, settings.steps)
            for item in follow(feed, lambda j=job_id: job_row(j), app.worker.worker):
                if isinstance(item, Job):
                    if item.state in FINISHED and item.video is not None and Path(item.video).is_file():
                        video = str(item.video)
                    fraction = 1.0 if item.state is JobState.DONE else progress.fraction
                    yield video, preview, progress_html(fraction, which + row_text(item)), app.status(), gr.update(
                        value=video, visible=video is not None and item.state in FINISHED)  # fmt: skip
                    continue
                progress.update(item)
                if isinstance(item, StepProgress):
                    preview = item.preview
                elif isinstance(item, SectionFinished):
                    video = str(item.video)
                elif isinstance(item, Finished | Failed):
                    if isinstance(item, Failed):
                        logger.warning("job %s failed: %s", job_id, item.message)
                    done = progress_html(1 if completed(item) else progress.fraction,
                                         which + progress.final(item), progress.notices)  # fmt: skip
                    yield video, preview, done, app.status(), gr.update(value=video, visible=video is not None)
                    continue
                page = progress_html(progress.fraction, which + progress.text(), progress.notices)
                yield video, preview, page, app.status(), gr.update()

    def add_to_queue(image_path, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale,
                 preserve, step_cache, crf, variant, resolution, lora_names=None, lora_scales="",
                 end_image_path=None, end_strength=1.0, prompt_blend=0, extend_path=None, extend_only_new=False,
                 count=1, teacache_threshold=0.15, magcache_threshold=0.1, magcache_max_skips=2,
                 magcache_retention=0.25):  # fmt: skip
        """Queue the page's jobs without following them: their progress is in the queue below."""
        try:
            _, records = page_jobs(image_path, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale, preserve,
                    step_cache, crf, variant, resolution, lora_names, lora_scales, end_image_path, end_strength,
                    prompt_blend, extend_path, extend_only_new, count, teacache_threshold, magcache_threshold,
                    magcache_max_skips, magcache_retention)  # fmt: skip
        except InvalidSettings as error:
            return progress_html(0, f"error: {error}")
        followed = app.submit("", records)
        ids = [job_id for job_id, _ in followed]
        return progress_html(0, f"queued job {ids[0]}" if len(ids) == 1 else f"queued jobs {ids[0]}-{ids[-1]}")

    def queue_view() -> tuple[list, list[int], list, list[int]]:
        """The queue (running first, then the order it runs in) and the history, newest first, as thumbnails with a
        line each."""
        with app.store() as store:
            jobs = store.jobs()
        waiting = [job for job in jobs if job.state not in FINISHED]
        finished = [job for job in jobs if job.state in FINISHED]
        items = [(str(thumbnail(job, thumbnails)), caption(job, ahead)) for ahead, job in enumerate(waiting)]
        history = [(str(thumbnail(job, thumbnails)), caption(job)) for job in finished]
        return items, [job.id for job in waiting], history, [job.id for job in finished]

    def refresh(shown):
        """The queue's view, sent to the page only when it changed."""
        items, ids, history, history_ids = queue_view()
        if (items, history) == shown:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return items, ids, history, history_ids, (items, history)

    def jobs() -> list[dict]:
        """Every job in the store: id, state, prompt, sections done, video, error (running and queued first)."""
        with app.store() as store:
            return [{"id": job.id, "state": job.state.value, "prompt": job.settings.get("settings", {}).get("prompt"),
                     "sections_done": job.sections_done, "sections_total": job.sections_total,
                     "video": str(job.video) if job.video else None, "error": job.error}
                    for job in store.jobs()]  # fmt: skip

    def chosen_job(ids: list[int], event: gr.SelectData):
        job_id = ids[event.index] if event.index < len(ids) else None
        if job_id is None:
            return gr.update(), gr.update()
        job = job_row(job_id)
        video = str(job.video) if job.video and Path(job.video).is_file() and Path(job.video).resolve(
            ).is_relative_to(Path(app.outputs).resolve()) else None  # fmt: skip
        return job_id, video

    def act(what: str, job_id, places: int = 0) -> str:
        """A queue button on the chosen job: one line saying what happened, or why not."""
        if job_id is None:
            return "choose a job in the queue or the history first"
        job_id = int(job_id)
        try:
            with app.store() as store:
                if what == "cancel":
                    state = app.cancel(store, job_id)
                    return f"job {job_id} " + ("cancelled" if state is JobState.CANCELLED else
                                               "stops after its current step")  # fmt: skip
                if what == "retry":
                    store.retry(job_id)
                    return f"job {job_id} queued again"
                store.move(job_id, places)
                return f"job {job_id} moved " + ("up" if places > 0 else "down")
        except JobRefused as error:
            return f"error: {error}"

    def settings_values(recorded, start_image: Path | None, said: str) -> list:
        """Every control set as a job had it, and a line saying where from and what is gone."""
        names, scales, missing = recorded_loras(app.loras, app.lora_files(), recorded.loras)
        values = {
            image: str(start_image) if start_image and start_image.is_file() else None,
            end_image: str(recorded.end_image) if recorded.end_image and recorded.end_image.is_file() else None,
            extend_video: str(recorded.extend) if recorded.extend and recorded.extend.is_file() else None,
            extend_only_new: recorded.extend_only_new, prompt: recorded.prompt,
            negative_prompt: recorded.negative_prompt, seed: recorded.seed, seconds: recorded.seconds,
            steps: recorded.steps, distilled_cfg: recorded.distilled_cfg, window: recorded.latent_window,
            cfg: recorded.cfg, rescale: recorded.cfg_rescale, step_cache: recorded.step_cache, crf: recorded.crf,
            variant: recorded.variant, resolution: recorded.resolution, lora_names: names, lora_scales: scales,
            end_strength: recorded.end_strength, prompt_blend: recorded.prompt_blend,
            teacache_threshold: recorded.teacache_threshold, magcache_threshold: recorded.magcache_threshold,
            magcache_max_skips: recorded.magcache_max_skips, magcache_retention: recorded.magcache_retention,
        }  # fmt: skip
        gone = [f"{what} {path} is gone" for what, path, value in (
            ("the start image", start_image, values[image]), ("the end image", recorded.end_image, values[end_image]),
            ("the video to extend", recorded.extend, values[extend_video])) if path and value is None]  # fmt: skip
        gone += [f"LoRA {name} is not in {app.loras}" for name in missing]
        return [values[control] for control in loaded] + [progress_html(0, said + "".join(f"; {g}" for g in gone))]

    def load_settings(path):
        """Every control set as an earlier job had it, from its JSON or its MP4 (the JSON beside it, or in the
        outputs folder by name: an upload is a copy)."""
        try:
            job = read_job(Path(path), elsewhere=[app.outputs])
        except InvalidSettings as error:
            return [gr.update()] * len(loaded) + [progress_html(0, f"error: {error}")]
        return settings_values(job.settings, job.image, f"settings loaded from {job.sidecar.name}")

    def rerun(job_id):
        """The chosen job's settings in every control, to run it again as it was or changed."""
        try:
            if job_id is None:
                raise InvalidSettings("choose a job in the queue or the history first")
            settings, start_image = settings_from_record(job_row(int(job_id)).settings, f"job {int(job_id)}")
        except InvalidSettings as error:
            return [gr.update()] * len(loaded) + [progress_html(0, f"error: {error}")]
        start_image = Path(start_image) if start_image else None
        return settings_values(settings, start_image, f"settings loaded from job {int(job_id)}")

    with gr.Blocks(title="FramePack") as ui:
        gr.Markdown("# FramePack\nOne image and a prompt in; a video out, a section at a time.")
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    image = gr.Image(label="Start image", type="filepath", sources=["upload"], height=320)
                    end_image = gr.Image(label="End image (optional)", type="filepath", sources=["upload"],
                                         height=320, visible=app.models.variant == "framepack")  # fmt: skip
                end_strength = gr.Slider(
                    label="End image strength", minimum=0, maximum=1, step=0.01, value=defaults.end_strength,
                    info="How strongly the video's end holds to the end image (the framepack model only).",
                    visible=app.models.variant == "framepack",
                )  # fmt: skip
                with gr.Accordion("Extend a video", open=False):
                    extend_video = gr.Video(label="Video to extend", sources=["upload"], height=240)
                    extend_only_new = gr.Checkbox(
                        label="Only the new frames", value=defaults.extend_only_new,
                        info="Instead of the video's frames followed by the new ones. F1 continues the video; the "
                        "framepack model starts at its last frame (and ends at the end image, if given).",
                    )  # fmt: skip
                prompt = gr.Textbox(label="Prompt", value="")
                gr.Markdown(TIMELINE_HELP)
                prompt_blend = gr.Slider(
                    label="Prompt blend (sections)", minimum=0, maximum=20, step=1, value=defaults.prompt_blend,
                    info="For a timeline: over how many sections each new prompt fades in.",
                )  # fmt: skip
                quick = gr.Dataset(samples=[[p] for p in QUICK_PROMPTS], label=QUICK_PROMPT_LABEL, components=[prompt])
                quick.click(
                    lambda sample: sample[0], inputs=[quick], outputs=prompt, show_progress="hidden", api_name=False
                )
                with gr.Row():
                    start_button = gr.Button("Start Generation", variant="primary")
                    queue_button = gr.Button("Add to queue")
                    end_button = gr.Button("End Generation", interactive=False)
                step_cache = gr.Radio(
                    label="Step cache",
                    choices=list(STEP_CACHE_CHOICES.items()),
                    value=defaults.step_cache,
                    info="Skips steps that change little: faster speed, but often makes hands and fingers slightly "
                    "worse.",
                )
                negative_prompt = gr.Textbox(
                    label="Negative prompt (used when CFG > 1)", value=defaults.negative_prompt
                )
                seed = gr.Number(label="Seed", value=defaults.seed, precision=0)
                count = gr.Slider(
                    label="Number of videos", minimum=1, maximum=MAX_VIDEOS, step=1, value=1,
                    info="One after the other, with the seeds seed, seed + 1, ...",
                )  # fmt: skip
                seconds = gr.Slider(
                    label="Total video length (seconds)", minimum=1, maximum=120, step=0.1, value=defaults.seconds
                )
                steps = gr.Slider(
                    label="Steps", minimum=1, maximum=100, step=1, value=defaults.steps,
                    info="Changing this value is not recommended.",
                )  # fmt: skip
                distilled_cfg = gr.Slider(
                    label="Distilled CFG scale", minimum=1, maximum=32, step=0.01, value=defaults.distilled_cfg,
                    info="Changing this value is not recommended.",
                )  # fmt: skip
                preserve = gr.Slider(
                    label="GPU memory to preserve (GB) (larger means slower)", minimum=6, maximum=128, step=0.1,
                    value=app.models.gpu_memory_preservation,
                    info="Set this number to a larger value if you encounter out-of-memory errors. "
                    "Larger values are slower. A new value reloads the models for the next job.",
                )  # fmt: skip
                crf = gr.Slider(
                    label="MP4 compression (CRF)", minimum=0, maximum=51, step=1, value=defaults.crf,
                    info="Lower means better quality; 0 is lossless. Change to 16 if you get black outputs.",
                )  # fmt: skip
                with gr.Accordion("LoRAs", open=False):
                    lora_names = gr.Dropdown(
                        label="LoRAs", choices=app.lora_files(), value=[], multiselect=True,
                        info=f"The .safetensors files in {app.loras}; applied in the order chosen.",
                    )  # fmt: skip
                    lora_scales = gr.Textbox(
                        label="LoRA scales", value="", placeholder="1.0 each; or one per LoRA, e.g. 0.8, 1.2",
                        info="How strongly each applies, -10 to 10, in the order chosen.",
                    )  # fmt: skip
                    refresh_loras = gr.Button("Refresh the list", size="sm")
                with gr.Accordion("Load settings", open=False):
                    settings_file = gr.File(
                        label="An earlier job's JSON or MP4",
                        file_types=[".json", ".mp4"],
                        type="filepath",
                        elem_id="load-settings",
                    )
                with gr.Accordion("Advanced", open=False):
                    window = gr.Slider(
                        label="Latent window size", minimum=1, maximum=33, step=1, value=defaults.latent_window
                    )
                    cfg = gr.Slider(label="CFG scale (real)", minimum=1, maximum=32, step=0.01, value=defaults.cfg)
                    rescale = gr.Slider(
                        label="CFG rescale", minimum=0, maximum=1, step=0.01, value=defaults.cfg_rescale
                    )
                    variant = gr.Radio(label="Model", choices=list(VARIANTS), value=app.models.variant)
                    resolution = gr.Slider(
                        label="Resolution bucket", minimum=128, maximum=1280, step=16, value=app.resolution
                    )
                    teacache_threshold = gr.Slider(
                        label="TeaCache threshold", minimum=0.01, maximum=1, step=0.01,
                        value=defaults.teacache_threshold, info="Higher skips more steps.",
                    )  # fmt: skip
                    magcache_threshold = gr.Slider(
                        label="MagCache threshold", minimum=0.01, maximum=1, step=0.01,
                        value=defaults.magcache_threshold, info="Higher skips more steps.",
                    )  # fmt: skip
                    magcache_max_skips = gr.Slider(
                        label="MagCache most skips in a row", minimum=1, maximum=10, step=1,
                        value=defaults.magcache_max_skips,
                    )  # fmt: skip
                    magcache_retention = gr.Slider(
                        label="MagCache retention", minimum=0, maximum=1, step=0.01, value=defaults.magcache_retention,
                        info="The fraction of each section's first steps always computed.",
                    )  # fmt: skip
            with gr.Column():
                preview = gr.Image(label="Next latents", height=320, interactive=False)
                video = gr.Video(label="Finished frames", autoplay=True, loop=True, height=512, interactive=False)
                order_note = gr.Markdown(INVERTED_ORDER_NOTE, visible=app.models.variant == "framepack")
                progress = gr.HTML(label="Progress", elem_id="progress-text")
                download = gr.DownloadButton("Download video", visible=False)
                status = gr.Markdown(app.status(), label="Status", elem_id="acceleration-status")
        with gr.Accordion("Queue and history", open=True):
            gr.Markdown("Every job, this page's and others' (`jobs.py` too), kept across restarts. Click one to "
                        "choose it.")  # fmt: skip
            with gr.Row():
                queue_gallery = gr.Gallery(label="Queue", columns=6, height=240, allow_preview=False,
                                           elem_id="queue")  # fmt: skip
                history_gallery = gr.Gallery(label="History", columns=6, height=240, allow_preview=False,
                                             elem_id="history")  # fmt: skip
            with gr.Row():
                chosen = gr.Number(label="Chosen job", precision=0, value=None, elem_id="chosen-job")
                cancel_job = gr.Button("Cancel", size="sm")
                retry_job = gr.Button("Retry", size="sm")
                move_up = gr.Button("Move up", size="sm")
                move_down = gr.Button("Move down", size="sm")
                rerun_job = gr.Button("Load its settings", size="sm")
            queue_message = gr.Markdown(elem_id="queue-message")
            chosen_video = gr.Video(label="Chosen job's video", height=240, interactive=False)
        queue_ids, history_ids, shown = gr.State([]), gr.State([]), gr.State(None)
        variant.change(
            lambda chosen: [gr.update(visible=chosen == "framepack")] * 3, inputs=variant,
            outputs=[order_note, end_image, end_strength], api_name=False,
        )  # fmt: skip
        for event in (refresh_loras.click, ui.load):  # a page opened later lists the files there now
            event(lambda: gr.update(choices=app.lora_files()), outputs=lora_names, queue=False, api_name=False)
        inputs = [image, prompt, negative_prompt, seed, seconds, steps, distilled_cfg, window, cfg, rescale, preserve,
                  step_cache, crf, variant, resolution, lora_names, lora_scales, end_image, end_strength,
                  prompt_blend, extend_video, extend_only_new, count, teacache_threshold, magcache_threshold,
                  magcache_max_skips, magcache_retention]  # fmt: skip
        loaded = [image, end_image, extend_video, extend_only_new, prompt, negative_prompt, seed, seconds, steps,
                  distilled_cfg, window, cfg, rescale, step_cache, crf, variant, resolution, lora_names, lora_scales,
                  end_strength, prompt_blend, teacache_threshold, magcache_threshold, magcache_max_skips,
                  magcache_retention]  # fmt: skip
        settings_file.upload(load_settings, inputs=settings_file, outputs=[*loaded, progress], api_name="load_settings")
        outputs = [video, preview, progress, status, download]  # the API's, named by their labels
        buttons = [start_button, end_button]
        start_button.click(start, outputs=buttons, queue=False, api_name=False).then(
            generate, inputs=inputs, outputs=outputs, api_name="generate", concurrency_limit=None
        ).then(idle, outputs=buttons, queue=False, api_name=False)  # every page follows its own job
        end_button.click(end, outputs=[end_button], queue=False, api_name="end")
        queue_button.click(add_to_queue, inputs=inputs, outputs=progress, api_name="add_to_queue", queue=False)
        views = [queue_gallery, queue_ids, history_gallery, history_ids, shown]
        for event, name in ((gr.Timer(2.0).tick, False), (ui.load, "queue_view")):
            event(refresh, inputs=shown, outputs=views, queue=False, api_name=name, show_progress="hidden")
        queue_gallery.select(chosen_job, inputs=queue_ids, outputs=[chosen, chosen_video], queue=False,
                             api_name=False)  # fmt: skip
        history_gallery.select(chosen_job, inputs=history_ids, outputs=[chosen, chosen_video], queue=False,
                               api_name=False)  # fmt: skip
        for button, what, places in ((cancel_job, "cancel", 0), (retry_job, "retry", 0), (move_up, "move", 1),
                                     (move_down, "move", -1)):  # fmt: skip
            button.click(lambda job_id, w=what, p=places: act(w, job_id, p), inputs=chosen, outputs=queue_message,
                         queue=False, api_name=False).then(refresh, inputs=gr.State(None), outputs=views,
                                                           queue=False, api_name=False)  # fmt: skip
        rerun_job.click(rerun, inputs=chosen, outputs=[*loaded, progress], queue=False, api_name="rerun_job")
        gr.api(jobs, api_name="jobs")

        def cancel_by_id(job_id: int) -> str:
            return act("cancel", job_id)

        def retry_by_id(job_id: int) -> str:
            return act("retry", job_id)

        def move_by_id(job_id: int, places: int) -> str:
            return act("move", job_id, places)

        for endpoint in (cancel_by_id, retry_by_id, move_by_id):
            gr.api(endpoint, api_name=endpoint.__name__.replace("_by_id", "_job"))
    return ui


class Shutdown:
    """Ctrl-C and SIGTERM. The first stops the running job at its next step at once (the server's close takes seconds,
    a whole section of a tiny job; the queued jobs stay queued for the next start) and then closes the server; the app
    exits when the running job has stopped. A second
    stops at once: the running job is recorded as stopped, keeping the video so far, and the app exits with 128 + the
    signal, as the CLI does (without waiting for the job's thread, which an interpreter's orderly exit would)."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.received: list[int] = []

    def install(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame) -> None:
        self.received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if len(self.received) == 1:
            _say(f"{name}: stopping the running job, then the app (again to stop at once)")
            self.app.stop_all()
            raise KeyboardInterrupt  # Gradio closes its server on it
        _say(f"{name} again: stopping at once; the video so far is kept")
        if self.app.engine is not None:
            self.app.engine.record_interruption()
        os._exit(128 + signum)


def _say(line: str) -> None:
    """A line on stderr from a signal handler, which may run while the interrupted code is printing itself."""
    os.write(sys.stderr.fileno(), f"{line}\n".encode())


# Uploads up to 50 MB; errors shown on the page; the app's own line instead of Gradio's banner.
LAUNCH_OPTIONS = {"max_file_size": "50mb", "show_error": True, "quiet": True}


def port_problem(server: str, port: int | None) -> str | None:
    """Why the app could not listen on `server`:`port`, found before the models load (None: it can, or Gradio
    picks a free port itself)."""
    if port is None:
        return None
    if not 1 <= port <= 65535:
        return f"--port must be in 1-65535, got {port}"
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closed port is free
        try:
            probe.bind((server, port))
        except OSError as error:
            return f"cannot listen on {server}:{port} ({error.strerror or error}); choose another --port or --server"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    from diffusers_helper.frontend.startup import model_flags, model_settings, quiet_libraries
    from diffusers_helper.jobs.store import JobStoreError
    from diffusers_helper.media.job_files import ensure_writable_dir
    from diffusers_helper.models.components import ModelsUnavailable
    from diffusers_helper.parallel.launch import JobChannel, check_gpus, launched_rank, ranks_joined, run_ranks
    from diffusers_helper.settings import InvalidSettings

    if args.tensorrt_info:
        from diffusers_helper.frontend.startup import print_tensorrt_info

        return print_tensorrt_info()
    quiet_libraries()
    flags = sys.argv[1:] if argv is None else argv
    try:
        problem = port_problem(args.server, args.port)
        if problem:
            raise InvalidSettings(problem)
        ensure_writable_dir(args.outputs)
        if args.workers < 1:
            raise InvalidSettings(f"--workers must be 1 or more, got {args.workers}")
        models = model_settings(args)
        check_gpus(models)
        if models.gpus > 1 and args.workers > 1:
            raise InvalidSettings("--gpus runs each job over several GPUs, --workers several jobs at once: pick one")
        if models.gpus > 1 and launched_rank() is None:  # this process starts the app's processes, one per GPU
            return run_ranks(__file__, flags, models.gpus)
        with ranks_joined(models) as rank:
            if rank:
                return _follow(JobChannel())
            app = App(args, JobChannel() if models.gpus > 1 else None)
            app.start_workers(args.workers - 1, args.devices, model_flags(flags))
            return _serve(args, app)
    except InvalidSettings as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (ModelsUnavailable, JobStoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _serve(args: argparse.Namespace, app: App) -> int:
    ui = build_ui(app)
    ui.queue(default_concurrency_limit=1)
    shutdown = Shutdown(app)
    shutdown.install()
    try:
        ui.launch(server_name=args.server, server_port=args.port, share=args.share, inbrowser=args.inbrowser,
                  allowed_paths=[str(Path(args.outputs).resolve())], prevent_thread_lock=True,
                  **LAUNCH_OPTIONS)  # fmt: skip
        public = f"; public link {ui.share_url}" if ui.share_url else " (--share adds a public link)"
        print(f"FramePack is running at {ui.local_url}{public}", flush=True)
        ui.block_thread()
    finally:
        app.shutdown()
    return 0


def _follow(jobs) -> int:
    """Another rank's share of an app run over several GPUs: each job the first rank hands over, run with it in
    silence (its files into a scratch directory), the models loaded again when a job asks for others; until the app
    closes. Ctrl-C and SIGTERM are the first rank's to answer: it stops the running job on every rank, then closes."""
    from diffusers_helper.frontend.startup import load_engine, plan_for, runtime_for
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.components import ModelsUnavailable
    from diffusers_helper.parallel.launch import AgreedStop

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    engine, loaded, free_gb = None, None, None
    with tempfile.TemporaryDirectory(prefix="framepack-rank-") as scratch:
        while (job := jobs.receive()) is not None:
            image, settings, models = job
            plan = plan_for(models, free_gb)
            free_gb = free_gb or plan.budget_gb  # measured once, before the models take their share, as the app does
            if engine is None or loaded != (models, plan):
                engine = None
                release_memory()
                try:
                    engine, loaded = load_engine(models, plan, runtime_for(models)), (models, plan)
                except ModelsUnavailable:
                    continue  # the first rank says why
            paths = JobPaths.new_job(Path(scratch))
            for _ in engine.generate(image, settings, paths, AgreedStop(threading.Event()), overwrite=True):
                pass
    return 0


if __name__ == "__main__":
    from diffusers_helper.frontend.startup import run_script

    run_script(main)
