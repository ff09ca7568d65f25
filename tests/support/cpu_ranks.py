"""What torchrun runs for `--gpus N` (`python cpu_ranks.py generate|demo_gradio FLAGS`), on CPU processes over gloo,
for tests. Two things stand in the way on the CPU, and this entry point lifts exactly those: the product refuses
`--gpus` without as many CUDA GPUs, and diffusers 0.42.1 picks each rank's device by
`rank % torch.accelerator.device_count()`, which the CPU counts as 0."""

import importlib
import sys

import torch

import diffusers_helper.parallel.launch as launch

if __name__ == "__main__":
    torch.accelerator.device_count = lambda: 1
    launch.check_gpus = lambda settings: None
    front_end = importlib.import_module(sys.argv[1])
    sys.exit(front_end.main(sys.argv[2:]))
