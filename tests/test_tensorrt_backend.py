"""The Torch-TensorRT backend's own logic on the CPU: engine files, saving with progress and cancels, the build's
engine count, and what counts as TensorRT failing. Real engines are built in tests/gpu."""

import pickle
import sys
import types

import pytest
import torch

from diffusers_helper.acceleration.tensorrt_backend import (
    ATTENTION_OPS,
    BuildCancelled,
    BuildProgress,
    TensorRTFailure,
    TorchTensorRTBackend,
    _aten_op,
    _pytorch_stretches,
    drop_host_copies,
    export,
    pending_engines,
    tensorrt_engine_from_raw,
    tensorrt_errors,
)
from tests.support.tensorrt_worker import seeded_mlp


def test_a_built_engine_keeps_no_serialized_copy_beside_its_live_engine():
    """Torch-TensorRT's engine modules keep their serialized bytes after set-up (a second copy of the weights in RAM);
    only a module whose engine is live gives them up."""
    live, pending = torch.nn.Module(), torch.nn.Module()
    live.engine, live.serialized_engine = object(), b"engine bytes"
    pending.engine, pending.serialized_engine = None, b"engine bytes"  # not set up: the bytes are all there is
    compiled = torch.nn.Sequential(live, pending)
    drop_host_copies(compiled)
    assert live.serialized_engine is None and pending.serialized_engine == b"engine bytes"


class _EngineModule(torch.nn.Module):
    """What a compiled submodule looks like to the save: a live engine (here a picklable stand-in) and its bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.engine, self.serialized_engine = torch.nn.Linear(4, 4), b"x" * 4096

    def forward(self, x):
        return self.engine(x)


def test_an_engine_file_is_the_compiled_module_pickled_without_its_serialized_copies(tmp_path):
    class EnginesAsLeaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, _EngineModule) or super().is_leaf_module(module, name)

    root = torch.nn.Sequential(_EngineModule(), torch.nn.ReLU())
    compiled = torch.fx.GraphModule(root, EnginesAsLeaves().trace(root))  # engines as submodules, as in Torch-TensorRT
    x = torch.randn(2, 4)
    expected = compiled(x)
    backend = TorchTensorRTBackend()
    backend.save(compiled, (x,), tmp_path / "engine.engine")
    loaded = backend.load(tmp_path / "engine.engine")
    assert torch.equal(loaded(x), expected)
    assert loaded.get_submodule("0").serialized_engine is None  # the live engine is what was written
    assert (tmp_path / "engine.engine").stat().st_size < 4096


def test_the_real_backend_round_trips_what_is_not_a_tensorrt_engine(tmp_path):
    """Engine files carry TensorRT engines raw (GPU tests check those); everything around them pickles as usual."""
    module = seeded_mlp()
    TorchTensorRTBackend().save(module, (), tmp_path / "engine.engine")
    loaded = TorchTensorRTBackend().load(tmp_path / "engine.engine")
    assert torch.equal(loaded(torch.ones(2, 8)), module(torch.ones(2, 8)))


class _EngineFields:
    """Pickles as a TensorRT engine does in an engine file: Torch-TensorRT's serialization fields, the bytes raw."""

    def __init__(self, fields: list) -> None:
        self.fields = fields

    def __reduce__(self):
        return tensorrt_engine_from_raw, (self.fields,)


class _FileEngineModule(torch.nn.Module):
    def __init__(self, fields: list) -> None:
        super().__init__()
        self.engine = _EngineFields(fields)


