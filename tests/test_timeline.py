"""Prompt timelines: parsing, refusals, each section's prompt in both orders, the fades, and a job on the tiny preset."""

import json

import pytest
import torch

from diffusers_helper.media.images import example_image
from diffusers_helper.media.job_files import JobPaths
from diffusers_helper.pipeline import conditioning
from diffusers_helper.pipeline.conditioning import TextConditions, blend_text
from diffusers_helper.pipeline.events import Finished
from diffusers_helper.pipeline.sections import InvertedAntiDrifting, Vanilla
from diffusers_helper.pipeline.timeline import SectionPrompt, TimedPrompt, parse_timeline, section_prompts
from diffusers_helper.settings import GenerationSettings, InvalidSettings
from tests.support.frame_sink import FrameSink
from tests.test_engine import tiny_settings


def test_a_timeline_is_parsed_into_its_parts_and_plain_text_is_one_prompt():
    assert parse_timeline("[0s: a cat sits] [2s: the cat stands up] [4s-6s: the cat walks away]", 6) == [
        TimedPrompt(0, None, "a cat sits"), TimedPrompt(2, None, "the cat stands up"),
        TimedPrompt(4, 6, "the cat walks away"),
    ]  # fmt: skip
    assert parse_timeline("[0: a][1.5s:b]", 2) == [TimedPrompt(0, None, "a"), TimedPrompt(1.5, None, "b")]
    for plain in ("a cat walks", "[cinematic] a cat walks", ""):
        assert parse_timeline(plain, 5) == [TimedPrompt(0, None, plain)]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("[0s: a] [2s: ]", "prompt timeline: [2s: ] has no text"),
        ("[1s: a] [2s: b]", "prompt timeline: the first part [1s: a] must start at 0s"),
        ("[0s-3s: a] [2s: b]", "prompt timeline: [0s-3s: a] overlaps [2s: b]"),
        ("[0s: a] [3s: b] [2s: c]", "prompt timeline: [2s: c] starts before [3s: b] does"),
        ("[0s: a] [6s: b]", "prompt timeline: [6s: b] starts past the video's end (5s)"),
        ("[0s: a] [2s-7s: b]", "prompt timeline: [2s-7s: b] must end after it starts, by 5s"),
        ("[0s: a] then [2s: b]", "prompt timeline: 'then' is outside the [time: text] parts"),
        ("[0s: a] [2s: b", "prompt timeline: '[2s: b' is outside the [time: text] parts"),
    ],
)
def test_bad_timelines_are_refused_naming_the_part(prompt, message):
    with pytest.raises(InvalidSettings) as refused:
        GenerationSettings(prompt=prompt, seconds=5)
    assert str(refused.value) == message


TIMELINE = parse_timeline("[0s: a] [2s: b] [3s: c]", 4)


def test_each_section_gets_the_prompt_in_force_where_the_viewer_sees_it_start():
    """4 sections of 36 frames start at 0, 1.2, 2.4 and 3.6 s into the video; the end-to-start order generates the
    last of them first."""
    for order, expected in ((InvertedAntiDrifting(), ["c", "b", "a", "a"]), (Vanilla(), ["a", "a", "b", "c"])):
        starts = [order.first_frame(section, 9) for section in order.plan(4)]
        assert [prompt.text for prompt in section_prompts(TIMELINE, starts)] == expected
        assert all(prompt.previous is None for prompt in section_prompts(TIMELINE, starts))


def test_a_blend_fades_from_the_prompt_before_over_the_sections_after_each_change():
    order = Vanilla()
    starts = [order.first_frame(section, 9) for section in order.plan(4)]
    assert section_prompts(TIMELINE, starts, blend=1) == [
        SectionPrompt("a"),
        SectionPrompt("a"),
        SectionPrompt("b", "a", 0.5),
        SectionPrompt("c", "b", 0.5),
    ]
    two = parse_timeline("[0s: a] [1s: b]", 4)
    assert section_prompts(two, starts, blend=2) == [
        SectionPrompt("a"),
        SectionPrompt("b", "a", 1 / 3),
        SectionPrompt("b", "a", 2 / 3),
        SectionPrompt("b"),
    ]
    backwards = [InvertedAntiDrifting().first_frame(s, 9) for s in InvertedAntiDrifting().plan(4)]
    assert section_prompts(two, backwards, blend=2) == [  # generation order: the video's end first
        SectionPrompt("b"),
        SectionPrompt("b", "a", 2 / 3),
        SectionPrompt("b", "a", 1 / 3),
        SectionPrompt("a"),
    ]


def test_blending_pads_the_shorter_prompt_and_interpolates():
    short = TextConditions(torch.ones(1, 2, 3), torch.ones(1, 2), torch.zeros(1, 4))
    long = TextConditions(torch.full((1, 4, 3), 3.0), torch.ones(1, 4), torch.ones(1, 4))
    blended = blend_text(short, long, 0.25)
    assert blended.embeds[0, :, 0].tolist() == [1.5, 1.5, 0.75, 0.75] and blended.mask.shape == (1, 4)
    assert blended.pooled.tolist() == [[0.25] * 4]


def test_a_timeline_job_encodes_each_prompt_once_and_conditions_each_section_on_its_own(engines, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    engine = engines["framepack"]
    encoded, calls = [], []
    original_text, original_forward = conditioning.encode_text, engine.components.transformer.forward

    def text(pipe, prompt, *args):
        encoded.append((prompt, original_text(pipe, prompt, *args)))
        return encoded[-1][1]

    def spy(**kwargs):
        calls.append(kwargs["encoder_hidden_states"].clone())
        return original_forward(**kwargs)

    monkeypatch.setattr(conditioning, "encode_text", text)
    monkeypatch.setattr(engine.components.transformer, "forward", spy)
    paths = JobPaths.for_video(tmp_path / "t.mp4")
    settings = tiny_settings(prompt="[0s: a cat sits] [1s: the cat jumps up high]", steps=1, step_cache="off")
    monkeypatch.setattr(engine, "write_video", FrameSink())
    events = list(engine.generate(example_image(256, 256), settings, paths))
    assert isinstance(events[-1], Finished) and len(calls) == 2  # 2 sections, 1 step each
    assert [prompt for prompt, _ in encoded] == ["a cat sits", "the cat jumps up high"]
    by_text = dict(encoded)
    # the end-to-start order makes the video's second half (from 1.2 s) first
    assert torch.equal(calls[0], by_text["the cat jumps up high"].embeds.to(calls[0]))
    assert torch.equal(calls[1], by_text["a cat sits"].embeds.to(calls[1]))
    recorded = json.loads(paths.sidecar.read_text())
    assert [prompt["text"] for prompt in recorded["section_prompts"]] == ["the cat jumps up high", "a cat sits"]
    assert recorded["settings"]["prompt"] == settings.prompt and recorded["settings"]["prompt_blend"] == 0
