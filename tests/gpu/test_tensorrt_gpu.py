"""TensorRT for real: engines build, match PyTorch, load in another process, and fall back where they fail."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.acceleration.measure import relative_error
from diffusers_helper.acceleration.tensorrt_wrappers import STRETCH_BLOCKS
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import HostParking, plan_memory
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION, ensure_tiny_models
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import MIN_TENSORRT_SPEEDUP, GenerationSettings, ModelSettings, TensorRTOptions
from diffusers_helper.tensorrt_runtime import TensorRTLatentDecoder, TensorRTRuntime, TensorRTTransformer

from .midsize import mid_size_transformer, stack_inputs

torch_tensorrt = pytest.importorskip("torch_tensorrt", reason="needs torch_tensorrt")
REPO = Path(__file__).resolve().parents[2]
STRETCHES = -(-6 // STRETCH_BLOCKS)  # the mid-size stack's 2 dual and 4 single blocks, one engine per stretch


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def shared_transformer():
    return mid_size_transformer()


@pytest.fixture
def transformer(shared_transformer):
    """Each test starts with the weights on the GPU (an engine that passed its check sends them to the CPU)."""
    return shared_transformer.to("cuda")


def test_mid_size_block_stack_matches_pytorch_and_attention_stays_non_causal(cache_dir, transformer):
    runtime = TensorRTRuntime(EngineCache(cache_dir))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    other_text = torch.randn_like(text)
    reference = stack.stack(hidden, text, temb, cos, sin)[0]  # PyTorch first: the engine takes over the weights
    reference_delta = (stack.stack(hidden, other_text, temb, cos, sin)[0] - reference).float().flatten()
    engine_out = stack(hidden, text, temb, None, (cos, sin))[0]
    status = runtime.status["transformer"]
    assert status.engine == "tensorrt", status.reason
    assert status.compiles == len(stack.stretches) > 1
    assert relative_error(engine_out, reference) < 0.05
    # Non-causal: the latent tokens come before the text in the joint attention, so under a causal mask no latent
    # token could see the prompt and a new prompt would leave them exactly unchanged. With random weights the
    # change is near bf16 rounding, so the engine's delta follows PyTorch's in direction and size, not digit
    # for digit.
    engine_delta = (stack(hidden, other_text, temb, None, (cos, sin))[0] - engine_out).float().flatten()
    similarity = torch.nn.functional.cosine_similarity(engine_delta, reference_delta, dim=0).item()
    size = (engine_delta.norm() / reference_delta.norm()).item()
    print(f"prompt change: cosine similarity {similarity:.3f}, size ratio {size:.3f}")
    assert reference_delta.abs().mean() > 1e-3
    assert similarity > 0.3
    assert 0.5 < size < 2.0


def _mid_size_process(cache_dir: Path) -> dict:
    """The mid-size stack run once in a process of its own, with this engine cache: what its runtime did."""
    result = subprocess.run([sys.executable, "-m", "tests.gpu.midsize", str(cache_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_engine_without_compiling(cache_dir, transformer):
    """The engine the first test built is loaded; run alone, a first process builds it."""
    if not any(cache_dir.glob("*.engine")):
        assert _mid_size_process(cache_dir)["compiles"] == STRETCHES
    report = _mid_size_process(cache_dir)
    print("second process:", report)
    assert report["compiles"] == 0 and report["loads"] == STRETCHES and report["engine"] == "tensorrt"
    assert report["engine_modules"] == ["TensorRTEngineModule"]  # set up on TensorRT's API, not Torch-TensorRT's
    if torch_tensorrt.ENABLED_FEATURES.tensorrt_rtx:  # the kernels its set-up compiled, kept for the next process
        assert len(list(cache_dir.glob("*.kernels"))) == STRETCHES
        again = _mid_size_process(cache_dir)
        print("third process, kernels cached:", again)
        assert again["checksum"] == report["checksum"]


def _block_lora(transformer, directory: Path):
    """A rank-16 PEFT LoRA on every linear layer of the blocks, read back as the app reads one."""
    from diffusers_helper.models.lora import read_lora
    from tests.support.lora_files import random_layers, write_peft

    layers = {name: (module.out_features, module.in_features) for name, module in transformer.named_modules()
              if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))}  # fmt: skip
    return read_lora(write_peft(directory / "lora.safetensors", random_layers(layers, rank=16, seed=3)))


LORA_SCALE = 0.02  # the random layers are large; this keeps the fused weights within a LoRA's usual reach


def test_an_engine_loaded_from_the_cache_is_refitted_for_a_lora_not_rebuilt(cache_dir, transformer, tmp_path):
    """The first test's engine file, loaded by a new runtime while a LoRA is fused in: the loaded engine gets the new
    weights by a refit (written into its TensorRT engines in place) and matches PyTorch with the LoRA."""
    from diffusers_helper.models.lora import FusedLoras

    loras = FusedLoras(transformer)
    runtime = TensorRTRuntime(EngineCache(cache_dir))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    try:
        with torch.no_grad():
            loras.apply([(_block_lora(transformer, tmp_path), LORA_SCALE)])
            expected = stack.stack(hidden, text, temb, cos, sin)[0]
            output = stack(hidden, text, temb, None, (cos, sin))[0]
    finally:
        loras.remove()
    status = runtime.status["transformer"]
    print(f"load {status.load_seconds} s, refit {status.refit_seconds} s")
    assert (status.engine, status.loads, status.refits, status.compiles) == ("tensorrt", STRETCHES, STRETCHES, 0), (
        status.reason
    )
    assert relative_error(output, expected) < 0.05


def test_a_deleted_cache_recompiles(cache_dir, transformer):
    shutil.rmtree(cache_dir)
    runtime = TensorRTRuntime(EngineCache(cache_dir))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    stack(*stack_inputs(transformer)[:3], None, stack_inputs(transformer)[3:])
    assert runtime.status["transformer"].compiles == STRETCHES and runtime.status["transformer"].loads == 0


def _tiny_vae_decoder(runtime):
    vae = load_components("framepack", ensure_tiny_models(), {"vae": torch.float16}).vae.to("cuda")
    return TensorRTLatentDecoder(vae.decoder, runtime), vae.decoder


LATENTS = (1, 16, 3, 16, 16)


def test_vae_decoder_engine_matches_pytorch(tmp_path):
    runtime = TensorRTRuntime(EngineCache(tmp_path))
    wrapper, decoder = _tiny_vae_decoder(runtime)
    latents = torch.randn(*LATENTS, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = decoder(latents)
        assert relative_error(wrapper(latents), expected) < 0.05
    assert runtime.status["vae_decoder"].engine == "tensorrt", runtime.status["vae_decoder"].reason


def test_engine_files_hold_the_engines_raw_and_load_back(tmp_path):
    """Torch-TensorRT pickles an engine's bytes in base64 (a third larger); the cache's files carry them raw, and a
    load sets them up on TensorRT's own API."""
    from diffusers_helper.acceleration.tensorrt_loader import TensorRTEngineModule

    runtime = TensorRTRuntime(EngineCache(tmp_path))
    wrapper, decoder = _tiny_vae_decoder(runtime)
    latents = torch.randn(*LATENTS, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = decoder(latents)  # PyTorch first: the engine that passes its check sends these weights to the CPU
        wrapper(latents)
        engine_file = next(tmp_path.glob("*.engine"))
        loaded = runtime.backend.load(engine_file)
        engines = [m.engine for m in loaded.modules() if isinstance(m, TensorRTEngineModule)]
        raw = sum(engine.serialize().nbytes for engine in engines)
        print(f"engine file {engine_file.stat().st_size} bytes for {len(engines)} engines of {raw} bytes")
        assert engines and engine_file.stat().st_size < raw * 1.1 + 2**20
        assert relative_error(loaded(latents), expected) < 0.05


def test_the_full_size_vae_decoder_serves_as_an_engine_or_falls_back_and_is_not_built_again(tmp_path):
    """On an H200 with TensorRT-RTX the full-size decoder's engine builds but cannot run (no kernels for compute
    capability 9.0: docs/benchmarks.md): PyTorch serves, the reason is named, and a later runtime does not build it
    again. Where the engine runs, it must match PyTorch."""
    from diffusers import AutoencoderKLHunyuanVideo

    from diffusers_helper.models.full_size_preset import random_weights

    decoder = random_weights(AutoencoderKLHunyuanVideo, torch.float16, lambda tensor: tensor.to("cuda"), seed=0).decoder
    latents = torch.randn(1, 16, 2, 16, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        expected = decoder(latents)  # first: an engine that serves takes PyTorch's weights to the CPU
        runtime = TensorRTRuntime(EngineCache(tmp_path))
        actual = TensorRTLatentDecoder(decoder, runtime)(latents)
        status = runtime.status["vae_decoder"]
        print("full-size vae_decoder:", status.reason)
        if status.engine == "tensorrt":
            assert relative_error(actual, expected) < 0.05
            return
        assert torch.equal(actual, expected) and status.reason.startswith("fell back")
        later = TensorRTRuntime(EngineCache(tmp_path))
        assert torch.equal(TensorRTLatentDecoder(decoder, later)(latents), expected)
    assert "rejected before (its build failed" in later.status["vae_decoder"].reason, later.status["vae_decoder"].reason


def test_a_build_cancelled_inside_tensorrt_stops_there_and_caches_nothing(tmp_path):
    """The cancel is asked for once the first engine's build has started: TensorRT's progress monitor sees it at its
    next step and stops that build (the question comes from inside TensorRT, not from the next engine's start)."""
    import inspect

    runtime = TensorRTRuntime(EngineCache(tmp_path))
    wrapper, decoder = _tiny_vae_decoder(runtime)
    status = runtime.status["vae_decoder"]
    asked_from = []

    def cancelled() -> bool:
        if status.build is None or status.build.engines_started < 1:
            return False
        asked_from.append({frame.function for frame in inspect.stack()})
        return True

    latents = torch.randn(*LATENTS, device="cuda", dtype=torch.float16)
    with torch.no_grad(), runtime.cancel_builds_when(cancelled):
        assert torch.equal(wrapper(latents), decoder(latents))
    assert "step_complete" in asked_from[0]
    assert status.engine == "pytorch" and "build cancelled" in status.reason and status.compiles == 0
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob(".build-*"))


def _damage_an_engine(engine_file: Path) -> None:
    """The file still unpickles, but the first TensorRT engine in it starts with zeros where its header was."""
    from diffusers_helper.acceleration.tensorrt_backend import _EngineFileUnpickler, pending_engines

    with open(engine_file, "rb") as file:
        raw = pending_engines(_EngineFileUnpickler(file).load())[0][2][torch.ops.tensorrt.ENGINE_IDX()]
    data = bytearray(engine_file.read_bytes())
    start = data.find(raw[:4096])
    assert start > 0
    data[start : start + 64] = bytes(64)
    engine_file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["zeroed file", "engine bytes"])
