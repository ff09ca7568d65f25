"""Extending a video: reading it at 30 fps in its bucket, what the sections see of it, what the MP4 holds."""

import json

import numpy as np
import pytest
import torch

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.media.video import write_mp4
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION
from diffusers_helper.pipeline import extension
from diffusers_helper.pipeline.events import READING_VIDEO, Failed, Finished, Notice, StageStarted
from diffusers_helper.pipeline.extension import load_video_to_extend
from diffusers_helper.settings import GenerationSettings, InvalidSettings
from tests.support.frame_sink import FrameSink


def write_clip(path, count: int, fps: int = 30, width: int = 128, height: int = 128):
    """A clip whose frame i is the example picture shifted by i pixels, so frames are told apart after encoding."""
    base = example_image(width + count, height)
    frames = np.stack([base[:, i : i + width] for i in range(count)])
    write_mp4(frames, path, fps, crf=0)
    return frames


def tiny_settings(**overrides) -> GenerationSettings:
    values = {"prompt": "a cat walks", "seconds": 1.2, "resolution": TINY_RESOLUTION, "steps": 2,
              "step_cache": "off", "latent_window": 3}  # fmt: skip
    return GenerationSettings(**{**values, **overrides})


def run(engine, settings, paths):
    sink = FrameSink()
    engine.write_video = sink
    return list(engine.generate(None, settings, paths)), sink


@pytest.fixture
def restores_writer(engines):
    originals = {variant: engine.write_video for variant, engine in engines.items()}
    yield engines
    for variant, engine in engines.items():
        engine.write_video = originals[variant]


def test_a_video_at_another_rate_is_resampled_to_30_fps_and_bucketed(tmp_path):
    write_clip(tmp_path / "v.mp4", 48, fps=24, width=160, height=120)  # 2 s at 24 fps, 4:3
    video = load_video_to_extend(tmp_path / "v.mp4", TINY_RESOLUTION)
    assert video.frames.shape == (60, 112, 144, 3)  # 2 s at 30 fps, in the 4:3 bucket of the 128 set
    assert video.source_fps == 24 and video.resampled
    assert video.notice() == "the video to extend is at 24 fps: resampled to 30 fps (60 frames)"
    record = video.record()
    assert record["frames"] == 60 and record["source_fps"] == 24 and record["resampled"] and len(record["sha256"]) == 64


def test_a_video_at_30_fps_keeps_its_frames(tmp_path):
    frames = write_clip(tmp_path / "v.mp4", 13)
    video = load_video_to_extend(tmp_path / "v.mp4", TINY_RESOLUTION)
    assert not video.resampled and video.notice() is None
    assert len(video.frames) == 13
    assert np.abs(video.frames.astype(int) - frames.astype(int)).mean() < 3  # lossless H.264, then yuv420p


def test_the_tail_is_whole_latents_ending_at_the_last_frame(tmp_path):
    write_clip(tmp_path / "v.mp4", 14)
    video = load_video_to_extend(tmp_path / "v.mp4", TINY_RESOLUTION)
    assert len(video.tail(2)) == 5 and np.array_equal(video.tail(2), video.frames[-5:])
    assert len(video.tail(19)) == 13  # as many as there are: 14 frames hold 4 whole latents


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda path: None, "the video to extend not found: {path}"),
        (lambda path: path.write_bytes(b"no video at all"), "not a readable video file: {path}"),
        (lambda path: write_clip(path, 3), "the video to extend has 3 frames at 30 fps; it needs at least 5: {path}"),
        (lambda path: write_clip(path, 6, width=64, height=32),
         "the video to extend ({path}) is 64x32; each side must be at least 64 pixels"),
    ],
)  # fmt: skip
def test_a_video_that_cannot_be_extended_is_one_line(tmp_path, make, message):
    path = tmp_path / "v.mp4"
    make(path)
    with pytest.raises(InvalidSettings) as raised:
        load_video_to_extend(path, TINY_RESOLUTION)
    assert str(raised.value).startswith(message.format(path=path)) and "\n" not in str(raised.value)


def test_a_video_longer_than_the_limit_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "MAX_SECONDS", 0.2)
    write_clip(tmp_path / "v.mp4", 10)
    with pytest.raises(InvalidSettings, match=r"longer than 0.2 s, the longest this takes"):
        load_video_to_extend(tmp_path / "v.mp4", TINY_RESOLUTION)


