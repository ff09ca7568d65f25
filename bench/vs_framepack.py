"""FramePack's own transformer and sampler against this product's, on identical weights and inputs: one section,
resident and at GPU memory limits, where FramePack runs its own low-VRAM mode seeing a card of that size.

    python bench/vs_framepack.py --framepack ~/FramePack                                  # full size, resident
    python bench/vs_framepack.py --framepack ~/FramePack --limits none 24 8 --paths eager compile fp8
    python bench/vs_framepack.py --framepack ~/FramePack --preset tiny --device cpu --steps 3 --paths eager

`--framepack` is a checkout of lllyasviel/FramePack (yours: nothing of it is in this repository); its code runs as
it is, in a process of its own (its package is also called `diffusers_helper`). The transformer's weights are
drawn once (this product's seeded random weights at the preset's sizes, or the tiny preset's) and written to
`--work`, where both sides load them, with the same seeded inputs: text, image embeddings, history latents and
the section's noise. FramePack's side runs `sample_hunyuan` (UniPC) on its `HunyuanVideoTransformer3DModelPacked`;
below 60 GB (its high-VRAM rule) it installs `DynamicSwapInstaller` and moves the transformer with
`move_model_to_device_with_memory_preservation` (6 GB preserved), its free-memory count seeing the limit. The
product's side runs its own sampler on the transformer as its memory plan places it at that limit, eager, compiled
(`--backend compile`) or with `--fp8`, its attention kernel from `--attention`. FramePack's own code uses the first of
SageAttention, FlashAttention and xformers it can import: `--framepack-attention sdpa` (the default) hides all three
from its process, so its step is PyTorch's SDPA whatever is installed; `installed` lets it choose. Each run is a
fresh process. Prints one JSON line per run and a Markdown
table: seconds per step (median, the first step apart), the ratio to FramePack at the same limit, and the relative
error of the section's latents against FramePack's resident ones.
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
FRAMEPACK_HIGH_VRAM_GB = 60  # FramePack's demo streams below this much free memory
FRAMEPACK_PRESERVED_GB = 6  # its default "GPU Inference Preserved Memory"
DISTILLED_CFG = 10.0
SEED = 31337
WINDOW = 9
FRAMEPACK_ATTENTION_PACKAGES = ("sageattention", "flash_attn", "xformers")  # what its attention tries, in order


def section_inputs(height: int, width: int, config: dict, dtype: torch.dtype) -> dict:
    """One end-to-start section's inputs as FramePack's worker lays them out (a 1-section video: no padding), drawn
    from SEED; the history is random rather than empty, so every embedder takes part."""
    generator = torch.Generator().manual_seed(SEED)

    def draw(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * scale).to(dtype)

    h, w = height // 8, width // 8
    indices = torch.arange(1 + WINDOW + 1 + 2 + 16).unsqueeze(0)
    pre, latent, post, two, four = indices.split([1, WINDOW, 1, 2, 16], dim=1)
    return {
        "prompt_embeds": draw(1, 120, config["text_embed_dim"], scale=0.1),
        "prompt_embeds_mask": torch.ones(1, 120, dtype=torch.long),
        "prompt_poolers": draw(1, config["pooled_projection_dim"], scale=0.1),
        "image_embeddings": draw(1, 729, config["image_proj_dim"], scale=0.1),
        "latent_indices": latent,
        "clean_latents": draw(1, 16, 2, h, w),
        "clean_latent_indices": torch.cat([pre, post], dim=1),
        "clean_latents_2x": draw(1, 16, 2, h, w),
        "clean_latent_2x_indices": two,
        "clean_latents_4x": draw(1, 16, 16, h, w),
        "clean_latent_4x_indices": four,
    }


class StepTimer:
    """Seconds between steps, the GPU waited for at each."""

    def __init__(self) -> None:
        self.times, self.last = [], time.perf_counter()

    def step(self, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times.append(now - self.last)
        self.last = now

    def report(self) -> dict:
        return {"steps": len(self.times), "s_per_step": round(statistics.median(self.times[1:] or self.times), 4),
                "first_step_s": round(self.times[0], 3)}  # fmt: skip


def load_inputs(work: Path, device: torch.device, dtype: torch.dtype) -> dict:
    """The section's inputs on the device, the encoders' outputs in the transformer's dtype (as both apps hand
    them over); the latents stay float32, as FramePack keeps its history."""
    inputs = {name: value.to(device) for name, value in torch.load(work / "inputs.pt").items()}
    for name in ("prompt_embeds", "prompt_poolers", "image_embeddings"):
        inputs[name] = inputs[name].to(dtype)
    return inputs


def limit_gpu(limit: float | None) -> None:
    if limit is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(limit * GIB / total)


def run_framepack(args: argparse.Namespace) -> dict:
    """FramePack's side, in its own process: its package first on the path."""
    sys.path.insert(0, str(args.framepack))
    # Its utils module imports torchvision and OpenCV for video and image files, which this bench does not use:
    # where they are not installed, empty stand-ins serve that import alone (other packages must still find them
    # absent).
    missing = [name for name in ("torchvision", "cv2") if importlib.util.find_spec(name) is None]
    sys.modules.update({name: types.ModuleType(name) for name in missing})
    if args.framepack_attention == "sdpa":
        sys.modules.update(dict.fromkeys(FRAMEPACK_ATTENTION_PACKAGES))  # an import of each raises ImportError
    import diffusers_helper.utils  # noqa: F401  (FramePack's)

    for name in missing:
        del sys.modules[name]
    from diffusers_helper.models.hunyuan_video_packed import HunyuanVideoTransformer3DModelPacked
    from diffusers_helper.pipelines.k_diffusion_hunyuan import sample_hunyuan

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    transformer = HunyuanVideoTransformer3DModelPacked.from_pretrained(
        args.work / "transformer" / args.preset, torch_dtype=dtype
    )
    transformer.eval().requires_grad_(False)
    transformer.high_quality_fp32_output_for_inference = True
    limit_gpu(args.limit)
    free = (torch.cuda.mem_get_info()[0] / GIB if args.limit is None else args.limit) if device.type == "cuda" else 0
    low_vram = device.type == "cuda" and free <= FRAMEPACK_HIGH_VRAM_GB
    if low_vram:
        from diffusers_helper import memory

        memory.get_cuda_free_memory_gb = lambda target=None: args.limit - torch.cuda.memory_allocated() / GIB
        memory.DynamicSwapInstaller.install_model(transformer, device=device)
        memory.move_model_to_device_with_memory_preservation(transformer, device, FRAMEPACK_PRESERVED_GB)
    else:
        transformer.to(device)
    inputs = load_inputs(args.work, device, dtype)
    timer = StepTimer()
    torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
    latents = sample_hunyuan(
        transformer=transformer, sampler="unipc", width=args.width, height=args.height, frames=WINDOW * 4 - 3,
        real_guidance_scale=1.0, distilled_guidance_scale=DISTILLED_CFG, guidance_rescale=0.0,
        num_inference_steps=args.steps, generator=torch.Generator("cpu").manual_seed(SEED),
        negative_prompt_embeds=inputs["prompt_embeds"], negative_prompt_embeds_mask=inputs["prompt_embeds_mask"],
        negative_prompt_poolers=inputs["prompt_poolers"], device=device, dtype=dtype, callback=timer.step, **inputs,
    )  # fmt: skip
    torch.save(latents.float().cpu(), args.result)
    attention = next((name for name in FRAMEPACK_ATTENTION_PACKAGES if sys.modules.get(name)), "sdpa")
    return {"side": "FramePack", "path": "low-VRAM" if low_vram else "resident", "attention": attention,
            **timer.report()}  # fmt: skip


