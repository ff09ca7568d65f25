"""Engines ahead of time (engines.py, frontend/prebuild.py) with the Torch-TensorRT test double on the CPU."""

import pytest

import engines
from diffusers_helper.acceleration import measure, speed_policy, tensorrt_wrappers
from diffusers_helper.acceleration.engine_cache import CACHE_DIR_VARIABLE, EngineCache
from diffusers_helper.frontend.prebuild import parse_bucket, plan_items, prebuild
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.settings import InvalidSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import TensorRTRuntime
from tests.support.runtimes import TINY_STACK_ENGINES
from tests.support.tensorrt_double import FakeBackend

BUCKETS = [(128, 128), (112, 144)]


def run_prebuild(tiny_root, cache_dir, lines, only_if_faster=False):
    runtime = TensorRTRuntime(EngineCache(cache_dir), FakeBackend(), only_if_faster=only_if_faster)
    models = ModelSettings(preset="tiny", tensorrt=TensorRTOptions(transformer=True))
    plan = plan_memory("cpu")

    def load(settings):
        components = load_components(settings.variant, tiny_root, plan.dtypes())
        return FramePackEngine(assemble(components, plan, settings, runtime))

    items = plan_items(["framepack"], BUCKETS, [2], resolution=128)
    return list(prebuild(models, items, 128, load, lines.append)), runtime


def test_prebuild_builds_each_shape_once_and_a_second_run_only_loads(tmp_path, tiny_root):
    lines = []
    records, _ = run_prebuild(tiny_root, tmp_path / "engines", lines)
    # the two buckets' latent token counts pad to the same length: one transformer engine serves both
    assert [r["compiled"] for r in records] == [{"transformer": TINY_STACK_ENGINES}, {}]
    assert any("[1/2] framepack 128x128 window 2" in line for line in lines)
    assert any("min left" in line for line in lines)  # an estimate once a build has been timed
    again, _ = run_prebuild(tiny_root, tmp_path / "engines", [])
    assert [r["compiled"] for r in again] == [{}, {}]
    assert [r["loaded"] for r in again] == [{"transformer": TINY_STACK_ENGINES}, {}]


def test_each_item_says_the_peak_gpu_memory_its_builds_used(tmp_path, tiny_root, monkeypatch):
    """The driver's count, sampled while the item runs (TensorRT's builder allocates outside PyTorch): its highest."""
    readings = iter(range(1, 10**6))
    monkeypatch.setattr(measure, "gpu_memory_in_use", lambda: next(readings) * 2**30)
    lines = []
    records, _ = run_prebuild(tiny_root, tmp_path / "engines", lines)
    first, second = records[0]["peak_gpu_gb"], records[1]["peak_gpu_gb"]
    assert 2 <= first < second  # sampled at the start, the end and between: each item's highest reading
    assert f"peak GPU memory {first:.1f} GB" in next(
        line for line in lines if line.startswith("[1/2]") and "s, " in line
    )


def test_where_the_engine_loses_to_pytorch_the_next_shapes_are_not_built_and_each_item_says_why(
    tmp_path, tiny_root, monkeypatch
):
    monkeypatch.setattr(tensorrt_wrappers, "STACK_LATENT_BUCKET", 1)  # one shape per bucket
    timings = iter([0.5, 1.0] * TINY_STACK_ENGINES)  # each stretch: PyTorch, then its engine: 0.5x
    monkeypatch.setattr(speed_policy, "median_seconds", lambda function, runs: (function(), next(timings))[1])
    lines = []
    records, _ = run_prebuild(tiny_root, tmp_path / "engines", lines, only_if_faster=True)
    assert [r["compiled"] for r in records] == [{"transformer": TINY_STACK_ENGINES}, {}]
    done = [line for line in lines if line.startswith("[") and "s, " in line]
    assert "built transformer; transformer in PyTorch (its engine measured 0.50x" in done[0]
    assert "transformer in PyTorch (an engine of it for another input shape measured 0.50x" in done[1]


def test_bucket_and_plan_errors_are_one_line():
    assert parse_bucket("544x704") == (544, 704)
    for bad in ("544", "544x70", "axb", "16x16"):
        with pytest.raises(InvalidSettings, match="bucket"):
            parse_bucket(bad)
    with pytest.raises(InvalidSettings, match="latent_window"):
        plan_items(["framepack"], None, [40], 640)
    assert len(plan_items(["framepack", "f1"], None, [9], 640)) == 28  # FramePack's 14 buckets, twice


def test_build_without_a_gpu_says_why_in_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "engines"))
    assert engines.main(["build", "--preset", "tiny", "--device", "cpu", "--buckets", "128x128"]) == 2
    assert capsys.readouterr().err.startswith("error: TensorRT cannot run here")
    with pytest.raises(SystemExit) as exit_code:
        engines.main(["prune"])  # one criterion is required
    assert exit_code.value.code == 2
