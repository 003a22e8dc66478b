"""Command-line tools: ``python -m volo_jax.tools.<name> --help``."""
