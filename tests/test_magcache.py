"""MagCache's mechanics on the tiny transformer (CPU).

Random weights cannot show MagCache's quality, only its mechanics: which steps it skips (a function of the
calibration, the step count and its three parameters, not of the weights), that a skipped pass reuses the last
residual and runs no block, that contexts keep their own state, and that off is no cache at all.
"""

import numpy as np
import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from diffusers.hooks.hooks import CacheContext

from diffusers_helper.caching.magcache import (
    MAG_RATIOS,
    MagCache,
    MagCacheState,
    apply_magcache,
    interpolate_ratios,
    retained_steps,
)
from diffusers_helper.models.components import TRANSFORMER_REPOS
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.pipeline.sections import InvertedAntiDrifting

FLAT = (1.0,) * 25  # residuals of constant magnitude: no error ever accumulates, so only K and retention limit skips


@pytest.fixture
def transformer(tiny_root):
    """A fresh tiny transformer per test: the hooks stay on the blocks they were installed on."""
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(tiny_root / TRANSFORMER_REPOS["framepack"])
    return model.eval().requires_grad_(False)


def transformer_inputs(context: str, step: int, drift: float = 0.05) -> dict:
    """What the sampler feeds at a step: latents drifting from step to step, one text per context."""
    generator = torch.Generator().manual_seed(0)
    order, start = InvertedAntiDrifting(), torch.randn(1, 16, 1, 16, 16, generator=generator)
    latents = torch.randn(1, 16, 1, 16, 16, generator=generator)
    text_seed = {"cond": 1, "uncond": 2}[context]
    return {
        "hidden_states": latents * (1 - drift * step),
        "timestep": torch.tensor([1000.0 - 40 * step * (drift > 0)]),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(text_seed)),
        "encoder_attention_mask": torch.ones(1, 5),
        "pooled_projections": torch.randn(1, 32, generator=torch.Generator().manual_seed(text_seed)),
        "image_embeds": torch.randn(1, 16, 32, generator=generator),
        "guidance": torch.tensor([10000.0]),
        **order.layout(order.initial_history(start), start, order.plan(1)[0], window=1).transformer_kwargs(
            torch.float32
        ),
    }


def denoise(transformer, steps: int, contexts=("cond",), cache: MagCache | None = None, drift: float = 0.05):
    """Call the transformer as the sampler does (each step: one pass per context, in its cache context); the
    outputs per context and the steps the cache skipped per context."""
    outputs = {name: [] for name in contexts}
    skipped = {name: [] for name in contexts}
    with torch.no_grad():
        for step in range(steps):
            for name in contexts:
                before = cache.skipped if cache else 0
                with transformer.cache_context(name, step_index=step, num_inference_steps=steps):
                    outputs[name].append(transformer(**transformer_inputs(name, step, drift), return_dict=False)[0])
                if cache and cache.skipped > before:
                    skipped[name].append(step)
    return outputs, skipped


def decisions(ratios, steps: int, threshold: float, max_skips: int = 2, retention: float = 0.25) -> list[int]:
    """The steps MagCache's rule skips, asked of `should_compute` alone (as in a section with a residual cached)."""
    cache = MagCache(ratios)
    cache.reset(threshold, max_skips, retention)
    state = MagCacheState()
    state.residual = torch.zeros(1)
    return [
        step
        for step in range(steps)
        if not cache.should_compute(state, CacheContext("cond", step, steps), None, None, None)
    ]


# -- the calibration at the job's step count ------------------------------------------------------------------------


def test_the_calibration_is_interpolated_to_the_jobs_step_count_as_magcache_does():
    table = np.array(MAG_RATIOS["framepack"])
    assert len(table) == len(MAG_RATIOS["f1"]) == 25 and table[0] == 1.0
    assert np.array_equal(interpolate_ratios(table, 25), table)
    assert np.array_equal(interpolate_ratios(table, 13), table[::2])  # every other calibrated step
    assert np.array_equal(interpolate_ratios(table, 1), table[-1:])
    # nearest neighbour with rounding half to even, as MagCache's np.round: 49 steps map 0, 0, 1, 2, 2, 2, 3, 4, ...
    assert interpolate_ratios(np.arange(25.0), 49)[:8].tolist() == [0, 0, 1, 2, 2, 2, 3, 4]
    for steps in range(2, 101):
        ratios = interpolate_ratios(table, steps)
        assert len(ratios) == steps and ratios[0] == table[0] and ratios[-1] == table[-1]


# -- which steps are skipped ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_skips", "retention", "expected"),
    [
        (2, 0.25, [3, 4, 6, 7, 9, 10]),  # 3 retained steps, then at most 2 skips in a row; the last computed
        (3, 0.25, [3, 4, 5, 7, 8, 9]),
        (1, 0.25, [3, 5, 7, 9]),
        (2, 0.5, [6, 7, 9, 10]),
        (2, 0.0, [1, 2, 4, 5, 7, 8, 10]),  # nothing retained: the first step is computed all the same
    ],
)
def test_k_and_the_retention_bound_the_skips(max_skips, retention, expected):
    assert decisions(FLAT, 12, threshold=0.1, max_skips=max_skips, retention=retention) == expected


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.04, []),  # one step's error (|1 - 1.05|) is already over it
        (0.1, [3, 5, 7, 9]),  # a second step in a row would add |1 - 1.05**2|: 0.1525 in all
        (0.2, [3, 4, 6, 7, 9, 10]),  # both fit; K then stops the third
    ],
)
def test_the_accumulated_error_of_the_ratio_product_is_held_under_the_threshold(threshold, expected):
    assert decisions((1.05,) * 25, 12, threshold) == expected


