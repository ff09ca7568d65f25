"""The tiny preset: FramePack's real component classes with tiny seeded configs, for offline runs and tests.

Written once under Cache/tiny with `save_pretrained`, in the hub layout, and then loaded by the same code as
real weights. The configs keep every real path alive: a 16-channel VAE with 8x spatial and 4x temporal
compression, image projection, 1x/2x/4x history embedders, 3D rope, guidance embedding, LLaMA hidden states
three layers from the end, the CLIP pooler and SigLIP tokens.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import DEFAULT_PROMPT_TEMPLATE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ..errors import first_line
from ..settings import CACHE_DIR, QUICK_PROMPTS
from .components import FLUX_REDUX, HUNYUAN_VIDEO, TRANSFORMER_REPOS, ModelsUnavailable

logger = logging.getLogger(__name__)

TINY_PRESET_VERSION = 3  # 2: file hashes in preset.json; 3: a narrower VAE
MARKER = "preset.json"
TINY_RESOLUTION = 128
LLAMA_SPECIALS = ("<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|pad|>")
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
HIDDEN = 32


def _corpus() -> list[str]:
    words = (
        "a an the cat dog girl boy man woman walks runs dances jumps turns smiles waves looks sits stands "
        "slowly quickly gracefully in on at under over with through forest city street room beach sky sea "
        "light dark red green blue yellow white black camera moves pans zooms close wide shot scene video"
    )
    return [*QUICK_PROMPTS, DEFAULT_PROMPT_TEMPLATE["template"], words] * 4


def _train_tokenizer(specials: tuple[str, ...], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _llama_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _train_tokenizer(LLAMA_SPECIALS, 600)
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token="<|eot_id|>", pad_token="<|pad|>", model_max_length=1024
    )


def _clip_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = _train_tokenizer(CLIP_SPECIALS, 400)
    bos, eos = CLIP_SPECIALS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos, model_max_length=77
    )


def _write_hunyuan_video(root: Path) -> None:
    llama_tokenizer, clip_tokenizer = _llama_tokenizer(), _clip_tokenizer()
    llama_tokenizer.save_pretrained(root / "tokenizer")
    clip_tokenizer.save_pretrained(root / "tokenizer_2")
    torch.manual_seed(1)
    LlamaModel(
        LlamaConfig(
            vocab_size=len(llama_tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            pad_token_id=llama_tokenizer.pad_token_id,
            bos_token_id=llama_tokenizer.bos_token_id,
            eos_token_id=llama_tokenizer.eos_token_id,
        )
    ).save_pretrained(root / "text_encoder")
    torch.manual_seed(2)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=HIDDEN,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    ).save_pretrained(root / "text_encoder_2")
    torch.manual_seed(3)
    AutoencoderKLHunyuanVideo(
        latent_channels=16,
        block_out_channels=(4, 4, 8, 8),  # narrow: on the CPU, decoding dominates a tiny job's time
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    ).save_pretrained(root / "vae")


def _write_flux_redux(root: Path) -> None:
    SiglipImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=3
    ).save_pretrained(root / "feature_extractor")
    torch.manual_seed(4)
    SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(root / "image_encoder")


def _write_transformer(root: Path, seed: int) -> None:
    torch.manual_seed(seed)
    HunyuanVideoFramepackTransformer3DModel(
        in_channels=16,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=HIDDEN,
        pooled_projection_dim=HIDDEN,
        rope_axes_dim=(4, 6, 6),
        has_image_proj=True,
        image_proj_dim=HIDDEN,
        has_clean_x_embedder=True,
    ).save_pretrained(root)


def _write_all(root: Path) -> None:
    _write_hunyuan_video(root / HUNYUAN_VIDEO)
    _write_flux_redux(root / FLUX_REDUX)
    for seed, repo in enumerate(TRANSFORMER_REPOS.values(), start=10):
        _write_transformer(root / repo, seed)
    record = {"preset": "tiny", "version": TINY_PRESET_VERSION, "files": _file_hashes(root)}
    (root / MARKER).write_text(json.dumps(record, indent=1))


def _file_hashes(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MARKER
    }


def _damage(root: Path) -> str | None:
    """What is wrong with the copy at `root` (missing, another version, a changed or missing file), or None."""
    try:
        record = json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return "not written yet"
    except (OSError, ValueError) as error:
        return f"{MARKER} is unreadable ({error})"
    if not isinstance(record, dict) or record.get("version") != TINY_PRESET_VERSION:
        return "written by another version"
    expected, found = record.get("files") or {}, _file_hashes(root)
    changed = sorted(name for name in set(expected) | set(found) if expected.get(name) != found.get(name))
    return f"{changed[0]} is changed or missing" if changed else None


def ensure_tiny_models(cache_dir: Path = CACHE_DIR) -> Path:
    """The tiny preset's directory, written on first use (a few seconds) and reused while every file is as written;
    ModelsUnavailable in one line when it cannot be written there."""
    root = cache_dir / "tiny"
    try:
        return _ensure(root, cache_dir)
    except OSError as error:
        reason = error.strerror or first_line(error)
        raise ModelsUnavailable(f"cannot write the tiny preset to {root} ({reason}); make {cache_dir} a writable "
                                "directory") from error  # fmt: skip


def _ensure(root: Path, cache_dir: Path) -> Path:
    damage = _damage(root)
    if damage is None:
        return root
    if root.exists():
        logger.warning("the tiny preset in %s is unusable (%s); writing it again", root, damage)
    logger.info("writing the tiny preset to %s", root)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        _write_all(staging)
        if root.exists() and _damage(root) is not None:
            shutil.rmtree(root)
        try:
            os.rename(staging, root)
        except OSError:
            if _damage(root) is not None:  # another process won the race with a complete copy, or something is wrong
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root
