from pathlib import Path

import pytest

from diffusers_helper.settings import GenerationSettings, InvalidSettings, ModelSettings, TensorRTOptions


@pytest.mark.parametrize(
    ("seconds", "window", "sections", "frames"),
    [(1, 9, 1, 37), (2, 9, 2, 73), (5, 9, 4, 145), (0.1, 9, 1, 37), (120, 9, 100, 3601), (2, 5, 3, 61)],
)
def test_section_arithmetic(seconds, window, sections, frames):
    settings = GenerationSettings(prompt="", seconds=seconds, latent_window=window)
    assert settings.sections == sections
    assert settings.frames == frames


def test_defaults_are_framepacks():
    settings = GenerationSettings(prompt="")
    assert (settings.seed, settings.seconds, settings.steps, settings.cfg, settings.distilled_cfg) == (
        31337,
        5.0,
        25,
        1.0,
        10.0,
    )
    assert (settings.latent_window, settings.crf, settings.step_cache) == (9, 16, "teacache")
    assert ModelSettings().gpu_memory_preservation == 6.0  # it plans the process's memory: a model setting


def test_magcache_defaults_are_framepack_studios():
    settings = GenerationSettings(prompt="")
    assert (settings.magcache_threshold, settings.magcache_max_skips, settings.magcache_retention) == (0.1, 2, 0.25)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seconds", 0, "seconds must be in (0, 120], got 0"),
        ("seconds", 120.5, "seconds must be in (0, 120]"),
        ("steps", 0, "steps must be in [1, 100], got 0"),
        ("steps", 101, "steps must be in [1, 100]"),
        ("latent_window", 34, "latent_window must be in [1, 33]"),
        ("cfg", 0.5, "cfg must be in [1, 32]"),
        ("cfg_rescale", 1.5, "cfg_rescale must be in [0, 1]"),
        ("crf", 52, "crf must be in [0, 51]"),
        ("variant", "sdxl", "variant must be one of framepack, f1, got 'sdxl'"),
        ("seconds", float("nan"), "seconds must be in (0, 120]"),
        ("seed", -1, "seed must be in [0, 2**63)"),
        ("step_cache", "fast", "step_cache must be one of teacache, magcache, off, got 'fast'"),
        ("step_cache", True, "step_cache must be one of teacache, magcache, off, got True"),
        ("magcache_threshold", 0, "magcache_threshold must be in (0, 1], got 0"),
        ("magcache_max_skips", 0, "magcache_max_skips must be in [1, 10], got 0"),
        ("magcache_retention", 1.5, "magcache_retention must be in [0, 1], got 1.5"),
        ("end_strength", 1.5, "end_strength must be in [0, 1], got 1.5"),
    ],
)
def test_invalid_settings_name_parameter_value_and_range(field, value, message):
    with pytest.raises(
        InvalidSettings,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]")
        .replace("*", r"\*"),
    ):
        GenerationSettings(prompt="", **{field: value})


def test_flags_that_need_enable_tensorrt():
    with pytest.raises(InvalidSettings, match="--tensorrt-transformer needs --enable-tensorrt"):
        TensorRTOptions.from_flags(False, False, True)
    with pytest.raises(
        InvalidSettings, match="--tensorrt-text-encoders and --tensorrt-transformer need --enable-tensorrt"
    ):
        TensorRTOptions.from_flags(False, True, True)
    assert TensorRTOptions.from_flags(True, True, True) == TensorRTOptions(
        vae=True, text_encoders=True, transformer=True
    )
    assert TensorRTOptions(transformer=True).enabled  # the components themselves are independent
    with pytest.raises(InvalidSettings, match="--tensorrt-always needs --enable-tensorrt"):
        TensorRTOptions.from_flags(False, False, False, always=True)


def test_an_end_image_needs_the_end_to_start_variant():
    with pytest.raises(InvalidSettings, match="^--end-image needs the framepack variant: F1 generates forward"):
        GenerationSettings(prompt="", variant="f1", end_image="end.png")
    assert GenerationSettings(prompt="", end_image="end.png").end_image == Path("end.png")
