"""The app through its HTTP API (gradio_client against 127.0.0.1, tiny preset)."""

import json
import re
import signal
import threading
import time

import av
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from demo_gradio import STEP_CACHE_CHOICES, lora_choices
from diffusers_helper.settings import STEP_CACHES, InvalidSettings, LoraChoice
from tests.support.app_server import running_app
from tests.support.lora_files import TINY_LAYERS, random_layers, write_kohya, write_peft

# image, prompt, negative prompt, seed, seconds, steps, distilled CFG, window, CFG, rescale, preserve, step cache,
# CRF, variant, resolution
ARGUMENTS = ["a cat walks", "", 31337, 2.0, 6, 10.0, 9, 1.0, 0.0, 6.0, "teacache", 16, "framepack", 128]
STEP_CACHE = ARGUMENTS.index("teacache")


def with_seconds(seconds: float, steps: int = 6) -> list:
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
def app_url(app_dir):
    with running_app(app_dir / "outputs", app_dir / "app.log", "--loras", str(app_dir / "loras")) as app:
        yield app.url


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


def test_a_complete_job_returns_a_playable_video(app_url, image_file):
    client = Client(app_url, verbose=False)
    video, _, progress, status, download = client.predict(
        handle_file(str(image_file)), *ARGUMENTS, api_name="/generate"
    )
    assert frame_count(video) == 73
    assert text(progress).startswith("done: 73 frames") and 'value="100"' in progress
    assert "**Models:** framepack (lllyasviel/FramePackI2V_HY), tiny preset (random weights: expect noise)" in status
    assert "cpu, float32" in status and "**TensorRT:** off" in status
    assert download["visible"] is True and frame_count(download["value"]) == 73


def test_the_page_names_every_stage_of_a_job(app_url, image_file):
    job = watching_client(app_url).submit(
        handle_file(str(image_file)), *with_seconds(1.0, steps=2), api_name="/generate"
    )
    job.result(timeout=300)
    seen = progress_texts(job)
    stages = ["encoding the prompt and image", "section 1 of 1 · sampling step 1/2", "section 1 of 1 · decoding",
              "section 1 of 1 · writing the MP4", "done: 37 frames"]  # fmt: skip
    positions = [next(i for i, line in enumerate(seen) if stage in line) for stage in stages]
    assert positions == sorted(positions)


def test_end_after_the_first_section_returns_the_partial_video(app_url, image_file):
    client = watching_client(app_url)
    job = client.submit(handle_file(str(image_file)), *with_seconds(4.0, steps=30), api_name="/generate")
    deadline = time.monotonic() + 120
    while not any("33 frames so far" in line for line in progress_texts(job)):
        assert time.monotonic() < deadline and not job.done()
        time.sleep(0.1)
    client.predict(api_name="/end")
    video, _, progress, _, _ = job.result(timeout=120)
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
    assert text(client.predict(handle_file(str(image_file)), *with_seconds(1.0), api_name="/generate")[2]).startswith(
        "done"
    )


def test_two_clients_at_once_both_finish_in_turn(app_url, image_file):
    clients = [Client(app_url, verbose=False) for _ in range(2)]
    jobs = [client.submit(handle_file(str(image_file)), *with_seconds(1.0), api_name="/generate") for client in clients]
    seen_waiting = threading.Event()
    while not all(job.done() for job in jobs):
        statuses = {job.status().code.name for job in jobs}
        if statuses & {"PROCESSING", "ITERATING", "PROGRESS"} and "IN_QUEUE" in statuses:
            seen_waiting.set()
        time.sleep(0.05)
    assert seen_waiting.is_set()  # one ran while the other waited its turn
    for job in jobs:
        video, _, progress, _, _ = job.result()
        assert text(progress).startswith("done: 37 frames") and frame_count(video) == 37


def test_the_other_variant_loads_on_demand(app_url, image_file):
    client = Client(app_url, verbose=False)
    arguments = [*with_seconds(1.0)[:-2], "f1", 128]
    video, _, progress, _, _ = client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
    assert text(progress).startswith("done: 37 frames") and frame_count(video) == 37


def records(outputs) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted(outputs.glob("*.json"))]


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


def test_a_cancelled_job_stops_and_the_next_job_runs_alone(tmp_path, image_file):
    outputs = tmp_path / "outputs"
    with running_app(outputs, tmp_path / "app.log") as app:
        url = app.url
        job = watching_client(url).submit(
            handle_file(str(image_file)), *with_seconds(4.0, steps=30), api_name="/generate"
        )
        deadline = time.monotonic() + 120
        while not any("section 1 of 3 · sampling step 2" in line for line in progress_texts(job)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        job.cancel()
        video, _, progress, _, _ = Client(url, verbose=False).predict(
            handle_file(str(image_file)), *with_seconds(1.0), api_name="/generate"
        )
        assert text(progress).startswith("done: 37 frames") and frame_count(video) == 37
        log = (tmp_path / "app.log").read_text()
    cancelled, second = records(outputs)
    assert cancelled["status"] == "stopped" and cancelled["sections_done"] < 3  # it did not run on unasked
    assert second["status"] == "complete"
    assert "Traceback" not in log and "already running" not in log


def test_sigterm_stops_the_running_job_and_records_it(tmp_path, image_file):
    outputs = tmp_path / "outputs"
    with running_app(outputs, tmp_path / "app.log") as app:
        job = watching_client(app.url).submit(
            handle_file(str(image_file)), *with_seconds(4.0, steps=30), api_name="/generate"
        )
        deadline = time.monotonic() + 120
        while not any("section 2 of 3" in line for line in progress_texts(job)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        app.process.send_signal(signal.SIGTERM)
        assert app.process.wait(timeout=120) == 0
    (record,) = records(outputs)
    assert record["status"] == "stopped" and record["sections_done"] >= 1
    assert frame_count(str(outputs / record["video"])) == record["frames"]
    assert not [path for path in outputs.iterdir() if path.name.startswith(".")]


def test_a_job_with_a_lora_records_it_and_the_page_names_it(app_url, app_dir, image_file):
    client = Client(app_url, verbose=False)
    style = app_dir / "loras" / "style.safetensors"
    _, _, progress, status, _ = client.predict(
        handle_file(str(image_file)), *with_seconds(1.0), ["style.safetensors"], "0.5", api_name="/generate"
    )
    assert text(progress).startswith("done: 37 frames") and "**LoRAs:** style.safetensors x0.5" in status
    (record,) = [record for record in records(app_dir / "outputs") if record["loras"]]
    assert record["loras"][0]["name"] == "style.safetensors" and record["loras"][0]["scale"] == 0.5
    assert record["loras"][0]["path"] == str(style) and len(record["loras"][0]["sha256"]) == 64
    _, _, progress, status, _ = client.predict(handle_file(str(image_file)), *with_seconds(1.0), api_name="/generate")
    assert text(progress).startswith("done: 37 frames") and "**LoRAs:** none" in status  # taken out again


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
            client.predict(handle_file(str(image_file)), *with_seconds(1.0), names, scales, api_name="/generate")[2]
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
