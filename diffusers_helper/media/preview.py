"""Cheap previews: HunyuanVideo latents mapped straight to RGB by a fixed linear projection, no VAE."""

import numpy as np
import torch

# Approximate RGB contribution of each of the 16 HunyuanVideo latent channels, and the bias.
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
)  # fmt: skip
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """(1, 16, T, h, w) latents -> uint8 image (h, T * w, 3): the frames side by side at latent resolution."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.einsum("bcthw,ck->bthwk", latents[:1].float().cpu(), factors) + bias
    rgb = ((rgb + 1) / 2).clamp(0, 1)[0]  # (T, h, w, 3)
    frames, height, width, _ = rgb.shape
    strip = rgb.permute(1, 0, 2, 3).reshape(height, frames * width, 3)
    return (strip * 255).round().to(torch.uint8).numpy()
