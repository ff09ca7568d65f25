"""MagCache for the FramePack transformer, as diffusers hooks on its transformer blocks.

MagCache (Ma et al. 2025, "Fast Video Generation with Magnitude-Aware Cache") skips the whole block stack on steps
where reusing the last residual is predicted to cost little. The prediction needs no look at the inputs: the ratio
of a step's residual magnitude to the previous step's is nearly the same for every video of a model, so it is
calibrated once (`MAG_RATIOS`) and interpolated to the job's step count. Each step multiplies the ratios since the
last computed step and adds |1 - that product| to an accumulated error; a step is skipped while the error stays under
the threshold, at most `max_skip_steps` (K) steps in a row, once the first `retention_ratio` of the steps are done,
and never on a step whose own ratio is far from 1 (MAX_STEP_CHANGE, as FramePack-Studio).
First and last steps are always computed. State is kept per cache context ("cond"/"uncond") and reset every
section; `apply_magcache` installs the hooks once, outside any streaming hooks (models/assembly.py decides the
order), and `threshold` switches them per job; the hooks are shared with TeaCache (block_stack.py).
Diffusers' own `apply_mag_cache` runs on this transformer, but it fixes the step count and interpolated ratios when
installed and counts steps itself (wrapping around mid-section in a job with another step count), never forces the
last step and counts no skipped passes, so it could not be switched per job beside TeaCache.
"""

from collections.abc import Sequence

import numpy as np
import torch
from diffusers.hooks.hooks import CacheContext
from diffusers.hooks.mag_cache import nearest_interp

from .block_stack import StackState, StepCache, edge_step, install

HOOK_NAME = "magcache"
# FramePack-Studio's calibration (MAG_RATIOS_DB in diffusers_helper/models/mag_cache_ratios.py of
# FP-Studio/FramePack-Studio; "Original" and "F1", resolution group 640, 25 steps, made with FramePack-Studio v0.4's
# defaults and seed 31337): per step, the mean ratio of the stack residual's per-token norm to the previous step's.
MAG_RATIOS = {
    "framepack": (
        1.0, 1.30469, 1.22656, 1.05469, 1.02344, 1.03906, 1.02344, 1.03906, 1.05469, 1.02344, 1.03906, 0.99609,
        1.02344, 1.03125, 1.01562, 1.02344, 1.00781, 1.03906, 0.98828, 1.0, 1.0, 0.98828, 0.94531, 0.93359, 0.78516,
    ),
    "f1": (
        1.0, 1.27344, 1.07031, 1.03906, 1.00781, 1.00781, 1.00781, 1.03125, 1.04688, 1.00781, 1.03125, 0.99219,
        1.01562, 1.01562, 1.01562, 1.00781, 0.98438, 1.05469, 0.98438, 0.96875, 1.03125, 0.97266, 0.92578, 0.95703,
        0.77734,
    ),
}  # fmt: skip


# FramePack-Studio also computes every step whose own calibrated ratio is this far from 1, whatever the error so far.
MAX_STEP_CHANGE = 0.06


def interpolate_ratios(ratios: Sequence[float], steps: int) -> np.ndarray:
    """The calibrated ratios at another step count: nearest neighbour over the steps, as MagCache (and diffusers'
    `nearest_interp`) do; one step takes the last ratio."""
    return nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps).numpy()


def retained_steps(steps: int, retention_ratio: float) -> int:
    """How many steps at the start of a section are always computed."""
    return int(retention_ratio * steps)


class MagCacheState(StackState):
    def __init__(self) -> None:
        super().__init__()
        self.restart()

    def restart(self) -> None:
        """A computed step: the next estimate starts from it."""
        self.ratio = 1.0  # product of the calibrated ratios since the last computed step
        self.error = 0.0  # accumulated |1 - ratio|
        self.skips_in_row = 0


class MagCache(StepCache):
    """MagCache's calibration, settings and state, shared by its hooks; active while `threshold` is set. Counts
    computed and skipped passes."""

    state_class = MagCacheState

    def __init__(self, ratios: Sequence[float]) -> None:
        super().__init__()
        self.ratios = tuple(ratios)
        self.max_skip_steps = 0
        self.retention_ratio = 1.0

    def reset(self, threshold: float | None, max_skip_steps: int, retention_ratio: float) -> None:
        """Forget cached residuals (a new section starts from fresh noise) and set the job's parameters (threshold
        None: off)."""
        self.state.reset()
        self.threshold = threshold
        self.max_skip_steps = max_skip_steps
        self.retention_ratio = retention_ratio

    def should_compute(
        self, state: MagCacheState, context: CacheContext, head: torch.nn.Module, hidden_states: torch.Tensor, temb
    ) -> bool:
        steps = context.num_inference_steps
        retained = context.step_index < retained_steps(steps, self.retention_ratio)
        if edge_step(context) or retained or state.residual is None:
            state.restart()
            return True
        ratio = float(interpolate_ratios(self.ratios, steps)[context.step_index])
        state.ratio *= ratio
        state.error += abs(1.0 - state.ratio)
        state.skips_in_row += 1
        steady = abs(1.0 - ratio) <= MAX_STEP_CHANGE
        if state.error < self.threshold and state.skips_in_row <= self.max_skip_steps and steady:
            return False
        state.restart()
        return True


def apply_magcache(transformer: torch.nn.Module, ratios: Sequence[float]) -> MagCache:
    """Install MagCache's hooks on the transformer's blocks with the model's calibrated ratios, switched off until
    `reset` sets a threshold."""
    cache = MagCache(ratios)
    install(transformer, cache, HOOK_NAME)
    return cache
