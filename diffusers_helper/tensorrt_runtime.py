"""TensorRT for FramePack's models: just-in-time engines per input shape, cached on disk, PyTorch as the fallback.

`TensorRTRuntime` owns the policy: for each call of a wrapped module it finds the engine for that input
signature (in memory, else on disk, else it compiles one with `torch_tensorrt.dynamo.compile` through
`torch.export`), checks each new engine's first output against PyTorch, and runs it. Anything that goes wrong
(no torch_tensorrt, no CUDA, an export or build error, running out of memory while building, an engine that
will not load, a wrong or failing engine) costs one warning and sends that component back to PyTorch for the
rest of the process; the other components keep their engines.

The wrappers are drop-in modules with the call signature of what they replace:
`TensorRTLatentEncoder` / `TensorRTLatentDecoder` replace the VAE's `encoder` / `decoder`,
`TensorRTTextEncoder` the LLaMA text encoder, `TensorRTCLIPTextEncoder` the CLIP one, and
`TensorRTTransformer` the transformer's stack of dual- and single-stream blocks (installed with diffusers hooks,
so embedders, rope and history packing stay in PyTorch and cache hooks like TeaCache still wrap the stack).
"""

import hashlib
import inspect
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

from .engine_cache import ENGINE_SUFFIX, EngineCache, cache_key
from .paths import CACHE_DIR
from .settings import InvalidSettings

logger = logging.getLogger(__name__)

CACHE_DIR_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_DIR"
CACHE_LIMIT_VARIABLE = "FRAMEPACK_TENSORRT_CACHE_GB"
INSTALL_HINT = (
    "install Torch-TensorRT matching your torch: `pip install torch-tensorrt` (TensorRT, datacenter GPUs) or "
    "`pip install torch-tensorrt-rtx` (TensorRT-RTX, GeForce RTX cards)"
)
TEXT_LENGTH_BUCKET = 64  # LLaMA token counts are padded up to a multiple of this: one engine serves many prompts
STACK_HOOK = "tensorrt_block_stack"
SKIP_HOOK = "tensorrt_block_skip"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_VARIABLE) or CACHE_DIR / "tensorrt_engines")


def default_cache_limit() -> int | None:
    limit = os.environ.get(CACHE_LIMIT_VARIABLE)
    return int(float(limit) * 1024**3) if limit else None


class TensorRTUnavailable(RuntimeError):
    """TensorRT cannot serve at all in this process (no torch_tensorrt, no CUDA)."""


# ---------------------------------------------------------------------------------------------------------------
# Compile settings, as data. Options the installed Torch-TensorRT does not know are dropped (2.13 removed
# `enabled_precisions` and `use_explicit_typing`; `attn_bias_is_causal` appeared in 2.11).

SDPA_OPS = (
    "aten.scaled_dot_product_attention.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
)
BASE_SETTINGS = {
    "use_explicit_typing": True,  # precision follows the model's dtypes (TensorRT-RTX is always strongly typed)
    "min_block_size": 1,
    "truncate_double": True,
    "optimization_level": 3,
    "attn_bias_is_causal": False,  # FramePack's attention is never causal
    # Attention stays in PyTorch's fused kernels: faster than TensorRT's for the transformer, and Torch-TensorRT
    # 2.11 cannot convert attention with a constant mask (the VAE mid-block's, CLIP's causal one).
    "torch_executed_ops": SDPA_OPS,
}
COMPONENT_SETTINGS = {
    "vae_encoder": {},
    "vae_decoder": {},
    "text_encoder": {},
    "text_encoder_2": {},
    "transformer": {},
}
TOLERANCES = {
    "vae_encoder": 0.05,
    "vae_decoder": 0.05,
    "text_encoder": 0.05,
    "text_encoder_2": 0.05,
    "transformer": 0.05,
}


class TorchTensorRTBackend:
    """The real compiler: torch.export, then torch_tensorrt.dynamo.compile; engines saved as ExportedPrograms."""

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
        exported = torch.export.export(module, args, strict=False)
        return self._trt.dynamo.compile(exported, arg_inputs=list(args), **self._options(settings))

    def save(self, compiled: Callable, args: tuple, path: Path) -> None:
        self._trt.save(compiled, str(path), output_format="exported_program", arg_inputs=list(args))

    def load(self, path: Path) -> Callable:
        return self._trt.load(str(path)).module()


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


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected, actual = expected.float(), actual.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def _outputs(value) -> list[torch.Tensor]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


# ---------------------------------------------------------------------------------------------------------------
# The runtime


@dataclass
class ComponentStatus:
    """What one component runs on, for status displays and the benchmarks."""

    engine: str = "pytorch"  # "tensorrt" once an engine served, "pytorch" otherwise
    reason: str = "not requested"
    compiling_since: float | None = None
    engines: int = 0
    compiles: int = 0
    loads: int = 0
    compile_seconds: list[float] = field(default_factory=list)
    load_seconds: list[float] = field(default_factory=list)


