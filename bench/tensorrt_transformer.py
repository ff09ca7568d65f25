"""The transformer as a TensorRT engine on a CUDA GPU: how its shapes are handled, and the full-size figures.

    python bench/tensorrt_transformer.py probe       # full-width blocks at the 544x704 token count: static vs
                                                     # text as it is vs padded with a key mask, refittable,
                                                     # weight streaming (beside PyTorch's block streaming),
                                                     # masked against unmasked attention
    python bench/tensorrt_transformer.py refit       # the same blocks: build, then a LoRA on and off (two refits)
    python bench/tensorrt_transformer.py save        # few blocks: save and load time in four file formats,
                                                     # the device and host memory the engine takes
    python bench/tensorrt_transformer.py full        # full size: `engines.py build` (time, peak GPU memory),
                                                     # then a fresh process that loads it and serves two prompts;
                                                     # `--lora`: then a job with a LoRA (a full-size refit)
    python bench/tensorrt_transformer.py serve --out DIR  # the serving half alone; with an empty engine cache
                                                     # (FRAMEPACK_TENSORRT_CACHE_DIR) the first job builds the engine
                                                     # just in time, which skips the fresh-process load
    python bench/tensorrt_transformer.py load --engine FILE  # a cached engine file loaded under cProfile: where
                                                     # the seconds go (unpickling, decoding, TensorRT deserializing),
                                                     # and one engine set up with and without a TensorRT-RTX
                                                     # runtime cache (its kernels compiled or found)
Prints JSON lines; `--out DIR` also writes them to DIR/tensorrt_transformer.jsonl.
"""

import argparse
import copy
import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from diffusers_helper.acceleration.measure import DeviceMemoryPeak, median_seconds, relative_error  # noqa: E402

GIB = 1024**3
PROMPTS = (
    "a cat walks",
    (
        "The girl dances gracefully, with clear movements, full of charm, in a sunlit room with tall windows, while "
        "the camera slowly circles around her and the curtains move in the breeze."
    ),
)


