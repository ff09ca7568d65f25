"""What an engine is keyed by: every ingredient changes the key, the runtime's keys follow shapes, dtypes, weights,
code and versions, and the GPU is named one way everywhere."""

import pytest
import torch

from diffusers_helper.acceleration.engine_keys import (
    EngineKeys,
    cache_key,
    gpu_identity,
    weight_state,
    weights_fingerprint,
)
from tests.support.runtimes import WEIGHT_EDITS, edit_weights
from tests.support.tensorrt_worker import seeded_mlp

BASE = {"component": "transformer", "inputs": [[[1, 4400, 3072], "bfloat16"]], "weights": "abc", "settings": {"a": 1},
        "gpu": "NVIDIA H200", "compute_capability": "9.0", "versions": {"torch": "2.11", "torch_tensorrt": "2.11", "tensorrt": "1.4"}}  # fmt: skip
VERSIONS = {"torch": "2.11", "torch_tensorrt": "fake-1", "build": "fake", "tensorrt": "0"}


@pytest.mark.parametrize(
    "change",
    [
        {"component": "vae_decoder"},
        {"inputs": [[[1, 4400, 3072], "float16"]]},
        {"inputs": [[[1, 4401, 3072], "bfloat16"]]},
        {"weights": "abd"},
        {"settings": {"a": 2}},
        {"gpu": "NVIDIA GeForce RTX 4090"},
        {"compute_capability": "8.9"},
        {"versions": {"torch": "2.12", "torch_tensorrt": "2.11", "tensorrt": "1.4"}},
        {"versions": {"torch": "2.11", "torch_tensorrt": "2.12", "tensorrt": "1.4"}},
        {"versions": {"torch": "2.11", "torch_tensorrt": "2.11", "tensorrt": "1.5"}},
    ],
)
def test_every_ingredient_changes_the_key(change):
    assert cache_key({**BASE, **change}) != cache_key(BASE)
    assert cache_key(dict(reversed(list(BASE.items())))) == cache_key(BASE)  # order does not matter


def key(keys: EngineKeys, module, args, versions=VERSIONS, refittable=False) -> str:
    return keys.key("vae_decoder", module, args, {"min_block_size": 1}, versions, refittable).key


def test_keys_follow_shapes_dtypes_weights_and_versions():
    keys, module = EngineKeys(), seeded_mlp()
    first = key(keys, module, (torch.ones(2, 8),))
    assert key(keys, module, (torch.ones(3, 8),)) != first
    assert key(keys, module, (torch.ones(2, 8, dtype=torch.float64),)) != first
    assert key(keys, module, (torch.ones(2, 8),), {**VERSIONS, "torch_tensorrt": "fake-2"}) != first
    other = seeded_mlp()
    with torch.no_grad():
        other[0].weight.add_(0.01)
    assert weights_fingerprint(other) != weights_fingerprint(seeded_mlp())
    assert key(keys, other, (torch.ones(2, 8),)) != first


def test_a_refittable_engine_is_keyed_without_its_weights_but_still_told_them():
    keys, module, other = EngineKeys(), seeded_mlp(), seeded_mlp()
    with torch.no_grad():
        other[0].weight.add_(0.01)
    args = (torch.ones(2, 8),)
    mine, theirs = (keys.key("transformer", m, args, {}, VERSIONS, refittable=True) for m in (module, other))
    assert mine.key == theirs.key and "weights" not in mine.ingredients
    assert mine.weights != theirs.weights


def test_parts_of_one_component_are_other_engines_even_with_the_same_code_and_inputs():
    """Two stretches of the transformer's blocks: same classes, same shapes, refitted to any weights; only the part
    tells their engines apart."""
    keys, first, second = EngineKeys(), seeded_mlp(), seeded_mlp()
    args = (torch.ones(2, 8),)
    a, b = (keys.key("transformer", m, args, {}, VERSIONS, True, part) for m, part in
            ((first, "blocks 0-4"), (second, "blocks 5-9")))  # fmt: skip
    assert a.key != b.key and (a.ingredients["part"], b.ingredients["part"]) == ("blocks 0-4", "blocks 5-9")


class Doubling(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * self.scale * 2


class Tripling(Doubling):
    def forward(self, x):
        return x * self.scale * 3


def test_the_code_that_is_exported_and_the_library_versions_are_in_the_key():
    keys, args = EngineKeys(), (torch.ones(2, 8),)
    doubling = keys.key("vae_decoder", Doubling(), args, {}, VERSIONS, False)
    assert doubling.key != key(keys, Tripling(), args)  # same weights, other code
    assert {"diffusers", "transformers", "torch", "torch_tensorrt"} <= set(doubling.ingredients["versions"])


def test_a_forgotten_module_is_fingerprinted_again():
    """The fingerprints are computed once per module; after `forget` (its weights changed) they are taken anew."""
    keys, module, args = EngineKeys(), seeded_mlp(), (torch.ones(2, 8),)
    before = key(keys, module, args)
    with torch.no_grad():
        module[0].weight.add_(1.0)
    assert key(keys, module, args) == before  # remembered: not hashed again on every call
    keys.forget(module)
    assert key(keys, module, args) != before


@pytest.mark.parametrize("edit", WEIGHT_EDITS)
def test_the_weight_state_sees_every_kind_of_edit(edit):
    module = seeded_mlp()
    before = weight_state(module)
    edit_weights(module, edit)
    assert weight_state(module) != before


def test_the_cpu_is_named_as_a_gpu_is():
    assert gpu_identity(torch.device("cpu")) == {"gpu": "cpu", "compute_capability": None}
