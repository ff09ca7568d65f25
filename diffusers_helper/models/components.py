"""Load FramePack's components with diffusers/transformers `from_pretrained`, from the hub or a local copy.

A local copy (`--models DIR`, and the tiny preset under Cache/) mirrors the hub: `DIR/<owner>/<repo>/<subfolder>`,
so one loading path serves real and tiny models alike.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel, ModelMixin
from safetensors import SafetensorError
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextModel, LlamaModel, SiglipVisionModel

from ..errors import first_line

logger = logging.getLogger(__name__)

HUNYUAN_VIDEO = "hunyuanvideo-community/HunyuanVideo"
FLUX_REDUX = "lllyasviel/flux_redux_bfl"
TRANSFORMER_REPOS = {
    "framepack": "lllyasviel/FramePackI2V_HY",
    "f1": "lllyasviel/FramePack_F1_I2V_HY_20250503",
}


@dataclass(frozen=True)
class ComponentSpec:
    """Where one component lives and which class loads it. `config` names the file that describes it and
    `identities` the values of that file's `model_type` (transformers) or `_class_name` (diffusers) that fit the
    class; `weights` marks models (they take a dtype)."""

    name: str
    loader: type
    repo: str
    subfolder: str | None
    config: str = "config.json"
    identities: tuple[str, ...] = ()
    weights: bool = True


SHARED_COMPONENTS = (
    ComponentSpec("tokenizer", AutoTokenizer, HUNYUAN_VIDEO, "tokenizer", "tokenizer_config.json", weights=False),
    ComponentSpec("text_encoder", LlamaModel, HUNYUAN_VIDEO, "text_encoder", identities=("llama",)),
    ComponentSpec("tokenizer_2", AutoTokenizer, HUNYUAN_VIDEO, "tokenizer_2", "tokenizer_config.json", weights=False),
    ComponentSpec(
        "text_encoder_2", CLIPTextModel, HUNYUAN_VIDEO, "text_encoder_2", identities=("clip_text_model", "clip")
    ),
    ComponentSpec("vae", AutoencoderKLHunyuanVideo, HUNYUAN_VIDEO, "vae", identities=("AutoencoderKLHunyuanVideo",)),
    ComponentSpec(
        "feature_extractor",
        AutoImageProcessor,
        FLUX_REDUX,
        "feature_extractor",
        "preprocessor_config.json",
        weights=False,
    ),  # fmt: skip
    ComponentSpec(
        "image_encoder", SiglipVisionModel, FLUX_REDUX, "image_encoder", identities=("siglip_vision_model", "siglip")
    ),
)
TRANSFORMER_IDENTITIES = (
    "HunyuanVideoFramepackTransformer3DModel",
    "HunyuanVideoTransformer3DModelPacked",  # the name FramePack's own class saved the checkpoints under
)


def component_specs(variant: str) -> tuple[ComponentSpec, ...]:
    transformer = ComponentSpec(
        "transformer",
        HunyuanVideoFramepackTransformer3DModel,
        TRANSFORMER_REPOS[variant],
        None,
        identities=TRANSFORMER_IDENTITIES,
    )
    return (*SHARED_COMPONENTS, transformer)


class ModelsUnavailable(RuntimeError):
    """A component could not be loaded; the message says which, from where, and what to do instead."""


@dataclass
class Components:
    """The loaded models of one process; the engine reads them, the memory policy places them."""

    tokenizer: object
    text_encoder: LlamaModel
    tokenizer_2: object
    text_encoder_2: CLIPTextModel
    vae: AutoencoderKLHunyuanVideo
    feature_extractor: object
    image_encoder: SiglipVisionModel
    transformer: HunyuanVideoFramepackTransformer3DModel
    variant: str

    def model_ids(self) -> dict[str, str]:
        return {
            spec.name: spec.repo + (f"/{spec.subfolder}" if spec.subfolder else "")
            for spec in component_specs(self.variant)
        }


def _dtype_argument(loader: type, dtype: torch.dtype) -> dict:
    return {"torch_dtype": dtype} if issubclass(loader, ModelMixin) else {"dtype": dtype}


def local_component_problem(spec: ComponentSpec, directory: Path) -> str | None:
    """Checked before any weights are allocated: is the component's description there, and is it that component's?
    (Without its config.json, transformers would build a default 7B LLaMA.)"""
    path = directory / spec.config
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{spec.config} is missing"
    except (OSError, ValueError) as error:
        return f"{spec.config} is not readable JSON ({error})"
    if not isinstance(config, dict):
        return f"{spec.config} does not describe a model"
    identity = config.get("_class_name" if issubclass(spec.loader, ModelMixin) else "model_type")
    if spec.identities and identity not in spec.identities:
        return f"{spec.config} describes {identity!r}, not {' or '.join(spec.identities)}"
    return None


def load_component(spec: ComponentSpec, models_dir: Path | None, dtype: torch.dtype) -> object:
    location = str(models_dir / spec.repo) if models_dir else spec.repo
    where = f"{location}/{spec.subfolder}" if spec.subfolder else location
    hint = (
        "check that the directory mirrors the hub layout <owner>/<repo>/<subfolder>"
        if models_dir
        else "download it while online (it is then cached), or pass --models DIR with a local copy"
    )
    problem = local_component_problem(spec, Path(where)) if models_dir else None
    if problem is None:
        kwargs = _dtype_argument(spec.loader, dtype) if spec.weights else {}
        if spec.subfolder:
            kwargs["subfolder"] = spec.subfolder
        try:
            return spec.loader.from_pretrained(location, **kwargs)
        except (OSError, ValueError, SafetensorError) as error:
            problem = first_line(error).rstrip(".")
    raise ModelsUnavailable(
        f"cannot load {spec.name} from {where}: {problem}; {hint}; for an offline run use --preset tiny"
    )


def load_components(variant: str, models_dir: Path | None, dtypes: dict[str, torch.dtype]) -> Components:
    """Load every component on the CPU in its dtype (`dtypes` maps component name to dtype)."""
    loaded = {}
    for spec in component_specs(variant):
        logger.info("loading %s from %s", spec.name, models_dir / spec.repo if models_dir else spec.repo)
        loaded[spec.name] = load_component(spec, models_dir, dtypes.get(spec.name, torch.float32))
    for module in loaded.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return Components(**loaded, variant=variant)
