"""The models: the component table and loading, presets, placement (the memory policy) and assembly."""
