"""Assembly: the one place that decides what wraps the transformer, and in which order.

Hooks on the transformer's blocks nest in registration order, so the order is the design:
1. the TensorRT block stack (innermost: the first block runs the stack's engines; where the plan streams blocks, the
   stack takes the resident ones only; where it runs in PyTorch, its blocks go through torch.compile's compiled
   forwards as `--backend` says), and those compiled forwards as the hooks of the blocks outside the stack,
2. streaming (a streamed block's weights arrive just before it runs), and, with `--gpus`, the context-parallel split
   and gather (parallel/context_parallel.py),
3. the step caches (outermost: TeaCache and MagCache decide around the stack, compiled or streamed, so a skipped
   step calls no streamed block and moves no weights; TeaCache reads the first block, which therefore always stays
   resident). Both are installed once; each job's settings switch one of them on (or neither).
`--fp8` replaces the block linears' weights and the output head is kept in float32 (FramePack's "high quality fp32
output") first, then the VAE and text-encoder wrappers are swapped in, before the memory plan places everything.
LoRAs wrap nothing: they are fused into the weights where the plan put them (models/lora.py), so FP8 weights take
none.
"""

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..acceleration.attention import AttentionKernels
from ..acceleration.compiled_blocks import CompiledBlocks, compile_unavailable, keep_compiled_code
from ..acceleration.engine_cache import default_cache_dir
from ..acceleration.fp8 import fp8_unavailable, quantize_block_fp8
from ..acceleration.speed_records import SPEED_RECORDS_FILE, SpeedRecords
from ..caching.magcache import MAG_RATIOS, MagCache, apply_magcache
from ..caching.teacache import TeaCache, apply_teacache, modules_read
from ..parallel.context_parallel import enable_context_parallel, first_rank_decides
from ..settings import ModelSettings, TensorRTOptions
from ..tensorrt_runtime import (
    TensorRTCLIPTextEncoder,
    TensorRTLatentDecoder,
    TensorRTLatentEncoder,
    TensorRTRuntime,
    TensorRTTextEncoder,
    TensorRTTransformer,
    install_transformer_stack,
)
from .components import Components
from .lora import FusedLoras
from .placement import (
    EngineHeldMemory,
    HostParking,
    MemoryPlan,
    Placement,
    convert_blocks_on_device,
    place_components,
    transformer_layout,
)
from .transformer_blocks import transformer_blocks

logger = logging.getLogger(__name__)

FLOAT32_HEAD_HOOK = "float32_output_head"
TENSORRT_COMPONENTS = {
    "vae": ("vae_encoder", "vae_decoder"),
    "text_encoders": ("text_encoder", "text_encoder_2"),
    "transformer": ("transformer",),
}


