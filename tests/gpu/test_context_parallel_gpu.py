"""`generate.py --gpus 2`: one job over two GPUs, started through torchrun, makes the video one GPU makes (within
bf16 rounding) and writes it once. Needs a machine of two CUDA GPUs or more."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_helper.acceleration.measure import psnr
from diffusers_helper.media.images import example_image
from diffusers_helper.media.video import read_video

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _video(tmp_path: Path, gpus: int) -> Path:
    from PIL import Image

    image = tmp_path / "start.png"
    if not image.exists():
        Image.fromarray(example_image(128, 128)).save(image)
    output = tmp_path / f"gpus{gpus}" / "video.mp4"
    result = subprocess.run([sys.executable, "generate.py", "--preset", "tiny", "--image", str(image), "--prompt",
                             "a cat walks", "--seconds", "2", "--seed", "3", "--crf", "0", "--output", str(output), "--gpus",
                             str(gpus)], cwd=REPO, capture_output=True, text=True, timeout=900, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_two_gpus_make_the_one_gpu_video_and_write_it_once(tmp_path):
    single, split = _video(tmp_path, 1), _video(tmp_path, 2)
    assert sorted(path.name for path in split.parent.iterdir()) == sorted(path.name for path in single.parent.iterdir())
    frames_single, frames_split = (read_video(path, 30, 1000, lambda frame: frame)[0] for path in (single, split))
    quality = psnr(frames_split, frames_single)
    print(f"--gpus 2 against --gpus 1: PSNR {quality:.1f} dB over {len(frames_single)} frames")
    assert frames_split.shape == frames_single.shape and quality > 30
