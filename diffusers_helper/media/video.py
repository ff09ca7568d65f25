"""MP4 in and out with PyAV: written as H.264, yuv420p, constant frame rate, replaced atomically so it is always
playable; read (a video to extend) as RGB frames at the model's frame rate."""

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..settings import InvalidSettings
from .atomic_files import replacing
from .images import not_a_file

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


def read_video(
    path: Path, fps: int, max_frames: int, fit: Callable[[np.ndarray], np.ndarray], what: str = "video"
) -> tuple[np.ndarray, float]:
    """The video's frames at `fps`, each passed through `fit` as it is decoded (so memory holds only fitted frames),
    as uint8 RGB (T, H, W, 3), and the file's own frame rate. The rate is changed by ffmpeg's fps filter: each
    frame out shows the frame in nearest its time. InvalidSettings for a file that is missing, not a video, or
    longer than `max_frames` at `fps` (`what` names it in the message)."""
    import av

    check_video(path, what)
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            source_fps = float(stream.average_rate or stream.guessed_rate or fps)
            graph = _resampling_graph(av, stream, fps)

            def take() -> None:
                while True:
                    try:
                        frame = graph.pull()
                    except (av.BlockingIOError, av.EOFError):
                        return
                    if len(frames) == max_frames:
                        raise InvalidSettings(
                            f"{what} is longer than {max_frames / fps:g} s, the longest this takes: {path}"
                        )
                    frames.append(fit(frame.to_ndarray()))

            for frame in container.decode(stream):
                graph.push(frame)
                take()
            graph.push(None)
            take()
    except av.FFmpegError as error:
        raise InvalidSettings(f"not a readable video file: {path} ({error})") from error
    if not frames:
        raise InvalidSettings(f"{what} has no frames: {path}")
    return np.stack(frames), source_fps


def check_video(path: Path, what: str = "video") -> None:
    """InvalidSettings unless `path` is a file that opens as a container with a video stream (nothing decoded)."""
    import av

    path = Path(path)
    if not path.is_file():
        raise InvalidSettings(f"{what} {not_a_file(path)}: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InvalidSettings(f"{what} has no video stream: {path}")
    except av.FFmpegError as error:
        raise InvalidSettings(f"not a readable video file: {path} ({error})") from error
    except PermissionError as error:
        raise InvalidSettings(f"{what} not readable: {path} ({error.strerror})") from error


def _resampling_graph(av, stream, fps: int):
    """stream -> fps=`fps` -> rgb24: ffmpeg's own frame-rate conversion and pixel format."""
    graph = av.filter.Graph()
    source = graph.add_buffer(template=stream)
    rate = graph.add("fps", str(fps))
    rgb = graph.add("format", "rgb24")
    sink = graph.add("buffersink")
    source.link_to(rate)
    rate.link_to(rgb)
    rgb.link_to(sink)
    graph.configure()
    return graph
