import numpy as np
import pytest

from diffusers_helper.media.buckets import BUCKETS_640, bucket_options, find_nearest_bucket, resize_and_center_crop


def test_the_640_set_has_fourteen_buckets_of_about_640_squared():
    assert len(BUCKETS_640) == 14
    assert bucket_options(640) == BUCKETS_640
    for height, width in BUCKETS_640:
        assert height % 16 == 0 and width % 16 == 0
        assert 0.9 < height * width / (640 * 640) <= 1


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((1080, 1920), (480, 832)),
        ((1920, 1080), (832, 480)),
        ((512, 512), (640, 608)),
        ((400, 1000), (416, 960)),
        ((1000, 400), (960, 416)),
    ],
)
def test_nearest_bucket_by_aspect_ratio(size, bucket):
    assert find_nearest_bucket(*size) == bucket


def test_other_resolutions_scale_the_set_to_multiples_of_16():
    options = bucket_options(128)
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in options)
    assert find_nearest_bucket(1080, 1920, resolution=128) == (96, 176)
    assert find_nearest_bucket(512, 512, resolution=128) == (128, 128)


def test_resize_and_center_crop_keeps_the_middle():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :100] = (255, 0, 0)  # left third red, middle green, right third blue
    image[:, 100:200] = (0, 255, 0)
    image[:, 200:] = (0, 0, 255)
    cropped = resize_and_center_crop(image, 64, 64)
    assert cropped.shape == (64, 64, 3)
    green = np.array([0, 255, 0])
    for x in (8, 32, 55):  # the red and blue thirds are cut away (LANCZOS rings only at the very edge)
        assert np.abs(cropped[32, x].astype(int) - green).max() <= 12


def test_the_crop_box_is_rounded_as_framepack_rounds_it():
    """FramePack leaves the box at half pixels and PIL rounds halves to even: 67 -> 64 wide starts at column 2."""
    columns = np.tile(np.arange(67, dtype=np.uint8), (64, 1))
    image = np.stack([columns] * 3, axis=-1)
    cropped = resize_and_center_crop(image, 64, 64)
    assert cropped[0, :3, 0].tolist() == [2, 3, 4]


def test_an_image_already_at_the_bucket_size_is_kept_as_it_is():
    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    assert resize_and_center_crop(image, 64, 96) is image
