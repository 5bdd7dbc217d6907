"""exoctl: shard large language models across a small cluster of CPU machines."""

__version__ = "0.1.0"
