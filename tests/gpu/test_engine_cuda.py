"""The tiny preset end to end on a CUDA GPU: resident and offloaded, both section orders."""

import numpy as np
import pytest
import torch

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished, SectionFinished
from diffusers_helper.settings import GenerationSettings, ModelSettings


class FrameSink:
    """Keeps the frames the engine would write, for machines without PyAV."""

    def __init__(self):
        self.frames = []

    def __call__(self, frames, path, fps, crf):
        self.frames.append(frames)


def run_tiny(variant, plan, tmp_path, seconds=2.0):
    components = load_components(variant, ensure_tiny_models(), plan.dtypes())
    sink = FrameSink()
    engine = FramePackEngine(assemble(components, plan, ModelSettings(variant, preset="tiny")), write_video=sink)
    settings = GenerationSettings(prompt="a cat walks", seconds=seconds, resolution=TINY_RESOLUTION, variant=variant)
    events = list(engine.generate(example_image(), settings, JobPaths.for_video(tmp_path / "x.mp4")))
    return settings, events, sink, components


@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_tiny_generation_on_gpu(variant, tmp_path):
    plan = plan_memory("cuda")
    settings, events, sink, components = run_tiny(variant, plan, tmp_path)
    assert isinstance(events[-1], Finished), events[-1]
    assert events[-1].frames == settings.frames == 73
    assert [e.frames for e in events if isinstance(e, SectionFinished)] == [33 if variant == "framepack" else 37, 73]
    assert components.transformer.device.type == "cuda"
    assert components.transformer.dtype == torch.bfloat16
    video = sink.frames[-1]
    assert video.shape == (73, 128, 128, 3)
    assert np.ptp(video.astype(np.int16), axis=0).mean() > 1  # frames differ


def test_tiny_generation_offloaded_on_gpu(tmp_path):
    plan = plan_memory("cuda", free_gb=8.0)  # as on a small card: group offloading and model CPU offload
    assert plan.offload
    settings, events, _, components = run_tiny("framepack", plan, tmp_path, seconds=1.0)
    assert isinstance(events[-1], Finished), events[-1]
    assert events[-1].frames == settings.frames == 37
    assert next(components.transformer.transformer_blocks[0].parameters()).device.type == "cpu"
