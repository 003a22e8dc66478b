"""Torch-free conversion of timm/PyTorch checkpoints into volo-jax (Flax NNX) models.

``python -m converters --help`` converts a file once and saves it in volo-jax's own format; the functions below do
the same in memory. Nothing here imports torch at import time: ``.safetensors`` files never need it, and pickled
``.pth``/``.bin`` files import it (the ``volo-jax[torch]`` extra) only when read.
"""

from converters.readers import CheckpointError, read_checkpoint
from converters.rules import apply_rules, family_of
from converters.torch_to_flax import (
    ConversionError,
    ConversionReport,
    convert_state_dict,
    convert_with_report,
    model_key_map,
)

__all__ = [
    "CheckpointError",
    "ConversionError",
    "ConversionReport",
    "apply_rules",
    "convert_state_dict",
    "convert_with_report",
    "family_of",
    "model_key_map",
    "read_checkpoint",
]
