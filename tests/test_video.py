import av
import numpy as np
import pytest

from diffusers_helper.media.video import write_mp4


def _frames(count=12, height=64, width=96):
    frames = np.zeros((count, height, width, 3), np.uint8)
    for index in range(count):
        frames[index, :, :, 0] = 20 * index  # red ramps up over time
        frames[index, :, :, 2] = 120
    return frames


def test_mp4_is_h264_yuv420p_at_30_fps_with_every_frame(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(_frames(), path, fps=30, crf=16)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 30
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 12
    assert decoded[0].shape == (64, 96, 3)
    assert abs(int(decoded[10][..., 0].mean()) - 200) < 8  # content survives the round trip
    assert abs(int(decoded[0][..., 2].mean()) - 120) < 8


def test_crf_changes_the_encoding(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    write_mp4(noisy, tmp_path / "fine.mp4", crf=0)
    write_mp4(noisy, tmp_path / "coarse.mp4", crf=51)
    assert (tmp_path / "fine.mp4").stat().st_size > 4 * (tmp_path / "coarse.mp4").stat().st_size


def test_rewrite_replaces_and_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(_frames(5), path)
    write_mp4(_frames(9), path)
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    before = path.read_bytes()
    with pytest.raises(ValueError, match="even sides"):
        write_mp4(_frames(3, 63, 96), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_the_preview_lays_frames_out_in_a_grid_large_enough_to_see():
    import torch

    from diffusers_helper.media.preview import latent_preview

    latents = torch.zeros(1, 16, 5, 10, 12)
    latents[:, 10, 4] = 3.0  # the fifth frame bright (channel 10 adds to every colour)
    preview = latent_preview(latents, min_height=100)
    assert preview.shape == (2 * 10 * 5, 3 * 12 * 5, 3)  # 3 columns, 2 rows, enlarged 5x to reach 100 rows
    cell = preview[50:100, 12 * 5 : 24 * 5]  # row 2, column 2: the fifth frame
    assert cell.mean() > preview[:50, :60].mean() + 50
    assert preview[50:, 24 * 5 :].max() == 0  # the unused sixth cell stays black
