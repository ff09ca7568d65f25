"""The full-size random preset: every component at its real size, with seeded random weights, for GPU benchmarks and
memory tests. Its videos are noise; its speed and memory are the real models'.

Nothing is written to disk: each model is built on the meta device, then every parameter is drawn on the GPU (when
there is one, so the weights are the same wherever they end up) in its dtype and handed to `store`, the memory
policy's say of where it lives (models/placement.py: `weight_store`). The
tokenizers are the tiny preset's (their ids are valid for the real vocabularies); the image processor is SigLIP's.
"""

import logging
import math
import zlib
from collections.abc import Callable

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from .components import HUNYUAN_VIDEO, Components
from .tiny_preset import ensure_tiny_models

logger = logging.getLogger(__name__)

SEED = 20251122
# The public configurations of FramePack's components (DESIGN.md, "Full-size components").
FULL_SIZE: dict[str, Callable[[], torch.nn.Module]] = {
    "text_encoder": lambda: LlamaModel(
        LlamaConfig(
            vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
            max_position_embeddings=8192,
        )
    ),
    "text_encoder_2": lambda: CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        )
    ),
    "image_encoder": lambda: SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
            patch_size=14,
        )
    ),
    "vae": AutoencoderKLHunyuanVideo,
    "transformer": lambda: HunyuanVideoFramepackTransformer3DModel(
        has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True
    ),
}  # fmt: skip


def generator_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


Store = Callable[[torch.Tensor], torch.Tensor]


def random_weights(
    build: Callable[[], torch.nn.Module], dtype: torch.dtype, store: Store, seed: int
) -> torch.nn.Module:
    """The model `build` makes, its parameters drawn at random (uniform within 1/sqrt(fan-in); norm scales one,
    biases zero) in `dtype`, each handed to `store` as soon as it is drawn; buffers computed as usual."""
    with init_empty_weights(include_buffers=False):
        model = build()
    source = generator_device()
    for name, parameter in list(model.named_parameters()):
        generator = torch.Generator(source).manual_seed(seed + zlib.crc32(name.encode()))
        value = torch.empty(parameter.shape, dtype=dtype, device=source)
        if value.dim() >= 2:
            bound = 1 / math.sqrt(math.prod(value.shape[1:]))
            value.uniform_(-bound, bound, generator=generator)
        elif name.endswith("bias"):
            value.zero_()
        else:
            value.fill_(1.0)
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner._parameters[attribute] = torch.nn.Parameter(store(value), requires_grad=False)
    for owner in model.modules():
        for attribute, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[attribute] = store(buffer)
    return model.eval()


def full_size_components(
    variant: str,
    dtypes: dict[str, torch.dtype],
    store: Store,
    builders: dict[str, Callable[[], torch.nn.Module]] = FULL_SIZE,
) -> Components:
    """FramePack's components at full size with random weights, kept where `store` puts them."""
    tiny = ensure_tiny_models()
    models = {}
    for index, (name, build) in enumerate(builders.items()):
        seed = SEED + index * 1000 + (7 if name == "transformer" and variant == "f1" else 0)
        models[name] = random_weights(build, dtypes.get(name, torch.float32), store, seed)
        count = sum(p.numel() for p in models[name].parameters())
        where = next(models[name].parameters()).device
        logger.info("built %s with random weights: %.2fB parameters on %s", name, count / 1e9, where)
    return Components(
        tokenizer=AutoTokenizer.from_pretrained(tiny / HUNYUAN_VIDEO, subfolder="tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(tiny / HUNYUAN_VIDEO, subfolder="tokenizer_2"),
        feature_extractor=SiglipImageProcessor(
            size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
        ),
        **models,
        variant=variant,
    )
