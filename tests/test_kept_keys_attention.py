"""Masked attention over padded latents and text, sent to the kept keys: same results as the masked kernel, on the
CPU."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_helper.acceleration import kept_keys_attention
from diffusers_helper.acceleration.kept_keys_attention import (
    attention_on_kept_keys,
    kept_keys,
    kept_keys_declared,
    route_masked_attention,
)
from diffusers_helper.acceleration.tensorrt_backend import ATTENTION_OPS, _aten_op, export
from diffusers_helper.tensorrt_runtime import TensorRTTransformer
from tests.support.small_transformer import small_transformer

ROUTED = torch.ops.framepack.attention_on_kept_keys.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default


def qkv(keys: int = 12, queries: int = 12) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, n, 8, generator=generator) for n in (queries, keys, keys))


def additive(row: list[float]) -> torch.Tensor:
    return torch.tensor(row).reshape(1, 1, 1, -1)


def padding(kept: int, total: int = 12) -> torch.Tensor:
    return additive([0.0] * kept + [float("-inf")] * (total - kept))


@pytest.mark.parametrize("kept", [1, 7, 12])
def test_trailing_padding_keeps_the_leading_keys_and_matches_the_masked_kernel(kept):
    query, key, value = qkv()
    mask = padding(kept)
    assert kept_keys(mask) == [(0, kept)]
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(attention_on_kept_keys(query, key, value, mask), expected)


@pytest.mark.parametrize(
    "row, stretches",
    [
        ([0.0] * 5 + [float("-inf")] * 2 + [0.0] * 3 + [float("-inf")] * 2, [(0, 5), (7, 10)]),  # latents, text
        ([0.0] * 5 + [float("-inf")] + [0.0] * 6, [(0, 5), (6, 12)]),  # no text padding
        ([float("-inf")] * 3 + [0.0] * 9, [(3, 12)]),
    ],
    ids=["both-paddings", "latent-padding", "leading"],
)
def test_padding_between_kept_keys_keeps_both_stretches_and_matches_the_masked_kernel(row, stretches):
    query, key, value = qkv()
    mask = additive(row)
    assert kept_keys(mask) == stretches
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(attention_on_kept_keys(query, key, value, mask), expected)


@pytest.mark.parametrize(
    "mask",
    [
        additive([0.0] * 6 + [-1.0] * 6),  # a finite bias hides nothing
        additive([float("-inf")] * 12),  # nothing kept
        torch.zeros(1, 1, 12, 12).masked_fill(torch.ones(12, 12).triu(1).bool(), float("-inf")),  # per query
        torch.ones(1, 1, 1, 12, dtype=torch.bool),
    ],
    ids=["finite-bias", "all-hidden", "per-query", "boolean"],
)
def test_any_other_mask_takes_the_masked_kernel(mask):
    query, key, value = qkv()
    assert kept_keys(mask) is None
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    torch.testing.assert_close(attention_on_kept_keys(query, key, value, mask), expected, equal_nan=True)


def _mask_read(monkeypatch) -> list:
    reads = []
    monkeypatch.setattr(kept_keys_attention, "kept_keys", lambda mask: reads.append(mask) or kept_keys(mask))
    return reads


def test_declared_kept_keys_spare_reading_the_mask_and_only_for_a_mask_of_that_length(monkeypatch):
    query, key, value = qkv()
    mask = additive([float("-inf")] * 3 + [0.0] * 7 + [float("-inf")] * 2)
    reads = _mask_read(monkeypatch)
    expected = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    with kept_keys_declared(12, [(3, 10)]):
        torch.testing.assert_close(attention_on_kept_keys(query, key, value, mask), expected)
        assert reads == []
        other = padding(5, total=9)
        short_query, short_key, short_value = qkv(keys=9)
        attention_on_kept_keys(short_query, short_key, short_value, other)
        assert len(reads) == 1  # another mask's kept keys are read off it
    attention_on_kept_keys(query, key, value, mask)
    assert len(reads) == 2  # the declaration ends with its caller


class _Exporting:
    """A runtime that exports what the wrapper hands it and runs the export, routed attention and all."""

    def __init__(self) -> None:
        self.exported = []

    def register(self, *args) -> None:
        pass

    def run(self, component, module, args, in_pytorch=None, part=None):
        self.exported.append(export(module, args))
        return self.exported[-1].module()(*args)


def test_the_padded_stack_exports_with_every_attention_routed_and_matches_pytorch(monkeypatch):
    """Two latent token counts and two prompt lengths: the same padded inputs for the engine, the unpadded result;
    the stack declares its kept keys, so no attention reads them off the mask."""
    reads = _mask_read(monkeypatch)
    transformer = small_transformer()
    runtime = _Exporting()
    stack = TensorRTTransformer(transformer, runtime, stretch_blocks=3)  # the 3 blocks as one engine
    for frames, text_tokens in ((2, 5), (3, 9)):
        cos, sin = transformer.rope(frame_indices=torch.arange(frames), height=4, width=4, device="cpu")
        hidden, text, temb = torch.randn(1, 4 * frames, 16), torch.randn(1, text_tokens, 16), torch.randn(1, 16)
        with torch.no_grad():
            expected = stack.stack(hidden, text, temb, cos, sin)
            output = stack(hidden, text, temb, None, (cos, sin))
        for got, want in zip(output, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    first, second = ([node.meta["val"].shape for node in exported.graph.nodes if node.op == "placeholder"]
                     for exported in runtime.exported)  # fmt: skip
    assert first == second  # one engine would serve both
    targets = [node.target for node in runtime.exported[0].graph.nodes if node.op == "call_function"]
    assert targets.count(ROUTED) == 3 and SDPA not in targets  # one attention per block, none left masked
    assert reads == []


class _Attention(torch.nn.Module):
    def forward(self, query, key, value, mask):
        return (
            F.scaled_dot_product_attention(query, key, value),
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=False),
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.5),
            F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.1),
        )


def test_only_plain_masked_attention_is_routed():
    exported = torch.export.export(_Attention().eval(), (*qkv(), padding(9)), strict=False)
    assert route_masked_attention(exported) == 1
    targets = [node.target for node in exported.graph.nodes if node.op == "call_function"]
    assert targets.count(ROUTED) == 1 and targets.count(SDPA) == 3


def test_the_routed_op_stays_in_pytorch_when_tensorrt_compiles():
    assert ROUTED in {_aten_op(name) for name in ATTENTION_OPS}
