"""LoRAs on the tiny transformer (CPU): both file formats, scales, mixes, switching, exact removal, one-line errors
for bad files that change nothing, and jobs that record which LoRAs made them."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from safetensors.torch import save_file

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.components import TRANSFORMER_REPOS
from diffusers_helper.models.lora import FusedLoras, read_lora
from diffusers_helper.models.tiny_preset import TINY_RESOLUTION
from diffusers_helper.pipeline.events import APPLYING_LORAS, Failed, Finished, StageStarted
from diffusers_helper.pipeline.sections import InvertedAntiDrifting
from diffusers_helper.settings import GenerationSettings, InvalidSettings, LoraChoice
from tests.support.frame_sink import FrameSink
from tests.support.lora_files import TINY_LAYERS, delta, random_layers, write_kohya, write_peft
from tests.support.runtimes import TINY_STACK_ENGINES


@pytest.fixture
def transformer(tiny_root):
    """A tiny FramePack transformer of its own (the tests change its weights)."""
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_root / TRANSFORMER_REPOS["framepack"])
    return model.eval().requires_grad_(False)


def weights_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    current = dict(model.named_parameters())
    return current.keys() == weights.keys() and all(torch.equal(current[n], w) for n, w in weights.items())


def output_of(model: torch.nn.Module) -> torch.Tensor:
    """One denoising call on fixed inputs, every path (image projection, history embedders) included."""
    generator = torch.Generator().manual_seed(0)
    order, start = InvertedAntiDrifting(), torch.randn(1, 16, 1, 8, 8, generator=generator)
    layout = order.layout(order.initial_history(start), start, order.plan(1)[0], window=1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 1, 8, 8, generator=generator),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=generator),
        "encoder_attention_mask": torch.ones(1, 5),
        "pooled_projections": torch.randn(1, 32, generator=generator),
        "image_embeds": torch.randn(1, 16, 32, generator=generator),
        "guidance": torch.tensor([10000.0]),
        **layout.transformer_kwargs(torch.float32),
    }
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture
def lora_a(tmp_path):
    weights = random_layers(TINY_LAYERS, rank=4, seed=1)
    return weights, write_peft(tmp_path / "a.safetensors", weights)


@pytest.fixture
def lora_b(tmp_path):
    layers = {
        name: TINY_LAYERS[name] for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp")
    }
    weights = random_layers({**layers, "transformer_blocks.1.attn.to_v": (32, 32)}, rank=2, seed=2)
    return weights, write_kohya(tmp_path / "b.safetensors", weights, alpha=2.0)  # alpha == rank: scale 1


def test_a_lora_changes_the_output_and_its_scale_changes_it_again(transformer, lora_a):
    base = output_of(transformer)
    fused = FusedLoras(transformer)
    lora = read_lora(lora_a[1])
    fused.apply([(lora, 1.0)])
    full = output_of(transformer)
    fused.apply([(lora, 0.5)])
    half = output_of(transformer)
    assert not torch.allclose(base, full) and not torch.allclose(full, half) and not torch.allclose(base, half)


def test_removal_restores_the_weights_and_output_bit_for_bit_and_leaves_plain_linear_layers(transformer, lora_a):
    base_output, base_weights = output_of(transformer), weights_of(transformer)
    pointers = {name: parameter.data_ptr() for name, parameter in transformer.named_parameters()}
    fused = FusedLoras(transformer)
    changed = fused.apply([(read_lora(lora_a[1]), 1.5)])
    assert changed == {f"{name}.weight" for name in TINY_LAYERS}
    for model_state in ("fused", "removed"):
        assert not hasattr(transformer, "peft_config")
        assert not [name for name, _ in transformer.named_parameters() if "lora" in name]
        assert all(type(module).__module__.startswith(("torch", "diffusers")) for module in transformer.modules())
        # changed in place: pinned host memory and the streaming hooks that point at it stay valid
        assert {name: parameter.data_ptr() for name, parameter in transformer.named_parameters()} == pointers
        if model_state == "fused":
            assert fused.remove() == changed
    assert same_weights(transformer, base_weights) and torch.equal(output_of(transformer), base_output)
    assert fused.applied == () and fused.remove() == set()


def test_both_formats_fuse_the_same_update_with_alpha_and_scale(transformer, tmp_path):
    weights = random_layers(TINY_LAYERS, rank=4, seed=3)
    original = weights_of(transformer)
    fused = FusedLoras(transformer)
    # kohya: alpha 2 at rank 4 halves the update; the PEFT file carries the halved update itself
    fused.apply([(read_lora(write_kohya(tmp_path / "k.safetensors", weights, alpha=2.0)), 0.8)])
    kohya = weights_of(transformer)
    halved = {name: (down, up * 0.5) for name, (down, up) in weights.items()}
    fused.apply([(read_lora(write_peft(tmp_path / "p.safetensors", halved, prefix="diffusion_model.")), 0.8)])
    assert same_weights(transformer, kohya)
    for name in TINY_LAYERS:
        expected = original[f"{name}.weight"] + 0.8 * 0.5 * delta(weights, name)
        torch.testing.assert_close(kohya[f"{name}.weight"], expected)


def test_two_loras_mix_as_the_sum_of_their_scaled_updates(transformer, lora_a, lora_b):
    original = weights_of(transformer)
    fused = FusedLoras(transformer)
    a, b = read_lora(lora_a[1]), read_lora(lora_b[1])
    outputs = {}
    for mix in ((a,), (b,), (a, b)):
        fused.apply([(lora, 0.7 if lora is a else -1.2) for lora in mix])
        outputs[mix] = output_of(transformer)
    assert not torch.allclose(outputs[(a, b)], outputs[(a,)]) and not torch.allclose(outputs[(a, b)], outputs[(b,)])
    current = weights_of(transformer)
    for name, parameter in current.items():
        module = name.removesuffix(".weight")
        expected = original[name].clone()
        if module in lora_a[0]:
            expected += 0.7 * delta(lora_a[0], module)
        if module in lora_b[0]:
            expected += -1.2 * delta(lora_b[0], module)
        torch.testing.assert_close(parameter, expected, rtol=1e-5, atol=1e-6)


def test_switching_costs_the_touched_layers_and_equals_loading_fresh(transformer, lora_a, lora_b):
    fused = FusedLoras(transformer)
    a, b = read_lora(lora_a[1]), read_lora(lora_b[1])
    fused.apply([(a, 1.0)])
    changed = fused.apply([(b, 0.5)])
    assert changed == {f"{name}.weight" for name in (*lora_a[0], *lora_b[0])}
    switched = weights_of(transformer)
    assert fused.apply([(read_lora(lora_b[1]), 0.5)]) == set()  # the same mix again: nothing to do
    fused.remove()
    fused.apply([(b, 0.5)])
    assert same_weights(transformer, switched)


def test_a_bf16_transformer_fuses_close_to_the_exact_update_and_restores_exactly(transformer, lora_a):
    transformer.to(torch.bfloat16)
    original = weights_of(transformer)
    fused = FusedLoras(transformer)
    fused.apply([(read_lora(lora_a[1]), 1.0)])
    name = "transformer_blocks.0.attn.to_q"
    expected = original[f"{name}.weight"].float() + delta(lora_a[0], name)
    weight = dict(transformer.named_parameters())[f"{name}.weight"]
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), expected, rtol=2e-2, atol=2e-2)
    fused.remove()
    assert same_weights(transformer, original)


def test_original_hunyuan_video_names_go_through_diffusers_converter(transformer, tmp_path):
    """kohya's `lora_unet_double_blocks_0_img_attn_qkv` is FramePack's to_q, to_k and to_v in one."""
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(96, 4, generator=generator)
    fc_down, fc_up = torch.randn(4, 32, generator=generator), torch.randn(64, 4, generator=generator)
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
            "lora_unet_double_blocks_1_img_mlp_fc1.lora_down.weight": fc_down,
            "lora_unet_double_blocks_1_img_mlp_fc1.lora_up.weight": fc_up,
        },
        tmp_path / "hunyuan.safetensors",
    )
    split = dict(zip(("to_q", "to_k", "to_v"), up.chunk(3), strict=True))
    same = {f"transformer_blocks.0.attn.{name}": (down, part) for name, part in split.items()}
    same["transformer_blocks.1.ff.net.0.proj"] = (fc_down, fc_up)
    fused = FusedLoras(transformer)
    fused.apply([(read_lora(tmp_path / "hunyuan.safetensors"), 1.0)])
    converted = weights_of(transformer)
    fused.apply([(read_lora(write_peft(tmp_path / "same.safetensors", same)), 1.0)])
    assert same_weights(transformer, converted)


def _bad_files(directory, transformer_layers):
    """(file, expected words) for every way a LoRA file can be wrong."""
    cases = []

    def case(name, words, tensors=None, text=None):
        path = directory / name
        if text is not None:
            path.write_text(text)
        elif tensors is not None:
            save_file(tensors, path)
        cases.append((path, words))

    case("missing.safetensors", "LoRA file not found")
    case("notes.safetensors", "is not a readable safetensors file", text="not a LoRA at all")
    case("model.safetensors", "not LoRA layers", tensors={"blocks.0.weight": torch.zeros(4, 4)})
    wan = random_layers({"blocks.0.self_attn.q": (32, 32)}, rank=4, seed=5)
    case("wan.safetensors", "is it for another model?", tensors=_peft_tensors(wan))
    wide = random_layers({"transformer_blocks.0.attn.to_q": (32, 64)}, rank=4, seed=6)
    case("wide.safetensors", "is 32x32 in this transformer, 32x64 in the LoRA", tensors=_peft_tensors(wide))
    ranks = {
        "transformer.proj_out.lora_A.weight": torch.zeros(4, 32),
        "transformer.proj_out.lora_B.weight": torch.zeros(64, 2),
    }
    case("ranks.safetensors", "has rank 4 down but rank 2 up", tensors=ranks)
    half = {"transformer.proj_out.lora_A.weight": torch.zeros(4, 32)}
    case("half.safetensors", "has no up (lora_B / lora_up) weight", tensors=half)
    dora = {
        **_peft_tensors(random_layers({"proj_out": (64, 32)}, 4, 7)),
        "transformer.proj_out.lora_magnitude_vector": torch.ones(64),
    }
    case("dora.safetensors", "is a DoRA", tensors=dora)
    conv = {
        "lora_unet_x_embedder_proj.lora_down.weight": torch.zeros(4, 16, 1, 2, 2),
        "lora_unet_x_embedder_proj.lora_up.weight": torch.zeros(32, 4, 1, 1, 1),
    }
    case("conv.safetensors", "only linear layers are supported", tensors=conv)
    norm = _peft_tensors(random_layers({"clean_x_embedder.proj": (32, 16)}, 4, 8))
    case("embedder.safetensors", "is a Conv3d here; only linear layers take LoRAs", tensors=norm)
    for value, name in ((float("nan"), "nan"), (float("inf"), "inf")):
        broken = _peft_tensors(random_layers({"transformer_blocks.0.attn.to_q": (32, 32)}, 4, 9))
        broken["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"][3, 1] = value
        case(f"{name}.safetensors", "holds NaN or infinite values", tensors=broken)
    alpha = {
        **_peft_tensors(random_layers({"proj_out": (64, 32)}, 4, 10)),
        "transformer.proj_out.alpha": torch.tensor(float("nan")),
    }
    case("alpha.safetensors", "holds NaN or infinite values", tensors=alpha)
    return cases


def _peft_tensors(weights):
    return {
        key: tensor
        for name, (down, up) in weights.items()
        for key, tensor in ((f"transformer.{name}.lora_A.weight", down), (f"transformer.{name}.lora_B.weight", up))
    }


def test_a_bad_file_is_one_line_naming_it_and_changes_nothing(transformer, lora_a, tmp_path):
    fused = FusedLoras(transformer)
    good = read_lora(lora_a[1])
    fused.apply([(good, 0.5)])
    before = weights_of(transformer)
    for path, words in _bad_files(tmp_path, TINY_LAYERS):
        with pytest.raises(InvalidSettings) as error:
            fused.apply([(good, 1.0), (read_lora(path), 1.0)])
        message = str(error.value)
        assert words in message and str(path) in message and "\n" not in message, message
        assert same_weights(transformer, before) and fused.applied == ((good, 0.5),)


def test_kohya_names_of_the_image_projection_and_single_blocks_resolve(transformer, tmp_path):
    weights = random_layers({"image_projection.up": (96, 32), "single_transformer_blocks.1.proj_out": (32, 96)}, 2, 9)
    lora = read_lora(write_kohya(tmp_path / "k.safetensors", weights))
    assert set(FusedLoras(transformer).check(lora)) == set(weights)


def test_lora_choices_parse_paths_with_colons():
    assert LoraChoice.parse("x.safetensors:0.5") == LoraChoice(Path("x.safetensors"), 0.5)
    assert LoraChoice.parse("x.safetensors") == LoraChoice(Path("x.safetensors"), 1.0)
    assert LoraChoice.parse(r"C:\loras\x.safetensors") == LoraChoice(Path(r"C:\loras\x.safetensors"), 1.0)
    assert LoraChoice.parse(r"C:\loras\x.safetensors:-1.5") == LoraChoice(Path(r"C:\loras\x.safetensors"), -1.5)
    assert LoraChoice.parse("dir:v2/x.safetensors") == LoraChoice(Path("dir:v2/x.safetensors"), 1.0)
    for text, words in (
        ("x.safetensors:11", "LoRA scale must be in [-10, 10], got 11.0"),
        ("x:nan", "got nan"),
        (":0.5", "needs a file path"),
    ):
        with pytest.raises(InvalidSettings, match=words.replace("[", r"\[").replace("]", r"\]")):
            LoraChoice.parse(text)


def tiny_job(**overrides) -> GenerationSettings:
    values = {"prompt": "a cat walks", "seconds": 0.4, "steps": 2, "latent_window": 3, "resolution": TINY_RESOLUTION}
    return GenerationSettings(**{**values, **overrides})


def test_a_job_fuses_its_loras_records_them_and_the_next_job_takes_them_out(engines, lora_a, tmp_path):
    engine, sink = engines["framepack"], FrameSink()
    original_writer, engine.write_video = engine.write_video, sink
    try:
        image = example_image(256, 256)
        stages = []
        for name, loras in (("plain", ()), ("lora", (LoraChoice(lora_a[1], 0.8),)), ("again", ())):
            events = list(engine.generate(image, tiny_job(loras=loras), JobPaths.for_video(tmp_path / f"{name}.mp4")))
            assert isinstance(events[-1], Finished), events[-1]
            stages.append(StageStarted(APPLYING_LORAS) in events)
    finally:
        engine.write_video = original_writer
    plain, with_lora, again = sink.calls
    assert np.abs(plain.astype(int) - with_lora.astype(int)).mean() > 0.5
    assert np.array_equal(plain, again)  # taken out bit for bit
    assert stages == [False, True, True]
    record = json.loads((tmp_path / "lora.json").read_text())
    sha256 = hashlib.sha256(lora_a[1].read_bytes()).hexdigest()
    assert record["loras"] == [{"name": "a.safetensors", "path": str(lora_a[1]), "scale": 0.8, "sha256": sha256}]
    assert record["settings"]["loras"] == [{"path": str(lora_a[1]), "scale": 0.8}]
    assert json.loads((tmp_path / "again.json").read_text())["loras"] == []


def test_a_job_with_a_bad_lora_fails_as_bad_input_before_writing_or_changing_anything(engines, tmp_path):
    engine = engines["framepack"]
    before = weights_of(engine.components.transformer)
    other = tmp_path / "other.safetensors"
    write_peft(other, random_layers({"blocks.0.self_attn.q": (32, 32)}, 4, 10))
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    events = list(
        engine.generate(
            example_image(256, 256), tiny_job(loras=(LoraChoice(other),)), JobPaths.for_video(outputs / "x.mp4")
        )
    )
    assert len(events) == 1 and isinstance(events[0], Failed) and events[0].bad_input
    assert str(other) in events[0].message and "another model" in events[0].message
    assert list(outputs.iterdir()) == [] and same_weights(engine.components.transformer, before)


def test_a_lora_switch_refits_the_transformer_engine_and_never_builds_it_again(engines, lora_a, tiny_root, tmp_path):
    """With the transformer on TensorRT (the test double), each change of mix is a refit checked against PyTorch:
    the frames are those of the PyTorch transformer with the same LoRA, and only the first job builds."""
    from diffusers_helper.acceleration.engine_cache import EngineCache
    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.components import load_components
    from diffusers_helper.models.placement import plan_memory
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.settings import ModelSettings, TensorRTOptions
    from diffusers_helper.tensorrt_runtime import TensorRTRuntime
    from tests.support.tensorrt_double import FakeBackend

    plan = plan_memory("cpu")
    backend = FakeBackend()
    runtime = TensorRTRuntime(EngineCache(tmp_path / "engines"), backend)
    components = load_components("framepack", tiny_root, plan.dtypes())
    settings = ModelSettings(preset="tiny", tensorrt=TensorRTOptions(transformer=True))
    accelerated, accelerated_sink = FramePackEngine(assemble(components, plan, settings, runtime)), FrameSink()
    accelerated.write_video = accelerated_sink
    reference, reference_sink = engines["framepack"], FrameSink()
    original_writer, reference.write_video = reference.write_video, reference_sink
    try:
        for name, loras in (("plain", ()), ("lora", (LoraChoice(lora_a[1], 0.8),)), ("again", ())):
            for engine, folder in ((accelerated, "trt"), (reference, "pt")):
                paths = JobPaths.for_video(tmp_path / folder / f"{name}.mp4")
                events = list(engine.generate(example_image(256, 256), tiny_job(loras=loras), paths))
                assert isinstance(events[-1], Finished), events[-1]
    finally:
        reference.write_video = original_writer
    for trt_frames, pt_frames in zip(accelerated_sink.calls, reference_sink.calls, strict=True):
        assert np.abs(trt_frames.astype(int) - pt_frames.astype(int)).max() <= 1
    status = runtime.status["transformer"]
    assert status.engine == "tensorrt" and (status.compiles, status.refits) == (
        TINY_STACK_ENGINES,
        2 * TINY_STACK_ENGINES,
    )
