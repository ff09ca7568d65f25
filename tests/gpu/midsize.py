"""A mid-size FramePack transformer for GPU tests: full width (24 heads x 128), 2 dual + 4 single blocks,
seeded so every process builds the same weights; and block-stack inputs for 4400 latent tokens."""

import json
import sys
from pathlib import Path

import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.models.placement import HostParking
from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer

FRAMES, HEIGHT, WIDTH, TEXT_TOKENS = 11, 40, 40, 750  # 11 * 20 * 20 = 4400 latent tokens after 2x2 patches


def mid_size_transformer() -> HunyuanVideoFramepackTransformer3DModel:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HunyuanVideoFramepackTransformer3DModel(
            num_layers=2, num_single_layers=4, has_image_proj=True, has_clean_x_embedder=True
        )
    return model.to(torch.bfloat16).eval().requires_grad_(False)


def stack_inputs(transformer) -> tuple:
    generator = torch.Generator("cuda").manual_seed(1)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tokens = FRAMES * (HEIGHT // 2) * (WIDTH // 2)
    hidden = torch.randn(1, tokens, width, generator=generator, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, TEXT_TOKENS, width, generator=generator, device="cuda", dtype=torch.bfloat16)
    temb = torch.randn(1, width, generator=generator, device="cuda", dtype=torch.bfloat16)
    cos, sin = transformer.rope(frame_indices=torch.arange(FRAMES), height=HEIGHT, width=WIDTH, device="cuda")
    return hidden, text, temb, cos, sin


def main() -> None:
    """`python -m tests.gpu.midsize CACHE_DIR`: run the stack once through a fresh runtime, print what it took."""
    transformer = mid_size_transformer()
    runtime = TensorRTRuntime(EngineCache(Path(sys.argv[1])))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    output = stack(hidden, text, temb, None, (cos, sin))[0]
    status = runtime.status["transformer"]
    print(
        json.dumps(
            {
                "compiles": status.compiles,
                "loads": status.loads,
                "load_seconds": status.load_seconds,
                "engine": status.engine,
                "reason": status.reason,
                "checksum": output.float().abs().mean().item(),
                "engine_modules": sorted(
                    {
                        type(part).__name__
                        for stretch in stack.stretches
                        for engine in runtime.engines_of(stretch)
                        for part in engine.modules()
                        if getattr(part, "engine", None) is not None
                    }
                ),  # fmt: skip
            }
        )
    )


if __name__ == "__main__":
    main()
