"""A directory of compiled engines by key, safe across processes and platforms; where it is and how large it may grow.

Each entry is `<key>.engine` (the engine file the compiler wrote) and `<key>.json` (what built it, its
size, when it was last used). The JSON is written last and removed first, so an entry without it does not exist.
Writes go through a temporary file and a rename. Each key has a lock (a `filelock.FileLock`, so Windows works too):
callers hold it around `lookup`, `store` and `remove`, while eviction, pruning and the clean-up in `prepare` take it
only if nobody holds it, so they never pull an entry from under a process that is building or loading it. A truncated
or unreadable entry counts as a miss, and the runtime's lookup removes it; reading the cache for a listing changes
nothing. An optional size cap, counted over every file in the directory, evicts the least recently used entries.
The directory is FRAMEPACK_TENSORRT_CACHE_DIR (default Cache/tensorrt_engines), the cap FRAMEPACK_TENSORRT_CACHE_GB.
"""

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from ..errors import first_line
from ..media.atomic_files import write_bytes
from ..settings import CACHE_DIR, InvalidSettings

logger = logging.getLogger(__name__)

CACHE_DIR_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_DIR"
CACHE_LIMIT_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_GB"

ENGINE_SUFFIX = ".engine"
KERNELS_SUFFIX = ".kernels"
EARLIER_SUFFIXES = (".pt2",)  # engine files of an earlier format, which no key reaches any more
STAGING_PREFIX = ".build-"  # a build stages its files in `.build-<key>-<random>/` here, holding the key's lock
ABANDONED_AFTER_SECONDS = 3600  # staging that names no key: untouched for an hour, its writer was killed


# The fields of an entry's record that readers rely on, and the types they must have.
RECORD_FIELDS = {"component": str, "bytes": int, "inputs": list, "gpu": str, "rejected": str, "weights": str,
                 "build_seconds": (int, float), "load_seconds": (int, float)}  # fmt: skip


def default_cache_dir() -> Path:
    """FRAMEPACK_TENSORRT_CACHE_DIR, else Cache/tensorrt_engines; InvalidSettings when the variable names a file."""
    chosen = os.environ.get(CACHE_DIR_VARIABLE)
    if not chosen:
        return CACHE_DIR / "tensorrt_engines"
    if os.path.exists(chosen) and not os.path.isdir(chosen):
        raise InvalidSettings(f"{CACHE_DIR_VARIABLE} must name a directory, got {chosen!r}, which is a file")
    return Path(chosen)


def default_cache_limit() -> int | None:
    """FRAMEPACK_TENSORRT_CACHE_GB in bytes, or None (no cap) when unset or empty; InvalidSettings names a value
    that is not a positive, finite number of GB."""
    value = os.environ.get(CACHE_LIMIT_VARIABLE)
    if not value:
        return None
    try:
        limit = float(value) * 1024**3
    except ValueError:
        limit = float("nan")
    if not 0 < limit < float("inf"):  # false for nan too
        raise InvalidSettings(f"{CACHE_LIMIT_VARIABLE} must be a positive number of GB, got {value!r}")
    return int(limit)


def _record_problem(record: object) -> str | None:
    """What makes a record unusable, if anything: not a JSON object, or a field of the wrong type."""
    if not isinstance(record, dict):
        return f"unreadable metadata (not a JSON object: {record!r:.40})"
    for name, kind in RECORD_FIELDS.items():
        value = record.get(name)
        if name in record and (not isinstance(value, kind) or isinstance(value, bool)):
            return f"unreadable metadata (its {name!r} is {value!r:.40})"
    inputs = record.get("inputs", [])
    if not all(isinstance(i, list) and len(i) == 2 and isinstance(i[0], list) for i in inputs):
        return f"unreadable metadata (its 'inputs' are {inputs!r:.40})"
    return None


def _last_modified(path: Path) -> float:
    """The newest modification time in a file or directory tree: a build writing into it keeps it fresh."""
    newest = path.lstat().st_mtime
    for root, directories, files in os.walk(path):
        for name in directories + files:
            newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


