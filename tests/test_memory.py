"""The memory policy: what is resident and what streams, for each GPU memory limit, without a GPU."""

import copy
import dataclasses

import pytest
import torch
from accelerate import init_empty_weights

from diffusers_helper.acceleration.fp8 import fp8_linear_names
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


def test_a_plan_for_transformer_engines_keeps_room_for_them_where_the_transformer_streams(an_80_gb_card):
    """Engines need memory beyond the weights PyTorch hands them (their runtime's, a stretch's build): where the
    transformer streams, fewer blocks stay resident; where everything fits, nothing changes."""
    from diffusers_helper.models.placement import TENSORRT_ENGINES_GB

    plan = plan_memory("cuda", preserve_gb=6, limit_gb=24, tensorrt_transformer=True)
    assert plan.resident_bytes() == (18 - TENSORRT_ENGINES_GB) * GIB
    assert f"and {TENSORRT_ENGINES_GB:g} GB for TensorRT engines" in plan.describe()
    resident = plan_memory("cuda", preserve_gb=6, limit_gb=80, tensorrt_transformer=True)
    assert not resident.offload and resident.engines_gb == 0


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


# The same with `--fp8`: the blocks' linears hold a byte a weight, so more of them stay (the whole transformer at 24 GB)
# and the rest streams like bf16 blocks.
FP8_LAYOUTS = {24: 60, 16: 24, 12: 12, 8: 2, 6: 1}


@pytest.mark.parametrize(("limit", "resident"), FP8_LAYOUTS.items())
def test_fp8_blocks_resident_for_each_limit(full_size_transformer, limit, resident):
    fp8 = copy.deepcopy(full_size_transformer)
    modules = dict(fp8.named_modules())
    for name in fp8_linear_names(fp8):
        weight = modules[name].weight
        float8 = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device="meta")
        modules[name].weight = torch.nn.Parameter(float8, requires_grad=False)
    plan = MemoryPlan(torch.device("cuda"), torch.bfloat16, torch.float16, True, limit, 6.0, limit)
    kept, streamed = transformer_layout(fp8, plan)
    assert (len(kept), len(streamed)) == (resident, 60 - resident)
    assert kept + streamed == transformer_blocks(fp8)


# The same with the transformer's TensorRT engines: where the transformer streams, the plan keeps room for them, and the
# engines take the resident blocks (an engine holds all of its weights on the GPU and memory of its own beside them),
# the rest streams in PyTorch. (Measured at 24 and 16 GB: docs/benchmarks.md.)
ENGINE_LAYOUTS = {24: 19, 16: 8, 12: 3, 8: 1}


@pytest.mark.parametrize(("limit", "engine_blocks"), ENGINE_LAYOUTS.items())
def test_the_plan_decides_how_many_blocks_run_as_engines_at_each_limit(
    an_80_gb_card, full_size_transformer, limit, engine_blocks
):
    plan = plan_memory("cuda", preserve_gb=6, limit_gb=limit, tensorrt_transformer=True)
    assert plan.offload and len(transformer_layout(full_size_transformer, plan)[0]) == engine_blocks


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


# -- what a job needs of the host, planned before it starts ----------------------------------------------------------


def test_the_vae_decodes_in_tiles_on_the_cpu_and_wherever_the_plan_streams(tiny_root, monkeypatch):
    """Untiled, the tiny preset's decode of a 1200x800 bucket took over 24 GB on the CPU and the job was killed. A GPU
    that holds every model decodes untiled, as FramePack's high-VRAM mode does."""
    cuda = torch.device("cuda", 0)
    assert MemoryPlan(cuda, torch.bfloat16, torch.float16, True, 24.0, 6.0).tiles_vae
    assert not MemoryPlan(cuda, torch.bfloat16, torch.float16, False, 80.0, 6.0).tiles_vae
    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.components import load_components
    from diffusers_helper.settings import ModelSettings

    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(preset="tiny"))
    vae = models.components.vae
    tiled = []
    monkeypatch.setattr(vae, "tiled_decode", lambda z, return_dict=True: tiled.append(z.shape) or original(z))
    original = type(vae).tiled_decode.__get__(vae)
    with torch.no_grad():
        pixels = vae.decode(torch.zeros(1, 16, 1, 40, 48)).sample  # 320 x 384 pixels: over one 256-pixel tile
    assert tiled == [(1, 16, 1, 40, 48)] and pixels.shape == (1, 3, 1, 320, 384)