class TensorRTRuntime:
    """Engines per (component, input signature); one instance per process, shared by the wrappers."""

    def __init__(self, cache: EngineCache | None = None, backend: object | None = None) -> None:
        self.cache = cache or EngineCache(default_cache_dir(), default_cache_limit())
        self.backend = backend or TorchTensorRTBackend()
        self.status: dict[str, ComponentStatus] = {}
        self._engines: dict[tuple, Callable] = {}
        self._fingerprints: dict[int, str] = {}
        self._unavailable: str | None = None
        self._checked = False
        self._lock = threading.Lock()

    # -- availability -------------------------------------------------------------------------------------------

    def _check(self) -> str | None:
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

    def register(self, component: str) -> None:
        self.status.setdefault(component, ComponentStatus(reason="waiting for the first call"))

    def fall_back(self, component: str, reason: str) -> None:
        """Send a component back to PyTorch for the rest of the process, with one warning."""
        status = self.status.setdefault(component, ComponentStatus())
        if status.reason.startswith("fell back"):
            return
        status.engine, status.reason, status.compiling_since = "pytorch", f"fell back: {reason}", None
        logger.warning("TensorRT %s: %s; running it in PyTorch", component, reason)

    def is_active(self, component: str) -> bool:
        status = self.status.get(component)
        return status is not None and not status.reason.startswith("fell back")

    # -- the core -----------------------------------------------------------------------------------------------

    def run(self, component: str, module: torch.nn.Module, args: tuple):
        """`module(*args)` through the component's engine for this signature, or in PyTorch when it cannot.

        `module` is what gets exported (tensors in, a tensor or tuple of tensors out) and the PyTorch reference
        each new engine must match.
        """
        if not self.is_active(component):
            return module(*args)
        unavailable = self._check()
        if unavailable:
            self.fall_back(component, unavailable)
            return module(*args)
        args = tuple(a.contiguous() for a in args)  # engines take dense inputs only
        signature = (component, tuple(tuple(a.shape) for a in args), tuple(a.dtype for a in args))
        try:
            engine = self._engines.get(signature) or self._prepare(component, module, args, signature)
            return module(*args) if engine is None else engine(*args)
        except Exception as error:  # any TensorRT failure: this component continues in PyTorch
            logger.debug("TensorRT %s failed", component, exc_info=True)
            self.fall_back(component, _describe(error))
            return module(*args)

    def _key(self, component: str, module: torch.nn.Module, args: tuple) -> tuple[str, dict]:
        if id(module) not in self._fingerprints:
            self._fingerprints[id(module)] = weights_fingerprint(module)
        device = args[0].device
        gpu = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
        ingredients = {
            "component": component,
            "inputs": _signature(args),
            "weights": self._fingerprints[id(module)],
            "settings": {**BASE_SETTINGS, **COMPONENT_SETTINGS[component]},
            "gpu": gpu.name if gpu else str(device),
            "compute_capability": f"{gpu.major}.{gpu.minor}" if gpu else None,
            "versions": self.backend.versions(),
        }
        return cache_key(ingredients), ingredients

    def _prepare(self, component: str, module: torch.nn.Module, args: tuple, signature: tuple) -> Callable | None:
        key, ingredients = self._key(component, module, args)
        status = self.status[component]
        with self._lock, self.cache.lock(key):
            rejected = self.cache.rejection(key)
            if rejected:
                self.fall_back(component, f"this engine was rejected before ({rejected})")
                return None
            engine = self._load(component, key)
            fresh = engine is None
            if fresh:
                engine = self._build(component, key, module, args, ingredients)
        expected = module(*args)
        actual = engine(*args)
        error = max(relative_error(a, e) for a, e in zip(_outputs(actual), _outputs(expected), strict=True))
        if error > TOLERANCES[component]:
            self.cache.reject(key, f"relative error {error:.3g} against PyTorch")
            self.fall_back(component, f"engine output differs from PyTorch (relative error {error:.3g})")
            return None
        logger.info(
            "TensorRT %s engine ready (%s, relative error %.2g)", component, "built" if fresh else "loaded", error
        )
        self._engines[signature] = engine
        status.engine, status.reason, status.engines = "tensorrt", "engine in use", status.engines + 1
        return engine

    def _load(self, component: str, key: str) -> Callable | None:
        path = self.cache.lookup(key)
        if path is None:
            return None
        started = time.perf_counter()
        try:
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
        return engine

    def _build(self, component: str, key: str, module, args: tuple, ingredients: dict) -> Callable:
        status = self.status[component]
        status.compiling_since = started = time.perf_counter()
        status.reason = "compiling engine (first run of this shape)"
        logger.info(
            "compiling TensorRT engine for %s, inputs %s (first run of this shape; this can take minutes)",
            component,
            ingredients["inputs"],
        )
        settings = {**BASE_SETTINGS, **COMPONENT_SETTINGS[component]}
        with _Heartbeat(component, started):
            compiled = self.backend.compile(module, args, settings)
            with tempfile.TemporaryDirectory(dir=self.cache.directory, prefix=".build-") as staging:
                built = Path(staging) / f"engine{ENGINE_SUFFIX}"
                self.backend.save(compiled, args, built)
                self.cache.store(key, built, ingredients)
        elapsed = time.perf_counter() - started
        status.compiling_since = None
        status.compiles += 1
        status.compile_seconds.append(elapsed)
        logger.info("TensorRT %s engine compiled in %.1fs", component, elapsed)
        return compiled

    # -- reports ------------------------------------------------------------------------------------------------

    def report(self) -> list[str]:
        """One line per component: what it runs on and why."""
        lines = []
        for component, status in self.status.items():
            if status.compiling_since is not None:
                line = f"{component}: compiling engine (first run of this shape)... {time.perf_counter() - status.compiling_since:.0f}s"
            else:
                line = f"{component}: {'TensorRT' if status.engine == 'tensorrt' else 'PyTorch'} ({status.reason})"
            lines.append(line)
        return lines

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


