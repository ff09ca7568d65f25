"""The section engine on the tiny preset, on the CPU."""

import json
import math
import threading
from datetime import datetime

import av
import numpy as np
import pytest
import torch

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION
from diffusers_helper.pipeline.events import (
    DECODING,
    ENCODING,
    SAMPLING,
    WRITING,
    Failed,
    Finished,
    Notice,
    SectionFinished,
    StageStarted,
    StepProgress,
)
from diffusers_helper.settings import GenerationSettings
from tests.support.frame_sink import FrameSink


def tiny_settings(**overrides) -> GenerationSettings:
    values = {"prompt": "a cat walks", "seconds": 2.0, "resolution": TINY_RESOLUTION, "steps": 8}
    return GenerationSettings(**{**values, **overrides})


def run(engine, settings, paths, stop=None, sink=None, on_event=None, overwrite=False):
    engine.write_video = sink or engine.write_video
    events = []
    for event in engine.generate(example_image(256, 256), settings, paths, stop, overwrite):
        events.append(event)
        if on_event:
            on_event(event)
    return events


@pytest.fixture
def with_sink(engines):
    """Engines writing into memory; restores the MP4 writer afterwards."""
    originals = {variant: engine.write_video for variant, engine in engines.items()}
    yield engines
    for variant, engine in engines.items():
        engine.write_video = originals[variant]


def decode_mp4(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_two_section_video_end_to_end(engines, tmp_path):
    paths = JobPaths.for_video(tmp_path / "job.mp4")
    events = run(engines["framepack"], tiny_settings(), paths)
    finished = events[-1]
    assert isinstance(finished, Finished) and not finished.stopped
    assert finished.frames == 73 and finished.sections_done == 2
    assert [(e.section, e.frames) for e in events if isinstance(e, SectionFinished)] == [(1, 33), (2, 73)]
    steps = [e for e in events if isinstance(e, StepProgress)]
    assert len(steps) == 16 and steps[0].preview.dtype == np.uint8
    assert steps[0].preview.shape == (3 * 16 * 6, 3 * 16 * 6, 3)  # 9 frames of 16 x 16 in a 3 x 3 grid, 6x larger
    frames = decode_mp4(paths.video)
    assert frames.shape == (73, 128, 128, 3)
    assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 1  # frames change over time
    assert frames.std() > 5  # and are not one flat colour
    record = json.loads(paths.sidecar.read_text())
    assert record["status"] == "complete" and record["frames"] == 73
    assert (
        record["settings"]["prompt"] == "a cat walks"
        and record["models"]["transformer"] == "lllyasviel/FramePackI2V_HY"
    )
    assert "torch" in record["versions"] and record["preset"] == "tiny"
    assert datetime.fromisoformat(record["started_at"]).tzinfo is not None
    assert record["components"]["transformer"] == "PyTorch" and record["components"]["vae_decoder"] == "PyTorch"
    assert paths.image.exists()


def test_stages_are_reported_in_order(engines, tmp_path):
    events = run(engines["framepack"], tiny_settings(steps=2), JobPaths.for_video(tmp_path / "s.mp4"))
    stages = [
        (type(e).__name__, getattr(e, "stage", None), getattr(e, "section", None))
        for e in events
        if not isinstance(e, StepProgress)
    ]
    assert stages == [
        ("StageStarted", ENCODING, 0),
        ("StageStarted", SAMPLING, 1), ("StageStarted", DECODING, 1), ("StageStarted", WRITING, 1),
        ("SectionFinished", None, 1),
        ("StageStarted", SAMPLING, 2), ("StageStarted", DECODING, 2), ("StageStarted", WRITING, 2),
        ("SectionFinished", None, 2),
        ("Finished", None, None),
    ]  # fmt: skip


def test_the_sidecar_records_framepacks_schedule(engines, tmp_path):
    paths = JobPaths.for_video(tmp_path / "schedule.mp4")
    run(engines["framepack"], tiny_settings(seconds=1.0, steps=4), paths)
    schedule = json.loads(paths.sidecar.read_text())["schedule"]
    tokens = 9 * 16 * 16 / 4  # window 9, 128 x 128 -> 16 x 16 latents, 2 x 2 patches
    shift = math.exp(0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256))
    assert schedule["shift"] == pytest.approx(shift) and round(schedule["shift"], 2) == 1.74
    expected = [shift / (shift + 1 / t - 1) if t else 0.0 for t in (1, 0.75, 0.5, 0.25, 0)]
    assert schedule["sigmas"] == pytest.approx(expected, abs=1e-6)


