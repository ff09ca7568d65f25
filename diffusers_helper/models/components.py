"""Load FramePack's components with diffusers/transformers `from_pretrained`, from the hub or a local copy.

A local copy (`--models DIR`, and the tiny preset under Cache/) mirrors the hub: `DIR/<owner>/<repo>/<subfolder>`,
so one loading path serves real and tiny models alike.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel, ModelMixin
from transformers import AutoImageProcessor, AutoTokenizer, CLIPTextModel, LlamaModel, SiglipVisionModel

logger = logging.getLogger(__name__)

HUNYUAN_VIDEO = "hunyuanvideo-community/HunyuanVideo"
FLUX_REDUX = "lllyasviel/flux_redux_bfl"
TRANSFORMER_REPOS = {
    "framepack": "lllyasviel/FramePackI2V_HY",
    "f1": "lllyasviel/FramePack_F1_I2V_HY_20250503",
}


@dataclass(frozen=True)
class ComponentSpec:
    """Where one component lives and which class loads it; `weights` marks models (they take a dtype)."""

    name: str
    loader: type
    repo: str
    subfolder: str | None
    weights: bool = True


SHARED_COMPONENTS = (
    ComponentSpec("tokenizer", AutoTokenizer, HUNYUAN_VIDEO, "tokenizer", weights=False),
    ComponentSpec("text_encoder", LlamaModel, HUNYUAN_VIDEO, "text_encoder"),
    ComponentSpec("tokenizer_2", AutoTokenizer, HUNYUAN_VIDEO, "tokenizer_2", weights=False),
    ComponentSpec("text_encoder_2", CLIPTextModel, HUNYUAN_VIDEO, "text_encoder_2"),
    ComponentSpec("vae", AutoencoderKLHunyuanVideo, HUNYUAN_VIDEO, "vae"),
    ComponentSpec("feature_extractor", AutoImageProcessor, FLUX_REDUX, "feature_extractor", weights=False),
    ComponentSpec("image_encoder", SiglipVisionModel, FLUX_REDUX, "image_encoder"),
)


def component_specs(variant: str) -> tuple[ComponentSpec, ...]:
    transformer = ComponentSpec(
        "transformer", HunyuanVideoFramepackTransformer3DModel, TRANSFORMER_REPOS[variant], None
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


def load_component(spec: ComponentSpec, models_dir: Path | None, dtype: torch.dtype) -> object:
    location = str(models_dir / spec.repo) if models_dir else spec.repo
    kwargs = _dtype_argument(spec.loader, dtype) if spec.weights else {}
    if spec.subfolder:
        kwargs["subfolder"] = spec.subfolder
    try:
        return spec.loader.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        where = f"{location}/{spec.subfolder}" if spec.subfolder else location
        hint = (
            "check that the directory mirrors the hub layout <owner>/<repo>/<subfolder>"
            if models_dir
            else "download it while online (it is then cached), or pass --models DIR with a local copy"
        )
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        raise ModelsUnavailable(
            f"cannot load {spec.name} from {where}: {reason}; {hint}; for an offline run use --preset tiny"
        ) from error


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
