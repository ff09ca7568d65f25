"""Drop-in modules that route FramePack's models through the TensorRT runtime.

Each has the call signature of what it replaces: `TensorRTLatentEncoder` / `TensorRTLatentDecoder` the VAE's
`encoder` / `decoder`, `TensorRTTextEncoder` the LLaMA text encoder, `TensorRTCLIPTextEncoder` the CLIP one, and
`TensorRTTransformer` the transformer's stack of dual- and single-stream blocks (installed with diffusers hooks,
so embedders, rope and history packing stay in PyTorch and cache hooks like TeaCache still wrap the stack). The
stack runs as stretches of a few blocks, each an engine of its own: a build holds one stretch's graph at a time, and
PyTorch's copy of a stretch's weights leaves the GPU as soon as its engine serves, so a build needs little more than
the weights themselves, and a build that was stopped resumes from the stretches already in the cache. The
stack's text and latent tokens are padded to fixed lengths and masked out of attention (which runs in PyTorch's
fused kernels, on the kept keys: `kept_keys_attention`), so every prompt, real CFG's negative prompt and the buckets
of a resolution run on few engines. Where the stack runs in PyTorch instead (the engine was no faster, or TensorRT
fell back), latents and prompt go in unpadded and each block can go through torch.compile's compiled forward
(`CompiledBlocks`).

The wrappers know the runtime only as an `EngineRunner` (register a component, run a call), and where PyTorch's copy of
a model's weights waits while an engine holds them only as a `WeightParking` the memory policy hands them
(models/placement.py): neither the wrappers nor the runtime move weights themselves.
"""

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling

from ..models.transformer_blocks import transformer_blocks
from .kept_keys_attention import kept_keys_declared

if TYPE_CHECKING:
    from .compiled_blocks import CompiledBlocks

TEXT_LENGTH_BUCKET = 64  # LLaMA token counts are padded up to a multiple of this: one engine serves many prompts
# The stack's text tokens (image embeddings and prompt: 729 + at most 256 for FramePack) are padded up to a multiple
# of this, so one engine serves every prompt. (Torch-TensorRT 2.11 / TensorRT-RTX 1.4 cannot build the stack with
# the text length as a dynamic dimension: docs/benchmarks.md.)
STACK_TEXT_BUCKET = 1024
# Its latent tokens are padded up to a multiple of this, so buckets of one resolution share engines: the 14 buckets
# at 640 (17,226 to 17,970 tokens with the default window) need 2 sets of engines instead of 14, at most 5.3% of the
# tokens padding (the full-size stack's engines for one shape take 24 GB of files and over ten minutes to build).
STACK_LATENT_BUCKET = 1024
# Blocks per engine of the stack: a build holds about twice a stretch's weights (the builder's copy and the engine),
# beside the resident weights; two full-size dual-stream blocks are 1.4 GB.
STRETCH_BLOCKS = 2
STACK_HOOK = "tensorrt_block_stack"
SKIP_HOOK = "tensorrt_block_skip"


class WeightParking(Protocol):
    """Where PyTorch's copy of a module's weights goes while an engine holds them on the GPU (the memory policy's)."""

    def park(self, module: torch.nn.Module) -> bool:
        """The engine holds the weights: PyTorch's copy may leave the GPU; True when it did."""

    def bring_back(self, module: torch.nn.Module) -> bool:
        """PyTorch runs the module: its weights back where it runs, if they were parked; True when they moved."""

    def is_parked(self, module: torch.nn.Module) -> bool:
        """Whether PyTorch's copy of the module's weights waits in the parking."""


class EngineRunner(Protocol):
    """What a wrapper needs of the TensorRT runtime."""

    def register(self, component: str, pytorch: str = "eager", parking: WeightParking | None = None) -> None:
        """Announce a component, how it runs in PyTorch, and where its PyTorch weights wait while engines serve."""

    def run(
        self,
        component: str,
        module: torch.nn.Module,
        args: tuple,
        in_pytorch: Callable[[], object] | None = None,
        part: str | None = None,
    ) -> object:
        """`module(*args)` through the component's engine for these inputs, or in PyTorch where none can serve;
        `part` names which of a component's modules this is, where it has several (a stretch of blocks)."""


class TensorRTLatentEncoder(torch.nn.Module):
    """Drop-in for the VAE's `encoder`: pixels (B, 3, T, H, W) -> latent moments; one engine per input shape."""

    component = "vae_encoder"

    def __init__(self, encoder: torch.nn.Module, runtime: EngineRunner, parking: WeightParking | None = None) -> None:
        super().__init__()
        self.module = encoder
        self.runtime = runtime
        runtime.register(self.component, parking=parking)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.runtime.run(self.component, self.module, (hidden_states,))


