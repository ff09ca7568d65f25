"""The TensorRT runtime's own logic on the CPU, with a test double for Torch-TensorRT (tests/tensorrt_double.py).

What TensorRT itself does (engines that build, load and match PyTorch) is tested in tests/gpu.
"""

import gc
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_helper.acceleration.engine_cache import EngineCache, cache_key
from diffusers_helper.acceleration.tensorrt_backend import BuildProgress
from diffusers_helper.models.assembly import accelerate, assemble
from diffusers_helper.settings import InvalidSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import (
    CACHE_DIR_VARIABLE,
    TensorRTRuntime,
    default_cache_dir,
    weights_fingerprint,
)
from tests.tensorrt_double import FakeBackend
from tests.tensorrt_worker import seeded_mlp

REPO = Path(__file__).resolve().parent.parent
COMPONENT = "vae_decoder"


def make_runtime(tmp_path, **backend_options) -> tuple[TensorRTRuntime, FakeBackend]:
    backend = FakeBackend(**backend_options)
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), backend)
    runtime.register(COMPONENT)
    return runtime, backend


def call(runtime, module=None, shape=(2, 8)):
    module = module or seeded_mlp()
    return runtime.run(COMPONENT, module, (torch.ones(*shape),)), module(torch.ones(*shape))


def leftovers(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix not in (".engine", ".json", ".lock")
    )


# -- keys ----------------------------------------------------------------------------------------------------------

BASE = {"component": "transformer", "inputs": [[[1, 4400, 3072], "bfloat16"]], "weights": "abc", "settings": {"a": 1},
        "gpu": "NVIDIA H200", "compute_capability": "9.0", "versions": {"torch": "2.11", "torch_tensorrt": "2.11", "tensorrt": "1.4"}}  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"component": "vae_decoder"},
        {"inputs": [[[1, 4400, 3072], "float16"]]},
        {"inputs": [[[1, 4401, 3072], "bfloat16"]]},
        {"weights": "abd"},
        {"settings": {"a": 2}},
        {"gpu": "NVIDIA GeForce RTX 4090"},
        {"compute_capability": "8.9"},
        {"versions": {"torch": "2.12", "torch_tensorrt": "2.11", "tensorrt": "1.4"}},
        {"versions": {"torch": "2.11", "torch_tensorrt": "2.12", "tensorrt": "1.4"}},
        {"versions": {"torch": "2.11", "torch_tensorrt": "2.11", "tensorrt": "1.5"}},
    ],
)
def test_every_ingredient_changes_the_key(change):
    assert cache_key({**BASE, **change}) != cache_key(BASE)
    assert cache_key(dict(reversed(list(BASE.items())))) == cache_key(BASE)  # order does not matter


def test_runtime_key_follows_shapes_dtypes_weights_and_versions(tmp_path):
    runtime, backend = make_runtime(tmp_path)
    module = seeded_mlp()
    key = runtime._key(COMPONENT, module, (torch.ones(2, 8),))[0]
    assert runtime._key(COMPONENT, module, (torch.ones(3, 8),))[0] != key
    assert runtime._key(COMPONENT, module, (torch.ones(2, 8, dtype=torch.float64),))[0] != key
    backend.version = "fake-2"
    assert runtime._key(COMPONENT, module, (torch.ones(2, 8),))[0] != key
    other = seeded_mlp()
    with torch.no_grad():
        other[0].weight.add_(0.01)
    assert weights_fingerprint(other) != weights_fingerprint(seeded_mlp())


def test_cache_dir_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_DIR_VARIABLE, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(CACHE_DIR_VARIABLE)
    assert default_cache_dir().parts[-2:] == ("Cache", "tensorrt_engines")


