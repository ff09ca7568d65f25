"""What a block of FramePack's transformer is: the one list that streaming, the step caches, torch.compile, FP8 and
the TensorRT stack all walk."""

import torch

# The transformer's attributes that hold its blocks, in the order it runs them: 20 dual-stream, then 40 single-stream.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of the transformer, in the order a forward pass runs them."""
    return [block for name in BLOCK_LISTS for block in getattr(transformer, name)]
