"""Prompt timelines: `[0s: a cat sits] [2s: the cat stands up] [4s-6s: the cat walks away]` (FramePack-Studio's
syntax). Each section gets the prompt in force at its start, counted from the video's start as the viewer sees it
(the end-to-start variant generates the last section first); a prompt holds until the next one starts, and an end
time only bounds it. Text that does not open with `[<number>` is one prompt for the whole video.
"""

import re
from dataclasses import dataclass

from ..settings import FPS, InvalidSettings

_PART = re.compile(r"\[\s*(?P<start>\d+(?:\.\d+)?)\s*s?\s*(?:-\s*(?P<end>\d+(?:\.\d+)?)\s*s?\s*)?:(?P<text>[^\]]*)\]")
_OPENS_TIMELINE = re.compile(r"^\s*\[\s*\d")


@dataclass(frozen=True)
class TimedPrompt:
    start: float  # seconds from the video's start
    end: float | None
    text: str

    def describe(self) -> str:
        span = f"{self.start:g}s" if self.end is None else f"{self.start:g}s-{self.end:g}s"
        return f"[{span}: {self.text}]"


@dataclass(frozen=True)
class SectionPrompt:
    """What one section is conditioned on: `text`, or on the way from `previous` to it, `weight` of the way."""

    text: str
    previous: str | None = None
    weight: float = 1.0


def is_timeline(prompt: str) -> bool:
    return bool(_OPENS_TIMELINE.match(prompt))


def parse_timeline(prompt: str, seconds: float) -> list[TimedPrompt]:
    """The timeline's parts in order (plain text: one part from 0s); InvalidSettings naming the offending part for
    text outside the brackets, an empty text, a first part after 0s, parts out of order or overlapping, and times
    past the video's end."""
    if not is_timeline(prompt):
        return [TimedPrompt(0.0, None, prompt)]
    parts, position = [], 0
    for match in _PART.finditer(prompt):
        _check_between(prompt[position : match.start()])
        position = match.end()
        end = match["end"]
        part = TimedPrompt(float(match["start"]), None if end is None else float(end), match["text"].strip())
        if not part.text:
            raise InvalidSettings(f"prompt timeline: {match[0]} has no text")
        parts.append(part)
    _check_between(prompt[position:])
    _check_times(parts, seconds)
    return parts


def _check_between(text: str) -> None:
    if text.strip():
        raise InvalidSettings(f"prompt timeline: {text.strip()!r} is outside the [time: text] parts")


def _check_times(parts: list[TimedPrompt], seconds: float) -> None:
    if parts[0].start != 0:
        raise InvalidSettings(f"prompt timeline: the first part {parts[0].describe()} must start at 0s")
    for part, following in zip(parts, [*parts[1:], None], strict=True):
        if part.start >= seconds:
            raise InvalidSettings(f"prompt timeline: {part.describe()} starts past the video's end ({seconds:g}s)")
        if part.end is not None and not part.start < part.end <= seconds:
            raise InvalidSettings(f"prompt timeline: {part.describe()} must end after it starts, by {seconds:g}s")
        if following is not None and following.start <= part.start:
            raise InvalidSettings(f"prompt timeline: {following.describe()} starts before {part.describe()} does")
        if following is not None and part.end is not None and part.end > following.start:
            raise InvalidSettings(f"prompt timeline: {part.describe()} overlaps {following.describe()}")


def section_prompts(parts: list[TimedPrompt], starts: list[int], blend: int = 0) -> list[SectionPrompt]:
    """Each section's prompt, in generation order; `starts` are the sections' first frames in the video. With
    `blend`, the `blend` sections after each change fade from the prompt before to the new one."""
    texts = [[part.text for part in parts if part.start * FPS <= frame][-1] for frame in starts]
    by_frame = sorted(range(len(starts)), key=lambda index: starts[index])
    prompts = [SectionPrompt(text) for text in texts]
    previous, since = None, 0
    for position, index in enumerate(by_frame):
        if position and texts[index] != texts[by_frame[position - 1]]:
            previous, since = texts[by_frame[position - 1]], 0
        since += 1
        if previous is not None and since <= blend:
            prompts[index] = SectionPrompt(texts[index], previous, since / (blend + 1))
    return prompts