class TensorRTLatentDecoder(TensorRTLatentEncoder):
    """Drop-in for the VAE's `decoder`: latents (B, 16, T, h, w) -> pixels; one engine per latent shape."""

    component = "vae_decoder"


class _HiddenStates(torch.nn.Module):
    """LLaMA with every hidden state stacked into one tensor: what the export sees."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return torch.stack(
            self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        )


class TensorRTTextEncoder(torch.nn.Module):
    """Drop-in for the LLaMA text encoder as the prompt encoder calls it (ids and mask in, hidden states out).

    Token counts are padded to a multiple of TEXT_LENGTH_BUCKET (masked, after the prompt, so the causal model
    gives the real tokens the same states) and the output cropped back.
    """

    component = "text_encoder"

    def __init__(self, model: torch.nn.Module, runtime: EngineRunner, parking: WeightParking | None = None) -> None:
        super().__init__()
        self.hidden_states = _HiddenStates(model)  # the one registered copy of the model
        self.runtime = runtime
        runtime.register(self.component, parking=parking)

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden_states.model.dtype

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> BaseModelOutputWithPast:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        length = input_ids.shape[1]
        padding = -length % TEXT_LENGTH_BUCKET
        padded_ids = torch.nn.functional.pad(
            input_ids, (0, padding), value=self.hidden_states.model.config.pad_token_id or 0
        )
        padded_mask = torch.nn.functional.pad(attention_mask, (0, padding), value=0)
        stacked = self.runtime.run(self.component, self.hidden_states, (padded_ids, padded_mask))[:, :, :length]
        return BaseModelOutputWithPast(last_hidden_state=stacked[-1], hidden_states=tuple(stacked))


class _Pooled(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = self.model(input_ids=input_ids)
        return output.last_hidden_state, output.pooler_output


class TensorRTCLIPTextEncoder(torch.nn.Module):
    """Drop-in for the CLIP text encoder: ids (always 77 of them) in, last hidden state and pooled output out."""

    component = "text_encoder_2"

    def __init__(self, model: torch.nn.Module, runtime: EngineRunner, parking: WeightParking | None = None) -> None:
        super().__init__()
        self.pooled = _Pooled(model)  # the one registered copy of the model
        self.runtime = runtime
        runtime.register(self.component, parking=parking)

    @property
    def dtype(self) -> torch.dtype:
        return self.pooled.model.dtype

    def forward(self, input_ids: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        last_hidden_state, pooled = self.runtime.run(self.component, self.pooled, (input_ids,))
        return BaseModelOutputWithPooling(last_hidden_state=last_hidden_state, pooler_output=pooled)


class _BlockStack(torch.nn.Module):
    """A run of FramePack's dual- and single-stream blocks as one module (batch 1: no attention mask)."""

    def __init__(self, blocks: list[torch.nn.Module], first: int = 0) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.part = f"blocks {first}-{first + len(blocks) - 1}"  # which engine of the stack, in its cache key

    def forward(self, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin, attention_mask=None):
        rope = (rope_cos, rope_sin)
        for block in self.blocks:
            # the class's forward, not the instance's: the blocks carry the hooks that route into this stack
            hidden_states, encoder_hidden_states = type(block).forward(
                block, hidden_states, encoder_hidden_states, temb, attention_mask, rope
            )
        return hidden_states, encoder_hidden_states


