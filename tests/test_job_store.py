"""The job store (SQLite): states and their changes, the queue's order, claims, recovery after a worker died, and a
store that cannot be used said in one line."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_helper.jobs import store as store_module
from diffusers_helper.jobs.store import JobRefused, JobState, JobStore, JobStoreError

REPO = Path(__file__).resolve().parent.parent


def settings(prompt: str) -> dict:
    return {"settings": {"prompt": prompt}, "input_image": None, "loras": [], "inputs": {}}


@pytest.fixture
def store(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite3")


def test_jobs_run_in_the_order_queued_and_end_in_one_state(store, tmp_path):
    first, second = store.add(settings("a"), tmp_path), store.add(settings("b"), tmp_path)
    job = store.claim("w")
    assert job.id == first and job.state is JobState.RUNNING and job.worker == "w"
    assert store.progress(first, 1, 2, tmp_path / "a.mp4")  # go on: nobody cancelled it
    store.finish(first, JobState.DONE, tmp_path / "a.mp4")
    done = store.get(first)
    assert done.state is JobState.DONE and done.sections_done == 1 and done.video == tmp_path / "a.mp4"
    assert store.claim("w").id == second and store.claim("w") is None
    store.finish(second, JobState.FAILED, error="out of memory")
    assert [(job.id, job.state) for job in store.jobs()] == [(second, JobState.FAILED), (first, JobState.DONE)]
    store.finish(second, JobState.DONE)  # only a running job ends: nothing changes
    assert store.get(second).state is JobState.FAILED and store.get(second).error == "out of memory"


def test_cancel_retry_and_move_change_only_what_they_may(store, tmp_path):
    ids = [store.add(settings(name), tmp_path) for name in "abcd"]
    assert store.cancel(ids[3]) is JobState.CANCELLED
    store.move(ids[2], 2)  # two places earlier
    assert [job.id for job in store.jobs() if job.state is JobState.QUEUED] == [ids[2], ids[0], ids[1]]
    store.move(ids[2], -1)
    assert [job.id for job in store.jobs() if job.state is JobState.QUEUED] == [ids[0], ids[2], ids[1]]
    running = store.claim("w")
    assert store.cancel(running.id) is JobState.RUNNING and store.get(running.id).cancel_requested
    assert not store.progress(running.id, 1, 2)  # its worker is told to stop
    store.finish(running.id, JobState.CANCELLED)
    with pytest.raises(JobRefused, match=f"^job {running.id} is cancelled: only a queued or running job can be"):
        store.cancel(running.id)
    with pytest.raises(JobRefused, match=f"^job {ids[2]} is queued: only a stopped, failed or cancelled job"):
        store.retry(ids[2])
    store.retry(ids[3])
    queued = [job.id for job in store.jobs() if job.state is JobState.QUEUED]
    assert queued == [ids[2], ids[1], ids[3]]  # the retried job at the end
    with pytest.raises(JobRefused, match="^there is no job 99 in"):
        store.retry(99)


def test_a_job_whose_worker_died_comes_back_stopped_and_a_live_workers_stays(store, tmp_path):
    dead, alive = store.add(settings("a"), tmp_path), store.add(settings("b"), tmp_path)
    store.claim("gone")
    store.claim("here")
    store.progress(dead, 1, 3, tmp_path / "so-far.mp4")
    assert store.recover(alive=lambda worker: worker == "here") == [dead]
    stopped = store.get(dead)
    assert stopped.state is JobState.STOPPED and stopped.video == tmp_path / "so-far.mp4"
    assert stopped.error == "its worker stopped while it ran" and store.get(alive).state is JobState.RUNNING
    store.retry(dead)
    assert store.get(dead).state is JobState.QUEUED


def test_the_store_survives_reopening_and_a_store_it_cannot_use_is_one_line(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).add(settings("kept"), tmp_path)
    assert [job.settings["settings"]["prompt"] for job in JobStore(path).jobs()] == ["kept"]
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is no database" * 100)
    with pytest.raises(JobStoreError, match=r"garbage.sqlite3 is not a jobs database \(damaged, or another file\)"):
        JobStore(garbage)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(JobStoreError, match=r"jobs.sqlite3 is locked by another process; try again$"):
        JobStore(path, timeout=0.1).add(settings("waits"), tmp_path)
    holder.execute("ROLLBACK")
    holder.execute("PRAGMA user_version=7")
    holder.close()
    with pytest.raises(JobStoreError, match=r"made by a newer version of this program \(schema 7, this one knows 1\)"):
        JobStore(path)


def test_an_older_store_is_migrated_when_it_opens(tmp_path, monkeypatch):
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).add(settings("from before"), tmp_path)
    later = (*store_module.MIGRATIONS, "ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    migrated = JobStore(path)
    assert [job.settings["settings"]["prompt"] for job in migrated.jobs()] == ["from before"]
    database = sqlite3.connect(path)
    assert database.execute("PRAGMA user_version").fetchone()[0] == 2
    assert database.execute("SELECT priority FROM jobs").fetchall() == [(0,)]


CLAIMS = """
import sys
from diffusers_helper.jobs.store import JobState, JobStore
store = JobStore(sys.argv[1])
while (job := store.claim(sys.argv[2])) is not None:
    store.finish(job.id, JobState.DONE)
    print(job.id, flush=True)
"""


@pytest.mark.subprocess
def test_two_workers_claim_each_job_exactly_once(store, tmp_path):
    ids = [store.add(settings(str(number)), tmp_path) for number in range(200)]
    workers = [subprocess.Popen([sys.executable, "-c", CLAIMS, str(store.path), name], cwd=REPO, text=True,
                                stdout=subprocess.PIPE) for name in ("one", "two")]  # fmt: skip
    claimed = [[int(line) for line in worker.communicate(timeout=300)[0].split()] for worker in workers]
    assert sorted(claimed[0] + claimed[1]) == ids
    assert all(job.state is JobState.DONE for job in store.jobs())
