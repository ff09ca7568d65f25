"""FramePack image-to-video with an optional TensorRT runtime."""
