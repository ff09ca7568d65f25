"""`jobs.py`: jobs queued from generate.py's flags or a JSONL file, listed, run by one worker or two, and the queue
after a worker was killed mid-job (kill -9): every job in exactly one state, none run twice, no video lost."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import jobs
from diffusers_helper.jobs.store import JobState, JobStore

REPO = Path(__file__).resolve().parent.parent
JOB = ["--preset", "tiny", "--prompt", "a cat walks", "--seconds", "1", "--steps", "2"]
# 7 sections of 8 steps: seconds of sampling after its first section, for a kill or a Ctrl-C to land in
LONG_JOB = ["--preset", "tiny", "--prompt", "a long one", "--seconds", "8", "--steps", "8"]


def jobs_cli(store: Path, *arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs.py", "--jobs-db", str(store), *arguments], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_add_queues_a_job_from_generates_flags_and_refuses_bad_input_in_one_line(tmp_path, image_file, capsys):
    store = tmp_path / "jobs.sqlite3"
    base = ["--jobs-db", str(store), "add", *JOB, "--outputs", str(tmp_path / "out")]
    assert jobs.main([*base, "--image", str(image_file), "--count", "2", "--seed", "5"]) == 0
    assert capsys.readouterr().out == "queued jobs 1-2\n"
    queued = JobStore(store).jobs()
    assert [job.settings["settings"]["seed"] for job in queued] == [5, 6]
    assert queued[0].settings["input_image"] == str(image_file.resolve())
    assert queued[0].settings["inputs"][str(image_file.resolve())]  # its SHA-256, checked when its turn comes
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert jobs.main([*base, "--image", str(broken)]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and len(JobStore(store).jobs()) == 2
    assert jobs.main(["--jobs-db", str(store), "add", *JOB, "--image", str(image_file), "--steps", "0"]) == 2
    assert "steps" in capsys.readouterr().err and len(JobStore(store).jobs()) == 2


def test_a_jsonl_file_is_queued_whole_or_not_at_all_and_export_imports_back(tmp_path, image_file, capsys):
    store = tmp_path / "jobs.sqlite3"
    line = {"settings": {"prompt": "a dog runs", "seconds": 1.0, "steps": 2, "resolution": 128},
            "input_image": str(image_file), "loras": []}  # fmt: skip
    good = tmp_path / "jobs.jsonl"
    good.write_text(json.dumps(line) + "\n\n" + json.dumps({**line, "settings": {"prompt": "a bird"}}) + "\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(line) + "\n" + json.dumps({**line, "settings": {"prompt": "x", "steps": -1}}) + "\n")
    assert jobs.main(["--jobs-db", str(store), "add", "--file", str(bad)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {bad}, line 2: ") and error.count("\n") == 1
    assert not store.exists()  # refused before the store was made
    assert jobs.main(["--jobs-db", str(store), "add", "--file", str(good)]) == 0
    exported = tmp_path / "exported.jsonl"
    assert jobs.main(["--jobs-db", str(store), "export", str(exported)]) == 0
    other = tmp_path / "other.sqlite3"
    assert jobs.main(["--jobs-db", str(other), "import", str(exported)]) == 0
    assert [job.settings["settings"] for job in JobStore(other).jobs()] == [
        job.settings["settings"] for job in JobStore(store).jobs()
    ]
    assert jobs.main(["--jobs-db", str(other), "move", "2", "1"]) == 0  # one place earlier: first
    assert [job.id for job in JobStore(other).jobs()] == [2, 1]
    assert jobs.main(["--jobs-db", str(other), "cancel", "2"]) == 0
    capsys.readouterr()
    assert jobs.main(["--jobs-db", str(other), "move", "2", "1"]) == 2
    assert capsys.readouterr().err == "error: job 2 is cancelled: only a queued job can be moved\n"
    assert jobs.main(["--jobs-db", str(tmp_path), "list"]) == 1  # a directory is no database
    assert capsys.readouterr().err.startswith("error: the jobs database")


@pytest.mark.subprocess
def test_run_works_through_the_queue_and_a_changed_input_fails_only_its_job(tmp_path, image_file):
    store = tmp_path / "jobs.sqlite3"
    changing = tmp_path / "changing.png"
    changing.write_bytes(image_file.read_bytes())
    for image in (image_file, changing, image_file):
        assert jobs_cli(store, "add", *JOB, "--image", str(image), "--outputs", str(tmp_path / "out")).returncode == 0
    changing.write_bytes(changing.read_bytes() + b"\0")  # a byte more: another file than the one queued
    run = jobs_cli(store, "run", "--preset", "tiny")
    assert run.returncode == 1, run.stderr[-2000:]
    first, second, third = sorted(JobStore(store).jobs(), key=lambda job: job.id)
    assert (first.state, second.state, third.state) == (JobState.DONE, JobState.FAILED, JobState.DONE)
    assert second.error == f"{changing.resolve()} changed since the job was queued"
    assert first.video.is_file() and third.video.is_file() and first.video != third.video
    listed = jobs_cli(store, "list").stdout
    assert "failed" in listed and listed.count("done") == 2


@pytest.mark.subprocess
def test_a_worker_killed_mid_job_leaves_every_job_in_one_state_and_the_next_run_finishes_the_rest(tmp_path, image_file):
    store = tmp_path / "jobs.sqlite3"
    jobs_cli(store, "add", *LONG_JOB, "--image", str(image_file), "--outputs", str(tmp_path / "out"))
    jobs_cli(store, "add", *JOB, "--image", str(image_file), "--outputs", str(tmp_path / "out"))
    worker = subprocess.Popen([sys.executable, "jobs.py", "--jobs-db", str(store), "run", "--preset", "tiny"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while JobStore(store).get(1).sections_done < 1:  # killed after its first section: a video so far
            assert worker.poll() is None, "the worker ended before the job had a section"
            time.sleep(0.2)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    killed = JobStore(store).get(1)
    assert killed.state is JobState.RUNNING and killed.video.is_file()  # as the kill left it
    kept = killed.video.read_bytes()
    again = jobs_cli(store, "run", "--preset", "tiny")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "job 1 was running when its worker stopped: now stopped" in again.stdout
    first, second = JobStore(store).get(1), JobStore(store).get(2)
    assert first.state is JobState.STOPPED and first.video.read_bytes() == kept  # not run again, video kept
    assert second.state is JobState.DONE and second.video.is_file() and second.video != first.video


@pytest.mark.subprocess
def test_run_with_two_workers_runs_twenty_jobs_each_exactly_once(tmp_path, image_file):
    store = tmp_path / "jobs.sqlite3"
    lines = [json.dumps({"settings": {"prompt": f"job {n}", "seconds": 0.5, "steps": 1, "resolution": 128,
                                      "seed": n}, "input_image": str(image_file), "loras": [],
                         "outputs": str(tmp_path / "out")}) for n in range(20)]  # fmt: skip
    (tmp_path / "twenty.jsonl").write_text("\n".join(lines) + "\n")
    assert jobs_cli(store, "add", "--file", str(tmp_path / "twenty.jsonl")).returncode == 0
    run = jobs_cli(store, "run", "--workers", "2", "--preset", "tiny", timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    ran = [int(line.split()[1]) for line in run.stdout.splitlines() if line.endswith(".mp4")]
    assert sorted(ran) == list(range(1, 21))  # each job once, by one worker or the other
    workers = {job.worker for job in JobStore(store).jobs()}
    assert len(workers) <= 2 and all(worker.split(":")[-1].isdigit() for worker in workers)
    finished = JobStore(store).jobs()
    assert all(job.state is JobState.DONE for job in finished) and len({job.video for job in finished}) == 20


@pytest.mark.subprocess
def test_ctrl_c_stops_the_running_job_keeping_its_video_and_leaves_the_rest_queued(tmp_path, image_file):
    store = tmp_path / "jobs.sqlite3"
    for _ in range(2):
        jobs_cli(store, "add", *LONG_JOB, "--image", str(image_file), "--outputs", str(tmp_path / "out"))
    worker = subprocess.Popen([sys.executable, "jobs.py", "--jobs-db", str(store), "run", "--preset", "tiny"],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while JobStore(store).get(1).sections_done < 1:
        assert worker.poll() is None, "the worker ended before the job had a section"
        time.sleep(0.2)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(timeout=300) == 130
    first, second = JobStore(store).get(1), JobStore(store).get(2)
    assert first.state is JobState.STOPPED and first.video.is_file() and second.state is JobState.QUEUED


def test_add_from_an_earlier_jobs_json_takes_its_settings_and_the_flags_given(tmp_path, image_file, capsys):
    (tmp_path / "earlier.input.png").write_bytes(image_file.read_bytes())
    record = {"settings": {"prompt": "as before", "seconds": 1.0, "steps": 3, "seed": 4, "resolution": 128},
              "input_image": "earlier.input.png", "loras": []}  # fmt: skip
    (tmp_path / "earlier.json").write_text(json.dumps(record))
    store = tmp_path / "jobs.sqlite3"
    assert jobs.main(["--jobs-db", str(store), "add", "--from", str(tmp_path / "earlier.json"), "--seed", "9"]) == 0
    [job] = JobStore(store).jobs()
    assert (job.settings["settings"]["prompt"], job.settings["settings"]["seed"]) == ("as before", 9)
    assert job.settings["input_image"] == str((tmp_path / "earlier.input.png").resolve())


def test_bad_workers_or_devices_are_one_line(tmp_path, capsys):
    store = ["--jobs-db", str(tmp_path / "jobs.sqlite3")]
    with pytest.raises(SystemExit) as exit_code:
        jobs.main([*store, "run", "--devices", "0,x"])
    assert exit_code.value.code == 2
    assert (
        capsys.readouterr().err == "error: argument --devices: GPU numbers separated by commas, e.g. 0,1; got '0,x'\n"
    )
    assert jobs.main([*store, "run", "--workers", "0"]) == 2
    assert capsys.readouterr().err == "error: --workers must be 1 or more, got 0\n"


@pytest.mark.subprocess
@pytest.mark.parametrize("moment", ["mp4", "store"])
def test_a_worker_killed_during_the_mp4_write_or_a_store_write_loses_nothing(tmp_path, image_file, moment):
    """Killed halfway through a section's MP4 (the published video is the section before, whole) or inside a store
    transaction (rolled back, the database intact): the next run marks the job stopped with that video, runs the
    rest once, and writes over nothing."""
    import av

    store = tmp_path / "jobs.sqlite3"
    jobs_cli(store, "add", *LONG_JOB, "--image", str(image_file), "--outputs", str(tmp_path / "out"))
    jobs_cli(store, "add", *JOB, "--image", str(image_file), "--outputs", str(tmp_path / "out"))
    marker = tmp_path / "holding"
    worker = subprocess.Popen([sys.executable, "-m", "tests.support.queue_worker", str(store), str(marker), moment],
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while not marker.exists():
            assert worker.poll() is None, "the worker ended before it held still"
            time.sleep(0.2)
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
    assert sqlite3.connect(store).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    killed = JobStore(store).get(1)
    assert killed.state is JobState.RUNNING and killed.sections_done == 1  # the uncommitted progress is gone
    video = killed.video
    recorded = json.loads(video.with_suffix(".json").read_text())
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == recorded["frames"]  # whole and playable
    kept = video.read_bytes()
    again = jobs_cli(store, "run", "--preset", "tiny")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("job 2:") == 1 and "job 1:" not in again.stdout  # none ran twice
    first, second = JobStore(store).get(1), JobStore(store).get(2)
    assert first.state is JobState.STOPPED and first.video == video and video.read_bytes() == kept
    assert second.state is JobState.DONE and second.video != video