def test_a_loaded_files_engines_are_set_up_by_the_loader_with_the_entrys_kernel_cache(tmp_path, monkeypatch):
    """Torch-TensorRT's own set-up (`tensorrt_engine_from_raw`) never runs on a load: each engine module is handed to
    `tensorrt_loader` with its fields, where it is replaced; what the loader raises is the load's failure."""
    compiled = torch.nn.Sequential(torch.nn.Sequential(_FileEngineModule(["a", b"engine a"])), torch.nn.ReLU(),
                                   _FileEngineModule(["b", b"engine b"]))  # fmt: skip
    path = tmp_path / "engine.engine"
    with open(path, "wb") as file:
        pickle.dump(compiled, file)
    handed = []

    def set_up_engines(pending, kernels):
        handed.append((sorted(fields[1] for _, _, fields in pending), kernels))
        for parent, name, _ in pending:
            setattr(parent, name, torch.nn.Identity())

    monkeypatch.setitem(sys.modules, "diffusers_helper.acceleration.tensorrt_loader",
                        types.SimpleNamespace(set_up_engines=set_up_engines))  # fmt: skip
    loaded = TorchTensorRTBackend().load(path, tmp_path / "engine.kernels")
    assert handed == [([b"engine a", b"engine b"], tmp_path / "engine.kernels")]
    assert not pending_engines(loaded) and isinstance(loaded[2], torch.nn.Identity)

    def refuse(pending, kernels):
        raise RuntimeError("TensorRT could not deserialize engine 'a' (its log above says why)")

    monkeypatch.setitem(sys.modules, "diffusers_helper.acceleration.tensorrt_loader",
                        types.SimpleNamespace(set_up_engines=refuse))  # fmt: skip
    with pytest.raises(TensorRTFailure, match="could not deserialize engine 'a'"), tensorrt_errors():
        TorchTensorRTBackend().load(path)


def test_a_cancel_stops_the_real_backend_writing_an_engine_file(tmp_path):
    checks = []

    def cancelled() -> bool:  # from the second write on
        checks.append(True)
        return len(checks) > 1

    progress = BuildProgress(cancelled)
    path = tmp_path / "engine.engine"
    with pytest.raises(BuildCancelled):
        TorchTensorRTBackend().save(torch.nn.Linear(512, 512), (), path, progress)
    assert len(checks) == 2 and path.stat().st_size < 512 * 512 * 4  # stopped part of the way through


def test_saving_an_engine_file_says_how_much_is_written(tmp_path):
    progress = BuildProgress()
    path = tmp_path / "engine.engine"
    TorchTensorRTBackend().save(torch.nn.Linear(1024, 1024), (), path, progress)
    assert progress.bytes_saved == path.stat().st_size
    assert progress.describe() == "saving the engine to the cache: 4 MB"
    progress.bytes_saved, progress.bytes_to_save = 12_345_000_000, 23_600_000_000
    assert progress.describe() == "saving the engine to the cache: 12.3 GB of about 23.6 GB"


def test_a_build_expects_one_engine_per_stretch_between_the_attention_left_to_pytorch():
    class TwoAttentions(torch.nn.Module):
        def forward(self, q, mask):
            attention = torch.nn.functional.scaled_dot_product_attention
            first = attention(q, q, q)
            return attention(first * 2, first, first, attn_mask=mask) + 1  # masked: routed to the kept-keys op

    mask = torch.zeros(1, 1, 1, 8)
    mask[..., 6:] = float("-inf")
    exported = export(TwoAttentions(), (torch.randn(1, 2, 8, 4), mask))
    assert _pytorch_stretches(exported, {op for name in ATTENTION_OPS if (op := _aten_op(name))}) == 3


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (RuntimeError("torch.export: could not guard\non data-dependent expression"),
         "RuntimeError: torch.export: could not guard"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
         "out of GPU memory while building or running the engine (OutOfMemoryError)"),
        (RuntimeError("[Error thrown at core/runtime/TRTEngine.cpp:143] Expected (exec_ctx.get() != nullptr)"),
         "TensorRT built the engine but could not create its execution context on this GPU"),
        (ValueError(), "ValueError"),
    ],
)  # fmt: skip
def test_what_tensorrt_raises_becomes_one_failure_in_one_line(error, said):
    with pytest.raises(TensorRTFailure) as failure:
        with tensorrt_errors():
            raise error
    assert str(failure.value).startswith(said) and "\n" not in str(failure.value)
    assert failure.value.__cause__ is error
    assert failure.value.out_of_memory == isinstance(error, torch.OutOfMemoryError)


def test_a_cancel_and_ctrl_c_are_not_tensorrt_failures():
    with pytest.raises(BuildCancelled), tensorrt_errors():
        raise BuildCancelled("the engine build was cancelled")
    with pytest.raises(KeyboardInterrupt), tensorrt_errors():
        raise KeyboardInterrupt
