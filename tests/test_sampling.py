"""The sampler against FramePack's, on the same sigmas and inputs (tests/framepack_unipc.py is the reference)."""

import contextlib

import pytest
import torch
from diffusers import UniPCMultistepScheduler

from diffusers_helper.pipeline.conditioning import Conditions, TextConditions
from diffusers_helper.pipeline.sampling import Guidance, make_scheduler, sample_section
from diffusers_helper.pipeline.schedule import framepack_schedule
from diffusers_helper.pipeline.sections import InvertedAntiDrifting
from tests.support.framepack_unipc import framepack_unipc

SHAPE = (1, 16, 9, 8, 8)


def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A smooth, nonlinear stand-in for the transformer's flow prediction."""
    mixing = torch.linspace(-0.4, 0.4, 256, dtype=torch.float64).view(16, 16)
    return torch.tanh(torch.einsum("bcthw,cd->bdthw", x.double(), mixing)) + 0.3 * sigma.double() * x.double()


class FakeTransformer(torch.nn.Module):
    """Called like the FramePack transformer; predicts `velocity` from its (rounded) inputs."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @contextlib.contextmanager
    def cache_context(self, name, **kwargs):
        yield

    def forward(self, hidden_states, timestep, return_dict=False, **kwargs):
        self.calls += 1
        return (velocity(hidden_states, timestep.float() / 1000).to(self.dtype),)


def framepack_x0(dtype: torch.dtype):
    """FramePack's model wrapper: latents and timestep in the transformer's dtype, x0 in float32."""

    def model(x, sigma):
        sigma = torch.as_tensor(sigma).float()
        rounded = x.float().to(dtype)
        flow = velocity(rounded, (sigma * 1000).to(dtype).float() / 1000).to(dtype).float()
        return rounded.float() - flow * sigma

    return model


def sample(transformer, steps: int, noise: torch.Tensor) -> torch.Tensor:
    text = TextConditions(torch.zeros(1, 4, 8), torch.ones(1, 4), torch.zeros(1, 8))
    conditions = Conditions(text, None, torch.zeros(1, 4, 8), torch.zeros(1, 16, 1, 8, 8))
    order = InvertedAntiDrifting()
    layout = order.layout(order.initial_history(conditions.start_latent), conditions.start_latent, order.plan(1)[0], 9)
    schedule = framepack_schedule(steps, 9, 8, 8)
    loop = sample_section(transformer, make_scheduler(), noise, conditions, layout, Guidance(10, 1, 0), schedule)
    while True:
        try:
            next(loop)
        except StopIteration as done:
            return done.value


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 25])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_section_sampler_is_framepacks(steps, dtype):
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    transformer = FakeTransformer(dtype)
    ours = sample(transformer, steps, noise)
    reference = framepack_unipc(framepack_x0(dtype), noise, framepack_schedule(steps, 9, 8, 8).sigmas)
    assert transformer.calls == steps  # one model call per step, as in FramePack
    # float32: rounding only. bf16: the reference's float64 arithmetic flips a few bf16 roundings of the model
    # input (1e-4); taking x0 from the unrounded latents instead, as FramePack does not, would cost 3.5e-3.
    tolerance = 1e-5 if dtype == torch.float32 else 5e-4
    assert ((ours.double() - reference).norm() / reference.norm()).item() < tolerance


def test_diffusers_own_flow_mode_would_differ_measurably():
    """What FramePackUniPC changes: diffusers' flow UniPC (alpha = 1 - sigma, lower order at the end) takes other
    steps from second order on; at 25 steps the result moves by about 0.4% (measured: 4.2e-3)."""
    steps = 25
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    schedule = framepack_schedule(steps, 9, 8, 8)
    model = framepack_x0(torch.float32)
    scheduler = UniPCMultistepScheduler(
        prediction_type="sample", use_flow_sigmas=True, flow_shift=1.0, solver_order=3, solver_type="bh1"
    )
    scheduler.set_timesteps(sigmas=schedule.sigmas[:-1].numpy())
    latents = noise
    for index in range(steps):
        x0 = model(latents, scheduler.sigmas[index])
        if index + 1 < steps:
            latents = scheduler.step(x0, scheduler.timesteps[index], latents, return_dict=False)[0]
    reference = framepack_unipc(model, noise, schedule.sigmas)
    difference = ((x0.double() - reference).norm() / reference.norm()).item()
    assert 1e-3 < difference < 5e-2