class Doubling(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale * 2


class Tripling(Doubling):
    def forward(self, x):
        return x * self.scale * 3


def test_the_code_that_is_exported_and_the_library_versions_are_in_the_key(tmp_path):
    runtime, _ = make_runtime(tmp_path)
    args = (torch.ones(2, 8),)
    doubling_key, ingredients, _ = runtime._key(COMPONENT, Doubling(), args)
    tripling_key = runtime._key(COMPONENT, Tripling(), args)[0]
    assert doubling_key != tripling_key  # same weights, other code
    assert {"diffusers", "transformers", "torch", "torch_tensorrt"} <= set(ingredients["versions"])


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
    del first, other
    gc.collect()
    assert len(runtime._engines) == 0  # the engines went with their models
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


def test_a_second_process_loads_from_disk_without_compiling(tmp_path):
    worker = [sys.executable, "-m", "tests.tensorrt_worker", str(tmp_path / "engines")]
    first = json.loads(subprocess.run(worker, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    second = json.loads(subprocess.run(worker, cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert (first["compiles"], first["loads"]) == (1, 0)
    assert (second["compiles"], second["loads"]) == (0, 1)
    assert first["sum"] == second["sum"] and second["engine"] == "tensorrt"


def test_concurrent_builders_compile_once(tmp_path):
    worker = [sys.executable, "-m", "tests.tensorrt_worker", str(tmp_path / "engines"), "2.0"]
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
    actual, expected = runtime.run(COMPONENT, seeded_mlp(), (torch.ones(2, 8),)), seeded_mlp()(torch.ones(2, 8))
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


# -- options and incompatibilities ---------------------------------------------------------------------------------


def test_flags_that_need_enable_tensorrt():
    with pytest.raises(InvalidSettings, match="--tensorrt-transformer needs --enable-tensorrt"):
        TensorRTOptions.from_flags(False, False, True)
    with pytest.raises(
        InvalidSettings, match="--tensorrt-text-encoders and --tensorrt-transformer need --enable-tensorrt"
    ):
        TensorRTOptions.from_flags(False, True, True)
    assert TensorRTOptions.from_flags(True, True, True) == TensorRTOptions(
        vae=True, text_encoders=True, transformer=True
    )
    assert TensorRTOptions(transformer=True).enabled  # the components themselves are independent
    with pytest.raises(InvalidSettings, match="--tensorrt-always needs --enable-tensorrt"):
        TensorRTOptions.from_flags(False, False, False, always=True)


@pytest.mark.parametrize("flags, only_if_faster", [([], None), (["--enable-tensorrt"], True),
                                                   (["--enable-tensorrt", "--tensorrt-always"], False)])  # fmt: skip
def test_the_app_and_cli_runtime_serves_only_faster_engines_unless_told_always(flags, only_if_faster):
    import argparse

    from diffusers_helper.frontend.startup import add_model_arguments, model_settings, runtime_for

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    runtime = runtime_for(model_settings(parser.parse_args(flags)))
    assert (runtime and runtime.only_if_faster) == only_if_faster


@pytest.mark.parametrize("setup", ["offload", "bitsandbytes"])
def test_incompatible_setups_keep_the_transformer_in_pytorch(tmp_path, caplog, tiny_root, setup):
    from diffusers_helper.models.components import load_components

    runtime, _ = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, {})
    if setup == "bitsandbytes":
        components.transformer.hf_quantizer = object()
    with caplog.at_level(logging.WARNING):
        accelerate(components, TensorRTOptions(vae=True, transformer=True), runtime, offloading=setup == "offload")
    assert ("CPU offload" if setup == "offload" else "BitsAndBytes") in caplog.text
    assert not hasattr(components.transformer.transformer_blocks[0], "_diffusers_hook")
    assert runtime.status["transformer"].engine == "pytorch"
    assert type(components.vae.decoder).__name__ == "TensorRTLatentDecoder"  # the VAE is still accelerated


# -- the wrappers in a whole generation ----------------------------------------------------------------------------


@pytest.mark.parametrize("step_cache", ["teacache", "magcache"])
def test_tiny_generation_with_every_wrapper_matches_pytorch(tmp_path, tiny_root, engines, step_cache):
    """All five wrappers drop in (the double's engines compute exactly what PyTorch does): same video, and
    every component reports TensorRT. The step cache wraps the compiled stack and skips the same steps."""
    import numpy as np

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.pipeline.events import Finished
    from diffusers_helper.settings import GenerationSettings
    from tests.conftest import FrameSink

    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, resolution=128, steps=8, step_cache=step_cache)
    plan = plan_memory("cpu")
    runtime, _ = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, plan.dtypes())
    everything = TensorRTOptions(vae=True, text_encoders=True, transformer=True)
    models = assemble(components, plan, ModelSettings(preset="tiny", tensorrt=everything), runtime)
    accelerated, plain = FrameSink(), FrameSink()
    events = list(
        FramePackEngine(models, write_video=accelerated).generate(
            example_image(256, 256), settings, JobPaths.for_video(tmp_path / "trt.mp4")
        )
    )
    assert isinstance(events[-1], Finished), events[-1]
    cache = getattr(models, step_cache)
    counts = (cache.computed, cache.skipped)
    reference = engines["framepack"]
    reference.write_video, original = plain, reference.write_video
    try:
        list(reference.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "pt.mp4")))
    finally:
        reference.write_video = original
    assert np.abs(accelerated.last.astype(int) - plain.last.astype(int)).max() <= 1
    reference_cache = getattr(reference, step_cache)
    assert counts == (reference_cache.computed, reference_cache.skipped) and counts[1] > 0
    assert {c: s.engine for c, s in runtime.status.items()} == {
        "vae_encoder": "tensorrt", "vae_decoder": "tensorrt", "text_encoder": "tensorrt",
        "text_encoder_2": "tensorrt", "transformer": "tensorrt",
    }  # fmt: skip
    compiles = {component: status.compiles for component, status in runtime.status.items()}
    # the VAE decodes in temporal chunks (diffusers' frame-wise decoding): one engine per chunk shape
    assert compiles == {"vae_encoder": 1, "vae_decoder": 3, "text_encoder": 1, "text_encoder_2": 1, "transformer": 1}