class EngineCache:
    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _engine(self, key: str) -> Path:
        return self.directory / f"{key}{ENGINE_SUFFIX}"

    def _metadata(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def kernels(self, key: str) -> Path:
        """Where the entry's TensorRT-RTX runtime cache lives (the kernels its engines compiled when set up): part of
        the entry, removed with it."""
        return self.directory / f"{key}{KERNELS_SUFFIX}"

    def prepare(self) -> None:
        """Create the directory, prove it takes files (OSError names the problem) and clear what killed processes
        left, which would otherwise fill the disk and count against the size cap for ever."""
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for path in list(self.directory.iterdir()):
            if not path.name.startswith(".") and path.suffix in EARLIER_SUFFIXES:
                self._remove_earlier_format(path)
        for path in list(self.directory.iterdir()):
            if path.name.startswith(STAGING_PREFIX) or (path.name.startswith(".") and path.suffix == ".tmp"):
                self._remove_if_abandoned(path)
            elif not path.name.startswith(".") and path.suffix in (ENGINE_SUFFIX, ".json") and path.is_file():
                self._remove_if_incomplete(path.stem)

    def staging_prefix(self, key: str) -> str:
        """The name a build of `key` stages under: a killed build's leftovers are then known by their free lock."""
        return f"{STAGING_PREFIX}{key}-"

    def _remove_if_abandoned(self, path: Path) -> None:
        """A build's staging whose key's lock nobody holds was left by a killed build: removed at once. Staging that
        names no key (a half-written file) is judged by its age: an hour."""
        key = path.name.removeprefix(STAGING_PREFIX).split("-")[0]
        if path.name.startswith(STAGING_PREFIX) and len(key) == 32:
            with self._lock_if_free(key) as held:
                if held:
                    logger.info("removing %s from the TensorRT engine cache: its build was interrupted", path)
                    shutil.rmtree(path, ignore_errors=True)
            return
        with contextlib.suppress(FileNotFoundError):  # its build finished, or another process cleared it first
            if _last_modified(path) > time.time() - ABANDONED_AFTER_SECONDS:
                return
            logger.info("removing %s from the TensorRT engine cache: untouched for an hour (interrupted build)", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _remove_earlier_format(self, path: Path) -> None:
        """An engine file this version does not write: its entry goes, and the engine is built again when needed."""
        with self._lock_if_free(path.stem) as held:
            if held:
                self.remove(path.stem, f"saved in an earlier format ({path.name})", logging.INFO)
                path.unlink(missing_ok=True)

    def _remove_if_incomplete(self, key: str) -> None:
        """An engine without metadata (killed before writing it) or metadata without its engine, unless a rejection
        record (which has none by design) or the key's lock is held (its entry is being written right now)."""
        if self._engine(key).exists() == self._metadata(key).exists():
            return
        with self._lock_if_free(key) as held:
            if not held:
                return
            metadata = self.metadata(key)
            engine = self._engine(key).exists()
            if engine and metadata is None:
                self.remove(key, "engine without metadata (interrupted build)", logging.INFO)
            elif not engine and metadata is not None and not metadata.get("rejected"):
                self.remove(key, "engine file missing")

    def lock(self, key: str) -> FileLock:
        """The key's lock, for a `with`: one process builds, the others wait and then find the entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return FileLock(self.directory / f"{key}.lock")

    @contextlib.contextmanager
    def _lock_if_free(self, key: str) -> Iterator[bool]:
        """Hold the key's lock if nobody else does, without waiting; yields whether it is held."""
        lock = self.lock(key)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def _read(self, key: str) -> tuple[dict | None, str | None]:
        """The entry's record, or what is wrong with it; (None, None) when there is none. Changes nothing."""
        try:
            record = json.loads(self._metadata(key).read_text())
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError) as error:
            return None, f"unreadable metadata ({first_line(error)})"
        problem = _record_problem(record)
        return (None, problem) if problem else (record, None)

    def metadata(self, key: str) -> dict | None:
        """The entry's record, or None; an unreadable one is removed (hold the key's lock)."""
        record, problem = self._read(key)
        if problem:
            self.remove(key, problem)
        return record

    def lookup(self, key: str) -> Path | None:
        """The engine file of a complete entry (marked as just used), or None; hold the key's lock. An entry that
        vanishes all the same (removed by a program that does not lock) is a miss."""
        metadata = self.metadata(key)
        if metadata is None or metadata.get("rejected"):
            return None
        path = self._engine(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            if self._metadata(key).exists():  # removal takes the metadata first: only the engine is lost
                self.remove(key, "engine file missing")
            return None
        if size != metadata.get("bytes"):
            self.remove(key, f"engine file is {size} bytes, expected {metadata.get('bytes')} (truncated or corrupt)")
            return None
        try:
            os.utime(self._metadata(key))
        except FileNotFoundError:
            return None
        return path

    def store(self, key: str, engine_file: Path, metadata: dict) -> Path:
        """Move a finished engine file into the cache (same filesystem: a rename), then write its metadata; hold the
        key's lock."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self._engine(key)
        size = engine_file.stat().st_size
        shutil.move(str(engine_file), str(target))
        record = {**metadata, "bytes": size, "stored_at": time.time()}
        write_bytes(self._metadata(key), json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        self.enforce_limit(keep=key)
        return target

    def annotate(self, key: str, fields: dict) -> None:
        """Add what was measured after the entry was stored (its speed) to its record; hold the key's lock. An entry
        removed meanwhile gets nothing."""
        metadata = self.metadata(key)
        if metadata is not None:
            record = {**metadata, **fields}
            write_bytes(self._metadata(key), json.dumps(record, indent=2, sort_keys=True, default=str).encode())

    def reject(self, key: str, reason: str, ingredients: dict | None = None) -> None:
        """Remember that this engine gives wrong results or cannot be built, so no process loads or builds it again
        until `engines.py prune --all` removes the record (the record first, so nobody finds the engine in between).
        `ingredients`: what the key was made of, for an engine that never had a record."""
        record = {**(ingredients or {}), **(self.metadata(key) or {}), "bytes": 0, "rejected": reason}
        write_bytes(self._metadata(key), json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        self._engine(key).unlink(missing_ok=True)
        self.kernels(key).unlink(missing_ok=True)

    def rejection(self, key: str) -> str | None:
        return (self.metadata(key) or {}).get("rejected")

    def _records(self) -> Iterator[Path]:
        """The metadata files of the directory (a directory with such a name is not one of ours)."""
        return (path for path in sorted(self.directory.glob("*.json")) if path.is_file())

    def rejections(self) -> list[dict]:
        """Every rejection record, with its `key`. Changes nothing."""
        found = []
        for path in self._records():
            record, _ = self._read(path.stem)
            if record is not None and record.get("rejected"):
                found.append({**record, "key": path.stem})
        return found

    def unreadable(self) -> list[tuple[str, str]]:
        """(key, what is wrong) of every entry whose record cannot be used. Changes nothing."""
        return [(path.stem, problem) for path in self._records() if (problem := self._read(path.stem)[1])]

    def remove(self, key: str, reason: str, level: int = logging.WARNING) -> None:
        """Remove an entry, metadata first: an interrupted removal leaves an orphan engine, which `prepare` clears."""
        logger.log(level, "removing TensorRT engine %s from the cache: %s", key, reason)
        self._metadata(key).unlink(missing_ok=True)
        self._engine(key).unlink(missing_ok=True)
        self.kernels(key).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, int, float]]:
        """(key, bytes, last used) of every complete entry, least recently used first."""
        found = []
        for metadata_file in self._records():
            with contextlib.suppress(FileNotFoundError):  # a rejection record, or an entry removed meanwhile
                engine_bytes = metadata_file.with_suffix(ENGINE_SUFFIX).stat().st_size
                found.append((metadata_file.stem, engine_bytes, metadata_file.stat().st_mtime))
        return sorted(found, key=lambda entry: entry[2])

    def describe(self) -> list[dict]:
        """Every complete entry with a usable record (its metadata, plus `key`, `bytes` and `last_used`), least
        recently used first: what `engines.py list` shows and `prune` chooses from. Changes nothing."""
        records = []
        for key, size, last_used in self.entries():
            metadata, _ = self._read(key)
            if metadata is not None:
                records.append({**metadata, "key": key, "bytes": size, "last_used": last_used})
        return records

    def prune(self, keys: list[str]) -> list[str]:
        """Remove these entries and their locks, each under its lock; an entry in use by another process (its lock
        held) stays. Returns the keys removed; OSError when the directory does not let them go."""
        removed = []
        for key in keys:
            with self._lock_if_free(key) as held:
                if held and (self._metadata(key).exists() or self._engine(key).exists()):
                    self.remove(key, "pruned", logging.INFO)
                    removed.append(key)
            if key in removed:
                self._remove_lock(key)
        return removed

    def prune_locks(self) -> int:
        """Remove the lock files of keys that have no entry (and that nobody holds); returns how many went."""
        removed = 0
        for path in sorted(self.directory.glob("*.lock")):
            key = path.stem
            if self._metadata(key).exists() or self._engine(key).exists():
                continue
            with self._lock_if_free(key) as held:
                if not held:
                    continue
            removed += self._remove_lock(key)
        return removed

    def _remove_lock(self, key: str) -> bool:
        """A lock file nobody holds; on Windows one that another process has open stays."""
        try:
            (self.directory / f"{key}.lock").unlink()
        except (FileNotFoundError, PermissionError):
            return False
        return True

    def size_bytes(self) -> int:
        """Every file under the directory, staging and leftovers included: what the cache takes on disk."""
        total = 0
        for root, _, files in os.walk(self.directory):
            for name in files:
                with contextlib.suppress(FileNotFoundError):  # removed while counting
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def enforce_limit(self, keep: str | None = None) -> None:
        """Evict the least recently used entries until the directory fits the cap. `keep` and entries whose lock
        someone holds (being built or loaded) stay; the next store tries again."""
        if self.max_bytes is None:
            return
        excess = self.size_bytes() - self.max_bytes
        for key, size, _ in self.entries():
            if excess <= 0:
                break
            if key == keep:
                continue
            with self._lock_if_free(key) as held:
                if held and self._metadata(key).exists():
                    reason = f"cache over its {self.max_bytes / 1024**3:.2f} GB limit (least recently used)"
                    self.remove(key, reason, logging.INFO)
                    excess -= size