@dataclass
class AssembledModels:
    """The loaded, wrapped and placed models of one process: what the engine runs."""

    components: Components
    plan: MemoryPlan
    placement: Placement
    teacache: TeaCache
    magcache: MagCache
    settings: ModelSettings
    runtime: TensorRTRuntime | None
    loras: FusedLoras
    compiled: CompiledBlocks | None = None
    fp8: str | None = None  # what `--fp8` made of the block weights, for the report
    engine_blocks: int = 0  # how many transformer blocks, from the first, the TensorRT stack runs
    attention: AttentionKernels | None = None

    def describe(self) -> str:
        """One line for people: which models, from where, on what device, in which dtypes, what streams."""
        variant = f"{self.components.variant} ({self.components.model_ids()['transformer']})"
        streaming = f" ({self.placement.describe()})" if self.plan.offload else ""
        return f"{variant}, {self.settings.describe_source()}; {self.plan.describe()}{streaming}"

    def cancel_builds_when(self, stopped: Callable[[], bool]) -> contextlib.AbstractContextManager:
        """Engine builds started inside the block give up once `stopped()` is true (a job's End)."""
        return contextlib.nullcontext() if self.runtime is None else self.runtime.cancel_builds_when(stopped)

    def blocks(self) -> str | None:
        """What the transformer blocks run on, where torch.compile or `--fp8` has a say in it (else None)."""
        return None if self.compiled is None and self.fp8 is None else self.backends()["transformer"]

    def backends(self) -> dict[str, str]:
        """What each model runs on, and why (for the sidecar and status displays)."""
        names = ("text_encoder", "text_encoder_2", "image_encoder", "vae_encoder", "vae_decoder", "transformer")
        report = dict.fromkeys(names, "PyTorch")
        if self.attention is not None:
            report["attention"] = self.attention.describe()
        if self.compiled is not None:
            report["transformer"] = self.compiled.describe()
        if self.fp8 is not None:
            report["transformer"] += f"; {self.fp8}"
        if self.runtime is not None:
            report.update({name: status.describe() for name, status in self.runtime.status.items()})
            stack = self.runtime.status.get("transformer")
            if stack is not None and stack.engine == "pytorch" and self.compiled is not None:
                report["transformer"] += f"; blocks: {self.compiled.describe()}"
            blocks = len(transformer_blocks(self.components.transformer))
            if stack is not None and 0 < self.engine_blocks < blocks:
                streamed = "eager" if self.compiled is None else self.compiled.describe()
                report["transformer"] += (f"; the stack's blocks 0-{self.engine_blocks - 1} (resident), "
                                          f"blocks {self.engine_blocks}-{blocks - 1} streamed in PyTorch "
                                          f"({streamed})")  # fmt: skip
        return report


def assemble(
    components: Components,
    plan: MemoryPlan,
    settings: ModelSettings,
    runtime: TensorRTRuntime | None = None,
) -> AssembledModels:
    """Wrap and place freshly loaded components; call once per load."""
    fp8 = quantize_fp8(components.transformer, settings, plan)
    in_fp8 = fp8 == FP8_APPLIED
    keep_output_head_float32(components.transformer)  # before the stack is laid out: the head counts as resident
    compiled = compiled_blocks(components.transformer, settings, plan.device, fp8=in_fp8)
    stack = None
    if runtime is not None and settings.tensorrt.enabled:
        unavailable = runtime.availability()
        if unavailable:
            runtime.cannot_serve(requested_components(settings.tensorrt), unavailable)
        else:
            stack = accelerate(components, settings.tensorrt, runtime, plan, compiled)
    engine_blocks = 0 if stack is None else len(stack.stack.blocks)
    if compiled is not None and engine_blocks < len(transformer_blocks(components.transformer)):
        compiled.install(components.transformer, first=engine_blocks)
    attention = AttentionKernels(settings.attention, plan.device, SpeedRecords(default_cache_dir() / SPEED_RECORDS_FILE)
                                 if settings.attention == "auto" else None)  # fmt: skip
    attention.install(components.transformer, first=engine_blocks)
    if settings.gpus > 1:
        enable_context_parallel(components.transformer, settings.gpus)
    placement = place_components(components, plan)
    teacache = apply_teacache(components.transformer)
    magcache = apply_magcache(components.transformer, MAG_RATIOS[components.variant])
    if settings.gpus > 1:
        teacache.agree = magcache.agree = first_rank_decides
    loras = FusedLoras(components.transformer, FP8_REFUSES_LORAS if in_fp8 else None)
    return AssembledModels(components, plan, placement, teacache, magcache, settings, runtime, loras, compiled, fp8,
                           engine_blocks, attention)  # fmt: skip


FP8_APPLIED = "FP8 block linears (torchao, row-wise scales)"
FP8_REFUSES_LORAS = "LoRAs cannot be fused into FP8 weights; start without --fp8 to use LoRAs"


