"""The FramePack engine: encode once, then sample, decode, append and write the MP4 section by section.

`FramePackEngine.generate` is a generator of events (see events.py), so a UI can stream and a CLI can draw
progress. A stop request (a threading.Event) is honoured between steps: the unfinished section is dropped and
the video so far stays on disk.
"""

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from datetime import datetime

import numpy as np
import torch

from ..media.buckets import find_nearest_bucket, resize_and_center_crop
from ..media.images import load_input_image
from ..media.job_files import (
    JobFiles,
    JobPaths,
    ensure_writable_dir,
    file_sha256,
    save_image,
    software_versions,
    write_sidecar,
)
from ..media.preview import latent_preview
from ..media.video import VideoWriter, write_mp4
from ..models.assembly import AssembledModels
from ..models.lora import LoraFile, read_lora
from ..models.placement import job_memory_problem
from ..settings import FPS, GenerationSettings, InvalidSettings
from .conditioning import Conditions, encode_conditions, encoding_pipeline, prompt_overflow
from .events import (
    APPLYING_LORAS,
    DECODING,
    ENCODING,
    READING_VIDEO,
    SAMPLING,
    WRITING,
    Event,
    Failed,
    Finished,
    Notice,
    SectionFinished,
    StageStarted,
    StepProgress,
)
from .extension import VideoToExtend, load_video_to_extend
from .sampling import Guidance, make_scheduler, sample_section
from .schedule import Schedule, framepack_schedule
from .sections import ORDERS, Section, SectionOrder, Video
from .timeline import is_timeline, parse_timeline, section_prompts

logger = logging.getLogger(__name__)


class GenerationError(RuntimeError):
    """The job cannot go on, for a reason its message gives in full (it becomes the job's one-line failure)."""


