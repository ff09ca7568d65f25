"""Cached engines set up on TensorRT's own Python API: how an engine file is loaded.

Torch-TensorRT's C++ runtime sets an engine up several times slower than TensorRT itself does from the same bytes,
and on TensorRT-RTX every new process compiles each engine's kernels again (docs/benchmarks.md). Here one TensorRT
runtime deserializes every engine of a file, each engine gets one execution context whose activation memory comes
from PyTorch's allocator for each call (so all engines share it, as `dynamically_allocate_resources` makes
Torch-TensorRT do), and TensorRT-RTX's runtime cache of compiled kernels is kept beside the engine file for the next
process. The module is Torch-TensorRT's Python runtime module underneath, so Torch-TensorRT's refit finds and
refits its engine in place.

Imports torch_tensorrt: only the backend imports this module, once Torch-TensorRT is known to be installed.
"""

import dataclasses
import logging
from pathlib import Path

import torch
from torch_tensorrt import dtype as tensorrt_dtype
from torch_tensorrt.dynamo.runtime import PythonTorchTensorRTModule, TorchTensorRTModule
from torch_tensorrt.logging import TRT_LOGGER, trt  # the TensorRT package (or TensorRT-RTX) Torch-TensorRT runs on

from ..errors import describe_error
from ..media.atomic_files import write_bytes

logger = logging.getLogger(__name__)


class KernelCache:
    """TensorRT-RTX's runtime cache for the engines of one file: read from `path` when the first context is made, and
    written back after an engine's first call whenever it grew. Plain TensorRT has no such cache; an unreadable or
    unwritable one costs a warning and the kernels' compile, never the engine."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._cache = None
        self._kept = 0

    def attach(self, config) -> None:
        if self.path is None or not hasattr(config, "create_runtime_cache"):
            return
        if self._cache is None:
            self._cache = config.create_runtime_cache()
            self._read()
        config.set_runtime_cache(self._cache)

    def _read(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as error:
            logger.warning("TensorRT kernel cache %s unreadable (%s); compiling the kernels", self.path, error)
            return
        if self._cache.deserialize(data) is False:
            logger.warning("TensorRT kernel cache %s not usable here; compiling the kernels", self.path)
            return
        self._kept = len(data)

    def keep(self) -> None:
        if self._cache is None:
            return
        data = bytes(self._cache.serialize())
        if len(data) == self._kept:
            return
        try:
            write_bytes(self.path, data)
        except OSError as error:
            logger.warning("TensorRT kernel cache %s not written (%s); the next process compiles them", self.path,
                           describe_error(error))  # fmt: skip
            return
        self._kept = len(data)


class TensorRTEngineModule(PythonTorchTensorRTModule):
    """One TensorRT engine of a loaded file, called as the Torch-TensorRT module it replaces (same inputs, same
    outputs). Runs on the caller's CUDA stream; keeps no serialized copy of the engine in host memory."""

    def __init__(self, built: TorchTensorRTModule, raw: bytes, runtime, kernels: KernelCache) -> None:
        super().__init__(
            None,
            built.input_binding_names,
            built.output_binding_names,
            name=built.name,
            settings=dataclasses.replace(built.settings, use_python_runtime=True),  # what Torch-TensorRT's refit asks
            weight_name_map=built.weight_name_map,
        )
        self._kernels = kernels
        self._kept_kernels = False
        self._set_up(runtime, raw)

    def _set_up(self, runtime, raw: bytes) -> None:
        self.engine = runtime.deserialize_cuda_engine(raw)
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize engine {self.name!r} (its log above says why)")
        if hasattr(self.engine, "create_runtime_config"):
            config = self.engine.create_runtime_config()
            config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self._kernels.attach(config)
            self.context = self.engine.create_execution_context(config)
        else:
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for engine {self.name!r} on this GPU")
        self.initialized = True
        self.input_dtypes = [self._torch_dtype(name) for name in self.input_names]
        self.output_dtypes = [self._torch_dtype(name) for name in self.output_names]
        self.is_shape_inference_io = {name: self.engine.is_shape_inference_io(name) for name in self.input_names}

    def _torch_dtype(self, name: str) -> torch.dtype:
        return tensorrt_dtype._from(self.engine.get_tensor_dtype(name)).to(torch.dtype)

    def setup_engine(self) -> None:
        """Set up at construction; Torch-TensorRT's own set-up from serialized bytes never runs here."""

    def forward(self, *inputs) -> torch.Tensor | tuple[torch.Tensor, ...]:
        held = self._bind_inputs(inputs)
        device = torch.device("cuda", torch.cuda.current_device())
        outputs = [torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=dtype, device=device)
                   for name, dtype in zip(self.output_names, self.output_dtypes, strict=True)]  # fmt: skip
        for name, output in zip(self.output_names, outputs, strict=True):
            self.context.set_tensor_address(name, output.data_ptr())
        activations = torch.empty(self.context.update_device_memory_size_for_shapes(), dtype=torch.uint8,
                                  device=device)  # fmt: skip
        if activations.numel():
            self.context.set_device_memory(activations.data_ptr(), activations.numel())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"TensorRT engine {self.name!r} failed to run (its log above says why)")
        del held, activations  # back to PyTorch's allocator, reused only by work queued after this engine's
        if not self._kept_kernels:
            self._kept_kernels = True
            self._kernels.keep()
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _bind_inputs(self, inputs: tuple) -> list:
        """Shapes and addresses of the inputs; returns what must live until the engine is queued."""
        held = []
        for name, value in zip(self.input_names, inputs, strict=True):
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            if self.is_shape_inference_io[name]:  # shape inputs are read by TensorRT on the host
                host = tensor.to("cpu", torch.int64).numpy().copy()
                held.append(host)
                self.context.set_tensor_address(name, host.ctypes.data)
                continue
            tensor = tensor.cuda().contiguous()
            held.append(tensor)
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        return held


def set_up_engines(pending: list[tuple[torch.nn.Module, str, list]], kernels_path: Path | None) -> None:
    """Put a TensorRTEngineModule in place of each Torch-TensorRT module still waiting for its engine, given as
    (parent module, child name, the engine's serialization fields, its bytes raw)."""
    runtime = trt.Runtime(TRT_LOGGER)
    kernels = KernelCache(kernels_path)
    index = torch.ops.tensorrt.ENGINE_IDX()
    for parent, name, fields in pending:
        built = getattr(parent, name)
        if built.requires_output_allocator:
            raise RuntimeError(f"engine {built.name!r} needs an output allocator, which this loader does not run")
        setattr(parent, name, TensorRTEngineModule(built, fields[index], runtime, kernels))
