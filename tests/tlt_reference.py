"""The tlt 0.2.0 (TokenLabeling) reference pieces the token-labeling tests compare against.

``tlt/data/__init__.py`` imports timm internals that timm 1.0 no longer has, so its data modules are loaded on their
own by file location (they need only numpy, scipy, torch and torchvision); ``tlt.loss`` imports normally.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def tlt_data_module(name: str):
    """``tlt/data/<name>.py`` as a module (``mixup``, ``random_augment_label``); skips without tlt."""
    spec = importlib.util.find_spec("tlt")
    if spec is None:
        pytest.skip("tlt (the torch extra) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.py"
    mod_spec = importlib.util.spec_from_file_location(f"_tlt_data_{name}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


def tlt_input(scores: np.ndarray, indices: np.ndarray, boxes: np.ndarray, labels: np.ndarray):
    """tlt's (B, 3, k, H, W) batch: [:, 0] scores, [:, 1] indices, crop box at [:, 2, 0, 0, :4], label at [..., 5].

    tlt edits the box in place (``coords[:, 2:] += coords[:, :2]``): build a fresh one for every call.
    """
    import torch

    B, k, H, W = scores.shape
    x = torch.zeros(B, 3, k, H, W)
    x[:, 0] = torch.from_numpy(np.array(scores, np.float32))
    x[:, 1] = torch.from_numpy(np.asarray(indices)).float()
    x[:, 2, 0, 0, :4] = torch.from_numpy(np.asarray(boxes, np.float32))
    x[:, 2, 0, 0, 5] = torch.from_numpy(np.asarray(labels)).float()
    return x