def test_an_engine_file_that_will_not_load_is_rebuilt(tmp_path, damage):
    latents = torch.randn(*LATENTS, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        _tiny_vae_decoder(TensorRTRuntime(EngineCache(tmp_path)))[0](latents)
        engine_file = next(tmp_path.glob("*.engine"))
        if damage == "zeroed file":
            engine_file.write_bytes(b"\0" * engine_file.stat().st_size)
        else:
            _damage_an_engine(engine_file)
        runtime = TensorRTRuntime(EngineCache(tmp_path))
        wrapper, decoder = _tiny_vae_decoder(runtime)
        expected = decoder(latents)
        assert relative_error(wrapper(latents), expected) < 0.05
    status = runtime.status["vae_decoder"]
    assert status.engine == "tensorrt" and status.compiles == 1 and status.loads == 0


def test_tiny_generation_with_every_flag_completes(tmp_path):
    plan = plan_memory("cuda")
    components = load_components("framepack", ensure_tiny_models(), plan.dtypes())
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"))
    everything = TensorRTOptions(vae=True, text_encoders=True, transformer=True)
    models = assemble(components, plan, ModelSettings(preset="tiny", tensorrt=everything), runtime)
    frames = []
    engine = FramePackEngine(models, write_video=lambda f, *rest: frames.append(f))
    settings = GenerationSettings(prompt="a cat walks", seconds=2.0, steps=6, resolution=TINY_RESOLUTION)
    events = list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "x.mp4")))
    assert isinstance(events[-1], Finished) and events[-1].frames == 73, events[-1]
    print("\n".join(runtime.report()))
    assert {name: status.engine for name, status in runtime.status.items()} == dict.fromkeys(
        ("vae_encoder", "vae_decoder", "text_encoder", "text_encoder_2", "transformer"), "tensorrt"
    )
    assert np.ptp(frames[-1].astype(np.int16), axis=0).mean() > 1


