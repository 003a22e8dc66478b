"""Pretrained weights for ``create_model(..., pretrained=...)``: the HF hub, local files and converted directories.

``pretrained`` can be:

* ``True``: ``timm/<name.tag>`` from the Hugging Face hub via ``huggingface_hub.hf_hub_download``
  (``model.safetensors``, falling back to ``pytorch_model.bin`` for repos without one). Downloads land in the
  standard HF cache and are reused; with ``HF_HUB_OFFLINE=1`` (or no network) the cached copy is used.
* a checkpoint file (``.safetensors``, ``.pth``, ``.pth.tar``, ``.pt``, ``.bin``): read, renamed from the original
  repo's key names when needed (:mod:`converters.rules`) and converted.
* a directory written by ``python -m converters`` (:func:`volo_jax.checkpoint.save_params`): loaded as is.
* a timm / HF model directory (``model.safetensors`` or ``pytorch_model.bin``, usually with timm's ``config.json``):
  treated as PyTorch-layout weights.

When the model's classifier size differs from the checkpoint's, the classifier modules
(``pretrained_cfg['classifier']``) are left out and keep their random initialisation (or are absent for
``num_classes=0``), like timm. This module never imports torch itself; only reading a pickled file does.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from flax import nnx

from converters.readers import read_checkpoint
from converters.rules import apply_rules, family_of
from converters.torch_to_flax import ConversionError, convert_with_report
from volo_jax.checkpoint import TrainCheckpoints, is_converted_dir, load_params, read_config, run_checkpoints_dir

__all__ = [
    "HF_SAFE_WEIGHTS_NAME",
    "HF_WEIGHTS_NAME",
    "classifier_prefixes",
    "download_weights",
    "infer_num_classes",
    "load_model",
    "load_pretrained",
    "load_torch_state_dict",
]

_logger = logging.getLogger(__name__)

HF_SAFE_WEIGHTS_NAME = "model.safetensors"
HF_WEIGHTS_NAME = "pytorch_model.bin"


def _hf_id(pretrained_cfg: Mapping[str, Any], model_name: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of the model's weights; timm's ``'timm/'`` shorthand and ``repo@rev`` are expanded."""
    hf_hub_id = pretrained_cfg.get("hf_hub_id")
    if not hf_hub_id:
        raise ConversionError(
            f"{model_name} has no pretrained weights on the hub (pretrained_cfg has no hf_hub_id); pass a "
            "checkpoint file or a converted directory as `pretrained` instead"
        )
    if hf_hub_id.endswith("/"):  # timm's default_cfgs write 'timm/' and append name.tag later
        hf_hub_id += ".".join(p for p in (pretrained_cfg.get("architecture"), pretrained_cfg.get("tag")) if p)
    repo_id, _, revision = hf_hub_id.partition("@")
    return repo_id, revision or None


