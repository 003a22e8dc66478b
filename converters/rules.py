"""Per-family key renames: original repositories' checkpoint names -> timm's names.

Our models mirror timm, so a timm checkpoint (the HF hub's ``timm/<name.tag>``) needs no renaming. Only checkpoints
released by the original authors may use other names; timm handles those in a model file's
``checkpoint_filter_fn``, which we port here as anchored regexes:

* ``volo``: none. timm's ``volo.py`` has no ``checkpoint_filter_fn``: sail-sg/volo's release files
  (``d1_224_84.2.pth.tar``, ...) already use timm's names.
* ``convit``: none. facebookresearch/convit was built on timm and ``convit.py`` has no filter.
* ``vovnet``: none. timm's VoVNet weights were trained with timm (``vovnet.py`` has no filter).
* ``poolformer``: sail-sg/poolformer (v1) and sail-sg/metaformer (v2) releases; port of
  ``timm.models.metaformer.checkpoint_filter_fn``.

Every regex is anchored on a pattern that only the original layout has, so the rules are a no-op on keys that are
already timm's (applying them twice is harmless).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["RENAME_RULES", "apply_rules", "clean_state_dict", "family_of", "rename_key"]

V = TypeVar("V")

# Wrapper prefixes added by DistributedDataParallel (`module.`) and torch.compile (`_orig_mod.`), in either order;
# the same list as timm's `clean_state_dict`.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")

RENAME_RULES: dict[str, list[tuple[str, str]]] = {
    "volo": [],
    "convit": [],
    "vovnet": [],
    "poolformer": [
        # --- PoolFormer v1 (sail-sg/poolformer): `network` alternates stages (even) and downsamples (odd).
        (r"^patch_embed\.proj\.", "stem.conv."),
        (r"^network\.0\.(\d+)\.", r"stages.0.blocks.\1."),
        (r"^network\.2\.(\d+)\.", r"stages.1.blocks.\1."),
        (r"^network\.4\.(\d+)\.", r"stages.2.blocks.\1."),
        (r"^network\.6\.(\d+)\.", r"stages.3.blocks.\1."),
        (r"^network\.1\.proj\.", "stages.1.downsample.conv."),
        (r"^network\.3\.proj\.", "stages.2.downsample.conv."),
        (r"^network\.5\.proj\.", "stages.3.downsample.conv."),
        (r"\.layer_scale_(\d+)$", r".layer_scale\1.scale"),
        # --- PoolFormer v2 (sail-sg/metaformer): `downsample_layers.i` + `stages.i.j`.
        (r"^downsample_layers\.0\.post_norm\.", "stem.norm."),
        (r"^downsample_layers\.0\.(?:conv|proj)\.", "stem.conv."),
        (r"^downsample_layers\.(\d+)\.(?:pre_norm|post_norm)\.", r"stages.\1.downsample.norm."),
        (r"^downsample_layers\.(\d+)\.(?:conv|proj)\.", r"stages.\1.downsample.conv."),
        (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
        # --- both: the final norm and the linear classifier moved into timm's `head` module.
        (r"^norm\.", "head.norm."),
        (r"^head\.(weight|bias)$", r"head.fc.\1"),
    ],
}

# Model-name prefixes of each family (timm names), most specific first.
_FAMILY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("volo_", "volo"),
    ("poolformer", "poolformer"),  # poolformer_s12 and poolformerv2_s12
    ("convit_", "convit"),
    ("ese_vovnet", "vovnet"),
    ("eca_vovnet", "vovnet"),
    ("vovnet", "vovnet"),
)

_COMPILED: dict[str, list[tuple[re.Pattern[str], str]]] = {}


def family_of(model_name: str) -> str | None:
    """The rule family of a timm model name (``'volo_d1_224.sail_in1k'`` -> ``'volo'``), or None if unknown."""
    name = model_name.split("/")[-1].split(".")[0]
    for prefix, family in _FAMILY_PREFIXES:
        if name.startswith(prefix):
            return family
    return None


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def clean_state_dict(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Removes DataParallel (``module.``) and torch.compile (``_orig_mod.``) key prefixes, like timm's."""
    return {_strip_wrappers(k): v for k, v in state_dict.items()}


def _rules(family: str) -> list[tuple[re.Pattern[str], str]]:
    if family not in _COMPILED:
        _COMPILED[family] = [(re.compile(p), r) for p, r in RENAME_RULES.get(family, [])]
    return _COMPILED[family]


def rename_key(key: str, family: str | None) -> str:
    """Applies the family's rules, in order, to one (already cleaned) key."""
    for pattern, repl in _rules(family) if family else []:
        key = pattern.sub(repl, key)
    return key


def apply_rules(state_dict: Mapping[str, V], family: str | None) -> dict[str, V]:
    """Cleans wrapper prefixes and renames an original checkpoint's keys to timm's.

    Args:
        state_dict: torch key -> tensor/array.
        family: a key of :data:`RENAME_RULES` (see :func:`family_of`); None or an unknown family only cleans.

    Returns:
        A new dict with timm's key names (values untouched).

    Raises:
        ValueError: if two keys end up with the same name (a broken rule or a doubly wrapped checkpoint).
    """
    out: dict[str, V] = {}
    for key, value in state_dict.items():
        new = rename_key(_strip_wrappers(key), family)
        if new in out:
            raise ValueError(f"Key {key!r} renames to {new!r}, which another key of the checkpoint already took")
        out[new] = value
    return out
