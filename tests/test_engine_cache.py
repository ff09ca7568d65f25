"""The on-disk engine cache on its own: what it needs, broken entries, leftovers of killed builds, the size cap,
several processes at once, and the environment variables that place and cap it."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusers_helper.acceleration.engine_cache import (
    CACHE_DIR_VARIABLE,
    CACHE_LIMIT_VARIABLE,
    EngineCache,
    default_cache_dir,
    default_cache_limit,
)
from diffusers_helper.acceleration.engine_keys import cache_key
from diffusers_helper.settings import InvalidSettings
from diffusers_helper.tensorrt_runtime import TensorRTRuntime
from tests.support.engine_cache_worker import ENTRY_BYTES, engine_bytes
from tests.support.tensorrt_double import FakeBackend
from tests.support.tensorrt_worker import seeded_mlp

REPO = Path(__file__).resolve().parent.parent
POSIX_ONLY = ("fcntl", "termios", "pwd", "grp", "resource")


def store(cache: EngineCache, key: str, size: int = 1000) -> None:
    source = cache.directory.parent / f"{key}.bin"
    source.write_bytes(b"x" * size)
    cache.store(key, source, {"key": key})


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.suffix != ".lock")


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


# -- portability ---------------------------------------------------------------------------------------------------


@pytest.mark.subprocess
def test_the_cache_works_without_posix_only_modules(tmp_path):
    """Windows has no fcntl (nor termios, pwd, ...): the cache must import and lock without them."""
    script = (
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({POSIX_ONLY!r}))\n"
        "from pathlib import Path\n"
        "from diffusers_helper.acceleration.engine_cache import EngineCache\n"
        "cache = EngineCache(Path(sys.argv[1]))\n"
        "cache.prepare()\n"
        "source = Path(sys.argv[2])\n"
        "source.write_bytes(b'x' * 10)\n"
        "with cache.lock('k'):\n"
        "    cache.store('k', source, {})\n"
        "    assert cache.lookup('k') is not None\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path / "engines"), str(tmp_path / "engine.bin")]
    result = subprocess.run(command, check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# -- broken entries ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[1, 2]", '"x"', "3", "null"])
def test_metadata_that_is_not_a_json_object_is_unreadable(tmp_path, caplog, text):
    cache = EngineCache(tmp_path / "engines")
    store(cache, "k")
    (cache.directory / "k.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("k") is None
    assert "unreadable metadata" in caplog.text
    assert names(cache.directory) == []
    assert cache.rejection("k") is None


def test_a_runtime_rebuilds_over_metadata_that_is_not_a_json_object(tmp_path):
    """Such metadata used to raise on every later run, so the component stayed in PyTorch in every process."""
    first = TensorRTRuntime(EngineCache(tmp_path), FakeBackend())
    first.register("vae_decoder")
    first.run("vae_decoder", seeded_mlp(), (torch.ones(2, 8),))
    next(tmp_path.glob("*.json")).write_text("[1, 2]")
    backend = FakeBackend()
    runtime = TensorRTRuntime(EngineCache(tmp_path), backend)
    runtime.register("vae_decoder")
    runtime.run("vae_decoder", seeded_mlp(), (torch.ones(2, 8),))
    assert backend.compiled == 1 and runtime.status["vae_decoder"].engine == "tensorrt"


@pytest.mark.parametrize("removed", [(".json",), (".json", ".engine")])
def test_an_entry_removed_during_lookup_is_a_plain_miss(tmp_path, caplog, removed):
    """Another process removes the entry (metadata first) right after this one has read its metadata."""

    class RemovedAfterReading(EngineCache):
        def metadata(self, key: str) -> dict | None:
            record = super().metadata(key)
            for suffix in removed:
                (self.directory / f"{key}{suffix}").unlink()
            return record

    cache = RemovedAfterReading(tmp_path / "engines")
    store(cache, "k")
    with caplog.at_level(logging.WARNING):
        assert cache.lookup("k") is None
    assert caplog.records == []


def test_an_entrys_kernel_cache_goes_with_it(tmp_path):
    """TensorRT-RTX's compiled kernels of an engine live beside it and leave with it: pruned, removed or rejected."""
    cache = EngineCache(tmp_path / "engines")
    for key in ("pruned", "removed", "rejected"):
        store(cache, key)
        cache.kernels(key).write_bytes(b"kernels")
    assert cache.prune(["pruned"]) == ["pruned"]
    cache.remove("removed", "engine file will not load")
    cache.reject("rejected", "its output differs from PyTorch")
    assert not list(cache.directory.glob("*.kernels"))


# -- the size cap --------------------------------------------------------------------------------------------------


def test_size_cap_evicts_the_least_recently_used(tmp_path):
    cache = EngineCache(tmp_path / "engines", max_bytes=2500)
    for index, name in enumerate("abc"):
        source = tmp_path / f"{name}.bin"
        source.write_bytes(b"x" * 1000)
        cache.store(name, source, {"n": index})
        os.utime(cache._metadata(name), (index, index))  # a, then b, then c were last used
    assert [key for key, _, _ in cache.entries()] == ["b", "c"]
    assert cache.lookup("a") is None and cache.lookup("b") is not None


def test_eviction_spares_an_entry_whose_lock_someone_holds(tmp_path):
    cache = EngineCache(tmp_path / "engines", max_bytes=2500)
    store(cache, "a")
    store(cache, "b")
    age(cache.directory / "a.json", 20)
    age(cache.directory / "b.json", 10)
    with cache.lock("a"):  # a handle of its own, as another process building or loading "a" would have
        store(cache, "c")
    assert sorted(key for key, _, _ in cache.entries()) == ["a", "c"]