def download_weights(pretrained_cfg: Mapping[str, Any], model_name: str) -> Path:
    """Local path of the model's hub weights, downloading them into the HF cache if needed.

    Tries ``model.safetensors`` first and ``pytorch_model.bin`` when the repo (or, offline, the cache) has no
    safetensors file, like timm's ``load_state_dict_from_hf``.

    Raises:
        ConversionError: no hub id, or neither file can be had (the message says how to get them).
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, revision = _hf_id(pretrained_cfg, model_name)
    errors: list[str] = []
    for filename in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        try:
            path = hf_hub_download(repo_id=repo_id, filename=filename, revision=revision, library_name="volo-jax")
            _logger.info("Using %s from %s.", filename, repo_id)
            return Path(path)
        except EntryNotFoundError as e:  # not in the repo, or (offline) not in the cache: try the next file
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        except Exception as e:  # repository not found, network down with an empty cache, ...
            errors.append(f"{filename}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            break
    raise ConversionError(
        f"Could not get the weights of {model_name} from the Hugging Face hub repo {repo_id!r}:\n  "
        + "\n  ".join(errors)
        + "\nOnline: check the repo id and your network. Offline (HF_HUB_OFFLINE=1): download them first with "
        f"`huggingface-cli download {repo_id}` or pass a local checkpoint file as `pretrained`."
    )


def _classifier_names(model: nnx.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def infer_num_classes(state_dict: Mapping[str, np.ndarray], model: nnx.Module) -> int | None:
    """Class count of a torch state dict: rows of its first classifier's weight (``pretrained_cfg['classifier']``).

    Returns None when the checkpoint has no such tensor (e.g. a headless checkpoint).
    """
    for name in _classifier_names(model):
        weight = state_dict.get(f"{name}.weight")
        if weight is not None and np.ndim(weight) >= 1:
            return int(np.shape(weight)[0])  # torch Linear weight is (out, in)
    return None


def classifier_prefixes(model: nnx.Module, checkpoint_num_classes: int | None) -> tuple[str, ...]:
    """Key prefixes to leave out because the model's classifier size differs from the checkpoint's.

    Args:
        model: the target model (``num_classes`` and ``pretrained_cfg['classifier']`` are read).
        checkpoint_num_classes: classes of the checkpoint; None means ``pretrained_cfg['num_classes']``.

    Returns:
        ``('head.', 'aux_head.')``-style prefixes (torch keys and dotted NNX paths alike), or ``()``.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if checkpoint_num_classes is None:
        checkpoint_num_classes = cfg.get("num_classes")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None or checkpoint_num_classes is None or num_classes == checkpoint_num_classes:
        return ()
    classifier = _classifier_names(model)
    prefixes = tuple(f"{c}." for c in classifier)
    what = "absent (num_classes=0)" if num_classes == 0 else "randomly initialised"
    _logger.warning(
        "Classifier left out of the pretrained weights: the checkpoint has %s classes, the model %s; %s stays %s.",
        checkpoint_num_classes, num_classes, ", ".join(classifier) or "<no classifier listed>", what,
    )
    return prefixes


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    model_name: str,
    num_classes_from: int | None = None,
    source: str = "",
) -> None:
    """Renames (original repos' keys), converts and loads a torch-layout state dict into ``model``.

    Args:
        model: the target model (updated in place).
        state_dict: torch key -> numpy array (e.g. from :func:`converters.read_checkpoint`).
        model_name: timm name; selects the rename rules of the family.
        num_classes_from: the checkpoint's class count if known without looking at the tensors (hub weights:
            ``pretrained_cfg['num_classes']``); None infers it from the classifier's weight.
        source: where the weights came from, for messages.
    """
    state_dict = apply_rules(state_dict, family_of(model_name))
    ckpt_classes = num_classes_from if num_classes_from is not None else infer_num_classes(state_dict, model)
    ignore = classifier_prefixes(model, ckpt_classes)
    try:
        state, report = convert_with_report(state_dict, model, ignore_prefixes=ignore)
    except ConversionError as e:
        if source:
            e.args = (f"{source}:\n{e.args[0]}",)
        raise
    nnx.update(model, state)
    _logger.info("Loaded %d tensors (%d parameters) from %s%s.", len(report.converted), report.num_params,
                 source or "state dict", f"; resampled {', '.join(report.resized)}" if report.resized else "")


def _weights_in_dir(directory: Path) -> Path | None:
    for name in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    return None


