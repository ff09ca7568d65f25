"""The TensorRT runtime's own policy on the CPU, with a test double for Torch-TensorRT (tests/support/tensorrt_double.py):
finding, building, loading and refitting engines, checking them, falling back, cancelling builds, what the status
says while it works, and where PyTorch's copy of the weights goes. What TensorRT itself does is tested in tests/gpu.
"""

import gc
import json
import logging
import re
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import TensorRTRuntime
from tests.support.frame_sink import FrameSink
from tests.support.runtimes import (
    COMPONENT,
    TINY_STACK_ENGINES,
    WEIGHT_EDITS,
    call,
    edit_weights,
    leftovers,
    make_runtime,
    refittable_runtime,
)
from tests.support.tensorrt_double import FakeBackend
from tests.support.tensorrt_worker import seeded_mlp

REPO = Path(__file__).resolve().parent.parent


def test_engines_belong_to_the_models_they_were_made_for(tmp_path):
    """As after a variant switch in the app: other weights in the same shapes never run on the old engine."""
    runtime, backend = make_runtime(tmp_path)
    first = seeded_mlp()
    call(runtime, first)
    other = seeded_mlp()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    actual, expected = call(runtime, other)
    assert torch.equal(actual, expected) and backend.compiled == 2
    engines = [weakref.ref(engine) for module in (first, other) for engine in runtime.engines_of(module)]
    del first, other
    gc.collect()
    assert len(engines) == 2 and all(engine() is None for engine in engines)  # the engines went with their models
    third = seeded_mlp()  # may reuse a dead module's id(): nothing may be remembered by id
    with torch.no_grad():
        third[2].bias.add_(2.0)
    actual, expected = call(runtime, third)
    assert torch.equal(actual, expected)
    assert backend.compiled == 3 and runtime.status[COMPONENT].engine == "tensorrt"


# -- hits, misses and the disk cache -------------------------------------------------------------------------------


def test_first_call_compiles_then_memory_then_disk_then_new_shape(tmp_path):
    runtime, backend = make_runtime(tmp_path)
    module = seeded_mlp()
    actual, expected = call(runtime, module)
    assert torch.equal(actual, expected) and backend.compiled == 1
    call(runtime, module)
    assert backend.compiled == 1 and backend.loaded == 0  # in memory
    second, second_backend = make_runtime(tmp_path)
    call(second)
    assert second_backend.compiled == 0 and second_backend.loaded == 1  # from disk
    call(second, shape=(5, 8))
    assert second_backend.compiled == 1  # a new shape is a new engine
    assert runtime.status[COMPONENT].engine == "tensorrt"
    assert len(EngineCache(tmp_path / "engines").entries()) == 2
    assert leftovers(tmp_path / "engines") == []