def run_product(args: argparse.Namespace) -> dict:
    """This product's side: its memory plan at the limit, its assembly (compiled blocks, FP8), its sampler."""
    import dataclasses

    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import apply_limit, plan_memory
    from diffusers_helper.models.tiny_preset import ensure_tiny_models
    from diffusers_helper.pipeline.conditioning import Conditions, TextConditions
    from diffusers_helper.pipeline.sampling import Guidance, make_scheduler, sample_section
    from diffusers_helper.pipeline.schedule import framepack_schedule
    from diffusers_helper.pipeline.sections import HistoryLayout
    from diffusers_helper.settings import ModelSettings

    plan = plan_memory(args.device, limit_gb=args.limit)
    apply_limit(plan)
    backend = "eager" if args.path == "eager" else "compile"  # FP8 blocks run compiled
    settings = ModelSettings(preset="tiny", device=args.device, backend=backend, fp8=args.path == "fp8",
                             attention=args.attention)  # fmt: skip
    components = load_components("framepack", ensure_tiny_models(), plan.dtypes())  # encoders unused: inputs given
    transformer = HunyuanVideoFramepackTransformer3DModel.from_pretrained(
        args.work / "transformer" / args.preset, torch_dtype=plan.transformer_dtype
    )
    models = assemble(dataclasses.replace(components, transformer=transformer.eval()), plan, settings)
    inputs = load_inputs(args.work, plan.device, plan.transformer_dtype)
    text = TextConditions(inputs["prompt_embeds"], inputs["prompt_embeds_mask"].to(plan.transformer_dtype),
                          inputs["prompt_poolers"])  # fmt: skip
    conditions = Conditions(text, None, inputs["image_embeddings"], inputs["clean_latents"][:, :, :1].float())
    indices = {name: value[0] for name, value in inputs.items() if name.endswith("indices")}  # one row: batch 1
    layout = HistoryLayout(indices["latent_indices"], inputs["clean_latents"], indices["clean_latent_indices"],
                           inputs["clean_latents_2x"], indices["clean_latent_2x_indices"], inputs["clean_latents_4x"],
                           indices["clean_latent_4x_indices"])  # fmt: skip
    h, w = args.height // 8, args.width // 8
    noise = torch.randn((1, 16, WINDOW, h, w), generator=torch.Generator("cpu").manual_seed(SEED)).to(plan.device)
    schedule = framepack_schedule(args.steps, WINDOW, h, w)
    timer = StepTimer()
    sampler = sample_section(models.components.transformer, make_scheduler(), noise, conditions, layout,
                             Guidance(DISTILLED_CFG, 1.0, 0.0), schedule)  # fmt: skip
    while True:
        try:
            next(sampler)
            timer.step()
        except StopIteration as done:
            latents = done.value
            break
    torch.save(latents.float().cpu(), args.result)
    backends = models.backends()
    return {"side": "product", "path": args.path, "transformer": backends["transformer"],
            "attention": backends.get("attention"), **timer.report()}  # fmt: skip


