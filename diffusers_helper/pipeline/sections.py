"""FramePack's two section orders: which history the transformer sees, where new latents go, what to decode.

`InvertedAntiDrifting` (the original FramePack model) generates the video end to start; `Vanilla` (F1)
generates it forward. Both keep a history of clean latents and show the transformer a fixed-size summary of
it: 1 frame at full detail, 2 at 2x and 16 at 4x compression (the clean-x embedder does the compressing).
"""

from dataclasses import dataclass

import numpy as np
import torch

HISTORY_SIZES = (1, 2, 16)  # latent frames seen at 1x, 2x and 4x compression


@dataclass(frozen=True)
class Section:
    index: int  # 0-based, in generation order
    count: int
    padding: int  # blank latent windows between the start frame and this section (end-to-start order only)

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


@dataclass(frozen=True)
class HistoryLayout:
    """The transformer's view of one section: frame indices for rope and the clean latents they belong to."""

    latent_indices: torch.Tensor  # frames being generated
    clean_latents: torch.Tensor  # start frame + 1x history frame
    clean_indices: torch.Tensor
    clean_latents_2x: torch.Tensor
    clean_indices_2x: torch.Tensor
    clean_latents_4x: torch.Tensor
    clean_indices_4x: torch.Tensor

    def transformer_kwargs(self, dtype: torch.dtype) -> dict:
        return {
            "indices_latents": self.latent_indices,
            "latents_clean": self.clean_latents.to(dtype),
            "indices_latents_clean": self.clean_indices,
            "latents_history_2x": self.clean_latents_2x.to(dtype),
            "indices_latents_history_2x": self.clean_indices_2x,
            "latents_history_4x": self.clean_latents_4x.to(dtype),
            "indices_latents_history_4x": self.clean_indices_4x,
        }


def _split_indices(sizes: list[int]) -> list[torch.Tensor]:
    return list(torch.arange(sum(sizes)).split(sizes))


def pixels_to_frames(pixels: torch.Tensor) -> torch.Tensor:
    """VAE pixels (1, 3, T, H, W) in [-1, 1] -> uint8 frames (T, H, W, 3) on the CPU, converted as FramePack
    writes them (clamped, scaled, truncated)."""
    frames = (pixels[0].float().clamp(-1, 1) * 127.5 + 127.5).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu()


def crossfade(outgoing: torch.Tensor, incoming: torch.Tensor) -> torch.Tensor:
    """Blend two equally long clips (1, 3, T, H, W) from all `outgoing` to all `incoming`, in `outgoing`'s dtype."""
    weights = torch.linspace(1, 0, outgoing.shape[2], dtype=outgoing.dtype).view(1, 1, -1, 1, 1)
    return weights * outgoing + (1 - weights) * incoming


@dataclass(frozen=True)
class Video:
    """The decoded video so far: uint8 frames, and the VAE's own pixels of the `overlap` frames that the next
    section's decode crossfades with (each frame is blended at most once, so these are always unblended)."""

    frames: torch.Tensor  # uint8 (T, H, W, 3)
    edge: torch.Tensor  # (1, 3, overlap, H, W) in the VAE's output dtype, on the CPU


