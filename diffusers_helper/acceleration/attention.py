"""Which attention kernel the transformer's blocks run, through diffusers' attention dispatcher.

`sdpa` is PyTorch's scaled_dot_product_attention, as FramePack runs it (PyTorch picks the kernel: cuDNN's or
FlashAttention's on a GPU, the math kernel on the CPU): the default, and FramePack's exact video. The others are the
dispatcher's backends for kernels PyTorch does not pick by itself: `cudnn` (PyTorch's cuDNN kernel, always),
`flash` (the flash-attn package), `flash3` (FlashAttention 3, Hopper) and `sage` (SageAttention 2: INT8 QK and FP8
PV, a slightly different video). An optional package is imported by the dispatcher only, after one availability
check here that says how to install it.

`auto` measures, at the first call of each attention size, every available backend against SDPA on the same inputs
(the output checked within the backend's tolerance, the time a median), serves the fastest, and remembers the
measurements beside the compiled blocks' (speed_records), so a later process does not measure again. The blocks of a
TensorRT stack are left out: their attention runs between engines, on the kept keys, in SDPA.
"""

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import describe_error
from ..models.transformer_blocks import transformer_blocks
from ..settings import ATTENTION_CHOICES, InvalidSettings
from .engine_keys import gpu_identity
from .measure import median_seconds, output_error
from .speed_records import SpeedRecord, SpeedRecords

logger = logging.getLogger(__name__)

ATTENTION_HOOK = "attention_choice"
TIMED_RUNS = 3
SEQUENCE_BUCKET = 256  # attention sizes measured once per this many tokens: a prompt's length moves the size a little


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    dispatcher: str  # diffusers' AttentionBackendName value
    package: str | None  # the module the dispatcher imports for it
    install: str
    tolerance: float  # relative error against SDPA that still counts as the same attention
    needs_cuda: bool = True


ATTENTION_BACKENDS = {
    backend.name: backend
    for backend in (
        AttentionBackend("sdpa", "native", None, "", 0.0, needs_cuda=False),
        AttentionBackend("cudnn", "_native_cudnn", None, "", 0.02),
        AttentionBackend("flash", "flash", "flash_attn", "pip install flash-attn (docs/attention.md)", 0.02),
        AttentionBackend("flash3", "_flash_3", "flash_attn_interface", "FlashAttention 3 (docs/attention.md)", 0.02),
        AttentionBackend("sage", "sage", "sageattention", "SageAttention 2.1.1 or newer (docs/attention.md)", 0.1),
    )
}
assert set(ATTENTION_BACKENDS) == set(ATTENTION_CHOICES) - {"auto"}


def attention_unavailable(name: str, device: torch.device) -> str | None:
    """Why the named backend cannot run here, in one line with what to install; None when it can."""
    backend = ATTENTION_BACKENDS[name]
    if backend.needs_cuda and device.type != "cuda":
        return f"{name} attention needs a CUDA GPU"
    if backend.package is None:
        return None
    if importlib.util.find_spec(backend.package) is None:
        return f"{name} attention needs the {backend.package} package: {backend.install}"
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(backend.dispatcher))
    except (RuntimeError, ImportError) as error:  # the dispatcher's own check: a version it does not take
        return f"{name} attention cannot run: {str(error).splitlines()[0]} ({backend.install})"
    return None


def check_attention(name: str, device: torch.device) -> None:
    """InvalidSettings, in one line, when `--attention` names a backend that cannot run here."""
    if name == "auto":
        return
    reason = attention_unavailable(name, device)
    if reason:
        raise InvalidSettings(reason)


