"""LoRA files made in code for the tiny transformer: random low-rank weights saved with safetensors in the formats
people have (diffusers/PEFT, kohya/musubi-tuner)."""

from pathlib import Path

import torch
from safetensors.torch import save_file

# (out_features, in_features) of some of the tiny transformer's linear layers, image projection included
TINY_LAYERS = {
    "transformer_blocks.0.attn.to_q": (32, 32),
    "transformer_blocks.1.ff.net.0.proj": (64, 32),
    "single_transformer_blocks.0.proj_mlp": (64, 32),
    "image_projection.up": (96, 32),
    "proj_out": (64, 32),
}


def random_layers(layers: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """(down, up) per module: big enough to move the tiny transformer's output visibly."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(rank, fan_in, generator=generator) * 0.3,
            torch.randn(fan_out, rank, generator=generator) * 0.3,
        )
        for name, (fan_out, fan_in) in layers.items()
    }


def write_peft(path: Path, weights: dict[str, tuple[torch.Tensor, ...]], prefix: str = "transformer.") -> Path:
    tensors = {}
    for name, (down, up) in weights.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = down.clone()
        tensors[f"{prefix}{name}.lora_B.weight"] = up.clone()
    save_file(tensors, path)
    return path


def write_kohya(path: Path, weights: dict[str, tuple[torch.Tensor, ...]], alpha: float | None = None) -> Path:
    """musubi-tuner's layout: `lora_unet_` and the module name with its dots as underscores; alpha per layer."""
    tensors = {}
    for name, (down, up) in weights.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = down.clone()
        tensors[f"{key}.lora_up.weight"] = up.clone()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def delta(weights: dict[str, tuple[torch.Tensor, ...]], name: str) -> torch.Tensor:
    down, up = weights[name]
    return up.float() @ down.float()
