"""TeaCache for the FramePack transformer, as diffusers hooks on its transformer blocks.

When the first block's modulated input has changed little since the last computed step (relative L1,
rescaled by a polynomial fitted for HunyuanVideo, accumulated), all blocks are skipped and the residual they
added last time is reused. First and last steps are always computed. State is kept per cache context
("cond"/"uncond"), so real CFG's two passes each have their own; the sampler opens the context with the step
index and step count, and resets the state every section. `apply_teacache` installs the hooks once, outside any
streaming hooks (models/assembly.py decides the order), so a skipped block is never loaded; `threshold` switches them
per job.
"""

import numpy as np
import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

HEAD_HOOK = "teacache_head"
BLOCK_HOOK = "teacache_block"
# HunyuanVideo's rescaling of the raw relative L1 distance (TeaCache's published fit).
RESCALE = np.poly1d([7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02])


class TeaCacheState(BaseState):
    def __init__(self) -> None:
        self.previous_modulated: torch.Tensor | None = None
        self.accumulated = 0.0
        self.skip = False
        self.stack_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__()


class _HeadHook(ModelHook):
    """On the first dual block: decide for the whole stack, and short-cut it when skipping."""

    _is_stateful = True

    def __init__(self, cache: "TeaCache") -> None:
        super().__init__()
        self.cache = cache
        self.state = cache.state  # diffusers' cache_context() sets the context on StateManager attributes

    def _should_compute(self, state: TeaCacheState, modulated: torch.Tensor) -> bool:
        context = self.state.context
        edge_step = context.step_index in (0, context.num_inference_steps - 1)
        if edge_step or state.previous_modulated is None or state.residual is None:
            state.accumulated = 0.0
            return True
        previous = state.previous_modulated
        change = ((modulated - previous).abs().mean() / previous.abs().mean()).item()
        state.accumulated += float(RESCALE(change))
        if state.accumulated >= self.cache.threshold:
            state.accumulated = 0.0
            return True
        return False

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        if self.cache.threshold is None:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        state: TeaCacheState = self.cache.state.get_state()
        modulated = module.norm1(hidden_states, emb=temb)[0]
        state.skip = not self._should_compute(state, modulated)
        state.previous_modulated = modulated
        if state.skip:
            self.cache.skipped += 1
            return hidden_states + state.residual, encoder_hidden_states
        self.cache.computed += 1
        state.stack_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)


class _BlockHook(ModelHook):
    """On every other block: pass through when skipping; the last block records the stack's residual."""

    def __init__(self, cache: "TeaCache", is_tail: bool) -> None:
        super().__init__()
        self.cache = cache
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.cache.threshold is None:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        state: TeaCacheState = self.cache.state.get_state()
        if state.skip:
            return hidden_states, encoder_hidden_states
        output = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.is_tail:
            state.residual = output[0] - state.stack_input
            state.stack_input = None
        return output


class TeaCache:
    """TeaCache's state and switch, shared by its hooks; active while `threshold` is set. Counts computed and
    skipped passes."""

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.state = StateManager(TeaCacheState)
        self.computed = 0
        self.skipped = 0

    def reset(self, threshold: float | None) -> None:
        """Forget cached residuals (a new section starts from fresh noise) and set the threshold (None: off)."""
        self.state.reset()
        self.threshold = threshold


def modules_read(transformer: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
    """What TeaCache runs itself to decide (the first block's modulation): it must stay where the inputs are."""
    return (transformer.transformer_blocks[0].norm1,)


def apply_teacache(transformer: torch.nn.Module) -> TeaCache:
    """Install TeaCache's hooks on the transformer's blocks, switched off until `reset` sets a threshold."""
    cache = TeaCache()
    head, *rest = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    HookRegistry.check_if_exists_or_initialize(head).register_hook(_HeadHook(cache), HEAD_HOOK)
    for index, block in enumerate(rest):
        hook = _BlockHook(cache, is_tail=index == len(rest) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, BLOCK_HOOK)
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return cache