@pytest.mark.subprocess
def test_a_second_process_loads_from_disk_without_compiling(tmp_path):
    worker = [sys.executable, "-m", "tests.support.tensorrt_worker", str(tmp_path / "engines")]
    first = json.loads(subprocess.run(worker, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    second = json.loads(subprocess.run(worker, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert (first["compiles"], first["loads"]) == (1, 0)
    assert (second["compiles"], second["loads"]) == (0, 1)
    assert first["sum"] == second["sum"] and second["engine"] == "tensorrt"


@pytest.mark.subprocess
def test_concurrent_builders_compile_once(tmp_path):
    worker = [sys.executable, "-m", "tests.support.tensorrt_worker", str(tmp_path / "engines"), "2.0"]
    processes = [subprocess.Popen(worker, cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0]) for p in processes]
    assert sorted(r["compiles"] for r in results) == [0, 1]
    assert sorted(r["loads"] for r in results) == [0, 1]
    assert results[0]["sum"] == results[1]["sum"]
    assert len(EngineCache(tmp_path / "engines").entries()) == 1
    assert leftovers(tmp_path / "engines") == []


def test_deleting_the_cache_forces_a_rebuild(tmp_path):
    runtime, _ = make_runtime(tmp_path)
    call(runtime)
    for path in (tmp_path / "engines").iterdir():
        path.unlink()
    (tmp_path / "engines").rmdir()
    fresh, backend = make_runtime(tmp_path)
    call(fresh)
    assert backend.compiled == 1


# -- broken entries ------------------------------------------------------------------------------------------------


def _engine_file(tmp_path) -> Path:
    return next((tmp_path / "engines").glob("*.engine"))


def test_truncated_engine_is_removed_and_rebuilt(tmp_path, caplog):
    call(make_runtime(tmp_path)[0])
    engine = _engine_file(tmp_path)
    engine.write_bytes(engine.read_bytes()[:100])
    runtime, backend = make_runtime(tmp_path)
    with caplog.at_level(logging.WARNING):
        actual, expected = call(runtime)
    assert torch.equal(actual, expected)
    assert backend.compiled == 1 and "truncated or corrupt" in caplog.text
    assert _engine_file(tmp_path).stat().st_size > 100


def test_corrupt_engine_that_will_not_load_is_rebuilt(tmp_path, caplog):
    call(make_runtime(tmp_path)[0])
    engine = _engine_file(tmp_path)
    engine.write_bytes(b"\0" * engine.stat().st_size)  # right size, garbage inside
    runtime, backend = make_runtime(tmp_path)
    with caplog.at_level(logging.WARNING):
        actual, expected = call(runtime)
    assert torch.equal(actual, expected) and backend.compiled == 1
    assert "will not load" in caplog.text
    assert runtime.status[COMPONENT].engine == "tensorrt"


def test_a_failed_save_leaves_no_entry_and_no_temporary_files(tmp_path):
    runtime, _ = make_runtime(tmp_path, fail="save")
    actual, expected = call(runtime)
    assert torch.equal(actual, expected)
    assert "No space left on device" in runtime.status[COMPONENT].reason
    assert EngineCache(tmp_path / "engines").entries() == []
    assert leftovers(tmp_path / "engines") == []


# -- fallbacks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "reason"),
    [
        ("unavailable", "no CUDA GPU"),
        ("export", "data-dependent"),
        ("oom", "out of GPU memory"),
        ("run", "illegal memory access"),
    ],
)
def test_each_failure_falls_back_to_pytorch_with_one_warning(tmp_path, caplog, fail, reason):
    runtime, _ = make_runtime(tmp_path, fail=fail)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            actual, expected = call(runtime)
            assert torch.equal(actual, expected)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "TensorRT vae_decoder" in r.getMessage()]
    assert len(warnings) == 1 and reason in warnings[0].getMessage()
    assert runtime.status[COMPONENT].engine == "pytorch" and reason in runtime.status[COMPONENT].reason


def test_an_engine_that_will_not_load_falls_back_when_it_cannot_be_rebuilt_either(tmp_path):
    call(make_runtime(tmp_path)[0])
    runtime, backend = make_runtime(tmp_path, fail="load")
    actual, expected = call(runtime)
    assert torch.equal(actual, expected)
    assert backend.compiled == 1  # removed and rebuilt; the rebuilt engine serves in this process


def test_other_components_keep_their_engines(tmp_path):
    runtime, _ = make_runtime(tmp_path)
    runtime.register("text_encoder_2")
    call(runtime)
    runtime.fall_back("text_encoder_2", "something broke")
    runtime.run("text_encoder_2", seeded_mlp(), (torch.ones(2, 8),))
    assert runtime.status[COMPONENT].engine == "tensorrt"
    assert runtime.status["text_encoder_2"].engine == "pytorch"
    assert any(line.startswith("vae_decoder: TensorRT") for line in runtime.report())


def test_unwritable_cache_directory_falls_back(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    runtime = TensorRTRuntime(EngineCache(blocker / "engines"), FakeBackend())
    runtime.register(COMPONENT)
    actual, expected = call(runtime)
    assert torch.equal(actual, expected)
    assert "not writable" in runtime.status[COMPONENT].reason


def test_a_wrong_engine_is_rejected_and_not_rebuilt_by_later_processes(tmp_path, caplog):
    runtime, _ = make_runtime(tmp_path, scale=1.5)
    with caplog.at_level(logging.WARNING):
        actual, expected = call(runtime)
    assert torch.equal(actual, expected)  # the PyTorch result, not the wrong one
    assert "differs from PyTorch" in caplog.text
    assert runtime.status[COMPONENT].relative_errors == [pytest.approx(0.5, abs=1e-3)]  # what the check measured
    later, later_backend = make_runtime(tmp_path, scale=1.5)
    call(later)
    assert later_backend.compiled == 0 and "rejected" in later.status[COMPONENT].reason


@pytest.mark.parametrize(("fail", "later_builds"), [("export", 0), ("oom", 1)])
def test_a_failed_build_is_not_tried_again_by_later_processes_unless_it_ran_out_of_memory(tmp_path, fail, later_builds):
    call(make_runtime(tmp_path, fail=fail)[0])
    later, later_backend = make_runtime(tmp_path)
    actual, expected = call(later)
    assert torch.equal(actual, expected)
    assert later_backend.compiled == later_builds
    if not later_builds:
        assert "its build failed: RuntimeError: torch.export" in later.status[COMPONENT].reason
        assert "`engines.py prune --all` forgets that" in later.status[COMPONENT].reason


def test_an_engine_tensorrt_cannot_run_here_is_named_so(tmp_path, monkeypatch):
    runtime, backend = make_runtime(tmp_path)

    def no_kernels_for_this_gpu(*args):
        raise RuntimeError("[Error thrown at core/runtime/TRTEngine.cpp:143] Expected (exec_ctx.get() != nullptr)")

    monkeypatch.setattr(backend, "compile", no_kernels_for_this_gpu)
    call(runtime)
    assert "could not create its execution context on this GPU" in runtime.status[COMPONENT].reason


def test_a_bug_in_the_runtimes_own_bookkeeping_is_raised_not_turned_into_a_fallback(tmp_path, monkeypatch):
    """Only TensorRT's failures (and the cache's disk) send a component to PyTorch: a mistake in our own code must fail
    loudly, not become a permanent "fell back" warning."""
    runtime, _ = make_runtime(tmp_path)

    def broken(key):
        raise KeyError("a bug in the runtime")

    monkeypatch.setattr(runtime.cache, "rejection", broken)
    with pytest.raises(KeyError, match="a bug in the runtime"):
        call(runtime)
    assert runtime.is_active(COMPONENT)


def test_an_engine_cache_whose_disk_fails_costs_the_component_not_the_job(tmp_path, monkeypatch):
    runtime, _ = make_runtime(tmp_path)

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.cache, "store", full)
    actual, expected = call(runtime)
    assert torch.equal(actual, expected)
    assert (
        "the engine cache in" in runtime.status[COMPONENT].reason
        and "No space left" in runtime.status[COMPONENT].reason
    )


# -- where PyTorch's copy of the weights goes -----------------------------------------------------------------------


class RecordingParking:
    """The memory policy's part, recorded (on the CPU nothing moves): what was parked and what was brought back."""

    def __init__(self, log: list) -> None:
        self.log, self.parked = log, set()

    def park(self, module) -> bool:
        self.log.append(("park", module))
        self.parked.add(module)
        return True

    def bring_back(self, module) -> bool:
        if module not in self.parked:
            return False
        self.parked.discard(module)
        self.log.append(("bring back", module))
        return True

    def is_parked(self, module) -> bool:
        return module in self.parked


def test_the_pytorch_copy_is_parked_once_the_engine_passes_and_brought_back_for_a_fallback(tmp_path):
    runtime, backend = make_runtime(tmp_path)
    log, module = [], seeded_mlp()
    runtime.register(COMPONENT, parking=RecordingParking(log))
    backend.on_engine_started = lambda progress: log.append("building")
    call(runtime, module)
    assert log[:3] == ["building"] * 3 and set(log[3:]) == {("park", module)}  # once built, never before
    assert "PyTorch weights on the CPU" in runtime.status[COMPONENT].describe()
    moves = len(log)
    call(runtime, module)
    assert len(log) == moves  # served by the engine: nothing moves
    [engine] = runtime.engines_of(module)
    engine.fail_run = True  # the engine fails at its next run
    actual, expected = call(runtime, module)
    assert torch.equal(actual, expected)
    assert log[-1] == ("bring back", module) and runtime.engines_of(module) == []  # weights back, engines gone
    assert runtime.status[COMPONENT].engine == "pytorch" and not runtime.status[COMPONENT].pytorch_weights_on_cpu


@pytest.mark.parametrize("cached", ["loads", "will not load", "needs a refit"])
def test_a_cached_engine_takes_the_place_of_the_pytorch_copy(tmp_path, monkeypatch, cached):
    """Loading a cached engine beside PyTorch's copy of its weights would hold both on the GPU for a moment, past a
    small card's room: the copy is parked before the load, and back where PyTorch runs it for a refit or a build."""
    first, _ = refittable_runtime(tmp_path, monkeypatch)
    call(first)
    later, backend = refittable_runtime(tmp_path, monkeypatch, fail="load" if cached == "will not load" else None)
    log, module = [], seeded_mlp()
    if cached == "needs a refit":
        with torch.no_grad():
            module[2].bias.add_(1.0)
    parking = RecordingParking(log)
    later.register(COMPONENT, parking=parking)
    load, refit, build = backend.load, backend.refit, backend.compile
    backend.load = lambda path, kernels: log.append(("loading", parking.is_parked(module))) or load(path)
    backend.refit = lambda *args: log.append(("refitting", parking.is_parked(module))) or refit(*args)
    backend.compile = lambda *args: log.append(("building", parking.is_parked(module))) or build(*args)
    actual, expected = call(later, module)
    assert torch.equal(actual, expected) and later.status[COMPONENT].engine == "tensorrt"
    assert log[0] == ("park", module) and ("loading", True) in log
    moved = {"loads": [], "will not load": [("building", False)], "needs a refit": [("refitting", False)]}[cached]
    assert [entry for entry in log if entry[0] in ("building", "refitting")] == moved
    assert parking.is_parked(module)  # the engine serves: PyTorch's copy waits on the host


@pytest.mark.parametrize("how", ["another module's failure", "its own failure"])
def test_a_dropped_engine_frees_its_memory_at_once(tmp_path, how):
    """Torch-TensorRT's compiled modules refer to themselves (a graph module's graph refers back to it), so an engine
    the runtime drops would hold the GPU until Python's next full collection: a fall back (a stretch's build out of
    memory) frees every engine of the component at once, each before its weights come back for PyTorch."""
    runtime, _ = make_runtime(tmp_path)
    log, module = [], seeded_mlp()
    parking = RecordingParking(log)
    runtime.register(COMPONENT, parking=parking)
    call(runtime, module)
    [engine] = runtime.engines_of(module)
    engine.__dict__["itself"] = engine  # the reference cycle of a graph module
    freed = weakref.ref(engine)
    del engine
    gc.disable()  # only the runtime's own collection may free it
    try:
        if how == "another module's failure":
            runtime.fall_back(COMPONENT, "out of GPU memory while building or running the engine")
            assert freed() is None and runtime.engines_of(module) == [] and parking.is_parked(module)
        else:
            bring_back = parking.bring_back
            parking.bring_back = lambda module: log.append(("engine alive", freed() is not None)) or bring_back(module)
            freed().fail_run = True  # the engine fails at its next run: PyTorch runs the call
            actual, expected = call(runtime, module)
            assert torch.equal(actual, expected) and ("engine alive", False) in log
    finally:
        gc.enable()


def test_without_parking_the_weights_stay_where_they_are(tmp_path):
    """The runtime moves no weights itself: a component registered without parking keeps its weights in place."""
    runtime, _ = make_runtime(tmp_path)
    module = seeded_mlp()
    before = [p.data_ptr() for p in module.parameters()]
    call(runtime, module)
    assert [p.data_ptr() for p in module.parameters()] == before
    assert not runtime.status[COMPONENT].pytorch_weights_on_cpu


# -- builds, cancels and what the status says while they run ----------------------------------------------------


def test_a_build_says_how_long_the_last_one_took(tmp_path):
    runtime, backend = make_runtime(tmp_path)
    seen = []
    backend.on_engine_started = lambda progress: seen.append(runtime.status[COMPONENT].describe())
    call(runtime)
    call(runtime, shape=(3, 8))
    assert "s of about" not in seen[0]  # nothing to go by yet
    assert re.search(r"compiling engine .* of about \d+s", seen[-1])


def test_a_build_says_which_engine_it_is_building(tmp_path):
    runtime, backend = make_runtime(tmp_path)
    seen = []
    backend.on_engine_started = lambda progress: seen.append(runtime.status[COMPONENT].describe())
    call(runtime)
    assert [line.rsplit("; ", 1)[1] for line in seen] == [f"TensorRT engine {n} of about 3" for n in (1, 2, 3)]
    assert runtime.status[COMPONENT].build is None and "engine in use" in runtime.status[COMPONENT].describe()


@pytest.mark.parametrize("when", ["building", "saving"])
def test_a_cancelled_build_caches_nothing_runs_in_pytorch_and_builds_again_next_time(tmp_path, monkeypatch, when):
    runtime, backend = make_runtime(tmp_path)
    asked = []
    if when == "building":
        backend.on_engine_started = lambda progress: asked.append(progress.engines_started == 2)
    else:
        save = backend.save
        monkeypatch.setattr(backend, "save", lambda *a: asked.append(True) or save(*a))
    with runtime.cancel_builds_when(lambda: any(asked)):
        actual, expected = call(runtime)
        assert torch.equal(actual, expected)  # the call itself ran in PyTorch
        status = runtime.status[COMPONENT]
        assert status.engine == "pytorch" and "build cancelled" in status.reason and runtime.is_active(COMPONENT)
        assert call(runtime)[0].equal(expected)  # still cancelled: no new build starts
    assert runtime.cache.describe() == [] and leftovers(runtime.cache.directory) == []
    assert backend.compiled == (1 if when == "saving" else 0)
    actual, expected = call(runtime)  # the cancel was for that job only: the next call builds
    assert torch.equal(actual, expected) and runtime.status[COMPONENT].engine == "tensorrt"
    assert len(runtime.cache.describe()) == 1


def test_stopping_a_job_during_an_engine_build_ends_the_build_and_the_job(tmp_path, tiny_root):
    """End pressed while the transformer's engine builds: the build gives up, the job ends as stopped without waiting
    for it, and the next job builds the engine."""
    plan = plan_memory("cpu")
    runtime, backend = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, plan.dtypes())
    models = assemble(
        components, plan, ModelSettings(preset="tiny", tensorrt=TensorRTOptions(transformer=True)), runtime
    )
    engine = FramePackEngine(models, write_video=FrameSink())
    settings = GenerationSettings(prompt="a cat", seconds=1.0, resolution=128, steps=3, step_cache="off")
    stop = threading.Event()
    backend.on_engine_started = lambda progress: stop.set()  # End, pressed while the first engine builds
    paths = JobPaths.for_video(tmp_path / "stopped.mp4")
    events = list(engine.generate(example_image(256, 256), settings, paths, stop))
    assert isinstance(events[-1], Finished) and events[-1].stopped
    assert json.loads(paths.sidecar.read_text())["status"] == "stopped"
    assert backend.compiled == 0 and runtime.cache.describe() == []
    assert "build cancelled" in runtime.status["transformer"].reason
    backend.on_engine_started = lambda progress: None
    events = list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "next.mp4")))
    assert isinstance(events[-1], Finished) and not events[-1].stopped
    assert backend.compiled == TINY_STACK_ENGINES and runtime.status["transformer"].engine == "tensorrt"


