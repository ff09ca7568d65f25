"""The job store: every queued, running and finished job in one SQLite database, so nothing waiting is lost when a
process stops, crashes or the machine restarts.

The standard library's sqlite3 in WAL mode: readers never wait for the one writer, and every change is one
transaction, so a process killed at any moment leaves each job in exactly one state. A job is claimed by one
`UPDATE` of the next queued job inside an immediate (write-locked) transaction, so two workers never run the same
job. A job whose worker died while it ran comes back as `stopped` (`recover`), its video so far kept, to be retried
or cancelled. The schema's version is SQLite's `user_version`; `MIGRATIONS` brings an older store up to date when
it opens, and a store from a newer version of this product is refused rather than misread.
"""

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import psutil

from ..errors import describe_error
from ..settings import InvalidSettings


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    STOPPED = "stopped"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (JobState.DONE, JobState.STOPPED, JobState.FAILED, JobState.CANCELLED)
RETRYABLE = (JobState.STOPPED, JobState.FAILED, JobState.CANCELLED)

MIGRATIONS = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        position REAL NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'stopped', 'failed', 'cancelled')),
        settings TEXT NOT NULL,
        outputs TEXT NOT NULL,
        video TEXT,
        sections_done INTEGER NOT NULL DEFAULT 0,
        sections_total INTEGER,
        error TEXT,
        worker TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_by_state ON jobs (state, position);
    """,
)


class JobStoreError(RuntimeError):
    """The store cannot be used (not a database, locked, from a newer version), said in one line."""


class JobRefused(InvalidSettings):
    """A change the job's state does not allow, or a job that is not there, said in one line."""


@dataclass(frozen=True)
class Job:
    id: int
    state: JobState
    settings: dict  # a sidecar's "settings" form, with its input files' paths
    outputs: Path
    position: float
    video: Path | None
    sections_done: int
    sections_total: int | None
    error: str | None
    worker: str | None
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"], state=JobState(row["state"]), settings=json.loads(row["settings"]),
            outputs=Path(row["outputs"]), position=row["position"],
            video=Path(row["video"]) if row["video"] else None, sections_done=row["sections_done"],
            sections_total=row["sections_total"], error=row["error"], worker=row["worker"],
            cancel_requested=bool(row["cancel_requested"]), created_at=row["created_at"],
            started_at=row["started_at"], finished_at=row["finished_at"],
        )  # fmt: skip


