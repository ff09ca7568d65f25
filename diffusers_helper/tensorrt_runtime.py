"""TensorRT for FramePack's models: just-in-time engines per input shape, cached on disk, PyTorch as the fallback.

`TensorRTRuntime` is the policy that ties the parts together. For each call of a wrapped module it finds the engine
for that input signature (in memory, else on disk, else it builds one), checks each new engine's first output against
PyTorch, and runs it. Once an engine has passed its check it holds the weights on the GPU, and PyTorch's copy goes
where the component's `WeightParking` (the memory policy's) keeps it; it comes back when the component runs in
PyTorch. Components built with refittable weights (the transformer) are keyed without their weights: when the weights
change (a LoRA fused in, or any in-place edit) or an engine from the cache was built with other weights, the engine is
refitted with the current ones instead of built again, and checked again. An engine serves only where the speed
policy allows (with `only_if_faster`: where it measured fast enough against PyTorch, measured once and remembered).

What goes wrong inside Torch-TensorRT or TensorRT (no torch_tensorrt, no CUDA, an export or build error, running out
of memory while building, an engine that will not load, a wrong or failing engine) costs one warning and sends that
component back to PyTorch for the rest of the process; the other components keep their engines. An error in the
runtime's own code is raised. A build can be cancelled (`cancel_builds_when`, which the engine ties to a job's stop):
it gives up within TensorRT's next progress step, caches nothing, and that call runs in PyTorch.

The parts, each a module of `acceleration/`: engine_keys (what an engine is keyed by), engine_cache (engines on disk,
and where that is), tensorrt_backend (Torch-TensorRT, and what counts as its failure), engine_status (what each
component runs on), speed_policy (where an engine is fast enough to serve), and tensorrt_wrappers (the drop-in
modules, re-exported here).
"""

import contextlib
import gc
import logging
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .acceleration.engine_cache import (
    CACHE_DIR_VARIABLE,
    CACHE_LIMIT_VARIABLE,
    ENGINE_SUFFIX,
    EngineCache,
    default_cache_dir,
    default_cache_limit,
)
from .acceleration.engine_keys import EngineKey, EngineKeys, gpu_identity, weight_state
from .acceleration.engine_status import ComponentStatus, EngineSource, busy
from .acceleration.measure import output_error
from .acceleration.speed_policy import EngineSpeedPolicy, SlowerThanPyTorch
from .acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecords
from .acceleration.tensorrt_backend import (
    TOLERANCES,
    BuildCancelled,
    BuildProgress,
    TensorRTFailure,
    TensorRTUnavailable,
    TorchTensorRTBackend,
    compile_settings,
    refittable,
    tensorrt_errors,
)
from .acceleration.tensorrt_wrappers import (
    TensorRTCLIPTextEncoder,
    TensorRTLatentDecoder,
    TensorRTLatentEncoder,
    TensorRTTextEncoder,
    TensorRTTransformer,
    WeightParking,
    install_transformer_stack,
)
from .errors import describe_error

__all__ = [
    "CACHE_DIR_VARIABLE",
    "CACHE_LIMIT_VARIABLE",
    "TensorRTRuntime",
    "TensorRTLatentEncoder",
    "TensorRTLatentDecoder",
    "TensorRTTextEncoder",
    "TensorRTCLIPTextEncoder",
    "TensorRTTransformer",
    "TensorRTUnavailable",
    "default_cache_dir",
    "default_cache_limit",
    "install_transformer_stack",
]

logger = logging.getLogger(__name__)

Signature = tuple  # (component, input shapes, input dtypes): one engine each


