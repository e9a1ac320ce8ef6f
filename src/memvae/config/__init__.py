"""Configuration: the Config dataclasses, TOML reading and writing, and the packaged configs."""