def load_pretrained(
    model: nnx.Module, pretrained: bool | str | os.PathLike, *, model_name: str, use_ema: bool = False
) -> None:
    """Loads pretrained weights into ``model`` in place (what ``create_model(pretrained=...)`` calls).

    Args:
        model: a freshly created model with ``num_classes`` and ``pretrained_cfg`` set.
        pretrained: ``False`` (nothing), ``True`` (HF hub ``pretrained_cfg['hf_hub_id']``), a checkpoint file, a
            directory from ``python -m converters``, or a timm/HF model directory.
        model_name: the name given to ``create_model`` (``volo_d1_224[.tag]``): picks the key rename rules and is
            checked against converted directories.
        use_ema: for training checkpoints (``.pth.tar``) take the EMA weights when present.

    Raises:
        FileNotFoundError: ``pretrained`` is a path that does not exist.
        ConversionError: the weights can't be fetched, read or don't fit the model (every problem listed);
            :class:`converters.CheckpointError` is a subclass.
    """
    if pretrained is False or pretrained is None:
        return
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if pretrained is True:
        path = download_weights(cfg, model_name)
        state_dict = read_checkpoint(path, use_ema=use_ema)
        # Hub weights are exactly the pretrained_cfg's: its num_classes decides whether the head fits.
        load_torch_state_dict(model, state_dict, model_name=model_name, num_classes_from=cfg.get("num_classes"),
                              source=f"{cfg.get('hf_hub_id')} ({path.name})")
        return
    if isinstance(pretrained, (bytes, int, float)):  # bool is handled above; anything else is not a path
        raise TypeError(f"pretrained must be a bool or a path, got {type(pretrained).__name__}")

    path = Path(os.fspath(pretrained)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"pretrained={str(pretrained)!r}: no such file or directory")
    if path.is_file():
        load_torch_state_dict(model, read_checkpoint(path, use_ema=use_ema), model_name=model_name, source=str(path))
        return
    if is_converted_dir(path):
        saved = read_config(path)
        ignore = classifier_prefixes(model, saved.get("num_classes"))
        load_params(path, model, model_name=model_name, ignore_prefixes=ignore)
        _logger.info("Loaded converted params from %s.", path)
        return
    weights = _weights_in_dir(path)
    if weights is None:
        raise ConversionError(
            f"{path} has no weights: expected a directory from `python -m converters` or one holding "
            f"{HF_SAFE_WEIGHTS_NAME} / {HF_WEIGHTS_NAME} (a timm or HF model directory)"
        )
    arch = _timm_architecture(path)
    if arch and arch != model_name.split(".")[0].split("/")[-1]:
        _logger.warning("%s holds timm weights for %r, loading them into %r.", path, arch, model_name)
    load_torch_state_dict(model, read_checkpoint(weights, use_ema=use_ema), model_name=model_name,
                          source=str(weights))


