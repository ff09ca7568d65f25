"""The five drop-in wrappers in whole tiny generations on the CPU (engines from the Torch-TensorRT double compute what
PyTorch does): the same video, one transformer engine for every prompt and bucket, and PyTorch's path unpadded."""

import numpy as np
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
from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer
from tests.support.frame_sink import FrameSink
from tests.support.runtimes import TINY_STACK_ENGINES, leftovers, make_runtime
from tests.support.small_transformer import small_transformer, stack_inputs
from tests.support.tensorrt_double import FakeBackend

EVERYTHING = TensorRTOptions(vae=True, text_encoders=True, transformer=True)


def accelerated_engine(tmp_path, tiny_root, options: TensorRTOptions):
    plan = plan_memory("cpu")
    runtime, _ = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, plan.dtypes())
    models = assemble(components, plan, ModelSettings(preset="tiny", tensorrt=options), runtime)
    return FramePackEngine(models, write_video=FrameSink()), runtime


def reference_frames(engines, image, settings, tmp_path) -> np.ndarray:
    """The video PyTorch makes of the same job (the shared tiny engine, writing into memory)."""
    reference = engines["framepack"]
    sink, original = FrameSink(), reference.write_video
    reference.write_video = sink
    try:
        list(reference.generate(image, settings, JobPaths.new_job(tmp_path / "pytorch")))
    finally:
        reference.write_video = original
    return sink.last


@pytest.mark.parametrize("step_cache", ["teacache", "magcache"])
def test_tiny_generation_with_every_wrapper_matches_pytorch(tmp_path, tiny_root, engines, step_cache):
    """All five wrappers drop in: same video, and every component reports TensorRT. The step cache wraps the
    compiled stack and skips the same steps."""
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, resolution=128, steps=8, step_cache=step_cache)
    engine, runtime = accelerated_engine(tmp_path, tiny_root, EVERYTHING)
    events = list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "trt.mp4")))
    assert isinstance(events[-1], Finished), events[-1]
    cache = getattr(engine.models, step_cache)
    counts = (cache.computed, cache.skipped)
    plain = reference_frames(engines, example_image(256, 256), settings, tmp_path)
    assert np.abs(engine.write_video.last.astype(int) - plain.astype(int)).max() <= 1
    reference_cache = getattr(engines["framepack"], step_cache)
    assert counts == (reference_cache.computed, reference_cache.skipped) and counts[1] > 0
    assert {c: s.engine for c, s in runtime.status.items()} == {
        "vae_encoder": "tensorrt", "vae_decoder": "tensorrt", "text_encoder": "tensorrt",
        "text_encoder_2": "tensorrt", "transformer": "tensorrt",
    }  # fmt: skip
    compiles = {component: status.compiles for component, status in runtime.status.items()}
    # the VAE decodes in temporal chunks (diffusers' frame-wise decoding): one engine per chunk shape
    assert compiles == {
        "vae_encoder": 1,
        "vae_decoder": 3,
        "text_encoder": 1,
        "text_encoder_2": 1,
        "transformer": TINY_STACK_ENGINES,
    }


def test_prompts_of_several_lengths_the_negative_prompt_and_two_buckets_share_one_transformer_engine(
    tmp_path, tiny_root, engines
):
    engine, runtime = accelerated_engine(tmp_path, tiny_root, TensorRTOptions(transformer=True))
    jobs = [
        GenerationSettings(prompt="a cat", seconds=1.0, resolution=128, steps=2, step_cache="off"),
        GenerationSettings(prompt="a small grey cat walks slowly across a sunny garden path", seconds=1.0,
                           resolution=128, steps=2, step_cache="off", cfg=3.0, negative_prompt="blurry, dark"),
    ]  # fmt: skip
    images = [example_image(256, 256), example_image(384, 192)]  # the 128x128 and 96x176 buckets
    for index, (settings, image) in enumerate(zip(jobs, images, strict=True)):
        list(engine.generate(image, settings, JobPaths.for_video(tmp_path / f"trt{index}.mp4")))
        plain = reference_frames(engines, image, settings, tmp_path)
        assert engine.write_video.last.shape == plain.shape
        assert np.abs(engine.write_video.last.astype(int) - plain.astype(int)).max() <= 1
    status = runtime.status["transformer"]
    assert (status.compiles, status.engines) == (TINY_STACK_ENGINES, TINY_STACK_ENGINES)  # one set of engines


def test_the_transformer_runs_its_prompt_unpadded_when_it_runs_in_pytorch(tmp_path):
    """Padding is for the engine: in PyTorch the text goes in as it is, without a mask (the fastest attention), and
    the engine was timed against that."""
    transformer = small_transformer(dual_blocks=1, single_blocks=1)
    runtime, _ = make_runtime(tmp_path, fail="export")
    wrapper = TensorRTTransformer(transformer, runtime)
    seen = []
    wrapper.stretches[0].register_forward_pre_hook(lambda module, args: seen.append((args[1].shape[1], len(args))))
    hidden, text, temb, rope = stack_inputs(transformer)
    with torch.no_grad():
        output = wrapper(hidden, text, temb, None, rope)
        expected = wrapper.stack(hidden, text, temb, *rope)
    assert runtime.status["transformer"].reason.startswith("fell back")
    assert seen[-1] == (5, 5)  # the fallback's own call: 5 text tokens, no mask
    assert torch.equal(output[0], expected[0]) and output[1].shape == text.shape