def test_a_step_whose_own_ratio_is_far_from_one_is_computed_whatever_the_error():
    """FramePack-Studio's rule: a calibrated jump of more than 0.06 forces the step, even under a loose threshold."""
    ratios = [1.0] * 12
    assert decisions(ratios, 12, threshold=10.0) == [3, 4, 6, 7, 9, 10]  # only K and retention limit
    ratios[4] = 1.07  # beyond the limit: computed, which starts the next run of skips one step later
    ratios[8] = 1.05  # within it: skipped
    assert decisions(ratios, 12, threshold=10.0) == [3, 5, 6, 8, 9]


@pytest.mark.parametrize("variant", ["framepack", "f1"])
def test_at_every_step_count_the_edges_and_retained_steps_are_computed_and_runs_are_at_most_k(variant):
    for steps in range(1, 101):
        skipped = decisions(MAG_RATIOS[variant], steps, threshold=0.1)
        assert 0 not in skipped and steps - 1 not in skipped
        assert not [step for step in skipped if step < retained_steps(steps, 0.25)]
        assert all(skipped[i + 2] - skipped[i] > 2 for i in range(len(skipped) - 2))  # never 3 in a row
        if steps >= 8:
            assert skipped, steps
    assert len(decisions(MAG_RATIOS[variant], 25, threshold=0.1)) == 12  # about 2x at FramePack's 25 steps


# -- on the transformer ---------------------------------------------------------------------------------------------


def test_off_is_bit_identical_to_no_cache(transformer):
    reference, _ = denoise(transformer, 8)
    cache = apply_magcache(transformer, FLAT)
    cache.reset(None, 2, 0.25)
    outputs, skipped = denoise(transformer, 8, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(outputs["cond"], reference["cond"], strict=True))
    assert skipped == {"cond": []} and cache.computed == cache.skipped == 0


def test_computed_steps_are_exact_and_skipped_ones_reuse_the_last_residual(transformer):
    reference, _ = denoise(transformer, 12)
    cache = apply_magcache(transformer, FLAT)
    cache.reset(0.1, 2, 0.25)
    outputs, skipped = denoise(transformer, 12, cache=cache)
    assert skipped["cond"] == [3, 4, 6, 7, 9, 10] and (cache.computed, cache.skipped) == (6, 6)
    for step in range(12):
        if step not in skipped["cond"]:
            assert torch.equal(outputs["cond"][step], reference["cond"][step])
        else:
            assert not torch.allclose(outputs["cond"][step], reference["cond"][step], atol=1e-3)
    # with the same input at every step the stack adds the same residual: a skipped pass gives the computed output
    steady_reference, _ = denoise(transformer, 12, drift=0.0)
    assert all(torch.allclose(out, steady_reference["cond"][0], atol=1e-5) for out in steady_reference["cond"])
    cache.reset(0.1, 2, 0.25)
    steady, skipped = denoise(transformer, 12, cache=cache, drift=0.0)
    assert skipped["cond"] == [3, 4, 6, 7, 9, 10]
    assert all(torch.allclose(out, steady_reference["cond"][0], atol=1e-5) for out in steady["cond"])


def test_cond_and_uncond_keep_their_own_state(transformer):
    """Real CFG's two passes per step: each context decides and reuses as if it ran alone."""
    cache = apply_magcache(transformer, FLAT)
    alone = {}
    for name in ("cond", "uncond"):
        cache.reset(0.1, 2, 0.25)
        outputs, skipped = denoise(transformer, 12, contexts=(name,), cache=cache)
        alone[name] = outputs[name]
        assert skipped[name] == [3, 4, 6, 7, 9, 10]
    cache.reset(0.1, 2, 0.25)
    outputs, skipped = denoise(transformer, 12, contexts=("cond", "uncond"), cache=cache)
    assert skipped == {"cond": [3, 4, 6, 7, 9, 10], "uncond": [3, 4, 6, 7, 9, 10]}
    for name in ("cond", "uncond"):
        assert all(torch.equal(a, b) for a, b in zip(outputs[name], alone[name], strict=True))
    assert not torch.allclose(outputs["cond"][4], outputs["uncond"][4])  # each reused its own residual


def test_a_skipped_pass_calls_no_block(transformer):
    """Not even the head: MagCache decides from the calibration, so the first block needs no look at the inputs."""
    cache = apply_magcache(transformer, FLAT)
    cache.reset(0.1, 2, 0.25)
    calls = []
    for index, block in enumerate(transformer_blocks(transformer)):
        inner = block.norm1 if hasattr(block, "norm1") else block.norm
        inner.register_forward_pre_hook(lambda module, args, index=index: calls.append(index))
    denoise(transformer, 12, cache=cache)
    blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert cache.skipped == 6 and len(calls) == cache.computed * blocks