def _timm_architecture(directory: Path) -> str | None:
    """``architecture`` from a timm ``config.json`` (top level, or inside ``pretrained_cfg``), if any."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return config.get("architecture") or (config.get("pretrained_cfg") or {}).get("architecture")


# --------------------------------------------------------------------------- any checkpoint
def _looks_like_orbax(path: Path) -> bool:
    markers = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")
    path = run_checkpoints_dir(path)
    dirs = [path, *(d for d in path.iterdir() if d.is_dir())]
    return any((d / m).exists() for d in dirs for m in markers)


def _training_checkpoint_meta(path: Path) -> dict[str, Any]:
    ckpts, step = TrainCheckpoints.open_run(path)
    try:
        return ckpts.meta(step)
    except FileNotFoundError:
        raise
    except Exception as e:  # orbax's own errors on a damaged or foreign directory: say what it was
        raise ConversionError(f"--checkpoint {path}: not a readable orbax training checkpoint "
                              f"({type(e).__name__}: {e})") from e


def restore_training_checkpoint(model: nnx.Module, path: Path, *, use_ema: bool) -> None:
    """Loads an orbax training checkpoint written by ``train.py`` into ``model`` (EMA weights with ``use_ema``).

    ``path`` is the run's checkpoint directory (its latest complete step is used) or one step's subdirectory.
    """
    ckpts, step = TrainCheckpoints.open_run(path)
    try:
        meta = ckpts.restore_weights(model, step, use_ema=use_ema)
    except (ConversionError, FileNotFoundError):
        raise
    except Exception as e:
        raise ConversionError(f"--checkpoint {path}: the training checkpoint does not fit {model.model_name} "
                              f"({type(e).__name__}: {e})") from e
    trained = meta.get("model_name")
    if trained and trained != getattr(model, "model_name", trained):
        _logger.warning("%s was trained as %r, loaded as %r", path, trained, model.model_name)


def load_model(model_name: str, checkpoint: str | os.PathLike | None = None, *, pretrained: bool = False,
               num_classes: int | None = None, img_size: tuple[int, int] | None = None, dtype: Any = None,
               use_ema: bool = False) -> nnx.Module:
    """A model with weights from any checkpoint we read, its class count the checkpoint's (``eval.py --checkpoint``).

    Args:
        model_name: registry name (``volo_d1_224``).
        checkpoint: a PyTorch/safetensors file, a timm/HF model directory, a ``python -m converters`` directory, or a
            ``train.py`` run / orbax step directory; None for ``pretrained`` or random weights.
        pretrained: the released weights through the hub cache when ``checkpoint`` is None.
        num_classes: expected class count (None: the checkpoint's); a mismatch is an error.
        img_size: input size to build at (None: the model's default); position embeddings are resampled.
        dtype: compute dtype.
        use_ema: the EMA weights of a checkpoint that has them.

    Raises:
        ConversionError: the weights do not fit the model (every problem listed), or ``--num-classes`` disagrees.
        FileNotFoundError / ValueError: no such checkpoint, unknown model.
    """
    import volo_jax
    from converters.readers import SUPPORTED_EXTENSIONS

    pretrained_cfg = volo_jax.get_pretrained_cfg(model_name)
    kw = dict(img_size=img_size, dtype=dtype)
    ckpt = Path(checkpoint).expanduser() if checkpoint else None
    state_dict, ckpt_classes, weights_file = None, None, None
    if ckpt is not None:
        if not ckpt.exists():
            raise FileNotFoundError(f"--checkpoint {ckpt}: no such file or directory")
        if ckpt.is_dir() and not is_converted_dir(ckpt):
            weights_file = next((ckpt / n for n in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME) if (ckpt / n).is_file()),
                                None)
            if weights_file is None and not _looks_like_orbax(ckpt):
                raise ConversionError(
                    f"--checkpoint {ckpt} is a directory holding no weights: expected a directory from `python -m "
                    f"converters` (config.json + model.safetensors), a timm/HF model directory "
                    f"({HF_SAFE_WEIGHTS_NAME} or {HF_WEIGHTS_NAME}) or an orbax training checkpoint")
        elif ckpt.is_file():
            if not ckpt.name.endswith(SUPPORTED_EXTENSIONS):
                raise ConversionError(f"--checkpoint {ckpt}: unsupported file type; expected one of "
                                      f"{', '.join(SUPPORTED_EXTENSIONS)} or a directory")
            weights_file = ckpt
        if weights_file is not None:
            state_dict = read_checkpoint(weights_file, use_ema=use_ema)
            ckpt_classes = infer_num_classes(state_dict, SimpleNamespace(pretrained_cfg=pretrained_cfg))
        elif is_converted_dir(ckpt):
            ckpt_classes = read_config(ckpt).get("num_classes")
        else:  # an orbax training checkpoint: its meta item records the class count
            ckpt_classes = _training_checkpoint_meta(ckpt).get("num_classes")
    elif pretrained:
        ckpt_classes = pretrained_cfg.get("num_classes")
    if num_classes is not None and ckpt_classes is not None and num_classes != ckpt_classes:
        raise ConversionError(f"--num-classes {num_classes} but the checkpoint's classifier has {ckpt_classes} "
                              "classes: evaluating a randomly initialised head would give a meaningless number")
    model = volo_jax.create_model(model_name, num_classes=num_classes or ckpt_classes, **kw)
    if state_dict is not None:
        load_torch_state_dict(model, state_dict, model_name=model_name, source=str(weights_file))
    elif ckpt is not None and is_converted_dir(ckpt):
        load_pretrained(model, ckpt, model_name=model_name, use_ema=use_ema)
    elif ckpt is not None:
        restore_training_checkpoint(model, ckpt, use_ema=use_ema)
    elif pretrained:
        load_pretrained(model, True, model_name=model_name, use_ema=use_ema)
    else:
        _logger.warning("%s: no checkpoint and not pretrained: RANDOM weights.", model_name)
    return model
