import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers_helper.media.images import example_image


@pytest.fixture(scope="session")
def tiny_root():
    from diffusers_helper.models.tiny_preset import ensure_tiny_models

    return ensure_tiny_models()


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "start.png"
    Image.fromarray(example_image(320, 240)).save(path)
    return path


@pytest.fixture(scope="session")
def engines(tiny_root):
    """One CPU engine per variant, shared by the tests (loading costs seconds)."""
    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.settings import ModelSettings

    plan = plan_memory("cpu")
    return {
        variant: FramePackEngine(
            assemble(load_components(variant, tiny_root, plan.dtypes()), plan, ModelSettings(variant, preset="tiny"))
        )
        for variant in ("framepack", "f1")
    }
