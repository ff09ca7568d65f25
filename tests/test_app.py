"""The app through its HTTP API (gradio_client against 127.0.0.1, tiny preset): served from this process, with jobs
held at known points where a test acts on them; in a process of its own where a test sends it signals."""

import json
import re
import signal
import socket
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import demo_gradio
from demo_gradio import STEP_CACHE_CHOICES, lora_choices
from diffusers_helper.media.images import example_image
from diffusers_helper.pipeline.events import SectionFinished, StepProgress
from diffusers_helper.settings import STEP_CACHES, InvalidSettings, LoraChoice
from tests.support.app_server import JobGate, running_app, served_app
from tests.support.lora_files import TINY_LAYERS, random_layers, write_kohya, write_peft

# image, prompt, negative prompt, seed, seconds, steps, distilled CFG, window, CFG, rescale, preserve, step cache,
# CRF, variant, resolution
ARGUMENTS = ["a cat walks", "", 31337, 1.0, 2, 10.0, 9, 1.0, 0.0, 6.0, "teacache", 16, "framepack", 128]
STEP_CACHE = ARGUMENTS.index("teacache")


def with_seconds(seconds: float, steps: int = 2) -> list:
    return [*ARGUMENTS[:3], seconds, steps, *ARGUMENTS[5:]]


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory):
    """The app's folders: outputs, and LoRAs (one for the tiny transformer, one for another model)."""
    directory = tmp_path_factory.mktemp("app")
    (directory / "loras" / "other").mkdir(parents=True)
    write_kohya(directory / "loras" / "style.safetensors", random_layers(TINY_LAYERS, 4, 1), alpha=4.0)
    write_peft(
        directory / "loras" / "other" / "wan.safetensors", random_layers({"blocks.0.self_attn.q": (32, 32)}, 4, 2)
    )
    return directory


@pytest.fixture(scope="module")
def served(app_dir):
    with served_app(app_dir / "outputs", "--loras", str(app_dir / "loras")) as served:
        yield served


@pytest.fixture
def app_url(served):
    return served.url


def text(progress_html: str) -> str:
    return re.sub(r"<[^>]+>", "", progress_html).replace("&#x27;", "'")


def watching_client(url: str) -> Client:
    """A client for following a job's progress. It downloads no files: on a busy machine a download can fail, and
    gradio_client then replaces that whole update with the exception. Videos are read from the app's own path
    (the app runs on this machine)."""
    return Client(url, verbose=False, download_files=False)


def progress_texts(job) -> list[str]:
    return [text(output[2]) for output in job.outputs()]


def frame_count(path: str) -> int:
    with av.open(path) as container:
        return sum(1 for _ in container.decode(video=0))


def records(outputs) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(outputs.glob("*.json"))]


def test_a_complete_job_returns_a_playable_video(app_url, image_file):
    client = Client(app_url, verbose=False)
    video, _, progress, status, download = client.predict(
        handle_file(str(image_file)), *ARGUMENTS, api_name="/generate"
    )
    assert frame_count(video) == 37
    assert text(progress).startswith("done: 37 frames") and 'value="100"' in progress
    assert "**Models:** framepack (lllyasviel/FramePackI2V_HY), tiny preset (random weights: expect noise)" in status
    assert "cpu, float32" in status and "**TensorRT:** off" in status
    assert download["visible"] is True and frame_count(download["value"]) == 37


def test_the_apis_outputs_are_named(app_url):
    generate = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    returns = [value["label"] for value in generate["/generate"]["returns"]]
    assert returns == ["Finished frames", "Next latents", "Progress", "Status", "Download video"]


def test_the_page_names_every_stage_of_a_job(app_url, image_file):
    job = watching_client(app_url).submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
    job.result(timeout=300)
    seen = progress_texts(job)
    stages = ["encoding the prompt and image", "section 1 of 1 · sampling step 1/2", "section 1 of 1 · decoding",
              "section 1 of 1 · writing the MP4", "done: 37 frames"]  # fmt: skip
    positions = [next(i for i, line in enumerate(seen) if stage in line) for stage in stages]
    assert positions == sorted(positions)


