"""`--fp8`: which linears it quantizes, where it cannot run (one warning, unchanged blocks, said in the report), what it
refuses (the TensorRT transformer, LoRAs). The quantization itself needs an FP8 GPU: tests/gpu/test_fp8_gpu.py."""

import dataclasses
import logging

import pytest
import torch

from diffusers_helper.acceleration import fp8
from diffusers_helper.models import assembly
from diffusers_helper.models.assembly import FP8_APPLIED, assemble, quantize_fp8
from diffusers_helper.models.components import load_components
from diffusers_helper.models.lora import FusedLoras, read_lora
from diffusers_helper.models.placement import MemoryPlan, plan_memory, tensor_bytes
from diffusers_helper.settings import InvalidSettings, ModelSettings, TensorRTOptions
from tests.support.lora_files import TINY_LAYERS, random_layers, write_peft


@pytest.fixture
def transformer(tiny_root):
    return load_components("framepack", tiny_root, plan_memory("cpu").dtypes()).transformer


def test_fp8_takes_the_attention_and_feed_forward_linears_and_leaves_modulation_bf16(transformer):
    names = fp8.fp8_linear_names(transformer)
    dual, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    assert len(names) == 12 * dual + 5 * single
    assert "transformer_blocks.0.attn.to_q" in names and "transformer_blocks.0.ff_context.net.2" in names
    assert "single_transformer_blocks.0.proj_out" in names and "single_transformer_blocks.0.proj_mlp" in names
    assert not [name for name in names if ".norm" in name]  # AdaLayerNorm linears: the modulation
    assert not [name for name in names if not name.startswith(("transformer_blocks.", "single_transformer_blocks."))]


def test_without_an_fp8_gpu_the_blocks_stay_bf16_with_one_warning_and_the_report_says_why(tiny_root, caplog):
    plan = plan_memory("cpu")
    settings = ModelSettings(preset="tiny", fp8=True)
    with caplog.at_level(logging.WARNING):
        models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, settings)
    reason = "FP8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or Blackwell); this run is on the CPU"
    assert models.backends()["transformer"] == f"PyTorch; float32 (FP8 not available: {reason})"
    assert [record.getMessage() for record in caplog.records] == [f"{reason}; the transformer blocks stay float32"]
    assert models.loras.refusal is None  # bf16 weights take LoRAs as ever
    assert all(type(m.weight) is torch.nn.Parameter for m in models.components.transformer.modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip


def test_fp8_serves_resident_and_streaming_plans_alike(transformer, monkeypatch):
    """The blocks are quantized for every plan; the plan's layout then counts their FP8 sizes (tests/test_memory.py)."""
    monkeypatch.setattr(assembly, "fp8_unavailable", lambda device: None)
    quantized = []
    monkeypatch.setattr(assembly, "convert_blocks_on_device", lambda model, plan, convert: quantized.append(plan))
    streaming = MemoryPlan(torch.device("cpu"), torch.bfloat16, torch.float16, True, 8.0, 6.0)
    resident = dataclasses.replace(streaming, offload=False, budget_gb=80.0)
    assert quantize_fp8(transformer, ModelSettings(fp8=True), streaming) == FP8_APPLIED
    assert quantize_fp8(transformer, ModelSettings(fp8=True), resident) == FP8_APPLIED
    assert quantized == [streaming, resident] and streaming.home == torch.device("cpu")
    assert quantize_fp8(transformer, ModelSettings(), resident) is None and len(quantized) == 2


def test_placement_counts_a_tensor_subclass_by_what_it_holds():
    """torchao's FP8 weights show the dtype they stand for; the bytes that decide placement are their inner ones."""
    from torch.testing._internal.two_tensor import TwoTensor

    inner = torch.zeros(4, 8, dtype=torch.float16), torch.zeros(4, 8, dtype=torch.float16)
    assert tensor_bytes(TwoTensor(*inner)) == 2 * 4 * 8 * 2
    assert tensor_bytes(inner[0]) == 4 * 8 * 2


def test_fp8_weights_refuse_loras_with_one_line_and_change_nothing(transformer, tmp_path):
    lora = read_lora(write_peft(tmp_path / "a.safetensors", random_layers(TINY_LAYERS, rank=4, seed=1)))
    before = {name: value.clone() for name, value in transformer.state_dict().items()}
    fused = FusedLoras(transformer, assembly.FP8_REFUSES_LORAS)
    with pytest.raises(InvalidSettings) as error:
        fused.apply([(lora, 1.0)])
    assert str(error.value) == f"LoRA {lora.path}: {assembly.FP8_REFUSES_LORAS}"
    assert all(torch.equal(before[name], value) for name, value in transformer.state_dict().items())


def test_fp8_and_the_tensorrt_transformer_are_one_choice_too_many():
    with pytest.raises(InvalidSettings, match="--fp8 runs the blocks through torch.compile"):
        ModelSettings(fp8=True, tensorrt=TensorRTOptions(True, False, True))
