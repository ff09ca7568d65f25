"""FramePack's resolution buckets: the nearest aspect ratio, then resize (LANCZOS) and centre-crop."""

import numpy as np
from PIL import Image

# FramePack's 640 set of (height, width): every bucket holds roughly 640 * 640 pixels.
BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)  # fmt: skip


def bucket_options(resolution: int = 640) -> tuple[tuple[int, int], ...]:
    """The 640 set scaled to another resolution, each side a multiple of 16 (what the VAE and patches need)."""
    scale = resolution / 640
    scaled = (tuple(max(16, round(side * scale / 16) * 16) for side in bucket) for bucket in BUCKETS_640)
    return tuple(dict.fromkeys(scaled))


def find_nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's; ties go to the later (taller) bucket, as in
    FramePack."""
    best, best_metric = None, float("inf")
    for bucket_height, bucket_width in bucket_options(resolution):
        metric = abs(height * bucket_width - width * bucket_height)
        if metric <= best_metric:
            best, best_metric = (bucket_height, bucket_width), metric
    return best


def resize_and_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale the image to cover (height, width), then cut the centre; uint8 HWC RGB in and out. As in FramePack:
    an image already of that size is kept as it is, and the crop box is left at half pixels for PIL to round."""
    original_height, original_width = image.shape[:2]
    if (original_height, original_width) == (height, width):
        return image
    scale = max(width / original_width, height / original_height)
    resized_width, resized_height = round(original_width * scale), round(original_height * scale)
    resized = Image.fromarray(image).resize((resized_width, resized_height), Image.LANCZOS)
    left, top = (resized_width - width) / 2, (resized_height - height) / 2
    return np.array(resized.crop((left, top, left + width, top + height)))