# -- one engine for every prompt; one copy of the weights ----------------------------------------------------------


def test_prompts_of_several_lengths_the_negative_prompt_and_two_buckets_share_one_transformer_engine(
    tmp_path, tiny_root, engines
):
    import numpy as np

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.settings import GenerationSettings
    from tests.conftest import FrameSink

    plan = plan_memory("cpu")
    runtime, _ = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, plan.dtypes())
    models = assemble(
        components, plan, ModelSettings(preset="tiny", tensorrt=TensorRTOptions(transformer=True)), runtime
    )
    jobs = [
        GenerationSettings(prompt="a cat", seconds=1.0, resolution=128, steps=2, step_cache="off"),
        GenerationSettings(prompt="a small grey cat walks slowly across a sunny garden path", seconds=1.0,
                           resolution=128, steps=2, step_cache="off", cfg=3.0, negative_prompt="blurry, dark"),
    ]  # fmt: skip
    images = [example_image(256, 256), example_image(384, 192)]  # the 128x128 and 96x176 buckets
    reference = engines["framepack"]
    for index, (settings, image) in enumerate(zip(jobs, images, strict=True)):
        accelerated, plain = FrameSink(), FrameSink()
        paths = JobPaths.for_video(tmp_path / f"trt{index}.mp4")
        list(FramePackEngine(models, write_video=accelerated).generate(image, settings, paths))
        reference.write_video, original = plain, reference.write_video
        try:
            list(reference.generate(image, settings, JobPaths.for_video(tmp_path / f"pt{index}.mp4")))
        finally:
            reference.write_video = original
        assert accelerated.last.shape == plain.last.shape
        assert np.abs(accelerated.last.astype(int) - plain.last.astype(int)).max() <= 1
    assert (runtime.status["transformer"].compiles, runtime.status["transformer"].engines) == (1, 1)


class _Moves:
    """Records where the runtime sends a module's weights (the CPU suite has one device, so nothing really moves)."""

    def __init__(self) -> None:
        self.log: list[tuple[torch.nn.Module, str]] = []

    def __call__(self, module, device) -> None:
        self.log.append((module, torch.device(device).type))


def test_the_pytorch_copy_leaves_the_device_once_the_engine_passes_and_returns_for_a_fallback(tmp_path, monkeypatch):
    import diffusers_helper.tensorrt_runtime as runtime_module

    moves = _Moves()
    monkeypatch.setattr(runtime_module, "_move", moves)
    runtime, backend = make_runtime(tmp_path)
    runtime.host = torch.device("meta")  # stands for the CPU, the tensors' own device for the GPU
    module = seeded_mlp()
    kept = module[0]
    runtime.register(COMPONENT, keep_on_device=(kept,))
    call(runtime, module)
    assert moves.log == [(module, "meta"), (kept, "cpu")]  # after the check, never before
    assert "PyTorch weights on the CPU" in runtime.status[COMPONENT].describe()
    call(runtime, module)
    assert len(moves.log) == 2  # served by the engine: nothing moves
    backend.fail = "run"
    runtime._engines[module] = {
        sig: backend.compile(module, (torch.ones(2, 8),), {}, BuildProgress()) for sig in runtime._engines[module]
    }
    actual, expected = call(runtime, module)
    assert torch.equal(actual, expected)
    assert moves.log[-1] == (module, "cpu") and module not in runtime._engines  # weights back, engines gone
    assert runtime.status[COMPONENT].engine == "pytorch" and not runtime.status[COMPONENT].pytorch_weights_on_cpu


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


