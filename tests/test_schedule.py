"""FramePack's schedule: the shift follows the number of latent tokens."""

import math

import pytest
import torch

from diffusers_helper.media.buckets import BUCKETS_640
from diffusers_helper.pipeline.schedule import framepack_schedule, latent_tokens, shift_mu


def formula_sigmas(steps: int, tokens: int) -> list[float]:
    mu = min(0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256), math.log(7))
    return [
        math.exp(mu) / (math.exp(mu) + (1 / t - 1)) if t > 0 else 0.0 for t in torch.linspace(1, 0, steps + 1).tolist()
    ]


@pytest.mark.parametrize(
    ("steps", "window", "height", "width"),
    [(25, 9, 16, 16), (25, 9, 68, 88), (10, 1, 16, 16), (25, 1, 16, 24), (4, 5, 12, 12), (30, 33, 60, 104)],
)
def test_sigmas_follow_the_formula(steps, window, height, width):
    schedule = framepack_schedule(steps, window, height, width)
    tokens = window * height * width / 4
    assert schedule.sigmas.tolist() == pytest.approx(formula_sigmas(steps, tokens), abs=1e-6)
    assert schedule.sigmas[0] == 1 and schedule.sigmas[-1] == 0 and len(schedule.sigmas) == steps + 1
    assert schedule.shift == pytest.approx(math.exp(shift_mu(latent_tokens(window, height, width))))


def test_every_640_bucket_gets_shift_7_and_the_tiny_preset_about_1_74():
    for height, width in BUCKETS_640:
        assert framepack_schedule(25, 9, height // 8, width // 8).shift == pytest.approx(7.0)
    assert framepack_schedule(25, 9, 16, 16).shift == pytest.approx(1.7405, abs=1e-4)
    assert framepack_schedule(25, 1, 16, 16).shift == pytest.approx(math.exp(0.5 - 192 * 0.65 / 3840))


def test_the_shift_is_recorded_with_its_sigmas():
    record = framepack_schedule(2, 9, 16, 16).to_dict()
    assert set(record) == {"shift", "sigmas"} and len(record["sigmas"]) == 3