def dispatched_attention(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Attention through the dispatcher's backend for `name`, on (batch, tokens, heads, head size) tensors."""
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    backend = AttentionBackendName(ATTENTION_BACKENDS[name].dispatcher)
    return lambda query, key, value: dispatch_attention_fn(query, key, value, backend=backend)


class AttentionKernels:
    """The attention backend of the transformer's blocks: the one named, or (`auto`) per attention size the fastest
    of the available ones that matches SDPA. `kernels` maps each backend to its attention (the dispatcher's, unless a
    test stands in)."""

    def __init__(
        self,
        mode: str,
        device: torch.device,
        speeds: SpeedRecords | None = None,
        kernels: dict[str, Callable] | None = None,
    ) -> None:
        check_attention(mode, device)
        self.mode, self.device, self.speeds = mode, device, speeds
        if kernels is None:
            names = [name for name in ATTENTION_BACKENDS if attention_unavailable(name, device) is None]
            kernels = {name: dispatched_attention(name) for name in (names if mode == "auto" else [mode])}
        self.kernels = kernels
        self.candidates = list(kernels)
        self.measurements: dict[str, SpeedRecord] = {}  # the latest, per candidate
        self._decisions: dict[tuple, str] = {}

    def install(self, transformer: torch.nn.Module, first: int = 0) -> None:
        """The named backend on the attention of each block from `first` on (the blocks before it run as TensorRT
        engines); under `auto`, a hook per block that chooses at each new attention size. SDPA alone changes
        nothing: the dispatcher's default is SDPA."""
        if self.candidates == ["sdpa"]:
            return
        for block in transformer_blocks(transformer)[first:]:
            if self.mode == "auto":
                HookRegistry.check_if_exists_or_initialize(block).register_hook(_ChoiceHook(self), ATTENTION_HOOK)
            else:
                use_backend(block, self.mode)

    def choose(self, block: torch.nn.Module, latents: torch.Tensor, text: torch.Tensor) -> str:
        """The backend for this block's attention over these latent and text tokens (measured at the first call of
        its size), set on the block."""
        attention = block.attn
        heads, size = attention.heads, latents.shape[-1] // attention.heads
        tokens = -(-(latents.shape[1] + text.shape[1]) // SEQUENCE_BUCKET) * SEQUENCE_BUCKET
        shape = (latents.shape[0], tokens, heads, size, latents.dtype)
        name = self._decisions.get(shape) or self._decide(shape)
        use_backend(block, name)
        return name

    def _decide(self, shape: tuple) -> str:
        batch, tokens, heads, size, dtype = shape
        generator = torch.Generator(self.device).manual_seed(0)
        query, key, value = (torch.randn(batch, tokens, heads, size, generator=generator, device=self.device,
                                         dtype=dtype) for _ in range(3))  # fmt: skip
        expected = self.kernels["sdpa"](query, key, value)
        baseline = None
        chosen, best = "sdpa", None
        for name in self.candidates:
            if name == "sdpa":
                continue
            record = self._remembered(name, shape)
            if record is None:
                try:
                    error = output_error(self.kernels[name](query, key, value), expected)
                except Exception as failure:  # an optional package's kernel that cannot take this size or GPU
                    logger.warning("%s attention failed at %d tokens (%s): not used", name, tokens,
                                   describe_error(failure))  # fmt: skip
                    continue
                if error > ATTENTION_BACKENDS[name].tolerance:
                    logger.info("%s attention is off by %.3g against SDPA at %d tokens: not used", name, error, tokens)
                    continue
                if baseline is None:
                    baseline = median_seconds(lambda: self.kernels["sdpa"](query, key, value), TIMED_RUNS)
                seconds = median_seconds(lambda name=name: self.kernels[name](query, key, value), TIMED_RUNS)
                record = SpeedRecord(baseline, seconds, error)
                self._remember(name, shape, record)
            self.measurements[name] = record
            if record.speedup > 1 and (best is None or record.speedup > best):
                chosen, best = name, record.speedup
        logger.info("attention at %d tokens: %s%s", tokens, chosen,
                    f" ({best:.2f}x SDPA)" if best else " (nothing measured faster)")  # fmt: skip
        return self._decisions.setdefault(shape, chosen)

    def _key(self, name: str, shape: tuple) -> dict:
        batch, tokens, heads, size, dtype = shape
        return {"candidate": f"{name} attention", "versus": "sdpa attention", **gpu_identity(self.device),
                "torch": torch.__version__, "shape": [batch, tokens, heads, size],
                "dtype": str(dtype).removeprefix("torch.")}  # fmt: skip

    def _remembered(self, name: str, shape: tuple) -> SpeedRecord | None:
        return None if self.speeds is None else self.speeds.lookup(self._key(name, shape))

    def _remember(self, name: str, shape: tuple, record: SpeedRecord) -> None:
        if self.speeds is None:
            return
        try:
            self.speeds.remember(self._key(name, shape), record)
        except OSError as error:
            logger.warning("could not remember the attention measurement in %s (%s); the next process measures "
                           "again", self.speeds.path, error)  # fmt: skip

    def describe(self) -> str:
        """What the attention runs on, for status lines and the sidecar."""
        if self.mode != "auto":
            return self.mode
        chosen = sorted(set(self._decisions.values()))
        if not chosen:
            others = [name for name in self.candidates if name != "sdpa"]
            return f"the fastest of {', '.join(self.candidates)} (measured on first use)" if others else "sdpa"
        measured = ", ".join(f"{name} {record.speedup:.2f}x" for name, record in self.measurements.items())
        return f"{' and '.join(chosen)}" + (f" (measured against sdpa: {measured})" if measured else "")


def use_backend(block: torch.nn.Module, name: str) -> None:
    """The block's attention through the dispatcher's backend for `name` (what `set_attention_backend` does for a
    whole model)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    block.attn.processor._attention_backend = AttentionBackendName(ATTENTION_BACKENDS[name].dispatcher)


class _ChoiceHook(ModelHook):
    def __init__(self, kernels: AttentionKernels) -> None:
        super().__init__()
        self.kernels = kernels

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
        latents = args[0] if args else kwargs["hidden_states"]
        text = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
        self.kernels.choose(module, latents, text)
        return args, kwargs