def this_worker() -> str:
    """Who runs a job: this machine and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_alive(worker: str) -> bool:
    """Whether a worker of this machine still runs (one of another machine is taken to: it is not ours to stop)."""
    host, _, pid = worker.rpartition(":")
    return host != socket.gethostname() or (pid.isdigit() and psutil.pid_exists(int(pid)))


class JobStore:
    """One connection to the store; open one per thread or process."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (sqlite3.Error, OSError) as error:
            raise self._error(error) from error

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _error(self, error: BaseException) -> JobStoreError:
        text = str(error).lower()
        if "locked" in text or "busy" in text:
            return JobStoreError(f"the jobs database {self.path} is locked by another process; try again")
        if "not a database" in text or "malformed" in text:
            return JobStoreError(f"{self.path} is not a jobs database (damaged, or another file); move it away")
        return JobStoreError(f"the jobs database {self.path} cannot be used: {describe_error(error)}")

    def _migrate(self) -> None:
        if self._db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
            return  # up to date: no write lock taken by every reader that opens the store
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise JobStoreError(f"the jobs database {self.path} was made by a newer version of this program "
                                    f"(schema {version}, this one knows {len(MIGRATIONS)})")  # fmt: skip
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={len(MIGRATIONS)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the write lock at once (no two writers interleave their reads)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise self._error(error) from error
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        try:
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            raise self._error(error) from error

    def _read(self, query: str, parameters: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(query, parameters).fetchall()
        except sqlite3.Error as error:
            raise self._error(error) from error

    # -- adding and reading ------------------------------------------------------------------------------------

    def add(self, settings: dict, outputs: Path) -> int:
        """Queue a job at the end; its id."""
        now = time.time()
        with self._transaction() as db:
            last = db.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()[0]
            cursor = db.execute(
                "INSERT INTO jobs (position, state, settings, outputs, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
                (last + 1, JobState.QUEUED.value, json.dumps(settings, default=str), str(outputs), now, now),
            )
            return int(cursor.lastrowid)

    def get(self, job_id: int) -> Job:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise JobRefused(f"there is no job {job_id} in {self.path}")
        return Job.from_row(rows[0])

    def jobs(self) -> list[Job]:
        """Every job: the queue in order (running first), then the finished ones, newest first."""
        rows = self._read(
            "SELECT * FROM jobs ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'queued' THEN 1 ELSE 2 END, "
            "CASE WHEN state IN ('running', 'queued') THEN position ELSE -COALESCE(finished_at, updated_at) END"
        )
        return [Job.from_row(row) for row in rows]

    def ahead(self, job_id: int) -> int:
        """How many jobs run or wait before a queued one."""
        job = self.get(job_id)
        rows = self._read("SELECT COUNT(*) FROM jobs WHERE state = 'running' OR (state = 'queued' AND position < ?)",
                          (job.position,))  # fmt: skip
        return int(rows[0][0])

    # -- a worker's part -----------------------------------------------------------------------------------------

    def claim(self, worker: str) -> Job | None:
        """The next queued job, now running for `worker`; None when the queue is empty."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY position LIMIT 1"
            ).fetchone()  # fmt: skip
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', worker = ?, started_at = ?, updated_at = ?, sections_done = 0, "
                "error = NULL WHERE id = ?",
                (worker, now, now, row["id"]),
            )
        return self.get(row["id"])

    def progress(self, job_id: int, sections_done: int, sections_total: int, video: Path | None = None) -> bool:
        """A running job's progress (and its video so far); whether it should go on (False once cancelled)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET sections_done = ?, sections_total = ?, video = COALESCE(?, video), updated_at = ? "
                "WHERE id = ? AND state = 'running'",
                (sections_done, sections_total, None if video is None else str(video), time.time(), job_id),
            )
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is not None and not row["cancel_requested"]

    def finish(self, job_id: int, state: JobState, video: Path | None = None, error: str | None = None) -> None:
        """A running job ends: done, stopped (its video so far kept), failed (with its one-line error), or
        cancelled (it was asked to stop)."""
        if state not in FINISHED:
            raise ValueError(f"a job finishes as one of {', '.join(s.value for s in FINISHED)}, not {state.value}")
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, video = COALESCE(?, video), error = ?, finished_at = ?, updated_at = ?, "
                "cancel_requested = 0 WHERE id = ? AND state = 'running'",
                (state.value, None if video is None else str(video), error, now, now, job_id),
            )

    def recover(self, alive: Callable[[str], bool] = worker_alive) -> list[int]:
        """Jobs left running by a worker that is gone come back as stopped; their ids."""
        now = time.time()
        with self._transaction() as db:
            rows = db.execute("SELECT id, worker FROM jobs WHERE state = 'running'").fetchall()
            gone = [row["id"] for row in rows if not row["worker"] or not alive(row["worker"])]
            for job_id in gone:
                db.execute(
                    "UPDATE jobs SET state = 'stopped', error = 'its worker stopped while it ran', finished_at = ?, "
                    "updated_at = ? WHERE id = ?",
                    (now, now, job_id),
                )
        return gone

    # -- a user's part -------------------------------------------------------------------------------------------

    def cancel(self, job_id: int) -> JobState:
        """A queued job is cancelled at once; a running one is asked to stop (its worker ends it as cancelled).
        Returns the job's state after the call."""
        with self._transaction() as db:
            job = self._locked_get(db, job_id)
            if job.state is JobState.QUEUED:
                now = time.time()
                db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ? WHERE id = ?",
                           (now, now, job_id))  # fmt: skip
                return JobState.CANCELLED
            if job.state is JobState.RUNNING:
                db.execute("UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (time.time(), job_id))
                return JobState.RUNNING
            raise JobRefused(f"job {job_id} is {job.state.value}: only a queued or running job can be cancelled")

    def retry(self, job_id: int) -> None:
        """A stopped, failed or cancelled job goes back to the end of the queue."""
        with self._transaction() as db:
            job = self._locked_get(db, job_id)
            if job.state not in RETRYABLE:
                raise JobRefused(f"job {job_id} is {job.state.value}: only a stopped, failed or cancelled job can "
                                    "be retried")  # fmt: skip
            last = db.execute("SELECT COALESCE(MAX(position), 0) FROM jobs").fetchone()[0]
            db.execute(
                "UPDATE jobs SET state = 'queued', position = ?, error = NULL, worker = NULL, sections_done = 0, "
                "started_at = NULL, finished_at = NULL, updated_at = ? WHERE id = ?",
                (last + 1, time.time(), job_id),
            )

    def move(self, job_id: int, steps: int) -> None:
        """A queued job `steps` places earlier (negative: later) in the queue."""
        with self._transaction() as db:
            job = self._locked_get(db, job_id)
            if job.state is not JobState.QUEUED:
                raise JobRefused(f"job {job_id} is {job.state.value}: only a queued job can be moved")
            queue = [row["id"] for row in db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position")]
            index = queue.index(job_id)
            queue.pop(index)
            queue.insert(max(0, min(len(queue), index - steps)), job_id)
            first = db.execute("SELECT COALESCE(MIN(position), 1) FROM jobs WHERE state = 'queued'").fetchone()[0]
            for position, queued in enumerate(queue, start=int(first)):
                db.execute("UPDATE jobs SET position = ? WHERE id = ?", (float(position), queued))

    def _locked_get(self, db: sqlite3.Connection, job_id: int) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobRefused(f"there is no job {job_id} in {self.path}")
        return Job.from_row(row)
