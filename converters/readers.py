"""Reading checkpoint files into ``{key: numpy array}`` without executing code from the file.

* ``.safetensors``: ``safetensors.numpy`` (no torch needed).
* ``.pth``, ``.pth.tar``, ``.pt``, ``.bin``: ``torch.load(weights_only=True)`` only, imported lazily (the
  ``volo-jax[torch]`` extra). ``weights_only`` refuses pickles that would build arbitrary objects, which is how a
  malicious checkpoint runs code; we never fall back to a full unpickle.

Training checkpoints wrap the weights; we unwrap them like timm's ``load_state_dict``
(``timm/models/_helpers.py``): with ``use_ema=True`` ``state_dict_ema``, then ``model_ema``; otherwise (or if
there is no EMA) ``state_dict``, then ``model``; else the file is the state dict itself. One difference: timm's
``use_ema`` defaults to True, ours to False, so converting a timm training checkpoint takes the raw weights unless
asked (``--use-ema`` in the CLI); a missing EMA is logged, not silently ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from converters.rules import clean_state_dict
from converters.torch_to_flax import ConversionError

__all__ = ["SUPPORTED_EXTENSIONS", "CheckpointError", "read_checkpoint"]

_logger = logging.getLogger(__name__)

SAFETENSORS_EXTENSIONS = (".safetensors",)
TORCH_EXTENSIONS = (".pth.tar", ".pth", ".pt", ".bin")
SUPPORTED_EXTENSIONS = SAFETENSORS_EXTENSIONS + TORCH_EXTENSIONS

# Container keys, in timm's order of preference.
_EMA_KEYS = ("state_dict_ema", "model_ema")
_PLAIN_KEYS = ("state_dict", "model")


class CheckpointError(ConversionError):
    """A checkpoint file cannot be read (corrupt, truncated, unsafe, unknown format or not a state dict)."""


def _unwrap(checkpoint: Any, *, use_ema: bool, path: Path) -> tuple[Any, str]:
    """Picks the state dict inside a training checkpoint; returns it and the container key used ('' if none)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, the file holds a {type(checkpoint).__name__}")
    if use_ema:
        for key in _EMA_KEYS:
            if checkpoint.get(key) is not None:
                return checkpoint[key], key
        _logger.warning("%s: use_ema=True but the checkpoint has no %s; using the regular weights.",
                        path, " or ".join(_EMA_KEYS))
    for key in _PLAIN_KEYS:
        if checkpoint.get(key) is not None:
            return checkpoint[key], key
    return checkpoint, ""


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch  # only reached for torch files, so torch is importable

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every bf16 value exactly
        t = t.float()
    return t.numpy().copy()  # own the memory: the torch storage can be freed


