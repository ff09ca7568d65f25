"""The Torch-TensorRT compiler behind the runtime: availability, versions, compile settings, build, save, load, and
what counts as TensorRT failing.

Settings are data; options the installed Torch-TensorRT does not know are dropped (2.13 removed
`enabled_precisions` and `use_explicit_typing`; `attn_bias_is_causal` appeared in 2.11). Whatever goes wrong inside
the compiler or an engine (`tensorrt_errors`) is a `TensorRTFailure`, the one kind of error the runtime answers by
running the component in PyTorch; an error anywhere else is a bug, and is raised.
"""

import base64
import contextlib
import inspect
import logging
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import describe_error
from .kept_keys_attention import OP_NAME, route_masked_attention

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install Torch-TensorRT matching your torch: `pip install torch-tensorrt` (TensorRT, datacenter GPUs) or "
    "`pip install torch-tensorrt-rtx` (TensorRT-RTX, GeForce RTX cards)"
)


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot serve at all in this process (no torch_tensorrt, no CUDA)."""


class BuildCancelled(RuntimeError):
    """A build gave up because it was asked to (its job was stopped): nothing was cached, nothing is wrong."""


class TensorRTFailure(RuntimeError):
    """Torch-TensorRT or TensorRT failed: an export, a build, a save, a load, a refit or an engine's run. The message
    says what happened in one line; the original error is the cause."""

    @property
    def out_of_memory(self) -> bool:
        return _out_of_memory(self.__cause__) if self.__cause__ is not None else False


# How Torch-TensorRT reports an engine TensorRT built but cannot run here (no kernels for this GPU, for one).
NO_EXECUTION_CONTEXT = "exec_ctx.get() != nullptr"


@contextlib.contextmanager
def tensorrt_errors() -> Iterator[None]:
    """Inside the block, any error (but a cancel) is TensorRT's: raised again as a TensorRTFailure."""
    try:
        yield
    except (BuildCancelled, TensorRTFailure):
        raise
    except Exception as error:
        raise TensorRTFailure(describe_failure(error)) from error


def describe_failure(error: BaseException) -> str:
    """One line for a failure of TensorRT's, in the words a user can act on."""
    if _out_of_memory(error):
        return f"out of GPU memory while building or running the engine ({type(error).__name__})"
    if NO_EXECUTION_CONTEXT in str(error):  # Torch-TensorRT's check; TensorRT logged its own error just before
        return (
            "TensorRT built the engine but could not create its execution context on this GPU"
            " (TensorRT's own error is in the log above)"
        )
    return describe_error(error)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


@dataclass
class BuildProgress:
    """A build in progress: how far it is (TensorRT builds one engine per stretch of graph between the operations
    left to PyTorch), and whether it should give up."""

    cancelled: Callable[[], bool] = field(default=lambda: False)
    engines_started: int = 0
    engines_expected: int | None = None
    bytes_saved: int = 0  # written to the engine file so far
    bytes_to_save: int | None = None  # what the engines alone take, where known before the file is written

    def check(self) -> None:
        """Raise BuildCancelled once the build has been asked to give up."""
        if self.cancelled():
            raise BuildCancelled("the engine build was cancelled")

    def describe(self) -> str | None:
        if self.bytes_saved:
            of = f" of about {_size(self.bytes_to_save)}" if self.bytes_to_save else ""
            return f"saving the engine to the cache: {_size(self.bytes_saved)}{of}"
        if not self.engines_started:
            return None
        expected = self.engines_expected
        of = f" of about {expected}" if expected and expected >= self.engines_started else ""
        return f"TensorRT engine {self.engines_started}{of}"


def _size(count: int) -> str:
    return f"{count / 1e9:.1f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


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
    # 3 GB at 544x704), so they take it from PyTorch's allocator for each call instead and share it. The builder's
    # workspace is bounded, so a stretch builds within the room the memory plan leaves beside the resident weights.
    "transformer": {
        "offload_module_to_cpu": True,
        "immutable_weights": False,
        "dynamically_allocate_resources": True,
        "workspace_size": 1 << 30,
    },
}
TOLERANCES = {
    "vae_encoder": 0.05,
    "vae_decoder": 0.05,
    "text_encoder": 0.05,
    "text_encoder_2": 0.05,
    "transformer": 0.05,
}


