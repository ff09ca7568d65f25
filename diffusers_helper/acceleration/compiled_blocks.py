"""torch.compile (Inductor) for the transformer's blocks, used where it is measured faster than PyTorch eager.

Regional compilation, as diffusers' `compile_repeated_blocks` does it (that method needs a model that lists its
repeated blocks, and FramePack's transformer does not): one compiled forward per block class, shared by the 20 dual-
and 40 single-stream blocks. It runs as each block's innermost hook, so streaming brings a block's weights before the
compiled code runs, the step caches decide around it, and a LoRA fused into the weights in place reaches it (the
compiled code takes the weights as inputs; nothing is frozen into it). The text's length is a dynamic dimension of
the graphs, so a prompt of another length runs the code already compiled (at full size on an H200, a new length's
first step took 1.6 s in bf16 and 2.0 s with FP8 blocks, against 9.0 s and 116 s with a static graph per length).

The first call of a block class at a new latent shape is checked: the compiled output against eager's (relative L2
error at most TOLERANCE). Under `auto` both are also timed there, and the faster serves that class and shape; the
measurement is remembered (speed_records) per GPU, torch version, block class and shape, so a later process that
found eager faster does not compile at all. A compile that fails (no Triton, an Inductor error, too many recompiles)
or is wrong costs one warning and leaves every block eager for the rest of the process.

Inductor's own on-disk caches (its compiled graphs, their autograd wrappers and Triton kernels, each keyed by
Inductor by the graph, the torch version, the device and its settings) live in the engine cache directory
(`keep_compiled_code`) rather than the system's temporary one, so a fresh process after a reboot or a cleared
temporary directory loads the compiled code instead of compiling cold, and `engines.py prune` clears it with the
engines.
"""

import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import describe_error
from ..models.transformer_blocks import transformer_blocks
from .engine_keys import gpu_identity
from .measure import median_seconds, output_error
from .speed_records import SpeedRecord, SpeedRecords

logger = logging.getLogger(__name__)

TOLERANCE = 0.02  # bf16 blocks differ from eager by well under 1% when compiled right
COMPILE_HOOK = "compiled_block"
TIMED_RUNS = 3
RECOMPILE_LIMIT = 64  # graphs per block class: one per latent shape (and, for FP8, text length) a process meets


COMPILED_CODE_DIR = "compiled_code"  # in the engine cache directory
COMPILED_GRAPHS_FILE = "graphs_compiled.txt"  # in it: a line per graph compiled there
INDUCTOR_CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # Inductor reads it whenever it looks for its caches


