"""The one memory policy: which device and dtypes, and whether models live on the GPU or are offloaded.

Everything stays on the GPU when the free memory, less "GPU memory to preserve" (kept for activations), holds
all the weights: FramePack's 60 GB rule at its default of 6 GB preserved. Otherwise the text encoders, image
encoder and VAE take turns on the GPU (accelerate's model CPU offload), the VAE decodes in tiles, and the
transformer streams through the GPU one block at a time, the next block prefetched on a side CUDA stream
(diffusers' group offloading), so its weights take about two blocks of GPU memory.
"""

from dataclasses import dataclass

import torch
from accelerate import cpu_offload_with_hook

from ..settings import DEVICES
from .components import Components

RESIDENT_WEIGHTS_GB = 54.0  # all FramePack weights (bf16 transformer, fp16 encoders) with some headroom
GIB = 1024**3


@dataclass(frozen=True)
class MemoryPlan:
    device: torch.device
    transformer_dtype: torch.dtype
    encoder_dtype: torch.dtype  # text encoders, image encoder and VAE
    offload: bool
    free_gb: float
    preserve_gb: float

    def dtypes(self) -> dict[str, torch.dtype]:
        """Per-component dtypes for loading."""
        encoders = ("text_encoder", "text_encoder_2", "image_encoder", "vae")
        return {"transformer": self.transformer_dtype, **{name: self.encoder_dtype for name in encoders}}

    def describe(self) -> str:
        if self.device.type == "cpu":
            return "cpu, float32"
        placement = "offloading (low VRAM)" if self.offload else "all on the GPU (high VRAM)"
        return f"{self.device}, {placement}, {self.free_gb:.1f} GB free, preserving {self.preserve_gb:g} GB"


def free_cuda_memory_gb(device: torch.device) -> float:
    """Free memory plus what PyTorch holds but does not use, as FramePack counts it."""
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + reserved_unused) / GIB


def plan_memory(device: str = "auto", preserve_gb: float = 6.0, free_gb: float | None = None) -> MemoryPlan:
    """Decide placement; `free_gb` overrides the measurement (tests, or a user who knows better)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but PyTorch sees no CUDA GPU")
    if device == "cpu" or not torch.cuda.is_available():
        return MemoryPlan(torch.device("cpu"), torch.float32, torch.float32, False, 0.0, preserve_gb)
    cuda = torch.device("cuda", torch.cuda.current_device())
    free = free_cuda_memory_gb(cuda) if free_gb is None else free_gb
    return MemoryPlan(cuda, torch.bfloat16, torch.float16, needs_offload(free, preserve_gb), free, preserve_gb)


def needs_offload(free_gb: float, preserve_gb: float) -> bool:
    return free_gb - preserve_gb < RESIDENT_WEIGHTS_GB


def place_components(components: Components, plan: MemoryPlan) -> None:
    """Put every model where the plan says; the only place in the app that moves models between devices."""
    encoders = [components.text_encoder, components.text_encoder_2, components.image_encoder, components.vae]
    if not plan.offload:
        for module in [*encoders, components.transformer]:
            module.to(plan.device)
        return
    hook = None
    for module in encoders:
        _, hook = cpu_offload_with_hook(module, plan.device, prev_module_hook=hook)
    components.vae.enable_slicing()
    components.vae.enable_tiling()
    components.transformer.enable_group_offload(
        onload_device=plan.device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=True,
    )