def compile_settings(component: str) -> dict:
    """What a component's engines are built with (part of their cache key)."""
    return {**BASE_SETTINGS, **COMPONENT_SETTINGS[component]}


def refittable(component: str) -> bool:
    """Whether the component's engines take new weights by a refit (so their key leaves the weights out)."""
    return COMPONENT_SETTINGS[component].get("immutable_weights") is False


class TorchTensorRTBackend:
    """The real compiler: torch.export, then torch_tensorrt.dynamo.compile; engine files are the compiled module
    pickled, its TensorRT engines as their raw bytes (a pickle names Torch-TensorRT's classes, whose version is in
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

    def compile(self, module: torch.nn.Module, args: tuple, settings: dict, progress: BuildProgress) -> Callable:
        """Export, then build; `progress` counts the TensorRT engines as their builds start, and a cancelled build
        stops at TensorRT's next progress step (BuildCancelled)."""
        progress.check()
        exported = export(module, args)
        options = self._options(settings)
        progress.engines_expected = _pytorch_stretches(exported, options.get("torch_executed_ops", ()))
        progress.check()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # TensorRT's builder allocates outside PyTorch: what PyTorch holds unused is its room
        with _watched_engine_builds(progress) as interrupted:
            try:
                return self._trt.dynamo.compile(exported, arg_inputs=list(args), **options)
            except Exception:
                if interrupted:  # Ctrl-C during a build reaches the monitor, which stops TensorRT: raised here
                    raise KeyboardInterrupt from None
                progress.check()  # a build that TensorRT stopped for a cancel fails as a cancel
                raise

    def save(self, compiled: Callable, args: tuple, path: Path, progress: BuildProgress | None = None) -> None:
        """Streamed to the file one engine at a time (torch.save would build the whole pickle in memory first); a
        cancel stops it between writes (the caller removes the partial file). A freshly built engine's modules still
        hold the bytes TensorRT's builder made: those are written, not the live engines serialized again."""
        progress = progress or BuildProgress()
        built = _builder_outputs(compiled)
        progress.bytes_to_save = sum(len(info[torch.ops.tensorrt.ENGINE_IDX()]) for info in built.values()) or None
        drop_host_copies(compiled)
        with open(path, "wb") as file:
            _RawEnginePickler(_CheckedWrites(file, progress), built).dump(compiled)

    def refit(self, engine: Callable, module: torch.nn.Module, args: tuple) -> Callable:
        """The engine with the module's current weights (same graph, other values), written into its TensorRT
        engines in place, without building it again."""
        refitted = self._trt.dynamo.refit_module_weights(engine, export(module, args), arg_inputs=list(args),
                                                         in_place=True)  # fmt: skip
        drop_host_copies(refitted)
        return refitted

    def load(self, path: Path, kernels: Path | None = None) -> Callable:
        """An engine file of this cache, which this product wrote: unpickling runs code, so the cache directory must
        be as trusted as the program. Its TensorRT engines are set up on TensorRT's own API (`tensorrt_loader`), with
        TensorRT-RTX's compiled kernels kept in `kernels`."""
        started = time.perf_counter()
        with open(path, "rb") as file:
            loaded = _EngineFileUnpickler(file).load()
        read = time.perf_counter()
        pending = pending_engines(loaded)
        if pending:
            from .tensorrt_loader import set_up_engines

            set_up_engines(pending, kernels)
        logger.debug("engine file %s read in %.2fs, its %d TensorRT engines set up in %.2fs (kernel cache %s)",
                     path.name, read - started, len(pending), time.perf_counter() - read,
                     "found" if kernels is not None and kernels.exists() else "none")  # fmt: skip
        return loaded


def export(module: torch.nn.Module, args: tuple) -> torch.export.ExportedProgram:
    """What TensorRT compiles: the module exported, its padding-masked attention sent to the kept keys."""
    exported = torch.export.export(module, args, strict=False)
    route_masked_attention(exported)
    return exported


def _pytorch_stretches(exported: torch.export.ExportedProgram, executed_in_pytorch) -> int:
    """How many engines a build makes, about: one per stretch of graph between the operations left to PyTorch."""
    kept = set(executed_in_pytorch)
    return 1 + sum(node.op == "call_function" and node.target in kept for node in exported.graph.nodes)


