"""LoRAs for the FramePack transformer: read the files people have, check them against the model, fuse a mix of them
into the base weights and take it out again.

Formats read (safetensors):
- diffusers / PEFT: `transformer.<module>.lora_A.weight` and `.lora_B.weight` (also under `diffusion_model.`,
  `base_model.model.` or no prefix), with an optional `.alpha`;
- kohya / musubi-tuner: `lora_unet_<module, dots as underscores>.lora_down.weight`, `.lora_up.weight` and `.alpha`,
  as musubi-tuner writes FramePack LoRAs;
- either of them with the original HunyuanVideo module names (`double_blocks.0.img_attn_qkv`, ...), which diffusers'
  HunyuanVideo converter maps onto the diffusers modules (fused qkv split into q, k and v).

A mix is fused: the transformer keeps plain `nn.Linear` weights and no PEFT layers, because compiled engines are
refitted from the weights. The original weights of every layer a mix touches are kept on the CPU, so a mix is taken
out bit for bit and the next one is fused from the originals, never unfused by subtraction. Switching mixes costs the
layers either touches, nothing else. Weights change in place, so pinned host memory and the streaming hooks that
point at it stay valid.
"""

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import first_line
from ..media.images import not_a_file
from ..media.job_files import file_sha256
from ..settings import InvalidSettings

logger = logging.getLogger(__name__)

SUFFIXES = {
    ".lora_A.weight": "down",
    ".lora_down.weight": "down",
    ".lora_B.weight": "up",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
}
PREFIXES = ("lora_unet_", "transformer.", "diffusion_model.", "base_model.model.")
HUNYUAN_BLOCK = re.compile(r"(double_blocks|single_blocks)_(\d+)_(\w+)")  # kohya's flattening of the original names
ADAPTER = "framepack_lora_{}"


