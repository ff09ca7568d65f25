"""Compiler backends and the engine cache behind the TensorRT runtime (`diffusers_helper.tensorrt_runtime`)."""
