"""FramePack's noise schedule: the time shift grows with the number of latent tokens the transformer denoises.

mu lies on the line through (256 tokens, 0.5) and (4096 tokens, 1.15), capped at ln 7; the sigmas are
exp(mu) / (exp(mu) + 1/t - 1) for t = linspace(1, 0, steps + 1), so the shift is exp(mu): 7 at every 640 bucket,
about 1.74 for the tiny preset's 128 x 128.
"""

import math
from dataclasses import dataclass

import torch

MU_LINE = ((256, 0.5), (4096, 1.15))
MAX_SHIFT = 7.0


def latent_tokens(frames: int, latent_height: int, latent_width: int) -> int:
    """Tokens of one window after the transformer's 2 x 2 patches: T * H * W / 4."""
    return frames * latent_height * latent_width // 4


def shift_mu(tokens: int) -> float:
    (x1, y1), (x2, y2) = MU_LINE
    slope = (y2 - y1) / (x2 - x1)
    return min(slope * tokens + y1 - slope * x1, math.log(MAX_SHIFT))


@dataclass(frozen=True)
class Schedule:
    """The sigmas of one section's sampling, from 1 down to 0 (steps + 1 values), and the shift that made them."""

    shift: float
    sigmas: torch.Tensor  # float32

    def to_dict(self) -> dict:
        return {"shift": self.shift, "sigmas": [round(s, 6) for s in self.sigmas.tolist()]}


def framepack_schedule(steps: int, frames: int, latent_height: int, latent_width: int) -> Schedule:
    mu = shift_mu(latent_tokens(frames, latent_height, latent_width))
    t = torch.linspace(1, 0, steps + 1)
    return Schedule(shift=math.exp(mu), sigmas=math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