# -- new weights: refit, never a stale engine ---------------------------------------------------------------------


@pytest.mark.parametrize("edit", WEIGHT_EDITS)
def test_changed_weights_are_refitted_into_the_engine_not_rebuilt(tmp_path, monkeypatch, edit):
    runtime, backend = refittable_runtime(tmp_path, monkeypatch)
    module = seeded_mlp()
    call(runtime, module)
    edit_weights(module, edit)  # a LoRA fused into the weights, or an edit made behind the runtime's back
    actual, expected = call(runtime, module)
    assert torch.equal(actual, expected)  # the new weights' output, never the stale engine's
    assert (backend.compiled, backend.refitted) == (1, 1)
    assert runtime.status[COMPONENT].refits == 1
    call(runtime, module)
    assert backend.refitted == 1  # unchanged since: nothing to do


def test_a_later_process_with_other_weights_refits_the_cached_engine(tmp_path, monkeypatch):
    runtime, _ = refittable_runtime(tmp_path, monkeypatch)
    call(runtime)
    other = seeded_mlp()
    with torch.no_grad():
        other[2].bias.add_(1.0)
    later, backend = refittable_runtime(tmp_path, monkeypatch)
    actual, expected = call(later, other)
    assert torch.equal(actual, expected)
    assert (backend.compiled, backend.loaded, backend.refitted) == (0, 1, 1)
    assert len(EngineCache(tmp_path / "engines").entries()) == 1  # one engine per shape, whatever the weights