def _describe(error: BaseException) -> str:
    if isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower():
        return f"out of GPU memory while building or running the engine ({type(error).__name__})"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


class _Heartbeat:
    """Logs every 30 s while a long compile runs, so a terminal never looks frozen."""

    def __init__(self, component: str, started: float, every: float = 30.0) -> None:
        self.component, self.started, self.every = component, started, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            logger.info("still compiling TensorRT %s: %.0fs", self.component, time.perf_counter() - self.started)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------------------------
# Wrappers


class TensorRTLatentEncoder(torch.nn.Module):
    """Drop-in for the VAE's `encoder`: pixels (B, 3, T, H, W) -> latent moments; one engine per input shape."""

    component = "vae_encoder"

    def __init__(self, encoder: torch.nn.Module, runtime: TensorRTRuntime) -> None:
        super().__init__()
        self.module = encoder
        self.runtime = runtime
        runtime.register(self.component)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.runtime.run(self.component, self.module, (hidden_states,))


class TensorRTLatentDecoder(TensorRTLatentEncoder):
    """Drop-in for the VAE's `decoder`: latents (B, 16, T, h, w) -> pixels; one engine per latent shape."""

    component = "vae_decoder"


class _HiddenStates(torch.nn.Module):
    """LLaMA with every hidden state stacked into one tensor: what the export sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        )


class TensorRTTextEncoder(torch.nn.Module):
    """Drop-in for the LLaMA text encoder as the prompt encoder calls it (ids and mask in, hidden states out).

    Token counts are padded to a multiple of TEXT_LENGTH_BUCKET (masked, after the prompt, so the causal model
    gives the real tokens the same states) and the output cropped back.
    """

    component = "text_encoder"

    def __init__(self, model: torch.nn.Module, runtime: TensorRTRuntime) -> None:
        super().__init__()
        self.hidden_states = _HiddenStates(model)  # the one registered copy of the model
        self.runtime = runtime
        runtime.register(self.component)

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden_states.model.dtype

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPast:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        padding = -length % TEXT_LENGTH_BUCKET
        padded_ids = torch.nn.functional.pad(
            input_ids, (0, padding), value=self.hidden_states.model.config.pad_token_id or 0
        )
        padded_mask = torch.nn.functional.pad(attention_mask, (0, padding), value=0)
        stacked = self.runtime.run(self.component, self.hidden_states, (padded_ids, padded_mask))[:, :, :length]
        return BaseModelOutputWithPast(last_hidden_state=stacked[-1], hidden_states=tuple(stacked))


class _Pooled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(input_ids=input_ids)
        return output.last_hidden_state, output.pooler_output


class TensorRTCLIPTextEncoder(torch.nn.Module):
    """Drop-in for the CLIP text encoder: ids (always 77 of them) in, last hidden state and pooled output out."""

    component = "text_encoder_2"

    def __init__(self, model: torch.nn.Module, runtime: TensorRTRuntime) -> None:
        super().__init__()
        self.pooled = _Pooled(model)  # the one registered copy of the model
        self.runtime = runtime
        runtime.register(self.component)

    @property
    def dtype(self) -> torch.dtype:
        return self.pooled.model.dtype

    def forward(self, input_ids: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        last_hidden_state, pooled = self.runtime.run(self.component, self.pooled, (input_ids,))
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled)


class _BlockStack(torch.nn.Module):
    """FramePack's 20 dual- and 40 single-stream blocks as one module (batch 1: no attention mask)."""

    def __init__(self, dual: torch.nn.ModuleList, single: torch.nn.ModuleList) -> None:
        super().__init__()
        self.dual = dual
        self.single = single

    def forward(self, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin, attention_mask=None):
        rope = (rope_cos, rope_sin)
        for block in [*self.dual, *self.single]:
            # the class's forward, not the instance's: the blocks carry the hooks that route into this stack
            hidden_states, encoder_hidden_states = type(block).forward(
                block, hidden_states, encoder_hidden_states, temb, attention_mask, rope
            )
        return hidden_states, encoder_hidden_states


