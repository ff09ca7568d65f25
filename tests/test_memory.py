import pytest
import torch

from diffusers_helper.models.placement import needs_offload, plan_memory


def test_cpu_plan_is_float32_without_offloading():
    plan = plan_memory("cpu")
    assert plan.device.type == "cpu" and not plan.offload
    assert set(plan.dtypes().values()) == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        plan_memory("cuda")
    assert plan_memory("auto").device.type == "cpu"


def test_offloading_follows_framepacks_60_gb_rule_shifted_by_what_to_preserve():
    assert not needs_offload(free_gb=80, preserve_gb=6)
    assert needs_offload(free_gb=60, preserve_gb=6.5)
    assert needs_offload(free_gb=23, preserve_gb=6)
    assert needs_offload(free_gb=70, preserve_gb=20)  # a user who wants more room gets offloading


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="device must be one of"):
        plan_memory("tpu")