def _to_numpy_dict(state_dict: Any, *, path: Path, container: str) -> dict[str, np.ndarray]:
    import torch

    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path}: '{container}' is a {type(state_dict).__name__}, not a dict of tensors")
    bad = sorted(f"{k} ({type(v).__name__})" for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    if bad:
        hint = ""
        containers = [k for k in (*_PLAIN_KEYS, *_EMA_KEYS) if k in state_dict]
        if containers:
            hint = f" It contains {', '.join(containers)}; pass use_ema=True (--use-ema) to take the EMA weights."
        where = f"'{container}' of {path}" if container else str(path)
        raise CheckpointError(
            f"{where} is not a state dict: {len(bad)} entries are not tensors: {', '.join(bad[:10])}"
            + (" ..." if len(bad) > 10 else "") + "." + hint
        )
    return {str(k): _tensor_to_numpy(v) for k, v in state_dict.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as e:  # SafetensorError, OSError, ...: corrupt or truncated
        raise CheckpointError(f"Cannot read safetensors file {path}: {type(e).__name__}: {e}") from e
    # numpy-safetensors returns ml_dtypes.bfloat16 arrays; widen them like the torch path does.
    return {k: (v.astype(np.float32) if v.dtype.name == "bfloat16" else v) for k, v in tensors.items()}


def _unsafe_globals(path: Path, error: str) -> list[str]:
    """Names of the non-allow-listed globals a pickle asks for (read without executing it), best effort."""
    import torch

    found: list[str] = []
    get = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5, zip files only
    if get is not None:
        try:
            found = list(get(str(path)))
        except Exception:  # legacy (non-zip) file or damaged archive
            found = []
    if not found:
        found = re.findall(r"\bGLOBAL ([\w.]+)", error)  # torch names the blocked global in its message
    return sorted(set(found) - {"argparse.Namespace"})  # allow-listed by us


def torch_load_safe(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with a clear error for a blocked (possibly malicious) or
    damaged pickle (:class:`CheckpointError`)."""
    try:
        import torch
    except ImportError as e:
        raise CheckpointError(
            f"Reading {path.name} needs PyTorch: pip install 'volo-jax[torch]' (or convert the file to "
            ".safetensors, which needs no torch)."
        ) from e
    # argparse.Namespace is allow-listed like timm does: timm training checkpoints store their `args` in it, and it
    # cannot run code. (`safe_globals` exists from torch 2.5; older versions simply don't get the allowance.)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allow = safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's restricted unpickler reports both "this pickle wants a global outside the allow-list" (how a
        # malicious file would run code) and a damaged pickle as "Weights only load failed"; tell them apart.
        unsafe = _unsafe_globals(path, str(e))
        detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "error:" in ln), "")
        if unsafe:
            raise CheckpointError(
                f"Refusing to unpickle arbitrary objects from {path}: it asks for {', '.join(unsafe)}, which could "
                "run code when loaded; torch.load(weights_only=True) blocked it and nothing was executed. Only "
                "convert checkpoints that hold plain tensors; if you trust this file, re-save its state dict as "
                ".safetensors yourself."
            ) from e
        raise CheckpointError(
            f"Refusing to unpickle {path}: torch.load(weights_only=True) cannot load it safely; the file is corrupt "
            f"or truncated, or needs Python objects beyond tensors (which could run code). {detail}".rstrip()
        ) from e
    except Exception as e:  # RuntimeError (bad zip), EOFError (truncated), KeyError (garbage), ...
        raise CheckpointError(f"Cannot read checkpoint {path} (truncated or corrupt?): {type(e).__name__}: {e}") from e


def read_checkpoint(path: str | os.PathLike, *, use_ema: bool = False) -> dict[str, np.ndarray]:
    """Reads a checkpoint file into ``{torch key: numpy array}``.

    Args:
        path: a ``.safetensors``, ``.pth``, ``.pth.tar``, ``.pt`` or ``.bin`` file.
        use_ema: take the EMA weights (``state_dict_ema``, then ``model_ema``) of a training checkpoint when present.

    Returns:
        The state dict with DataParallel/torch.compile prefixes removed (``module.``, ``_orig_mod.``), keys as in
        the file otherwise (original repos' names are mapped by :func:`converters.rules.apply_rules`). Arrays keep
        their dtype, except bfloat16 which becomes float32.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: unsupported extension, unreadable/corrupt/truncated file, a pickle that needs arbitrary
            objects, or contents that are not a dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}")
    name = path.name.lower()
    if name.endswith(SAFETENSORS_EXTENSIONS):
        state_dict = _read_safetensors(path)
    elif name.endswith(TORCH_EXTENSIONS):
        checkpoint = torch_load_safe(path)
        raw, container = _unwrap(checkpoint, use_ema=use_ema, path=path)
        state_dict = _to_numpy_dict(raw, path=path, container=container)
        _logger.info("Read %d tensors%s from %s.", len(state_dict), f" ('{container}')" if container else "", path)
    else:
        raise CheckpointError(
            f"Unsupported checkpoint file {path.name!r}: expected one of {', '.join(SUPPORTED_EXTENSIONS)}."
        )
    return clean_state_dict(state_dict)