def test_f1_continues_the_videos_history_and_writes_its_frames_then_the_new_ones(restores_writer, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """The first new section sees the video's last latents as its 1x, 2x and 4x history, and the start latent is the
    video's first frame; the MP4 holds the video's frames unchanged, then one window of new frames per section."""
    from diffusers_helper.pipeline import conditioning

    engine = restores_writer["f1"]
    write_clip(tmp_path / "in.mp4", 29)
    video = load_video_to_extend(tmp_path / "in.mp4", TINY_RESOLUTION)
    calls, encoded, images = [], [], []
    original_forward, original_encode = engine.components.transformer.forward, conditioning.encode_video
    original_latents = engine.pipe.prepare_image_latents

    def latents(image, **kwargs):
        images.append(image.clone())
        return original_latents(image, **kwargs)

    def spy(**kwargs):
        calls.append({key: kwargs[key].clone() for key in ("latents_clean", "latents_history_2x",
                                                           "latents_history_4x")})  # fmt: skip
        return original_forward(**kwargs)

    def encode(pipe, frames, *args):
        encoded.append((frames, original_encode(pipe, frames, *args)))
        return encoded[-1][1]

    monkeypatch.setattr(engine.components.transformer, "forward", spy)
    monkeypatch.setattr(conditioning, "encode_video", encode)
    monkeypatch.setattr(engine.pipe, "prepare_image_latents", latents)
    paths = JobPaths.for_video(tmp_path / "out.mp4")
    events, sink = run(engine, tiny_settings(variant="f1", extend=tmp_path / "in.mp4"), paths)
    assert isinstance(events[-1], Finished), events[-1]
    assert events[0] == StageStarted(READING_VIDEO)
    (frames, context), = encoded  # fmt: skip
    assert np.array_equal(frames, video.frames)  # 29 frames: 8 latents, fewer than the history holds
    first = calls[0]
    torch.testing.assert_close(first["latents_clean"][:, :, 1:], context[:, :, -1:].to(first["latents_clean"]))
    torch.testing.assert_close(first["latents_history_2x"], context[:, :, -3:-1].to(first["latents_clean"]))
    history_4x = first["latents_history_4x"]
    assert history_4x[:, :, -5:].abs().sum() > 0 and history_4x[:, :, :-5].abs().sum() == 0  # then zeros
    (image,) = images  # the start latent: the video's first frame, encoded alone
    torch.testing.assert_close(image, torch.from_numpy(video.frames[0]).permute(2, 0, 1)[None].float() / 127.5 - 1)
    written = sink.last
    assert np.array_equal(written[:29], video.frames)
    assert [len(call) for call in sink.calls] == [41, 53, 65]  # 3 sections of 3 latents: 12 new frames each
    record = json.loads(paths.sidecar.read_text())
    assert record["extend"]["frames"] == 29 and record["frames"] == 65 and record["settings"]["extend"]
    assert events[-1].frames == 65


def test_f1_extension_sections_after_the_first_grow_the_new_part(restores_writer, tmp_path):
    engine = restores_writer["f1"]
    write_clip(tmp_path / "in.mp4", 9)
    settings = tiny_settings(variant="f1", extend=tmp_path / "in.mp4", seconds=0.8)  # 2 sections of 3 latents
    events, sink = run(engine, settings, JobPaths.for_video(tmp_path / "out.mp4"))
    assert isinstance(events[-1], Finished)
    assert [len(call) for call in sink.calls] == [9 + 12, 9 + 24]
    assert not np.array_equal(sink.calls[0][:21], sink.calls[1][:21])  # sections crossfade, as FramePack's do
    assert np.array_equal(sink.calls[0][:9], sink.calls[1][:9])  # the video's own frames never change


@pytest.mark.parametrize("only_new", [False, True])
def test_framepack_bridges_from_the_videos_last_frame_to_the_end_image(restores_writer, tmp_path, monkeypatch,
                                                                       only_new):  # fmt: skip
    """End to start, the video's last frame is the start frame: the first generated latents are encoded from it, the
    new frames end where the video's did (its repeat left out), and only the new ones with --extend-only-new."""
    from PIL import Image

    engine = restores_writer["framepack"]
    write_clip(tmp_path / "in.mp4", 17)
    video = load_video_to_extend(tmp_path / "in.mp4", TINY_RESOLUTION)
    Image.fromarray(example_image(128, 128)[::-1].copy()).save(tmp_path / "end.png")
    images = []
    original = engine.pipe.prepare_image_latents

    def latents(image, **kwargs):
        images.append(image.clone())
        return original(image, **kwargs)

    monkeypatch.setattr(engine.pipe, "prepare_image_latents", latents)
    settings = tiny_settings(extend=tmp_path / "in.mp4", end_image=tmp_path / "end.png", extend_only_new=only_new,
                             seconds=0.4)  # fmt: skip
    events, sink = run(engine, settings, JobPaths.for_video(tmp_path / "out.mp4"))
    assert isinstance(events[-1], Finished), events[-1]
    expected_start = torch.from_numpy(video.frames[-1]).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0
    torch.testing.assert_close(images[0], expected_start)  # the start frame, then the end image
    assert len(images) == 2
    new = 3 * 4  # one section of 3 latents, its first frame (the video's last) left out
    written = sink.last
    assert len(written) == (new if only_new else 17 + new)
    if not only_new:
        assert np.array_equal(written[:17], video.frames)


def test_a_start_image_beside_a_video_to_extend_is_refused(restores_writer, tmp_path):
    engine = restores_writer["f1"]
    write_clip(tmp_path / "in.mp4", 9)
    settings = tiny_settings(variant="f1", extend=tmp_path / "in.mp4")
    events = list(engine.generate(example_image(128, 128), settings, JobPaths.for_video(tmp_path / "o.mp4")))
    assert isinstance(events[-1], Failed) and events[-1].bad_input
    assert events[-1].message == "a video to extend gives the job its start frame: give no start image"


def test_a_resampled_video_is_said_and_recorded(restores_writer, tmp_path):
    engine = restores_writer["f1"]
    write_clip(tmp_path / "in.mp4", 16, fps=24)
    paths = JobPaths.for_video(tmp_path / "out.mp4")
    events, _ = run(engine, tiny_settings(variant="f1", extend=tmp_path / "in.mp4"), paths)
    notices = [event.message for event in events if isinstance(event, Notice)]
    assert notices == ["the video to extend is at 24 fps: resampled to 30 fps (20 frames)"]
    assert json.loads(paths.sidecar.read_text())["extend"]["resampled"] is True


def test_the_output_cannot_be_the_video_it_extends(restores_writer, tmp_path):
    engine = restores_writer["f1"]
    write_clip(tmp_path / "in.mp4", 9)
    before = (tmp_path / "in.mp4").read_bytes()
    settings = tiny_settings(variant="f1", extend=tmp_path / "in.mp4")
    events = list(engine.generate(None, settings, JobPaths.for_video(tmp_path / "in.mp4"), overwrite=True))
    assert isinstance(events[-1], Failed) and "is an input of the job" in events[-1].message
    assert (tmp_path / "in.mp4").read_bytes() == before


def test_only_new_needs_a_video_to_extend():
    with pytest.raises(InvalidSettings, match="--extend-only-new needs --extend"):
        GenerationSettings(prompt="x", extend_only_new=True)


def run_cli(capsys, *args):
    import generate

    try:
        code = generate.main([str(arg) for arg in args])
    except SystemExit as exit:  # the argument parser's own errors
        code = exit.code
    return code, capsys.readouterr().err


def test_the_cli_extends_a_video_and_reruns_the_extension_from_its_mp4(capsys, tmp_path):
    write_clip(tmp_path / "in.mp4", 9)
    common = ["--preset", "tiny", "--steps", "1", "--latent-window", "3", "--seconds", "0.4"]
    code, err = run_cli(capsys, *common, "--variant", "f1", "--extend", tmp_path / "in.mp4",
                        "--output", tmp_path / "a.mp4")  # fmt: skip
    assert code == 0, err
    first = json.loads((tmp_path / "a.json").read_text())
    assert first["frames"] == 9 + 12 and first["extend"]["path"] == str(tmp_path / "in.mp4")
    code, err = run_cli(capsys, "--preset", "tiny", "--from", tmp_path / "a.mp4", "--output", tmp_path / "b.mp4")
    assert code == 0, err
    again = json.loads((tmp_path / "b.json").read_text())
    assert again["settings"] == first["settings"] and again["frames"] == first["frames"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "{tmp}/start.png", "--extend", "{tmp}/in.mp4"],
         "--image and --extend: a video to extend gives the job its start frame; give one of them"),
        (["--image", "{tmp}/start.png", "--extend-only-new"],
         "--extend-only-new needs --extend: there is no video to leave out"),
        (["--extend", "{tmp}/missing.mp4"], "the video to extend not found: {tmp}/missing.mp4"),
        (["--extend", "{tmp}/notes.mp4"], "not a readable video file: {tmp}/notes.mp4"),
    ],
)  # fmt: skip
def test_bad_extension_flags_are_one_line_before_the_models_load(capsys, tmp_path, extra, message):
    from PIL import Image

    Image.fromarray(example_image(128, 128)).save(tmp_path / "start.png")
    write_clip(tmp_path / "in.mp4", 9)
    (tmp_path / "notes.mp4").write_text("not a video")
    args = [arg.format(tmp=tmp_path) for arg in extra]
    code, err = run_cli(capsys, "--preset", "tiny", *args, "--output", tmp_path / "o.mp4")
    assert code == 2 and err.startswith(f"error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1
    assert not (tmp_path / "o.mp4").exists()
