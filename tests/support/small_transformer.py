"""A FramePack transformer small enough to export and run on the CPU in a moment, with the real block classes."""

import torch


def small_transformer(dual_blocks: int = 1, single_blocks: int = 2) -> torch.nn.Module:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoFramepackTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, num_layers=dual_blocks, num_single_layers=single_blocks,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), has_image_proj=True, image_proj_dim=16,
        has_clean_x_embedder=True,
    ).eval()  # fmt: skip


def stack_inputs(transformer: torch.nn.Module, frames: int = 2, text_tokens: int = 5) -> tuple:
    """(hidden states, text, temb, (rope cos, rope sin)) for a 4x4 latent of `frames` frames."""
    cos, sin = transformer.rope(frame_indices=torch.arange(frames), height=4, width=4, device="cpu")
    return torch.randn(1, 4 * frames, 16), torch.randn(1, text_tokens, 16), torch.randn(1, 16), (cos, sin)
