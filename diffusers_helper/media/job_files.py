"""Where a job's files go: `<job>.mp4`, `<job>.input.png` (the input as used) and `<job>.json` (every setting)."""

import dataclasses
import hashlib
import json
import os
import platform
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from ..errors import describe_error
from ..settings import GenerationSettings, InvalidSettings, LoraChoice
from .atomic_files import replacing, temporary_path, write_bytes


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

    def check(self, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
        """InvalidSettings unless the job may write its files: none is a directory or one of the job's `inputs` (its
        image, the video it extends), the file system takes their names (and those they are written under first),
        and none exists unless `overwrite` (an earlier job's files are then replaced as a whole)."""
        for path in self.files:
            try:
                if path.is_dir():
                    raise InvalidSettings(f"output {path} is a directory")
                if path.exists() and any(Path(given).exists() and path.samefile(given) for given in inputs):
                    raise InvalidSettings(f"output {path} is an input of the job; choose another --output")
                _probe(temporary_path(_hidden(path)))
            except OSError as error:
                raise InvalidSettings(f"output {path} cannot be written ({error.strerror or error})") from error
        existing = self.existing()
        if existing and not overwrite:
            names = ", ".join(str(path) for path in existing)
            raise InvalidSettings(
                f"{names} already exists; pass --overwrite to replace that job, or choose another output"
            )

    def staging(self) -> "JobPaths":
        """Hidden names beside these for the PNG and JSON of a job that replaces an earlier one: they take the earlier
        job's place only with the new job's first video."""
        return JobPaths(self.video, _hidden(self.image), _hidden(self.sidecar))


def _hidden(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")


def _probe(path: Path) -> None:
    """Create and remove a file by this name: OSError when the file system will not take it (too long a name)."""
    with open(path, "wb"):
        pass
    path.unlink()


class JobFiles:
    """The files a running job writes. A job that replaces an earlier one (`--overwrite`) leaves the earlier job's
    three files alone until it has a video of its own: its PNG and JSON go to hidden names first, and `publish`
    (after the first MP4 is written over the earlier one) moves them into place. A job that ends before that
    `discard`s them, and the earlier job is as it was."""

    def __init__(self, paths: JobPaths) -> None:
        self.paths = paths
        replacing = bool(paths.existing())
        self.writing = paths.staging() if replacing else paths
        self.published = not replacing

    def publish(self) -> None:
        if self.published:
            return
        for staged, final in ((self.writing.image, self.paths.image), (self.writing.sidecar, self.paths.sidecar)):
            os.replace(staged, final)
        self.writing, self.published = self.paths, True

    def discard(self) -> None:
        """What an unpublished job staged goes; the earlier job's files stay."""
        if not self.published:
            for staged in (self.writing.image, self.writing.sidecar):
                staged.unlink(missing_ok=True)


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


def file_sha256(path: Path) -> str:
    """The SHA-256 of an input file a job names (a LoRA, an end image), so a sidecar says which version it used."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RecordedJob:
    """What makes an earlier job again: its settings and its start image as used (None for an extension, whose
    start frame comes from its video)."""

    settings: GenerationSettings
    image: Path | None
    sidecar: Path


def read_job(path: Path, elsewhere: Sequence[Path] = ()) -> RecordedJob:
    """An earlier job from its JSON, or from its MP4 with the JSON beside it. Its files are looked for beside the
    given one, then in each of `elsewhere` by name (for a copy, such as a browser's upload). InvalidSettings for a
    file that is no job's, or settings that no longer pass."""
    path = Path(path)
    sidecar = _found(path.with_suffix(".json") if path.suffix.lower() == ".mp4" else path, elsewhere)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise InvalidSettings(f"{path}: not a job's JSON ({describe_error(error)})") from error
    settings, image = settings_from_record(record, str(path))
    start = None if settings.extend is not None else _found(sidecar.parent / image, elsewhere)
    return RecordedJob(settings, start, sidecar)


def settings_from_record(record: object, where: str) -> tuple[GenerationSettings, str | None]:
    """A sidecar-shaped record's settings and its start image as written; InvalidSettings, naming `where`, for a
    record that is no job's, or settings that no longer pass."""
    try:
        recorded, image = dict(record["settings"]), record.get("input_image")
        loras = tuple(LoraChoice(Path(lora["path"]), float(lora["scale"])) for lora in record.get("loras", []))
    except (AttributeError, ValueError, KeyError, TypeError) as error:
        raise InvalidSettings(f"{where}: not a job's JSON ({describe_error(error)})") from error
    names = {field.name for field in dataclasses.fields(GenerationSettings)} - {"loras"}
    try:
        settings = GenerationSettings(**{name: value for name, value in recorded.items() if name in names},
                                      loras=loras)  # fmt: skip
    except TypeError as error:  # a setting every job has is missing
        raise InvalidSettings(f"{where}: not a job's JSON ({describe_error(error)})") from error
    except InvalidSettings as error:
        raise InvalidSettings(f"{where}: {error}") from error
    return settings, image


def _found(path: Path, elsewhere: Sequence[Path]) -> Path:
    """`path` if it exists, else the first file of its name in `elsewhere`, else `path` (for its error to name)."""
    for candidate in [path, *(Path(folder) / path.name for folder in elsewhere)]:
        if candidate.is_file():
            return candidate
    return path


def write_sidecar(path: Path, record: dict) -> None:
    write_bytes(path, (json.dumps(record, indent=2, default=str) + "\n").encode())


def software_versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
