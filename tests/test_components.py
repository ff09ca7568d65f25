"""Models on disk: every component's description is checked before weights are allocated, a damaged file is one
clear line, and a changed tiny preset is written again."""

import json
import shutil

import pytest
import torch
from transformers import LlamaModel

from diffusers_helper.models.components import ModelsUnavailable, load_components
from diffusers_helper.models.tiny_preset import ensure_tiny_models

TEXT_ENCODER = "hunyuanvideo-community/HunyuanVideo/text_encoder"


@pytest.fixture
def models_copy(tiny_root, tmp_path):
    copy = tmp_path / "models"
    shutil.copytree(tiny_root, copy)
    return copy


def test_a_missing_config_is_named_before_any_weights_are_allocated(models_copy, monkeypatch):
    (models_copy / TEXT_ENCODER / "config.json").unlink()
    built = []
    monkeypatch.setattr(LlamaModel, "from_pretrained", classmethod(lambda cls, *a, **k: built.append(a)))
    with pytest.raises(
        ModelsUnavailable, match=r"cannot load text_encoder from .*/text_encoder: config.json is missing"
    ):
        load_components("framepack", models_copy, {})
    assert built == []


def test_a_config_of_another_component_is_refused(models_copy):
    shutil.copy(models_copy / "hunyuanvideo-community/HunyuanVideo/text_encoder_2/config.json",
                models_copy / TEXT_ENCODER / "config.json")  # fmt: skip
    with pytest.raises(ModelsUnavailable, match="config.json describes 'clip_text_model', not llama"):
        load_components("framepack", models_copy, {})


@pytest.mark.parametrize("content", ["[1, 2]", "{not json"])
def test_a_config_that_is_not_a_model_description_is_refused(models_copy, content):
    (models_copy / "hunyuanvideo-community/HunyuanVideo/vae/config.json").write_text(content)
    with pytest.raises(
        ModelsUnavailable, match="cannot load vae from .*config.json (does not describe|is not readable)"
    ):
        load_components("framepack", models_copy, {})


def test_truncated_weights_are_one_line(models_copy):
    weights = next((models_copy / TEXT_ENCODER).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelsUnavailable) as error:
        load_components("framepack", models_copy, {})
    assert str(error.value).startswith("cannot load text_encoder from") and "\n" not in str(error.value)


def test_a_changed_or_truncated_tiny_preset_is_written_again(tmp_path, caplog):
    root = ensure_tiny_models(tmp_path)
    weights = next((root / TEXT_ENCODER).glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original[:-10])
    assert ensure_tiny_models(tmp_path) == root
    assert weights.read_bytes() == original and "is changed or missing" in caplog.text
    (root / "lllyasviel/flux_redux_bfl/image_encoder/config.json").unlink()
    ensure_tiny_models(tmp_path)
    assert (root / "lllyasviel/flux_redux_bfl/image_encoder/config.json").exists()
    record = json.loads((root / "preset.json").read_text())
    assert len(record["files"]) > 10 and all(len(digest) == 64 for digest in record["files"].values())
    assert isinstance(load_components("f1", root, {}).text_encoder, torch.nn.Module)