def prepare(args: argparse.Namespace) -> None:
    """The transformer's weights and the inputs, written once to `--work` for both sides."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    from diffusers_helper.models.components import TRANSFORMER_REPOS
    from diffusers_helper.models.full_size_preset import FULL_SIZE, random_weights
    from diffusers_helper.models.full_size_preset import SEED as WEIGHTS_SEED
    from diffusers_helper.models.tiny_preset import ensure_tiny_models

    target = args.work / "transformer" / args.preset
    if not (target / "config.json").exists():
        if args.preset == "tiny":
            source = ensure_tiny_models() / TRANSFORMER_REPOS["framepack"]
            model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(source)
        else:
            model = random_weights(FULL_SIZE["transformer"], torch.bfloat16, lambda t: t.to("cpu"), WEIGHTS_SEED)
        model.save_pretrained(target, max_shard_size="100GB")
    config = json.loads((target / "config.json").read_text())
    torch.save(section_inputs(args.height, args.width, config, torch.float32), args.work / "inputs.pt")


def child(args: argparse.Namespace, side: str, path: str, limit: float | None) -> dict:
    attention = "" if side == "framepack" or args.attention == "sdpa" else f"-{args.attention}"
    tag = f"{side}-{path}{attention}-{'resident' if limit is None else f'{limit:g}gb'}"
    command = [sys.executable, __file__, "--role", side, "--path", path, "--framepack", str(args.framepack),
               "--preset", args.preset, "--attention", args.attention,
               "--framepack-attention", args.framepack_attention,
               "--device", args.device, "--steps", str(args.steps), "--height", str(args.height), "--width",
               str(args.width), "--work", str(args.work), "--result", str(args.work / f"{tag}.pt")]  # fmt: skip
    if limit is not None:
        command += ["--limit", str(limit)]
    environment = dict(os.environ)
    inherited = [
        entry for entry in environment.get("PYTHONPATH", "").split(os.pathsep) if entry and Path(entry) != REPO
    ]
    own = [] if side == "framepack" else [str(REPO)]  # its diffusers_helper, or ours
    environment["PYTHONPATH"] = os.pathsep.join(own + inherited)
    run = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=args.work)
    if run.returncode != 0:
        raise SystemExit(f"{tag} failed:\n{run.stderr[-3000:]}")
    row = {"tag": tag, "limit": limit, **json.loads(run.stdout.strip().splitlines()[-1])}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framepack", type=Path, required=True, help="a checkout of lllyasviel/FramePack")
    parser.add_argument("--preset", choices=("full-random", "tiny"), default="full-random")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--limits", nargs="+", default=["none"], help="GB, or none for the whole GPU")
    parser.add_argument("--paths", nargs="+", choices=("eager", "compile", "fp8"), default=["eager", "compile", "fp8"])
    parser.add_argument("--attention", default="sdpa", help="the product's attention kernel (see --attention)")
    parser.add_argument(
        "--framepack-attention",
        choices=("sdpa", "installed"),
        default="sdpa",
        help="FramePack's attention: PyTorch's SDPA, or the first kernel package it finds installed",
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--height", type=int, default=544)
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--work", type=Path, default=Path("/tmp/vs_framepack"))
    parser.add_argument("--role", choices=("framepack", "product"), help=argparse.SUPPRESS)
    parser.add_argument("--path", default="eager", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role != "framepack":  # FramePack's side imports its own diffusers_helper
        sys.path.insert(0, str(REPO))
    if args.role is not None:
        row = run_framepack(args) if args.role == "framepack" else run_product(args)
        print(json.dumps(row), flush=True)
        return
    if not (args.framepack / "diffusers_helper" / "models" / "hunyuan_video_packed.py").is_file():
        raise SystemExit(f"{args.framepack} is not a checkout of lllyasviel/FramePack")
    args.work, args.framepack = args.work.resolve(), args.framepack.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args)
    limits = [None if limit == "none" else float(limit) for limit in args.limits]
    rows = []
    for limit in limits:
        rows.append(child(args, "framepack", "framepack", limit))
        rows += [child(args, "product", path, limit) for path in args.paths]
    from diffusers_helper.acceleration.measure import relative_error

    reference = torch.load(args.work / f"{rows[0]['tag']}.pt")
    print("\n| run | limit | s/step (median) | first step s | vs FramePack at the limit | latents' relative error |")
    print("|---|---|---|---|---|---|")
    baseline = None
    for row in rows:
        if row["side"] == "FramePack":
            baseline = row["s_per_step"]
        error = relative_error(torch.load(args.work / f"{row['tag']}.pt"), reference)
        limit = "none" if row["limit"] is None else f"{row['limit']:g} GB"
        name = f"{row['side']} {row['path']} ({row['attention']})"
        print(f"| {name} | {limit} | {row['s_per_step']} | {row['first_step_s']} | "
              f"{baseline / row['s_per_step']:.2f}x | {error:.2e} |")  # fmt: skip


if __name__ == "__main__":
    main()
