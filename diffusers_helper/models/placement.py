"""The one memory policy: which device and dtypes, what lives on the GPU and what streams through it.

The budget is what this process may use on the GPU: `--gpu-memory-limit` when given (enforced with
`torch.cuda.set_per_process_memory_fraction`, so one large card can stand in for a 6-24 GB one), otherwise what is
free when the models load (free memory plus what PyTorch holds unused, as FramePack counts it).

Everything stays on the GPU when the budget, less "GPU memory to preserve" (room kept for activations and
streaming), holds all the weights: FramePack's 60 GB rule at its default of 6 GB preserved. Otherwise, as in
FramePack's low-VRAM mode, every large model goes through the GPU in pieces:
- the LLaMA text encoder streams a layer at a time (diffusers group offloading, the next layer prefetched on a
  side CUDA stream);
- CLIP, SigLIP and the VAE take turns on the GPU (accelerate's model offload) and leave it before sampling; the
  VAE decodes in tiles;
- the transformer keeps its embedders, output head and as many blocks resident as the budget less the memory to
  preserve holds (always the first block, which the step cache reads), and streams the rest, each block
  prefetched while the one before it runs. A step the step cache skips calls no streamed block, so it moves no
  weights (models/assembly.py puts the step cache outside the streaming).
Streamed weights are pinned where they are, so the host holds one copy of them. FP8 blocks (`--fp8`) stream like
bf16 ones, moving half the bytes: each block is quantized on the GPU and goes back where the plan keeps it, so the
layout counts the FP8 sizes and the GPU never holds more than one block in both forms. The VAE decodes in tiles
wherever room is not guaranteed: on the CPU and whenever the plan streams (as FramePack's low-VRAM mode does), so a
large bucket never needs a whole decode's activations at once; with every weight resident on the GPU (FramePack's
high-VRAM mode) it decodes untiled, as FramePack does there, and the video stays FramePack's.

Two more moves are the memory policy's too: the weights a process makes itself (the full-size preset's) are stored
where the plan keeps them, and while a TensorRT engine holds a model's weights on the GPU, PyTorch's copy waits in
host memory (`HostParking`, which the runtime is handed) and PyTorch's share of a `--gpu-memory-limit` shrinks by
what the engines hold (`EngineHeldMemory`).
"""

import ctypes
import ctypes.util
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
from accelerate import cpu_offload_with_hook
from diffusers.hooks import HookRegistry, apply_group_offloading
from diffusers.hooks.group_offloading import (
    GroupOffloadingConfig,
    GroupOffloadingHook,
    GroupOffloadingType,
    ModuleGroup,
)
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ..settings import DEVICES, InvalidSettings
from .components import Components
from .transformer_blocks import BLOCK_LISTS, transformer_blocks

RESIDENT_WEIGHTS_GB = 54.0  # all FramePack weights (bf16 transformer, fp16 encoders) with some headroom
MIN_GPU_MEMORY_GB = 6.0  # FramePack's smallest card
GIB = 1024**3
GROUP_OFFLOADING_HOOK = "group_offloading"  # the name diffusers' own group offloading registers its hooks under
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# What the transformer's TensorRT engines need on the GPU beyond the weights PyTorch hands them (docs/benchmarks.md):
# room for a stretch's build (the builder's copy of its weights and its workspace), kept free of resident weights, and
# each engine's own memory beside its weights, counted with the resident blocks it runs (an engine runs two).
TENSORRT_ENGINES_GB = 2.5
TENSORRT_ENGINE_GB_PER_BLOCK = 0.12