class FramePackEngine:
    """Runs jobs, one at a time, on the assembled models of one process."""

    def __init__(self, models: AssembledModels, write_video: VideoWriter | None = None) -> None:
        self.models = models
        self.components = models.components
        self.plan = models.plan
        self.teacache = models.teacache
        self.magcache = models.magcache
        self.write_video = write_video or write_mp4
        self.scheduler = make_scheduler()
        logger.info("models: %s", models.describe())
        self.pipe = encoding_pipeline(self.components, self.scheduler)
        self._running = threading.Lock()  # the scheduler and the step cache hold one job's state
        self._job: tuple[JobFiles, dict] | None = None

    def generate(
        self,
        image: np.ndarray | None,
        settings: GenerationSettings,
        paths: JobPaths,
        stop: threading.Event | None = None,
        overwrite: bool = False,
    ) -> Iterator[Event]:
        """Run one job from its start image, or (`image` None) from the video its settings extend; failures end it with a Failed event, never an exception (the traceback is logged at debug
        level). An earlier job's files at `paths` are replaced only with `overwrite`, and only once this job has a
        video of its own (until then the earlier job stays as it was). Its LoRAs and output paths are checked before
        anything is written or changed (a bad one fails the job with `bad_input`); LoRAs are fused before sampling
        and left in the weights until a job asks for another mix. If the job is interrupted (KeyboardInterrupt, or
        its consumer closes this generator), its sidecar says "stopped" before it ends."""
        if not self._running.acquire(blocking=False):
            yield Failed("this engine is already running a job; jobs run one at a time")
            return
        try:
            if settings.variant != self.components.variant:
                loaded = self.components.variant
                yield Failed(f"variant {settings.variant!r} asked for, but the loaded transformer is {loaded!r}")
                return
            try:
                loras = self._read_loras(settings)
                end_image = None if settings.end_image is None else load_input_image(settings.end_image, "end image")
                extension = None
                if settings.extend is not None:
                    if image is not None:
                        raise InvalidSettings("a video to extend gives the job its start frame: give no start image")
                    yield StageStarted(READING_VIDEO)
                    extension = load_video_to_extend(settings.extend, settings.resolution)
                    image = ORDERS[settings.variant].extension_start(extension.frames)
                elif image is None:
                    raise InvalidSettings("a job needs a start image or a video to extend")
                self._check_memory(image, settings, extension)
                ensure_writable_dir(paths.video.parent)
                paths.check(overwrite, inputs=[path for path in (settings.end_image, settings.extend) if path])
            except InvalidSettings as error:
                yield Failed(str(error), bad_input=True)
                return
            files, record = JobFiles(paths), self._record(settings, paths, loras)
            if settings.end_image is not None:
                record["end_image"] = {"path": str(settings.end_image), "sha256": file_sha256(settings.end_image)}
            if extension is not None:
                record["extend"] = extension.record()
            self._job = (files, record)
            try:
                stop = stop or threading.Event()
                with self.models.cancel_builds_when(stop.is_set):  # End during an engine build ends the build
                    yield from self._generate(image, end_image, extension, settings, files, stop, record, loras)
            except Exception as error:  # the job fails, the process (and any UI) goes on
                logger.debug("generation failed", exc_info=True)
                message = _failure_message(error)
                self._record_end(files, record, status="failed", error=message)
                yield Failed(message)
            except BaseException:
                self.record_interruption()
                raise
        finally:
            self._job = None
            self._running.release()

    def record_interruption(self) -> None:
        """Mark the running job (if any) as stopped, keeping the video so far: for a process that is interrupted
        or about to exit while the job is still running."""
        if self._job is not None and self._job[1]["status"] == "running":
            files, record = self._job
            self._record_end(files, record, status="stopped")

    def _check_memory(self, image: np.ndarray, settings: GenerationSettings, extension: VideoToExtend | None) -> None:
        """InvalidSettings when the job's bucket and length (with the video it extends) need more memory than this
        machine has free."""
        height, width = find_nearest_bucket(*image.shape[:2], resolution=settings.resolution)
        frames = settings.frames + (0 if extension is None else len(extension.frames))
        problem = job_memory_problem(self.plan, self.components.vae, height, width, frames,
                                     settings.latent_window)  # fmt: skip
        if problem:
            raise InvalidSettings(problem)

    def _read_loras(self, settings: GenerationSettings) -> list[tuple[LoraFile, float]]:
        """The job's LoRAs, read and checked against the transformer; InvalidSettings names a bad file."""
        loras = [(read_lora(choice.path), choice.scale) for choice in settings.loras]
        for lora, _ in loras:
            self.models.loras.check(lora)
        return loras

    def _record(self, settings: GenerationSettings, paths: JobPaths, loras: list[tuple[LoraFile, float]]) -> dict:
        return {
            "settings": settings.to_dict(),
            "loras": [
                {"name": lora.path.name, "path": str(lora.path), "scale": scale, "sha256": lora.sha256}
                for lora, scale in loras
            ],
            "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "video": paths.video.name,
            "input_image": paths.image.name,
            "preset": self.models.settings.preset,
            "models": self.components.model_ids(),
            "model_source": self.models.settings.describe_source(),
            "memory": self.plan.describe(),
            "versions": software_versions(),
            "status": "running",
        }

    def _write_record(self, files: JobFiles, record: dict) -> None:
        write_sidecar(files.writing.sidecar, {**record, "components": self.models.backends()})

    def _record_end(self, files: JobFiles, record: dict, **end) -> None:
        """The job's end in its sidecar; a job that was to replace an earlier one and made no video leaves nothing
        (the earlier job's files are untouched)."""
        record.update(end)
        if not files.published:
            files.discard()
            return
        try:
            self._write_record(files, record)
        except OSError as error:
            logger.warning("could not record the job's end in %s: %s", files.writing.sidecar, error)

    def _generate(
        self,
        image: np.ndarray,
        end_image: np.ndarray | None,
        extension: VideoToExtend | None,
        settings: GenerationSettings,
        files: JobFiles,
        stop: threading.Event,
        record: dict,
        loras: list[tuple[LoraFile, float]],
    ) -> Iterator[Event]:
        started = time.perf_counter()
        video_path = files.paths.video
        yield StageStarted(ENCODING)
        height, width = find_nearest_bucket(*image.shape[:2], resolution=settings.resolution)
        image = resize_and_center_crop(image, height, width)
        if end_image is not None:  # bucketed like the start image
            end_image = resize_and_center_crop(end_image, height, width)
        save_image(image, files.writing.image)
        record.update(width=width, height=height, sections=settings.sections, sections_done=0)
        self._write_record(files, record)
        if extension is not None and extension.notice():
            logger.info("%s", extension.notice())
            yield Notice(extension.notice())

        order = ORDERS[settings.variant]
        sections = order.plan(settings.sections)
        timeline = parse_timeline(settings.prompt, settings.seconds)
        prompts = section_prompts(timeline, [order.first_frame(s, settings.latent_window) for s in sections],
                                  settings.prompt_blend)  # fmt: skip
        if is_timeline(settings.prompt):
            record["section_prompts"] = [dataclasses.asdict(prompt) for prompt in prompts]
        for part in timeline:
            overflow = prompt_overflow(self.pipe, part.text)
            if overflow:
                logger.warning("%s", overflow)
                yield Notice(overflow)
        negative_prompt = settings.negative_prompt if settings.cfg > 1 else None
        transformer_dtype = self.components.transformer.dtype
        context = order.context_latents(settings.latent_window)
        context_frames = None if extension is None or not context else extension.tail(context)
        conditions = encode_conditions(self.pipe, image, [part.text for part in timeline], negative_prompt,
                                       self.plan.device, transformer_dtype, settings.seed, end_image,
                                       settings.end_strength, context_frames)  # fmt: skip
        self.models.placement.release_encoders()
        if not self.models.loras.is_applied(loras):
            yield StageStarted(APPLYING_LORAS)
            self.models.loras.apply(loras)
        schedule = framepack_schedule(settings.steps, settings.latent_window, *conditions.start_latent.shape[3:])
        record["schedule"] = schedule.to_dict()
        noise_generator = torch.Generator("cpu").manual_seed(settings.seed)  # FramePack's stream of section noise
        history = order.initial_history(conditions.start_latent, conditions.context_latents)
        video = None
        for cache in (self.teacache, self.magcache):
            cache.computed = cache.skipped = 0
        for section in sections:
            yield StageStarted(SAMPLING, section.index + 1, section.count)
            section_conditions = conditions.for_section(prompts[section.index])
            latents = yield from self._sample(
                order, section, history, section_conditions, settings, schedule, noise_generator, stop
            )
            if latents is None:
                break
            _check_finite(latents, "sampled latents", section)
            history = order.append(history, latents, conditions.start_latent, section)
            yield StageStarted(DECODING, section.index + 1, section.count)
            video = self._decode_and_join(order, history, video, section, settings.latent_window,
                                          extends=conditions.context_latents is not None)  # fmt: skip
            yield StageStarted(WRITING, section.index + 1, section.count)
            frames = video.frames.numpy()
            if extension is not None:
                frames = extension.joined(frames, settings.extend_only_new, order.repeats_extended_frame(section))
            self.write_video(frames, video_path, FPS, settings.crf)
            files.publish()  # the job has a video: an earlier job's files give way to this one's
            record.update(sections_done=section.index + 1, frames=len(frames))
            self._write_record(files, record)
            logger.info(
                "section %d/%d done: %d frames, %.1fs elapsed",
                section.index + 1,
                section.count,
                len(frames),
                time.perf_counter() - started,
            )
            yield SectionFinished(section.index + 1, section.count, video_path, len(frames))

        stopped = stop.is_set() and record["sections_done"] < settings.sections
        record.update(
            status="stopped" if stopped else "complete",
            seconds_elapsed=round(time.perf_counter() - started, 2),
            step_cache=self._step_cache_record(settings),
        )
        self._record_end(files, record)
        yield Finished(
            video=video_path if video is not None else None,
            frames=record.get("frames", 0),
            sections_done=record["sections_done"],
            sections=settings.sections,
            stopped=stopped,
        )

    def _sample(
        self,
        order: SectionOrder,
        section: Section,
        history: torch.Tensor,
        conditions: Conditions,
        settings: GenerationSettings,
        schedule: Schedule,
        generator: torch.Generator,
        stop: threading.Event,
    ) -> Iterator[Event]:
        """Sample one section, yielding progress; returns its latents, or None when stopped."""
        if stop.is_set():
            return None
        window = settings.latent_window
        layout = order.layout(history, conditions.start_latent, section, window, conditions.end_latent)
        shape = (1, conditions.start_latent.shape[1], window, *conditions.start_latent.shape[3:])
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.plan.device)
        self._reset_step_caches(settings)
        guidance = Guidance(distilled=settings.distilled_cfg, cfg=settings.cfg, rescale=settings.cfg_rescale)
        steps = sample_section(
            self.components.transformer, self.scheduler, noise, conditions, layout, guidance, schedule
        )
        while True:
            try:
                result = next(steps)
            except StopIteration as done:
                return done.value
            yield StepProgress(
                section.index + 1, section.count, result.step, result.steps, latent_preview(result.denoised)
            )
            if stop.is_set():
                return None

    def _reset_step_caches(self, settings: GenerationSettings) -> None:
        """Forget the last section's residuals and switch on the job's step cache, the other off."""
        chosen = settings.step_cache
        self.teacache.reset(settings.teacache_threshold if chosen == "teacache" else None)
        magcache_threshold = settings.magcache_threshold if chosen == "magcache" else None
        self.magcache.reset(magcache_threshold, settings.magcache_max_skips, settings.magcache_retention)

    def _step_cache_record(self, settings: GenerationSettings) -> dict:
        """Which step cache the job used and how many transformer passes it computed and skipped."""
        cache = {"teacache": self.teacache, "magcache": self.magcache}.get(settings.step_cache)
        counts = {"computed": cache.computed, "skipped": cache.skipped} if cache else {}
        return {"name": settings.step_cache, **counts}

    @torch.no_grad()
    def _decode_and_join(
        self,
        order: SectionOrder,
        history: torch.Tensor,
        video: Video | None,
        section: Section,
        window: int,
        extends: bool = False,
    ) -> Video:
        """Decode the whole video the first time, afterwards only the newest latents, crossfaded into the rest. A
        history that `extends` a video's latents is decoded the first time with the video's last window before the
        new one, for the new frames to follow on; those of the video's latents are left out (the video has its own
        frames)."""
        video_latents = order.video_latents(history)
        first = video is None and not extends
        latents = video_latents if first else order.latents_to_decode(video_latents, section, window)
        decoded = self._decode(latents)
        _check_finite(decoded, "decoded pixels", section)
        if video is None and extends:
            decoded = decoded[:, :, -window * 4 :]  # the new window's frames
        return order.join(video, decoded, overlap=window * 4 - 3)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        scaled = (latents.float() / vae.config.scaling_factor).to(device=self.plan.device, dtype=vae.dtype)
        return vae.decode(scaled).sample


def _check_finite(values: torch.Tensor, what: str, section: Section) -> None:
    """NaN or infinite values (from damaged weights or a LoRA) would be written as black frames: the job stops."""
    if not torch.isfinite(values).all():
        raise GenerationError(
            f"the {what} of section {section.index + 1} of {section.count} are NaN or infinite (damaged weights or "
            "LoRA?); the job stopped rather than write black frames"
        )


def _failure_message(error: Exception) -> str:
    if isinstance(error, GenerationError):
        return str(error)
    if isinstance(error, torch.OutOfMemoryError):
        return "out of GPU memory: lower the resolution or raise 'GPU memory to preserve' to offload more"
    return f"{type(error).__name__}: {error}"