TENSORRT_ENGINE_CLASS = "__torch__.torch.classes.tensorrt.Engine"


class _RawEnginePickler(pickle.Pickler):
    """Pickles Torch-TensorRT's engines with their bytes as they are: their own pickling carries them in base64, a
    third larger on disk, and decodes them again on every load. `built` holds the serialization fields of engines
    whose builder output is still at hand, by the engine's id; any other engine is serialized from the live one."""

    def __init__(self, file, built: dict[int, list]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._built = built

    def reducer_override(self, obj):
        if not isinstance(obj, torch.ScriptObject):
            return NotImplemented
        info = self._built.get(id(obj))
        if info is None:
            state, class_name = obj.__getstate__()
            if class_name != TENSORRT_ENGINE_CLASS:
                return NotImplemented
            index = torch.ops.tensorrt.ENGINE_IDX()
            info = [*state[:index], base64.b64decode(state[index]), *state[index + 1 :]]
        return tensorrt_engine_from_raw, (info,)


def _builder_outputs(compiled: torch.nn.Module) -> dict[int, list]:
    """The serialization fields, engine bytes raw, of each live engine whose module still holds what the builder made
    (Torch-TensorRT's modules keep it until `drop_host_copies`), by the engine's id."""
    return {
        id(module.engine): module._pack_engine_info()
        for module in compiled.modules()
        if isinstance(getattr(module, "engine", None), torch.ScriptObject)
        and getattr(module, "serialized_engine", None)
    }


def tensorrt_engine_from_raw(info: list) -> torch.ScriptObject:
    """A TensorRT engine from Torch-TensorRT's serialization fields, its engine field raw (what engine files hold),
    set up by Torch-TensorRT's own runtime: what a plain `pickle.load` of an engine file does. The backend's loads
    leave these fields to `tensorrt_loader` instead."""
    return torch.classes.tensorrt.Engine(info)


@dataclass
class PendingEngine:
    """A TensorRT engine read from an engine file and not yet set up: Torch-TensorRT's serialization fields."""

    fields: list


class _EngineFileUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == __name__ and name == tensorrt_engine_from_raw.__name__:
            return PendingEngine
        return super().find_class(module, name)


def pending_engines(loaded: torch.nn.Module) -> list[tuple[torch.nn.Module, str, list]]:
    """(parent, child name, serialization fields) of each module of a loaded file whose engine is not set up."""
    return [
        (parent, name, child.engine.fields)
        for parent in loaded.modules()
        for name, child in parent.named_children()
        if isinstance(getattr(child, "engine", None), PendingEngine)
    ]


class _CheckedWrites:
    """A file whose writes first check for a cancel."""

    def __init__(self, file, progress: BuildProgress) -> None:
        self._file, self._progress = file, progress

    def write(self, data) -> int:
        self._progress.check()
        written = self._file.write(data)
        self._progress.bytes_saved += written
        return written


@contextlib.contextmanager
def _watched_engine_builds(progress: BuildProgress) -> Iterator[list]:
    """While Torch-TensorRT builds, each TensorRT builder configuration it makes gets a progress monitor: every
    engine started is counted, and TensorRT's next step after a cancel stops that build. Torch-TensorRT sets monitors
    only under its debugger, so its configuration step is wrapped (`TRTInterpreter._populate_trt_builder_config`).
    Yields a list that holds True if Ctrl-C arrived during a build (a monitor must not raise into TensorRT)."""
    from torch_tensorrt.dynamo.conversion._TRTInterpreter import TRTInterpreter, trt

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            pass

        def phase_finish(self, phase_name) -> None:
            pass

        def step_complete(self, phase_name, step) -> bool:
            try:
                return not progress.cancelled()
            except KeyboardInterrupt:
                interrupted.append(True)
                return False

    interrupted: list = []
    monitor = Monitor()  # referenced here for as long as TensorRT may call it
    configure = TRTInterpreter._populate_trt_builder_config

    def configure_watched(interpreter, *args, **kwargs):
        progress.check()
        config = configure(interpreter, *args, **kwargs)
        config.progress_monitor = monitor
        progress.engines_started += 1
        return config

    TRTInterpreter._populate_trt_builder_config = configure_watched
    try:
        yield interrupted
    finally:
        TRTInterpreter._populate_trt_builder_config = configure


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
