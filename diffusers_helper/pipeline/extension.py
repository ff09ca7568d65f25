"""Extending a video: the video read at the model's frame rate and bucketed like a start image, the frames the
sections start from, and the finished video (the input's frames, then the new ones).

The section order decides what of the video the model sees (sections.py): F1 continues its history from the
video's last latents; the end-to-start order starts at the video's last frame and generates towards an end image.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..media.buckets import find_nearest_bucket, resize_and_center_crop
from ..media.images import check_input_image
from ..media.job_files import file_sha256
from ..media.video import read_video
from ..settings import FPS, InvalidSettings

MIN_FRAMES = 5  # the first latent and one more: anything shorter is a still image
MAX_SECONDS = 120  # as long as a video the product makes


@dataclass(frozen=True)
class VideoToExtend:
    path: Path
    frames: np.ndarray  # uint8 (T, H, W, 3) at FPS, in the bucket
    source_fps: float  # the file's own rate

    @property
    def resampled(self) -> bool:
        return round(self.source_fps, 3) != FPS

    def notice(self) -> str | None:
        """What the status says when the video was not at the model's rate."""
        if not self.resampled:
            return None
        return f"the video to extend is at {self.source_fps:g} fps: resampled to {FPS} fps ({len(self.frames)} frames)"

    def tail(self, latents: int) -> np.ndarray:
        """The video's last frames that encode to `latents` latents (the first of them a frame of its own, as the
        VAE encodes a video's first frame), or to as many as the video has."""
        latents = min(latents, (len(self.frames) - 1) // 4 + 1)
        return self.frames[len(self.frames) - (latents - 1) * 4 - 1 :]

    def joined(self, new_frames: np.ndarray, only_new: bool, repeats_last: bool) -> np.ndarray:
        """The video to write: the input's frames then the new ones (or the new ones alone); `repeats_last` when the
        new frames begin with the input's last frame, which is then left out."""
        new_frames = new_frames[1:] if repeats_last else new_frames
        return new_frames if only_new else np.concatenate([self.frames, new_frames])

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "sha256": file_sha256(self.path),
            "frames": len(self.frames),
            "source_fps": round(self.source_fps, 3),
            "resampled": self.resampled,
        }


def load_video_to_extend(path: Path, resolution: int) -> VideoToExtend:
    """The video at FPS, each frame bucketed and cropped like a start image; InvalidSettings for a file that is
    missing or unreadable, too short, too long or too small."""

    buckets: list[tuple[int, int]] = []  # the first frame's: every frame is cut to it

    def fit(frame: np.ndarray) -> np.ndarray:
        if not buckets:
            check_input_image(frame, f"the video to extend ({path})")
            buckets.append(find_nearest_bucket(*frame.shape[:2], resolution=resolution))
        return resize_and_center_crop(frame, *buckets[0])

    frames, source_fps = read_video(path, FPS, MAX_SECONDS * FPS, fit, what="the video to extend")
    if len(frames) < MIN_FRAMES:
        raise InvalidSettings(
            f"the video to extend has {len(frames)} frames at {FPS} fps; it needs at least {MIN_FRAMES}: {path}"
        )
    return VideoToExtend(Path(path), frames, source_fps)