def test_a_cancel_stops_the_real_backend_writing_an_engine_file(tmp_path):
    from diffusers_helper.acceleration.tensorrt_backend import BuildCancelled, TorchTensorRTBackend

    checks = []

    def cancelled() -> bool:  # from the second write on
        checks.append(True)
        return len(checks) > 1

    progress = BuildProgress(cancelled)
    path = tmp_path / "engine.engine"
    with pytest.raises(BuildCancelled):
        TorchTensorRTBackend().save(torch.nn.Linear(512, 512), (), path, progress)
    assert len(checks) == 2 and path.stat().st_size < 512 * 512 * 4  # stopped part of the way through


def test_saving_an_engine_file_says_how_much_is_written(tmp_path):
    from diffusers_helper.acceleration.tensorrt_backend import TorchTensorRTBackend

    progress = BuildProgress()
    path = tmp_path / "engine.engine"
    TorchTensorRTBackend().save(torch.nn.Linear(1024, 1024), (), path, progress)
    assert progress.bytes_saved == path.stat().st_size
    assert progress.describe() == "saving the engine to the cache: 4 MB"
    progress.bytes_saved, progress.bytes_to_save = 12_345_000_000, 23_600_000_000
    assert progress.describe() == "saving the engine to the cache: 12.3 GB of about 23.6 GB"


def test_a_build_expects_one_engine_per_stretch_between_the_attention_left_to_pytorch():
    from diffusers_helper.acceleration.tensorrt_backend import ATTENTION_OPS, _aten_op, _pytorch_stretches, export

    class TwoAttentions(torch.nn.Module):
        def forward(self, q, mask):
            attention = torch.nn.functional.scaled_dot_product_attention
            first = attention(q, q, q)
            return attention(first * 2, first, first, attn_mask=mask) + 1  # masked: routed to the kept-keys op

    mask = torch.zeros(1, 1, 1, 8)
    mask[..., 6:] = float("-inf")
    exported = export(TwoAttentions(), (torch.randn(1, 2, 8, 4), mask))
    assert _pytorch_stretches(exported, {op for name in ATTENTION_OPS if (op := _aten_op(name))}) == 3


def test_the_real_backend_round_trips_what_is_not_a_tensorrt_engine(tmp_path):
    """Engine files carry TensorRT engines raw (GPU tests check those); everything around them pickles as usual."""
    from diffusers_helper.acceleration.tensorrt_backend import TorchTensorRTBackend

    module = seeded_mlp()
    TorchTensorRTBackend().save(module, (), tmp_path / "engine.engine")
    loaded = TorchTensorRTBackend().load(tmp_path / "engine.engine")
    assert torch.equal(loaded(torch.ones(2, 8)), module(torch.ones(2, 8)))


def test_stopping_a_job_during_an_engine_build_ends_the_build_and_the_job(tmp_path, tiny_root):
    """End pressed while the transformer's engine builds: the build gives up, the job ends as stopped without waiting
    for it, and the next job builds the engine."""
    import threading

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.pipeline.events import Finished
    from diffusers_helper.settings import GenerationSettings
    from tests.conftest import FrameSink

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
    assert backend.compiled == 1 and runtime.status["transformer"].engine == "tensorrt"


# -- new weights: refit, never a stale engine ---------------------------------------------------------------------


def refittable_runtime(tmp_path, monkeypatch, **backend_options):
    from diffusers_helper.acceleration import tensorrt_backend

    monkeypatch.setitem(tensorrt_backend.COMPONENT_SETTINGS, COMPONENT, {"immutable_weights": False})
    return make_runtime(tmp_path, **backend_options)


@pytest.mark.parametrize("edit", ["in place", "new tensor", "through .data"])
def test_changed_weights_are_refitted_into_the_engine_not_rebuilt(tmp_path, monkeypatch, edit):
    runtime, backend = refittable_runtime(tmp_path, monkeypatch)
    module = seeded_mlp()
    call(runtime, module)
    with torch.no_grad():  # a LoRA fused into the weights, or an edit made behind the runtime's back
        if edit == "in place":
            module[0].weight.add_(0.5)
        elif edit == "new tensor":
            module[0].weight.data = module[0].weight.data + 0.5
        else:  # no version counter sees this one
            module[0].weight.data.add_(0.5)
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


