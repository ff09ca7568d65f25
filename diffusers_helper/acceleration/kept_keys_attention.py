"""Attention whose key mask only hides padding runs PyTorch's unmasked kernel on the keys it keeps.

An engine that serves every prompt and every bucket of a resolution takes its latent tokens and its text padded to
fixed lengths, with an additive key mask (-inf on both paddings). A mask makes PyTorch's attention leave its fastest
kernels: one full-size block's attention at 18,976 tokens took 11.43 ms masked against 7.17 ms unmasked on an H200
(docs/benchmarks.md), more than TensorRT gains on the GEMMs. Attention runs in PyTorch between the engines, so
`route_masked_attention` rewrites each masked attention of an exported program into `attention_on_kept_keys`, which
attends to the keys the mask keeps only, unmasked: a slice when they are one stretch, the stretches joined otherwise.
Which keys are kept is read off the mask (a device sync, at every attention) unless the code that built the mask
declared them (`kept_keys_declared`), as the transformer's stack does for its 60 attention calls. Any other mask
takes the masked kernel: the result is the same either way.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

OP_NAME = "framepack::attention_on_kept_keys"
_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_DEFAULTS = {"dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
# (keys in the mask, the stretches it keeps), for as long as the code that built that mask runs
_DECLARED: contextvars.ContextVar[tuple[int, list[tuple[int, int]]] | None] = contextvars.ContextVar(
    "kept_keys_declared", default=None
)


@contextlib.contextmanager
def kept_keys_declared(keys: int, stretches: list[tuple[int, int]]) -> Iterator[None]:
    """While the caller that built a padding mask of `keys` keys runs, attention under a mask of that many keys takes
    its kept stretches from here: the host already knows them, and reading them off the mask stops the GPU's queue at
    every attention call."""
    token = _DECLARED.set((keys, stretches))
    try:
        yield
    finally:
        _DECLARED.reset(token)


@torch.library.custom_op(OP_NAME, mutates_args=())
def attention_on_kept_keys(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """`scaled_dot_product_attention(query, key, value, attn_mask)`, unmasked over the kept keys when the mask is one
    row of zeros and -inf for every query."""
    declared = _DECLARED.get()
    if declared is not None and declared[0] == attn_mask.shape[-1] == attn_mask.numel():
        kept = declared[1]
    else:
        kept = kept_keys(attn_mask)
    if kept is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    if len(kept) == 1:
        ((start, stop),) = kept
        return F.scaled_dot_product_attention(query, key[..., start:stop, :], value[..., start:stop, :])
    key, value = (torch.cat([t[..., start:stop, :] for start, stop in kept], dim=-2) for t in (key, value))
    return F.scaled_dot_product_attention(query, key, value)


@attention_on_kept_keys.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def kept_keys(attn_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """The stretches of keys (start, stop) an additive mask keeps when it is zeros and -inf only, the same for every
    query; else None."""
    if attn_mask.dtype == torch.bool or attn_mask.numel() != attn_mask.shape[-1]:
        return None
    row = attn_mask.reshape(-1).cpu()  # the one device sync
    kept = row == 0
    if not kept.any() or not (kept | torch.isneginf(row)).all():
        return None
    edges = torch.diff(torch.nn.functional.pad(kept.to(torch.int8), (1, 1))).nonzero().flatten().tolist()
    return list(zip(edges[::2], edges[1::2], strict=True))


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
