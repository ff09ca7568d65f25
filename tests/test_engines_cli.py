"""`engines.py list` and `prune`: what the cache holds, one line per engine; a listing changes nothing; pruning says
what it removed, leaves no lock files and fails in one line where the directory will not let go."""

import json
import os
import time
from pathlib import Path

import pytest

import engines
from diffusers_helper.acceleration.compiled_blocks import COMPILED_CODE_DIR
from diffusers_helper.acceleration.engine_cache import CACHE_DIR_VARIABLE, EngineCache
from diffusers_helper.acceleration.speed_policy import speed_key
from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecord, SpeedRecords

INPUTS = [[[1, 1024, 32], "float32"], [[1, 1024, 32], "float32"], [[1, 32], "float32"]]


def store(cache: EngineCache, key: str, tokens: int, size: int = 4096) -> None:
    source = cache.directory.parent / f"{key}.bin"
    source.write_bytes(b"x" * size)
    inputs = [[[1, tokens, 32], "float32"], *INPUTS[1:]]
    record = {"component": "transformer", "inputs": inputs, "code": "c", "settings": {}, "gpu": "NVIDIA H200",
              "compute_capability": "9.0", "versions": {"torch_tensorrt": "2.11"}, "weights": "w"}  # fmt: skip
    with cache.lock(key):
        cache.store(key, source, record)


@pytest.fixture
def filled_cache(tmp_path, monkeypatch) -> EngineCache:
    """Two transformer engines, the first used longest ago."""
    cache = EngineCache(tmp_path / "engines")
    for key, tokens in (("a" * 32, 1024), ("b" * 32, 2048)):
        store(cache, key, tokens)
        time.sleep(0.01)  # distinct last-use times: the order is by them
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(cache.directory))
    return cache


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() if path.is_file() else b"<dir>" for path in sorted(directory.iterdir())}


def test_list_shows_component_shapes_size_last_use_and_measured_speed(filled_cache, capsys):
    assert engines.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "2 engine(s)" in out and out.count("transformer") == 2 and "1x1024x32" in out
    assert out.count("speed not measured") == 2
    record = filled_cache.describe()[0]
    speeds = SpeedRecords(filled_cache.directory / SPEED_RECORDS_FILE)
    for versus, seconds in (("eager", 1 / 1.5), ("torch.compile", 1 / 0.8)):
        speeds.remember(speed_key(record, versus), SpeedRecord(1.0, seconds))
    engines.main(["list"])
    out = capsys.readouterr().out
    assert "1.50x PyTorch (eager), 0.80x PyTorch (torch.compile)" in out and out.count("speed not measured") == 1


@pytest.mark.parametrize(
    "damage",
    ['{"component": null, "bytes": 4096}', '{"speedups": 5, "component": "transformer", "bytes": 4096}',
     '{"inputs": 7}', "[1, 2]", "{not json"],
)  # fmt: skip
def test_a_listing_of_a_damaged_entry_names_it_and_changes_nothing(filled_cache, capsys, damage):
    (filled_cache.directory / f"{'a' * 32}.json").write_text(damage)
    (filled_cache.directory / "notes.json").mkdir()  # a directory with an entry's suffix is not one of ours
    before = contents(filled_cache.directory)
    assert engines.main(["list"]) == 0
    out = capsys.readouterr().out
    assert contents(filled_cache.directory) == before  # a list changes nothing
    if damage.startswith('{"speedups"'):  # an old record's field, not read any more: the entry is fine
        assert "unreadable" not in out and "2 engine(s)" in out
    else:
        assert f"{'a' * 32}  unreadable metadata" in out and "`prune --all` removes it now" in out
        assert "1 engine(s)" in out


def test_prune_by_age_size_component_and_all(filled_cache, capsys):
    oldest, newest = filled_cache.describe()
    old = time.time() - 40 * 86400
    os.utime(filled_cache.directory / f"{oldest['key']}.json", (old, old))
    assert engines.main(["prune", "--unused-days", "30"]) == 0
    assert [r["key"] for r in filled_cache.describe()] == [newest["key"]]
    assert engines.main(["prune", "--all", "--component", "vae_decoder"]) == 0
    assert len(filled_cache.describe()) == 1
    assert engines.main(["prune", "--max-gb", "0"]) == 0
    assert filled_cache.describe() == [] and "removed 1 engine(s)" in capsys.readouterr().out
    assert not list(filled_cache.directory.glob("*.lock"))  # pruned entries take their locks with them


