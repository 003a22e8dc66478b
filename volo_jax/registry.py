"""The model registry: one explicit table of timm names, ``create_model`` and ``list_models``.

Names are timm's (``volo_d1_224``), optionally with the pretrained tag (``volo_d1_224.sail_in1k``). Each family file
contributes ``VARIANTS`` (name -> frozen architecture config) and ``PRETRAINED`` ("name.tag" -> timm's pretrained
cfg: data config, original url, classifier names). The hub id of every tag is timm's, ``timm/<name.tag>``.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
from flax import nnx

from volo_jax.models import convit, poolformer, volo, vovnet


@dataclass(frozen=True)
class ModelEntry:
    """One registered architecture: how to build it and which pretrained tags exist for it."""

    name: str
    family: str
    model_cls: Callable[..., nnx.Module]
    config: Any
    build_config: Callable[..., Any]
    tags: tuple[str, ...]
    # ``out_indices`` of ``features_only=True`` when none are given (timm's per-family default; None = every map).
    default_out_indices: int | tuple[int, ...] | None = None


def _register_family(family: str, module: Any, model_cls: Callable[..., nnx.Module]) -> dict[str, ModelEntry]:
    entries = {}
    for name, cfg in module.VARIANTS.items():
        tags = tuple(k.split(".", 1)[1] for k in module.PRETRAINED if k.split(".", 1)[0] == name)
        entries[name] = ModelEntry(name, family, model_cls, cfg, module.build, tags,
                                   getattr(module, "DEFAULT_OUT_INDICES", None))
    return entries


_REGISTRY: dict[str, ModelEntry] = {
    **_register_family("volo", volo, volo.VOLO),
    **_register_family("poolformer", poolformer, poolformer.MetaFormer),
    **_register_family("convit", convit, convit.ConVit),
    **_register_family("vovnet", vovnet, vovnet.VovNet),
}
_PRETRAINED: dict[str, dict[str, Any]] = {**volo.PRETRAINED, **poolformer.PRETRAINED, **convit.PRETRAINED,
                                    **vovnet.PRETRAINED}
# timm's ``.untrained`` cfgs (architectures registered without weights): their data config, not listed as pretrained.
_UNTRAINED: dict[str, dict[str, Any]] = {**vovnet.UNTRAINED}


def list_models(pattern: str = "*", *, pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (timm's ``list_models``).

    Args:
        pattern: e.g. ``"volo_d1*"``; matched case-insensitively.
        pretrained: list ``name.tag`` for every released weight instead of architecture names.
    """
    names = sorted(_PRETRAINED) if pretrained else sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n.lower(), pattern.lower())]


def split_model_name(model_name: str) -> tuple[str, str | None]:
    """``"volo_d1_224.sail_in1k"`` -> ``("volo_d1_224", "sail_in1k")``; an ``hf-hub:``/``timm/`` prefix is dropped."""
    for prefix in ("hf-hub:", "hf_hub:", "timm/"):
        if model_name.startswith(prefix):
            model_name = model_name[len(prefix):]
    model_name = model_name.removeprefix("timm/")
    name, _, tag = model_name.partition(".")
    return name, (tag or None)