def test_section_noise_is_the_seeds_stream_from_its_first_number(with_sink, tmp_path, monkeypatch):
    """As in FramePack: nothing else draws from the seed's generator before the first section's noise."""
    engine = with_sink["framepack"]
    inputs = []
    original = engine.components.transformer.forward

    def spy(**kwargs):
        inputs.append(kwargs["hidden_states"])
        return original(**kwargs)

    monkeypatch.setattr(engine.components.transformer, "forward", spy)
    run(
        engine, tiny_settings(seconds=1.0, steps=1, seed=1234), JobPaths.for_video(tmp_path / "n.mp4"), sink=FrameSink()
    )
    expected = torch.randn(1, 16, 9, 16, 16, generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(inputs[0], expected)


def test_a_prompt_longer_than_the_encoders_take_is_said_once(engines, tmp_path):
    long_prompt = " ".join(["the cat walks slowly through the forest"] * 60)
    events = run(
        engines["framepack"],
        tiny_settings(prompt=long_prompt, seconds=1.0, steps=1),
        JobPaths.for_video(tmp_path / "p.mp4"),
    )
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and "LLaMA reads the first 256" in notices[0] and "CLIP reads the first 77" in notices[0]
    short = run(engines["framepack"], tiny_settings(seconds=1.0, steps=1), JobPaths.for_video(tmp_path / "q.mp4"))
    assert not [e for e in short if isinstance(e, Notice)]


def test_f1_grows_forward(with_sink, tmp_path):
    sink = FrameSink()
    events = run(with_sink["f1"], tiny_settings(variant="f1"), JobPaths.for_video(tmp_path / "f1.mp4"), sink=sink)
    assert [e.frames for e in events if isinstance(e, SectionFinished)] == [37, 73]
    assert sink.last.shape == (73, 128, 128, 3)
    # F1 appends: the first section's frames stay where they were, up to the crossfade
    assert np.array_equal(sink.calls[1][:4], sink.calls[0][:4])


def test_same_seed_same_video_other_seed_other_video(with_sink, tmp_path):
    videos = []
    for run_index, seed in enumerate((1, 1, 2)):
        sink = FrameSink()
        run(
            with_sink["framepack"],
            tiny_settings(seconds=1.0, seed=seed),
            JobPaths.for_video(tmp_path / f"s{run_index}.mp4"),
            sink=sink,
        )
        videos.append(sink.last)
    assert np.array_equal(videos[0], videos[1])
    assert np.abs(videos[0].astype(int) - videos[2].astype(int)).mean() > 1


def test_stop_after_first_section_keeps_a_playable_video_of_it(engines, tmp_path):
    stop = threading.Event()
    paths = JobPaths.for_video(tmp_path / "stopped.mp4")

    def stop_after_first_section(event):
        if isinstance(event, SectionFinished):
            stop.set()

    events = run(engines["framepack"], tiny_settings(seconds=4.0), paths, stop, on_event=stop_after_first_section)
    finished = events[-1]
    assert finished.stopped and finished.sections_done == 1 and finished.sections == 3
    assert decode_mp4(paths.video).shape[0] == 33 == finished.frames
    assert json.loads(paths.sidecar.read_text())["status"] == "stopped"


def test_stop_during_the_first_section_writes_no_video(engines, tmp_path):
    stop = threading.Event()
    paths = JobPaths.for_video(tmp_path / "early.mp4")
    events = run(
        engines["framepack"],
        tiny_settings(),
        paths,
        stop,
        on_event=lambda e: isinstance(e, StepProgress) and stop.set(),
    )
    assert [type(e) for e in events if not isinstance(e, StageStarted)] == [StepProgress, Finished]
    assert events[-1].video is None and events[-1].stopped
    assert not paths.video.exists()


def test_history_layout_fed_to_the_transformer(with_sink, tmp_path, monkeypatch):
    engine = with_sink["framepack"]
    calls = []
    original = engine.components.transformer.forward

    def spy(**kwargs):
        calls.append({k: v for k, v in kwargs.items() if k.startswith(("indices", "latents", "hidden"))})
        return original(**kwargs)

    monkeypatch.setattr(engine.components.transformer, "forward", spy)
    run(engine, tiny_settings(steps=2, step_cache="off"), JobPaths.for_video(tmp_path / "l.mp4"), sink=FrameSink())
    assert len(calls) == 4  # 2 sections x 2 steps, CFG off
    first, last = calls[0], calls[-1]
    assert first["hidden_states"].shape == (1, 16, 9, 16, 16)
    assert first["indices_latents"].tolist() == list(range(10, 19))  # padding 1 window after the start frame
    assert first["indices_latents_clean"].tolist() == [0, 19]
    assert first["latents_history_4x"].shape[2] == 16 and first["latents_history_2x"].shape[2] == 2
    assert first["latents_clean"][:, :, 1].abs().sum() == 0  # no history yet: zeros
    assert last["indices_latents"].tolist() == list(range(1, 10))  # the last section touches the start frame
    assert last["latents_clean"][:, :, 1].abs().sum() > 0  # now it sees the first section's latents


def test_real_cfg_runs_a_negative_pass_and_changes_the_result(with_sink, tmp_path, monkeypatch):
    engine = with_sink["framepack"]
    count = {"calls": 0}
    original = engine.components.transformer.forward

    def counting(**kwargs):
        count["calls"] += 1
        return original(**kwargs)

    monkeypatch.setattr(engine.components.transformer, "forward", counting)
    videos = []
    for cfg in (1.0, 4.0):
        sink = FrameSink()
        count["calls"] = 0
        settings = tiny_settings(
            seconds=1.0, steps=3, cfg=cfg, cfg_rescale=0.5, negative_prompt="blurry", step_cache="off"
        )
        events = run(engine, settings, JobPaths.for_video(tmp_path / f"cfg{cfg}.mp4"), sink=sink)
        assert isinstance(events[-1], Finished)
        assert count["calls"] == (3 if cfg == 1.0 else 6)
        videos.append(sink.last)
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 0.5


def test_teacache_skips_steps_but_never_the_first_or_last(with_sink, tmp_path):
    engine = with_sink["framepack"]
    run(engine, tiny_settings(seconds=1.0, steps=20), JobPaths.for_video(tmp_path / "on.mp4"), sink=FrameSink())
    assert engine.teacache.computed + engine.teacache.skipped == 20
    assert 2 <= engine.teacache.computed < 20
    assert engine.magcache.computed == engine.magcache.skipped == 0
    run(
        engine,
        tiny_settings(seconds=1.0, steps=20, step_cache="off"),
        JobPaths.for_video(tmp_path / "off.mp4"),
        sink=FrameSink(),
    )
    assert engine.teacache.computed == engine.teacache.skipped == 0


@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_magcache_skips_the_steps_its_calibration_allows_and_the_sidecar_records_the_choice(
    with_sink, tmp_path, variant
):
    """The steps MagCache skips depend on the variant's calibration and the job's settings, not on the weights:
    at 20 steps (FramePack-Studio's defaults: threshold 0.1, 2 skips in a row, 25% retained) FramePack's table
    skips 9 steps, F1's 10, each section."""
    engine = with_sink[variant]
    paths = JobPaths.for_video(tmp_path / "mag.mp4")
    settings = tiny_settings(seconds=2.0, steps=20, step_cache="magcache", variant=variant)
    run(engine, settings, paths, sink=FrameSink())
    skipped = {"framepack": 9, "f1": 10}[variant] * 2
    assert (engine.magcache.computed, engine.magcache.skipped) == (40 - skipped, skipped)
    assert engine.teacache.computed == engine.teacache.skipped == 0
    record = json.loads(paths.sidecar.read_text())
    assert record["settings"]["step_cache"] == "magcache" and record["settings"]["magcache_threshold"] == 0.1
    assert record["step_cache"] == {"name": "magcache", "computed": 40 - skipped, "skipped": skipped}
    paths = JobPaths.for_video(tmp_path / "off.mp4")
    run(engine, tiny_settings(seconds=1.0, steps=4, step_cache="off", variant=variant), paths, sink=FrameSink())
    assert json.loads(paths.sidecar.read_text())["step_cache"] == {"name": "off"}


def test_a_failure_becomes_a_failed_event_and_is_recorded(with_sink, tmp_path, monkeypatch):
    engine = with_sink["framepack"]

    def broken(**kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(engine.components.transformer, "forward", broken)
    paths = JobPaths.for_video(tmp_path / "bad.mp4")
    events = run(engine, tiny_settings(), paths, sink=FrameSink())
    assert events[-1] == Failed("RuntimeError: kernel exploded")
    assert not [e for e in events if isinstance(e, StepProgress | SectionFinished)]
    assert not paths.video.exists()
    assert json.loads(paths.sidecar.read_text())["status"] == "failed"


@pytest.mark.parametrize("where", ["latents", "pixels"])
def test_a_section_that_comes_out_nan_fails_the_job_instead_of_writing_a_black_video(with_sink, tmp_path, where):
    """Non-finite weights (a damaged LoRA or checkpoint) make NaN latents, which the VAE turns into black frames."""
    engine = with_sink["framepack"]
    module = engine.components.transformer.proj_out if where == "latents" else engine.components.vae.decoder
    hook = module.register_forward_hook(lambda module, args, output: output * float("nan"))
    paths, sink = JobPaths.for_video(tmp_path / "nan.mp4"), FrameSink()
    try:
        events = run(engine, tiny_settings(steps=2), paths, sink=sink)
    finally:
        hook.remove()
    assert isinstance(events[-1], Failed) and not events[-1].bad_input
    assert "NaN or infinite" in events[-1].message and "section 1 of 2" in events[-1].message
    assert sink.calls == [] and not paths.video.exists()  # no black video
    record = json.loads(paths.sidecar.read_text())
    assert record["status"] == "failed" and record["error"] == events[-1].message


def test_wrong_variant_for_the_loaded_transformer(engines, tmp_path):
    events = run(engines["f1"], tiny_settings(variant="framepack"), JobPaths.for_video(tmp_path / "v.mp4"))
    assert isinstance(events[0], Failed) and "loaded transformer is 'f1'" in events[0].message


def test_one_job_at_a_time_per_engine(with_sink, tmp_path):
    engine = with_sink["framepack"]
    first = engine.generate(
        example_image(256, 256), tiny_settings(seconds=1.0, steps=1), JobPaths.for_video(tmp_path / "a.mp4")
    )
    assert isinstance(next(first), StageStarted)  # the first job is running (suspended between events)
    second = list(engine.generate(example_image(256, 256), tiny_settings(), JobPaths.for_video(tmp_path / "b.mp4")))
    assert second == [Failed("this engine is already running a job; jobs run one at a time")]
    assert isinstance(list(first)[-1], Finished)
    assert isinstance(
        run(engine, tiny_settings(seconds=1.0, steps=1), JobPaths.for_video(tmp_path / "c.mp4"))[-1], Finished
    )


def test_a_job_abandoned_by_its_consumer_says_stopped_and_frees_the_engine(with_sink, tmp_path):
    engine = with_sink["framepack"]
    paths = JobPaths.for_video(tmp_path / "abandoned.mp4")
    job = engine.generate(example_image(256, 256), tiny_settings(steps=2), paths)
    for event in job:
        if isinstance(event, SectionFinished):
            break
    job.close()
    assert json.loads(paths.sidecar.read_text())["status"] == "stopped"
    assert isinstance(
        run(engine, tiny_settings(seconds=1.0, steps=1), JobPaths.for_video(tmp_path / "next.mp4"))[-1], Finished
    )


def test_an_earlier_job_is_replaced_as_a_whole_only_when_asked_and_only_by_a_video(with_sink, tmp_path, monkeypatch):
    """`--overwrite` replaces an earlier job's three files only once the new job has written its first video: a job
    that is stopped or fails before that leaves the earlier job as it was, and nothing of its own."""
    engine = with_sink["framepack"]
    paths = JobPaths.for_video(tmp_path / "job.mp4")
    engine.write_video = lambda frames, path, fps, crf: path.write_bytes(b"old video")
    run(engine, tiny_settings(seconds=1.0, steps=1), paths)
    earlier = contents(tmp_path)
    refused = list(engine.generate(example_image(256, 256), tiny_settings(steps=1), paths))
    assert isinstance(refused[-1], Failed) and "already exists; pass --overwrite" in refused[-1].message
    assert paths.video.read_bytes() == b"old video"
    stop = threading.Event()
    events = []
    for event in engine.generate(example_image(256, 256), tiny_settings(), paths, stop, overwrite=True):
        events.append(event)
        if isinstance(event, StepProgress):
            stop.set()  # stopped before its first section: no video of its own
    assert events[-1].stopped and events[-1].video is None
    assert contents(tmp_path) == earlier  # no video of its own: the earlier job stays whole, nothing staged is left
    monkeypatch.setattr(engine.components.transformer, "forward", exploding)
    failed = list(engine.generate(example_image(256, 256), tiny_settings(), paths, overwrite=True))
    assert isinstance(failed[-1], Failed) and contents(tmp_path) == earlier
    monkeypatch.undo()
    engine.write_video = lambda frames, path, fps, crf: path.write_bytes(b"new video")
    run(engine, tiny_settings(seconds=1.0, steps=1, seed=7), paths, overwrite=True)
    assert paths.video.read_bytes() == b"new video" and sorted(contents(tmp_path)) == sorted(earlier)
    assert json.loads(paths.sidecar.read_text())["settings"]["seed"] == 7  # replaced as a whole


def contents(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def exploding(**kwargs):
    raise RuntimeError("kernel exploded")


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_the_end_image_is_the_first_sections_clean_post_frame_at_its_strength(with_sink, tmp_path, monkeypatch,
                                                                               strength):  # fmt: skip
    """The end image, bucketed like the start image and VAE-encoded, is the clean frame after the first section's
    window (the video's end), scaled by the strength; later sections see their history there as before. Its SigLIP
    embedding is averaged with the start image's, and the sidecar names the file."""
    from PIL import Image

    from diffusers_helper.pipeline import conditioning

    engine = with_sink["framepack"]
    end_path = tmp_path / "end.png"
    Image.fromarray(np.ascontiguousarray(example_image(300, 260)[::-1])).save(end_path)  # another size and picture
    calls, encoded, embedded = [], [], []
    original_forward, original_latents = engine.components.transformer.forward, engine.pipe.prepare_image_latents
    original_embeds = conditioning.encode_image

    def spy(**kwargs):
        calls.append({"post": kwargs["latents_clean"][:, :, 1].clone(), "image": kwargs["image_embeds"].clone()})
        return original_forward(**kwargs)

    def latents(image, **kwargs):
        encoded.append(original_latents(image, **kwargs))
        return encoded[-1]

    def embeds(*args):
        embedded.append(original_embeds(*args))
        return embedded[-1]

    monkeypatch.setattr(engine.components.transformer, "forward", spy)
    monkeypatch.setattr(engine.pipe, "prepare_image_latents", latents)
    monkeypatch.setattr(conditioning, "encode_image", embeds)
    paths = JobPaths.for_video(tmp_path / "e.mp4")
    settings = tiny_settings(steps=2, step_cache="off", end_image=end_path, end_strength=strength)
    events = run(engine, settings, paths, sink=FrameSink())
    assert isinstance(events[-1], Finished) and len(calls) == 4  # 2 sections x 2 steps
    start, end = encoded
    assert end.shape == start.shape  # bucketed like the start image
    for call in calls[:2]:
        torch.testing.assert_close(call["post"], (strength * end[:, :, 0]).to(call["post"]))
    assert all(not torch.equal(call["post"], calls[0]["post"]) for call in calls[2:])  # the history, as before
    assert len(embedded) == 2 and not torch.equal(*embedded)
    torch.testing.assert_close(calls[0]["image"], ((embedded[0] + embedded[1]) / 2).to(calls[0]["image"]))
    recorded = json.loads(paths.sidecar.read_text())
    assert recorded["settings"]["end_image"] == str(end_path) and recorded["settings"]["end_strength"] == strength
    assert len(recorded["end_image"]["sha256"]) == 64


def test_a_bad_end_image_fails_the_job_before_anything_is_written(with_sink, tmp_path):
    paths = JobPaths.for_video(tmp_path / "x.mp4")
    (tmp_path / "end.png").write_bytes(b"not a picture")
    events = run(with_sink["framepack"], tiny_settings(end_image=tmp_path / "end.png"), paths, sink=FrameSink())
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].bad_input
    assert events[0].message.startswith(f"not a readable image file: {tmp_path / 'end.png'}")
    assert list(tmp_path.iterdir()) == [tmp_path / "end.png"]
