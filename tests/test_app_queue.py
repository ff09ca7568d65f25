"""The app on the job store: a page's jobs go into the store, which the page shows as a queue and a history, where
a job can be cancelled, retried, moved and run again; the queue is jobs.py's too, and survives a restart. Each page
follows its own job, and its End stops only that."""

import queue
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from diffusers_helper.frontend.queue import JobOver, LiveJobs, caption, follow, kept_input, thumbnail
from diffusers_helper.jobs.store import JobState, JobStore, this_worker
from diffusers_helper.pipeline.events import StepProgress
from tests.support.app_server import JobGate, served_app

REPO = Path(__file__).resolve().parent.parent
# prompt, negative prompt, seed, seconds, steps, distilled CFG, window, CFG, rescale, preserve, step cache, CRF,
# variant, resolution: a one-section job of two steps
ARGUMENTS = ["a cat walks", "", 31337, 1.0, 2, 10.0, 9, 1.0, 0.0, 6.0, "teacache", 16, "framepack", 128]


def jobs(client: Client) -> dict[int, dict]:
    return {job["id"]: job for job in client.predict(api_name="/jobs")}


def wait_for(condition, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.1)


def queued_order(client: Client) -> list[int]:
    return [job["id"] for job in client.predict(api_name="/jobs") if job["state"] == "queued"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with served_app(tmp_path_factory.mktemp("queue") / "outputs") as served:
        yield served


def test_a_pages_job_goes_into_the_store_with_a_copy_of_its_image(served, image_file, tmp_path):
    upload = tmp_path / "upload.png"
    upload.write_bytes(image_file.read_bytes())
    client = Client(served.url, verbose=False)
    client.predict(handle_file(str(upload)), *ARGUMENTS, api_name="/generate")
    upload.unlink()  # the browser's upload may be gone long before a queued job's turn
    with JobStore(served.app.store_path) as store:
        (job,) = store.jobs()
    assert job.state is JobState.DONE and job.sections_done == job.sections_total == 1
    kept = Path(job.settings["input_image"])
    assert kept.parent == served.app.outputs / "job_inputs" and kept.read_bytes() == image_file.read_bytes()
    assert job.settings["models"] == {"gpu_memory_preservation": 6.0}
    assert served.app.store_path == served.app.outputs / "jobs.sqlite3"


def test_end_stops_only_its_own_pages_job(served, image_file):
    first, second = Client(served.url, verbose=False), Client(served.url, verbose=False)
    with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
        running = first.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        assert gate.reached.wait(300)
        waiting = second.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        wait_for(lambda: len(queued_order(first)) == 1)
        second.predict(api_name="/end")
        _, _, said, _, _ = waiting.result(timeout=120)  # over at once: its job never started
        assert "cancelled" in said
        assert not gate.stop.is_set()  # the other page's job runs on
    _, _, progress, _, _ = running.result(timeout=300)
    assert "done: 37 frames" in progress


def test_the_queue_is_reordered_cancelled_and_retried_from_the_page(served, image_file):
    client = Client(served.url, verbose=False)
    with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
        client.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        assert gate.reached.wait(300)
        said = [client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/add_to_queue")
                for _ in range(3)]  # fmt: skip
        ids = queued_order(client)
        assert len(ids) == 3 and [f"queued job {job_id}" in line for line, job_id in zip(said, ids)] == [True] * 3
        assert client.predict(ids[2], 2, api_name="/move_job") == f"job {ids[2]} moved up"
        assert queued_order(client) == [ids[2], ids[0], ids[1]]
        assert client.predict(ids[2], -1, api_name="/move_job") == f"job {ids[2]} moved down"
        assert queued_order(client) == [ids[0], ids[2], ids[1]]
        assert client.predict(ids[0], api_name="/cancel_job") == f"job {ids[0]} cancelled"
        assert client.predict(ids[0], api_name="/cancel_job").startswith(f"error: job {ids[0]} is cancelled")
        assert client.predict(ids[1], api_name="/retry_job").startswith(f"error: job {ids[1]} is queued")
        assert client.predict(ids[0], api_name="/retry_job") == f"job {ids[0]} queued again"
        assert queued_order(client) == [ids[2], ids[1], ids[0]]
        assert client.predict(9999, api_name="/cancel_job").startswith("error: there is no job 9999")
    wait_for(lambda: all(jobs(client)[job_id]["state"] == "done" for job_id in ids))
    assert all(Path(jobs(client)[job_id]["video"]).is_file() for job_id in ids)


def test_the_page_shows_the_queue_and_the_history_as_thumbnails_with_a_line_each(served, image_file):
    client = Client(served.url, verbose=False)
    client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")  # one in the history
    with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
        client.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        assert gate.reached.wait(300)
        client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/add_to_queue")
        waiting, history = client.predict(api_name="/queue_view")  # the galleries (the states stay on the server)
    running, queued = [item["caption"] for item in waiting]
    assert " · running, starting · a cat walks" in running and " · queued (1 ahead) · a cat walks" in queued
    assert " · done · a cat walks" in history[0]["caption"]  # the newest first
    assert max(Image.open(waiting[0]["image"]).size) == 192  # the start image, made small
    wait_for(lambda: not [job for job in jobs(client).values() if job["state"] in ("queued", "running")])


def test_a_job_is_loaded_back_into_the_controls_to_run_again(served, image_file):
    client = Client(served.url, verbose=False)
    arguments = [*ARGUMENTS]
    arguments[0:3] = ["a dog runs", "blurry", 4242]
    client.predict(handle_file(str(image_file)), *arguments, api_name="/generate")
    (job_id,) = [job["id"] for job in client.predict(api_name="/jobs") if job["prompt"] == "a dog runs"]
    values = client.predict(job_id, api_name="/rerun_job")
    image, prompt, negative, seed, said = values[0], values[4], values[5], values[6], values[-1]
    assert (prompt, negative, seed) == ("a dog runs", "blurry", 4242)
    assert Path(image).read_bytes() == image_file.read_bytes() and f"settings loaded from job {job_id}" in said
    assert "error: there is no job 9999" in client.predict(9999, api_name="/rerun_job")[-1]


def test_the_queue_and_history_survive_a_restart_and_jobs_py_shares_them(tmp_path, image_file):
    outputs = tmp_path / "outputs"
    with served_app(outputs) as served:
        client = Client(served.url, verbose=False)
        client.predict(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
        with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
            client.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
            assert gate.reached.wait(300)
            added = subprocess.run(
                [sys.executable, "jobs.py", "--jobs-db", str(outputs / "jobs.sqlite3"), "add", "--preset", "tiny",
                 "--image", str(image_file), "--prompt", "from jobs.py", "--seconds", "1", "--steps", "2",
                 "--resolution", "128", "--outputs", str(outputs)],
                cwd=REPO, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert added.returncode == 0, added.stderr
            served.app.stop_all()  # as at Ctrl-C: the running job stops at its next step, the queued one waits
        wait_for(lambda: served.app.worker.join(0))
        before = {job["id"]: job["state"] for job in client.predict(api_name="/jobs")}
    assert sorted(before.values()) == ["done", "queued", "stopped"]
    with JobStore(outputs / "jobs.sqlite3") as store:
        left = store.add({"settings": {"prompt": "left running"}}, outputs)
        store.move(left, 1)
        assert store.claim(f"{socket.gethostname()}:999999999").id == left  # a worker of this machine, now gone
    with served_app(outputs) as served:
        client = Client(served.url, verbose=False)
        wait_for(lambda: not {"queued", "running"} & {job["state"] for job in client.predict(api_name="/jobs")})
        after = jobs(client)
    assert {job_id: after[job_id]["state"] for job_id in before} == {
        **before,
        **{job_id: "done" for job_id, state in before.items() if state == "queued"},
    }
    assert after[left]["state"] == "stopped"  # its worker was gone when the app started
    (made,) = [job for job in after.values() if job["prompt"] == "from jobs.py"]
    assert Path(made["video"]).is_file()


def test_a_page_follows_its_job_through_the_store_while_it_waits_and_after_it_is_cancelled(tmp_path):
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        live = LiveJobs()
        job_id, feed = live.add(lambda: store.add({"settings": {"prompt": "p"}}, tmp_path))
        rows = follow(feed, lambda: store.get(job_id), this_worker(), interval=0.01)
        assert next(rows).state is JobState.QUEUED
        store.cancel(job_id)
        assert [row.state for row in rows] == [JobState.CANCELLED]


def test_a_job_run_here_is_followed_through_its_events_and_ends_with_the_worker(tmp_path):
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        live = LiveJobs()
        job_id, feed = live.add(lambda: store.add({"settings": {"prompt": "p"}}, tmp_path))
        store.claim(this_worker())
        live.publish(job_id, "an event")
        live.publish(999, "nobody follows job 999")  # a job of jobs.py: dropped
        seen = follow(feed, lambda: store.get(job_id), this_worker(), interval=0.01)
        assert next(seen) == "an event"
        assert type(next(seen)).__name__ == "Tick"  # running here, nothing new: no store row to show
        live.over(job_id, JobState.DONE)
        assert list(seen) == []


def test_a_feed_opened_with_its_job_misses_nothing_a_fast_worker_publishes(tmp_path):
    """The worker may claim the job the moment it is in the store: its first event still reaches the page."""
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        live, claimed = LiveJobs(), threading.Event()

        def add() -> int:
            job_id = store.add({"settings": {}}, tmp_path)
            threading.Thread(target=lambda: (live.publish(job_id, "first"), claimed.set())).start()
            time.sleep(0.05)  # the worker's publish waits for the feed
            return job_id

        job_id, feed = live.add(add)
        assert claimed.wait(10) and feed.get(timeout=10) == "first"
        live.over(job_id, JobState.DONE)
        assert isinstance(feed.get(timeout=10), JobOver)
        with pytest.raises(queue.Empty):
            feed.get_nowait()


def test_uploads_are_kept_by_content_and_thumbnails_made_once(tmp_path, image_file):
    folder = tmp_path / "kept"
    copies = {kept_input(image_file, folder), kept_input(image_file, folder)}
    assert len(copies) == 1 and next(iter(copies)).read_bytes() == image_file.read_bytes()
    with JobStore(tmp_path / "jobs.sqlite3") as store:
        job = store.get(store.add({"settings": {"prompt": "x" * 60}, "input_image": str(image_file)}, tmp_path))
        gone = store.get(store.add({"settings": {}, "input_image": str(tmp_path / "gone.png")}, tmp_path))
    small = thumbnail(job, folder)
    assert max(Image.open(small).size) == 192 and thumbnail(job, folder) == small
    assert thumbnail(gone, folder).name == "thumb-none.png"
    assert caption(job, 2) == f"#{job.id} · queued (2 ahead) · {'x' * 39}…"


@pytest.mark.subprocess
def test_a_further_worker_process_runs_the_next_job_while_the_apps_own_is_busy(tmp_path, image_file):
    with served_app(tmp_path / "outputs") as served:
        client = Client(served.url, verbose=False)
        with JobGate(served.app, lambda event: isinstance(event, StepProgress)) as gate:
            held = client.submit(handle_file(str(image_file)), *ARGUMENTS, api_name="/generate")
            assert gate.reached.wait(300)
            served.app.start_workers(1, None, ["--preset", "tiny"])
            elsewhere = Client(served.url, verbose=False).submit(handle_file(str(image_file)), *ARGUMENTS,
                                                                  api_name="/generate")  # fmt: skip
            _, _, said, _, _ = elsewhere.result(timeout=300)  # done while the app's own job is held
            assert not gate.stop.is_set()
        _, _, progress, _, _ = held.result(timeout=300)
        with JobStore(served.app.store_path) as store:
            workers = {job.id: job.worker for job in store.jobs()}
    assert "done" in said and "done: 37 frames" in progress
    assert len(set(workers.values())) == 2 and this_worker() in workers.values()


def test_a_store_that_is_no_database_stops_the_app_with_one_line(tmp_path, capsys):
    import demo_gradio

    (tmp_path / "jobs.sqlite3").write_text("not a database, but a note")
    code = demo_gradio.main(["--preset", "tiny", "--outputs", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'jobs.sqlite3'} is not a jobs database (damaged, or another file); move it away"
