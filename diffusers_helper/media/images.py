"""Reading the input image with clear errors, and drawing example images for demos and tests."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..settings import InvalidSettings

MIN_IMAGE_SIDE = 64


def load_input_image(path: Path) -> np.ndarray:
    """The image as uint8 RGB (H, W, 3); InvalidSettings for a missing, unreadable, non-image or tiny file."""
    path = Path(path)
    if not path.is_file():
        raise InvalidSettings(f"image not found: {path}")
    try:
        with Image.open(path) as opened:
            image = np.array(opened.convert("RGB"))
    except PermissionError as error:
        raise InvalidSettings(f"image not readable: {path} ({error.strerror})") from error
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise InvalidSettings(f"not a readable image file: {path} ({error})") from error
    return check_input_image(image, str(path))


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
    """`python -m diffusers_helper.images out.png`: write the example image."""
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "example.png")
    Image.fromarray(example_image()).save(target)
    print(target)


if __name__ == "__main__":
    main()
