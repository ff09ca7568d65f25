"""Attention whose key mask only hides trailing keys runs PyTorch's unmasked kernel on the keys it keeps.

An engine that serves every prompt takes its text padded to a fixed length, with an additive key mask (-inf on the
padding). A mask makes PyTorch's attention leave its fastest kernels: one full-size block's attention at 18,976
tokens took 11.43 ms masked against 7.17 ms unmasked on an H200 (docs/benchmarks.md), more than TensorRT gains on
the GEMMs. Attention runs in PyTorch between the engines, so `route_masked_attention` rewrites each masked attention
of an exported program into `attention_on_kept_keys`, which reads how many keys the mask keeps (one device sync)
and attends to those only, unmasked. Any other mask takes the masked kernel: the result is the same either way.
"""

import torch
import torch.nn.functional as F

OP_NAME = "framepack::attention_on_kept_keys"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_DEFAULTS = {"dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention_on_kept_keys(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """`scaled_dot_product_attention(query, key, value, attn_mask)`, unmasked over the kept keys when the mask is one
    row of zeros followed by -inf for every query."""
    kept = kept_keys(attn_mask)
    if kept is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    return F.scaled_dot_product_attention(query, key[..., :kept, :], value[..., :kept, :])


@attention_on_kept_keys.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def kept_keys(attn_mask: torch.Tensor) -> int | None:
    """How many leading keys an additive mask keeps when it is zeros then -inf, the same for every query; else None."""
    if attn_mask.dtype == torch.bool or attn_mask.numel() != attn_mask.shape[-1]:
        return None
    row = attn_mask.reshape(-1)
    kept = row == 0
    count, leading, rest_hidden = torch.stack(
        [kept.sum(), kept.long().cumprod(0).sum(), (kept | torch.isneginf(row)).all().long()]
    ).tolist()
    return count if count == leading and rest_hidden and count > 0 else None


def route_masked_attention(exported: torch.export.ExportedProgram) -> int:
    """Send every masked, non-causal, dropout-free attention of `exported` through `attention_on_kept_keys`, in place;
    returns how many were sent."""
    routed = 0
    for node in exported.graph.nodes:
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        query, key, value, *rest = node.args
        options = dict(zip(("attn_mask", *_SDPA_DEFAULTS), rest, strict=False)) | dict(node.kwargs)
        mask = options.pop("attn_mask", None)
        if mask is None or any(options.get(name, default) != default for name, default in _SDPA_DEFAULTS.items()):
            continue
        node.target = torch.ops.framepack.attention_on_kept_keys.default
        node.args, node.kwargs = (query, key, value, mask), {}
        routed += 1
    exported.graph_module.recompile()
    return routed
