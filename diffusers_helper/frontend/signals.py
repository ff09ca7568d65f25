"""Ctrl-C and SIGTERM for the command-line front ends: the first stops after the current step and keeps the video
so far, a second stops at once."""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

EXIT_STOPPED = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal, as shells report it


class Interrupted(KeyboardInterrupt):
    """A second stop request: the job ends at once (its JSON says "stopped", the video so far is kept)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, received: list[int]) -> Iterator[None]:
    """While the block runs, the first Ctrl-C or SIGTERM sets `stop` (and is appended to `received`); a second
    raises Interrupted. The handlers are the block's only."""

    def handler(signum, frame):
        if stop.is_set():
            raise Interrupted(signum)
        received.append(signum)
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: stopping after the current step (again to stop at once)", file=sys.stderr)
        stop.set()

    previous = {signum: signal.signal(signum, handler) for signum in EXIT_STOPPED}
    try:
        yield
    finally:
        for signum, earlier in previous.items():
            signal.signal(signum, earlier)
