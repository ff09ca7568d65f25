"""Denoise one section: flow-matching UniPC (diffusers' scheduler) over the FramePack transformer.

The loop is a generator so the engine can stream a preview after every step and stop between steps.
"""

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from .conditioning import Conditions, TextConditions
from .sections import HistoryLayout

FLOW_SHIFT = 3.0  # FramePack's fixed time shift for the flow-matching schedule


def make_scheduler() -> UniPCMultistepScheduler:
    """FramePack's sampler: UniPC (bh1, up to third order) predicting x0 from the flow, shifted schedule."""
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=3,
        solver_type="bh1",
        predict_x0=True,
        lower_order_final=True,
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
    scheduler: UniPCMultistepScheduler,
    noise: torch.Tensor,
    conditions: Conditions,
    layout: HistoryLayout,
    guidance: Guidance,
    steps: int,
) -> Generator[StepResult, None, torch.Tensor]:
    """Yield after every step; return the clean latents (float32) once all steps are done.

    Like FramePack's sampler, the result is the x0 prediction at the last sigma: UniPC's bh1 step from there
    to sigma 0 would divide by an infinite log-SNR step (NaN) and can add nothing beyond that prediction.
    """
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1], device=noise.device)
    latents = noise
    for index, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[index].item()
        model_timestep = torch.tensor([sigma * 1000.0], device=latents.device, dtype=transformer.dtype)
        flow = predict_flow(transformer, latents, model_timestep, index, steps, conditions, layout, guidance)
        denoised = latents - sigma * flow
        if index + 1 < steps:
            latents = scheduler.step(flow, timestep, latents, return_dict=False)[0]
        yield StepResult(step=index + 1, steps=steps, denoised=denoised)
    return denoised