def stretch_runtime(tmp_path, backend: FakeBackend | None = None) -> tuple[TensorRTRuntime, FakeBackend]:
    backend = backend or FakeBackend()
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), backend)
    return runtime, backend


def test_the_stack_runs_as_stretches_each_an_engine_of_its_own_in_the_cache(tmp_path):
    """Two dual and three single blocks in stretches of two: three engines, each keyed by its blocks, which together
    compute what the whole stack does; a new process finds all three and builds nothing."""
    transformer = small_transformer(dual_blocks=2, single_blocks=3)
    hidden, text, temb, rope = stack_inputs(transformer)
    runtime, backend = stretch_runtime(tmp_path)
    wrapper = TensorRTTransformer(transformer, runtime, stretch_blocks=2)
    with torch.no_grad():
        expected = wrapper.stack(hidden, text, temb, *rope)
        output = wrapper(hidden, text, temb, None, rope)
    for got, want in zip(output, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    status = runtime.status["transformer"]
    assert (backend.compiled, status.engines, status.engine) == (3, 3, "tensorrt")
    assert sorted(record["part"] for record in runtime.cache.describe()) == ["blocks 0-1", "blocks 2-3", "blocks 4-4"]
    again, backend = stretch_runtime(tmp_path)
    with torch.no_grad():
        TensorRTTransformer(transformer, again, stretch_blocks=2)(hidden, text, temb, None, rope)
    assert (backend.compiled, backend.loaded) == (0, 3)


class _KilledAfterOneBuild(FakeBackend):
    """The process dies (Ctrl-C, or the system's OOM killer, as far as the cache can tell) while building the second
    engine."""

    status = None  # what the runtime says while the build runs

    def on_engine_started(self, progress) -> None:
        if self.compiled == 1:
            self.status = self.runtime.status["transformer"].describe()
            raise KeyboardInterrupt


def test_a_build_killed_midway_resumes_from_the_stretches_already_cached(tmp_path):
    transformer = small_transformer(dual_blocks=1, single_blocks=2)
    hidden, text, temb, rope = stack_inputs(transformer)
    runtime, backend = stretch_runtime(tmp_path, _KilledAfterOneBuild())
    backend.runtime = runtime
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        TensorRTTransformer(transformer, runtime, stretch_blocks=1)(hidden, text, temb, None, rope)
    assert backend.status.startswith("compiling engine for blocks 1-1 (first run of this shape)")
    assert [record["part"] for record in runtime.cache.describe()] == ["blocks 0-0"]
    assert leftovers(runtime.cache.directory) == []  # no half-written engine
    again, backend = stretch_runtime(tmp_path)
    with torch.no_grad():
        TensorRTTransformer(transformer, again, stretch_blocks=1)(hidden, text, temb, None, rope)
    assert (backend.loaded, backend.compiled) == (1, 2)


def test_where_the_plan_streams_blocks_the_stack_takes_the_resident_ones_and_the_rest_run_in_pytorch(
    tmp_path, tiny_root, monkeypatch
):
    """The plan keeps the tiny transformer's first two blocks of four resident: the stack's engines run those two,
    the other two run as they are (streamed, on a GPU), and the blocks' loop computes what it does without engines."""
    from diffusers_helper.models import assembly
    from diffusers_helper.models.placement import GIB, MemoryPlan, Placement, tensor_bytes
    from diffusers_helper.models.transformer_blocks import transformer_blocks

    monkeypatch.setattr(assembly, "place_components", lambda components, plan: Placement())  # streaming needs CUDA
    components = load_components("framepack", tiny_root, plan_memory("cpu").dtypes())
    transformer = components.transformer
    blocks = transformer_blocks(transformer)

    def size(module):
        return sum(tensor_bytes(p) for p in module.parameters())

    resident = size(transformer) - sum(size(b) for b in blocks[2:]) + size(blocks[2]) // 2
    plan = MemoryPlan(torch.device("cpu"), torch.float32, torch.float32, True, resident / GIB, 0.0)
    hidden, text, temb = torch.randn(1, 16, 32), torch.randn(1, 5, 32), torch.randn(1, 32)
    rope = tuple(torch.randn(16, 16) for _ in range(2))
    with torch.no_grad():
        expected = hidden, text
        for block in blocks:
            expected = type(block).forward(block, *expected, temb, None, rope)
        runtime, backend = make_runtime(tmp_path)
        models = assemble(components, plan, ModelSettings(preset="tiny", tensorrt=TensorRTOptions(transformer=True)),
                          runtime)  # fmt: skip
        output = hidden, text
        for block in blocks:
            output = block(*output, temb, None, rope)
    assert models.engine_blocks == 2 and backend.compiled == 1
    for got, want in zip(output, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert "blocks 0-1 (resident), blocks 2-3 streamed in PyTorch (eager)" in models.backends()["transformer"]
