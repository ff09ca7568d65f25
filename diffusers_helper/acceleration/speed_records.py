"""Speeds measured once and remembered: every choice made by measurement, in one file beside the engine cache.

Two choices are made by timing one way of running against another on this GPU: torch.compile against eager for each
block class and latent shape (compiled_blocks), and a TensorRT engine against how PyTorch runs that component
(speed_policy). Both keep what they measured here, so a later process chooses without measuring again, and without
compiling or loading what lost. A record is keyed by a JSON object naming the candidate, what it was timed against
(`versus`) and everything the speed depends on (GPU, versions, shapes); the last record of a key wins.

The file is JSON lines, appended under a file lock so processes sharing the directory never interleave their lines;
a line that does not parse (a write cut short) is skipped.
"""

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from ..media.atomic_files import write_bytes

SPEED_RECORDS_FILE = "measured_speeds.jsonl"  # not `.json`: that suffix is an engine entry's


@dataclass(frozen=True)
class SpeedRecord:
    """One candidate timed against its baseline on the same inputs (medians, in seconds)."""

    baseline_seconds: float
    candidate_seconds: float
    relative_error: float | None = None  # the candidate's output against the baseline's, where it was checked

    @property
    def speedup(self) -> float:
        return self.baseline_seconds / self.candidate_seconds


def _canonical(key: dict) -> dict:
    """The key as JSON holds it (tuples become lists), so a key compares equal to the one read back."""
    return json.loads(json.dumps(key, sort_keys=True, default=str))


class SpeedRecords:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def _records(self) -> Iterator[tuple[dict, SpeedRecord]]:
        for line in self._lines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short, or not ours
                entry = json.loads(line)
                record = SpeedRecord(
                    float(entry["baseline_s"]), float(entry["candidate_s"]), entry.get("relative_error")
                )
                if isinstance(entry["key"], dict) and record.candidate_seconds > 0:
                    yield entry["key"], record

    def lookup(self, key: dict) -> SpeedRecord | None:
        """The latest record of exactly this key, or None."""
        wanted, found = _canonical(key), None
        for stored, record in self._records():
            if stored == wanted:
                found = record
        return found

    def matching(self, partial: dict) -> list[tuple[dict, SpeedRecord]]:
        """Every record whose key holds all of `partial`'s items, oldest first."""
        wanted = _canonical(partial)
        return [(key, record) for key, record in self._records() if all(key.get(k) == v for k, v in wanted.items())]

    def remember(self, key: dict, record: SpeedRecord) -> None:
        """Append a record; OSError when the directory does not take it."""
        line = json.dumps({"key": _canonical(key), "baseline_s": record.baseline_seconds,
                           "candidate_s": record.candidate_seconds, "relative_error": record.relative_error,
                           "speedup": round(record.speedup, 3), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")},
                          sort_keys=True)  # fmt: skip
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(), open(self.path, "a") as file:
            file.write(line + "\n")

    def forget(self, partial: dict) -> int:
        """Remove every record whose key holds all of `partial`'s items; returns how many went."""
        wanted = _canonical(partial)
        with self._lock():
            kept, removed = [], 0
            for line in self._lines():
                try:
                    key = json.loads(line)["key"]
                    matches = all(key.get(k) == v for k, v in wanted.items())
                except (ValueError, KeyError, TypeError, AttributeError):
                    matches = False
                removed += matches
                if not matches:
                    kept.append(line)
            if removed:
                write_bytes(self.path, "".join(f"{line}\n" for line in kept).encode())
        return removed

    def _lock(self) -> FileLock:
        return FileLock(self.path.with_name(self.path.name + ".lock"))
