"""TensorRT for FramePack's models: just-in-time engines per input shape, cached on disk, PyTorch as the fallback.

`TensorRTRuntime` owns the policy: for each call of a wrapped module it finds the engine for that input
signature (in memory, else on disk, else it compiles one through the backend), checks each new engine's first
output against PyTorch, and runs it. Once an engine has passed its check it holds the weights on the GPU, and
the PyTorch copy moves to the CPU (kept there for fallback, for checking new engines and for refits); it comes back
when the component falls back. Components built with refittable weights (the transformer) are keyed without their
weights: when the weights change (a LoRA fused in, or any in-place edit, seen through the tensors' version counters)
or an engine from the cache was built with other weights, the engine is refitted with the current ones instead of
built again, and checked again. With `only_if_faster`, each engine is also timed against PyTorch once, on the
inputs of its check, and serves only where it is at least MIN_TENSORRT_SPEEDUP times as fast; the measurement is
kept in the engine's cache record, so a later process does not even load an engine that lost. Anything that goes
wrong (no torch_tensorrt, no CUDA, an export or build error, running out of memory while building, an engine that
will not load, a wrong or failing engine) costs one warning and sends that component back to PyTorch for the rest
of the process; the other components keep their engines. A build can be cancelled (`cancel_builds_when`, which the
engine ties to a job's stop): it gives up within TensorRT's next progress step, caches nothing, and that call runs
in PyTorch; the next call of that shape builds again.

The wrappers (`diffusers_helper.acceleration.tensorrt_wrappers`, re-exported here) are drop-in modules with the
call signature of what they replace; the compiler is `acceleration.tensorrt_backend`, the on-disk cache
`acceleration.engine_cache`.
"""

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import diffusers
import torch
import transformers

from .acceleration.engine_cache import ENGINE_SUFFIX, EngineCache, cache_key
from .acceleration.measure import median_seconds, output_error
from .acceleration.tensorrt_backend import (
    BASE_SETTINGS,
    COMPONENT_SETTINGS,
    TOLERANCES,
    BuildCancelled,
    BuildProgress,
    TensorRTUnavailable,
    TorchTensorRTBackend,
)
from .acceleration.tensorrt_wrappers import (
    TensorRTCLIPTextEncoder,
    TensorRTLatentDecoder,
    TensorRTLatentEncoder,
    TensorRTTextEncoder,
    TensorRTTransformer,
    install_transformer_stack,
)
from .settings import CACHE_DIR, MIN_TENSORRT_SPEEDUP, InvalidSettings

__all__ = [
    "TensorRTRuntime",
    "TensorRTLatentEncoder",
    "TensorRTLatentDecoder",
    "TensorRTTextEncoder",
    "TensorRTCLIPTextEncoder",
    "TensorRTTransformer",
    "TensorRTUnavailable",
    "install_transformer_stack",
]

logger = logging.getLogger(__name__)

CACHE_DIR_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_DIR"
CACHE_LIMIT_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_GB"
TIMED_RUNS = 3  # calls timed, each way, when an engine is measured against PyTorch
# How Torch-TensorRT reports an engine TensorRT built but cannot run here (no kernels for this GPU, for one).
NO_EXECUTION_CONTEXT = "exec_ctx.get() != nullptr"


def default_cache_dir() -> Path:
    """FRAMEPACK_TENSORRT_CACHE_DIR, else Cache/tensorrt_engines; InvalidSettings when the variable names a file."""
    chosen = os.environ.get(CACHE_DIR_VARIABLE)
    if not chosen:
        return CACHE_DIR / "tensorrt_engines"
    if os.path.exists(chosen) and not os.path.isdir(chosen):
        raise InvalidSettings(f"{CACHE_DIR_VARIABLE} must name a directory, got {chosen!r}, which is a file")
    return Path(chosen)


def default_cache_limit() -> int | None:
    """FRAMEPACK_TENSORRT_CACHE_GB in bytes, or None (no cap) when unset or empty; InvalidSettings names a value
    that is not a positive, finite number of GB."""
    value = os.environ.get(CACHE_LIMIT_VARIABLE)
    if not value:
        return None
    try:
        limit = float(value) * 1024**3
    except ValueError:
        limit = float("nan")
    if not 0 < limit < float("inf"):  # false for nan too
        raise InvalidSettings(f"{CACHE_LIMIT_VARIABLE} must be a positive number of GB, got {value!r}")
    return int(limit)


