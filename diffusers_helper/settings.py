"""Settings as validated data: where runtime files live, what one job asks for (`GenerationSettings`, shared by
the CLI, the UI and the sidecar JSON) and what the process loads and accelerates (`ModelSettings`)."""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / "Cache"  # like FramePack's own folders, relative to the checkout
OUTPUTS_DIR = REPO_ROOT / "outputs"
LORAS_DIR = REPO_ROOT / "loras"  # the app's LoRA folder

VARIANTS = ("framepack", "f1")
STEP_CACHES = ("teacache", "magcache", "off")
DEVICES = ("auto", "cpu", "cuda")
# How the transformer's blocks run when they are not a TensorRT engine: torch.compile where it is measured faster
# (auto; on a GPU), always compiled, or PyTorch eager.
BACKENDS = ("auto", "compile", "eager")
ATTENTION_CHOICES = ("sdpa", "auto", "cudnn", "flash", "flash3", "sage")  # acceleration/attention.py
# A TensorRT engine serves only at this speed-up over PyTorch or more (unless --tensorrt-always): one that only ties
# costs its build, its loads (minutes at full size) and its checks for nothing.
MIN_TENSORRT_SPEEDUP = 1.05
PRESETS = {
    "tiny": "tiny preset (random weights: expect noise)",
    "full-random": "full-size random preset (real sizes and speed, random weights: expect noise)",
}
FPS = 30
QUICK_PROMPTS = (
    "The girl dances gracefully, with clear movements, full of charm.",
    "A character doing some simple body movements.",
)


class InvalidSettings(ValueError):
    """A setting outside what the engine accepts; the message names the parameter, the value and the range."""


