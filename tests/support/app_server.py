"""The app (tiny preset) for the API and browser tests: in this process, with a gate that holds its job at a chosen
event, or in a child process of its own where a test sends it signals."""

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RunningApp:
    url: str
    process: subprocess.Popen


@contextlib.contextmanager
def running_app(outputs: Path, log: Path, *extra: str) -> Iterator[RunningApp]:
    """`demo_gradio.py --preset tiny` in a child process, once it answers on its port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "demo_gradio.py", "--preset", "tiny", "--port", str(port), "--outputs", str(outputs),
             *extra],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            yield RunningApp(url, process)
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=90)


@dataclass(frozen=True)
class ServedApp:
    url: str
    app: object  # demo_gradio.App


@contextlib.contextmanager
def served_app(outputs: Path, *extra: str) -> Iterator[ServedApp]:
    """The app's page and API served from this process, on a free loopback port."""
    import demo_gradio

    app = demo_gradio.App(
        demo_gradio.build_parser().parse_args(["--preset", "tiny", "--outputs", str(outputs), *extra])
    )
    ui = demo_gradio.build_ui(app)
    ui.queue(default_concurrency_limit=1)
    port = free_port()
    ui.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True,
              allowed_paths=[str(outputs.resolve())], **demo_gradio.LAUNCH_OPTIONS)  # fmt: skip
    try:
        yield ServedApp(f"http://127.0.0.1:{port}/", app)
    finally:
        ui.close()
        app.shutdown()


class JobGate:
    """Holds the app's next job just after the first event that `at` picks (the engine waits between steps), until
    the test releases it: a test acts at a known point of a job, however fast or slow the machine is. Leaving the
    block releases it."""

    def __init__(self, app, at: Callable[[object], bool]) -> None:
        self.app, self.at = app, at
        self.reached, self.released = threading.Event(), threading.Event()
        self.stop: threading.Event | None = None  # the held job's stop event
        self._job = None

    def __enter__(self) -> "JobGate":
        self._job = job = self.app.job

        def gated(image, settings, models, paths, stop):
            self.stop, held = stop, False
            for event in job(image, settings, models, paths, stop):
                yield event
                if not held and self.at(event):
                    held = True
                    self.reached.set()
                    self.released.wait()

        self.app.job = gated
        return self

    def __exit__(self, *exc_info) -> None:
        self.released.set()
        self.app.job = self._job
