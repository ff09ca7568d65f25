"""A directory of compiled engines keyed by canonical JSON, safe across processes.

Each entry is `<key>.pt2` (the engine, serialized as a torch.export archive) and `<key>.json` (what built it, its
size, when it was last used). The JSON is written last, so an entry without it does not exist. Writes go through a temporary file and
a rename; a per-key lock file keeps two processes from building the same engine at once; a truncated or
unreadable entry is removed and counts as a miss; an optional size cap evicts the least recently used entries.
"""

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from ..media.atomic_files import write_bytes

logger = logging.getLogger(__name__)

ENGINE_SUFFIX = ".pt2"


def cache_key(ingredients: dict) -> str:
    """A stable name for everything that makes an engine what it is (sorted, compact JSON, hashed)."""
    canonical = json.dumps(ingredients, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class EngineCache:
    def __init__(self, directory: Path, max_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes

    def _engine(self, key: str) -> Path:
        return self.directory / f"{key}{ENGINE_SUFFIX}"

    def _metadata(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def prepare(self) -> None:
        """Create the directory and prove it takes files; OSError names the problem."""
        self.directory.mkdir(parents=True, exist_ok=True)
        probe = self.directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's lock: one process builds, the others wait and then find the entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / f"{key}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def metadata(self, key: str) -> dict | None:
        try:
            return json.loads(self._metadata(key).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            self.remove(key, f"unreadable metadata ({error})")
            return None

    def lookup(self, key: str) -> Path | None:
        """The engine file of a complete entry (marked as just used), or None."""
        metadata = self.metadata(key)
        if metadata is None or metadata.get("rejected"):
            return None
        path = self._engine(key)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            self.remove(key, "engine file missing")
            return None
        if size != metadata.get("bytes"):
            self.remove(key, f"engine file is {size} bytes, expected {metadata.get('bytes')} (truncated or corrupt)")
            return None
        os.utime(self._metadata(key))
        return path

    def store(self, key: str, engine_file: Path, metadata: dict) -> Path:
        """Move a finished engine file into the cache (same filesystem: a rename), then write its metadata."""
        self.directory.mkdir(parents=True, exist_ok=True)
        target = self._engine(key)
        size = engine_file.stat().st_size
        shutil.move(str(engine_file), str(target))
        record = {**metadata, "bytes": size, "stored_at": time.time()}
        write_bytes(self._metadata(key), json.dumps(record, indent=2, sort_keys=True, default=str).encode())
        self.enforce_limit(keep=key)
        return target

    def reject(self, key: str, reason: str) -> None:
        """Remember that this engine gives wrong results, so no process loads or rebuilds it."""
        metadata = self.metadata(key) or {}
        self._engine(key).unlink(missing_ok=True)
        write_bytes(self._metadata(key), json.dumps({**metadata, "bytes": 0, "rejected": reason}, indent=2).encode())

    def rejection(self, key: str) -> str | None:
        return (self.metadata(key) or {}).get("rejected")

    def remove(self, key: str, reason: str, level: int = logging.WARNING) -> None:
        logger.log(level, "removing TensorRT engine %s from the cache: %s", key, reason)
        self._engine(key).unlink(missing_ok=True)
        self._metadata(key).unlink(missing_ok=True)

    def entries(self) -> list[tuple[str, int, float]]:
        """(key, bytes, last used) of every complete entry, least recently used first."""
        found = []
        for metadata_file in self.directory.glob("*.json"):
            engine = metadata_file.with_suffix(ENGINE_SUFFIX)
            if engine.exists():
                found.append((metadata_file.stem, engine.stat().st_size, metadata_file.stat().st_mtime))
        return sorted(found, key=lambda entry: entry[2])

    def size_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries()) if self.directory.exists() else 0

    def enforce_limit(self, keep: str | None = None) -> None:
        if self.max_bytes is None:
            return
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        for key, size, _ in entries:
            if total <= self.max_bytes:
                break
            if key != keep:
                self.remove(
                    key, f"cache over its {self.max_bytes / 1024**3:.2f} GB limit (least recently used)", logging.INFO
                )
                total -= size