class TensorRTTransformer(torch.nn.Module):
    """Drop-in for the transformer's block stack, called like one block: one engine per (latent tokens, text
    tokens) shape, i.e. per resolution bucket, latent window and prompt length."""

    component = "transformer"

    def __init__(self, transformer: torch.nn.Module, runtime: TensorRTRuntime) -> None:
        super().__init__()
        self.stack = _BlockStack(transformer.transformer_blocks, transformer.single_transformer_blocks)
        self.runtime = runtime
        runtime.register(self.component)

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:  # only batches > 1 carry a mask; FramePack runs batch 1, engines too
            return self.stack(hidden_states, encoder_hidden_states, temb, *image_rotary_emb, attention_mask)
        args = (hidden_states, encoder_hidden_states, temb, *image_rotary_emb)
        return self.runtime.run(self.component, self.stack, args)


class _RunStackHook(ModelHook):
    def __init__(self, stack: TensorRTTransformer) -> None:
        super().__init__()
        self.stack = stack

    def new_forward(
        self, module, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None
    ):
        return self.stack(hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)


class _SkipBlockHook(ModelHook):
    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        return hidden_states, encoder_hidden_states


def install_transformer_stack(transformer: torch.nn.Module, runtime: TensorRTRuntime) -> TensorRTTransformer:
    """Route the transformer's block loop through one TensorRTTransformer: the first block runs the whole stack,
    the others pass their inputs through. Install before cache hooks (TeaCache) so those wrap the stack."""
    stack = TensorRTTransformer(transformer, runtime)
    first, *rest = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    HookRegistry.check_if_exists_or_initialize(first).register_hook(_RunStackHook(stack), STACK_HOOK)
    for block in rest:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_SkipBlockHook(), SKIP_HOOK)
    return stack


def _offload_reason(transformer: torch.nn.Module, offloading: bool) -> str | None:
    """Why the transformer cannot run as a TensorRT engine in this setup, if it cannot."""
    if offloading:
        return "CPU offload / low-VRAM offloading streams weights in and out; an engine holds all of them"
    if getattr(transformer, "hf_quantizer", None) is not None or getattr(
        transformer.config, "quantization_config", None
    ):
        return "BitsAndBytes (or other load-time) quantization is not supported by the TensorRT export"
    fsdp_types = tuple(t for t in (_fsdp_class("FullyShardedDataParallel"), _fsdp_class("FSDPModule")) if t)
    if fsdp_types and any(isinstance(m, fsdp_types) for m in transformer.modules()):
        return "FSDP-sharded weights cannot be compiled into one engine"
    return None


def _fsdp_class(name: str):
    try:
        from torch.distributed import fsdp
    except ImportError:
        return None
    return getattr(fsdp, name, None)


@dataclass(frozen=True)
class TensorRTOptions:
    """Which components to accelerate; validated like the generation settings."""

    vae: bool = False
    text_encoders: bool = False
    transformer: bool = False

    def __post_init__(self) -> None:
        if (self.text_encoders or self.transformer) and not self.vae:
            flags = [
                flag
                for flag, on in (
                    ("--tensorrt-text-encoders", self.text_encoders),
                    ("--tensorrt-transformer", self.transformer),
                )
                if on
            ]
            raise InvalidSettings(f"{' and '.join(flags)} {'needs' if len(flags) == 1 else 'need'} --enable-tensorrt")

    @property
    def enabled(self) -> bool:
        return self.vae


def accelerate(components, options: TensorRTOptions, runtime: TensorRTRuntime, offloading: bool) -> None:
    """Swap in the wrappers the options ask for. Call after loading and before building the engine."""
    if options.vae:
        components.vae.encoder = TensorRTLatentEncoder(components.vae.encoder, runtime)
        components.vae.decoder = TensorRTLatentDecoder(components.vae.decoder, runtime)
    if options.text_encoders:
        components.text_encoder = TensorRTTextEncoder(components.text_encoder, runtime)
        components.text_encoder_2 = TensorRTCLIPTextEncoder(components.text_encoder_2, runtime)
    if options.transformer:
        reason = _offload_reason(components.transformer, offloading)
        if reason:
            runtime.fall_back("transformer", f"not compatible with this setup: {reason}")
        else:
            install_transformer_stack(components.transformer, runtime)