class TensorRTTransformer(torch.nn.Module):
    """Drop-in for the transformer's block stack, called like one block: one engine per stretch of `stretch_blocks`
    blocks, latent window and padded latent token count, whatever the prompt: the latent tokens are padded to a
    multiple of STACK_LATENT_BUCKET, the text to a multiple of STACK_TEXT_BUCKET, and an additive key mask keeps both
    paddings out of every token's attention (every other operation of the blocks is token by token, so padding
    changes nothing else). `blocks` is how many of the transformer's blocks, from the first, it runs (all by default;
    where the memory plan streams the rest, those the plan keeps resident). `parking` takes PyTorch's copy of each
    stretch's weights while its engine holds them; `compiled` runs the blocks wherever a stretch runs in PyTorch (else
    their eager forwards), and so is what each engine is timed against. `stack` is those blocks as one module:
    PyTorch's reference."""

    component = "transformer"

    def __init__(
        self,
        transformer: torch.nn.Module,
        runtime: EngineRunner,
        parking: WeightParking | None = None,
        compiled: "CompiledBlocks | None" = None,
        stretch_blocks: int = STRETCH_BLOCKS,
        blocks: int | None = None,
    ) -> None:
        super().__init__()
        blocks = transformer_blocks(transformer)[:blocks]
        self.stack = _BlockStack(blocks)
        self.stretches = torch.nn.ModuleList(
            _BlockStack(blocks[first : first + stretch_blocks], first)
            for first in range(0, len(blocks), stretch_blocks)
        )
        self.runtime = runtime
        self.compiled = compiled
        pytorch = "eager" if compiled is None else compiled.describe_mode()
        runtime.register(self.component, pytorch, parking)

    def forward(self, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:  # only batches > 1 carry a mask; FramePack runs batch 1, engines too
            return self.stack(hidden_states, encoder_hidden_states, temb, *image_rotary_emb, attention_mask)
        tokens, length = hidden_states.shape[1], encoder_hidden_states.shape[1]
        latent_padding, text_padding = -tokens % STACK_LATENT_BUCKET, -length % STACK_TEXT_BUCKET
        # Latents (1, tokens, width) and rope (tokens, dim) get rows of zeros before the first token, the text after
        # its last: the kept keys (latents, then text) are one stretch, which attention reads as a slice.
        padded = [torch.nn.functional.pad(t, (0, 0, latent_padding, 0)) for t in (hidden_states, *image_rotary_emb)]
        text = torch.nn.functional.pad(encoder_hidden_states, (0, 0, 0, text_padding))
        kept = (latent_padding, latent_padding + tokens + length)
        keys = kept[1] + text_padding
        # Additive, in the model's dtype: a boolean mask makes Torch-TensorRT 2.11 type a segment's output int32.
        mask = torch.full((1, 1, 1, keys), float("-inf"), device=hidden_states.device, dtype=hidden_states.dtype)
        mask[..., kept[0] : kept[1]] = 0
        hidden, rope = padded[0], tuple(padded[1:])
        with kept_keys_declared(keys, [kept]):
            for stretch in self.stretches:
                hidden, text = self._run_stretch(stretch, hidden, text, temb, rope, mask, tokens, length)
        # padded from an engine, as they are from PyTorch: the latents are the last rows either way
        return hidden[:, -tokens:], text[:, :length]

    def _run_stretch(self, stretch, hidden, text, temb, rope, mask, tokens: int, length: int):
        def in_pytorch():  # the prompt as it is: no padding, so no mask and the fastest attention kernels
            latents, prompt = self._in_pytorch(stretch, hidden[:, -tokens:], text[:, :length], temb,
                                               tuple(r[-tokens:] for r in rope))  # fmt: skip
            return (torch.nn.functional.pad(latents, (0, 0, hidden.shape[1] - tokens, 0)),
                    torch.nn.functional.pad(prompt, (0, 0, 0, text.shape[1] - length)))  # fmt: skip

        return self.runtime.run(self.component, stretch, (hidden, text, temb, *rope, mask), in_pytorch, stretch.part)

    def _in_pytorch(self, stretch, hidden_states, encoder_hidden_states, temb, image_rotary_emb):
        if self.compiled is None:
            return stretch(hidden_states, encoder_hidden_states, temb, *image_rotary_emb)
        for block in stretch.blocks:
            eager = functools.partial(type(block).forward, block)
            hidden_states, encoder_hidden_states = self.compiled.forward(
                block, eager, (hidden_states, encoder_hidden_states, temb, None, image_rotary_emb), {}
            )
        return hidden_states, encoder_hidden_states


class _RunStackHook(ModelHook):
    def __init__(self, stack: TensorRTTransformer) -> None:
        super().__init__()
        self.stack = stack

    def new_forward(
        self, module, hidden_states, encoder_hidden_states, temb, attention_mask=None, image_rotary_emb=None
    ):
        return self.stack(hidden_states, encoder_hidden_states, temb, attention_mask, image_rotary_emb)


class _SkipBlockHook(ModelHook):
    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        return hidden_states, encoder_hidden_states


def install_transformer_stack(
    transformer: torch.nn.Module,
    runtime: EngineRunner,
    parking: WeightParking | None = None,
    compiled: "CompiledBlocks | None" = None,
    blocks: int | None = None,
) -> TensorRTTransformer:
    """Route the transformer's first `blocks` blocks (all by default) through one TensorRTTransformer: the first block
    runs them all, the others pass their inputs through; later blocks run as they are. Install before cache hooks
    (TeaCache) so those wrap the stack."""
    stack = TensorRTTransformer(transformer, runtime, parking, compiled, blocks=blocks)
    first, *rest = stack.stack.blocks
    HookRegistry.check_if_exists_or_initialize(first).register_hook(_RunStackHook(stack), STACK_HOOK)
    for block in rest:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_SkipBlockHook(), SKIP_HOOK)
    return stack