def test_a_built_engine_keeps_no_serialized_copy_beside_its_live_engine():
    """Torch-TensorRT's engine modules keep their serialized bytes after set-up (a second copy of the weights in RAM);
    only a module whose engine is live gives them up."""
    from diffusers_helper.acceleration.tensorrt_backend import drop_host_copies

    live, pending = torch.nn.Module(), torch.nn.Module()
    live.engine, live.serialized_engine = object(), b"engine bytes"
    pending.engine, pending.serialized_engine = None, b"engine bytes"  # not set up: the bytes are all there is
    compiled = torch.nn.Sequential(live, pending)
    drop_host_copies(compiled)
    assert live.serialized_engine is None and pending.serialized_engine == b"engine bytes"


class _EngineModule(torch.nn.Module):
    """What a compiled submodule looks like to the save: a live engine (here a picklable stand-in) and its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.engine, self.serialized_engine = torch.nn.Linear(4, 4), b"x" * 4096

    def forward(self, x):
        return self.engine(x)


def test_an_engine_file_is_the_compiled_module_pickled_without_its_serialized_copies(tmp_path):
    from diffusers_helper.acceleration.tensorrt_backend import TorchTensorRTBackend

    class EnginesAsLeaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, _EngineModule) or super().is_leaf_module(module, name)

    root = torch.nn.Sequential(_EngineModule(), torch.nn.ReLU())
    compiled = torch.fx.GraphModule(root, EnginesAsLeaves().trace(root))  # engines as submodules, as in Torch-TensorRT
    x = torch.randn(2, 4)
    expected = compiled(x)
    backend = TorchTensorRTBackend()
    backend.save(compiled, (x,), tmp_path / "engine.engine")
    loaded = backend.load(tmp_path / "engine.engine")
    assert torch.equal(loaded(x), expected)
    assert loaded.get_submodule("0").serialized_engine is None  # the live engine is what was written
    assert (tmp_path / "engine.engine").stat().st_size < 4096


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
        backend.load = lambda path: seen.append(later.status[COMPONENT].describe()) or load(path)  # noqa: B023
        call(later)
    [record] = later.cache.describe()
    assert "of about" not in seen[0] and re.fullmatch(
        r"loading engine from the cache\.\.\. \d+s of about \d+s", seen[1]
    )
    assert record["load_seconds"] >= 0


# -- an engine serves only where it is faster ------------------------------------------------------------------


class _Timings:
    """Stands in for the runtime's timer: runs the call once, and says it took the next of the given seconds
    (PyTorch is timed first, then the engine). No seconds left: a timing that should not have happened."""

    def __init__(self, *seconds: float) -> None:
        self.seconds = list(seconds)

    def __call__(self, function, runs=5, warmup=1) -> float:
        function()
        return self.seconds.pop(0)


@pytest.mark.parametrize("speedup, served_by", [(0.99, "pytorch"), (1.5, "tensorrt")])
def test_an_engine_serves_only_where_it_is_faster_than_pytorch_measured_once(tmp_path, monkeypatch, speedup, served_by):
    import diffusers_helper.tensorrt_runtime as runtime_module

    monkeypatch.setattr(runtime_module, "median_seconds", _Timings(1.0, 1.0 / speedup))
    cache = EngineCache(tmp_path / "engines")
    runtime = TensorRTRuntime(cache, FakeBackend(), only_if_faster=True)
    runtime.register(COMPONENT)
    module = seeded_mlp()
    for _ in range(2):  # the second call is served without timing again
        actual, expected = call(runtime, module)
        assert torch.allclose(actual, expected)
    status = runtime.status[COMPONENT]
    assert (status.engine, status.compiles) == (served_by, 1)
    if served_by == "pytorch":
        assert "0.99x the speed of PyTorch (eager)" in status.describe() and module not in runtime._parked
    [record] = cache.describe()
    assert record["speedups"]["eager"]["speedup"] == pytest.approx(speedup, abs=1e-3)

    # A later process trusts the record: no timing; an engine that lost is not even loaded.
    later = TensorRTRuntime(cache, FakeBackend(), only_if_faster=True)
    later.register(COMPONENT)
    call(later, seeded_mlp())
    status = later.status[COMPONENT]
    if served_by == "pytorch":  # by the record, not by a failure (a timing here would be one)
        assert status.loads == 0 and status.reason.startswith("its engine measured 0.99x")
    else:
        assert (status.engine, status.loads) == ("tensorrt", 1)
    # Told to use every engine that matches PyTorch, it loads the one that lost too.
    always = TensorRTRuntime(cache, FakeBackend())
    always.register(COMPONENT)
    call(always, seeded_mlp())
    assert (always.status[COMPONENT].engine, always.status[COMPONENT].loads) == ("tensorrt", 1)


@pytest.mark.parametrize("speedup, builds", [(0.99, 1), (1.5, 2)])
def test_a_new_shape_is_not_built_where_the_components_engines_lose_on_this_gpu(tmp_path, monkeypatch, speedup, builds):
    """A full-size build takes minutes: an engine of the component that measured slower than PyTorch for one shape
    means no build for the next shape, in this process and in a later one; a faster one means the next is built."""
    import diffusers_helper.tensorrt_runtime as runtime_module

    monkeypatch.setattr(runtime_module, "median_seconds", _Timings(1.0, 1.0 / speedup, 1.0, 1.0 / speedup))
    cache = EngineCache(tmp_path / "engines")
    backend = FakeBackend()
    runtime = TensorRTRuntime(cache, backend, only_if_faster=True)
    runtime.register(COMPONENT)
    module = seeded_mlp()
    call(runtime, module)
    actual, expected = call(runtime, module, shape=(3, 8))
    assert torch.allclose(actual, expected) and backend.compiled == builds
    if builds == 1:
        assert runtime.status[COMPONENT].reason.startswith("an engine of it for another input shape measured 0.99x")
        later = TensorRTRuntime(cache, FakeBackend(), only_if_faster=True)
        later.register(COMPONENT)
        call(later, seeded_mlp(), shape=(4, 8))
        assert later.backend.compiled == 0 and later.status[COMPONENT].engine == "pytorch"
        always = TensorRTRuntime(cache, FakeBackend())  # --tensorrt-always: every engine that matches is built
        always.register(COMPONENT)
        call(always, seeded_mlp(), shape=(4, 8))
        assert always.backend.compiled == 1 and always.status[COMPONENT].engine == "tensorrt"


def test_a_speed_that_cannot_be_kept_costs_a_warning_not_the_engine(tmp_path, monkeypatch, caplog):
    import diffusers_helper.tensorrt_runtime as runtime_module

    monkeypatch.setattr(runtime_module, "median_seconds", _Timings(1.0, 0.5))

    def unwritable(key, fields):
        raise PermissionError("read-only")

    runtime, _ = make_runtime(tmp_path)
    runtime.only_if_faster = True
    monkeypatch.setattr(runtime.cache, "annotate", unwritable)
    with caplog.at_level(logging.WARNING):
        call(runtime)
    assert runtime.status[COMPONENT].engine == "tensorrt"
    assert "could not keep the engine's speed" in caplog.text


def test_the_transformer_runs_its_prompt_unpadded_when_it_runs_in_pytorch(tmp_path):
    """Padding is for the engine: in PyTorch the text goes in as it is, without a mask (the fastest attention), and
    the engine was timed against that."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.tensorrt_runtime import TensorRTTransformer

    torch.manual_seed(0)
    transformer = HunyuanVideoFramepackTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                          num_single_layers=1, has_image_proj=True,
                                                          has_clean_x_embedder=True).eval()  # fmt: skip
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), FakeBackend(fail="export"))
    wrapper = TensorRTTransformer(transformer, runtime)
    seen = []
    wrapper.stack.register_forward_pre_hook(lambda module, args: seen.append((args[1].shape[1], len(args))))
    hidden, text, temb = torch.randn(1, 16, 16), torch.randn(1, 5, 16), torch.randn(1, 16)
    rope = (torch.randn(16, 8), torch.randn(16, 8))
    with torch.no_grad():
        output = wrapper(hidden, text, temb, None, rope)
        expected = wrapper.stack(hidden, text, temb, *rope)
    assert runtime.status["transformer"].reason.startswith("fell back")
    assert seen[-2] == (5, 5)  # the fallback's own call: 5 text tokens, no mask
    assert torch.equal(output[0], expected[0]) and output[1].shape == text.shape
