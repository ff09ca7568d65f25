"""The five drop-in wrappers in whole tiny generations on the CPU (engines from the Torch-TensorRT double compute what
PyTorch does): the same video, one transformer engine for every prompt and bucket, and PyTorch's path unpadded."""

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import TensorRTTransformer
from tests.support.frame_sink import FrameSink
from tests.support.runtimes import make_runtime

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
    assert compiles == {"vae_encoder": 1, "vae_decoder": 3, "text_encoder": 1, "text_encoder_2": 1, "transformer": 1}


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
    assert (runtime.status["transformer"].compiles, runtime.status["transformer"].engines) == (1, 1)


def test_the_transformer_runs_its_prompt_unpadded_when_it_runs_in_pytorch(tmp_path):
    """Padding is for the engine: in PyTorch the text goes in as it is, without a mask (the fastest attention), and
    the engine was timed against that."""
    torch.manual_seed(0)
    transformer = HunyuanVideoFramepackTransformer3DModel(num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                                          num_single_layers=1, has_image_proj=True,
                                                          has_clean_x_embedder=True).eval()  # fmt: skip
    runtime, _ = make_runtime(tmp_path, fail="export")
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
