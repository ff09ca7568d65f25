"""One full-size transformer call in a fresh process (`python -m tests.gpu.full_size_step OUT.pt [LIMIT_GB]`): the
full-random preset placed for the limit (resident without one), seeded inputs at the 544 x 704 bucket; saves the
output and prints the peak GPU memory as JSON."""

import json
import sys

import torch

from diffusers_helper.frontend.startup import load_engine, plan_for, quiet_libraries
from diffusers_helper.pipeline.conditioning import TextConditions
from diffusers_helper.pipeline.sampling import Guidance, predict_flow
from diffusers_helper.pipeline.sections import InvertedAntiDrifting
from diffusers_helper.settings import ModelSettings

HEIGHT, WIDTH, WINDOW, TEXT_TOKENS = 544 // 8, 704 // 8, 9, 120


def main() -> None:
    quiet_libraries()
    limit = float(sys.argv[2]) if len(sys.argv) > 2 else None
    settings = ModelSettings(preset="full-random", device="cuda", gpu_memory_limit_gb=limit, backend="eager")
    engine = load_engine(settings, plan_for(settings), None)
    transformer = engine.components.transformer
    generator = torch.Generator("cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)

    start = torch.randn(1, 16, 1, HEIGHT, WIDTH, generator=generator).cuda()
    order = InvertedAntiDrifting()
    history = torch.randn(1, 16, 19, HEIGHT, WIDTH, generator=generator).cuda()
    layout = order.layout(history, start, order.plan(2)[0], WINDOW)
    text = TextConditions(randn(1, TEXT_TOKENS, 4096), torch.ones(1, TEXT_TOKENS, device="cuda"), randn(1, 768))
    conditions = type("Conditions", (), {"positive": text, "negative": None, "image_embeds": randn(1, 729, 1152)})
    latents = torch.randn(1, 16, WINDOW, HEIGHT, WIDTH, generator=generator).cuda()
    timestep = torch.tensor([700.0], device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        flow = predict_flow(transformer, latents, timestep, 1, 25, conditions, layout, Guidance(10.0, 1.0, 0.0))
    torch.cuda.synchronize()
    torch.save(flow.cpu(), sys.argv[1])
    print(json.dumps({
        "limit_gb": limit, "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30, "placement": engine.models.placement.describe(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
