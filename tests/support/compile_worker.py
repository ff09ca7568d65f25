"""Run one tiny-preset step with `--backend compile` in a process of its own (for the warm-start test).

    python -m tests.support.compile_worker
The engine cache directory comes from FRAMEPACK_TENSORRT_CACHE_DIR. Prints JSON: Inductor's graph-cache hits and
misses, and what the blocks ran on.
"""

import json
import tempfile
from pathlib import Path

from torch._dynamo.utils import counters

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.tiny_preset import ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, ModelSettings
from tests.support.frame_sink import FrameSink


def main() -> None:
    plan = plan_memory("cpu")
    components = load_components("framepack", ensure_tiny_models(), plan.dtypes())
    models = assemble(components, plan, ModelSettings(preset="tiny", backend="compile"))
    engine = FramePackEngine(models, write_video=FrameSink())
    settings = GenerationSettings(prompt="a cat", seconds=1.0, steps=1, resolution=128, step_cache="off")
    with tempfile.TemporaryDirectory() as scratch:
        events = list(engine.generate(example_image(128, 128), settings, JobPaths.for_video(Path(scratch) / "x.mp4")))
    assert isinstance(events[-1], Finished), events[-1]
    inductor = counters["inductor"]
    print(json.dumps({"hits": inductor["fxgraph_cache_hit"], "misses": inductor["fxgraph_cache_miss"],
                      "blocks": models.backends()["transformer"]}))  # fmt: skip


if __name__ == "__main__":
    main()