def keep_compiled_code(cache_dir: Path) -> Path:
    """Inductor's caches in `cache_dir`'s compiled-code folder, unless the user chose their own folder; returns the
    folder in use. Call before the blocks compile. (Inductor writes its default folder into the variable once it has
    looked for it, so only another value is the user's.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir as inductor_default

    chosen = os.environ.get(INDUCTOR_CACHE_VARIABLE)
    if chosen and os.path.abspath(chosen) != os.path.abspath(inductor_default()):
        return Path(chosen)
    directory = cache_dir / COMPILED_CODE_DIR
    os.environ[INDUCTOR_CACHE_VARIABLE] = str(directory)
    return directory


def compiled_code_files(directory: Path) -> list[Path]:
    """The files of a compiled-code folder (none where it does not exist)."""
    return [path for path in directory.rglob("*") if path.is_file()] if directory.is_dir() else []


def prune_compiled_code(directory: Path, unused_seconds: float | None = None) -> tuple[int, int]:
    """Remove the compiled-code folder's files, or only those not written or read for `unused_seconds`; returns
    (files, bytes) removed. A process using a removed file compiles that graph again."""
    cutoff = None if unused_seconds is None else time.time() - unused_seconds
    removed = freed = 0
    for path in compiled_code_files(directory):
        stat = path.stat()
        if cutoff is None or max(stat.st_mtime, stat.st_atime) < cutoff:
            path.unlink(missing_ok=True)
            removed, freed = removed + 1, freed + stat.st_size
    folders = [path for path in directory.rglob("*") if path.is_dir()] + [directory] if directory.is_dir() else []
    for folder in sorted(folders, reverse=True):
        if not any(folder.iterdir()):  # deepest first, so a folder emptied of folders goes too
            folder.rmdir()
    return removed, freed


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot serve on this device, if it cannot: Inductor's GPU kernels are Triton's."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile needs Triton on a GPU (pip install triton; on Windows, triton-windows)"
    return None


class CompiledBlocks:
    """The compiled forwards of the transformer's block classes, and which of them serve: always once checked
    (`compile`), or where measured faster (`auto`)."""

    def __init__(
        self, mode: str, speeds: SpeedRecords | None = None, weights: str = "bfloat16", code: Path | None = None
    ) -> None:
        self.mode = mode
        self.speeds = speeds  # None: what is measured is kept for this process only
        self.weights = weights  # part of what a measurement is remembered by: FP8 blocks time differently
        self.code = code  # the compiled-code folder, whose list of graphs says which were compiled before
        self.failure: str | None = None
        self.measurements: list[SpeedRecord] = []  # eager as the baseline, torch.compile as the candidate
        self.compiling_since: float | None = None  # while a call with inputs new to its block class compiles
        self.loading = False  # ... and whether its code was compiled before, so Inductor loads it instead
        self._seen: set[tuple] = set()  # graph keys already compiled
        self._compiled: dict[type, Callable] = {}
        self._decisions: dict[tuple, str] = {}

    def install(self, transformer: torch.nn.Module, first: int = 0) -> None:
        """Each block's innermost hook, from block `first` on (the blocks before it run as TensorRT engines): install
        before streaming and the step caches."""
        for block in transformer_blocks(transformer)[first:]:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_CompiledBlockHook(self), COMPILE_HOOK)

    def forward(self, module: torch.nn.Module, eager: Callable, args: tuple, kwargs: dict):
        if self.failure is not None:
            return eager(*args, **kwargs)
        shape = (type(module), tuple(args[0].shape), args[0].dtype)
        decision = self._decisions.get(shape) or self._decide(shape, module, eager, args, kwargs)
        if decision == "eager":
            return eager(*args, **kwargs)
        graph = self._graph_key(module, args)
        if graph not in self._seen:  # a new latent shape: its graphs compile anew
            self._compiling(graph, args[0].device)
        try:
            output = self._run_compiled(module, args, kwargs)
        except Exception as error:  # a recompile can fail like the first compile
            self._fail(error)
            return eager(*args, **kwargs)
        finally:
            self.compiling_since = None
        if graph not in self._seen:
            self._seen.add(graph)
            self._note_compiled(graph, args[0].device)
        return output

    def _compiling(self, graph: tuple, device: torch.device) -> None:
        self.compiling_since = time.perf_counter()
        self.loading = self._graph_name(graph, device) in self._compiled_before()

    def _graph_name(self, graph: tuple, device: torch.device) -> str:
        block, *shapes = graph
        return json.dumps([f"{block.__module__}.{block.__qualname__}", shapes, self.weights, torch.__version__,
                           gpu_identity(device)])  # fmt: skip

    def _compiled_before(self) -> set[str]:
        record = None if self.code is None else self.code / COMPILED_GRAPHS_FILE
        return set(record.read_text().splitlines()) if record is not None and record.is_file() else set()

    def _note_compiled(self, graph: tuple, device: torch.device) -> None:
        """The graph in the compiled-code folder's list, so a later process says it loads rather than compiles."""
        name = self._graph_name(graph, device)
        if self.code is None or name in self._compiled_before():
            return
        try:
            self.code.mkdir(parents=True, exist_ok=True)
            with (self.code / COMPILED_GRAPHS_FILE).open("a") as record:
                record.write(name + "\n")
        except OSError as error:
            logger.debug("could not note the compiled graph in %s: %s", self.code, error)

    @staticmethod
    def _graph_key(module: torch.nn.Module, args: tuple) -> tuple:
        """What a graph is compiled for: the block class and its inputs' shapes, the text's length (dynamic) aside."""
        sized = [arg for index, arg in enumerate(args) if isinstance(arg, torch.Tensor) and index != 1]
        return (type(module), *(tuple(arg.shape) for arg in sized))

    def _run_compiled(self, module: torch.nn.Module, args: tuple, kwargs: dict):
        """The compiled forward on inputs with standard strides (a block's input can be a view whose strides follow
        the text length, and a new stride is a recompile). The text's length (`encoder_hidden_states`, the second
        argument of both block classes) is marked dynamic; every other size is static, so a new latent shape compiles
        a graph of its own. Past RECOMPILE_LIMIT graphs per block class it raises where torch.compile would quietly
        run the block eagerly: a failure to report, not a speed-up to claim."""
        if type(module) not in self._compiled:
            self._compiled[type(module)] = torch.compile(type(module).forward, dynamic=False)
        compiled = self._compiled[type(module)]
        args = tuple(_standard_strides(arg) if isinstance(arg, torch.Tensor) else arg for arg in args)
        torch._dynamo.mark_dynamic(args[1], 1)  # explicit: `dynamic=False` keeps every other size static
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled(module, *args, **kwargs)

    def _decide(self, shape: tuple, module: torch.nn.Module, eager: Callable, args: tuple, kwargs: dict) -> str:
        key = self._key(shape, args[0].device)
        remembered = self.speeds.lookup(key) if self.mode == "auto" and self.speeds is not None else None
        if remembered is not None and _chosen(remembered) == "eager":
            self.measurements.append(remembered)
            return self._decisions.setdefault(shape, "eager")

        def run_eager():
            return eager(*args, **kwargs)

        def run_compiled():
            return self._run_compiled(module, args, kwargs)

        graph = self._graph_key(module, args)
        self._compiling(graph, args[0].device)
        logger.info("%s %s with torch.compile (first use at this shape%s)",
                    "loading" if self.loading else "compiling", shape[0].__name__,
                    ": its code from the cache" if self.loading else "; this can take a minute")  # fmt: skip
        try:
            error = output_error(run_compiled(), run_eager())
        except Exception as failure:
            self._fail(failure)
            return "eager"
        finally:
            self.compiling_since = None
        self._seen.add(graph)
        self._note_compiled(graph, args[0].device)
        if error > TOLERANCE:
            self._fail(f"its output differs from PyTorch's by {error:.1%} (allowed: {TOLERANCE:.0%})")
            return "eager"
        if self.mode == "compile":
            return self._decisions.setdefault(shape, "compile")
        if remembered is None:
            remembered = SpeedRecord(median_seconds(run_eager, TIMED_RUNS), median_seconds(run_compiled, TIMED_RUNS),
                                     error)  # fmt: skip
            self._remember(key, remembered)
        self.measurements.append(remembered)
        logger.info("%s at %s: torch.compile %.2fx PyTorch, so %s serves it", shape[0].__name__,
                    "x".join(map(str, shape[1])), remembered.speedup, _chosen(remembered))  # fmt: skip
        return self._decisions.setdefault(shape, _chosen(remembered))

    def _key(self, shape: tuple, device: torch.device) -> dict:
        """What a measurement is remembered by: the candidate and its baseline, the GPU, torch, the block class, its
        latent shape and dtype, and the weights' kind."""
        block, size, dtype = shape
        return {"candidate": "torch.compile", "versus": "eager", **gpu_identity(device), "torch": torch.__version__,
                "block": f"{block.__module__}.{block.__qualname__}", "shape": list(size),
                "dtype": str(dtype).removeprefix("torch."), "weights": self.weights}  # fmt: skip

    def _remember(self, key: dict, measurement: SpeedRecord) -> None:
        if self.speeds is None:
            return
        try:
            self.speeds.remember(key, measurement)
        except OSError as error:
            logger.warning("could not remember the torch.compile measurement in %s (%s); the next process measures "
                           "again", self.speeds.path, error)  # fmt: skip

    def _fail(self, reason: str | BaseException) -> None:
        if isinstance(reason, BaseException):
            reason = describe_error(reason)
        self.failure = reason
        logger.warning("torch.compile cannot serve the transformer blocks (%s); they run in PyTorch", reason)

    def describe_mode(self) -> str:
        """How the blocks are meant to run, before anything is measured: what a TensorRT engine is timed against."""
        return "torch.compile" if self.mode == "compile" else "torch.compile where faster than eager"

    def describe(self) -> str:
        """What the blocks run on, for status lines and the sidecar."""
        if self.failure is not None:
            return f"PyTorch (torch.compile failed: {self.failure})"
        if self.compiling_since is not None:
            elapsed = time.perf_counter() - self.compiling_since
            if self.loading:
                return f"loading torch.compile's code from the cache (compiled before here)... {elapsed:.0f}s"
            return f"compiling with torch.compile (new input shapes)... {elapsed:.0f}s"
        chosen = set(self._decisions.values())
        if not chosen:
            return "torch.compile (checked on first use)" if self.mode == "compile" else (
                "PyTorch or torch.compile, whichever is faster (measured on first use)")  # fmt: skip
        speedups = ", ".join(f"{m.speedup:.2f}x" for m in self.measurements)
        measured = f" (torch.compile measured {speedups} PyTorch on this device)" if speedups else ""
        if chosen == {"compile"}:
            return f"torch.compile{measured}"
        if chosen == {"eager"}:
            return f"PyTorch{measured}"
        return f"torch.compile for some block shapes, PyTorch for others{measured}"


def _chosen(measurement: SpeedRecord) -> str:
    return "compile" if measurement.candidate_seconds < measurement.baseline_seconds else "eager"


def _standard_strides(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with the strides a fresh one of its shape has. `contiguous()` is not enough: PyTorch calls a view
    contiguous whatever the stride of a size-1 dimension, but torch.compile guards on that stride too."""
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= size
    if tensor.stride() == tuple(reversed(strides)):
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class _CompiledBlockHook(ModelHook):
    def __init__(self, blocks: CompiledBlocks) -> None:
        super().__init__()
        self.blocks = blocks

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.blocks.forward(module, self.fn_ref.original_forward, args, kwargs)