class LoraLayer(NamedTuple):
    """One layer's low-rank update, `up @ down`, in float32 with the file's alpha / rank folded into `up`."""

    down: torch.Tensor  # (rank, in_features)
    up: torch.Tensor  # (out_features, rank)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file as read: where it is, its SHA-256 (recorded with every job) and its layers, named as the file
    names them (diffusers module names, or kohya's flattened ones), to be matched against a transformer."""

    path: Path
    sha256: str
    layers: Mapping[str, LoraLayer]


def read_lora(path: Path | str) -> LoraFile:
    """Read a LoRA file in any of the formats above; InvalidSettings, one line naming the file, when it is missing,
    not safetensors, or not a LoRA this transformer code can fuse (DoRA, convolutions, unknown keys, rank mismatch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        reason = not_a_file(path)
        raise InvalidSettings(f"LoRA file not found: {path}" if reason == "not found" else f"LoRA {path} {reason}")
    try:
        sha256 = file_sha256(path)
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise InvalidSettings(f"LoRA {path} is not a readable safetensors file ({first_line(error)})") from error
    return LoraFile(path, sha256, _layers(path, tensors))


def _layers(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, LoraLayer]:
    """Group the file's tensors by module, check each group and fold alpha in; names lose their prefix."""
    if not tensors:
        raise InvalidSettings(f"LoRA {path} holds no tensors")
    if any("dora_scale" in key or "lora_magnitude_vector" in key for key in tensors):
        raise InvalidSettings(f"LoRA {path} is a DoRA, which is not supported; use a plain LoRA")
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((suffix for suffix in SUFFIXES if key.endswith(suffix)), None)
        if suffix is None:
            raise InvalidSettings(
                f"LoRA {path} has weights that are not LoRA layers (e.g. {key}); expected lora_A/lora_B or "
                "lora_down/lora_up pairs"
            )
        groups.setdefault(key.removesuffix(suffix), {})[SUFFIXES[suffix]] = tensor
    layers = {}
    for module, group in groups.items():
        layers[_module_name(module)] = _layer(path, module, group)
    return _convert_original_names(path, layers)


def _module_name(name: str) -> str:
    """The module a key names, without the file's prefix; kohya's flattened HunyuanVideo block names are given their
    dots back (double_blocks_0_img_mlp_fc1 -> double_blocks.0.img_mlp.fc1) for diffusers' converter."""
    for prefix in PREFIXES:
        if name.startswith(prefix):
            name = name.removeprefix(prefix)
            break
    flattened = HUNYUAN_BLOCK.fullmatch(name)
    if flattened:
        group, index, rest = flattened.groups()
        name = f"{group}.{index}." + re.sub(r"_(fc1|fc2|linear)$", r".\1", rest)
    return name


def _layer(path: Path, module: str, group: dict[str, torch.Tensor]) -> LoraLayer:
    down, up, alpha = group.get("down"), group.get("up"), group.get("alpha")
    if down is None or up is None:
        missing = "down (lora_A / lora_down)" if down is None else "up (lora_B / lora_up)"
        raise InvalidSettings(f"LoRA {path}: layer {module} has no {missing} weight")
    if down.ndim != 2 or up.ndim != 2:
        raise InvalidSettings(
            f"LoRA {path}: layer {module} is not a linear layer (weights of shape {tuple(down.shape)} and "
            f"{tuple(up.shape)}); only linear layers are supported"
        )
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise InvalidSettings(
            f"LoRA {path}: layer {module} has rank {rank} down but rank {up.shape[1]} up; the file is damaged"
        )
    if alpha is not None and alpha.numel() != 1:
        raise InvalidSettings(f"LoRA {path}: layer {module} has an alpha of shape {tuple(alpha.shape)}, not a number")
    for part, tensor in (("down", down), ("up", up), ("alpha", alpha)):
        if tensor is not None and not torch.isfinite(tensor.float()).all():
            raise InvalidSettings(
                f"LoRA {path}: layer {module} holds NaN or infinite values in its {part} weight; the file is damaged"
            )
    scale = 1.0 if alpha is None else float(alpha.float()) / rank
    return LoraLayer(down.float(), up.float() * scale)


def _convert_original_names(path: Path, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """Original HunyuanVideo names go through diffusers' HunyuanVideo converter, which knows their fused layers."""
    if not any(name.startswith(("double_blocks.", "single_blocks.")) for name in layers):
        return layers
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    state_dict = {}
    for name, layer in layers.items():
        state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"] = layer.down, layer.up
    try:
        converted = _convert_hunyuan_video_lora_to_diffusers(state_dict)
    except (RuntimeError, ValueError, KeyError) as error:
        raise InvalidSettings(f"LoRA {path}: its HunyuanVideo layers do not convert ({error})") from error
    downs = {key.removesuffix(".lora_A.weight"): value for key, value in converted.items() if ".lora_A." in key}
    ups = {key.removesuffix(".lora_B.weight"): value for key, value in converted.items() if ".lora_B." in key}
    return {_module_name(name): LoraLayer(downs[name], ups[name]) for name in downs if name in ups}


class FusedLoras:
    """The LoRA mix fused into one transformer, with the original weights of the layers it touches (on the CPU).

    `apply` returns the names of the parameters whose values it changed (restored or fused), so whatever keeps a
    copy of the weights elsewhere (a compiled engine) knows what to refresh; an empty set means nothing changed.
    """

    def __init__(self, transformer: torch.nn.Module, refusal: str | None = None) -> None:
        self.transformer = transformer
        self.refusal = refusal  # why this transformer takes no LoRAs (FP8 weights), if it takes none
        self._originals: dict[str, torch.Tensor] = {}  # parameter name -> its original value, on the CPU
        self._applied: tuple[tuple[LoraFile, float], ...] = ()

    @property
    def applied(self) -> tuple[tuple[LoraFile, float], ...]:
        """The mix in the weights now: (LoRA, scale) in the order applied."""
        return self._applied

    def is_applied(self, loras: Sequence[tuple[LoraFile, float]]) -> bool:
        """Whether the weights already hold this mix: the same files' contents at the same scales, in order."""
        return _identity(loras) == _identity(self._applied)

    def check(self, lora: LoraFile) -> dict[str, LoraLayer]:
        """The LoRA's layers by the transformer's module names; InvalidSettings naming the file when a layer
        matches no linear layer of this transformer or its shape differs. Changes nothing."""
        if self.refusal:
            raise InvalidSettings(f"LoRA {lora.path}: {self.refusal}")
        linears = {
            name: module for name, module in self.transformer.named_modules() if isinstance(module, torch.nn.Linear)
        }
        names = {**{name.replace(".", "_"): name for name in linears}, **{name: name for name in linears}}
        unmatched = sorted(name for name in lora.layers if name not in names)
        if unmatched:
            modules = dict(self.transformer.named_modules())
            other = next((name for name in unmatched if name in modules), None)
            if other is not None:
                kind = type(modules[other]).__name__
                raise InvalidSettings(
                    f"LoRA {lora.path}: layer {other} is a {kind} here; only linear layers take LoRAs"
                )
            raise InvalidSettings(
                f"LoRA {lora.path} does not fit this FramePack transformer: {len(unmatched)} of its "
                f"{len(lora.layers)} layers match no layer here (e.g. {unmatched[0]}); is it for another model?"
            )
        matched = {}
        for name, layer in lora.layers.items():
            module = linears[names[name]]
            expected = (module.out_features, module.in_features)
            found = (layer.up.shape[0], layer.down.shape[1])
            if found != expected:
                raise InvalidSettings(
                    f"LoRA {lora.path}: layer {names[name]} is {expected[0]}x{expected[1]} in this transformer, "
                    f"{found[0]}x{found[1]} in the LoRA; is it for another model?"
                )
            matched[names[name]] = layer
        return matched

    def apply(self, loras: Sequence[tuple[LoraFile, float]]) -> set[str]:
        """Make the weights hold exactly this mix (an empty one: the original weights). Every LoRA is checked
        before anything changes; then the layers of the previous mix are restored and the new mix is fused from
        the originals. Returns the names of the parameters changed."""
        if self.is_applied(loras):
            return set()
        matched = [(self.check(lora), scale) for lora, scale in loras]
        targets = {f"{module}.weight" for layers, _ in matched for module in layers}
        parameters = dict(self.transformer.named_parameters())
        changed = set(self._originals) | targets
        self._applied = ()
        with torch.no_grad():
            self._restore(parameters, keep=targets)
            for name in targets - set(self._originals):
                self._originals[name] = parameters[name].detach().to("cpu", copy=True)
            try:
                self._fuse(matched, parameters)
            except BaseException:
                self._restore(parameters, keep=set())
                raise
        self._applied = tuple(loras)
        logger.info(
            "LoRAs %s: %d weights changed",
            ", ".join(f"{lora.path.name} x{scale:g}" for lora, scale in loras) or "removed",
            len(changed),
        )
        return changed

    def remove(self) -> set[str]:
        """Back to the original weights, bit for bit; the names of the parameters restored."""
        return self.apply(())

    def _restore(self, parameters: dict[str, torch.nn.Parameter], keep: set[str]) -> None:
        """Original values back into every touched parameter; the copies of those in `keep` are kept for the
        next fuse."""
        _remove_peft_layers(self.transformer)
        for name, original in list(self._originals.items()):
            parameters[name].data.copy_(original)
            if name not in keep:
                del self._originals[name]

    def _fuse(self, matched: list[tuple[dict[str, LoraLayer], float]], parameters: dict) -> None:
        """diffusers' PEFT path: load each LoRA as an adapter, weight them, fuse them, then drop the adapters so
        that plain linear layers with fused weights remain."""
        names = [ADAPTER.format(index) for index in range(len(matched))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT notes that target names are suffixes of others; it injects exactly
            for adapter, (layers, _) in zip(names, matched, strict=True):
                state_dict = {}
                for module, layer in layers.items():
                    device = parameters[f"{module}.weight"].device
                    state_dict[f"{module}.lora_A.weight"] = layer.down.to(device)
                    state_dict[f"{module}.lora_B.weight"] = layer.up.to(device)
                self.transformer.load_lora_adapter(
                    state_dict, prefix=None, adapter_name=adapter, low_cpu_mem_usage=True
                )
            if names:
                self.transformer.set_adapters(names, [scale for _, scale in matched])
                self.transformer.fuse_lora(adapter_names=names)
        _remove_peft_layers(self.transformer)


def _identity(loras: Sequence[tuple[LoraFile, float]]) -> list[tuple[str, float]]:
    return [(lora.sha256, float(scale)) for lora, scale in loras]


def _remove_peft_layers(transformer: torch.nn.Module) -> None:
    """Put the base layers back in place of PEFT's wrappers (their weights keep whatever was fused). Not
    `unload_lora()` or `delete_adapters()`: those re-apply group offloading to the whole transformer, which would undo
    the memory plan's own streaming of some blocks."""
    if not getattr(transformer, "_hf_peft_config_loaded", False):
        return
    from diffusers.utils import recurse_remove_peft_layers

    recurse_remove_peft_layers(transformer)
    del transformer.peft_config
    transformer._hf_peft_config_loaded = None
