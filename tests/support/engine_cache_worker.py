"""Hammer one engine cache from a separate process, as the runtime does (for the concurrency test).

    python -m tests.support.engine_cache_worker CACHE_DIR MAX_BYTES SEED OPERATIONS BARRIER_DIR WORKERS

Each operation takes a random key's lock, looks it up, checks a hit's bytes and stores the entry on a miss (staged
in a `.build-*` directory like the runtime's builds); between them it reads the listing and the size unlocked, as
`--tensorrt-info` does. Once every worker is done it enforces the limit once more, so the cache settles. Any
exception ends the process with a traceback and a nonzero exit status.
"""

import random
import sys
import tempfile
import time
from pathlib import Path

from diffusers_helper.acceleration.engine_cache import EngineCache

KEYS = [f"key{index:02d}" for index in range(12)]
ENTRY_BYTES = 1000


def engine_bytes(key: str) -> bytes:
    return (key.encode() * ENTRY_BYTES)[:ENTRY_BYTES]


def wait_for_all(barrier: Path, workers: int) -> None:
    deadline = time.monotonic() + 60
    while len(list(barrier.iterdir())) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError("the other workers never finished")
        time.sleep(0.01)


def hammer(cache: EngineCache, rng: random.Random, operations: int) -> None:
    for _ in range(operations):
        key = rng.choice(KEYS)
        with cache.lock(key):
            path = cache.lookup(key)
            if path is not None:
                assert path.read_bytes() == engine_bytes(key), f"{key} holds another engine's bytes"
            else:
                with tempfile.TemporaryDirectory(dir=cache.directory, prefix=".build-") as staging:
                    built = Path(staging) / "engine.engine"
                    built.write_bytes(engine_bytes(key))
                    cache.store(key, built, {"key": key})
        cache.entries()
        cache.size_bytes()


def main() -> None:
    directory, max_bytes, seed, operations, barrier, workers = sys.argv[1:7]
    cache = EngineCache(Path(directory), int(max_bytes))
    try:
        cache.prepare()
        hammer(cache, random.Random(int(seed)), int(operations))
    finally:  # a worker that failed is done too: the others need not wait for it
        (Path(barrier) / seed).touch()
    wait_for_all(Path(barrier), int(workers))
    cache.enforce_limit()


if __name__ == "__main__":
    main()