def test_two_prompt_lengths_share_one_engine_and_the_gpu_holds_one_copy_of_the_weights(tmp_path, transformer):
    """Full-width blocks: one build of each stretch serves a 750- and a 300-token prompt, and 4400 and 4200 latent tokens (both
    padded to 5120), each matching PyTorch; once the engine has passed its check, PyTorch's copy of the stack is on
    the CPU. (Device memory is printed, not asserted: an engine's context allocates its activation memory up front,
    several times the weights of a few blocks.)"""
    runtime = TensorRTRuntime(EngineCache(tmp_path))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    cases = [(hidden, text, cos, sin), (hidden, text[:, :300].clone(), cos, sin),
             (hidden[:, :4200].clone(), text[:, :300].clone(), cos[:4200].clone(), sin[:4200].clone())]  # fmt: skip
    with torch.no_grad():
        references = [stack.stack(h, t, temb, c, s)[0] for h, t, c, s in cases]
        weight_bytes = sum(p.numel() * p.element_size() for p in stack.stack.parameters())
        torch.cuda.synchronize()
        used_before = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]
        outputs = [stack(h, t, temb, None, (c, s))[0] for h, t, c, s in cases]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        used_after = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]
    status = runtime.status["transformer"]
    errors = [relative_error(o, r) for o, r in zip(outputs, references, strict=True)]
    print(f"errors {errors}, weights {weight_bytes / 2**30:.2f} GiB, device memory {used_before / 2**30:.2f} -> "
          f"{used_after / 2**30:.2f} GiB, compile {status.compile_seconds}")  # fmt: skip
    assert status.engine == "tensorrt" and (status.compiles, status.engines) == (STRETCHES, STRETCHES), status.reason
    assert max(errors) < 0.05
    assert status.pytorch_weights_on_cpu
    assert all(p.device.type == "cpu" for p in stack.stack.parameters())


