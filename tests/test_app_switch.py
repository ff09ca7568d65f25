"""The app's engine switch: the old models are gone before the new ones load (hooks form reference cycles that
plain reference counting does not free)."""

import threading
import weakref

import pytest

from demo_gradio import App, build_parser
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.pipeline.events import LOADING, Finished, StageStarted
from diffusers_helper.settings import GenerationSettings, InvalidSettings


@pytest.fixture
def make_app(tmp_path, tiny_root):
    """Apps on the tiny preset with their outputs and job store in `tmp_path`, shut down after the test (each runs a
    queue worker)."""
    apps = []

    def make(*flags: str) -> App:
        apps.append(App(build_parser().parse_args(["--preset", "tiny", "--device", "cpu", "--outputs", str(tmp_path),
                                                   *flags])))  # fmt: skip
        return apps[-1]

    yield make
    for app in apps:
        app.shutdown()


def test_switching_variant_frees_the_old_models_before_loading_the_new(tmp_path, make_app):
    app = make_app()
    old = weakref.ref(app.engine.components.transformer)
    alive_at_load = []
    load = app._load_engine

    def watched_load(*args):
        alive_at_load.append(old() is not None)
        return load(*args)

    app._load_engine = watched_load
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=1, resolution=128, variant="f1")
    models = app.models_for(settings, 6.0)
    events = list(app.job(example_image(256, 256), settings, models, JobPaths.new_job(tmp_path), threading.Event()))
    assert events[0] == StageStarted(LOADING) and isinstance(events[-1], Finished)
    assert alive_at_load == [False]
    assert app.engine.components.variant == "f1"
    events = list(app.job(example_image(256, 256), settings, models, JobPaths.new_job(tmp_path), threading.Event()))
    assert StageStarted(LOADING) not in events and len(alive_at_load) == 1  # the same models: nothing loads


def test_gpu_memory_to_preserve_is_a_model_setting_of_the_page(make_app):
    """The page's "GPU memory to preserve" reaches the models the job runs on, and is checked like the flag."""
    app = make_app("--gpu-memory-preservation", "8")
    settings = GenerationSettings(prompt="a cat walks")
    assert app.models.gpu_memory_preservation == 8.0 and app.engine.plan.preserve_gb == 8.0
    assert app.models_for(settings, 10.0).gpu_memory_preservation == 10.0
    with pytest.raises(InvalidSettings, match="gpu_memory_preservation must be in"):
        app.models_for(settings, 500.0)


def test_the_backend_flag_reaches_the_models_and_the_status_names_it(make_app):
    app = make_app("--backend", "compile")
    assert app.engine.models.settings.backend == "compile"
    assert "**Transformer blocks:** torch.compile (checked on first use)" in app.status()
    plain = make_app()  # auto: PyTorch on the CPU, nothing to say
    assert plain.engine.models.compiled is None and "Transformer blocks" not in plain.status()
