"""A stand-in for Torch-TensorRT on the CPU, for testing the runtime's own cache and fallback logic.

"Compiling" is the real backend's export alone (so the wrappers' modules must export, as they must for TensorRT, and
masked attention takes the same route); an "engine file" is the saved ExportedProgram. Failure modes reproduce
what the real compiler does wrong, one at a time. It proves nothing about TensorRT itself: GPU tests do that.
"""

import copy
import time

import torch

from diffusers_helper.acceleration.tensorrt_backend import export
from diffusers_helper.tensorrt_runtime import TensorRTUnavailable

FAILURES = ("unavailable", "export", "oom", "save", "load", "run", "refit")
ENGINES = 3  # "engines" a build makes, as TensorRT makes one per stretch between operations left to PyTorch


class FakeEngine(torch.nn.Module):
    def __init__(self, exported: torch.export.ExportedProgram, scale: float, fail_run: bool) -> None:
        super().__init__()
        self.exported = exported
        self.module = copy.deepcopy(exported.module())  # its own copy of the weights, as a TensorRT engine holds
        self.scale = scale
        self.fail_run = fail_run

    def forward(self, *args):
        if self.fail_run:
            raise RuntimeError("engine execution failed: illegal memory access")
        output = self.module(*args)
        if isinstance(output, tuple):
            return tuple(o * self.scale if o.is_floating_point() else o for o in output)
        return output * self.scale


class FakeBackend:
    def __init__(
        self, fail: str | None = None, scale: float = 1.0, compile_delay: float = 0.0, version: str = "fake-1"
    ) -> None:
        assert fail in (None, *FAILURES)
        self.fail, self.scale, self.compile_delay, self.version = fail, scale, compile_delay, version
        self.compiled = 0
        self.loaded = 0
        self.refitted = 0
        self.refit_scale = scale

    def check_available(self) -> None:
        if self.fail == "unavailable":
            raise TensorRTUnavailable("no CUDA GPU")

    def versions(self) -> dict:
        return {"torch": torch.__version__, "torch_tensorrt": self.version, "build": "fake", "tensorrt": "0"}

    def compile(self, module, args, settings, progress):
        """Builds ENGINES "engines" in turn, the compile delay spread over them, checking for a cancel before each
        (as TensorRT's progress monitor does at every step)."""
        if self.fail == "export":
            raise RuntimeError("torch.export: could not guard on data-dependent expression")
        if self.fail == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        exported = export(module, args)
        progress.engines_expected = ENGINES
        for _ in range(ENGINES):
            progress.check()
            progress.engines_started += 1
            self.on_engine_started(progress)
            time.sleep(self.compile_delay / ENGINES)
        self.compiled += 1
        return FakeEngine(exported, self.scale, self.fail == "run")

    def on_engine_started(self, progress) -> None:
        """A test's look at a build under way (to cancel it, or read the status)."""

    def save(self, compiled, args, path, progress=None):
        """Checks for a cancel before writing, as the real backend does before every write."""
        if progress is not None:
            progress.check()
        if self.fail == "save":
            path.write_bytes(b"half an engi")
            raise OSError(28, "No space left on device")
        torch.export.save(compiled.exported, path)

    def refit(self, engine, module, args):
        if self.fail == "refit":
            raise RuntimeError("refit: weight shapes do not match the engine")
        self.refitted += 1
        return FakeEngine(export(module, args), self.refit_scale, False)

    def load(self, path, kernels=None):
        if self.fail == "load":
            raise RuntimeError("Compatible cubin or ptx module for device target '90' not found")
        self.loaded += 1
        return FakeEngine(torch.export.load(path), self.scale, False)