class TensorRTRuntime:
    """Engines per (component, input signature); one instance per process, shared by the wrappers."""

    def __init__(
        self,
        cache: EngineCache | None = None,
        backend: object | None = None,
        only_if_faster: bool = False,
        speeds: SpeedRecords | None = None,
    ) -> None:
        self.cache = cache or EngineCache(default_cache_dir(), default_cache_limit())
        self.backend = backend or TorchTensorRTBackend()
        self.speeds = EngineSpeedPolicy(speeds or SpeedRecords(self.cache.directory / SPEED_RECORDS_FILE),
                                        only_if_faster)  # fmt: skip
        self.status: dict[str, ComponentStatus] = {}
        self._keys = EngineKeys()
        # Held weakly by the module exported: engines go with the models they were made for.
        self._engines: weakref.WeakKeyDictionary[torch.nn.Module, dict[Signature, Callable]] = (
            weakref.WeakKeyDictionary()
        )
        # The weights each module's engines were checked with, and engines whose module's weights changed since,
        # waiting to be refitted on their next call.
        self._weight_states: weakref.WeakKeyDictionary[torch.nn.Module, tuple] = weakref.WeakKeyDictionary()
        self._stale: weakref.WeakKeyDictionary[torch.nn.Module, dict[Signature, Callable]] = weakref.WeakKeyDictionary()
        # Signatures whose engine measured no faster than PyTorch: they run in PyTorch.
        self._slower: weakref.WeakKeyDictionary[torch.nn.Module, set[Signature]] = weakref.WeakKeyDictionary()
        self._parking: dict[str, WeightParking] = {}
        self._pytorch: dict[str, str] = {}
        self._cancelled: Callable[[], bool] = lambda: False  # builds give up once this is true
        self._unavailable: str | None = None
        self._checked = False
        self._lock = threading.Lock()

    @property
    def only_if_faster(self) -> bool:
        return self.speeds.only_if_faster

    @only_if_faster.setter
    def only_if_faster(self, value: bool) -> None:
        self.speeds.only_if_faster = value

    # -- what runs where ----------------------------------------------------------------------------------------

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

    def register(self, component: str, pytorch: str = "eager", parking: WeightParking | None = None) -> None:
        """Announce a component. `pytorch` names how it runs in PyTorch (its engines' speed is measured and remembered
        against that); `parking` keeps PyTorch's copy of its weights while an engine holds them (without one, the
        weights stay where they are)."""
        self.status.setdefault(component, ComponentStatus(reason="waiting for the first call"))
        self._pytorch[component] = pytorch
        if parking is not None:
            self._parking[component] = parking

    def cannot_serve(self, components: list[str], reason: str) -> None:
        """TensorRT cannot run here at all: these components run in PyTorch, said once."""
        for component in components:
            self.status[component] = ComponentStatus(reason=f"fell back: {reason}")
        logger.warning("TensorRT cannot run here: %s; running %s in PyTorch", reason, ", ".join(components))

    def fall_back(self, component: str, reason: str) -> None:
        """Send a component back to PyTorch for the rest of the process, with one warning."""
        status = self.status.setdefault(component, ComponentStatus())
        if status.fell_back:
            return
        status.engine, status.reason, status.busy = "pytorch", f"fell back: {reason}", None
        logger.warning("TensorRT %s: %s; running it in PyTorch", component, reason)
        dropped = [module for module, engines in self._engines.items() if any(s[0] == component for s in engines)]
        for module in dropped:  # what their engines hold is the GPU's again
            del self._engines[module]
        _release_dropped_engines()

    def is_active(self, component: str) -> bool:
        status = self.status.get(component)
        return status is not None and not status.fell_back

    def engines_of(self, module: torch.nn.Module) -> list[Callable]:
        """The engines serving this module now, one per input signature (for benchmarks that look inside one)."""
        return list(self._engines.get(module, {}).values())

    @contextlib.contextmanager
    def cancel_builds_when(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Builds started inside the block give up once `cancelled()` is true: nothing is cached, the call runs in
        PyTorch, and the next call of that shape builds again."""
        previous, self._cancelled = self._cancelled, cancelled
        try:
            yield
        finally:
            self._cancelled = previous

    # -- a call ----------------------------------------------------------------------------------------------------

    def run(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        in_pytorch: Callable | None = None,
        part: str | None = None,
    ):
        """`module(*args)` through the component's engine for this signature, or in PyTorch when it cannot.

        `module` is what gets exported (tensors in, a tensor or tuple of tensors out) and the PyTorch reference
        each new engine must match. `in_pytorch` is how the call runs when it runs in PyTorch, where that is
        cheaper than `module(*args)` (inputs padded for an engine need no padding there); engines are timed
        against it. `part` tells apart the modules of a component that runs as several (the transformer's
        stretches of blocks): it is part of their engines' keys.
        """
        if not self._may_serve(component):
            return self._in_pytorch(component, module, args, in_pytorch)
        args = tuple(a.contiguous() for a in args)  # engines take dense inputs only
        signature = (component, tuple(tuple(a.shape) for a in args), tuple(a.dtype for a in args))
        if signature in self._slower.get(module, ()):
            return self._in_pytorch(component, module, args, in_pytorch)
        output = self._through_engine(component, module, args, signature, in_pytorch, part)
        return self._in_pytorch(component, module, args, in_pytorch) if output is _NOT_SERVED else output

    def _through_engine(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        signature: Signature,
        in_pytorch: Callable | None,
        part: str | None,
    ):
        """The call through its engine, or _NOT_SERVED where PyTorch must run it (by then this frame, and with it a
        failed engine, is gone, so its memory can be freed before the weights come back)."""
        try:
            engine = self._engine_for(component, module, args, signature, in_pytorch, part)
            if engine is not None:
                return _run_engine(engine, args)
        except BuildCancelled:
            self._build_cancelled(component)
        except TensorRTFailure as failure:
            logger.debug("TensorRT %s failed", component, exc_info=True)
            self.fall_back(component, str(failure))
        except OSError as error:  # the engine cache's disk, not TensorRT
            logger.debug("TensorRT %s: the engine cache failed", component, exc_info=True)
            self.fall_back(component, f"the engine cache in {self.cache.directory} failed ({describe_error(error)})")
        return _NOT_SERVED

    def _may_serve(self, component: str) -> bool:
        if not self.is_active(component):
            return False
        unavailable = self.availability()
        if unavailable:
            self.fall_back(component, unavailable)
            return False
        return True

    def _engine_for(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        signature: Signature,
        in_pytorch: Callable | None,
        part: str | None,
    ) -> Callable | None:
        """The engine that serves this signature: the one in memory, unless the weights changed since it was checked;
        else one prepared now (None where PyTorch serves instead)."""
        if module in self._weight_states and self._weight_states[module] != weight_state(module):
            self._weights_changed(component, module)
        engine = self._engines.get(module, {}).get(signature)
        return engine if engine is not None else self._prepare(component, module, args, signature, in_pytorch, part)

    def _prepare(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        signature: Signature,
        in_pytorch: Callable | None,
        part: str | None,
    ) -> Callable | None:
        """Find, load, refit or build the engine for this signature, check it against PyTorch and, where the speed
        policy asks, time it; the engine, or None where PyTorch serves this signature."""
        key = self._keys.key(component, module, args, compile_settings(component), self.backend.versions(),
                             refittable(component), part)  # fmt: skip
        versus = self._pytorch.get(component, "eager")
        with self._lock, self.cache.lock(key.key):
            rejected = self.cache.rejection(key.key)
            if rejected:
                self.fall_back(
                    component, f"this engine was rejected before ({rejected}; `engines.py prune --all` forgets that)"
                )
                return None
            cached = self.cache.metadata(key.key) is not None
            slower = self.speeds.known_slower(key.ingredients, versus, engine_cached=cached)
            if slower:
                self._serve_in_pytorch(component, module, signature, slower)
                return None
            self._bring_back(component, module)
            expected = module(*args)  # before a build, which may move the weights to the CPU
            timed = self.speeds.needs_timing(key.ingredients, versus)
            pytorch_seconds = self.speeds.time_pytorch(in_pytorch or (lambda: module(*args))) if timed else None
            engine, source, error = self._checked_engine(component, key, module, args, signature, expected)
            self.status[component].relative_errors.append(error)
            if error > TOLERANCES[component]:
                self.cache.reject(key.key, f"relative error {error:.3g} against PyTorch", key.ingredients)
                self.fall_back(component, f"engine output differs from PyTorch (relative error {error:.3g})")
                return None
            if pytorch_seconds is not None:
                slower = self.speeds.judge(component, lambda: _run_engine(engine, args), pytorch_seconds,
                                           key.ingredients, versus)  # fmt: skip
                if slower:
                    self._serve_in_pytorch(component, module, signature, slower)
                    return None
        self._serve(component, module, signature, engine, source, error)
        return engine

    def _checked_engine(
        self, component: str, key: EngineKey, module: torch.nn.Module, args: tuple, signature: Signature, expected
    ) -> tuple[Callable, EngineSource, float]:
        """An engine for this signature, how it came, and its error against PyTorch: a stale engine refitted with the current
        weights, else the cached one (refitted where it holds other weights), else a new build. A refit that fails or
        comes out wrong costs a build."""
        engine, source = self._stale.get(module, {}).pop(signature, None), None
        if engine is not None:
            engine, source = self._refit(component, engine, module, args), EngineSource.REFITTED
        else:
            found = self._load(component, key, module)
            if found is not None:
                engine, built_with = found
                source = EngineSource.LOADED
                if built_with != key.weights:
                    self._bring_back(component, module)  # a refit reads the weights where PyTorch runs them
                    engine, source = self._refit(component, engine, module, args), EngineSource.REFITTED
        error = None if engine is None else output_error(_run_engine(engine, args), expected)
        if error is None or error > TOLERANCES[component]:
            if source is EngineSource.REFITTED:
                logger.warning("TensorRT %s: %s; building the engine again", component,
                               "the refit failed" if error is None else f"the refitted engine is off by {error:.3g}")  # fmt: skip
            self._bring_back(component, module)  # a build, too
            engine, source = self._build(component, key, module, args), EngineSource.BUILT
            self._park(component, module)  # a build may leave them on the host (the transformer's does): parked
            error = output_error(_run_engine(engine, args), expected)
        return engine, source, error

    def _serve(
        self,
        component: str,
        module: torch.nn.Module,
        signature: Signature,
        engine: Callable,
        source: EngineSource,
        error: float,
    ) -> None:
        """The engine passed: it serves this signature, and PyTorch's copy of the weights is parked."""
        logger.info("TensorRT %s engine ready (%s, relative error %.2g)", component, source.value, error)
        self._engines.setdefault(module, {})[signature] = engine
        status = self.status[component]
        status.engine, status.reason, status.engines = "tensorrt", "engine in use", status.engines + 1
        self._park(component, module)
        self._weight_states[module] = weight_state(module)

    def _serve_in_pytorch(
        self, component: str, module: torch.nn.Module, signature: Signature, slower: SlowerThanPyTorch
    ) -> None:
        """This signature runs in PyTorch (its weights back on the GPU on its next call), and the status says why."""
        self._slower.setdefault(module, set()).add(signature)
        status = self.status[component]
        status.engine, status.reason = "pytorch", slower.reason()
        logger.info("TensorRT %s: %s", component, status.reason)

    def _build_cancelled(self, component: str) -> None:
        status = self.status[component]
        status.engine, status.reason = "pytorch", "engine build cancelled; the next run of this shape builds it"
        logger.info("TensorRT %s: the engine build was cancelled; nothing was cached", component)

    def _weights_changed(self, component: str, module: torch.nn.Module) -> None:
        """The weights are not those the engines were checked with: each engine is refitted (or, for a component
        keyed by its weights, found or built anew) on its next call."""
        logger.info("TensorRT %s: the weights changed; its engines will be refitted", component)
        self._keys.forget(module)
        self._weight_states.pop(module, None)
        engines = self._engines.pop(module, {})
        if refittable(component):
            self._stale.setdefault(module, {}).update(engines)

    # -- PyTorch's copy of the weights ---------------------------------------------------------------------------

    def _in_pytorch(self, component: str, module: torch.nn.Module, args: tuple, in_pytorch: Callable | None):
        """Run the call in PyTorch. If the weights had left the GPU for an engine, that module's engines go and the
        weights come back: the GPU holds one copy of the weights."""
        parking = self._parking.get(component)
        if parking is not None and parking.is_parked(module):
            self._engines.pop(module, None)
            _release_dropped_engines()
            self._bring_back(component, module)
        return module(*args) if in_pytorch is None else in_pytorch()

    def _park(self, component: str, module: torch.nn.Module) -> None:
        parking = self._parking.get(component)
        if parking is not None and parking.park(module):
            self.status[component].pytorch_weights_on_cpu = True

    def _bring_back(self, component: str, module: torch.nn.Module) -> bool:
        parking = self._parking.get(component)
        if parking is None or not parking.bring_back(module):
            return False
        self.status[component].pytorch_weights_on_cpu = False
        if module in self._weight_states:  # moved, not changed
            self._weight_states[module] = weight_state(module)
        return True

    # -- the engine's life: refit, load, build --------------------------------------------------------------------

    def _refit(self, component: str, engine: Callable, module: torch.nn.Module, args: tuple) -> Callable | None:
        """The engine with the module's current weights written into it, or None if the refit fails."""
        status = self.status[component]
        started = time.perf_counter()
        try:
            with busy(component, status, "refitting engine (new weights)"), tensorrt_errors():
                refitted = self.backend.refit(engine, module, args)
        except TensorRTFailure as failure:  # a failed refit costs a build, not the component
            logger.debug("TensorRT %s refit failed", component, exc_info=True)
            logger.info("TensorRT %s refit failed: %s", component, failure)
            return None
        status.refits += 1
        status.refit_seconds.append(time.perf_counter() - started)
        logger.info("TensorRT %s engine refitted in %.1fs", component, status.refit_seconds[-1])
        return refitted

    def _load(self, component: str, key: EngineKey, module: torch.nn.Module) -> tuple[Callable, str] | None:
        """The cached engine and the fingerprint of the weights it was built with, or None (an engine that will not
        load is removed, to be built again). PyTorch's copy of the weights is parked first, so the engine's copy
        takes its place on the GPU instead of room beside it."""
        path = self.cache.lookup(key.key)
        if path is None:
            return None
        metadata = self.cache.metadata(key.key) or {}
        status = self.status[component]
        started = time.perf_counter()
        self._park(component, module)
        try:
            with busy(component, status, "loading engine from the cache", metadata.get("load_seconds")), \
                    tensorrt_errors():  # fmt: skip
                engine = self.backend.load(path, self.cache.kernels(key.key))
        except TensorRTFailure as failure:
            self._bring_back(component, module)
            logger.debug("TensorRT %s engine %s will not load", component, path, exc_info=True)
            self.cache.remove(key.key, f"it will not load ({failure}); rebuilding")
            return None
        elapsed = time.perf_counter() - started
        status.loads += 1
        status.load_seconds.append(elapsed)
        logger.info("TensorRT %s engine loaded from %s in %.1fs", component, path, elapsed)
        # at full size a load takes minutes: the next one's status says how long to expect
        self._annotate(component, key.key, {"load_seconds": round(elapsed, 1)}, "the load time",
                       "the next load has no estimate")  # fmt: skip
        return engine, metadata.get("weights", key.weights)

    def _build(self, component: str, key: EngineKey, module: torch.nn.Module, args: tuple) -> Callable:
        """Compile, save and store an engine. A build that fails for a reason other than memory fails again with the
        same code, shapes, settings, GPU and versions (all in the key): it is remembered, so later processes skip it
        instead of paying for it again (at full size, minutes). A build that ran out of memory may fit another time."""
        status = self.status[component]
        started = time.perf_counter()
        part = key.ingredients.get("part")
        logger.info("compiling TensorRT engine for %s%s, inputs %s (first run of this shape; this can take minutes)",
                    component, f" ({part})" if part else "", key.ingredients["inputs"])  # fmt: skip
        progress = status.build = BuildProgress(self._cancelled)
        last_build = self._last_build_seconds(component, key.ingredients["gpu"])
        activity = f"compiling engine{f' for {part}' if part else ''} (first run of this shape)"
        with busy(component, status, activity, last_build):
            try:
                with tensorrt_errors():
                    compiled = self.backend.compile(module, args, compile_settings(component), progress)
            except TensorRTFailure as failure:
                if not failure.out_of_memory:
                    self.cache.reject(key.key, f"its build failed: {failure}", key.ingredients)
                raise
            compiled_at = time.perf_counter()
            with tempfile.TemporaryDirectory(
                dir=self.cache.directory, prefix=self.cache.staging_prefix(key.key)
            ) as staging:
                built = Path(staging) / f"engine{ENGINE_SUFFIX}"
                with tensorrt_errors():
                    self.backend.save(compiled, args, built, progress)
                saved_at = time.perf_counter()
                timing = {
                    "build_seconds": round(saved_at - started, 1),
                    "save_seconds": round(saved_at - compiled_at, 1),
                }
                self.cache.store(key.key, built, {**key.ingredients, "weights": key.weights, **timing})
        elapsed = time.perf_counter() - started
        status.compiles += 1
        status.compile_seconds.append(elapsed)
        logger.info("TensorRT %s engine compiled and saved in %.1fs (saving %.1fs)", component, elapsed,
                    timing["save_seconds"])  # fmt: skip
        return compiled

    def _annotate(self, component: str, key: str, fields: dict, what: str, otherwise: str) -> None:
        """Add a measurement to the engine's cache record; a cache that cannot take it costs a warning, not the
        engine."""
        try:
            self.cache.annotate(key, fields)
        except OSError as error:
            logger.warning("TensorRT %s: could not keep %s in the cache (%s); %s", component, what, error, otherwise)

    def _last_build_seconds(self, component: str, gpu: str) -> float | None:
        """The most recent build of this component on this GPU, for an estimate while the next one runs."""
        builds = [r["build_seconds"] for r in self.cache.describe()
                  if r.get("component") == component and r.get("gpu") == gpu and "build_seconds" in r]  # fmt: skip
        return builds[-1] if builds else None

    # -- reports --------------------------------------------------------------------------------------------------

    def report(self) -> list[str]:
        """One line per component, what it runs on and why; first, why TensorRT cannot run here, if it cannot."""
        lines = [f"cannot run here: {self._unavailable}"] if self._unavailable else []
        return lines + [f"{component}: {status.describe()}" for component, status in self.status.items()]

    def environment(self) -> dict:
        """GPU, versions and cache, for `--tensorrt-info` and bug reports."""
        info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cache_dir": str(self.cache.directory)}
        info["cache_bytes"] = self.cache.size_bytes()
        if torch.cuda.is_available():
            info.update(gpu_identity(torch.device("cuda", torch.cuda.current_device())))
        else:
            info["gpu"] = None
        try:
            self.backend.check_available()
            info.update(self.backend.versions())
        except TensorRTUnavailable as error:
            info["torch_tensorrt"] = f"unavailable: {error}"
        return info


_NOT_SERVED = object()  # what `_through_engine` returns where PyTorch runs the call


def _run_engine(engine: Callable, args: tuple):
    with tensorrt_errors():
        return engine(*args)


def _release_dropped_engines() -> None:
    """Free the GPU memory of engines no longer referenced now: Torch-TensorRT's compiled modules are graph modules,
    which refer to themselves, so without a collection their engines would hold the GPU until Python's next full
    one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
