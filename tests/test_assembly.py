"""Assembly: the output head runs in float32 on a bf16 transformer, as FramePack runs it; the hooks nest in their
order; the TensorRT wrappers go where the setup allows them."""

import logging

import pytest
import torch

from diffusers_helper.models.assembly import accelerate, assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import MemoryPlan
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.pipeline.sections import InvertedAntiDrifting
from diffusers_helper.settings import ModelSettings, TensorRTOptions
from tests.support.runtimes import make_runtime


def test_the_output_head_runs_in_float32_on_a_bf16_transformer(tiny_root):
    plan = MemoryPlan(torch.device("cpu"), torch.bfloat16, torch.float32, False, 0.0, 6.0)
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(preset="tiny"))
    transformer = models.components.transformer
    assert transformer.dtype == torch.bfloat16 and transformer.proj_out.weight.dtype == torch.float32
    seen = {}
    transformer.norm_out.register_forward_hook(lambda module, args, output: seen.update(norm=output))
    generator = torch.Generator().manual_seed(0)
    order, start = InvertedAntiDrifting(), torch.randn(1, 16, 1, 16, 16, generator=generator)
    inputs = {
        "hidden_states": torch.randn(1, 16, 1, 16, 16, generator=generator).to(torch.bfloat16),
        "timestep": torch.tensor([500.0], dtype=torch.bfloat16),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator).to(torch.bfloat16),
        "encoder_attention_mask": torch.ones(1, 5),
        "pooled_projections": torch.randn(1, 32, generator=generator).to(torch.bfloat16),
        "image_embeds": torch.randn(1, 16, 32, generator=generator).to(torch.bfloat16),
        "guidance": torch.tensor([10000.0], dtype=torch.bfloat16),
        **order.layout(order.initial_history(start), start, order.plan(1)[0], window=1).transformer_kwargs(
            torch.bfloat16
        ),
    }
    with torch.no_grad():
        output = transformer(**inputs, return_dict=False)[0]
    assert seen["norm"].dtype == torch.bfloat16  # the norm stays in bf16, as in FramePack
    assert output.dtype == torch.float32
    head = transformer.proj_out
    expected = torch.nn.functional.linear(seen["norm"].float(), head.weight, head.bias)
    assert torch.equal(
        output.reshape(-1), expected.reshape(1, 1, 8, 8, -1, 1, 2, 2).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(-1)
    )


@pytest.mark.parametrize("step_cache", ["teacache", "magcache"])
def test_a_step_the_step_cache_skips_reaches_no_streamed_block(tiny_root, tmp_path, monkeypatch, step_cache):
    """Streaming hooks sit inside the step caches' (both installed, one switched on): stand-in streaming hooks (what
    placement registers on streamed blocks) count the block loads, and a skipped pass loads none."""
    from diffusers.hooks import HookRegistry, ModelHook

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models import assembly
    from diffusers_helper.models.placement import GROUP_OFFLOADING_HOOK, Placement, plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.settings import GenerationSettings

    loads = []

    class CountingStream(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            loads.append(module)
            return args, kwargs

    def stream_all_but_the_first_block(components, plan):
        transformer = components.transformer
        for block in transformer_blocks(transformer)[1:]:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(CountingStream(), GROUP_OFFLOADING_HOOK)
        return Placement()

    monkeypatch.setattr(assembly, "place_components", stream_all_but_the_first_block)
    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(preset="tiny"))
    engine = FramePackEngine(models, write_video=lambda *args: None)
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=20, resolution=128, step_cache=step_cache)
    list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "t.mp4")))
    streamed_blocks = 2 + 2 - 1  # the tiny transformer: 2 dual + 2 single blocks, the first resident
    cache = getattr(engine, step_cache)
    assert cache.skipped > 0 and cache.computed + cache.skipped == 20
    assert len(loads) == cache.computed * streamed_blocks


def test_an_incompatible_setup_keeps_the_transformer_in_pytorch(tmp_path, caplog, tiny_root):
    runtime, _ = make_runtime(tmp_path)
    components = load_components("framepack", tiny_root, {})
    components.transformer.hf_quantizer = object()
    plan = MemoryPlan(torch.device("cpu"), torch.float32, torch.float32, False, 80.0, 6.0)
    with caplog.at_level(logging.WARNING):
        accelerate(components, TensorRTOptions(vae=True, transformer=True), runtime, plan)
    assert "BitsAndBytes" in caplog.text
    assert not hasattr(components.transformer.transformer_blocks[0], "_diffusers_hook")
    assert runtime.status["transformer"].engine == "pytorch"
    assert type(components.vae.decoder).__name__ == "TensorRTLatentDecoder"  # the VAE is still accelerated