def test_end_after_the_first_section_returns_the_partial_video(served, image_file):
    client = watching_client(served.url)
    with JobGate(served.app, lambda event: isinstance(event, SectionFinished)) as gate:
        job = client.submit(handle_file(str(image_file)), *with_seconds(4.0), api_name="/generate")
        assert gate.reached.wait(300)  # the first section is written; the job waits before the second
        client.predict(api_name="/end")
        assert gate.stop.is_set()
    video, _, progress, _, _ = job.result(timeout=300)
    assert frame_count(video["path"]) == 33
    assert text(progress).startswith("stopped after 1 of 3 sections: 33 frames") and "done" not in text(progress)


def test_bad_uploads_get_their_message_and_the_app_keeps_serving(app_url, image_file, tmp_path):
    client = Client(app_url, verbose=False)
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 20)).save(small)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_file.read_bytes()[:300])
    (tmp_path / "notes.png").write_text("not an image")
    progress = text(client.predict(handle_file(str(small)), *ARGUMENTS, api_name="/generate")[2])
    assert progress.startswith("error:") and "each side must be at least 64 pixels" in progress
    progress = text(client.predict(handle_file(str(truncated)), *ARGUMENTS, api_name="/generate")[2])
    assert progress.startswith("error: not a readable image file")
    with pytest.raises(Exception, match="image"):  # not an image at all: Gradio itself refuses the upload
        client.predict(handle_file(str(tmp_path / "notes.png")), *ARGUMENTS, api_name="/generate")
    assert text(client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")[2]).startswith("done")


def test_two_clients_at_once_both_finish_in_turn(served, image_file):
    """The second page's job waits in the store's queue (its page says so) while the first runs; both finish."""
    clients = [watching_client(served.url) for _ in range(2)]
    with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
        first = clients[0].submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        assert gate.reached.wait(300)  # the first job holds at its first step
        second = clients[1].submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        deadline = time.monotonic() + 120
        while not any("waiting in the queue, 1 job(s) ahead" in line for line in progress_texts(second)):
            assert time.monotonic() < deadline, progress_texts(second)
            time.sleep(0.05)
        assert not gate.stop.is_set()
    for job in (first, second):
        video, _, progress, _, _ = job.result(timeout=300)
        assert text(progress).startswith("done: 37 frames") and frame_count(video["path"]) == 37


def test_the_other_variant_loads_on_demand(app_url, image_file):
    client = Client(app_url, verbose=False)
    arguments = [*ARGUMENTS[:-2], "f1", 128]
    video, _, progress, _, _ = client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
    assert text(progress).startswith("done: 37 frames") and frame_count(video) == 37


def test_the_step_cache_choice_reaches_the_job(app_url, app_dir, image_file):
    """The radio's values are the settings' choices; a job runs with the one picked and records it."""
    assert sorted(STEP_CACHE_CHOICES.values()) == sorted(STEP_CACHES)
    client = Client(app_url, verbose=False)
    for choice in ("magcache", "off"):
        arguments = with_seconds(1.0, steps=12)
        arguments[STEP_CACHE] = choice
        video, _, progress, _, _ = client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
        assert text(progress).startswith("done: 37 frames") and frame_count(video) == 37
        (record,) = [r for r in records(app_dir / "outputs") if r["settings"]["step_cache"] == choice]
        assert record["step_cache"]["name"] == choice
    assert record["step_cache"] == {"name": "off"}
    magcache = next(r for r in records(app_dir / "outputs") if r["settings"]["step_cache"] == "magcache")
    assert magcache["step_cache"]["skipped"] > 0


def test_a_page_that_leaves_keeps_its_job_which_ends_in_the_history(served, app_dir, image_file):
    before = {path.name for path in (app_dir / "outputs").glob("*.json")}
    with JobGate(served.app, lambda event: isinstance(event, StepProgress) and event.step == 2) as gate:
        job = watching_client(served.url).submit(
            handle_file(str(image_file)), *with_seconds(2.0, steps=4), api_name="/generate"
        )
        assert gate.reached.wait(300)
        job.cancel()  # the page closes, or its request is cancelled
        time.sleep(1)  # what the page's leaving could set, it sets at once (the job holds between steps)
        assert not gate.stop.is_set()
    client = Client(served.url, verbose=False)
    deadline = time.monotonic() + 300
    while client.predict(api_name="/jobs")[0]["state"] != "done":  # newest first once finished
        assert time.monotonic() < deadline
        time.sleep(0.2)
    (name,) = {path.name for path in (app_dir / "outputs").glob("*.json")} - before
    record = json.loads((app_dir / "outputs" / name).read_text())
    assert record["status"] == "complete" and record["sections_done"] == 2


def test_a_job_with_a_lora_records_it_and_the_page_names_it(app_url, app_dir, image_file):
    client = Client(app_url, verbose=False)
    style = app_dir / "loras" / "style.safetensors"
    _, _, progress, status, _ = client.predict(
        handle_file(str(image_file)), *ARGUMENTS, ["style.safetensors"], "0.5", api_name="/generate"
    )
    assert text(progress).startswith("done: 37 frames") and "**LoRAs:** style.safetensors x0.5" in status
    (record,) = [record for record in records(app_dir / "outputs") if record["loras"]]
    assert record["loras"][0]["name"] == "style.safetensors" and record["loras"][0]["scale"] == 0.5
    assert record["loras"][0]["path"] == str(style) and len(record["loras"][0]["sha256"]) == 64
    _, _, progress, status, _ = client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
    assert text(progress).startswith("done: 37 frames") and "**LoRAs:** none" in status  # taken out again


def test_a_job_with_an_end_image_records_it_and_its_strength(app_url, app_dir, image_file, tmp_path):
    end = tmp_path / "end.png"
    Image.fromarray(np.ascontiguousarray(example_image(200, 160)[::-1])).save(end)
    client = Client(app_url, verbose=False)
    _, _, progress, _, _ = client.predict(
        handle_file(str(image_file)), *ARGUMENTS, [], "", handle_file(str(end)), 0.6, api_name="/generate"
    )
    assert text(progress).startswith("done: 37 frames")
    (record,) = [record for record in records(app_dir / "outputs") if record["settings"]["end_image"]]
    assert record["settings"]["end_strength"] == 0.6 and len(record["end_image"]["sha256"]) == 64
    kept = Path(record["settings"]["end_image"])  # a copy kept with the job: the upload is a temporary file
    assert kept.parent == app_dir / "outputs" / "job_inputs" and kept.name.endswith("_end.png")
    assert kept.read_bytes() == end.read_bytes()


def test_a_timeline_job_from_the_page_records_each_sections_prompt_and_a_bad_one_is_one_line(app_url, app_dir,
                                                                                             image_file):  # fmt: skip
    client = Client(app_url, verbose=False)
    timeline = "[0s: a cat sits] [1s: the cat jumps]"
    arguments = [timeline, *with_seconds(2.0, steps=1)[1:], [], "", None, 1.0, 1]
    _, _, progress, _, _ = client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
    assert text(progress).startswith("done: 73 frames")
    (record,) = [record for record in records(app_dir / "outputs") if record["settings"]["prompt"] == timeline]
    assert record["settings"]["prompt_blend"] == 1
    assert [prompt["text"] for prompt in record["section_prompts"]] == ["the cat jumps", "a cat sits"]
    bad = ["[0s: a] [9s: b]", *ARGUMENTS[1:]]
    progress = text(client.predict(handle_file(str(image_file)), *bad, api_name="/generate")[2])
    assert progress == "error: prompt timeline: [9s: b] starts past the video's end (1s)"


def test_bad_lora_picks_get_one_line_messages(app_url, image_file):
    client = Client(app_url, verbose=False)
    cases = [
        (["style.safetensors"], "1, 2", "error: LoRA scales: give one per chosen LoRA"),
        (["style.safetensors"], "strong", "error: LoRA scales: 'strong' is not a number"),
        (["style.safetensors"], "12", "error: LoRA scale must be in [-10, 10], got 12.0"),
        (["other/wan.safetensors"], "", "failed: LoRA "),
    ]
    for names, scales, expected in cases:
        progress = text(
            client.predict(handle_file(str(image_file)), *ARGUMENTS, names, scales, api_name="/generate")[2]
        )
        assert progress.startswith(expected) and "\n" not in progress, progress
    assert "wan.safetensors does not fit this FramePack transformer" in progress


def test_lora_picks_become_job_settings(tmp_path):
    available = ["a.safetensors", "sub/b.safetensors"]
    assert lora_choices(tmp_path, available, [], "") == ()
    assert lora_choices(tmp_path, available, ["sub/b.safetensors", "a.safetensors"], " 0.5, -1 ") == (
        LoraChoice(tmp_path / "sub/b.safetensors", 0.5),
        LoraChoice(tmp_path / "a.safetensors", -1.0),
    )
    assert lora_choices(tmp_path, available, ["a.safetensors"], None) == (LoraChoice(tmp_path / "a.safetensors"),)
    with pytest.raises(InvalidSettings, match="LoRA '../x.safetensors' is not in"):
        lora_choices(tmp_path, available, ["../x.safetensors"], "")


# -- starting and stopping the app ------------------------------------------------------------------------------------


def test_a_port_in_use_or_out_of_range_is_refused_before_the_models_load(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(demo_gradio, "App", lambda args: pytest.fail("the models were loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert demo_gradio.main(["--preset", "tiny", "--outputs", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port} (") and err.count("\n") == 1
    assert demo_gradio.main(["--preset", "tiny", "--outputs", str(tmp_path), "--port", "70000"]) == 2
    assert capsys.readouterr().err == "error: --port must be in 1-65535, got 70000\n"


def _start_long_job(url: str, image_file):
    """A job of 3 sections, followed until the second section is sampling."""
    job = watching_client(url).submit(handle_file(str(image_file)), *with_seconds(4.0, steps=30), api_name="/generate")
    deadline = time.monotonic() + 240
    while not any("section 2 of 3 · sampling step" in line for line in progress_texts(job)):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.05)
    return job


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals")
def test_sigterm_stops_the_running_job_at_its_next_step_and_records_it(tmp_path, image_file):
    """The job stops within the section it was sampling (the stop reaches it before the server's close, which takes
    seconds), its JSON says so, and the app exits cleanly."""
    outputs = tmp_path / "outputs"
    with running_app(outputs, tmp_path / "app.log") as app:
        _start_long_job(app.url, image_file)
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(timeout=120) == 0
    (record,) = records(outputs)
    assert record["status"] == "stopped" and record["sections_done"] == 1
    assert frame_count(str(outputs / record["video"])) == record["frames"] == 33
    assert not [path for path in outputs.iterdir() if path.name.startswith(".")]
    log = (tmp_path / "app.log").read_text()
    assert "Traceback" not in log
    assert "(--share adds a public link)" in log and "share=True" not in log  # the app's flag, not Gradio's code


@pytest.mark.subprocess
@pytest.mark.skipif(sys.platform == "win32", reason="sends POSIX signals")
def test_a_second_sigterm_stops_at_once_without_a_traceback(tmp_path, image_file):
    outputs = tmp_path / "outputs"
    with running_app(outputs, tmp_path / "app.log") as app:
        _start_long_job(app.url, image_file)
        app.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while "SIGTERM: stopping the running job" not in (tmp_path / "app.log").read_text():
            assert time.monotonic() < deadline  # (a signal sent before the first is handled merges with it)
            time.sleep(0.05)
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(timeout=120) == 128 + signal.SIGTERM
    log = (tmp_path / "app.log").read_text()
    assert "Traceback" not in log and "SIGTERM again: stopping at once" in log
    (record,) = records(outputs)
    assert record["status"] == "stopped"


def test_the_page_extends_a_video_and_makes_several_videos_with_the_next_seeds(app_url, app_dir, image_file,
                                                                               tmp_path):  # fmt: skip
    from diffusers_helper.media.video import write_mp4

    frames = np.stack([example_image(160, 128)[:, i : i + 128] for i in range(9)])
    write_mp4(frames, tmp_path / "in.mp4", 30, 0)
    client = Client(app_url, verbose=False)
    arguments = ["a cat walks on", "", 500, 1.0, 1, *ARGUMENTS[5:12], "f1", 128]
    extension = handle_file(str(tmp_path / "in.mp4"))
    video, _, progress, _, _ = client.predict(None, *arguments, [], "", None, 1.0, 0, extension, False, 2,
                                              api_name="/generate")  # fmt: skip
    assert text(progress).startswith("video 2 of 2 · done: 45 frames")  # 9 of the video's, then 36 new
    made = [record for record in records(app_dir / "outputs") if record["settings"]["prompt"] == "a cat walks on"]
    assert sorted(record["settings"]["seed"] for record in made) == [500, 501]
    assert all(record["extend"]["frames"] == 9 and record["frames"] == 45 for record in made)
    both = text(client.predict(handle_file(str(image_file)), *arguments, [], "", None, 1.0, 0, extension,
                               False, 1, api_name="/generate")[2])  # fmt: skip
    assert both == "error: a video to extend gives the job its start frame: clear the start image or the video"


def test_load_settings_sets_every_control_from_a_jobs_json_or_its_mp4(app_url, app_dir, image_file):
    client = Client(app_url, verbose=False)
    arguments = ["[0s: a fox] [0.5s: the fox sits]", "blurry", 77, 1.0, 1, 9.0, 5, 1.5, 0.2, 6.0, "magcache", 20,
                 "framepack", 128, ["style.safetensors"], "0.5", None, 1.0, 1, None, False, 1, 0.15, 0.3, 3,
                 0.5]  # fmt: skip
    video, _, progress, _, _ = client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
    assert text(progress).startswith("done"), text(progress)
    (record,) = [record for record in records(app_dir / "outputs") if record["settings"]["seed"] == 77]
    job = app_dir / "outputs" / record["video"]
    for given in (job.with_suffix(".json"), job):
        values = client.predict(handle_file(str(given)), api_name="/load_settings")
        (image, end_image, extend, only_new, prompt, negative, seed, seconds, steps, distilled, window, cfg, rescale,
         step_cache, crf, variant, resolution, loras, scales, end_strength, blend, teacache, magcache, skips,
         retention, said) = values  # fmt: skip
        assert Path(image).read_bytes() == job.with_suffix(".input.png").read_bytes()
        assert end_image is None and extend is None and only_new is False
        assert (prompt, negative, seed, seconds, steps, distilled, window, cfg, rescale) == (
            arguments[0],
            "blurry",
            77,
            1.0,
            1,
            9.0,
            5,
            1.5,
            0.2,
        )
        assert (step_cache, crf, variant, resolution, loras, scales, blend) == (
            "magcache", 20, "framepack", 128, ["style.safetensors"], "0.5", 1)  # fmt: skip
        assert (teacache, magcache, skips, retention) == (0.15, 0.3, 3, 0.5)
        assert text(said) == f"settings loaded from {job.with_suffix('.json').name}"
    (app_dir / "notes.json").write_text("{}")
    said = client.predict(handle_file(str(app_dir / "notes.json")), api_name="/load_settings")[-1]
    assert text(said).startswith("error: ") and "not a job's JSON" in text(said)
