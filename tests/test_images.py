"""Input images as users' photos really are: EXIF orientation, 16-bit, palettes, huge files."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from diffusers_helper.media.buckets import find_nearest_bucket
from diffusers_helper.media.images import load_input_image
from diffusers_helper.settings import InvalidSettings

ORIENTATION = 0x0112


def test_exif_orientation_turns_a_phone_portrait_upright(tmp_path):
    """Phones store portraits as landscape pixels plus an EXIF turn; the portrait must pick a portrait bucket."""
    stored = np.zeros((120, 200, 3), np.uint8)  # landscape as stored
    stored[:, :20] = (255, 0, 0)  # red stripe on the stored left edge
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "portrait.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_input_image(path)
    assert image.shape[:2] == (200, 120)  # upright: taller than wide
    assert image[:20, :, 0].mean() > 200 and image[-20:, :, 0].mean() < 50  # the stripe is now on top
    height, width = find_nearest_bucket(*image.shape[:2])
    assert height > width


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path, mode):
    ramp = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16 if mode == "I;16" else np.int32)
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")  # Pillow writes 32-bit greyscale as TIFF
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == mode
    image = load_input_image(path)
    assert image.dtype == np.uint8 and image.shape == (96, 96, 3)
    assert image[0, 0, 0] == 0 and image[-1, -1, 0] == 255
    assert abs(int(image[48, 0, 0]) - 128) <= 2  # the middle of the ramp is mid grey, not white


def test_palette_images_keep_their_colours(tmp_path):
    palette_image = Image.new("P", (80, 80))
    palette_image.putpalette([0, 0, 0, 30, 200, 90] + [0, 0, 0] * 254)
    palette_image.paste(1, (0, 0, 80, 40))
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    image = load_input_image(path)
    assert image[10, 10].tolist() == [30, 200, 90] and image[70, 70].tolist() == [0, 0, 0]


def test_an_image_over_50_megapixels_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("1", (9000, 6000)).save(path)  # 54 MP, a few kilobytes on disk
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or None)
    with pytest.raises(InvalidSettings, match=r"9000x6000 \(54 megapixels\); the limit is 50"):
        load_input_image(path)
    assert decoded == []


def test_a_decompression_bomb_gets_the_same_one_line_refusal(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("1", (3000, 3000)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses at twice its limit, before our check
    with pytest.raises(InvalidSettings, match="larger than 50 megapixels"):
        load_input_image(path)


def test_the_example_image_command_names_a_module_that_exists():
    import importlib.util
    import re

    from diffusers_helper.media import images

    module = re.search(r"python -m ([\w.]+)", images.main.__doc__).group(1)
    assert importlib.util.find_spec(module) is not None, module
