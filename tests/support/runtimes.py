"""TensorRT runtimes on the CPU for tests: the test double for Torch-TensorRT, a scratch engine cache, and one call."""

from pathlib import Path

import pytest
import torch

from diffusers_helper.acceleration import tensorrt_backend
from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.acceleration.speed_records import SPEED_RECORDS_FILE
from diffusers_helper.acceleration.tensorrt_wrappers import STRETCH_BLOCKS
from diffusers_helper.tensorrt_runtime import TensorRTRuntime
from tests.support.tensorrt_double import FakeBackend
from tests.support.tensorrt_worker import seeded_mlp

TINY_STACK_ENGINES = -(-4 // STRETCH_BLOCKS)  # the tiny preset's 2 dual and 2 single blocks: an engine per stretch
COMPONENT = "vae_decoder"  # a component keyed by its weights (not refittable) unless `refittable_runtime` says so


def make_runtime(
    tmp_path: Path, only_if_faster: bool = False, **backend_options
) -> tuple[TensorRTRuntime, FakeBackend]:
    backend = FakeBackend(**backend_options)
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), backend, only_if_faster=only_if_faster)
    runtime.register(COMPONENT)
    return runtime, backend


def refittable_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **backend_options
) -> tuple[TensorRTRuntime, FakeBackend]:
    """A runtime whose test component is refitted to new weights, as the transformer is."""
    monkeypatch.setitem(tensorrt_backend.COMPONENT_SETTINGS, COMPONENT, {"immutable_weights": False})
    return make_runtime(tmp_path, **backend_options)


def call(runtime: TensorRTRuntime, module: torch.nn.Module | None = None, shape=(2, 8)) -> tuple:
    """(the runtime's output, PyTorch's) for one call of the test component."""
    module = module or seeded_mlp()
    return runtime.run(COMPONENT, module, (torch.ones(*shape),)), module(torch.ones(*shape))


def leftovers(directory: Path) -> list[str]:
    """What a cache directory holds besides complete entries, their locks and the measured speeds."""
    kept = (".engine", ".json", ".lock")
    return sorted(p.name for p in directory.iterdir()
                  if p.name != SPEED_RECORDS_FILE and (p.name.startswith(".") or p.suffix not in kept))  # fmt: skip


WEIGHT_EDITS = ("in place", "new tensor", "through .data")


def edit_weights(module: torch.nn.Module, how: str) -> None:
    """Change the first layer's weight one of the ways weights change: in place (a version counter sees it), as a new
    tensor, or through `.data` (as LoRA fusing does: no version counter sees it)."""
    with torch.no_grad():
        if how == "in place":
            module[0].weight.add_(0.5)
        elif how == "new tensor":
            module[0].weight.data = module[0].weight.data + 0.5
        else:
            module[0].weight.data.add_(0.5)
