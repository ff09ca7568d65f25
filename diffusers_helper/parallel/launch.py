"""One job on several GPUs: `--gpus N` starts N processes through torchrun (`torch.distributed.run`), one per GPU,
joined in one NCCL process group. Every rank runs the whole job on the same seeded inputs; only the transformer's
passes are split (parallel/context_parallel.py), so every rank ends each section with the same latents. The first
rank is the job: its progress, its files. The others write theirs into a scratch directory that goes when they end.
In the app the first rank hands each job to the others (`JobChannel`) and a stop request reaches them all at the same
step (`AgreedStop`).
"""

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from ..models.placement import grow_cuda_segments
from ..settings import InvalidSettings, ModelSettings
from .context_parallel import first_rank_decides

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
IDLE_TIMEOUT = timedelta(days=365)  # an app's other ranks wait for its next job this long


def launched_rank() -> int | None:
    """This process's rank when torchrun started it, else None."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return int(os.environ["RANK"])


def check_gpus(settings: ModelSettings) -> None:
    """`--gpus N` needs N CUDA GPUs on this machine; InvalidSettings says what is missing."""
    if settings.gpus == 1:
        return
    if settings.device not in ("auto", "cuda"):
        raise InvalidSettings(f"--gpus {settings.gpus} splits the transformer over CUDA GPUs; --device is "
                              f"{settings.device}")  # fmt: skip
    found = torch.cuda.device_count()
    if found < settings.gpus:
        raise InvalidSettings(f"--gpus {settings.gpus} needs {settings.gpus} CUDA GPUs; this machine has {found}")


def torchrun_command(script: str, argv: list[str], ranks: int) -> list[str]:
    """The command that runs `script argv` as `ranks` processes of one machine, one per GPU."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", script, *argv]


def run_ranks(script: str, argv: list[str], ranks: int) -> int:
    """Run `script argv` as `ranks` processes through torchrun and wait for them: torchrun's exit code. Ctrl-C is
    torchrun's to answer (it reaches it from the terminal too), so this process waits for it to end them all; its
    handler here is a no-op, not an ignore, since an ignored signal would stay ignored in torchrun."""
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return subprocess.call(torchrun_command(script, argv, ranks))
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def ranks_joined(settings: ModelSettings) -> Iterator[int]:
    """This process's rank (0 without `--gpus`): with it, the process group torchrun prepared joined on this rank's GPU
    (NCCL; gloo on the CPU, which only tests run) for the block. InvalidSettings when torchrun started another number
    of processes than `--gpus` asks for."""
    if settings.gpus == 1:
        yield 0
        return
    world = int(os.environ["WORLD_SIZE"])
    if world != settings.gpus:
        raise InvalidSettings(f"--gpus {settings.gpus} runs one process per GPU, and torchrun started {world}: "
                              f"--nproc-per-node {settings.gpus}")  # fmt: skip
    on_gpus = settings.device != "cpu" and torch.cuda.is_available()
    if on_gpus:
        grow_cuda_segments()
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpus else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


class AgreedStop:
    """A job's stop request as the first rank sees it, on every rank: each `is_set` is a one-byte broadcast, so all
    ranks stop at the same step (a rank that stopped alone would leave the others waiting in an all-to-all)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop

    def is_set(self) -> bool:
        return first_rank_decides(self._stop.is_set())

    def set(self) -> None:
        self._stop.set()


class JobChannel:
    """The first rank's jobs, handed to the other ranks of an app run over several GPUs. Made by every rank at once;
    its own gloo group, on the host, waits between jobs for as long as the app stays idle."""

    def __init__(self) -> None:
        self._group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    def send(self, job: object) -> None:
        """Hand `job` to every other rank (None: the app is closing)."""
        dist.broadcast_object_list([job], src=0, group=self._group)

    def receive(self) -> object:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=self._group)
        return box[0]