class InvertedAntiDrifting:
    """End-to-start order: every section is anchored to the start frame, so quality cannot drift away."""

    def plan(self, count: int) -> list[Section]:
        paddings = list(reversed(range(count))) if count <= 4 else [3] + [2] * (count - 3) + [1, 0]
        return [Section(index, count, padding) for index, padding in enumerate(paddings)]

    def first_frame(self, section: Section, window: int) -> int:
        """Where the section starts in the finished video: the first one generated is the video's end."""
        return (section.count - 1 - section.index) * window * 4

    def initial_history(self, start_latent: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Empty: the sections come before any history (an extended video enters only as the start frame)."""
        return start_latent.new_zeros(*start_latent.shape[:2], sum(HISTORY_SIZES), *start_latent.shape[3:])

    def extension_start(self, frames: np.ndarray) -> np.ndarray:
        """An extension starts where the video ends: its last frame is the start frame (and an end image the end)."""
        return frames[-1]

    def context_latents(self, window: int) -> int:
        """How many of an extended video's last latents the history takes: none, it holds only what comes after."""
        return 0

    def repeats_extended_frame(self, section: Section) -> bool:
        """Whether the new frames so far begin with the extended video's last frame (then left out): they do once
        the last section, which ends at the start frame, is in."""
        return section.is_last

    def layout(
        self,
        history: torch.Tensor,
        start_latent: torch.Tensor,
        section: Section,
        window: int,
        end_latent: torch.Tensor | None = None,
    ) -> HistoryLayout:
        """With an end latent, the first section (the video's end) sees it as the clean frame after its window."""
        start, _blank, latent, post, two_x, four_x = _split_indices(
            [1, section.padding * window, window, *HISTORY_SIZES]
        )
        post_latents, latents_2x, latents_4x = history[:, :, : sum(HISTORY_SIZES)].split(list(HISTORY_SIZES), dim=2)
        if end_latent is not None and section.is_first:
            post_latents = end_latent.to(history)
        return HistoryLayout(
            latent_indices=latent,
            clean_latents=torch.cat([start_latent.to(history), post_latents], dim=2),
            clean_indices=torch.cat([start, post]),
            clean_latents_2x=latents_2x,
            clean_indices_2x=two_x,
            clean_latents_4x=latents_4x,
            clean_indices_4x=four_x,
        )

    def append(
        self, history: torch.Tensor, generated: torch.Tensor, start_latent: torch.Tensor, section: Section
    ) -> torch.Tensor:
        """New latents go in front; the last section (which ends at the start frame) also prepends the start latent."""
        if section.is_last:
            generated = torch.cat([start_latent.to(generated), generated], dim=2)
        return torch.cat([generated.to(history), history], dim=2)

    def video_latents(self, history: torch.Tensor) -> torch.Tensor:
        """The history without the zero frames it started with."""
        return history[:, :, : -sum(HISTORY_SIZES)]

    def latents_to_decode(self, video_latents: torch.Tensor, section: Section, window: int) -> torch.Tensor:
        """The newest two windows, enough to cover the overlap with what was decoded before."""
        return video_latents[:, :, : window * 2 + (1 if section.is_last else 0)]

    def join(self, video: Video | None, decoded: torch.Tensor, overlap: int) -> Video:
        """The newly decoded frames go before the video so far; their tail fades into the video's front."""
        decoded = decoded.cpu()
        if video is None:
            return Video(pixels_to_frames(decoded), decoded[:, :, :overlap])
        blended = crossfade(decoded[:, :, -overlap:], video.edge)
        frames = [pixels_to_frames(decoded[:, :, :-overlap]), pixels_to_frames(blended), video.frames[overlap:]]
        return Video(torch.cat(frames), decoded[:, :, :overlap])


class Vanilla:
    """Forward order (F1): the history's tail conditions the next window, which is appended at the end."""

    def plan(self, count: int) -> list[Section]:
        return [Section(index, count, 0) for index in range(count)]

    def first_frame(self, section: Section, window: int) -> int:
        """Where the section starts in the finished video (after the start frame)."""
        return section.index * window * 4 + 1

    def initial_history(self, start_latent: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The start latent, or an extended video's last latents (`context`), after zeros for the 4x history."""
        zeros = start_latent.new_zeros(*start_latent.shape[:2], sum(HISTORY_SIZES), *start_latent.shape[3:])
        return torch.cat([zeros, start_latent if context is None else context.to(start_latent)], dim=2)

    def extension_start(self, frames: np.ndarray) -> np.ndarray:
        """The video's first frame is the start frame, as if this order had made the video itself."""
        return frames[0]

    def context_latents(self, window: int) -> int:
        """An extended video's last latents go into the history: enough for its 1x, 2x and 4x frames and for one
        window of decoding context, so the first new frames follow on from the video's."""
        return max(sum(HISTORY_SIZES), window)

    def repeats_extended_frame(self, section: Section) -> bool:
        """The new frames only follow the extended video's."""
        return False

    def layout(
        self,
        history: torch.Tensor,
        start_latent: torch.Tensor,
        section: Section,
        window: int,
        end_latent: torch.Tensor | None = None,
    ) -> HistoryLayout:
        """F1 has no end frame: the settings refuse one, so `end_latent` is always None here."""
        one_x, two_x, four_x = HISTORY_SIZES
        start, idx_4x, idx_2x, idx_1x, latent = _split_indices([1, four_x, two_x, one_x, window])
        latents_4x, latents_2x, latents_1x = history[:, :, -sum(HISTORY_SIZES) :].split([four_x, two_x, one_x], dim=2)
        return HistoryLayout(
            latent_indices=latent,
            clean_latents=torch.cat([start_latent.to(history), latents_1x], dim=2),
            clean_indices=torch.cat([start, idx_1x]),
            clean_latents_2x=latents_2x,
            clean_indices_2x=idx_2x,
            clean_latents_4x=latents_4x,
            clean_indices_4x=idx_4x,
        )

    def append(
        self, history: torch.Tensor, generated: torch.Tensor, start_latent: torch.Tensor, section: Section
    ) -> torch.Tensor:
        return torch.cat([history, generated.to(history)], dim=2)

    def video_latents(self, history: torch.Tensor) -> torch.Tensor:
        """The start latent and everything after it."""
        return history[:, :, sum(HISTORY_SIZES) :]

    def latents_to_decode(self, video_latents: torch.Tensor, section: Section, window: int) -> torch.Tensor:
        return video_latents[:, :, -window * 2 :]

    def join(self, video: Video | None, decoded: torch.Tensor, overlap: int) -> Video:
        """The newly decoded frames go after the video so far; the video's tail fades into them."""
        decoded = decoded.cpu()
        if video is None:
            return Video(pixels_to_frames(decoded), decoded[:, :, -overlap:])
        blended = crossfade(video.edge, decoded[:, :, :overlap])
        frames = [video.frames[:-overlap], pixels_to_frames(blended), pixels_to_frames(decoded[:, :, overlap:])]
        return Video(torch.cat(frames), decoded[:, :, -overlap:])


SectionOrder = InvertedAntiDrifting | Vanilla
ORDERS: dict[str, SectionOrder] = {"framepack": InvertedAntiDrifting(), "f1": Vanilla()}
