"""Speeds measured once and remembered (one store for every choice made by measurement), and the rule that a TensorRT
engine serves only where it is faster than PyTorch, through the runtime with the Torch-TensorRT double."""

import logging

import pytest
import torch

from diffusers_helper.acceleration import speed_policy
from diffusers_helper.acceleration.speed_policy import engine_speedups
from diffusers_helper.acceleration.speed_records import SpeedRecord, SpeedRecords
from tests.support.runtimes import COMPONENT, call, make_runtime
from tests.support.tensorrt_worker import seeded_mlp

# -- the store -------------------------------------------------------------------------------------------------------


def test_the_last_record_of_a_key_wins_and_keys_compare_as_json_holds_them(tmp_path):
    records = SpeedRecords(tmp_path / "speeds.jsonl")
    key = {"candidate": "tensorrt", "versus": "eager", "inputs": [((1, 2), "float32")]}
    assert records.lookup(key) is None
    records.remember(key, SpeedRecord(1.0, 2.0))
    records.remember(key, SpeedRecord(1.0, 0.5, relative_error=0.01))
    records.remember({**key, "versus": "torch.compile"}, SpeedRecord(1.0, 1.0))
    assert records.lookup(key) == SpeedRecord(1.0, 0.5, 0.01) and records.lookup(key).speedup == 2.0
    assert len(records.matching({"candidate": "tensorrt"})) == 3
    assert [k["versus"] for k, _ in records.matching({"versus": "torch.compile"})] == ["torch.compile"]


def test_a_line_cut_short_or_not_ours_is_skipped(tmp_path):
    records = SpeedRecords(tmp_path / "speeds.jsonl")
    records.remember({"k": 1}, SpeedRecord(2.0, 1.0))
    with open(records.path, "a") as file:
        file.write(
            '{"key": {"k": 1}, "baseline_s": 9\n["not", "a", "record"]\n{"key": 5, "baseline_s": 1, "candidate_s": 1}\n'
        )
    assert records.lookup({"k": 1}) == SpeedRecord(2.0, 1.0)
    assert len(records.matching({})) == 1


def test_forgetting_removes_only_the_matching_records(tmp_path):
    records = SpeedRecords(tmp_path / "speeds.jsonl")
    for candidate in ("tensorrt", "torch.compile", "tensorrt"):
        records.remember({"candidate": candidate}, SpeedRecord(1.0, 1.0))
    assert records.forget({"candidate": "tensorrt"}) == 2
    assert [k["candidate"] for k, _ in records.matching({})] == ["torch.compile"]
    assert records.forget({"candidate": "tensorrt"}) == 0


# -- engines serve only where they are faster --------------------------------------------------------------------------


class _Timings:
    """Stands in for the policy's timer: runs the call once, and says it took the next of the given seconds
    (PyTorch is timed first, then the engine). No seconds left: a timing that should not have happened."""

    def __init__(self, *seconds: float) -> None:
        self.seconds = list(seconds)

    def __call__(self, function, runs=5, warmup=1) -> float:
        function()
        return self.seconds.pop(0)


@pytest.mark.parametrize("speedup, served_by", [(0.99, "pytorch"), (1.5, "tensorrt")])
def test_an_engine_serves_only_where_it_is_faster_than_pytorch_measured_once(tmp_path, monkeypatch, speedup, served_by):
    monkeypatch.setattr(speed_policy, "median_seconds", _Timings(1.0, 1.0 / speedup))
    runtime, _ = make_runtime(tmp_path, only_if_faster=True)
    module = seeded_mlp()
    for _ in range(2):  # the second call is served without timing again
        actual, expected = call(runtime, module)
        assert torch.allclose(actual, expected)
    status = runtime.status[COMPONENT]
    assert (status.engine, status.compiles) == (served_by, 1)
    if served_by == "pytorch":
        assert "0.99x the speed of PyTorch (eager)" in status.describe()
    [record] = runtime.cache.describe()
    assert engine_speedups(runtime.speeds.records, record) == {"eager": pytest.approx(speedup, abs=1e-3)}

    # A later process trusts the record: no timing; an engine that lost is not even loaded.
    later, _ = make_runtime(tmp_path, only_if_faster=True)
    call(later, seeded_mlp())
    status = later.status[COMPONENT]
    if served_by == "pytorch":  # by the record, not by a failure (a timing here would be one)
        assert status.loads == 0 and status.reason.startswith("its engine measured 0.99x")
    else:
        assert (status.engine, status.loads) == ("tensorrt", 1)
    # Told to use every engine that matches PyTorch, it loads the one that lost too.
    always, _ = make_runtime(tmp_path)
    call(always, seeded_mlp())
    assert (always.status[COMPONENT].engine, always.status[COMPONENT].loads) == ("tensorrt", 1)


@pytest.mark.parametrize("speedup, builds", [(0.99, 1), (1.5, 2)])
def test_a_new_shape_is_not_built_where_the_components_engines_lose_on_this_gpu(tmp_path, monkeypatch, speedup, builds):
    """A full-size build takes minutes: an engine of the component that measured slower than PyTorch for one shape
    means no build for the next shape, in this process and in a later one; a faster one means the next is built."""
    monkeypatch.setattr(speed_policy, "median_seconds", _Timings(1.0, 1.0 / speedup, 1.0, 1.0 / speedup))
    runtime, backend = make_runtime(tmp_path, only_if_faster=True)
    module = seeded_mlp()
    call(runtime, module)
    actual, expected = call(runtime, module, shape=(3, 8))
    assert torch.allclose(actual, expected) and backend.compiled == builds
    if builds == 1:
        assert runtime.status[COMPONENT].reason.startswith("an engine of it for another input shape measured 0.99x")
        later, later_backend = make_runtime(tmp_path, only_if_faster=True)
        call(later, seeded_mlp(), shape=(4, 8))
        assert later_backend.compiled == 0 and later.status[COMPONENT].engine == "pytorch"
        always, always_backend = make_runtime(tmp_path)  # --tensorrt-always: every engine that matches is built
        call(always, seeded_mlp(), shape=(4, 8))
        assert always_backend.compiled == 1 and always.status[COMPONENT].engine == "tensorrt"


def test_a_speed_that_cannot_be_kept_costs_a_warning_not_the_engine(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(speed_policy, "median_seconds", _Timings(1.0, 0.5))

    def unwritable(key, record):
        raise PermissionError("read-only")

    runtime, _ = make_runtime(tmp_path, only_if_faster=True)
    monkeypatch.setattr(runtime.speeds.records, "remember", unwritable)
    with caplog.at_level(logging.WARNING):
        call(runtime)
    assert runtime.status[COMPONENT].engine == "tensorrt"
    assert "could not keep the engine's speed" in caplog.text