@dataclass(frozen=True)
class MemoryPlan:
    device: torch.device
    transformer_dtype: torch.dtype
    encoder_dtype: torch.dtype  # text encoders, image encoder and VAE
    offload: bool
    budget_gb: float  # what the process may use on the GPU
    preserve_gb: float
    limit_gb: float | None = None  # --gpu-memory-limit, enforced when the models are placed
    engines_gb: float = 0.0  # kept for the transformer's TensorRT engines beyond their weights

    def dtypes(self) -> dict[str, torch.dtype]:
        """Per-component dtypes for loading."""
        encoders = ("text_encoder", "text_encoder_2", "image_encoder", "vae")
        return {"transformer": self.transformer_dtype, **{name: self.encoder_dtype for name in encoders}}

    @property
    def home(self) -> torch.device:
        """Where the weights live between uses: the GPU when resident, else the CPU."""
        return torch.device("cpu") if self.offload else self.device

    @property
    def tiles_vae(self) -> bool:
        """Whether the VAE decodes in tiles: everywhere but a GPU that holds every model (FramePack's rule there)."""
        return self.offload or self.device.type == "cpu"

    def resident_bytes(self) -> int:
        """GPU memory the streaming transformer may keep for resident weights."""
        return int(max(self.budget_gb - self.preserve_gb - self.engines_gb, 0.0) * GIB)

    def block_overhead_bytes(self) -> int:
        """What each resident transformer block takes on the GPU beyond its weights: its share of its engine's own
        memory where the plan is for engines, else nothing."""
        return int(TENSORRT_ENGINE_GB_PER_BLOCK * GIB) if self.engines_gb else 0

    def describe(self) -> str:
        if self.device.type == "cpu":
            return "cpu, float32"
        budget = f"{self.limit_gb:g} GB limit" if self.limit_gb else f"{self.budget_gb:.1f} GB free"
        placement = "streaming (low VRAM)" if self.offload else "all on the GPU (high VRAM)"
        dtypes = f"transformer {str(self.transformer_dtype).removeprefix('torch.')}, others float16"
        engines = f" and {self.engines_gb:g} GB for TensorRT engines" if self.engines_gb else ""
        return f"{self.device}, {placement}, {budget}, preserving {self.preserve_gb:g} GB{engines}; {dtypes}"


def free_cuda_memory_gb(device: torch.device) -> float:
    """Free memory plus what PyTorch holds but does not use, as FramePack counts it."""
    free, _total = torch.cuda.mem_get_info(device)
    reserved_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free + reserved_unused) / GIB