def test_a_lora_switch_refits_the_full_width_engine_and_matches_pytorch(tmp_path, transformer):
    """A LoRA on every block layer, switched on and off: two refits, no second build, PyTorch's output each time
    (the references are computed here, before the engine exists)."""
    from diffusers_helper.models.lora import FusedLoras

    lora = _block_lora(transformer, tmp_path)
    loras = FusedLoras(transformer)
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"))
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"))
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    with torch.no_grad():
        base = stack.stack(hidden, text, temb, cos, sin)[0]
        loras.apply([(lora, LORA_SCALE)])
        with_lora = stack.stack(hidden, text, temb, cos, sin)[0]
        loras.remove()
        outputs = []
        for mix in ([], [(lora, LORA_SCALE)], []):
            loras.apply(mix)
            outputs.append(stack(hidden, text, temb, None, (cos, sin))[0])
    status = runtime.status["transformer"]
    print(f"build {status.compile_seconds} s, refits {status.refit_seconds} s")
    assert (status.engine, status.compiles, status.refits) == ("tensorrt", STRETCHES, 2 * STRETCHES), status.reason
    assert relative_error(with_lora, base) > 0.05  # the LoRA moves the output
    assert max(relative_error(o, r) for o, r in zip(outputs, (base, with_lora, base), strict=True)) < 0.05
    loras.remove()


@pytest.mark.parametrize("blocks", ["eager", "compile"])
def test_an_engine_is_timed_against_the_blocks_in_pytorch_and_serves_only_where_faster(tmp_path, transformer, blocks):
    """The engine is timed against the stack in PyTorch as it would otherwise run (the prompt unpadded; the blocks
    eager, or compiled by torch.compile as `--backend compile` runs them); the speed-up is remembered beside the cache,
    and the engine serves only at MIN_TENSORRT_SPEEDUP or more. Which way it goes depends on the GPU and the
    TensorRT build: the test holds the runtime to what it measured."""
    from diffusers_helper.acceleration.compiled_blocks import CompiledBlocks

    compiled = CompiledBlocks("compile") if blocks == "compile" else None
    cache = EngineCache(tmp_path)
    runtime = TensorRTRuntime(cache, only_if_faster=True)
    stack = TensorRTTransformer(transformer, runtime, HostParking("cuda"), compiled, stretch_blocks=6)  # one engine
    hidden, text, temb, cos, sin = stack_inputs(transformer)
    with torch.no_grad():
        expected = stack.stack(hidden, text, temb, cos, sin)[0]
        output = stack(hidden, text, temb, None, (cos, sin))[0]
    assert len(cache.describe()) == 1
    versus = "eager" if compiled is None else "torch.compile"
    [(_, measured)] = runtime.speeds.records.matching({"candidate": "tensorrt", "versus": versus})
    status = runtime.status["transformer"]
    print(f"engine {measured.candidate_seconds:.4f} s, PyTorch ({blocks}) {measured.baseline_seconds:.4f} s: "
          f"{measured.speedup:.3f}x; {status.describe()}")  # fmt: skip
    if compiled is not None:
        assert compiled.failure is None and compiled.describe() == "torch.compile"
    assert relative_error(output, expected) < 0.05
    faster = measured.speedup >= MIN_TENSORRT_SPEEDUP
    assert (status.engine, status.pytorch_weights_on_cpu) == (("tensorrt", True) if faster else ("pytorch", False))
