"""Where a job's files go: `<job>.mp4`, `<job>.input.png` (the input as used) and `<job>.json` (every setting)."""

import json
import platform
import random
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from ..settings import InvalidSettings
from .atomic_files import replacing, write_bytes


def job_id() -> str:
    """FramePack's job names: date, time, milliseconds and a random number, e.g. 261121_143015_042_1234."""
    now = datetime.now()
    return f"{now:%y%m%d_%H%M%S}_{now.microsecond // 1000:03d}_{random.randint(0, 9999)}"


@dataclass(frozen=True)
class JobPaths:
    """A job's files: `<job>.mp4`, `<job>.input.png` (the input as used; a name no photo of the user's has) and
    `<job>.json`. They belong together: a job replaces all of an earlier job's files or none."""

    video: Path
    image: Path
    sidecar: Path

    @classmethod
    def for_video(cls, video: Path) -> "JobPaths":
        video = Path(video)
        if video.suffix.lower() != ".mp4":
            raise InvalidSettings(f"output must be an .mp4 file, got {video}")
        return cls(video=video, image=video.with_suffix(".input.png"), sidecar=video.with_suffix(".json"))

    @classmethod
    def new_job(cls, outputs_dir: Path) -> "JobPaths":
        """A fresh job name in `outputs_dir` that no existing file uses."""
        while True:
            paths = cls.for_video(Path(outputs_dir) / f"{job_id()}.mp4")
            if not paths.existing():
                return paths

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.video, self.image, self.sidecar

    def existing(self) -> list[Path]:
        return [path for path in self.files if path.exists() or path.is_symlink()]

    def check(self, overwrite: bool, input_image: Path | None = None) -> None:
        """InvalidSettings unless the job may write its files: none is a directory or the input image, and none
        exists unless `overwrite` (an earlier job's files are then replaced as a whole)."""
        for path in self.files:
            if path.is_dir():
                raise InvalidSettings(f"output {path} is a directory")
            if input_image is not None and path.exists() and path.samefile(input_image):
                raise InvalidSettings(f"output {path} is the input image; choose another --output")
        existing = self.existing()
        if existing and not overwrite:
            names = ", ".join(str(path) for path in existing)
            raise InvalidSettings(
                f"{names} already exists; pass --overwrite to replace that job, or choose another output"
            )

    def remove_existing(self) -> None:
        """Remove an earlier job's files, so this job's files never sit beside another's."""
        for path in self.existing():
            path.unlink()


def ensure_writable_dir(directory: Path) -> None:
    """Create the directory if needed and prove it takes files; InvalidSettings otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise InvalidSettings(f"output directory not writable: {directory} ({error.strerror or error})") from error


def save_image(image: np.ndarray, path: Path) -> None:
    with replacing(path) as temporary:
        Image.fromarray(image).save(temporary, format="PNG")


def write_sidecar(path: Path, record: dict) -> None:
    write_bytes(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def software_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
