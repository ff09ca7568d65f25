"""The memory policy: what is resident and what streams, for each GPU memory limit, without a GPU."""

import pytest
import torch
from accelerate import init_empty_weights

from diffusers_helper.models.full_size_preset import FULL_SIZE
from diffusers_helper.models.placement import MemoryPlan, Placement, needs_offload, plan_memory, transformer_layout
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.settings import InvalidSettings

GIB = 1024**3


def test_cpu_plan_is_float32_without_offloading():
    plan = plan_memory("cpu")
    assert plan.device.type == "cpu" and not plan.offload
    assert set(plan.dtypes().values()) == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(InvalidSettings, match="no CUDA GPU"):
        plan_memory("cuda")
    with pytest.raises(InvalidSettings, match="--gpu-memory-limit needs a CUDA GPU"):
        plan_memory("auto", limit_gb=8)
    assert plan_memory("auto").device.type == "cpu"


def test_offloading_follows_framepacks_60_gb_rule_shifted_by_what_to_preserve():
    assert not needs_offload(80, preserve_gb=6)
    assert needs_offload(60, preserve_gb=6.5)
    assert needs_offload(23, preserve_gb=6)
    assert needs_offload(70, preserve_gb=20)  # a user who wants more room gets streaming


def test_unknown_device_is_rejected():
    with pytest.raises(InvalidSettings, match="device must be one of"):
        plan_memory("tpu")


@pytest.fixture
def an_80_gb_card(monkeypatch):
    class Properties:
        total_memory = 80 * GIB

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Properties())


@pytest.mark.parametrize("limit", [5.9, 80.5, 200])
def test_a_limit_beyond_the_card_or_below_the_minimum_is_one_line(an_80_gb_card, limit):
    with pytest.raises(InvalidSettings, match=r"--gpu-memory-limit must be between 6 GB and this GPU's 80.0 GB"):
        plan_memory("cuda", limit_gb=limit)


def test_the_limit_is_the_budget(an_80_gb_card):
    plan = plan_memory("cuda", preserve_gb=6, limit_gb=24)
    assert plan.offload and plan.budget_gb == 24 and plan.resident_bytes() == 18 * GIB
    assert "24 GB limit" in plan.describe() and "streaming" in plan.describe()
    assert not plan_memory("cuda", preserve_gb=6, limit_gb=80).offload


@pytest.fixture(scope="module")
def full_size_transformer():
    with init_empty_weights(include_buffers=False):
        return FULL_SIZE["transformer"]().to(torch.bfloat16)


# limit (GB) with 6 GB preserved -> transformer blocks resident of 60 (20 dual of 680 MB, then 40 single of 283 MB,
# after 828 MB of embedders and output head)
LAYOUTS = {80: 60, 24: 37, 16: 14, 12: 8, 8: 1, 6: 1}


@pytest.mark.parametrize(("limit", "resident"), LAYOUTS.items())
def test_transformer_blocks_resident_for_each_limit(full_size_transformer, limit, resident):
    plan = MemoryPlan(torch.device("cuda"), torch.bfloat16, torch.float16, True, limit, 6.0, limit)
    kept, streamed = transformer_layout(full_size_transformer, plan)
    assert (len(kept), len(streamed)) == (resident, 60 - resident)
    assert kept[0] is full_size_transformer.transformer_blocks[0]  # the step cache reads the first block
    blocks = transformer_blocks(full_size_transformer)
    assert kept + streamed == blocks  # resident from the front, in the order they run


def test_more_memory_to_preserve_keeps_fewer_blocks(full_size_transformer):
    counts = [
        len(transformer_layout(full_size_transformer, MemoryPlan(torch.device("cuda"), torch.bfloat16,
                                                                   torch.float16, True, 24, preserve, 24))[0])
        for preserve in (6, 10, 14, 18, 23)
    ]  # fmt: skip
    assert counts == sorted(counts, reverse=True) and counts[-1] == 1


@pytest.mark.parametrize(("resident", "says"), [(37, "37 of 60 blocks resident, the rest streamed;"),
                                                (60, "60 of 60 blocks resident; CLIP")])  # fmt: skip
def test_the_placement_says_blocks_stream_only_when_some_do(resident, says):
    described = Placement(resident_blocks=resident, blocks=60, pinned_bytes=2 * 1024**3).describe()
    assert says in described and "2.0 GB pinned" in described
