"""What the step caches share: diffusers hooks that skip the transformer's whole block stack for a pass.

A cache decides on the first dual block (the head) whether a pass computes. When it does not, the head returns its
input plus the residual the stack added at the last computed pass, and every other block hands its inputs on without
being called, so a skipped pass runs (and streams) no block; on a computed pass the last block records the stack's
residual. With the TensorRT stack installed inside (the head runs the compiled stack, the others pass through), the
same hooks wrap the engine. State is kept per cache context ("cond"/"uncond"): the head hook holds the cache's
StateManager, which diffusers' `cache_context()` points at the pass's context.
"""

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager

from ..models.transformer_blocks import transformer_blocks


class StackState(BaseState):
    """One context's pass: whether it skips, the stack's input while it computes, and the last residual."""

    def __init__(self) -> None:
        self.skip = False
        self.stack_input: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None

    def reset(self) -> None:
        self.__init__()


class StepCache(ABC):
    """A step cache's switch, per-context state and counts; active while `threshold` is set."""

    state_class: type[StackState] = StackState

    def __init__(self) -> None:
        self.threshold: float | None = None
        self.state = StateManager(self.state_class)
        self.computed = 0
        self.skipped = 0
        # Where several processes run one pass together, the one decision they all follow (first rank's).
        self.agree: Callable[[bool], bool] = lambda decision: decision

    @abstractmethod
    def should_compute(
        self, state: StackState, context: CacheContext, head: torch.nn.Module, hidden_states: torch.Tensor, temb
    ) -> bool:
        """Whether this pass runs the blocks; called on the head with the head's inputs, only while active."""


def edge_step(context: CacheContext) -> bool:
    """The first and last steps of a section are always computed."""
    return context.step_index in (0, context.num_inference_steps - 1)


class _HeadHook(ModelHook):
    _is_stateful = True

    def __init__(self, cache: StepCache) -> None:
        super().__init__()
        self.cache = cache
        self.state = cache.state  # diffusers' cache_context() sets the context on StateManager attributes

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        cache = self.cache
        if cache.threshold is None:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        state = cache.state.get_state()
        state.skip = not cache.agree(cache.should_compute(state, cache.state.context, module, hidden_states, temb))
        if state.skip:
            cache.skipped += 1
            return hidden_states + state.residual, encoder_hidden_states
        cache.computed += 1
        state.stack_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)


class _BlockHook(ModelHook):
    def __init__(self, cache: StepCache, is_tail: bool) -> None:
        super().__init__()
        self.cache = cache
        self.is_tail = is_tail

    def new_forward(self, module: torch.nn.Module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.cache.threshold is None:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        state = self.cache.state.get_state()
        if state.skip:
            return hidden_states, encoder_hidden_states
        output = self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.is_tail:
            state.residual = output[0] - state.stack_input
            state.stack_input = None
        return output


def install(transformer: torch.nn.Module, cache: StepCache, name: str) -> None:
    """Register the cache's hooks (`<name>_head`, `<name>_block`) outside those already on the blocks."""
    head, *rest = transformer_blocks(transformer)
    HookRegistry.check_if_exists_or_initialize(head).register_hook(_HeadHook(cache), f"{name}_head")
    for index, block in enumerate(rest):
        hook = _BlockHook(cache, is_tail=index == len(rest) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, f"{name}_block")
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
