"""MP4 output with PyAV: H.264, yuv420p, constant frame rate, replaced atomically so it is always playable."""

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic_files import replacing

VideoWriter = Callable[[np.ndarray, Path, int, int], None]  # (frames, path, fps, crf)


def write_mp4(frames: np.ndarray, path: Path, fps: int = 30, crf: int = 16) -> None:
    """Encode uint8 RGB frames (T, H, W, 3) to `path`; even sides are required by yuv420p."""
    import av  # imported here so the engine also runs where only its frames are wanted (GPU test machines)

    count, height, width, _ = frames.shape
    if count == 0 or height % 2 or width % 2:
        raise ValueError(f"cannot encode {count} frames of {width}x{height}: need frames with even sides")
    with replacing(Path(path)) as temporary, av.open(str(temporary), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
