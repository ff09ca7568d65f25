"""What torchrun runs for `generate.py --gpus N`, on CPU processes over gloo, for tests. Two things stand in the way
on the CPU, and this entry point lifts exactly those: the product refuses `--gpus` without as many CUDA GPUs, and
diffusers 0.42.1 picks each rank's device by `rank % torch.accelerator.device_count()`, which the CPU counts as 0."""

import sys

import torch

import diffusers_helper.parallel.launch as launch
import generate

if __name__ == "__main__":
    torch.accelerator.device_count = lambda: 1
    launch.check_gpus = lambda settings: None
    sys.exit(generate.main(sys.argv[1:]))
