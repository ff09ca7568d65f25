"""Context parallelism of FramePack's transformer: one pass's tokens split over the ranks of a process group, through
diffusers' own machinery (`ContextParallelConfig`, `enable_parallelism`) with a plan of this product's, since
diffusers has none for this model.

Where the sequence splits, and where it joins again:
- at the first dual block's inputs, after the transformer has packed the clean history (1x, 2x and 4x) in front of
  the noisy latents and joined the image embeddings to the text: every rank embeds the whole input (a small share of
  a step), then keeps one contiguous stretch of the packed latent tokens and one of the text;
- the rotary embedding of the packed tokens reaches every block whole (the forward computes it once), so every block
  keeps the stretch that matches its latent tokens;
- attention is Ulysses over the heads (an all-to-all: each rank attends over every token for its share of the heads;
  shards of uneven length are allowed). A joint attention over latents and text does not depend on the order in
  which the shards arrive, since no mask applies to a batch of one;
- the last single block's latent output is gathered, before the forward keeps the noisy tokens and runs the output
  head on every rank, which therefore all return the whole output.
Its hooks sit on the blocks inside the step caches' (models/assembly.py installs them before the caches), so a cache
sees whole tensors, and a skipped pass, which calls no block, splits and gathers nothing.
"""

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry
from diffusers.hooks.context_parallel import ContextParallelGatherHook
from diffusers.models._modeling_parallel import ContextParallelConfig, ContextParallelInput, ContextParallelOutput

from ..models.transformer_blocks import BLOCK_LISTS, transformer_blocks
from ..settings import InvalidSettings

GATHER_HOOK = "context_parallel_gather"
# What each kind of block calls its rotary embedding argument (diffusers' HunyuanVideo blocks)
ROTARY_ARGUMENT = {"transformer_blocks": "freqs_cis", "single_transformer_blocks": "image_rotary_emb"}


def _tokens(split_dim: int) -> ContextParallelInput:
    return ContextParallelInput(split_dim=split_dim, expected_dims=3 if split_dim == 1 else 2, split_output=False)


def split_plan(transformer: torch.nn.Module) -> dict[str, dict]:
    """Each block's inputs to split: the first block's latents, text and rotary embedding; the others' rotary
    embedding only (their latents and text arrive split from the block before)."""
    rotary = [_tokens(0), _tokens(0)]  # (cos, sin), one row a latent token
    plan = {
        f"{blocks}.{index}": {ROTARY_ARGUMENT[blocks]: rotary}
        for blocks in BLOCK_LISTS
        for index in range(len(getattr(transformer, blocks)))
    }
    first = f"{BLOCK_LISTS[0]}.0"
    plan[first] = {"hidden_states": _tokens(1), "encoder_hidden_states": _tokens(1), **plan[first]}
    return plan


def gather_latents(transformer: torch.nn.Module, config: ContextParallelConfig) -> None:
    """Join the last block's latent output along the tokens on every rank. Its text output stays split: nothing reads
    it, and shards of uneven length gather only where the process group can (NCCL can, gloo cannot)."""
    hook = ContextParallelGatherHook([ContextParallelOutput(gather_dim=1, expected_dims=3), None], config)
    HookRegistry.check_if_exists_or_initialize(transformer_blocks(transformer)[-1]).register_hook(hook, GATHER_HOOK)


def enable_context_parallel(transformer: torch.nn.Module, ranks: int) -> None:
    """Split the transformer's passes over `ranks` processes of the default process group (already initialized, one
    process per device), Ulysses over the attention heads."""
    started = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if started != ranks:
        raise InvalidSettings(f"--gpus {ranks} needs {ranks} processes, one per GPU, and {started} started: run it "
                              f"with torchrun --nproc-per-node {ranks}")  # fmt: skip
    heads = transformer.config.num_attention_heads
    if heads % ranks:
        raise InvalidSettings(f"the transformer's {heads} attention heads do not divide over {ranks} GPUs")
    config = ContextParallelConfig(ulysses_degree=ranks, ulysses_anything=True)
    transformer.enable_parallelism(config=config, cp_plan=split_plan(transformer))
    gather_latents(transformer, transformer._parallel_config.context_parallel_config)


def first_rank_decides(decision: bool) -> bool:
    """The first rank's decision, on every rank: a step cache that skipped a pass on one rank and not on another would
    leave the other waiting in an all-to-all for ever."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([decision], dtype=torch.uint8, device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())