# ---------------------------------------------------------------------------------------------------------------
# Signatures and fingerprints


def _signature(args: tuple) -> list:
    return [[list(a.shape), str(a.dtype).removeprefix("torch.")] for a in args]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap hash of names, shapes, dtypes and a strided sample of every tensor: other weights, other key."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].float()
            digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def code_fingerprint(module: torch.nn.Module) -> str:
    """A hash of the source of every class in the module tree (and of their attention processors): an edit of the
    code that gets exported makes another engine. Library upgrades are caught by their versions in the key."""
    classes = set()
    for child in module.modules():
        classes.add(type(child))
        if getattr(child, "processor", None) is not None:
            classes.add(type(child.processor))
    digest = hashlib.sha256()
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        digest.update(_class_source_digest(cls).encode())
    return digest.hexdigest()[:24]


@functools.cache
def _class_source_digest(cls: type) -> str:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # compiled or generated classes: their name is what is known
        source = ""
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(source.encode()).hexdigest()}"


# ---------------------------------------------------------------------------------------------------------------
# The runtime


@dataclass
class ComponentStatus:
    """What one component runs on, for status displays and the benchmarks."""

    engine: str = "pytorch"  # "tensorrt" once an engine served, "pytorch" otherwise
    reason: str = "not requested"
    busy: str | None = None  # what a long step under way does (compiling, loading, refitting an engine), since when,
    busy_since: float | None = None  # and how long it took the last time, where that is known
    busy_expected_seconds: float | None = None
    build: BuildProgress | None = None  # the build under way, which says how far it is
    engines: int = 0
    compiles: int = 0
    loads: int = 0
    refits: int = 0
    compile_seconds: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)
    refit_seconds: list[float] = field(default_factory=list)
    relative_errors: list[float] = field(default_factory=list)  # each engine checked, against PyTorch
    pytorch_weights_on_cpu: bool = False  # the engine holds the weights on the GPU; PyTorch's copy waits on the CPU

    def describe(self) -> str:
        if self.busy is not None:
            elapsed = time.perf_counter() - self.busy_since
            expected = "" if self.busy_expected_seconds is None else f" of about {self.busy_expected_seconds:.0f}s"
            detail = self.build.describe() if self.build is not None else None
            return f"{self.busy}... {elapsed:.0f}s{expected}" + (f"; {detail}" if detail else "")
        parked = "; PyTorch weights on the CPU" if self.pytorch_weights_on_cpu and self.engine == "tensorrt" else ""
        return f"{'TensorRT' if self.engine == 'tensorrt' else 'PyTorch'} ({self.reason}{parked})"