def quantize_fp8(transformer: torch.nn.Module, settings: ModelSettings, plan: MemoryPlan) -> str | None:
    """FP8 block linears as `--fp8` asks, where the GPU can; else one warning and the loaded dtype. Returns what the
    blocks' weights became, for the report (None without `--fp8`)."""
    if not settings.fp8:
        return None
    unavailable = fp8_unavailable(plan.device)
    if unavailable:
        weights = str(transformer.dtype).removeprefix("torch.")
        logger.warning("%s; the transformer blocks stay %s", unavailable, weights)
        return f"{weights} (FP8 not available: {unavailable})"
    convert_blocks_on_device(transformer, plan, quantize_block_fp8)
    return FP8_APPLIED


def compiled_blocks(
    transformer: torch.nn.Module, settings: ModelSettings, device: torch.device, fp8: bool = False
) -> CompiledBlocks | None:
    """torch.compile for the transformer's blocks as `--backend` asks (`auto` only on a GPU: compiling on the CPU
    costs more than it saves), not yet installed: it runs the blocks either as their own hooks or, under the
    TensorRT stack, wherever the stack runs in PyTorch."""
    if settings.backend == "eager" or (settings.backend == "auto" and device.type != "cuda"):
        return None
    unavailable = compile_unavailable(device)
    if unavailable:
        if settings.backend == "compile":
            logger.warning("%s; the transformer blocks run in PyTorch", unavailable)
        return None
    weights = "float8" if fp8 else str(transformer.dtype).removeprefix("torch.")
    code = keep_compiled_code(default_cache_dir())
    return CompiledBlocks(settings.backend, SpeedRecords(default_cache_dir() / SPEED_RECORDS_FILE), weights, code)


def requested_components(options: TensorRTOptions) -> list[str]:
    return [name for flag, names in TENSORRT_COMPONENTS.items() if getattr(options, flag) for name in names]


class _Float32Input(ModelHook):
    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        return tuple(arg.float() for arg in args), kwargs


def keep_output_head_float32(transformer: torch.nn.Module) -> None:
    """The final projection in float32, on float32 inputs, as FramePack runs it for quality."""
    head = transformer.proj_out
    if head.weight.dtype == torch.float32:
        return
    head.to(torch.float32)
    HookRegistry.check_if_exists_or_initialize(head).register_hook(_Float32Input(), FLOAT32_HEAD_HOOK)


def accelerate(
    components: Components,
    options: TensorRTOptions,
    runtime: TensorRTRuntime,
    plan: MemoryPlan,
    compiled: CompiledBlocks | None = None,
) -> TensorRTTransformer | None:
    """Swap in the TensorRT wrappers the options ask for, each with the memory policy's parking for PyTorch's copy of
    its weights; the transformer's stack, if it was installed (its blocks run through `compiled` wherever it runs in
    PyTorch; the step cache's own reads of the first block stay on the GPU)."""
    held = EngineHeldMemory(plan)
    parking = HostParking(plan.device, held=held)
    if options.vae:
        components.vae.encoder = TensorRTLatentEncoder(components.vae.encoder, runtime, parking)
        components.vae.decoder = TensorRTLatentDecoder(components.vae.decoder, runtime, parking)
    if options.text_encoders:
        components.text_encoder = TensorRTTextEncoder(components.text_encoder, runtime, parking)
        components.text_encoder_2 = TensorRTCLIPTextEncoder(components.text_encoder_2, runtime, parking)
    if options.transformer:
        reason = _transformer_engine_obstacle(components.transformer)
        if reason:
            runtime.fall_back("transformer", f"not compatible with this setup: {reason}")
        else:
            keep = HostParking(plan.device, modules_read(components.transformer), held)
            # Where the plan streams blocks, engines take the resident ones (an engine holds all of its weights on
            # the GPU) and the streamed ones run in PyTorch: TensorRT's own weight streaming measured slower than the
            # blocks' streaming in PyTorch (docs/tensorrt.md).
            resident = len(transformer_layout(components.transformer, plan)[0]) if plan.offload else None
            return install_transformer_stack(components.transformer, runtime, keep, compiled, resident)
    return None


def _transformer_engine_obstacle(transformer: torch.nn.Module) -> str | None:
    """Why the transformer cannot run as a TensorRT engine in this setup, if it cannot."""
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
