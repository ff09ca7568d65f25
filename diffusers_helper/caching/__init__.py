"""Step caches as diffusers-style hooks on the transformer, one `apply_*` entry each."""
