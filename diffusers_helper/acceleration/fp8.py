"""FP8 for the transformer's blocks: torchao's float8 weights and dynamic float8 activations, scaled per row.

Only the blocks' matrix multiplications change (attention projections and feed-forwards: nearly all of the weights,
and of the FLOPs outside attention itself); what quality needs stays bf16: the embedders, the output head and every
block's modulation (the AdaLayerNorm linears, which TeaCache and MagCache also read). FP8 GEMMs need an FP8 tensor
core (Ada, Hopper, Blackwell: compute capability 8.9 and up) and pay off only compiled: eager PyTorch quantizes each
activation in separate kernels, so `--fp8` is meant with torch.compile (`--backend auto` or `compile`).

TensorRT's FP8 (nvidia-modelopt quantization, then an engine) is not offered: the TensorRT build tested here,
TensorRT-RTX, does not list Hopper among its GPUs, and no FP8 engine has been built and checked. `--fp8` with
`--tensorrt-transformer` is refused at start-up.
"""

import importlib.util

import torch

from ..models.transformer_blocks import BLOCK_LISTS
from .compiled_blocks import compile_unavailable

MIN_COMPUTE_CAPABILITY = (8, 9)
MODULATION = ("norm", "norm1", "norm1_context")  # the AdaLayerNorm modules whose linears make a block's modulation


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 blocks cannot run here, if they cannot."""
    if device.type != "cuda":
        return "FP8 needs an NVIDIA GPU with FP8 tensor cores (Ada, Hopper or Blackwell); this run is on the CPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_COMPUTE_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return (f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell); {name} has "
                f"{capability[0]}.{capability[1]}")  # fmt: skip
    if importlib.util.find_spec("torchao") is None:
        return "FP8 needs torchao (pip install torchao)"
    return compile_unavailable(device)


def block_fp8_linears(block: torch.nn.Module) -> list[str]:
    """The linears of one block that FP8 quantizes: every one but the modulation's, by their names in the block."""
    return [
        name
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in MODULATION
    ]


def fp8_linear_names(transformer: torch.nn.Module) -> list[str]:
    """The linears that FP8 quantizes, by their names in the transformer."""
    return [
        f"{blocks}.{index}.{name}"
        for blocks in BLOCK_LISTS
        for index, block in enumerate(getattr(transformer, blocks))
        for name in block_fp8_linears(block)
    ]


def quantize_block_fp8(block: torch.nn.Module) -> None:
    """Replace one block's chosen linears' weights by float8 ones, where the block is (the memory policy brings each
    block to the GPU for it: models/placement.py)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    chosen = set(block_fp8_linears(block))
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(block, config, filter_fn=lambda module, name: name in chosen)
