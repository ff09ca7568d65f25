"""`--attention`: the named kernel or one that cannot run here refused in one line before anything loads, SDPA leaving
the dispatcher's default alone, and `auto` choosing the fastest kernel that matches SDPA, remembered for the next
process. The timing is a stand-in where the test is about the choice (CPU tests never race a timer); which kernel is
faster on a real GPU is for bench/ and tests/gpu."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from diffusers_helper.acceleration import attention
from diffusers_helper.acceleration.attention import ATTENTION_HOOK, AttentionKernels, attention_unavailable
from diffusers_helper.acceleration.speed_records import SpeedRecords
from diffusers_helper.frontend.startup import plan_for
from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.models.assembly import assemble
from diffusers_helper.models.components import load_components
from diffusers_helper.models.placement import plan_memory
from diffusers_helper.models.transformer_blocks import transformer_blocks
from diffusers_helper.pipeline.engine import FramePackEngine
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.settings import GenerationSettings, InvalidSettings, ModelSettings
from tests.support.frame_sink import FrameSink

REPO = Path(__file__).resolve().parent.parent
SETTINGS = GenerationSettings(prompt="a cat walks", seconds=1.0, steps=2, resolution=128, step_cache="off")


def sdpa(query, key, value):
    return torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (query, key, value))
    ).transpose(1, 2)


class TimedKernels:
    """Attention kernels whose medians are given: `seconds` per name; `wrong` names come out other than SDPA."""

    def __init__(self, seconds: dict[str, float], wrong: tuple[str, ...] = ()) -> None:
        self.seconds, self.wrong, self.calls, self.last = seconds, wrong, [], None

    def kernels(self) -> dict:
        def kernel(name):
            def run(query, key, value):
                self.calls.append(name)
                self.last = name
                output = sdpa(query, key, value)
                return output + 1 if name in self.wrong else output

            return run

        return {name: kernel(name) for name in self.seconds}

    def median_seconds(self, function, runs):
        function()
        return self.seconds[self.last]


@pytest.fixture
def timed(monkeypatch):
    def make(seconds, wrong=()):
        kernels = TimedKernels(seconds, wrong)
        monkeypatch.setattr(attention, "median_seconds", kernels.median_seconds)
        return kernels

    return make


class Block(torch.nn.Module):
    """What the choice reads of a transformer block: its attention's heads and processor."""

    def __init__(self, heads: int = 2) -> None:
        super().__init__()
        self.attn = torch.nn.Module()
        self.attn.heads = heads
        self.attn.processor = type("Processor", (), {"_attention_backend": None})()


def test_a_kernel_that_cannot_run_here_is_refused_in_one_line_before_the_models_load():
    with pytest.raises(InvalidSettings, match=r"^sage attention needs a CUDA GPU$"):
        plan_for(ModelSettings(preset="tiny", device="cpu", attention="sage"))
    reason = attention_unavailable("flash", torch.device("cuda"))
    assert reason == "flash attention needs the flash_attn package: pip install flash-attn (docs/attention.md)"
    with pytest.raises(InvalidSettings, match="attention must be one of sdpa, auto, cudnn, flash, flash3, sage"):
        ModelSettings(attention="xformers")


def test_the_command_line_says_it_in_one_line(image_file, tmp_path):
    run = subprocess.run(
        [sys.executable, "generate.py", "--preset", "tiny", "--device", "cpu", "--attention", "cudnn",
         "--image", str(image_file), "--prompt", "a cat", "--output", str(tmp_path / "out.mp4")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].endswith("cudnn attention needs a CUDA GPU")
    assert not (tmp_path / "out.mp4").exists()


def test_sdpa_leaves_the_dispatchers_default_and_auto_on_the_cpu_has_nothing_else(tiny_root, tmp_path):
    plan = plan_memory("cpu")
    videos = []
    for mode in ("sdpa", "auto"):
        models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan,
                          ModelSettings(preset="tiny", attention=mode))  # fmt: skip
        blocks = transformer_blocks(models.components.transformer)
        assert all(block.attn.processor._attention_backend is None for block in blocks)
        assert not any(ATTENTION_HOOK in getattr(block, "_diffusers_hook", {}).hooks for block in blocks)
        assert models.backends()["attention"] == "sdpa"
        engine = FramePackEngine(models, write_video=FrameSink())
        events = list(engine.generate(example_image(128, 128), SETTINGS, JobPaths.for_video(tmp_path / f"{mode}.mp4")))
        assert isinstance(events[-1], Finished)
        videos.append(engine.write_video.last)
    assert np.array_equal(*videos)