def _unknown(kind: str, wanted: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(wanted, choices, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"Unknown {kind} {wanted!r}.{hint} See volo_jax.list_models() for all {len(choices)} names.")


def get_entry(model_name: str) -> tuple[ModelEntry, str | None]:
    """Looks up ``name[.tag]``; raises a ValueError with the closest registered names when unknown."""
    name, tag = split_model_name(model_name)
    if name not in _REGISTRY:
        raise _unknown("model", name, list(_REGISTRY))
    entry = _REGISTRY[name]
    if tag is not None and tag not in entry.tags:
        raise _unknown(f"pretrained tag for {name}", tag, list(entry.tags) or ["<none>"])
    return entry, tag


def get_pretrained_cfg(model_name: str) -> dict[str, Any]:
    """timm-style pretrained cfg of ``name[.tag]`` (default tag: the first registered, as timm does)."""
    entry, tag = get_entry(model_name)
    if tag is None:
        if not entry.tags:
            cfg = dict(_UNTRAINED.get(f"{entry.name}.untrained", {}))
            cfg.update(architecture=entry.name, tag=None, hf_hub_id=None)
            return cfg
        tag = entry.tags[0]
    cfg = dict(_PRETRAINED[f"{entry.name}.{tag}"])
    cfg.update(architecture=entry.name, tag=tag, hf_hub_id=f"timm/{entry.name}.{tag}")
    return cfg


def resolve_data_config(model: nnx.Module) -> dict[str, Any]:
    """The eval data config of a model (timm's ``resolve_data_config({}, model=m)`` keys)."""
    cfg = model.pretrained_cfg
    return {k: cfg[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct") if k in cfg} | \
        {"crop_mode": cfg.get("crop_mode", "center")}


def create_model(
    model_name: str,
    *,
    pretrained: bool | str | os.PathLike = False,
    num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | int | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Builds a registered model, optionally with converted pretrained weights (timm's ``create_model``).

    Args:
        model_name: timm name with or without the pretrained tag, e.g. ``"volo_d1_224.sail_in1k"``.
        pretrained: ``False``; ``True`` to fetch ``timm/<name.tag>`` through ``huggingface_hub`` (works offline from
            the local HF cache); or a path to a PyTorch checkpoint (``.safetensors``, ``.pth``, ``.pth.tar``,
            ``.bin``) or to a directory written by ``python -m converters``.
        num_classes: classifier size; ``0`` removes the heads (``model(x)`` gives pooled embeddings). When it differs
            from the checkpoint's, the heads are left out of conversion (and stay randomly initialised).
        img_size: input resolution; position embeddings of a checkpoint at another size are resampled like timm.
        drop_path_rate: stochastic depth rate (training).
        features_only: return a :class:`volo_jax.features.FeatureGetter` whose call gives a list of NHWC feature
            maps (``model.feature_info`` names their channels and reductions), like timm's ``features_only=True``.
            Pretrained weights are loaded into the full model first, then what the maps do not need is dropped.
        out_indices: with ``features_only``: which maps (indices into the classifier's ``feature_info``; an int
            ``n`` means the last ``n``). Default as timm: the last 3 for VOLO and ConViT, all for the CNNs.
        dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay ``param_dtype``.
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` or an int seed for initialisation and dropout (default seed 0).
        **kwargs: other fields of the family's config dataclass (e.g. ``global_pool``, ``drop_rate``).

    Returns:
        The model in training mode, like timm; call ``model.eval()`` for inference.
    """
    if out_indices is not None and not features_only:
        raise ValueError("out_indices only applies with features_only=True")
    entry, _ = get_entry(model_name)
    pretrained_cfg = get_pretrained_cfg(model_name)
    overrides = dict(kwargs)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if img_size is not None:
        overrides["img_size"] = img_size
    if drop_path_rate:
        overrides["drop_path_rate"] = drop_path_rate
    config = entry.build_config(entry.config, **overrides)
    if rngs is None:
        rngs = nnx.Rngs(0)
    elif isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    model = entry.model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if img_size is not None:
        # VOLO has a fixed input size (timm's fixed_input_size=True): the data config follows the built size.
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        pretrained_cfg["input_size"] = (config.in_chans, int(h), int(w))
    model.pretrained_cfg = pretrained_cfg
    model.model_name = entry.name
    if pretrained:
        from volo_jax.hub import load_pretrained  # local import: keeps `import volo_jax` light

        load_pretrained(model, pretrained, model_name=model_name)
    if features_only:
        from volo_jax.features import FeatureGetter

        model = FeatureGetter(model, entry.default_out_indices if out_indices is None else out_indices)
    return model
