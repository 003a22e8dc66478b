"""Benchmarks against timm in the same process: `python -m benchmarks [name]` (see `benchmarks/__main__.py`)."""
