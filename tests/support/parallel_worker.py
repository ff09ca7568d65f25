"""One rank of a context-parallel run on the CPU (gloo): the tiny transformer assembled as `--gpus N` assembles it,
one section sampled with a step cache on, its latents and the cache's counts handed back to the test."""

import os

import torch
import torch.distributed as dist

STEPS = 6
TEXT_TOKENS = 38  # with the 9 image tokens, 47: the ranks' text shards differ in length (24 and 23)


def section(models, text_tokens: int = TEXT_TOKENS) -> torch.Tensor:
    """One section's latents from seeded inputs at a 64 x 96 bucket, with the history of a later section."""
    from diffusers_helper.pipeline.conditioning import Conditions, TextConditions
    from diffusers_helper.pipeline.sampling import Guidance, make_scheduler, sample_section
    from diffusers_helper.pipeline.schedule import framepack_schedule
    from diffusers_helper.pipeline.sections import HistoryLayout

    config = models.components.transformer.config
    generator = torch.Generator().manual_seed(7)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    h, w, window = 8, 12, 9
    text = TextConditions(draw(1, text_tokens, config.text_embed_dim), torch.ones(1, text_tokens),
                          draw(1, config.pooled_projection_dim))  # fmt: skip
    conditions = Conditions(text, None, draw(1, 9, config.image_proj_dim), draw(1, 16, 1, h, w))
    indices = torch.arange(1 + window + 1 + 2 + 16)
    pre, latent, post, two, four = indices.split([1, window, 1, 2, 16])
    layout = HistoryLayout(latent, draw(1, 16, 2, h, w), torch.cat([pre, post]), draw(1, 16, 2, h, w), two,
                           draw(1, 16, 16, h, w), four)  # fmt: skip
    sampler = sample_section(models.components.transformer, make_scheduler(), draw(1, 16, window, h, w), conditions,
                             layout, Guidance(10.0, 1.0, 0.0), framepack_schedule(STEPS, window, h, w))  # fmt: skip
    while True:
        try:
            next(sampler)
        except StopIteration as done:
            return done.value


def assembled(gpus: int, teacache: float | None):
    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.models.tiny_preset import ensure_tiny_models
    from diffusers_helper.settings import ModelSettings

    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", ensure_tiny_models(), plan.dtypes()), plan,
                      ModelSettings(preset="tiny", device="cpu", gpus=gpus))  # fmt: skip
    models.teacache.reset(teacache)
    return models


def run_rank(rank: int, ranks: int, port: int, teacache: float | None, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)
    torch.accelerator.device_count = lambda: 1  # diffusers picks each rank's device by it; the CPU counts none
    try:
        models = assembled(ranks, teacache)
        latents = section(models)
        # by value: a shared tensor would not outlive this process
        results.put((rank, latents.numpy(), models.teacache.computed, models.teacache.skipped))
    finally:
        dist.destroy_process_group()
