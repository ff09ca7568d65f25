"""Cheap previews: HunyuanVideo latents mapped straight to RGB by a fixed linear projection, no VAE."""

import math

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
PREVIEW_HEIGHT = 256  # pixels; latents are 1/8 of the video's size, too small to see


def latent_preview(latents: torch.Tensor, min_height: int = PREVIEW_HEIGHT) -> np.ndarray:
    """(1, 16, T, h, w) latents -> uint8 RGB image: the T frames mapped to RGB as in FramePack, laid out left to
    right and top to bottom in a near-square grid, enlarged k times (nearest neighbour, k a whole number) to at
    least `min_height` pixels."""
    factors = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.einsum("bcthw,ck->bthwk", latents[:1].float().cpu(), factors) + bias
    frames = (rgb.clamp(0, 1)[0] * 255).numpy().astype(np.uint8)  # (T, h, w, 3)
    count, height, width, _ = frames.shape
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, frame in enumerate(frames):
        row, column = divmod(index, columns)
        grid[row * height : (row + 1) * height, column * width : (column + 1) * width] = frame
    scale = max(1, math.ceil(min_height / grid.shape[0]))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)