@pytest.mark.parametrize("failure", ["refit fails", "refit is wrong"])
def test_a_failed_or_wrong_refit_falls_back_to_a_build(tmp_path, monkeypatch, caplog, failure):
    runtime, backend = refittable_runtime(tmp_path, monkeypatch)
    module = seeded_mlp()
    call(runtime, module)
    backend.fail, backend.refit_scale = ("refit", 1.0) if failure == "refit fails" else (None, 1.5)
    with torch.no_grad():
        module[0].weight.add_(0.5)
    with caplog.at_level(logging.WARNING):
        actual, expected = call(runtime, module)
    assert torch.equal(actual, expected)
    assert backend.compiled == 2 and runtime.status[COMPONENT].engine == "tensorrt"
    assert "building the engine again" in caplog.text


def test_a_component_keyed_by_its_weights_builds_for_new_weights(tmp_path):
    runtime, backend = make_runtime(tmp_path)  # the VAE decoder: immutable weights
    module = seeded_mlp()
    call(runtime, module)
    with torch.no_grad():
        module[0].weight.add_(0.5)
    actual, expected = call(runtime, module)
    assert torch.equal(actual, expected) and (backend.compiled, backend.refitted) == (2, 0)


@pytest.mark.parametrize("step", ["load", "refit"])
def test_loads_and_refits_say_what_they_do_while_they_run(tmp_path, monkeypatch, step):
    """At full size both take minutes: the status line names the step and its elapsed time, and clears after it."""
    module = seeded_mlp()
    runtime, backend = refittable_runtime(tmp_path, monkeypatch)
    call(runtime, module)  # builds the engine
    if step == "load":  # a later process finds it in the cache
        runtime, backend = refittable_runtime(tmp_path, monkeypatch)
    else:
        with torch.no_grad():
            module[0].weight.add_(0.5)
    seen = []
    original = getattr(backend, step)

    def watched(*args):
        seen.append(runtime.status[COMPONENT].describe())
        return original(*args)

    setattr(backend, step, watched)
    call(runtime, module)
    expected = {
        "load": r"loading engine from the cache\.\.\. \d+s",
        "refit": r"refitting engine \(new weights\)\.\.\. \d+s",
    }
    assert len(seen) == 1 and re.fullmatch(expected[step], seen[0])
    assert runtime.status[COMPONENT].busy is None and "TensorRT (engine in use" in runtime.status[COMPONENT].describe()


def test_a_load_says_how_long_the_last_load_of_that_engine_took(tmp_path):
    runtime, _ = make_runtime(tmp_path)
    call(runtime)  # builds
    seen = []
    for _ in range(2):  # two later processes load it
        later, backend = make_runtime(tmp_path)
        load = backend.load
        backend.load = lambda path, kernels: seen.append(later.status[COMPONENT].describe()) or load(path)  # noqa: B023
        call(later)
    [record] = later.cache.describe()
    assert "of about" not in seen[0] and re.fullmatch(
        r"loading engine from the cache\.\.\. \d+s of about \d+s", seen[1]
    )
    assert record["load_seconds"] >= 0
