"""FP8 block linears on a GPU with FP8: full-width blocks quantized by the product's function, compiled by the
product's CompiledBlocks, close to bf16."""

import importlib.util

import pytest
import torch
from diffusers.hooks import HookRegistry

from diffusers_helper.acceleration import compiled_blocks
from diffusers_helper.acceleration.compiled_blocks import CompiledBlocks
from diffusers_helper.acceleration.fp8 import fp8_linear_names, fp8_unavailable, quantize_block_fp8
from diffusers_helper.acceleration.measure import relative_error
from diffusers_helper.models.placement import (
    GIB,
    MemoryPlan,
    Placement,
    convert_blocks_on_device,
    plan_memory,
    stream_transformer,
    tensor_bytes,
)
from diffusers_helper.models.transformer_blocks import transformer_blocks

from .midsize import mid_size_transformer, stack_inputs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available()
    or importlib.util.find_spec("torchao") is None
    or fp8_unavailable(torch.device("cuda")) is not None,
    reason="needs a GPU with FP8 and torchao",
)


def run_blocks(transformer, inputs) -> torch.Tensor:
    hidden, text, temb, cos, sin = inputs
    with torch.no_grad():
        for block in transformer_blocks(transformer):
            hidden, text = block(hidden, text, temb, None, (cos, sin))
    return hidden


def test_fp8_blocks_compiled_stay_close_to_bf16_and_modulation_stays_bf16(monkeypatch):
    """Within 8% of bf16; with one graph allowed per block class, a shorter text runs the same compiled graphs."""
    transformer = mid_size_transformer()
    inputs = stack_inputs(transformer)
    shorter = (inputs[0], inputs[1][:, : inputs[1].shape[1] // 2], *inputs[2:])
    reference, shorter_reference = run_blocks(transformer, inputs), run_blocks(transformer, shorter)
    names = fp8_linear_names(transformer)
    block_bytes = sum(p.numel() * p.element_size() for p in transformer.transformer_blocks.parameters())
    convert_blocks_on_device(transformer, plan_memory("cuda"), quantize_block_fp8)
    modules = dict(transformer.named_modules())
    assert all(type(modules[name].weight).__name__ != "Parameter" for name in names)
    assert type(transformer.transformer_blocks[0].norm1.linear.weight) is torch.nn.Parameter
    eager = run_blocks(transformer, inputs)
    torch._dynamo.reset()
    monkeypatch.setattr(compiled_blocks, "RECOMPILE_LIMIT", 1)
    compiled = CompiledBlocks("compile", weights="float8")
    compiled.install(transformer)
    output = run_blocks(transformer, inputs)
    eager_error, compiled_error = relative_error(eager, reference), relative_error(output, reference)
    print(f"FP8 against bf16 over 2 dual + 4 single full-width blocks: eager {eager_error:.4f}, "
          f"compiled {compiled_error:.4f}; dual block bytes before {block_bytes / 2**30:.2f} GiB")  # fmt: skip
    assert compiled.failure is None, compiled.failure
    assert compiled_error < 0.08 and eager_error < 0.08
    shorter_error = relative_error(run_blocks(transformer, shorter), shorter_reference)
    assert compiled.failure is None and shorter_error < 0.08, (compiled.failure, shorter_error)


def test_fp8_blocks_stream_compiled_with_one_pinned_host_copy_and_give_the_resident_output():
    """A plan with room for one block: the FP8 blocks come back to the host after quantization, the streamed ones
    pinned once (diffusers' host copy is that memory), and compiled passes give the resident FP8 output, rounded."""
    resident = mid_size_transformer()
    inputs = stack_inputs(resident)
    convert_blocks_on_device(resident, plan_memory("cuda"), quantize_block_fp8)
    torch._dynamo.reset()
    CompiledBlocks("compile", weights="float8").install(resident)
    reference = run_blocks(resident, inputs)
    del resident
    torch.cuda.empty_cache()

    transformer = mid_size_transformer()
    plan = MemoryPlan(torch.device("cuda"), torch.bfloat16, torch.float16, True, 6.5, 6.0)
    convert_blocks_on_device(transformer, plan, quantize_block_fp8)
    blocks = transformer_blocks(transformer)
    assert blocks[-1].attn.to_q.weight.qdata.device.type == "cpu"
    compiled = CompiledBlocks("compile", weights="float8")
    torch._dynamo.reset()
    compiled.install(transformer)
    placement = Placement()
    stream_transformer(transformer, plan, placement)
    before = torch.cuda.memory_allocated()
    streamed_bytes = sum(tensor_bytes(p) for block in blocks[1:] for p in block.parameters())
    assert placement.resident_blocks == 1 and placement.pinned_bytes >= streamed_bytes
    weight = blocks[-1].attn.to_q.weight
    assert weight.qdata.is_pinned() and weight.scale.is_pinned()
    group = HookRegistry.check_if_exists_or_initialize(blocks[-1]).get_hook("group_offloading").group
    host_copy = group.cpu_param_dict[weight]
    assert host_copy is not weight and host_copy.qdata.data_ptr() == weight.qdata.data_ptr()

    output = run_blocks(transformer, inputs)
    again = run_blocks(transformer, inputs)
    error = relative_error(output, reference)
    held = (torch.cuda.memory_allocated() - before) / GIB
    print(f"streamed FP8 against resident FP8: relative error {error:.2e}, equal {torch.equal(output, reference)}; "
          f"{held:.2f} GiB held after a pass, {streamed_bytes / GIB:.2f} GiB streamed")  # fmt: skip
    assert compiled.failure is None, compiled.failure
    assert error < 1e-2 and torch.equal(output, again)  # within bf16 rounding of the resident graphs
    assert weight.qdata.device.type == "cpu" and group.cpu_param_dict[weight].qdata.device.type == "cpu"
    assert held < streamed_bytes / GIB / 4  # the streamed blocks left the GPU
