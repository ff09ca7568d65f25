"""The Torch-TensorRT compiler behind the runtime: availability, versions, compile settings, build, save, load.

Settings are data; options the installed Torch-TensorRT does not know are dropped (2.13 removed
`enabled_precisions` and `use_explicit_typing`; `attn_bias_is_causal` appeared in 2.11).
"""

import inspect
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from .kept_keys_attention import OP_NAME, route_masked_attention

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install Torch-TensorRT matching your torch: `pip install torch-tensorrt` (TensorRT, datacenter GPUs) or "
    "`pip install torch-tensorrt-rtx` (TensorRT-RTX, GeForce RTX cards)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot serve at all in this process (no torch_tensorrt, no CUDA)."""


ATTENTION_OPS = (
    "aten.scaled_dot_product_attention.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    OP_NAME.replace("::", ".") + ".default",
)
BASE_SETTINGS = {
    "use_explicit_typing": True,  # precision follows the model's dtypes (TensorRT-RTX is always strongly typed)
    "min_block_size": 1,
    "truncate_double": True,
    "optimization_level": 3,
    "attn_bias_is_causal": False,  # FramePack's attention is never causal
    # Attention stays in PyTorch's fused kernels: faster than TensorRT's for the transformer, and Torch-TensorRT
    # 2.11 cannot convert attention with a constant mask (the VAE mid-block's, CLIP's causal one). Masked attention
    # that only hides padding runs unmasked on the kept keys (`kept_keys_attention`).
    "torch_executed_ops": ATTENTION_OPS,
}
COMPONENT_SETTINGS = {
    "vae_encoder": {},
    "vae_decoder": {},
    "text_encoder": {},
    "text_encoder_2": {},
    # The PyTorch weights wait on the CPU while TensorRT builds (a build fits where the model fits), and the engine
    # stays refittable, so new weights (a LoRA) cost a refit instead of a build.
    # Attention splits the stack into one engine per block; each would hold its own activation memory for good (about
    # 3 GB at 544x704), so they take it from PyTorch's allocator for each call instead and share it.
    "transformer": {"offload_module_to_cpu": True, "immutable_weights": False, "dynamically_allocate_resources": True},
}
TOLERANCES = {
    "vae_encoder": 0.05,
    "vae_decoder": 0.05,
    "text_encoder": 0.05,
    "text_encoder_2": 0.05,
    "transformer": 0.05,
}


class TorchTensorRTBackend:
    """The real compiler: torch.export, then torch_tensorrt.dynamo.compile; engine files are the compiled module
    pickled (its TensorRT engines serialize themselves; a pickle names Torch-TensorRT's classes, whose version is in
    every cache key). Torch-TensorRT's own ExportedProgram format retraces the whole program to save it, about 25 s a
    block (docs/benchmarks.md), longer than building the full-size transformer."""

    def __init__(self) -> None:
        self._trt = None

    def check_available(self) -> None:
        if not torch.cuda.is_available():
            raise TensorRTUnavailable("no CUDA GPU")
        try:
            import torch_tensorrt
        except ImportError as error:
            raise TensorRTUnavailable(f"torch_tensorrt is not installed ({error}); {INSTALL_HINT}") from error
        self._trt = torch_tensorrt

    def versions(self) -> dict:
        trt = self._trt
        features = getattr(trt, "ENABLED_FEATURES", None)
        rtx = bool(getattr(features, "tensorrt_rtx", False))
        version_module = getattr(trt, "_version", None)
        tensorrt_version = getattr(version_module, "__tensorrt_rtx_version__" if rtx else "__tensorrt_version__", "?")
        return {
            "torch": torch.__version__,
            "torch_tensorrt": trt.__version__,
            "build": "TensorRT-RTX" if rtx else "TensorRT",
            "tensorrt": _installed_tensorrt_version(rtx) or tensorrt_version,
        }

    def _options(self, settings: dict) -> dict:
        accepted = inspect.signature(self._trt.dynamo.compile).parameters
        options = {name: value for name, value in settings.items() if name in accepted}
        dropped = sorted(set(settings) - set(options))
        if dropped:
            logger.debug("this Torch-TensorRT does not take %s; compiling without them", ", ".join(dropped))
        if "torch_executed_ops" in options:
            options["torch_executed_ops"] = {op for name in options["torch_executed_ops"] if (op := _aten_op(name))}
        return options

    def compile(self, module: torch.nn.Module, args: tuple, settings: dict) -> Callable:
        return self._trt.dynamo.compile(export(module, args), arg_inputs=list(args), **self._options(settings))

    def save(self, compiled: Callable, args: tuple, path: Path) -> None:
        """Streamed to the file one engine at a time (torch.save would build the whole pickle in memory first)."""
        drop_host_copies(compiled)
        with open(path, "wb") as file:
            pickle.dump(compiled, file, protocol=pickle.HIGHEST_PROTOCOL)

    def refit(self, engine: Callable, module: torch.nn.Module, args: tuple) -> Callable:
        """The engine with the module's current weights (same graph, other values), written into its TensorRT
        engines in place, without building it again."""
        refitted = self._trt.dynamo.refit_module_weights(engine, export(module, args), arg_inputs=list(args),
                                                         in_place=True)  # fmt: skip
        drop_host_copies(refitted)
        return refitted

    def load(self, path: Path) -> Callable:
        """An engine file of this cache, which this product wrote: unpickling runs code, so the cache directory must
        be as trusted as the program."""
        with open(path, "rb") as file:
            return pickle.load(file)


def export(module: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """What TensorRT compiles: the module exported, its padding-masked attention sent to the kept keys."""
    exported = torch.export.export(module, args, strict=False)
    route_masked_attention(exported)
    return exported


def drop_host_copies(engine: torch.nn.Module) -> None:
    """A freshly built or refitted engine's modules keep its serialized bytes on the host beside the live engine: for
    the full-size transformer a second copy of its weights in RAM (about 26 GB). Once the engine is set up and saved
    nothing reads them: its own state serializes the live engine, and a refit serializes anew."""
    for module in engine.modules():
        if getattr(module, "engine", None) is not None and getattr(module, "serialized_engine", None) is not None:
            module.serialized_engine = None


def _aten_op(name: str):
    target = torch.ops
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            return None
    return target


def _installed_tensorrt_version(rtx: bool) -> str | None:
    try:
        if rtx:
            import tensorrt_rtx as tensorrt
        else:
            import tensorrt
        return tensorrt.__version__
    except ImportError:
        return None
