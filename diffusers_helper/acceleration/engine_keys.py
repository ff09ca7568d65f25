"""What makes an engine what it is: the ingredients of its cache key, and the fingerprints that go into them.

An engine is found by a hash of everything that decides what it computes and where it runs: the component, its
inputs' shapes and dtypes, the code that was exported, the weights (unless the engine is refitted to whatever weights
the model has), the compile settings, the GPU and the library versions. Torch-TensorRT's own cache key leaves out the
weights, the GPU and TensorRT's version, so a stale engine would load: this key does not.
"""

import functools
import hashlib
import inspect
import json
import weakref
from dataclasses import dataclass

import diffusers
import torch
import transformers


def cache_key(ingredients: dict) -> str:
    """A stable name for the ingredients (sorted, compact JSON, hashed)."""
    canonical = json.dumps(ingredients, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def gpu_identity(device: torch.device) -> dict:
    """Which GPU a measurement or an engine belongs to: its name and compute capability (for the CPU, its name)."""
    if device.type != "cuda":
        return {"gpu": str(device), "compute_capability": None}
    properties = torch.cuda.get_device_properties(device)
    return {"gpu": properties.name, "compute_capability": f"{properties.major}.{properties.minor}"}


def input_signature(args: tuple) -> list:
    """Each input's shape and dtype, as JSON holds them."""
    return [[list(a.shape), str(a.dtype).removeprefix("torch.")] for a in args]


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A cheap hash of names, shapes, dtypes and a strided sample of every tensor: other weights, other key."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)][:1024].float()
            digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


def code_fingerprint(module: torch.nn.Module) -> str:
    """A hash of the source of every class in the module tree (and of their attention processors): an edit of the
    code that gets exported makes another engine. Library upgrades are caught by their versions in the key."""
    classes = set()
    for child in module.modules():
        classes.add(type(child))
        if getattr(child, "processor", None) is not None:
            classes.add(type(child.processor))
    digest = hashlib.sha256()
    for cls in sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}"):
        digest.update(_class_source_digest(cls).encode())
    return digest.hexdigest()[:24]


@functools.cache
def _class_source_digest(cls: type) -> str:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # compiled or generated classes: their name is what is known
        source = ""
    return f"{cls.__module__}.{cls.__qualname__}:{hashlib.sha256(source.encode()).hexdigest()}"


def weight_state(module: torch.nn.Module) -> tuple:
    """Which tensors hold the weights, how often each was changed in place, and a strided sum of each: an edit made
    through `.data` (as LoRA fusing does) bumps no version counter, so the values are looked at too. Cheap where an
    engine holds the weights: PyTorch's copy is then in host memory."""
    with torch.no_grad():
        return tuple(
            (t.data_ptr(), t._version, float(t.reshape(-1)[:: max(1, t.numel() // 64)].float().sum()))
            for t in [*module.parameters(), *module.buffers()]
        )


@dataclass(frozen=True)
class EngineKey:
    """An engine's cache key, what it was made of, and the weights' fingerprint (which a refittable engine's key
    leaves out: its record says which weights it holds)."""

    key: str
    ingredients: dict
    weights: str


class EngineKeys:
    """Keys for (component, module, inputs). A module's fingerprints are computed once, held as long as the module
    lives, and dropped when its weights change (`forget`)."""

    def __init__(self) -> None:
        self._fingerprints: weakref.WeakKeyDictionary[torch.nn.Module, dict] = weakref.WeakKeyDictionary()

    def key(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        settings: dict,
        versions: dict,
        refittable: bool,
        part: str | None = None,
    ) -> EngineKey:
        """`part` names which of a component's modules this is, where it runs as several: modules of the same code
        and inputs, such as two stretches of blocks, are other engines."""
        if module not in self._fingerprints:
            self._fingerprints[module] = {"weights": weights_fingerprint(module), "code": code_fingerprint(module)}
        fingerprints = self._fingerprints[module]
        ingredients = {
            "component": component,
            **({} if part is None else {"part": part}),
            "inputs": input_signature(args),
            "code": fingerprints["code"],
            **({} if refittable else {"weights": fingerprints["weights"]}),
            "settings": settings,
            **gpu_identity(args[0].device),
            "versions": {**versions, "diffusers": diffusers.__version__, "transformers": transformers.__version__},
        }
        return EngineKey(cache_key(ingredients), ingredients, fingerprints["weights"])

    def forget(self, module: torch.nn.Module) -> None:
        self._fingerprints.pop(module, None)