def test_a_job_needs_memory_for_its_frames_and_one_decode(tiny_root):
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import job_host_bytes

    vae = load_components("framepack", tiny_root, {}).vae
    plan = plan_memory("cpu")
    short, long = (job_host_bytes(plan, vae, 800, 1200, frames, 9) for frames in (37, 3601))
    assert 1.25 * 2**30 < short < 2 * 2**30  # measured: 1.25 GB over the models (docs/benchmarks.md)
    assert long > 2 * 3601 * 800 * 1200 * 3  # every frame of the video, twice while a section is joined
    assert job_host_bytes(plan, vae, 400, 600, 37, 9) < short / 2


def test_a_job_that_cannot_fit_the_free_memory_is_refused_before_anything_is_written(engines, tmp_path, monkeypatch):

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models import placement
    from diffusers_helper.pipeline.events import Failed
    from diffusers_helper.settings import GenerationSettings

    monkeypatch.setattr(placement.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 2**30})())
    settings = GenerationSettings(prompt="a cat", seconds=60, resolution=1000)
    events = list(
        engines["framepack"].generate(example_image(960, 640), settings, JobPaths.for_video(tmp_path / "x.mp4"))
    )
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].bad_input
    assert events[0].message.startswith("a 1200x800 video of 1801 frames needs about ")
    assert events[0].message.endswith("GB of memory and 1.0 GB is free; lower the resolution or the length")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_host_parking_brings_back_only_what_it_parked():
    """While an engine holds a model's weights, PyTorch's copy waits on the host; it comes back, once, only if it was
    parked (a model the memory policy streams is not the parking's to move). On the CPU nothing needs to move."""
    from diffusers_helper.models.placement import HostParking

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    assert not HostParking(torch.device("cpu")).park(module)
    parking = HostParking(torch.device("meta"), keep_on_device=(module[0],))  # "meta" stands for the GPU here
    assert not parking.bring_back(module)  # never parked: stays where it is
    assert next(module.parameters()).device.type == "cpu"
    assert parking.park(module) and module[0].weight.device.type == "meta"  # the part kept where it runs
    assert parking.bring_back(module) and module[1].weight.device.type == "meta"
    assert not parking.bring_back(module)


def test_engines_memory_shrinks_pytorchs_share_of_the_limit(monkeypatch):
    """Under --gpu-memory-limit the engines hold memory outside PyTorch's allocator: whenever weights are parked or
    brought back, PyTorch's cap becomes the limit less what this process holds outside PyTorch beyond what it held
    before any engine (the device's use less PyTorch's reserved memory)."""
    from diffusers_helper.models import placement

    device_use = {"used": 2 * GIB, "pytorch": 1 * GIB}  # before any engine: 1 GB outside PyTorch (CUDA's own)
    monkeypatch.setattr(placement.torch.cuda, "mem_get_info", lambda device: (80 * GIB - device_use["used"], 80 * GIB))
    monkeypatch.setattr(placement.torch.cuda, "memory_reserved", lambda device: device_use["pytorch"])
    caps = []
    monkeypatch.setattr(placement, "apply_limit", lambda plan, held_outside=0: caps.append(held_outside / GIB))
    plan = dataclasses.replace(placement.plan_memory("cpu"), device=torch.device("cuda", 0), limit_gb=16.0)
    held = placement.EngineHeldMemory(plan)
    module = torch.nn.Linear(4, 4)
    parking = placement.HostParking(torch.device("meta"), held=held)  # "meta" stands for the GPU here
    device_use["used"] += 9 * GIB  # an engine now holds 9 GB
    assert parking.park(module) and caps == [9.0] and parking.is_parked(module)
    device_use["used"] -= 9 * GIB  # the engine was dropped
    assert parking.bring_back(module) and caps == [9.0, 0.0] and not parking.is_parked(module)
    assert not parking.bring_back(module) and caps == [9.0, 0.0]
