"""Encode the prompt (LLaMA + CLIP), the image (SigLIP) and the start latent (VAE) once per job, as FramePack does.

The prompt encoders and the VAE encoding are diffusers' own HunyuanVideo FramePack pipeline methods; SigLIP sees
the uint8 bucket image through its processor, as in FramePack. This module decides what to encode and keeps the
results together.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import HunyuanVideoFramepackPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import DEFAULT_PROMPT_TEMPLATE

from ..models.components import Components
from .timeline import SectionPrompt

PROMPT_TEMPLATE: str = DEFAULT_PROMPT_TEMPLATE["template"]
MAX_PROMPT_TOKENS = 256  # LLaMA tokens after the template's preamble
CLIP_TOKENS = 77


@dataclass(frozen=True)
class TextConditions:
    embeds: torch.Tensor  # (1, prompt tokens, text_dim): real tokens only, at most MAX_PROMPT_TOKENS
    mask: torch.Tensor  # (1, prompt tokens), all ones
    pooled: torch.Tensor  # (1, clip_dim)

    def transformer_kwargs(self) -> dict:
        return {
            "encoder_hidden_states": self.embeds,
            "encoder_attention_mask": self.mask,
            "pooled_projections": self.pooled,
        }


def blend_text(previous: TextConditions, text: TextConditions, weight: float) -> TextConditions:
    """`weight` of the way from one prompt's conditions to another's (a timeline's fade): the shorter prompt's tokens
    padded with zeros to the longer's count."""
    length = max(previous.embeds.shape[1], text.embeds.shape[1])

    def padded(embeds: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(embeds, (0, 0, 0, length - embeds.shape[1]))

    return TextConditions(
        embeds=torch.lerp(padded(previous.embeds), padded(text.embeds), weight),
        mask=text.mask.new_ones(1, length),
        pooled=torch.lerp(previous.pooled, text.pooled, weight),
    )


@dataclass(frozen=True)
class Conditions:
    positive: TextConditions
    negative: TextConditions | None  # only when real CFG is on
    image_embeds: torch.Tensor  # (1, siglip tokens, siglip dim)
    start_latent: torch.Tensor  # (1, 16, 1, h / 8, w / 8), float32
    end_latent: torch.Tensor | None = None  # the end image's, scaled by the end strength (end-to-start order only)
    context_latents: torch.Tensor | None = None  # an extended video's last latents, for the history (F1 only)
    prompts: dict[str, TextConditions] = field(default_factory=dict)  # every prompt of a timeline, by its text

    def for_section(self, prompt: SectionPrompt) -> "Conditions":
        """The conditions of a section of a prompt timeline."""
        text = self.prompts[prompt.text]
        if prompt.previous is not None:
            text = blend_text(self.prompts[prompt.previous], text, prompt.weight)
        return dataclasses.replace(self, positive=text)


def encoding_pipeline(components: Components, scheduler: object) -> HunyuanVideoFramepackPipeline:
    """diffusers' pipeline over our components, used for its encoders; its own sampling loop is not used."""
    return HunyuanVideoFramepackPipeline(
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        transformer=components.transformer,
        vae=components.vae,
        scheduler=scheduler,
        text_encoder_2=components.text_encoder_2,
        tokenizer_2=components.tokenizer_2,
        image_encoder=components.image_encoder,
        feature_extractor=components.feature_extractor,
    )


def template_crop_start(tokenizer: object) -> int:
    """How many tokens the template puts before the prompt; they are cut from the LLaMA hidden states."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix)["input_ids"])


def prompt_overflow(pipe: HunyuanVideoFramepackPipeline, prompt: str) -> str | None:
    """A sentence saying which encoder cuts the prompt short, or None when both read all of it."""
    crop_start = template_crop_start(pipe.tokenizer)
    llama = len(pipe.tokenizer(PROMPT_TEMPLATE.format(prompt), verbose=False)["input_ids"]) - crop_start
    clip = len(pipe.tokenizer_2(prompt, verbose=False)["input_ids"])
    cut = [
        f"{name} reads the first {limit}"
        for name, count, limit in (("LLaMA", llama, MAX_PROMPT_TOKENS), ("CLIP", clip, CLIP_TOKENS))
        if count > limit
    ]
    if not cut:
        return None
    return f"the prompt is {max(llama, clip)} tokens long; {' and '.join(cut)} tokens, the rest is ignored"


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float (1, 3, H, W) in [-1, 1], the range the VAE expects."""
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float() / 127.5 - 1.0


def encode_video(
    pipe: HunyuanVideoFramepackPipeline, frames: np.ndarray, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> a sample of the VAE's posterior (1, 16, (T - 1) / 4 + 1, H / 8, W / 8), float32,
    scaled as the transformer's latents are (as diffusers' pipeline encodes an image)."""
    vae = pipe.vae
    pixels = torch.from_numpy(frames).permute(3, 0, 1, 2).unsqueeze(0).float() / 127.5 - 1.0
    latents = vae.encode(pixels.to(device=device, dtype=vae.dtype)).latent_dist.sample(generator=generator)
    return (latents * vae.config.scaling_factor).to(device=device, dtype=torch.float32)


def encode_text(
    pipe: HunyuanVideoFramepackPipeline, prompt: str, device: torch.device, dtype: torch.dtype
) -> TextConditions:
    template = {"template": PROMPT_TEMPLATE, "crop_start": template_crop_start(pipe.tokenizer)}
    embeds, pooled, mask = pipe.encode_prompt(
        prompt=prompt, prompt_template=template, device=device, max_sequence_length=MAX_PROMPT_TOKENS
    )
    # Padding positions carry no meaning (and can hold NaN in half precision): keep the real tokens only,
    # which with batch 1 is what the transformer would attend to anyway.
    length = int(mask.sum())
    return TextConditions(embeds=embeds[:, :length].to(dtype), mask=mask[:, :length].to(dtype), pooled=pooled.to(dtype))


def encode_image(pipe: HunyuanVideoFramepackPipeline, image: np.ndarray, device: torch.device, dtype: torch.dtype):
    """SigLIP's last hidden state for the uint8 image, preprocessed (resized, rescaled) by its own processor."""
    encoder = pipe.image_encoder
    inputs = pipe.feature_extractor.preprocess(images=image, return_tensors="pt").to(device=device, dtype=encoder.dtype)
    return encoder(**inputs).last_hidden_state.to(dtype)


@torch.no_grad()
def encode_conditions(
    pipe: HunyuanVideoFramepackPipeline,
    image: np.ndarray,
    prompts: Sequence[str],
    negative_prompt: str | None,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
    end_image: np.ndarray | None = None,
    end_strength: float = 1.0,
    context_frames: np.ndarray | None = None,
) -> Conditions:
    """Everything the sampler needs besides noise; `negative_prompt` None means no real CFG. Each of `prompts` (a
    timeline's distinct texts; the first is the positive prompt) is encoded once.

    The start latent is a sample of the VAE's posterior, drawn from its own generator so that the sections' noise
    is the seed's stream from its first number, as in FramePack. An end image (as FramePack-Studio's end frame) is
    encoded the same way, from the same generator after the start latent, and its SigLIP embedding is averaged with
    the start image's. An extended video's last frames (`context_frames`) are encoded after those.
    """
    posterior_generator = torch.Generator("cpu").manual_seed(seed)
    encoded = {prompt: encode_text(pipe, prompt, device, dtype) for prompt in dict.fromkeys(prompts)}
    negative = None if negative_prompt is None else encode_text(pipe, negative_prompt, device, dtype)
    image_embeds = encode_image(pipe, image, device, dtype)
    start_latent = pipe.prepare_image_latents(
        image_to_tensor(image), dtype=torch.float32, device=device, generator=posterior_generator
    )
    end_latent = None
    if end_image is not None:
        image_embeds = (image_embeds + encode_image(pipe, end_image, device, dtype)) / 2
        end_latent = end_strength * pipe.prepare_image_latents(
            image_to_tensor(end_image), dtype=torch.float32, device=device, generator=posterior_generator
        )
    context_latents = None
    if context_frames is not None:
        context_latents = encode_video(pipe, context_frames, device, posterior_generator)
    return Conditions(encoded[prompts[0]], negative, image_embeds, start_latent, end_latent, context_latents, encoded)