def _check_range(name: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    below = value <= low if low_open else value < low
    if not math.isfinite(value) or below or value > high:
        allowed = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise InvalidSettings(f"{name} must be in {allowed}, got {value}")


def _check_text(name: str, text: str) -> None:
    """Text that is not UTF-8 (bytes a terminal passed on undecoded) cannot be encoded, recorded or shown."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raw = ord(text[error.start])
        byte = f"the byte 0x{raw - 0xDC00:02x}" if 0xDC80 <= raw <= 0xDCFF else f"the code point U+{raw:04X}"
        raise InvalidSettings(
            f"{name} is not valid UTF-8 text: it holds {byte} at character {error.start + 1}"
        ) from None


LORA_SCALE_LIMIT = 10.0
LORA_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a job and how strongly it applies (negative scales invert it); the file is checked when read."""

    path: Path
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or abs(self.scale) > LORA_SCALE_LIMIT:
            limit = f"{LORA_SCALE_LIMIT:g}"
            raise InvalidSettings(f"LoRA scale must be in [-{limit}, {limit}], got {self.scale} for {self.path}")

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """`PATH[:SCALE]`: the scale is split off the last colon only when what follows is a number, so Windows
        paths (`C:\\loras\\x.safetensors`) and paths with colons stay whole; what follows a LoRA file's name
        (`x.safetensors:abc`) must be a number."""
        head, colon, tail = text.rpartition(":")
        try:
            path, scale = (head, float(tail)) if colon else (text, 1.0)
        except ValueError:
            if head.lower().endswith(LORA_SUFFIX) and not Path(text).exists():
                raise InvalidSettings(
                    f"--lora {text}: the scale {tail!r} after the last colon is not a number"
                ) from None
            path, scale = text, 1.0
        if not path.strip():
            raise InvalidSettings(f"--lora needs a file path, got {text!r}")
        return cls(Path(path), scale)


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides a video besides the input image; defaults are FramePack's."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 31337
    seconds: float = 5.0
    steps: int = 25
    cfg: float = 1.0
    distilled_cfg: float = 10.0
    cfg_rescale: float = 0.0
    latent_window: int = 9
    variant: str = "framepack"
    resolution: int = 640
    step_cache: str = "teacache"  # which cache skips steps: TeaCache (FramePack's default), MagCache or none
    teacache_threshold: float = 0.15
    magcache_threshold: float = 0.1  # MagCache's three as FramePack-Studio's defaults
    magcache_max_skips: int = 2
    magcache_retention: float = 0.25
    crf: int = 16
    loras: tuple[LoraChoice, ...] = ()  # fused into the transformer for this job, in this order
    end_image: Path | None = None  # the last frame the end-to-start variant aims at
    end_strength: float = 1.0  # how strongly the video's end holds to the end image
    prompt_blend: int = 0  # sections over which a prompt timeline's text conditions fade at each change
    extend: Path | None = None  # a video this job continues (its frames, then the new ones)
    extend_only_new: bool = False  # write only the new frames of an extension

    def __post_init__(self) -> None:
        for name in ("end_image", "extend"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        _check_range("seconds", self.seconds, 0, 120, low_open=True)
        _check_range("steps", self.steps, 1, 100)
        _check_range("cfg", self.cfg, 1, 32)
        _check_range("distilled_cfg", self.distilled_cfg, 1, 32)
        _check_range("cfg_rescale", self.cfg_rescale, 0, 1)
        _check_range("latent_window", self.latent_window, 1, 33)
        _check_range("resolution", self.resolution, 128, 1280)
        _check_range("teacache_threshold", self.teacache_threshold, 0, 1, low_open=True)
        _check_range("magcache_threshold", self.magcache_threshold, 0, 1, low_open=True)
        _check_range("magcache_max_skips", self.magcache_max_skips, 1, 10)
        _check_range("magcache_retention", self.magcache_retention, 0, 1)
        _check_range("crf", self.crf, 0, 51)
        _check_range("end_strength", self.end_strength, 0, 1)
        _check_range("prompt_blend", self.prompt_blend, 0, 20)
        if self.variant not in VARIANTS:
            raise InvalidSettings(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.end_image is not None and self.variant == "f1":
            raise InvalidSettings(
                "--end-image needs the framepack variant: F1 generates forward from the start image, with no end "
                "frame to aim at"
            )
        if self.extend_only_new and self.extend is None:
            raise InvalidSettings("--extend-only-new needs --extend: there is no video to leave out")
        for name in ("prompt", "negative_prompt"):
            _check_text(name, getattr(self, name))
        from .pipeline.timeline import parse_timeline  # it reads settings: imported when one is checked

        parse_timeline(self.prompt, self.seconds)
        if self.step_cache not in STEP_CACHES:
            raise InvalidSettings(f"step_cache must be one of {', '.join(STEP_CACHES)}, got {self.step_cache!r}")
        if not 0 <= self.seed < 2**63:
            raise InvalidSettings(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def sections(self) -> int:
        """FramePack's section count: one section makes latent_window * 4 frames of the requested length."""
        return max(round(self.seconds * FPS / (self.latent_window * 4)), 1)

    @property
    def frames(self) -> int:
        """Frames of the finished video: each section adds `latent_window` latent frames, plus the start frame."""
        return (self.sections * self.latent_window) * 4 + 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TensorRTOptions:
    """Which components run as TensorRT engines (each on its own; the flags tie them to --enable-tensorrt)."""

    vae: bool = False
    text_encoders: bool = False
    transformer: bool = False
    always: bool = False  # every engine that passes its check serves, even one measured no faster than PyTorch

    @classmethod
    def from_flags(
        cls, enable: bool, text_encoders: bool, transformer: bool, always: bool = False
    ) -> "TensorRTOptions":
        """--enable-tensorrt (the VAE) is the switch the other flags need; InvalidSettings names them."""
        if (text_encoders or transformer or always) and not enable:
            flags = [flag for flag, on in (("--tensorrt-text-encoders", text_encoders),
                                           ("--tensorrt-transformer", transformer),
                                           ("--tensorrt-always", always)) if on]  # fmt: skip
            raise InvalidSettings(f"{' and '.join(flags)} {'needs' if len(flags) == 1 else 'need'} --enable-tensorrt")
        return cls(enable, text_encoders, transformer, always)

    @property
    def enabled(self) -> bool:
        return self.vae or self.text_encoders or self.transformer


@dataclass(frozen=True)
class ModelSettings:
    """What one process loads and how it runs it: the start-up flags, validated."""

    variant: str = "framepack"
    preset: str | None = None  # built offline from random weights; see models/tiny_preset.py
    models_dir: Path | None = None  # a local copy in the hub layout; neither this nor a preset: the hub
    device: str = "auto"
    tensorrt: TensorRTOptions = TensorRTOptions()
    gpu_memory_limit_gb: float | None = None  # checked against the card when memory is planned
    # GB of GPU memory the plan keeps free for activations and streaming: it decides what stays on the GPU
    gpu_memory_preservation: float = 6.0
    backend: str = "auto"
    attention: str = "sdpa"  # the blocks' attention kernel (see acceleration/attention.py)
    fp8: bool = False  # the blocks' matrix multiplications in FP8 (see acceleration/fp8.py)
    gpus: int = 1  # processes (one per GPU) the transformer's passes split over (see parallel/context_parallel.py)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidSettings(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.device not in DEVICES:
            raise InvalidSettings(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.backend not in BACKENDS:
            raise InvalidSettings(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise InvalidSettings(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.fp8 and self.tensorrt.transformer:
            raise InvalidSettings(
                "--fp8 runs the blocks through torch.compile, and --tensorrt-transformer through TensorRT; pick one"
            )
        if not (isinstance(self.gpus, int) and self.gpus >= 1):
            raise InvalidSettings(f"--gpus must be a whole number of at least 1, got {self.gpus!r}")
        if self.gpus > 1 and self.tensorrt.transformer:
            raise InvalidSettings(
                "--gpus splits each pass of the transformer over GPUs, and a TensorRT engine runs "
                "whole passes: pick one"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise InvalidSettings(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.preset and self.models_dir:
            raise InvalidSettings("choose a preset or a models directory, not both")
        if self.models_dir is not None and not Path(self.models_dir).is_dir():
            found = Path(self.models_dir).exists()
            raise InvalidSettings(
                f"models directory {'is not a directory' if found else 'not found'}: {self.models_dir}"
            )
        limit = self.gpu_memory_limit_gb
        if limit is not None and not (math.isfinite(limit) and limit > 0):
            raise InvalidSettings(f"--gpu-memory-limit must be a positive number of GB, got {limit}")
        _check_range("gpu_memory_preservation", self.gpu_memory_preservation, 0, 128)

    def describe_source(self) -> str:
        if self.preset:
            return PRESETS[self.preset]
        return f"local copy in {self.models_dir}" if self.models_dir else "the Hugging Face hub"
