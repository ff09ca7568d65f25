"""Run one TensorRT-runtime call in a separate process (for the disk-cache and concurrency tests).

    python -m tests.support.tensorrt_worker CACHE_DIR [COMPILE_DELAY]
Prints JSON: compiles, loads and the output sum.
"""

import json
import sys
from pathlib import Path

import torch

from diffusers_helper.acceleration.engine_cache import EngineCache
from diffusers_helper.tensorrt_runtime import TensorRTRuntime
from tests.support.tensorrt_double import FakeBackend


def seeded_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def main() -> None:
    backend = FakeBackend(compile_delay=float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
    runtime = TensorRTRuntime(EngineCache(Path(sys.argv[1])), backend)
    runtime.register("vae_decoder")
    output = runtime.run("vae_decoder", seeded_mlp(), (torch.ones(2, 8),))
    status = runtime.status["vae_decoder"]
    print(
        json.dumps(
            {
                "compiles": backend.compiled,
                "loads": backend.loaded,
                "sum": round(output.sum().item(), 5),
                "engine": status.engine,
                "load_seconds": status.load_seconds,
            }
        )
    )


if __name__ == "__main__":
    main()
