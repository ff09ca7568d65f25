"""The attention kernels on a CUDA GPU: each one installed against SDPA on a full-size attention (error and speed
printed for docs/benchmarks.md), and a tiny job through `--attention cudnn` and `auto`."""

import numpy as np
import pytest
import torch

from diffusers_helper.acceleration.attention import ATTENTION_BACKENDS, attention_unavailable, dispatched_attention
from diffusers_helper.acceleration.measure import median_seconds, output_error, psnr
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, ModelSettings
from tests.support.frame_sink import FrameSink

FULL_SIZE_ATTENTION = (1, 17408 + 512, 24, 128)  # 544x704 latents with the default window, and a prompt


def test_each_installed_kernel_matches_sdpa_at_full_size():
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    query, key, value = (torch.randn(FULL_SIZE_ATTENTION, generator=generator, device=device, dtype=torch.bfloat16)
                         for _ in range(3))  # fmt: skip
    sdpa = dispatched_attention("sdpa")
    expected = sdpa(query, key, value)
    baseline = median_seconds(lambda: sdpa(query, key, value), 10)
    print(f"\nsdpa: {baseline * 1e3:.3f} ms at {FULL_SIZE_ATTENTION}")
    for name, backend in ATTENTION_BACKENDS.items():
        reason = attention_unavailable(name, device)
        if name == "sdpa" or reason:
            print(f"{name}: {reason or 'the baseline'}")
            continue
        kernel = dispatched_attention(name)
        error = output_error(kernel(query, key, value), expected)
        seconds = median_seconds(lambda kernel=kernel: kernel(query, key, value), 10)
        print(f"{name}: {seconds * 1e3:.3f} ms ({baseline / seconds:.2f}x sdpa), relative error {error:.2e}")
        assert error <= backend.tolerance


def tiny_frames(attention: str, tmp_path) -> tuple[np.ndarray, str]:
    plan = plan_memory("cuda")
    components = load_components("framepack", ensure_tiny_models(), plan.dtypes())
    models = assemble(components, plan, ModelSettings(preset="tiny", attention=attention))
    engine = FramePackEngine(models, write_video=FrameSink())
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, resolution=TINY_RESOLUTION, step_cache="off")
    events = list(engine.generate(example_image(), settings, JobPaths.for_video(tmp_path / f"{attention}.mp4")))
    assert isinstance(events[-1], Finished)
    return engine.write_video.last, models.backends()["attention"]


@pytest.mark.parametrize("attention", ["cudnn", "auto"])
def test_a_tiny_job_through_another_kernel_is_sdpas_video_within_rounding(attention, tmp_path):
    expected, _ = tiny_frames("sdpa", tmp_path)
    frames, described = tiny_frames(attention, tmp_path)
    quality = psnr(frames, expected)
    print(f"\n{attention}: {described}; PSNR {quality:.1f} dB against sdpa")
    assert quality > 30
