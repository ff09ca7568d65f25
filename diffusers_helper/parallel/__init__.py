"""Several GPUs for one video: the transformer's context parallelism."""