class TensorRTRuntime:
    """Engines per (component, input signature); one instance per process, shared by the wrappers."""

    def __init__(
        self, cache: EngineCache | None = None, backend: object | None = None, only_if_faster: bool = False
    ) -> None:
        self.cache = cache or EngineCache(default_cache_dir(), default_cache_limit())
        self.backend = backend or TorchTensorRTBackend()
        self.only_if_faster = only_if_faster
        self.status: dict[str, ComponentStatus] = {}
        # Held weakly by the module exported: engines and fingerprints go with the models they were made for.
        self._engines: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Callable]] = weakref.WeakKeyDictionary()
        self._fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()
        # The weights each module's engines were checked with (tensor identity and version), and engines whose
        # module's weights changed since, waiting to be refitted on their next call.
        self._weight_states: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()
        self._stale: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Callable]] = weakref.WeakKeyDictionary()
        # Signatures whose engine measured no faster than PyTorch: they run in PyTorch.
        self._slower: weakref.WeakKeyDictionary[torch.nn.Module, set[tuple]] = weakref.WeakKeyDictionary()
        # Modules whose PyTorch weights were (or may have been, by a build) sent to the CPU, and their device.
        self._parked: weakref.WeakKeyDictionary[torch.nn.Module, torch.device] = weakref.WeakKeyDictionary()
        self._kept_on_device: dict[str, tuple[torch.nn.Module, ...]] = {}
        self._pytorch: dict[str, str] = {}
        self.host = torch.device("cpu")
        self._cancelled: Callable[[], bool] = lambda: False  # builds give up once this is true
        self._unavailable: str | None = None
        self._checked = False
        self._lock = threading.Lock()

    # -- availability -------------------------------------------------------------------------------------------

    def availability(self) -> str | None:
        """Why TensorRT cannot serve in this process at all, or None when it can (checked once)."""
        if not self._checked:
            self._checked = True
            try:
                self.backend.check_available()
                self.cache.prepare()
            except TensorRTUnavailable as error:
                self._unavailable = str(error)
            except OSError as error:
                self._unavailable = f"engine cache directory {self.cache.directory} is not writable ({error})"
        return self._unavailable

    def register(
        self, component: str, keep_on_device: tuple[torch.nn.Module, ...] = (), pytorch: str = "eager"
    ) -> None:
        """Announce a component; `keep_on_device` are parts of it that other code runs in PyTorch (a step cache
        reading the first block), which stay on the GPU when the rest of its PyTorch weights move to the CPU;
        `pytorch` names how it runs in PyTorch (its engines' speed is measured and remembered against that)."""
        self.status.setdefault(component, ComponentStatus(reason="waiting for the first call"))
        self._kept_on_device[component] = keep_on_device
        self._pytorch[component] = pytorch

    def cannot_serve(self, components: list[str], reason: str) -> None:
        """TensorRT cannot run here at all: these components run in PyTorch, said once."""
        for component in components:
            self.status[component] = ComponentStatus(reason=f"fell back: {reason}")
        logger.warning("TensorRT cannot run here: %s; running %s in PyTorch", reason, ", ".join(components))

    def fall_back(self, component: str, reason: str) -> None:
        """Send a component back to PyTorch for the rest of the process, with one warning."""
        status = self.status.setdefault(component, ComponentStatus())
        if status.reason.startswith("fell back"):
            return
        status.engine, status.reason, status.busy = "pytorch", f"fell back: {reason}", None
        logger.warning("TensorRT %s: %s; running it in PyTorch", component, reason)

    def is_active(self, component: str) -> bool:
        status = self.status.get(component)
        return status is not None and not status.reason.startswith("fell back")

    @contextlib.contextmanager
    def cancel_builds_when(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Builds started inside the block give up once `cancelled()` is true: nothing is cached, the call runs in
        PyTorch, and the next call of that shape builds again."""
        previous, self._cancelled = self._cancelled, cancelled
        try:
            yield
        finally:
            self._cancelled = previous

    # -- the core -----------------------------------------------------------------------------------------------

    def run(self, component: str, module: torch.nn.Module, args: tuple, in_pytorch: Callable | None = None):
        """`module(*args)` through the component's engine for this signature, or in PyTorch when it cannot.

        `module` is what gets exported (tensors in, a tensor or tuple of tensors out) and the PyTorch reference
        each new engine must match. `in_pytorch` is how the call runs when it runs in PyTorch, where that is
        cheaper than `module(*args)` (inputs padded for an engine need no padding there); engines are timed
        against it.
        """
        if not self.is_active(component):
            return self._in_pytorch(component, module, args, in_pytorch)
        unavailable = self.availability()
        if unavailable:
            self.fall_back(component, unavailable)
            return self._in_pytorch(component, module, args, in_pytorch)
        args = tuple(a.contiguous() for a in args)  # engines take dense inputs only
        signature = (component, tuple(tuple(a.shape) for a in args), tuple(a.dtype for a in args))
        if signature in self._slower.get(module, ()):
            return self._in_pytorch(component, module, args, in_pytorch)
        try:
            if module in self._weight_states and self._weight_states[module] != _weight_state(module):
                self._weights_changed(component, module)
            engine = self._engines.get(module, {}).get(signature)
            if engine is None:
                engine = self._prepare(component, module, args, signature, in_pytorch)
            return self._in_pytorch(component, module, args, in_pytorch) if engine is None else engine(*args)
        except BuildCancelled:
            self._build_cancelled(component)
            return self._in_pytorch(component, module, args, in_pytorch)
        except Exception as error:  # any TensorRT failure: this component continues in PyTorch
            logger.debug("TensorRT %s failed", component, exc_info=True)
            self.fall_back(component, _describe(error))
            return self._in_pytorch(component, module, args, in_pytorch)

    def _build_cancelled(self, component: str) -> None:
        status = self.status[component]
        status.engine, status.reason = "pytorch", "engine build cancelled; the next run of this shape builds it"
        logger.info("TensorRT %s: the engine build was cancelled; nothing was cached", component)

    def _weights_changed(self, component: str, module: torch.nn.Module) -> None:
        """The weights are not those the engines were checked with: each engine is refitted (or, for a component
        keyed by its weights, found or built anew) on its next call."""
        logger.info("TensorRT %s: the weights changed; its engines will be refitted", component)
        self._fingerprints.pop(module, None)
        self._weight_states.pop(module, None)
        engines = self._engines.pop(module, {})
        if _refittable(component):
            self._stale.setdefault(module, {}).update(engines)

    # -- where the PyTorch weights are ---------------------------------------------------------------------------

    def _in_pytorch(self, component: str, module: torch.nn.Module, args: tuple, in_pytorch: Callable | None):
        """Run the call in PyTorch; if the module's weights were sent to the CPU, its engines go and the weights come
        back."""
        if module in self._parked:
            self._engines.pop(module, None)
            self._bring_back(component, module)
        return module(*args) if in_pytorch is None else in_pytorch()

    def _bring_back(self, component: str, module: torch.nn.Module) -> None:
        device = self._parked.pop(module, None)
        if device is not None:
            _move(module, device)
            self.status[component].pytorch_weights_on_cpu = False
            if module in self._weight_states:  # moved, not changed
                self._weight_states[module] = _weight_state(module)

    def _park(self, component: str, module: torch.nn.Module, device: torch.device) -> None:
        """The engine passed its check and holds the weights: PyTorch's copy goes to the CPU, except the parts other
        code still runs on the GPU."""
        if device == self.host:
            return
        self._parked[module] = device
        _move(module, self.host)
        for part in self._kept_on_device.get(component, ()):
            _move(part, device)
        self.status[component].pytorch_weights_on_cpu = True
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def _key(self, component: str, module: torch.nn.Module, args: tuple) -> tuple[str, dict, str]:
        """The cache key, what went into it, and the weights' fingerprint (in the key unless the component's engines
        are refittable: those are refitted to whatever weights the module has)."""
        if module not in self._fingerprints:
            self._fingerprints[module] = {"weights": weights_fingerprint(module), "code": code_fingerprint(module)}
        weights = self._fingerprints[module]["weights"]
        device = args[0].device
        gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        ingredients = {
            "component": component,
            "inputs": _signature(args),
            "code": self._fingerprints[module]["code"],
            **({} if _refittable(component) else {"weights": weights}),
            "settings": {**BASE_SETTINGS, **COMPONENT_SETTINGS[component]},
            "gpu": gpu.name if gpu else str(device),
            "compute_capability": f"{gpu.major}.{gpu.minor}" if gpu else None,
            "versions": {
                **self.backend.versions(),
                "diffusers": diffusers.__version__,
                "transformers": transformers.__version__,
            },
        }
        return cache_key(ingredients), ingredients, weights

    def _prepare(
        self, component: str, module: torch.nn.Module, args: tuple, signature: tuple, in_pytorch: Callable | None
    ) -> Callable | None:
        """Load or build the engine for this signature and check it against PyTorch (whose weights must be on the
        device for that, and go back to the CPU once the engine has passed)."""
        key, ingredients, weights = self._key(component, module, args)
        status = self.status[component]
        device = args[0].device
        with self._lock, self.cache.lock(key):
            rejected = self.cache.rejection(key)
            if rejected:
                self.fall_back(
                    component, f"this engine was rejected before ({rejected}; `engines.py prune --all` forgets that)"
                )
                return None
            versus = self._pytorch.get(component, "eager")
            speedup = self._remembered_speedup(key, versus) if self.only_if_faster else None
            if speedup is not None and speedup < MIN_TENSORRT_SPEEDUP:
                self._run_slower_in_pytorch(component, module, signature, speedup, versus)
                return None
            elsewhere = self._speedup_of_other_shapes(key, ingredients, versus) if self.only_if_faster else None
            if elsewhere is not None and elsewhere < MIN_TENSORRT_SPEEDUP:
                self._run_slower_in_pytorch(component, module, signature, elsewhere, versus, other_shape=True)
                return None
            self._bring_back(component, module)
            expected = module(*args)  # before a build, which may move the weights to the CPU
            timing = self.only_if_faster and speedup is None
            pytorch_seconds = median_seconds(in_pytorch or (lambda: module(*args)), TIMED_RUNS) if timing else None
            if device != self.host:
                self._parked[module] = device
            engine, how = self._stale.get(module, {}).pop(signature, None), "refitted"
            if engine is None:
                engine, how = self._load(component, key, weights), "loaded"
            if engine is not None and (how == "refitted" or engine.built_with != weights):
                engine, how = self._refit(component, engine, module, args), "refitted"
            error = None if engine is None else output_error(engine(*args), expected)
            if error is None or error > TOLERANCES[component]:
                if how == "refitted":
                    logger.warning("TensorRT %s: %s; building the engine again", component,
                                   "the refit failed" if error is None else f"the refitted engine is off by {error:.3g}")  # fmt: skip
                engine, how = self._build(component, key, module, args, {**ingredients, "weights": weights}), "built"
                error = output_error(engine(*args), expected)
            if error <= TOLERANCES[component] and pytorch_seconds is not None:
                speedup = self._measure(component, key, engine, args, pytorch_seconds, versus)
        status.relative_errors.append(error)
        if error > TOLERANCES[component]:
            self.cache.reject(key, f"relative error {error:.3g} against PyTorch", ingredients)
            self.fall_back(component, f"engine output differs from PyTorch (relative error {error:.3g})")
            return None
        if speedup is not None and speedup < MIN_TENSORRT_SPEEDUP:
            self._run_slower_in_pytorch(component, module, signature, speedup, versus)
            return None
        logger.info("TensorRT %s engine ready (%s, relative error %.2g)", component, how, error)
        self._engines.setdefault(module, {})[signature] = engine
        status.engine, status.reason, status.engines = "tensorrt", "engine in use", status.engines + 1
        self._park(component, module, device)
        self._weight_states[module] = _weight_state(module)
        return engine

    def _remembered_speedup(self, key: str, versus: str) -> float | None:
        measured = ((self.cache.metadata(key) or {}).get("speedups") or {}).get(versus)
        return None if measured is None else measured["speedup"]

    def _speedup_of_other_shapes(self, key: str, ingredients: dict, versus: str) -> float | None:
        """For a shape with no engine in the cache: the most recent speed-up measured for an engine of this component
        built for another shape with the same code, settings, GPU and versions. A full-size build takes minutes,
        which an engine known to lose to PyTorch on this GPU would not repay."""
        if self.cache.metadata(key) is not None:
            return None
        same = ("component", "code", "settings", "gpu", "compute_capability", "versions")
        wanted = json.loads(json.dumps({k: ingredients[k] for k in same}))  # as the cache's records hold them
        measured = [record["speedups"][versus]["speedup"] for record in self.cache.describe()
                    if versus in (record.get("speedups") or {}) and {k: record.get(k) for k in same} == wanted]  # fmt: skip
        return measured[-1] if measured else None

    def _measure(
        self, component: str, key: str, engine: Callable, args: tuple, pytorch_seconds: float, versus: str
    ) -> float:
        """The engine's speed-up over PyTorch (`versus`: how PyTorch ran) on the same inputs, kept in its cache
        record beside those measured against other ways of running PyTorch."""
        engine_seconds = median_seconds(lambda: engine(*args), TIMED_RUNS)
        speedup = pytorch_seconds / engine_seconds
        logger.info("TensorRT %s engine: %.3fs a call against PyTorch's %.3fs (%s): %.2fx", component, engine_seconds,
                    pytorch_seconds, versus, speedup)  # fmt: skip
        speedups = (self.cache.metadata(key) or {}).get("speedups") or {}
        speedups[versus] = {"speedup": round(speedup, 3), "engine_seconds": engine_seconds,
                            "pytorch_seconds": pytorch_seconds}  # fmt: skip
        self._annotate(
            component, key, {"speedups": speedups}, "the engine's speed", "the next process measures it again"
        )
        return speedup

    def _annotate(self, component: str, key: str, fields: dict, what: str, otherwise: str) -> None:
        """Add a measurement to the engine's cache record; a cache that cannot take it costs a warning, not the
        engine."""
        try:
            self.cache.annotate(key, fields)
        except OSError as error:
            logger.warning("TensorRT %s: could not keep %s in the cache (%s); %s", component, what, error, otherwise)

    def _run_slower_in_pytorch(
        self,
        component: str,
        module: torch.nn.Module,
        signature: tuple,
        speedup: float,
        versus: str,
        other_shape: bool = False,
    ) -> None:
        """An engine no faster than PyTorch (this one, or for `other_shape`, one built for another input shape): this
        signature runs in PyTorch (weights back on the GPU, if a build or an earlier engine sent them away), and the
        status says why."""
        self._slower.setdefault(module, set()).add(signature)
        status = self.status[component]
        status.engine = "pytorch"
        which = "an engine of it for another input shape" if other_shape else "its engine"
        kept = "so none is built for this one" if other_shape else "measured once, kept in the engine cache"
        status.reason = (f"{which} measured {speedup:.2f}x the speed of PyTorch ({versus}) on this GPU, under the "
                         f"{MIN_TENSORRT_SPEEDUP:.2f}x it must reach; {kept}")  # fmt: skip
        logger.info("TensorRT %s: %s", component, status.reason)

    def _refit(self, component: str, engine: Callable, module: torch.nn.Module, args: tuple) -> Callable | None:
        """The engine with the module's current weights written into it, or None if the refit fails."""
        started = time.perf_counter()
        try:
            with self._busy(component, "refitting engine (new weights)"):
                refitted = self.backend.refit(engine, module, args)
        except Exception as error:  # a failed refit costs a build, not the component
            logger.debug("TensorRT %s refit failed", component, exc_info=True)
            logger.info("TensorRT %s refit failed: %s", component, _describe(error))
            return None
        status = self.status[component]
        status.refits += 1
        status.refit_seconds.append(time.perf_counter() - started)
        logger.info("TensorRT %s engine refitted in %.1fs", component, status.refit_seconds[-1])
        return refitted

    def _load(self, component: str, key: str, weights: str) -> Callable | None:
        """The cached engine, marked with the weights it was built with (`built_with`), or None."""
        path = self.cache.lookup(key)
        if path is None:
            return None
        metadata = self.cache.metadata(key) or {}
        built_with = metadata.get("weights", weights)
        started = time.perf_counter()
        try:
            with self._busy(component, "loading engine from the cache", metadata.get("load_seconds")):
                engine = self.backend.load(path)
        except Exception as error:  # whatever the reason, an engine that will not load is rebuilt
            logger.debug("TensorRT %s engine %s will not load", component, path, exc_info=True)
            self.cache.remove(key, f"it will not load ({_describe(error)}); rebuilding")
            return None
        elapsed = time.perf_counter() - started
        status = self.status[component]
        status.loads += 1
        status.load_seconds.append(elapsed)
        logger.info("TensorRT %s engine loaded from %s in %.1fs", component, path, elapsed)
        # at full size a load takes minutes: the next one's status says how long to expect
        self._annotate(
            component, key, {"load_seconds": round(elapsed, 1)}, "the load time", "the next load has no estimate"
        )
        engine.built_with = built_with
        return engine

    def _build(self, component: str, key: str, module, args: tuple, ingredients: dict) -> Callable:
        status = self.status[component]
        started = time.perf_counter()
        logger.info(
            "compiling TensorRT engine for %s, inputs %s (first run of this shape; this can take minutes)",
            component,
            ingredients["inputs"],
        )
        settings = {**BASE_SETTINGS, **COMPONENT_SETTINGS[component]}
        progress = status.build = BuildProgress(self._cancelled)
        last_build = self._last_build_seconds(component, ingredients["gpu"])
        with self._busy(component, "compiling engine (first run of this shape)", last_build):
            try:
                compiled = self.backend.compile(module, args, settings, progress)
            except BuildCancelled:
                raise
            except Exception as error:
                self._remember_failed_build(key, ingredients, error)
                raise
            compiled_at = time.perf_counter()
            with tempfile.TemporaryDirectory(
                dir=self.cache.directory, prefix=self.cache.staging_prefix(key)
            ) as staging:
                built = Path(staging) / f"engine{ENGINE_SUFFIX}"
                self.backend.save(compiled, args, built, progress)
                saved_at = time.perf_counter()
                timing = {
                    "build_seconds": round(saved_at - started, 1),
                    "save_seconds": round(saved_at - compiled_at, 1),
                }
                self.cache.store(key, built, {**ingredients, **timing})
        elapsed = time.perf_counter() - started
        status.compiles += 1
        status.compile_seconds.append(elapsed)
        logger.info("TensorRT %s engine compiled and saved in %.1fs (saving %.1fs)", component, elapsed,
                    timing["save_seconds"])  # fmt: skip
        return compiled

    def _remember_failed_build(self, key: str, ingredients: dict, error: Exception) -> None:
        """A build that failed for a reason other than memory fails again with the same code, shapes, settings, GPU
        and versions (all in the key): later processes skip it instead of paying for it again (at full size, minutes).
        A build that ran out of memory may fit another time."""
        if not _out_of_memory(error):
            self.cache.reject(key, f"its build failed: {_describe(error)}", ingredients)

    @contextlib.contextmanager
    def _busy(self, component: str, activity: str, expected_seconds: float | None = None) -> Iterator[None]:
        """A step that can take minutes at full size: the status says what and for how long, the log repeats it every
        30 s, so neither the app nor a terminal looks frozen."""
        status = self.status[component]
        status.busy, status.busy_since, status.busy_expected_seconds = activity, time.perf_counter(), expected_seconds
        try:
            with _Heartbeat(lambda: f"TensorRT {component}: still {status.describe()}"):
                yield
        finally:
            status.busy = status.busy_since = status.busy_expected_seconds = status.build = None

    def _last_build_seconds(self, component: str, gpu: str) -> float | None:
        """The most recent build of this component on this GPU, for an estimate while the next one runs."""
        builds = [r["build_seconds"] for r in self.cache.describe()
                  if r.get("component") == component and r.get("gpu") == gpu and "build_seconds" in r]  # fmt: skip
        return builds[-1] if builds else None

    # -- reports ------------------------------------------------------------------------------------------------

    def report(self) -> list[str]:
        """One line per component, what it runs on and why; first, why TensorRT cannot run here, if it cannot."""
        lines = [f"cannot run here: {self._unavailable}"] if self._unavailable else []
        return lines + [f"{component}: {status.describe()}" for component, status in self.status.items()]

    def environment(self) -> dict:
        """GPU, versions and cache, for `--tensorrt-info` and bug reports."""
        info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cache_dir": str(self.cache.directory)}
        info["cache_bytes"] = self.cache.size_bytes()
        if torch.cuda.is_available():
            properties = torch.cuda.get_device_properties(torch.cuda.current_device())
            info.update(gpu=properties.name, compute_capability=f"{properties.major}.{properties.minor}")
        else:
            info["gpu"] = None
        try:
            self.backend.check_available()
            info.update(self.backend.versions())
        except TensorRTUnavailable as error:
            info["torch_tensorrt"] = f"unavailable: {error}"
        return info