def test_prune_says_what_it_removed_unreadable_entries_included(filled_cache, capsys):
    (filled_cache.directory / f"{'a' * 32}.json").write_text('{"component": null}')
    assert engines.main(["prune", "--max-gb", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 engine(s)" in out and "removed 1 entry whose record could not be read" in out
    assert contents(filled_cache.directory) == {}


def test_prune_in_a_directory_that_will_not_let_go_is_one_line(filled_cache, capsys, monkeypatch):
    def read_only(self, missing_ok=False):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    assert engines.main(["list"]) == 0  # reading needs no write
    assert engines.main(["prune", "--all"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot prune {filled_cache.directory}: Permission denied\n"


def test_list_shows_rejected_engines_and_prune_all_lets_them_be_built_again(filled_cache, capsys):
    ingredients = {"component": "vae_decoder", "gpu": "NVIDIA H200"}
    filled_cache.reject("failed", "its build failed: RuntimeError: no kernels", ingredients)
    filled_cache.reject("wrong", "relative error 0.5 against PyTorch", {"component": "transformer"})
    assert engines.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "failed  vae_decoder     rejected on NVIDIA H200: its build failed: RuntimeError: no kernels" in out
    assert "2 engine(s)" in out  # rejections are not engines
    assert engines.main(["prune", "--unused-days", "0"]) == 0
    assert len(filled_cache.rejections()) == 2  # only --all removes them
    assert engines.main(["prune", "--all", "--component", "vae_decoder"]) == 0
    assert [r["key"] for r in filled_cache.rejections()] == ["wrong"] and filled_cache.rejection("failed") is None
    assert "removed 1 rejection record(s)" in capsys.readouterr().out


def test_prune_all_forgets_the_engines_measured_speeds_and_leaves_no_locks(filled_cache, capsys):
    record = filled_cache.describe()[0]
    speeds = SpeedRecords(filled_cache.directory / SPEED_RECORDS_FILE)
    speeds.remember(speed_key(record, "eager"), SpeedRecord(1.0, 2.0))
    speeds.remember({"candidate": "torch.compile", "versus": "eager"}, SpeedRecord(1.0, 0.5))
    filled_cache.lock("c" * 32).acquire()  # a lock left by an entry that is gone
    filled_cache.lock("c" * 32).release()
    assert engines.main(["prune", "--all"]) == 0
    assert "forgot 1 measured engine speed(s)" in capsys.readouterr().out
    assert [key["candidate"] for key, _ in speeds.matching({})] == ["torch.compile"]  # the blocks' stay
    assert [path.name for path in filled_cache.directory.iterdir()] == [SPEED_RECORDS_FILE]


def test_an_engine_in_use_by_another_process_is_not_pruned(filled_cache):
    key = filled_cache.describe()[0]["key"]
    with filled_cache.lock(key):
        assert engines.main(["prune", "--all"]) == 0
    assert [r["key"] for r in filled_cache.describe()] == [key]


def test_a_record_the_tools_write_is_json(filled_cache):
    record = json.loads((filled_cache.directory / f"{'a' * 32}.json").read_text())
    assert record["component"] == "transformer" and record["bytes"] == 4096


def test_torch_compiles_code_is_listed_and_pruned_with_the_engines(filled_cache, capsys):
    code = filled_cache.directory / COMPILED_CODE_DIR
    (code / "fxgraph" / "ab").mkdir(parents=True)
    old, new = code / "fxgraph" / "ab" / "old-graph", code / "triton" / "new-kernel"
    new.parent.mkdir()
    old.write_bytes(b"x" * 1000)
    new.write_bytes(b"y" * 3000)
    long_ago = time.time() - 40 * 86400
    os.utime(old, (long_ago, long_ago))
    assert engines.main(["list"]) == 0
    assert "torch.compile's code, 2 file(s)" in capsys.readouterr().out
    for kept in (["--max-gb", "100"], ["--all", "--component", "transformer"]):  # engines only
        assert engines.main(["prune", *kept]) == 0
        assert old.exists() and new.exists()
    assert engines.main(["prune", "--unused-days", "30"]) == 0
    assert "removed 1 file(s) of torch.compile's code" in capsys.readouterr().out
    assert not (code / "fxgraph").exists() and new.exists()  # the old file and the folders it left empty
    assert engines.main(["prune", "--all"]) == 0
    assert not new.exists() and not code.exists()
