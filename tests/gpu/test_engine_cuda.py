"""The tiny preset end to end on a CUDA GPU: resident and offloaded, both section orders, eager and compiled."""

import numpy as np
import pytest
import torch

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished, SectionFinished
from diffusers_helper.settings import GenerationSettings, ModelSettings
from tests.support.frame_sink import FrameSink  # no PyAV on the GPU machine


def run_tiny(variant, plan, tmp_path, seconds=2.0, backend="eager"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    components = load_components(variant, ensure_tiny_models(), plan.dtypes())
    sink = FrameSink()
    models = assemble(components, plan, ModelSettings(variant, preset="tiny", backend=backend))
    engine = FramePackEngine(models, write_video=sink)
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
    video = sink.last
    assert video.shape == (73, 128, 128, 3)
    assert np.ptp(video.astype(np.int16), axis=0).mean() > 1  # frames differ


def test_tiny_generation_streamed_matches_resident(tmp_path):
    """No room to keep weights: everything but the first transformer block streams, the LLaMA layer by layer; the
    video is the resident one's."""
    plan = plan_memory("cuda", preserve_gb=8.0, free_gb=8.0)
    assert plan.offload and plan.resident_bytes() == 0
    settings, events, sink, components = run_tiny("framepack", plan, tmp_path / "streamed", seconds=1.0)
    assert isinstance(events[-1], Finished), events[-1]
    assert events[-1].frames == settings.frames == 37
    blocks = transformer_blocks(components.transformer)
    assert next(blocks[0].parameters()).device.type == "cuda"  # resident: the step cache reads it
    streamed = next(blocks[1].parameters())
    assert streamed.device.type == "cpu" and streamed.is_pinned()
    assert next(components.text_encoder.layers[0].parameters()).device.type == "cpu"
    _, resident_events, resident_sink, _ = run_tiny("framepack", plan_memory("cuda"), tmp_path / "resident", 1.0)
    difference = np.abs(sink.last.astype(int) - resident_sink.last.astype(int))
    print(f"streamed against resident: mean {difference.mean():.3f}, max {difference.max()} levels")
    assert difference.mean() < 0.5


def test_switching_variant_frees_the_old_models_first(tmp_path):
    """The app's switch to the other variant: while the new models load, GPU memory holds one set, not two."""
    import threading

    from demo_gradio import App, build_parser

    app = App(build_parser().parse_args(["--preset", "tiny", "--device", "cuda", "--outputs", str(tmp_path)]))
    torch.cuda.synchronize()
    one_set = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    load, peaks = app._load_engine, []

    def measured_load(*args):
        engine = load(*args)
        engine.write_video = FrameSink()  # no PyAV on the GPU machine
        peaks.append(torch.cuda.max_memory_allocated())
        return engine

    app._load_engine = measured_load
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=1, resolution=TINY_RESOLUTION, variant="f1")
    models = app.models_for(settings, app.models.gpu_memory_preservation)
    events = list(app.job(example_image(), settings, models, JobPaths.for_video(tmp_path / "s.mp4"), threading.Event()))
    assert isinstance(events[-1], Finished), events[-1]
    print(f"one set of models {one_set / 2**20:.2f} MiB, peak while switching {peaks[0] / 2**20:.2f} MiB")
    assert peaks[0] < one_set * 1.5  # both sets at once would be 2x


def test_auto_backend_measures_compile_on_the_gpu_remembers_it_and_makes_the_eager_video(tmp_path, monkeypatch):
    """The default backend on a GPU: torch.compile is checked and timed against eager once per block class and
    shape, resident and streamed, and the video is eager's."""
    import json

    from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE

    monkeypatch.setenv("FRAMEPACK_TENSORRT_CACHE_DIR", str(tmp_path / "engines"))
    _, _, eager, _ = run_tiny("framepack", plan_memory("cuda"), tmp_path / "eager", 1.0)
    for name, plan in (
        ("resident", plan_memory("cuda")),
        ("streamed", plan_memory("cuda", preserve_gb=8.0, free_gb=8.0)),
    ):
        _, events, sink, _ = run_tiny("framepack", plan, tmp_path / name, 1.0, backend="auto")
        assert isinstance(events[-1], Finished), events[-1]
        difference = np.abs(sink.last.astype(int) - eager.last.astype(int))
        print(f"auto backend ({name}) against eager: mean {difference.mean():.3f}, max {difference.max()} levels")
        assert difference.mean() < 0.5
    records = [json.loads(line) for line in (tmp_path / "engines" / SPEED_RECORDS_FILE).read_text().splitlines()]
    print(json.dumps(records, indent=1))
    assert {r["key"]["block"].rsplit(".", 1)[1] for r in records} == {
        "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"
    }  # fmt: skip
    assert all(r["key"]["gpu"] == torch.cuda.get_device_name() and r["relative_error"] < 0.02 for r in records)
    # the streamed run found every measurement of the resident one
    assert len(records) == len({(r["key"]["block"], tuple(r["key"]["shape"])) for r in records})
