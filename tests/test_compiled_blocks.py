"""torch.compile for the transformer's blocks (`--backend`): checked against eager, chosen by measurement, remembered,
and eager whenever it cannot serve. Real Inductor on the CPU; a stand-in for torch.compile only where the test is
about our fallback (a wrong or failing compile)."""

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_helper.acceleration import compiled_blocks
from diffusers_helper.acceleration.compiled_blocks import COMPILE_HOOK, COMPILED_CODE_DIR, CompiledBlocks
from diffusers_helper.acceleration.engine_cache import CACHE_DIR_VARIABLE
from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecords
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, InvalidSettings, ModelSettings, TensorRTOptions
from tests.support.frame_sink import FrameSink
from tests.support.runtimes import TINY_STACK_ENGINES

SETTINGS = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=3, resolution=128, step_cache="off")
JOBS = itertools.count()


def tiny_engine(tiny_root, backend: str) -> FramePackEngine:
    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(preset="tiny"))
    if backend != "eager":
        models.compiled = CompiledBlocks(backend)
        models.compiled.install(models.components.transformer)
    return FramePackEngine(models, write_video=FrameSink())


def frames(engine: FramePackEngine, tmp_path, settings: GenerationSettings = SETTINGS) -> np.ndarray:
    paths = JobPaths.for_video(tmp_path / f"{next(JOBS)}.mp4")
    events = list(engine.generate(example_image(128, 128), settings, paths))
    assert isinstance(events[-1], Finished)
    return engine.write_video.last


def blocks(engine: FramePackEngine) -> list[torch.nn.Module]:
    return transformer_blocks(engine.models.components.transformer)


def test_a_compiled_job_makes_the_eager_video_and_says_so(tiny_root, tmp_path):
    eager = frames(tiny_engine(tiny_root, "eager"), tmp_path)
    engine = tiny_engine(tiny_root, "compile")
    compiled = frames(engine, tmp_path)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2  # float32 reassociation, nothing more
    assert engine.models.backends()["transformer"] == "torch.compile"
    assert all(COMPILE_HOOK in block._diffusers_hook.hooks for block in blocks(engine))


def statuses_at_each_compiled_call(monkeypatch, status) -> list[str]:
    """What `status()` says at each call of compiled code, from now on."""
    seen = []

    def watching(function, **options):
        def run(*args, **kwargs):
            seen.append(status())
            return function(*args, **kwargs)

        return run

    monkeypatch.setattr(compiled_blocks.torch, "compile", watching)
    return seen


def test_the_status_says_compiling_while_a_graph_compiles_and_only_then(tiny_root, tmp_path, monkeypatch):
    """The first call compiles; the same shapes again or a prompt of another length compile nothing."""
    engine = tiny_engine(tiny_root, "compile")
    seen = statuses_at_each_compiled_call(monkeypatch, lambda: engine.models.backends()["transformer"])
    compiling = "compiling with torch.compile (new input shapes)... "
    longer = dataclasses.replace(SETTINGS, prompt="a cat walks slowly across a sunny garden")
    frames(engine, tmp_path)
    assert seen[0].startswith(compiling) and not seen[-1].startswith(compiling)
    for settings in (SETTINGS, longer):
        assert engine.models.backends()["transformer"] == "torch.compile"
        seen.clear()
        frames(engine, tmp_path, settings)
        assert seen and not [status for status in seen if status.startswith(compiling)]
    assert engine.models.backends()["transformer"] == "torch.compile"


def test_a_graph_compiled_before_is_said_to_load_from_the_cache(tiny_root, tmp_path, monkeypatch):
    """The compiled-code folder lists the graphs compiled there: a later process's status says it loads their code
    instead of compiling (Inductor finds it in the same folder)."""
    seen = statuses_at_each_compiled_call(monkeypatch, lambda: engine.models.backends()["transformer"])
    for expected in ("compiling with torch.compile (new input shapes)... ",
                     "loading torch.compile's code from the cache (compiled before here)... "):  # fmt: skip
        engine = tiny_engine(tiny_root, "eager")
        engine.models.compiled = CompiledBlocks("compile", code=tmp_path / COMPILED_CODE_DIR)
        engine.models.compiled.install(engine.models.components.transformer)
        seen.clear()
        frames(engine, tmp_path)
        assert seen[0].startswith(expected) and engine.models.backends()["transformer"] == "torch.compile"