def _refittable(component: str) -> bool:
    return COMPONENT_SETTINGS[component].get("immutable_weights") is False


def _weight_state(module: torch.nn.Module) -> tuple:
    """Which tensors hold the weights, how often each was changed in place, and a strided sum of each: an edit made
    through `.data` (as LoRA fusing does) bumps no version counter, so the values are looked at too. Cheap where the
    engine holds the weights: PyTorch's copy is then in host memory."""
    with torch.no_grad():
        return tuple(
            (t.data_ptr(), t._version, float(t.reshape(-1)[:: max(1, t.numel() // 64)].float().sum()))
            for t in [*module.parameters(), *module.buffers()]
        )


def _move(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _describe(error: BaseException) -> str:
    if _out_of_memory(error):
        return f"out of GPU memory while building or running the engine ({type(error).__name__})"
    if NO_EXECUTION_CONTEXT in str(error):  # Torch-TensorRT's check; TensorRT logged its own error just before
        return (
            "TensorRT built the engine but could not create its execution context on this GPU"
            " (TensorRT's own error is in the log above)"
        )
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class _Heartbeat:
    """Logs `message()` every 30 s until the block ends."""

    def __init__(self, message: Callable[[], str], every: float = 30.0) -> None:
        self.message, self.every = message, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            logger.info("%s", self.message())

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
