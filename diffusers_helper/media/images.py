"""Reading the input image as a user's photo really is (upright, any bit depth), with clear errors; and drawing
example images for demos and tests."""

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..settings import InvalidSettings

MIN_IMAGE_SIDE = 64
MAX_MEGAPIXELS = 50  # a 50 MP photo decodes to 150 MB of RGB; anything larger is refused before decoding


def load_input_image(path: Path, what: str = "image") -> np.ndarray:
    """The image as uint8 RGB (H, W, 3), upright as its EXIF orientation says; InvalidSettings for a missing,
    unreadable, non-image, too large or too small file (`what` names it: the image, the end image)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidSettings(f"{what} {not_a_file(path)}: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size check below says more
            with Image.open(path) as opened:
                _check_size(*opened.size, path)  # from the header: nothing decoded yet
                image = to_rgb(ImageOps.exif_transpose(opened))
    except Image.DecompressionBombError as error:
        raise InvalidSettings(f"{path} is larger than {MAX_MEGAPIXELS} megapixels; scale it down first") from error
    except PermissionError as error:
        raise InvalidSettings(f"{what} not readable: {path} ({error.strerror})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise InvalidSettings(f"not a readable image file: {path} ({error})") from error
    return check_input_image(image, str(path))


def not_a_file(path: Path) -> str:
    """Why a path given as an input file is none: missing, a directory, or something else (a device, a pipe)."""
    if not path.exists():
        return "not found"
    return "is a directory, not a file" if path.is_dir() else "is not a regular file"


def _check_size(width: int, height: int, path: Path) -> None:
    megapixels = width * height / 1e6
    if megapixels > MAX_MEGAPIXELS:
        size = f"{width}x{height} ({megapixels:.0f} megapixels)"
        raise InvalidSettings(f"{path} is {size}; the limit is {MAX_MEGAPIXELS}: scale it down first")


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 RGB from any Pillow mode: 16-bit and 32-bit greyscale scaled down (Pillow's own conversion clips
    them to white), float greyscale taken as 0-1, palettes through their colours; alpha is dropped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", ...: 16-bit samples; "I": 32-bit, in practice 16-bit data
        values = np.asarray(image, dtype=np.float64)
        grey = values / 257 if image.mode != "I" or values.max() > 255 else values
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        grey = values * 255 if values.max() <= 1 else values
    else:
        return np.array(image.convert("RGB"))
    grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def check_input_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Reject images too small to fill even one latent patch; the UI calls this on uploads too."""
    height, width = image.shape[:2]
    if min(height, width) < MIN_IMAGE_SIDE:
        raise InvalidSettings(f"{name} is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} pixels")
    return image


def example_image(width: int = 512, height: int = 512) -> np.ndarray:
    """A deterministic picture with gradients and shapes, so examples and tests need no shipped files."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 128 + 127 * np.sin(x / 23.0) * np.cos(y / 31.0)
    image = np.stack([red, green, blue], axis=-1)
    centre_x, centre_y, radius = width * 0.6, height * 0.45, min(width, height) * 0.2
    disc = (x - centre_x) ** 2 + (y - centre_y) ** 2 < radius**2
    image[disc] = (250, 220, 40)
    image[int(height * 0.7) : int(height * 0.8), int(width * 0.15) : int(width * 0.5)] = (30, 30, 160)
    return image.clip(0, 255).astype(np.uint8)


def main() -> None:
    """`python -m diffusers_helper.media.images out.png`: write the example image."""
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "example.png")
    Image.fromarray(example_image()).save(target)
    print(target)


if __name__ == "__main__":
    main()
