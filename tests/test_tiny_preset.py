import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from transformers import CLIPTextModel, LlamaModel, SiglipVisionModel

from diffusers_helper.models.components import load_components
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