def test_auto_serves_the_fastest_kernel_that_matches_sdpa_and_remembers_it(timed, tmp_path):
    kernels = timed({"sdpa": 1.0, "cudnn": 0.5, "flash": 0.25}, wrong=("flash",))
    speeds = SpeedRecords(tmp_path / "speeds.jsonl")
    choice = AttentionKernels("auto", torch.device("cpu"), speeds, kernels.kernels())
    block = Block()
    latents, text = torch.zeros(1, 300, 8), torch.zeros(1, 20, 8)
    assert choice.choose(block, latents, text) == "cudnn"  # flash is faster, but wrong
    assert block.attn.processor._attention_backend == AttentionBackendName._NATIVE_CUDNN
    assert "cudnn 2.00x" in choice.describe() and "flash" not in choice.describe()
    measured = len(kernels.calls)
    assert choice.choose(Block(), torch.zeros(1, 310, 8), text) == "cudnn"  # the same size, rounded: not again
    assert len(kernels.calls) == measured

    later = timed({"sdpa": 1.0, "cudnn": 0.5, "flash": 0.25}, wrong=("flash",))
    again = AttentionKernels("auto", torch.device("cpu"), speeds, later.kernels())
    assert again.choose(Block(), latents, text) == "cudnn"
    assert "cudnn" not in later.calls  # remembered: only SDPA's reference and the wrong one's check ran


def test_auto_leaves_out_a_kernel_that_fails_here(timed, caplog):
    kernels = timed({"sdpa": 1.0, "sage": 0.2, "cudnn": 0.5})
    runs = kernels.kernels()
    failing = runs["sage"]

    def sage(query, key, value):
        failing(query, key, value)
        raise RuntimeError("SageAttention: head size 16 is not supported")

    choice = AttentionKernels("auto", torch.device("cpu"), None, {**runs, "sage": sage})
    assert choice.choose(Block(), torch.zeros(1, 64, 8), torch.zeros(1, 8, 8)) == "cudnn"
    assert "sage attention failed at 256 tokens (RuntimeError: SageAttention: head size 16" in caplog.text


def test_auto_keeps_sdpa_where_nothing_is_faster(timed, tmp_path):
    kernels = timed({"sdpa": 1.0, "cudnn": 1.5})
    choice = AttentionKernels("auto", torch.device("cpu"), None, kernels.kernels())
    block = Block()
    assert choice.choose(block, torch.zeros(1, 64, 8), torch.zeros(1, 8, 8)) == "sdpa"
    assert block.attn.processor._attention_backend == AttentionBackendName.NATIVE
    assert choice.describe() == "sdpa (measured against sdpa: cudnn 0.67x)"


def test_auto_chooses_at_each_blocks_first_call_through_its_hook(timed, tiny_root, tmp_path):
    kernels = timed({"sdpa": 1.0, "cudnn": 2.0})
    plan = plan_memory("cpu")
    models = assemble(load_components("framepack", tiny_root, plan.dtypes()), plan, ModelSettings(preset="tiny"))
    choice = models.attention = AttentionKernels("auto", torch.device("cpu"), None, kernels.kernels())
    choice.install(models.components.transformer)
    engine = FramePackEngine(models, write_video=FrameSink())
    events = list(engine.generate(example_image(128, 128), SETTINGS, JobPaths.for_video(tmp_path / "auto.mp4")))
    assert isinstance(events[-1], Finished)
    blocks = transformer_blocks(models.components.transformer)
    assert all(block.attn.processor._attention_backend == AttentionBackendName.NATIVE for block in blocks)
    # one attention size in this job, measured once: SDPA's reference, cudnn's check, then each timed; no block or
    # step after that measures again
    assert len(choice._decisions) == 1 and kernels.calls == ["sdpa", "cudnn", "sdpa", "cudnn"]
    assert models.backends()["attention"].startswith("sdpa (measured against sdpa: cudnn 0.50x")