def test_size_counts_every_file_and_the_cap_counts_them_too(tmp_path):
    cache = EngineCache(tmp_path / "engines", max_bytes=2500)
    store(cache, "a")
    (cache.directory / "orphan.engine").write_bytes(b"x" * 1000)
    staging = cache.directory / ".build-x"
    staging.mkdir()
    (staging / "engine.engine").write_bytes(b"x" * 500)
    on_disk = sum(path.stat().st_size for path in cache.directory.rglob("*") if path.is_file())
    assert on_disk > 2500 and cache.size_bytes() == on_disk
    age(cache.directory / "a.json", 10)
    store(cache, "b")
    assert [key for key, _, _ in cache.entries()] == ["b"]


@pytest.mark.subprocess
def test_processes_storing_looking_up_and_evicting_at_once_leave_a_consistent_cache(tmp_path):
    """Four processes, 12 keys, room for about four entries: nearly every store evicts what another may be using."""
    directory, barrier = tmp_path / "engines", tmp_path / "barrier"
    barrier.mkdir()
    workers, operations, max_bytes = 4, 500, 4 * ENTRY_BYTES
    command = [sys.executable, "-m", "tests.support.engine_cache_worker", str(directory), str(max_bytes)]
    processes = [
        subprocess.Popen(
            [*command, str(seed), str(operations), str(barrier), str(workers)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(workers)
    ]
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0] * workers, "\n".join(errors)
    engines = {path.stem for path in directory.glob("*.engine")}
    assert engines and engines == {path.stem for path in directory.glob("*.json")}
    assert [path.name for path in directory.iterdir() if path.name.startswith(".")] == []
    cache = EngineCache(directory, max_bytes)
    assert cache.size_bytes() <= max_bytes
    assert all(cache.lookup(key).read_bytes() == engine_bytes(key) for key in engines)


# -- leftovers -----------------------------------------------------------------------------------------------------


def test_prepare_removes_what_killed_builds_left_and_keeps_the_rest(tmp_path, caplog):
    cache = EngineCache(tmp_path / "engines")
    store(cache, "complete")
    cache.reject("rejected", "relative error 0.5")  # a rejection record has no engine, by design
    abandoned = cache.directory / ".build-abandoned"
    abandoned.mkdir()
    (abandoned / "engine.engine").write_bytes(b"x" * 10)
    age(abandoned / "engine.engine", 7200)
    age(abandoned, 7200)
    writing = cache.directory / ".build-writing"  # created long ago, its engine file still being written
    writing.mkdir()
    (writing / "engine.engine").write_bytes(b"x" * 10)
    age(writing, 7200)
    (cache.directory / ".k.json.123.tmp").write_text("{")
    age(cache.directory / ".k.json.123.tmp", 7200)
    (cache.directory / "orphan.engine").write_bytes(b"x" * 10)  # killed between the engine's rename and its metadata
    (cache.directory / "stale.json").write_text('{"bytes": 10}')  # its engine file was deleted
    (cache.directory / "building.engine").write_bytes(b"x" * 10)  # its build is storing it right now
    (cache.directory / "gone.lock").write_text("")  # a lock file outlives its entry
    (cache.directory / "earlier.pt2").write_bytes(b"x" * 10)  # an engine file of an earlier format, and its entry
    (cache.directory / "earlier.json").write_text('{"bytes": 10}')
    with caplog.at_level(logging.INFO), cache.lock("building"):
        cache.prepare()
    assert names(cache.directory) == [
        ".build-writing",
        "building.engine",
        "complete.engine",
        "complete.json",
        "rejected.json",
    ]
    assert cache.lookup("complete") is not None and cache.rejection("rejected") == "relative error 0.5"
    assert cache.size_bytes() == sum(path.stat().st_size for path in cache.directory.rglob("*") if path.is_file())
    assert "interrupted build" in caplog.text and "earlier format" in caplog.text
    assert "engine earlier from the cache: engine file missing" not in caplog.text  # no false alarm for it


def test_a_killed_build_is_cleared_at_the_next_start_unless_it_is_still_running(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    killed, running = cache_key({"build": "killed"}), cache_key({"build": "running"})
    for key in (killed, running):
        staging = cache.directory / f"{cache.staging_prefix(key)}a1b2"
        staging.mkdir(parents=True)
        (staging / "engine.engine").write_bytes(b"x" * 10)  # fresh: its age alone would keep it for an hour
    with cache.lock(running):
        cache.prepare()
    assert names(cache.directory) == [f"{cache.staging_prefix(running)}a1b2"]


# -- environment ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-inf", "-1", "0", "1e308"])
def test_a_cache_limit_that_is_not_a_positive_number_of_gb_is_refused(monkeypatch, value):
    monkeypatch.setenv(CACHE_LIMIT_VARIABLE, value)
    with pytest.raises(InvalidSettings) as refused:
        default_cache_limit()
    assert str(refused.value) == f"{CACHE_LIMIT_VARIABLE} must be a positive number of GB, got {value!r}"


@pytest.mark.parametrize(("value", "limit"), [(None, None), ("", None), ("1.5", 3 * 2**29), ("20", 20 * 2**30)])
def test_cache_limit_in_gb(monkeypatch, value, limit):
    if value is None:
        monkeypatch.delenv(CACHE_LIMIT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(CACHE_LIMIT_VARIABLE, value)
    assert default_cache_limit() == limit


def test_a_cache_dir_that_is_a_file_is_refused(monkeypatch, tmp_path):
    (tmp_path / "engines").write_text("")
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "engines"))
    with pytest.raises(InvalidSettings, match=f"{CACHE_DIR_VARIABLE} must name a directory, got '.*engines'"):
        default_cache_dir()
