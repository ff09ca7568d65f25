"""TeaCache for the FramePack transformer, as diffusers hooks on its transformer blocks.

When the first block's modulated input has changed little since the last computed step (relative L1,
rescaled by a polynomial fitted for HunyuanVideo, accumulated), all blocks are skipped and the residual they
added last time is reused. First and last steps are always computed. State is kept per cache context
("cond"/"uncond"), so real CFG's two passes each have their own; the sampler opens the context with the step
index and step count, and resets the state every section. `apply_teacache` installs the hooks once, outside any
streaming hooks (models/assembly.py decides the order), so a skipped block is never loaded; `threshold` switches them
per job. The hooks themselves are shared with MagCache (block_stack.py).
"""

import numpy as np
import torch
from diffusers.hooks.hooks import CacheContext

from .block_stack import StackState, StepCache, edge_step, install

HOOK_NAME = "teacache"
# HunyuanVideo's rescaling of the raw relative L1 distance (TeaCache's published fit).
RESCALE = np.poly1d([7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02])


class TeaCacheState(StackState):
    def __init__(self) -> None:
        super().__init__()
        self.previous_modulated: torch.Tensor | None = None
        self.accumulated = 0.0


class TeaCache(StepCache):
    """TeaCache's state and switch, shared by its hooks; active while `threshold` is set. Counts computed and
    skipped passes."""

    state_class = TeaCacheState

    def reset(self, threshold: float | None) -> None:
        """Forget cached residuals (a new section starts from fresh noise) and set the threshold (None: off)."""
        self.state.reset()
        self.threshold = threshold

    def should_compute(
        self, state: TeaCacheState, context: CacheContext, head: torch.nn.Module, hidden_states: torch.Tensor, temb
    ) -> bool:
        modulated = head.norm1(hidden_states, emb=temb)[0]
        previous, state.previous_modulated = state.previous_modulated, modulated
        if edge_step(context) or previous is None or state.residual is None:
            state.accumulated = 0.0
            return True
        change = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
        state.accumulated += float(RESCALE(change))
        if state.accumulated >= self.threshold:
            state.accumulated = 0.0
            return True
        return False


def modules_read(transformer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """What TeaCache runs itself to decide (the first block's modulation): it must stay where the inputs are."""
    return (transformer.transformer_blocks[0].norm1,)


def apply_teacache(transformer: torch.nn.Module) -> TeaCache:
    """Install TeaCache's hooks on the transformer's blocks, switched off until `reset` sets a threshold."""
    cache = TeaCache()
    install(transformer, cache, HOOK_NAME)
    return cache
