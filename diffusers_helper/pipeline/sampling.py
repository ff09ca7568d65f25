"""Denoise one section as FramePack does: flow-matching UniPC (diffusers' scheduler) over the FramePack transformer.

FramePack's sampler treats the flow as x = x0 + sigma * v (alpha = 1, log-SNR -log sigma), where diffusers' flow
mode takes alpha = 1 - sigma; from second order on the two give different steps. `FramePackUniPC` is diffusers'
UniPC (bh1, up to third order, corrector on, no lower-order final steps) with FramePack's parametrization, fed
the x0 prediction FramePack computes (from the latents rounded to the transformer's dtype).

The loop is a generator so the engine can stream a preview after every step and stop between steps.
"""

from collections.abc import Generator
from dataclasses import dataclass

import torch
from diffusers import UniPCMultistepScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .conditioning import Conditions, TextConditions
from .schedule import Schedule
from .sections import HistoryLayout


class FramePackUniPC(UniPCMultistepScheduler):
    """UniPC in FramePack's parametrization of the flow: alpha = 1, so lambda = -log(sigma)."""

    def _sigma_to_alpha_sigma_t(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(sigma), sigma

    def set_schedule(self, schedule: Schedule) -> None:
        """Use the schedule's sigmas as they are (flow_shift 1 leaves them alone; diffusers' nudge of the first
        sigma below 1, which guards log(1 - sigma), is undone: with alpha = 1 there is nothing to guard)."""
        self.set_timesteps(sigmas=schedule.sigmas[:-1].numpy())
        self.sigmas[0] = schedule.sigmas[0]
        self.set_begin_index(0)


def make_scheduler() -> FramePackUniPC:
    return FramePackUniPC(
        prediction_type="sample",  # the sampler hands over x0, computed as FramePack does
        use_flow_sigmas=True,
        flow_shift=1.0,
        solver_order=3,
        solver_type="bh1",
        predict_x0=True,
        lower_order_final=False,
    )


@dataclass(frozen=True)
class Guidance:
    distilled: float  # embedded into the transformer, FramePack's main knob
    cfg: float  # real classifier-free guidance; 1 means off
    rescale: float


@dataclass(frozen=True)
class StepResult:
    step: int  # 1-based
    steps: int
    denoised: torch.Tensor  # the current x0 estimate, for previews


def _transformer_call(
    transformer: torch.nn.Module,
    name: str,
    step: int,
    steps: int,
    text: TextConditions,
    shared: dict,
) -> torch.Tensor:
    with transformer.cache_context(name, step_index=step, num_inference_steps=steps):
        return transformer(**shared, **text.transformer_kwargs(), return_dict=False)[0].float()


def predict_flow(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    step: int,
    steps: int,
    conditions: Conditions,
    layout: HistoryLayout,
    guidance: Guidance,
) -> torch.Tensor:
    """The flow (velocity) prediction with distilled guidance, and real CFG + rescale when cfg > 1."""
    dtype = transformer.dtype
    shared = {
        "hidden_states": latents.to(dtype),
        "timestep": timestep,
        "image_embeds": conditions.image_embeds,
        "guidance": torch.tensor([guidance.distilled * 1000.0], device=latents.device, dtype=dtype),
        **layout.transformer_kwargs(dtype),
    }
    positive = _transformer_call(transformer, "cond", step, steps, conditions.positive, shared)
    if conditions.negative is None:
        return positive
    negative = _transformer_call(transformer, "uncond", step, steps, conditions.negative, shared)
    guided = negative + guidance.cfg * (positive - negative)
    return rescale_noise_cfg(guided, positive, guidance_rescale=guidance.rescale)


@torch.no_grad()
def sample_section(
    transformer: torch.nn.Module,
    scheduler: FramePackUniPC,
    noise: torch.Tensor,
    conditions: Conditions,
    layout: HistoryLayout,
    guidance: Guidance,
    schedule: Schedule,
) -> Generator[StepResult, None, torch.Tensor]:
    """Yield after every step; return the clean latents (float32) once all steps are done.

    Like FramePack's sampler, the result is the x0 prediction at the last nonzero sigma: the model is called once
    per step, and the final update to sigma 0 would add nothing beyond that prediction.
    """
    scheduler.set_schedule(schedule)
    steps = len(schedule.sigmas) - 1
    sigmas = schedule.sigmas.to(noise.device)
    latents = noise
    for index in range(steps):
        sigma = sigmas[index]
        model_input = latents.to(transformer.dtype)
        timestep = (sigma * 1000.0).to(transformer.dtype).reshape(1)
        flow = predict_flow(transformer, model_input, timestep, index, steps, conditions, layout, guidance)
        denoised = model_input.float() - flow * sigma
        if index + 1 < steps:
            latents = scheduler.step(denoised, scheduler.timesteps[index], latents, return_dict=False)[0]
        yield StepResult(step=index + 1, steps=steps, denoised=denoised)
    return denoised
