import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import CLIPTextModel, LlamaModel, SiglipVisionModel

from diffusers_helper.models.components import ModelsUnavailable, load_components
from diffusers_helper.models.tiny_preset import ensure_tiny_models


def test_tiny_models_are_the_real_classes_loaded_like_real_weights(tiny_root):
    components = load_components("framepack", tiny_root, {})
    assert isinstance(components.text_encoder, LlamaModel)
    assert isinstance(components.text_encoder_2, CLIPTextModel)
    assert isinstance(components.image_encoder, SiglipVisionModel)
    assert isinstance(components.vae, AutoencoderKLHunyuanVideo)
    assert isinstance(components.transformer, HunyuanVideoFramepackTransformer3DModel)
    assert components.transformer.clean_x_embedder is not None and components.transformer.image_projection is not None


def test_tiny_vae_compresses_8x_in_space_and_4x_in_time(tiny_root):
    vae = load_components("f1", tiny_root, {}).vae
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 9, 64, 96)).latent_dist.mode()
        assert latents.shape == (1, 16, 3, 8, 12)
        assert vae.decode(latents).sample.shape == (1, 3, 9, 64, 96)


def test_written_once_and_rebuilt_when_stale(tmp_path):
    root = ensure_tiny_models(tmp_path)
    marker = root / "preset.json"
    stamp = marker.stat().st_mtime_ns
    assert ensure_tiny_models(tmp_path) == root and marker.stat().st_mtime_ns == stamp
    marker.write_text('{"version": -1}')
    ensure_tiny_models(tmp_path)
    assert '"version": -1' not in marker.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-")]


@pytest.mark.parametrize("blocked", ["cache", "tiny"])
def test_a_cache_that_cannot_take_the_preset_is_one_line(tmp_path, blocked):
    """`Cache` (or `Cache/tiny`) is a file, or cannot be written: the models cannot load, said in one line."""
    cache = tmp_path / "Cache"
    if blocked == "cache":
        cache.write_text("")
    else:
        cache.mkdir()
        (cache / "tiny").write_text("")
    with pytest.raises(ModelsUnavailable) as refused:
        ensure_tiny_models(cache)
    assert str(refused.value).startswith(f"cannot write the tiny preset to {cache / 'tiny'} (")
    assert str(refused.value).endswith(f"make {cache} a writable directory") and "\n" not in str(refused.value)


def test_random_weights_are_seeded_shaped_and_placed_like_the_real_model():
    from transformers import LlamaConfig, LlamaModel

    from diffusers_helper.models.full_size_preset import random_weights

    def build():
        return LlamaModel(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0))  # fmt: skip

    first = random_weights(build, torch.bfloat16, lambda tensor: tensor, seed=3)
    again = random_weights(build, torch.bfloat16, lambda tensor: tensor, seed=3)
    other = random_weights(build, torch.bfloat16, lambda tensor: tensor, seed=4)
    weight = first.layers[0].mlp.up_proj.weight
    assert weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not weight.requires_grad
    assert torch.equal(weight, again.layers[0].mlp.up_proj.weight)
    assert not torch.equal(weight, other.layers[0].mlp.up_proj.weight)
    assert 0 < weight.abs().max() <= 1 / 32**0.5 and weight.float().std() > 0.05
    assert torch.equal(first.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    assert torch.allclose(first.rotary_emb.inv_freq, build().rotary_emb.inv_freq)  # buffers computed, not random


def test_the_full_size_preset_has_the_real_sizes():
    from accelerate import init_empty_weights

    from diffusers_helper.models.full_size_preset import FULL_SIZE

    expected = {"transformer": 12.87e9, "text_encoder": 7.50e9, "image_encoder": 0.428e9, "vae": 0.246e9,
                "text_encoder_2": 0.123e9}  # fmt: skip
    for name, build in FULL_SIZE.items():
        with init_empty_weights(include_buffers=False):
            model = build()
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(expected[name], rel=0.01), name


def test_the_full_size_preset_makes_a_video_through_the_product_path(tmp_path):
    """Its builders shrunk to a few blocks (the real ones need a GPU): tokenizers, processor, engine, video."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        LlamaConfig,
        LlamaModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from diffusers_helper.media.images import example_image
    from diffusers_helper.media.job_files import JobPaths
    from diffusers_helper.models.assembly import assemble
    from diffusers_helper.models.full_size_preset import full_size_components
    from diffusers_helper.models.placement import plan_memory, weight_store
    from diffusers_helper.pipeline.engine import FramePackEngine
    from diffusers_helper.pipeline.events import Finished
    from diffusers_helper.settings import GenerationSettings, ModelSettings

    shrunk = {
        "text_encoder": lambda: LlamaModel(LlamaConfig(vocab_size=128320, hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=3, num_attention_heads=4,
                                                       num_key_value_heads=2)),
        "text_encoder_2": lambda: CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=1, num_attention_heads=2,
                                                               max_position_embeddings=77, projection_dim=32)),
        "image_encoder": lambda: SiglipVisionModel(SiglipVisionConfig(hidden_size=48, intermediate_size=64,
                                                                      num_hidden_layers=1, num_attention_heads=2,
                                                                      image_size=384, patch_size=14)),
        "vae": lambda: AutoencoderKLHunyuanVideo(block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                                 norm_num_groups=4),
        "transformer": lambda: HunyuanVideoFramepackTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1, num_refiner_layers=1,
            text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6), has_image_proj=True,
            image_proj_dim=48, has_clean_x_embedder=True),
    }  # fmt: skip
    plan = plan_memory("cpu")
    components = full_size_components("framepack", plan.dtypes(), weight_store(plan), builders=shrunk)
    assert components.feature_extractor.size == {"height": 384, "width": 384}
    engine = FramePackEngine(
        assemble(components, plan, ModelSettings(preset="full-random")), write_video=lambda *a: None
    )
    settings = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=2, resolution=128)
    events = list(engine.generate(example_image(256, 256), settings, JobPaths.for_video(tmp_path / "x.mp4")))
    assert isinstance(events[-1], Finished) and events[-1].frames == 37