def test_the_compiled_blocks_read_the_weights_as_they_are_now(tiny_root, tmp_path):
    """A LoRA is fused in place: compiled code that froze the weights would give the old output."""
    engine = tiny_engine(tiny_root, "compile")
    before = frames(engine, tmp_path)
    reference = tiny_engine(tiny_root, "eager")
    for block in (blocks(engine)[0], blocks(reference)[0]):
        with torch.no_grad():
            block.ff.net[2].weight.mul_(3.0)
    changed, expected = frames(engine, tmp_path), frames(reference, tmp_path)
    assert np.abs(changed.astype(int) - before.astype(int)).max() > 20
    assert np.abs(changed.astype(int) - expected.astype(int)).max() <= 2


def test_auto_measures_once_remembers_and_a_later_process_that_found_eager_faster_does_not_compile(
    tiny_root, tmp_path, monkeypatch
):
    speeds = SpeedRecords(tmp_path / "engines" / SPEED_RECORDS_FILE)
    engine = tiny_engine(tiny_root, "eager")
    engine.models.compiled = CompiledBlocks("auto", speeds)
    engine.models.compiled.install(engine.models.components.transformer)
    frames(engine, tmp_path)
    records = [json.loads(line) for line in speeds.path.read_text().splitlines()]
    shapes = {(r["key"]["block"].rsplit(".", 1)[1], tuple(r["key"]["shape"])) for r in records}
    assert {block for block, _ in shapes} == {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"}
    assert len(records) == len(shapes)  # measured once per block class and shape, not once per block or step
    assert all(r["key"]["candidate"] == "torch.compile" and r["relative_error"] < 0.02 for r in records)
    assert "torch.compile measured" in engine.models.backends()["transformer"]

    slower = [{**r, "candidate_s": r["baseline_s"] * 2} for r in records]
    speeds.path.write_text("".join(json.dumps(r) + "\n" for r in [*records, *slower]))
    monkeypatch.setattr(compiled_blocks.torch, "compile", lambda *a, **k: pytest.fail("compiled though eager won"))
    later = tiny_engine(tiny_root, "eager")
    later.models.compiled = CompiledBlocks("auto", speeds)
    later.models.compiled.install(later.models.components.transformer)
    frames(later, tmp_path)
    assert later.models.backends()["transformer"].startswith("PyTorch (torch.compile measured 0.50x")
    assert speeds.path.read_text().count("\n") == 2 * len(records)  # nothing measured again


def test_a_compile_that_is_wrong_or_fails_leaves_the_eager_video_with_one_warning(
    tiny_root, tmp_path, monkeypatch, caplog
):
    expected = frames(tiny_engine(tiny_root, "eager"), tmp_path)

    def doubling(function, **options):
        return lambda *args, **kwargs: tuple(2 * t for t in function(*args, **kwargs))

    def failing(function, **options):
        def run(*args, **kwargs):
            raise RuntimeError("Cannot find a working triton installation\nmore detail")

        return run

    for stand_in, reason in ((doubling, "output differs from PyTorch's by 100.0%"), (failing, "RuntimeError: Cannot")):
        monkeypatch.setattr(compiled_blocks.torch, "compile", stand_in)
        caplog.clear()
        engine = tiny_engine(tiny_root, "compile")
        assert np.array_equal(frames(engine, tmp_path), expected)
        assert reason in engine.models.backends()["transformer"]
        assert engine.models.backends()["transformer"].startswith("PyTorch (torch.compile failed:")
        warnings = [r for r in caplog.records if "torch.compile cannot serve" in r.getMessage()]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_a_prompt_of_another_length_runs_the_compiled_graph_and_a_new_latent_shape_past_the_limit_is_a_failure(
    tiny_root, tmp_path, monkeypatch
):
    """The text's length is dynamic: with one graph allowed per block class, a longer prompt still runs compiled.
    Past its limit torch.compile would run a block eagerly without a word, which looks like compiled speed."""
    longer = dataclasses.replace(SETTINGS, prompt="a cat walks slowly across a sunny garden towards the camera")
    bigger = dataclasses.replace(SETTINGS, resolution=192)
    eager = tiny_engine(tiny_root, "eager")
    expected_longer, expected_bigger = frames(eager, tmp_path, longer), frames(eager, tmp_path, bigger)
    torch._dynamo.reset()  # the compiled code of the other tests counts towards the limit
    monkeypatch.setattr(compiled_blocks, "RECOMPILE_LIMIT", 1)
    engine = tiny_engine(tiny_root, "compile")
    frames(engine, tmp_path)
    video = frames(engine, tmp_path, longer)
    assert engine.models.backends()["transformer"] == "torch.compile"
    assert np.abs(video.astype(int) - expected_longer.astype(int)).max() <= 2
    video = frames(engine, tmp_path, bigger)  # another latent shape: a second graph per block class
    torch._dynamo.reset()
    assert video.shape[1:3] != expected_longer.shape[1:3]
    assert np.abs(video.astype(int) - expected_bigger.astype(int)).max() <= 2
    described = engine.models.backends()["transformer"]
    assert described.startswith("PyTorch (torch.compile failed: FailOnRecompileLimitHit"), described


def test_auto_compiles_nothing_on_the_cpu(tiny_root):
    plan = plan_memory("cpu")
    for backend in ("auto", "eager"):
        models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(backend=backend))
        assert models.compiled is None and models.backends()["transformer"] == "PyTorch"
        assert not any(COMPILE_HOOK in b._diffusers_hook.hooks for b in blocks(FramePackEngine(models)))
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(backend="compile"))
    assert models.backends()["transformer"] == "torch.compile (checked on first use)"
    with pytest.raises(InvalidSettings, match="backend must be one of auto, compile, eager"):
        ModelSettings(backend="inductor")
    assert ModelSettings(tensorrt=TensorRTOptions(True, False, True)).backend == "auto"


