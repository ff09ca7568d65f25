"""Start the app (tiny preset) on a free loopback port in a child process, for the API and browser tests."""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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