def device_used() -> int:
    """Memory in use on the whole device: TensorRT's own allocations count here, not in torch's allocator."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free


# -- probe: few full-width blocks ----------------------------------------------------------------------------------


def few_blocks(frames: int = 12) -> tuple:
    """1 dual + 2 single full-width blocks, and the stack's inputs (12 frames: the 544x704 latent token count)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = HunyuanVideoFramepackTransformer3DModel(num_layers=1, num_single_layers=2, has_image_proj=True,
                                                        has_clean_x_embedder=True)  # fmt: skip
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    height, width, text_tokens = 68, 88, 793  # 544x704: 12 x 34 x 44 = 17,952 latent tokens
    generator = torch.Generator("cuda").manual_seed(1)
    tokens = frames * (height // 2) * (width // 2)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)

    cos, sin = model.rope(frame_indices=torch.arange(frames), height=height, width=width, device="cuda")
    return model, randn(1, tokens, 3072), randn(1, text_tokens, 3072), randn(1, 3072), cos, sin


PROBE_VARIANTS = {  # name: (text padded, extra transformer settings)
    "default": ("text padded to 1024 with a key mask, attention on the kept keys, refittable", True, {}),
    "streaming": ("padded, refittable, weight streaming", True, {"enable_weight_streaming": True}),
    "static": ("text as it is (one engine per prompt length), immutable weights", False, {"immutable_weights": True}),
}


def probe(chosen: list[str]) -> list[dict]:
    from diffusers_helper.acceleration import tensorrt_backend
    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.models.placement import HostParking
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer

    model, hidden, text, temb, cos, sin = few_blocks()
    tokens = hidden.shape[1]
    texts = (text, text[:, :740].clone())
    settings = tensorrt_backend.COMPONENT_SETTINGS["transformer"]
    original = dict(settings)
    rows = [attention_probe(tokens + 1024)]
    print(json.dumps(rows[-1]), flush=True)
    for name, padded, extra in (PROBE_VARIANTS[variant] for variant in chosen):
        settings.clear()
        settings.update({**original, **extra})
        model.to("cuda")
        gc.collect()
        torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as directory:
            runtime = TensorRTRuntime(EngineCache(Path(directory)))
            wrapper = TensorRTTransformer(model, runtime, HostParking("cuda"))
            stack = wrapper.stack

            def through_engine(t):
                if padded:
                    return wrapper(hidden, t, temb, None, (cos, sin))[0]
                return runtime.run("transformer", stack, (hidden, t, temb, cos, sin))[0]

            with torch.no_grad():
                references = [stack(hidden, t, temb, cos, sin)[0] for t in texts]
                eager = median_seconds(lambda: stack(hidden, text, temb, cos, sin))
                before = device_used()
                outputs = [through_engine(t) for t in texts]
                status = runtime.status["transformer"]
                row = {"probe": name, "blocks": "1 dual + 2 single, width 3072", "latent_tokens": tokens,
                       "text_tokens": [t.shape[1] for t in texts], "engine": status.engine, "reason": status.reason,
                       "compiles": status.compiles, "compile_s": [round(s, 1) for s in status.compile_seconds],
                       "relative_error": [round(relative_error(o, r), 5) for o, r in zip(outputs, references, strict=True)],
                       "eager_ms": round(eager * 1000, 2), "device_gb_after_minus_before": round((device_used() - before) / GIB, 2),
                       "weights_gb": round(sum(p.numel() * 2 for p in stack.parameters()) / GIB, 2),
                       "pytorch_weights_on_cpu": status.pytorch_weights_on_cpu}  # fmt: skip
                if status.engine == "tensorrt":
                    row["engine_ms"] = round(median_seconds(lambda: through_engine(text)) * 1000, 2)  # noqa: B023
                    row["speedup"] = round(row["eager_ms"] / row["engine_ms"], 3)
                    if extra.get("enable_weight_streaming"):
                        engine = runtime.engines_of(stack)[0]
                        row["weight_streaming"] = _weight_streaming(engine, lambda: through_engine(text))  # noqa: B023
            rows.append(row)
            print(json.dumps(row), flush=True)
            if extra.get("enable_weight_streaming"):
                with torch.no_grad():
                    rows.append(_pytorch_block_streaming(model, hidden, text, temb, cos, sin))
                print(json.dumps(rows[-1]), flush=True)
    settings.clear()
    settings.update(original)
    return rows


def _weight_streaming(engine, call) -> dict:
    import torch_tensorrt

    results = {}
    with torch_tensorrt.runtime.weight_streaming(engine) as streaming:
        total = streaming.total_device_budget
        results["streamable_gb"] = round(total / GIB, 3)
        for fraction in (1.0, 0.5, 0.25):
            streaming.device_budget = int(total * fraction)
            results[f"ms_at_{int(fraction * 100)}%"] = round(median_seconds(call) * 1000, 2)
    return results


def _pytorch_block_streaming(model, hidden, text, temb, cos, sin) -> dict:
    """The same blocks as the product streams them when they do not fit (models/placement.py): the first block
    resident, the others streamed from pinned memory, each prefetched while the one before runs; the share of the
    block weights that stays on the GPU, to set beside the engine's budgets."""
    from diffusers.hooks import HookRegistry

    from diffusers_helper.models.placement import GROUP_OFFLOADING_HOOK, MemoryPlan, Placement, stream_transformer
    from diffusers_helper.models.transformer_blocks import transformer_blocks

    def size(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    blocks = transformer_blocks(model)
    resident = size(model) - sum(size(block) for block in blocks[1:])  # all but the blocks after the first
    stream_transformer(model, MemoryPlan(torch.device("cuda"), torch.bfloat16, torch.float16, True, resident / GIB, 0.0),
                        Placement())  # fmt: skip

    def through_blocks():
        h, e = hidden, text
        for block in blocks:  # called as modules: their streaming hooks run
            h, e = block(h, e, temb, None, (cos, sin))
        return h

    try:
        return {"probe": "PyTorch block streaming (the product's, without TensorRT)", "latent_tokens": hidden.shape[1],
                "resident_share": round(size(blocks[0]) / sum(size(block) for block in blocks), 3),
                "ms": round(median_seconds(through_blocks) * 1000, 2)}  # fmt: skip
    finally:
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(GROUP_OFFLOADING_HOOK, recurse=False)


def attention_probe(sequence: int) -> dict:
    """Text padded to a fixed length needs a key mask; SDPA may then leave its fastest kernels, which attention on
    the kept keys (what the engines' attention runs) avoids. The stack pads the latents before their first token and
    the text after its last, so its kept keys are one stretch (a slice), and declares them (no device sync per call);
    timed against reading them off the mask, and against two stretches (latent padding between latents and text),
    which are joined before the kernel."""
    from diffusers_helper.acceleration.kept_keys_attention import attention_on_kept_keys, kept_keys_declared

    q, k, v = (torch.randn(1, 24, sequence, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    latent_padding, text_padding = 182, 231  # 544x704's 17,226 latent tokens padded to 17,408; a 793-token prompt
    mask = torch.zeros(1, 1, 1, sequence, device="cuda", dtype=torch.bfloat16)
    mask[..., :latent_padding] = float("-inf")
    mask[..., -text_padding:] = float("-inf")
    between = torch.zeros_like(mask)
    between[..., -1024 - latent_padding : -1024] = float("-inf")
    between[..., -text_padding:] = float("-inf")
    attention = torch.nn.functional.scaled_dot_product_attention

    def declared():
        with kept_keys_declared(sequence, [(latent_padding, sequence - text_padding)]):
            return attention_on_kept_keys(q, k, v, mask)

    times = {
        "unmasked_ms": lambda: attention(q, k, v),
        "masked_ms": lambda: attention(q, k, v, attn_mask=mask),
        "kept_keys_read_ms": lambda: attention_on_kept_keys(q, k, v, mask),
        "kept_keys_declared_ms": declared,
        "kept_keys_two_stretches_ms": lambda: attention_on_kept_keys(q, k, v, between),
    }
    row = {"probe": "attention of one block, 24 heads x 128", "tokens": sequence, "latent_padding": latent_padding,
           "text_padding": text_padding}  # fmt: skip
    row.update({name: round(median_seconds(call, runs=10) * 1000, 2) for name, call in times.items()})
    return row


def block_lora(model: torch.nn.Module, path: Path, rank: int = 32) -> Path:
    """A PEFT LoRA file on every linear layer of the blocks: the refit a LoRA switch costs."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(2)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(
            ("transformer_blocks.", "single_transformer_blocks.")
        ):
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) * 0.02
            )
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.02
            )
    save_file(tensors, path)
    return path


def refit() -> list[dict]:
    """Few full-width blocks: build the engine, switch a LoRA on (a refit), then off again (a refit); each call
    checked against PyTorch by the runtime and here."""
    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.models.lora import FusedLoras, read_lora
    from diffusers_helper.models.placement import HostParking
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer

    model, hidden, text, temb, cos, sin = few_blocks()
    rows = []
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        lora = read_lora(block_lora(model, Path(directory) / "lora.safetensors"))
        loras = FusedLoras(model)
        runtime = TensorRTRuntime(EngineCache(Path(directory) / "engines"))
        wrapper = TensorRTTransformer(model, runtime, HostParking("cuda"))
        references = {"base": wrapper.stack(hidden, text, temb, cos, sin)[0]}
        loras.apply([(lora, 1.0)])
        references["lora"] = wrapper.stack(hidden, text, temb, cos, sin)[0]
        loras.remove()
        status = runtime.status["transformer"]
        for step, mix in (("build", []), ("LoRA on", [(lora, 1.0)]), ("LoRA off", [])):
            loras.apply(mix)
            started = time.perf_counter()
            output = wrapper(hidden, text, temb, None, (cos, sin))[0]
            torch.cuda.synchronize()
            expected = references["lora" if mix else "base"]
            rows.append({"refit": step, "blocks": "1 dual + 2 single, width 3072", "latent_tokens": hidden.shape[1],
                         "seconds": round(time.perf_counter() - started, 2), "compiles": status.compiles,
                         "refits": status.refits, "engine": status.engine, "reason": status.reason,
                         "relative_error": round(relative_error(output, expected), 5),
                         "lora_moves_output": round(relative_error(references["lora"], references["base"]), 4),
                         "compile_s": [round(s, 1) for s in status.compile_seconds],
                         "refit_s": [round(s, 2) for s in status.refit_seconds]})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def save() -> list[dict]:
    """Few blocks: how long saving the engine takes in the product's format (the compiled module pickled straight to
    the file; the runtime's own save after the build writes the builder's bytes, a later save serializes the live
    engines again) and in the others (Torch-TensorRT's ExportedProgram, which retraces; torch.save; TorchScript), loading
    each back and its output against the engine in memory; the device memory the engine takes (activation memory
    allocated per call), and the host memory its modules still keep as serialized copies of their engines once the
    runtime has built and saved it (it drops them)."""
    import torch_tensorrt

    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.models.placement import HostParking
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime, TensorRTTransformer

    model, hidden, text, temb, cos, sin = few_blocks(frames=3)
    formats = {
        "pickled module, streamed to the file (product)": (lambda engine, args, path: runtime.backend.save(engine, args, path),
                                                           lambda path: runtime.backend.load(path)),
        "exported_program (Torch-TensorRT's, retraced)": (
            lambda engine, args, path: torch_tensorrt.save(engine, str(path), output_format="exported_program",
                                                           arg_inputs=list(args)),
            lambda path: torch_tensorrt.load(str(path)).module()),
        "torch.save": (lambda engine, args, path: torch.save(engine, path, pickle_protocol=4),
                       lambda path: torch.load(path, weights_only=False)),
        "torchscript": (lambda engine, args, path: torch_tensorrt.save(engine, str(path), output_format="torchscript",
                                                                       arg_inputs=list(args)),
                        lambda path: torch.jit.load(str(path))),
    }  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as directory, torch.no_grad():
        runtime = TensorRTRuntime(EngineCache(Path(directory) / "engines"))
        wrapper = TensorRTTransformer(model, runtime, HostParking("cuda"))
        captured = {}
        original_run = runtime.run

        def capturing_run(component, module, args, in_pytorch=None, part=None):
            captured["args"] = args
            return original_run(component, module, args, in_pytorch, part)

        runtime.run = capturing_run
        before = device_used()
        wrapper(hidden, text, temb, None, (cos, sin))
        status = runtime.status["transformer"]
        engine = runtime.engines_of(wrapper.stretches[0])[0]  # 3 blocks: one stretch
        args = captured["args"]
        expected = engine(*args)[0]
        held = sum(len(getattr(m, "serialized_engine", None) or b"") for m in engine.modules())
        for index, (name, (save_to, load_from)) in enumerate(formats.items()):
            path = Path(directory) / f"engine{index}"
            row = {"format": name, "blocks": "1 dual + 2 single, width 3072", "latent_tokens": hidden.shape[1],
                   "build_s": round(status.compile_seconds[0], 1), "host_gb_serialized_copies": round(held / GIB, 3),
                   "runtime_save_s": runtime.cache.describe()[0]["save_seconds"],  # the builder's bytes, written
                   "device_gb_engine": round((device_used() - before) / GIB, 2)}  # fmt: skip
            try:
                started = time.perf_counter()
                save_to(engine, args, path)
                row["save_s"] = round(time.perf_counter() - started, 1)
                row["file_gb"] = round(path.stat().st_size / GIB, 3)
                started = time.perf_counter()
                output = load_from(path)(*args)[0]
                torch.cuda.synchronize()
                row["load_and_first_call_s"] = round(time.perf_counter() - started, 1)
                row["relative_error_to_engine"] = round(relative_error(output, expected), 6)
            except Exception as error:  # a format this Torch-TensorRT cannot save or load: recorded, the next is tried
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
            path.unlink(missing_ok=True)
    return rows


# -- full size -----------------------------------------------------------------------------------------------------


def full(out: Path, lora: bool) -> list[dict]:
    """Build through the product's command (its output live, peak device memory sampled from here), then serve from
    a fresh process, which appends its own row."""
    from diffusers_helper.acceleration.engine_cache import EngineCache

    cache = out / "engines"
    environment = {**os.environ, "FRAMEPACK_TENSORRT_CACHE_DIR": str(cache)}
    torch.cuda.init()
    baseline = device_used()
    command = [sys.executable, str(REPO / "engines.py"), "build", "--preset", "full-random", "--buckets", "544x704",
               "--windows", "9"]  # fmt: skip
    started = time.perf_counter()
    with DeviceMemoryPeak() as sampler:
        result = subprocess.run(command, cwd=REPO, env=environment, check=False)
    build = {"full_size": "engines.py build (full-random, 544x704, window 9, transformer)", "exit": result.returncode,
             "seconds": round(time.perf_counter() - started, 1), "peak_device_gb": round((sampler.peak_bytes - baseline) / GIB, 2),
             "engine_files_gb": round(sum(p.stat().st_size for p in cache.rglob("*.engine")) / GIB, 2),
             "entries": [{name: record.get(name) for name in ("component", "inputs", "build_seconds", "save_seconds")}
                         for record in EngineCache(cache).describe()]}  # fmt: skip
    print(json.dumps(build), flush=True)
    serve_command = [sys.executable, __file__, "serve", "--out", str(out), *(["--lora"] if lora else [])]
    subprocess.run(serve_command, cwd=REPO, env=environment, check=False)
    return [build]


def serve(lora: bool) -> dict:
    """A fresh process: load the full-size models with the transformer engine from the cache, time the block stack in
    PyTorch (a copy taken before the engine holds the weights) and as the engine, on a short and a long prompt in two
    buckets that share one engine; then the device memory in use with the engine serving and PyTorch's copy of the
    blocks on the CPU."""
    from diffusers_helper.acceleration.kept_keys_attention import kept_keys
    from diffusers_helper.frontend.startup import load_engine, plan_for, quiet_libraries
    from diffusers_helper.settings import GenerationSettings, ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime

    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers_helper").setLevel(logging.INFO)  # loads, refits and checks, as they happen
    models = ModelSettings(preset="full-random", device="cuda", tensorrt=TensorRTOptions(transformer=True))
    plan = plan_for(models)
    runtime = TensorRTRuntime()
    started = time.perf_counter()
    engine = load_engine(models, plan, runtime, keep_video=False)
    report = {"serve": "fresh process, full-random, engine from the cache", "load_models_s": round(time.perf_counter() - started, 1),
              "device_gb_models_loaded": round(device_used() / GIB, 2), "prompts": []}  # fmt: skip
    original_run = runtime.run
    seen: dict[tuple, dict] = {}
    eager: dict[str, torch.nn.Module] = {}

    def measured_run(component, module, args, in_pytorch=None):
        kept = kept_keys(args[5]) if component == "transformer" else None  # [(latent padding, + latents + text)]
        if kept is None or tuple(kept) in seen:
            return original_run(component, module, args, in_pytorch)
        ((start, stop),) = kept
        latents, text_tokens = args[0].shape[1] - start, stop - args[0].shape[1]
        record = seen[tuple(kept)] = {"text_tokens": text_tokens, "text_padded_to": args[1].shape[1],
                                      "latent_tokens": latents, "latents_padded_to": args[0].shape[1]}  # fmt: skip
        with torch.no_grad():
            # A GPU copy of the stack for the eager side, taken before the engine holds the weights: moving the
            # runtime's own copy would read as changed weights (a refit).
            stack = eager.setdefault("stack", hookless_copy(module))
            # eager as it runs without TensorRT: the latents and the prompt as they are, no padding, no mask
            unpadded = (args[0][:, start:], args[1][:, :text_tokens], args[2], args[3][start:], args[4][start:])
            reference = stack(*unpadded)[0]
            record["eager_stack_s"] = round(median_seconds(lambda: stack(*unpadded), runs=3, warmup=1), 3)
            output = original_run(component, module, args, in_pytorch)
            record["relative_error"] = round(relative_error(output[0][:, -latents:], reference), 5)
            record["engine_stack_s"] = round(median_seconds(lambda: original_run(component, module, args, in_pytorch),
                                                            runs=3, warmup=1), 3)  # fmt: skip
            record["speedup"] = round(record["eager_stack_s"] / record["engine_stack_s"], 3)
        print(json.dumps(record), flush=True)
        return output

    runtime.run = measured_run
    # Two prompts in two buckets whose latent token counts (17,226 and 17,406) pad to the same 17,408
    for prompt, size in zip(PROMPTS, ((704, 544), (672, 576)), strict=True):
        with DeviceMemoryPeak() as peak:  # the first job's peak includes a just-in-time build
            settings = GenerationSettings(prompt=prompt, seconds=1.2, steps=3, step_cache="off")
            step_times = run_job(engine, settings, size)
        report["prompts"].append({"prompt_words": len(prompt.split()), "image": size, "step_s": step_times,
                                  "device_gb_peak": round(peak.gigabytes, 2)})  # fmt: skip
    eager.clear()
    gc.collect()
    torch.cuda.empty_cache()
    status = runtime.status["transformer"]
    report.update(stack_calls=list(seen.values()), compiles=status.compiles, loads=status.loads, refits=status.refits,
                  build_s=[round(s, 1) for s in status.compile_seconds],
                  engine_files=[{"key": entry["key"], "gb": round(entry["bytes"] / GIB, 2)}
                                for entry in runtime.cache.describe()],
                  device_gb_serving=round(device_used() / GIB, 2),
                  engines=status.engines, load_s=[round(s, 1) for s in status.load_seconds], status=status.describe(),
                  pytorch_weights_on=str(next(engine.models.components.transformer.transformer_blocks[1].parameters()).device),
                  gpu=torch.cuda.get_device_name(), **runtime.backend.versions())  # fmt: skip
    print(json.dumps(report), flush=True)
    if lora:
        report["lora"] = _lora_switch(engine, runtime)
    return report


def run_job(engine, settings, size: tuple[int, int] = (704, 544)) -> list[float]:
    """One job on an image of this size (width, height; the default falls in the 544x704 bucket); the seconds each
    step took (the first includes encoding). A failed job raises: the engine reports failures as events, which a
    benchmark must not pass over."""
    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.pipeline.events import Failed, StepProgress

    step_times, last = [], time.perf_counter()
    paths = JobPaths.for_video(Path(tempfile.mkdtemp()) / "x.mp4")
    for event in engine.generate(example_image(*size), settings, paths):
        if isinstance(event, Failed):
            raise RuntimeError(f"the job failed: {event.message}")
        if isinstance(event, StepProgress):
            torch.cuda.synchronize()
            step_times.append(round(time.perf_counter() - last, 3))
            last = time.perf_counter()
    return step_times


def hookless_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the block stack without the blocks' hooks (they lead to the runtime, whose locks do not copy); the
    stack calls each block's class forward, so the copy runs as plain PyTorch."""
    hooks = {id(part._diffusers_hook): None for part in module.modules() if hasattr(part, "_diffusers_hook")}
    return copy.deepcopy(module, hooks)


def _lora_switch(engine, runtime) -> dict:
    """A LoRA on every block layer for one more job: the engine loaded from disk is refitted (and checked by the
    runtime), never built again."""
    from diffusers_helper.settings import GenerationSettings, LoraChoice

    path = block_lora(engine.models.components.transformer, Path(tempfile.mkdtemp()) / "lora.safetensors")
    started = time.perf_counter()
    run_job(engine, GenerationSettings(prompt=PROMPTS[0], seconds=1.2, steps=1, step_cache="off",
                                       loras=(LoraChoice(path, 0.5),)))  # fmt: skip
    status = runtime.status["transformer"]
    return {"job_s": round(time.perf_counter() - started, 1), "refits": status.refits,
            "refit_s": [round(s, 1) for s in status.refit_seconds], "compiles": status.compiles,
            "status": status.describe(), "device_gb": round(device_used() / GIB, 2)}  # fmt: skip


def load_profile(path: Path) -> dict:
    """One cached engine file loaded as the runtime loads it, under cProfile, then read once more as plain bytes:
    which calls the load spends its seconds in, against what reading the file alone costs; and for one of its
    TensorRT engines, what its unpickling costs against building it from its raw bytes."""
    import cProfile
    import pstats

    from diffusers_helper.acceleration.tensorrt_backend import TorchTensorRTBackend

    backend = TorchTensorRTBackend()
    backend.check_available()
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    engine = backend.load(path)
    profile.disable()
    loaded = time.perf_counter() - started
    device_gb = device_used() / GIB
    one_engine = _engine_decoding(engine)
    del engine
    started = time.perf_counter()
    with open(path, "rb") as file:
        while file.read(1 << 26):
            pass
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive, own seconds, cumulative, callers)}
    costliest = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:12]
    row = {"load": str(path), "file_gb": round(path.stat().st_size / GIB, 2), "load_s": round(loaded, 1),
            "read_again_s": round(time.perf_counter() - started, 1), "device_gb_loaded": round(device_gb, 2),
            "one_engine": one_engine,
            "own_seconds": [{"call": f"{Path(where).name}:{line} {name}", "calls": calls, "own_s": round(own, 2),
                             "cumulative_s": round(cumulative, 2)}
                            for (where, line, name), (calls, _, own, cumulative, _) in costliest]}  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def _engine_decoding(compiled: torch.nn.Module) -> dict:
    """The largest TensorRT engine in a loaded module: Torch-TensorRT pickles an engine with its bytes in base64,
    decoded in C++ when unpickled; timed against decoding them in Python and building the engine from raw bytes."""
    import base64
    import pickle

    engines = [m.engine for m in compiled.modules() if isinstance(getattr(m, "engine", None), torch.ScriptObject)]
    index = torch.ops.tensorrt.ENGINE_IDX()
    states = [engine.__getstate__()[0] for engine in engines]  # (the state, the class name)
    state = max(states, key=lambda state: len(state[index]))
    pickled = pickle.dumps(engines[states.index(state)], protocol=pickle.HIGHEST_PROTOCOL)
    started = time.perf_counter()
    pickle.loads(pickled)
    unpickled = time.perf_counter() - started
    started = time.perf_counter()
    raw = base64.b64decode(state[index])
    decoded = time.perf_counter() - started
    started = time.perf_counter()
    torch.classes.tensorrt.Engine([*state[:index], raw, *state[index + 1 :]])
    torch.cuda.synchronize()
    return {"engines": len(engines), "largest_mb": round(len(raw) / 2**20, 1), "unpickle_s": round(unpickled, 3),
            "python_base64_decode_s": round(decoded, 3), "from_raw_bytes_s": round(time.perf_counter() - started, 3),
            "runtime_cache": _runtime_cache(raw)}  # fmt: skip


def _runtime_cache(raw: bytes) -> list[dict]:
    """TensorRT-RTX compiles an engine's kernels when the engine is set up; its runtime cache keeps them for the next
    process (Torch-TensorRT 2.11 offers no way to use one). One engine set up twice through TensorRT's own API:
    deserialized, given an execution context, run once; first with an empty runtime cache, then with what the first
    put in it."""
    import tensorrt as trt
    from torch_tensorrt import dtype

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    filled, rows = None, []
    for cache_state in ("empty", "filled by the first"):
        started = time.perf_counter()
        engine = runtime.deserialize_cuda_engine(raw)
        deserialized = time.perf_counter()
        config = engine.create_runtime_config()
        cache = config.create_runtime_cache()
        if filled is not None:
            cache.deserialize(filled)
        config.set_runtime_cache(cache)
        context = engine.create_execution_context(config)
        contexted = time.perf_counter()
        tensors = []
        for name in (engine.get_tensor_name(i) for i in range(engine.num_io_tensors)):
            shape = tuple(engine.get_tensor_shape(name))
            tensors.append(
                torch.zeros(shape, dtype=dtype._from(engine.get_tensor_dtype(name)).to(torch.dtype), device="cuda")
            )
            context.set_tensor_address(name, tensors[-1].data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        ran = time.perf_counter()
        filled = bytes(cache.serialize())
        rows.append({"runtime_cache": cache_state, "deserialize_s": round(deserialized - started, 3),
                     "context_s": round(contexted - deserialized, 3), "first_run_s": round(ran - contexted, 3),
                     "cache_mb_after": round(len(filled) / 2**20, 2)})  # fmt: skip
        del context, engine
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("probe", "refit", "save", "full", "serve", "load"))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "tensorrt_transformer")
    parser.add_argument("--engine", type=Path, help="load: the engine file (an .engine in the engine cache)")
    parser.add_argument("--lora", action="store_true", help="full/serve: also a job with a LoRA (a full-size refit)")
    parser.add_argument("--variants", nargs="+", choices=PROBE_VARIANTS, default=list(PROBE_VARIANTS),
                        help="probe: which ways of building the stack")  # fmt: skip
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.what == "serve":
        rows = [serve(args.lora)]
        print(json.dumps(rows[-1]), flush=True)
    else:
        rows = {
            "probe": lambda: probe(args.variants),
            "refit": refit,
            "save": save,
            "full": lambda: full(args.out, args.lora),
            "load": lambda: [load_profile(args.engine)],
        }[args.what]()
    with open(args.out / "tensorrt_transformer.jsonl", "a") as log:
        log.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