def test_under_the_tensorrt_stack_the_blocks_compile_wherever_the_stack_runs_in_pytorch(
    tiny_root, tmp_path, monkeypatch
):
    """`--tensorrt-transformer --backend compile`: the stack's engine is timed against the compiled blocks; where it
    loses (timed so here), the compiled blocks run the job, and the report says both."""
    from diffusers_helper.acceleration import speed_policy
    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime
    from tests.support.tensorrt_double import FakeBackend

    seconds = iter([1.0, 2.0] * TINY_STACK_ENGINES)  # each stretch: in PyTorch (compiled), then its engine: 0.5x

    def timed(function, runs=5, warmup=1):
        function()
        return next(seconds)

    monkeypatch.setattr(speed_policy, "median_seconds", timed)
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), FakeBackend(), only_if_faster=True)
    plan = plan_memory("cpu")
    settings = ModelSettings(preset="tiny", backend="compile", tensorrt=TensorRTOptions(transformer=True))
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, settings, runtime)
    engine = FramePackEngine(models, write_video=FrameSink())
    assert not any(COMPILE_HOOK in block._diffusers_hook.hooks for block in blocks(engine))  # the stack calls them
    compiled = frames(engine, tmp_path)
    eager = frames(tiny_engine(tiny_root, "eager"), tmp_path)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 2
    report = models.backends()["transformer"]
    assert report.startswith("PyTorch (its engine measured 0.50x the speed of PyTorch (torch.compile)")
    assert report.endswith("; blocks: torch.compile")


@pytest.mark.subprocess
def test_a_fresh_process_loads_the_compiled_code_from_the_engine_cache(tmp_path):
    """Inductor's caches live in the engine cache directory, not the system's temporary one (cleared by a reboot):
    a second process compiles nothing and loads every graph the first one compiled."""
    environment = {key: value for key, value in os.environ.items() if key != "TORCHINDUCTOR_CACHE_DIR"}
    environment[CACHE_DIR_VARIABLE] = str(tmp_path / "cache")
    runs = []
    for _ in range(2):
        run = subprocess.run([sys.executable, "-m", "tests.support.compile_worker"], cwd=Path(__file__).parent.parent,
                             env=environment, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        runs.append(json.loads(run.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["misses"] > 0 and first["blocks"] == second["blocks"] == "torch.compile"
    assert second == {**first, "hits": first["misses"], "misses": 0}
    assert any((tmp_path / "cache" / COMPILED_CODE_DIR).rglob("*"))
