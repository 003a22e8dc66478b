"""Helpers shared by the families' frozen architecture configs."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C")


def replace_config(cfg: C, **overrides: Any) -> C:
    """``cfg`` (a frozen dataclass) with ``create_model`` overrides applied; unknown fields raise a TypeError naming
    them and listing the valid ones (``dataclasses.replace`` alone would only say "unexpected keyword")."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown {type(cfg).__name__} argument(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)