def grow_cuda_segments() -> None:
    """Growing segments instead of fixed blocks in PyTorch's CUDA allocator: activations of many sizes then leave no
    unusable gaps, which matters most under a memory limit. Read when CUDA initializes, so called before that."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def plan_memory(
    device: str = "auto",
    preserve_gb: float = 6.0,
    limit_gb: float | None = None,
    free_gb: float | None = None,
    tensorrt_transformer: bool = False,
) -> MemoryPlan:
    """Decide placement. `limit_gb` caps the process (InvalidSettings when the card is smaller or the limit below
    FramePack's minimum); `free_gb` overrides the measurement (tests, or the app's figure from start-up);
    `tensorrt_transformer` keeps room for the transformer's engines where the transformer streams."""
    if device not in DEVICES:
        raise InvalidSettings(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidSettings("device cuda was asked for, but PyTorch sees no CUDA GPU")
    if device == "cpu" or not torch.cuda.is_available():
        if limit_gb is not None:
            raise InvalidSettings("--gpu-memory-limit needs a CUDA GPU, and PyTorch sees none")
        return MemoryPlan(torch.device("cpu"), torch.float32, torch.float32, False, 0.0, preserve_gb)
    cuda = torch.device("cuda", torch.cuda.current_device())
    if limit_gb is not None:
        total_gb = torch.cuda.get_device_properties(cuda).total_memory / GIB
        if not MIN_GPU_MEMORY_GB <= limit_gb <= total_gb:
            raise InvalidSettings(
                f"--gpu-memory-limit must be between {MIN_GPU_MEMORY_GB:g} GB and this GPU's "
                f"{total_gb:.1f} GB, got {limit_gb:g}"
            )
    budget = limit_gb if limit_gb is not None else free_cuda_memory_gb(cuda) if free_gb is None else free_gb
    offload = needs_offload(budget, preserve_gb)
    engines = TENSORRT_ENGINES_GB if tensorrt_transformer and offload else 0.0
    return MemoryPlan(cuda, torch.bfloat16, torch.float16, offload, budget, preserve_gb, limit_gb, engines)


def needs_offload(budget_gb: float, preserve_gb: float) -> bool:
    return budget_gb - preserve_gb < RESIDENT_WEIGHTS_GB


VAE_TILE = 256  # diffusers' HunyuanVideo VAE decodes tiles of up to 256 x 256 pixels and 16 frames
VAE_TILE_FRAMES = 16
VAE_TILE_COPIES = 4  # activations of one tile alive at once in a decoder block (input, output, norm, skip)
JOB_WORKING_SET = 0.3 * GIB  # what a job holds whatever its size: encoders' outputs, the MP4 encoder, allocators


def job_host_bytes(plan: MemoryPlan, vae: torch.nn.Module, height: int, width: int, frames: int, window: int) -> int:
    """Host memory a job needs beyond the loaded models, about, erring high: a fixed working set, the video's uint8
    frames twice (a section is joined to the video so far), two float32 copies of the pixels one decode makes (the
    VAE's output and the conversion to frames; a decode makes at most 2 windows of latents), and, decoding on the
    CPU, one tile's activations at the VAE's widest layer (docs/benchmarks.md sets it beside measured peaks)."""
    pixels = height * width
    decoded = 3 * min(frames, 8 * window + 1) * pixels * 4
    needed = int(JOB_WORKING_SET) + 2 * frames * pixels * 3 + 2 * decoded
    if plan.device.type == "cpu":
        tile = min(height, VAE_TILE) * min(width, VAE_TILE) * VAE_TILE_FRAMES
        needed += VAE_TILE_COPIES * max(vae.config.block_out_channels) * tile * plan.encoder_dtype.itemsize
    return needed


def job_memory_problem(
    plan: MemoryPlan, vae: torch.nn.Module, height: int, width: int, frames: int, window: int
) -> str | None:
    """Why a job of this bucket and length cannot fit this machine's free host memory, said before any work (a job
    that runs out is killed by the system, with nothing recorded); None when it fits."""
    needed = job_host_bytes(plan, vae, height, width, frames, window)
    free = psutil.virtual_memory().available
    if needed <= free:
        return None
    return (f"a {width}x{height} video of {frames} frames needs about {needed / GIB:.1f} GB of memory and "
            f"{free / GIB:.1f} GB is free; lower the resolution or the length")  # fmt: skip


def return_freed_host_memory() -> None:
    """glibc keeps freed blocks of up to 32 MB in its heap rather than returning them, so moving weights into pinned
    memory would leave a second copy of every mid-size tensor in the process. A fixed threshold makes each
    allocation of 1 MB or more a mapping of its own, returned to the system when freed. (Linux only; elsewhere
    the C library already returns large blocks.)"""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(libc, "mallopt"):
            libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def apply_limit(plan: MemoryPlan, held_outside: int = 0) -> None:
    """Make the GPU refuse this process more than the plan's limit (PyTorch's caching allocator counts it), less
    `held_outside`: what TensorRT engines hold on the GPU outside that allocator."""
    if plan.limit_gb is not None:
        total = torch.cuda.get_device_properties(plan.device).total_memory
        torch.cuda.set_per_process_memory_fraction(max(plan.limit_gb * GIB - held_outside, 0) / total, plan.device)


@dataclass
class Placement:
    """What the plan did: streamed pieces, the models that take turns, the host memory pinned for streaming."""

    taking_turns: list = field(default_factory=list)  # accelerate's offload hooks
    resident_blocks: int | None = None  # of the transformer, when it streams
    blocks: int = 0
    pinned_bytes: int = 0

    def release_encoders(self) -> None:
        """Send the models that take turns back to the CPU, so sampling has the GPU to itself."""
        for hook in self.taking_turns:
            hook.offload()

    def describe(self) -> str:
        if self.resident_blocks is None:
            return "every model resident"
        streamed = "" if self.resident_blocks == self.blocks else ", the rest streamed"
        return (
            f"LLaMA streams a layer at a time; transformer: {self.resident_blocks} of {self.blocks} blocks resident"
            f"{streamed}; CLIP, SigLIP and VAE take turns; {self.pinned_bytes / GIB:.1f} GB pinned on the host"
        )


def weight_store(plan: MemoryPlan) -> Callable[[torch.Tensor], torch.Tensor]:
    """Where a weight this process makes (the full-size preset draws its weights on the GPU) is kept: where the plan
    keeps weights between uses."""
    return lambda tensor: tensor.to(plan.home)


def convert_blocks_on_device(
    transformer: torch.nn.Module, plan: MemoryPlan, convert: Callable[[torch.nn.Module], None]
) -> None:
    """Bring each transformer block to the GPU, convert it there (FP8's quantization runs on the GPU) and send it back
    where the plan keeps weights, one block at a time, so the GPU never holds more than one block in both forms; the
    rest waits for `place_components`, which lays the blocks out by their converted sizes."""
    for block in transformer_blocks(transformer):
        block.to(plan.device)
        convert(block)
        block.to(plan.home)


def place_components(components: Components, plan: MemoryPlan) -> Placement:
    """Put every model where the plan says; the only place in the app that moves models between devices."""
    encoders = [components.text_encoder, components.text_encoder_2, components.image_encoder, components.vae]
    if plan.tiles_vae:
        components.vae.enable_slicing()
        components.vae.enable_tiling()
    if not plan.offload:
        for module in [*encoders, components.transformer]:
            module.to(plan.device)
        return Placement()
    placement = Placement()
    placement.pinned_bytes += pin_in_place([components.text_encoder])
    apply_group_offloading(
        components.text_encoder, plan.device, offload_type="block_level", num_blocks_per_group=1,
        use_stream=True, record_stream=True,
    )  # fmt: skip
    hook = None
    for module in (components.text_encoder_2, components.image_encoder, components.vae):
        _, hook = cpu_offload_with_hook(module, plan.device, prev_module_hook=hook)
        placement.taking_turns.append(hook)
    stream_transformer(components.transformer, plan, placement)
    return placement


PIN_SLAB_BYTES = 2 * GIB  # a power of two: PyTorch's pinned allocator rounds every allocation up to one


def pin_in_place(modules: list[torch.nn.Module]) -> int:
    """Move the modules' CPU tensors into pinned memory (the streaming copies start from them), one tensor at a time
    so that the host never holds two copies. They are packed into slabs whose sizes are powers of two, the largest
    PIN_SLAB_BYTES, because PyTorch's pinned allocator rounds every allocation up to one. Returns the bytes pinned."""
    places = [
        place
        for m in modules
        for t in [*m.parameters(), *m.buffers()]
        if t.device.type == "cpu" and not t.is_pinned()
        for place in _storage_places(t)
    ]
    sizes = [-(-t.numel() * t.element_size() // 512) * 512 for _, _, t in places]  # aligned for fast copies
    remaining, slab, free = sum(sizes), None, 0
    for (owner, name, tensor), size in zip(places, sizes, strict=True):
        if size > PIN_SLAB_BYTES:
            pinned = tensor.pin_memory()
        else:
            if size > free:
                capacity = min(PIN_SLAB_BYTES, 1 << (remaining - 1).bit_length())
                slab, free = torch.empty(capacity, dtype=torch.uint8, pin_memory=True), capacity
            start = slab.numel() - free
            pinned = slab[start : start + tensor.numel() * tensor.element_size()].view(tensor.dtype).view(tensor.shape)
            pinned.copy_(tensor)
            free -= size
        setattr(owner, name, pinned)
        remaining -= size
    return sum(sizes)


def _storage_places(tensor: torch.Tensor) -> list[tuple[torch.Tensor, str, torch.Tensor]]:
    """Where a tensor's bytes are held, as (owner, attribute, plain tensor): its own data, or, for a tensor subclass
    (torchao's FP8 weights), each inner tensor, set on the subclass in place as diffusers' group offloading does."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return [(tensor, name, getattr(tensor, name)) for name in names]
    return [(tensor, "data", tensor.data)]


def _bytes(module: torch.nn.Module) -> int:
    return sum(tensor_bytes(tensor) for tensor in module.parameters())


def tensor_bytes(tensor: torch.Tensor) -> int:
    """What a tensor holds; a tensor subclass (torchao's FP8 weights) holds its inner tensors, whatever dtype it shows."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def resident_block_count(room: int, block_bytes: list[int]) -> int:
    """How many blocks, from the first, fit in `room` bytes; at least one (the step cache reads the first)."""
    count = 1
    room -= block_bytes[0]
    while count < len(block_bytes) and block_bytes[count] <= room:
        room -= block_bytes[count]
        count += 1
    return count


def transformer_layout(transformer: torch.nn.Module, plan: MemoryPlan) -> tuple[list, list]:
    """(resident blocks, streamed blocks): resident first everything but the blocks, then blocks in order while
    the plan's room lasts."""
    blocks = transformer_blocks(transformer)
    rest = _bytes(transformer) - sum(_bytes(block) for block in blocks)
    overhead = plan.block_overhead_bytes()
    count = resident_block_count(plan.resident_bytes() - rest, [_bytes(block) + overhead for block in blocks])
    return blocks[:count], blocks[count:]


def stream_transformer(transformer: torch.nn.Module, plan: MemoryPlan, placement: Placement) -> None:
    """The resident part goes to the GPU; each streamed block becomes one group of diffusers' group offloading,
    prefetched on a side stream by the block before it."""
    resident, streamed = transformer_layout(transformer, plan)
    for name, child in transformer.named_children():
        if name not in BLOCK_LISTS:
            child.to(plan.device)
    for block in resident:
        block.to(plan.device)
    placement.pinned_bytes += pin_in_place(streamed)
    placement.resident_blocks, placement.blocks = len(resident), len(resident) + len(streamed)
    if not streamed:
        return
    stream = torch.cuda.Stream(plan.device)
    config = GroupOffloadingConfig(
        onload_device=plan.device, offload_device=torch.device("cpu"), offload_type=GroupOffloadingType.BLOCK_LEVEL,
        num_blocks_per_group=1, non_blocking=True, stream=stream, record_stream=True, low_cpu_mem_usage=False,
        offload_to_disk_path=None,
    )  # fmt: skip
    groups = [
        ModuleGroup(
            modules=[block],
            offload_device=torch.device("cpu"),
            onload_device=plan.device,
            offload_leader=block,
            onload_leader=block,
            non_blocking=True,
            stream=stream,
            record_stream=True,
            onload_self=index == 0,
            group_id=f"transformer_block_{len(resident) + index}",
        )  # fmt: skip
        for index, block in enumerate(streamed)
    ]
    for index, (block, group) in enumerate(zip(streamed, groups, strict=True)):
        share_pinned_host_copies(group)
        hook = GroupOffloadingHook(group, config=config)
        hook.next_group = groups[index + 1] if index + 1 < len(groups) else None
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, GROUP_OFFLOADING_HOOK)


def share_pinned_host_copies(group: ModuleGroup) -> None:
    """The host copy a streamed group keeps of each tensor subclass (torchao's FP8 weights) is the pinned memory the
    tensor already has, in an object of its own: diffusers' own copy of one already on the host is either the
    tensor itself, which bringing it to the GPU then changes in place (diffusers issue 14433), or a second one."""
    for tensor in group.cpu_param_dict:
        if is_traceable_wrapper_subclass(tensor):
            group.cpu_param_dict[tensor] = tensor.detach()


class EngineHeldMemory:
    """What TensorRT engines hold on the GPU outside PyTorch's allocator: their weights and their runtime's own
    memory, measured (the device's use less PyTorch's, beyond what it was before any engine). Under
    `--gpu-memory-limit` PyTorch's share of the limit shrinks by it whenever engines come or go, so engines and
    PyTorch together keep to the limit, as they must on a card of that size. One per loaded set of models, shared by
    its parkings."""

    def __init__(self, plan: MemoryPlan) -> None:
        self.plan = plan
        self.bytes = 0
        self._before = self._outside_pytorch()

    def update(self) -> None:
        """Measure again (an engine came or went) and cap PyTorch's share of the limit by what engines hold."""
        self.bytes = max(self._outside_pytorch() - self._before, 0)
        apply_limit(self.plan, self.bytes)

    def _outside_pytorch(self) -> int:
        if self.plan.limit_gb is None:
            return 0
        free, total = torch.cuda.mem_get_info(self.plan.device)
        return total - free - torch.cuda.memory_reserved(self.plan.device)


class HostParking:
    """Where PyTorch's copy of a model waits while a TensorRT engine holds its weights on the GPU: host memory, except
    `keep_on_device`, parts other code still runs on the GPU itself (the step cache reads the first block's
    modulation). `held` is measured again whenever weights leave or come back, so the limit stays the process's.
    The TensorRT runtime is handed one per component (its `WeightParking`) and moves nothing itself."""

    def __init__(
        self,
        device: torch.device,
        keep_on_device: tuple[torch.nn.Module, ...] = (),
        held: EngineHeldMemory | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.keep_on_device = keep_on_device
        self.held = held
        self._parked: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def park(self, module: torch.nn.Module) -> bool:
        """PyTorch's copy to host memory, but the parts kept on the device; True when it left the device."""
        if self.device.type == "cpu":  # the host is where the weights already are
            return False
        module.to("cpu")
        for part in self.keep_on_device:
            part.to(self.device)
        self._parked.add(module)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.held is not None:
            self.held.update()
        return True

    def is_parked(self, module: torch.nn.Module) -> bool:
        return module in self._parked

    def bring_back(self, module: torch.nn.Module) -> bool:
        """A parked module's weights back on the device where PyTorch runs them; True when they moved."""
        if module not in self._parked:
            return False
        self._parked.discard(module)
        module.to(self.device)
        if self.held is not None:
            self.held.update()
        return True
