"""Feature-map extraction: timm's ``features_only=True`` models and ``feature_take_indices``.

``create_model(name, features_only=True, out_indices=...)`` builds the classifier (loading pretrained weights into it
first, so checkpoints keep their usual keys), then wraps it in a :class:`FeatureGetter`, which returns the selected
intermediate maps of the family's ``forward_intermediates`` as NHWC arrays. This is timm's ``FeatureGetterNet``
(what timm uses for VOLO and ConViT) for every family; timm's ``FeatureListNet`` (PoolFormer, VoVNet) hooks the same
modules (``feature_info[i]['module']``), so the maps are the same.

Differences from timm, on purpose:
- maps are NHWC ``(B, H / reduction, W / reduction, num_chs)`` (timm: NCHW);
- ``out_indices`` is stored resolved to absolute, non-negative indices (timm keeps ``-2, -1`` for ``out_indices=2``
  in ``FeatureListNet``);
- the variables live under ``model.`` for every family (timm: ``model.`` for the getter, flattened names such as
  ``stages_0`` for ``FeatureListNet``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """timm's ``feature_take_indices``: absolute indices to take, and the largest one.

    Args:
        num_features: number of available feature maps (``len(model.feature_info)``).
        indices: ``None`` for all; an int ``n`` for the last ``n``; a sequence of indices (negative counts from the
            end).

    Raises:
        ValueError: an index (or ``n``) out of range, naming the valid range.
    """
    if indices is None:
        indices = num_features
    if isinstance(indices, int):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n out_indices ({indices}) is out of range (1 to {num_features})")
        take = list(range(num_features - indices, num_features))
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1}, or negative from the "
                                 f"end)")
            take.append(int(idx))
        if not take:
            raise ValueError("out_indices is empty: select at least one feature map")
    return take, max(take)


class FeatureInfo(list):
    """``feature_info`` of a features-only model: a list of dicts with timm's ``FeatureInfo`` accessors."""

    def channels(self) -> list[int]:
        return [f["num_chs"] for f in self]

    def reduction(self) -> list[int]:
        return [f["reduction"] for f in self]

    def module_name(self) -> list[str]:
        return [f["module"] for f in self]


class FeatureGetter(nnx.Module):
    """timm's ``features_only`` model: ``model(x)`` -> list of NHWC feature maps, one per ``out_indices`` entry.

    Args:
        model: a classifier of one of our families (already holding its weights).
        out_indices: which of ``model.feature_info`` to return (see :func:`feature_take_indices`); maps come back in
            increasing index order, as in timm.
        norm: apply the model's final norm to the maps where the family supports it (timm's ``feature_cfg`` norm).
        prune: drop what the selected maps do not need (later blocks, heads, final norm) like timm's
            ``prune_intermediate_layers``, so the state holds only the variables that are used.
    """

    def __init__(self, model: nnx.Module, out_indices: int | Sequence[int] | None = None, *, norm: bool = False,
                 prune: bool = True):
        take, _ = feature_take_indices(len(model.feature_info), out_indices)
        infos = [dict(model.feature_info[i], index=i) for i in take]
        if prune and hasattr(model, "prune_intermediate_layers"):
            model.prune_intermediate_layers(take, prune_norm=not norm)
        self.model = model
        self.out_indices = tuple(take)
        self.norm = norm
        self.feature_info = FeatureInfo(infos)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)
        self.model_name = getattr(model, "model_name", None)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        """Images ``(B, H, W, in_chans)`` -> ``[(B, H / r_i, W / r_i, C_i) for each out index]``."""
        return self.model.forward_intermediates(x, indices=list(self.out_indices), norm=self.norm,
                                                intermediates_only=True)

