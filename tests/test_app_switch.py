"""The app's engine switch: the old models are gone before the new ones load (hooks form reference cycles that
plain reference counting does not free)."""

import threading
import weakref

from demo_gradio import App, build_parser
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.pipeline.events import LOADING, Finished, StageStarted
from diffusers_helper.settings import GenerationSettings


def test_switching_variant_frees_the_old_models_before_loading_the_new(tmp_path, tiny_root):
    app = App(build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--outputs", str(tmp_path)]))
    old = weakref.ref(app.engine.components.transformer)
    alive_at_load = []
    load = app._load_engine

    def watched_load(*args):
        alive_at_load.append(old() is not None)
        return load(*args)

    app._load_engine = watched_load
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=1, resolution=128, variant="f1")
    events = list(app.job(example_image(256, 256), settings, JobPaths.new_job(tmp_path), threading.Event()))
    assert events[0] == StageStarted(LOADING) and isinstance(events[-1], Finished)
    assert alive_at_load == [False]
    assert app.engine.components.variant == "f1"


def test_the_backend_flag_reaches_the_models_and_the_status_names_it(tmp_path, tiny_root):
    args = ["--preset", "tiny", "--device", "cpu", "--outputs", str(tmp_path), "--backend", "compile"]
    app = App(build_parser().parse_args(args))
    assert app.engine.models.settings.backend == "compile"
    assert "**Transformer blocks:** torch.compile (checked on first use)" in app.status()
    plain = App(build_parser().parse_args(args[:-2]))  # auto: PyTorch on the CPU, nothing to say
    assert plain.engine.models.compiled is None and "Transformer blocks" not in plain.status()
