"""Parity of our JAX models with timm on the same weights and inputs, for users and for the test suite.

    python -m converters.parity --model volo_d1_224                     # every timm tensor randomized
    python -m converters.parity --model volo_d1_224 --checkpoint d1_224_84.2.pth.tar
    python -m converters.parity --model volo_d1_224 --save-random w.safetensors --no-compare

It builds the timm model (weights from the checkpoint, or every parameter and buffer randomized so no block is near
identity), converts its state dict with our torch-free converter, feeds both the same batch and prints the max
abs/rel error of the logits, the pre-logits and each stage's output. It also feeds every block of our model the exact
input timm's block received and names the first block whose output diverges, so a mismatch points at a layer instead
of at "the logits". timm's ``features_only`` model, loaded from the same weights, is compared with ours map by map
(``--out-indices``). Exit status 1 when anything is above tolerance: ``max|delta| <= tol * max(1, max|ref|)``.

Needs the ``torch`` extra (torch, timm).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

DEFAULT_TOL = 1e-4


# --------------------------------------------------------------------------- randomization
class _CalibrationDone(Exception):
    """Raised from a forward hook to end a calibration forward once every BatchNorm has run."""


def randomize_timm_model(model: Any, *, seed: int = 0, calib_input_size: tuple[int, int] | None = None,
                         calib_batches: int = 2) -> Any:
    """Randomizes every parameter and buffer of a timm model in place, scale-preserving.

    Weights with a fan-in get N(0, 1/fan_in) (activations keep their scale, so no block is near identity and none
    explodes); 1-D scales (norm weights, layer scales, gates) U(0.5, 1.5); biases N(0, 0.1^2); embeddings and tokens
    N(0, 0.5^2). BatchNorm running statistics are first calibrated by forward passes in training mode over random
    data (cumulative average; each pass stops once every BatchNorm has run), then perturbed (mean +- 0.1 std,
    var x U(0.8, 1.25)), so the eval-mode BatchNorm is neither identity nor the batch statistics of the test input.

    Args:
        model: a timm ``nn.Module``.
        seed: torch RNG seed.
        calib_input_size: (H, W) of the calibration batch; defaults to the model's pretrained input size (pass the
            size the model was built for when it differs, e.g. VOLO with another ``img_size``).
        calib_batches: number of calibration batches for BatchNorm statistics.

    Returns:
        The same model, in eval mode.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    def rand(shape: torch.Size) -> torch.Tensor:
        return torch.rand(shape, generator=gen)

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if p.ndim >= 2 and leaf == "weight":
                fan_in = p[0].numel()
                p.copy_(randn(p.shape) / fan_in ** 0.5)
            elif leaf == "bias":
                p.copy_(0.1 * randn(p.shape))
            elif p.ndim == 1:  # norm weights, layer scales, gates
                p.copy_(0.5 + rand(p.shape))
            else:  # pos_embed, cls_token and other free tensors
                p.copy_(0.5 * randn(p.shape))

        bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if bns:
            size = calib_input_size or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
            in_chans = getattr(model, "in_chans", 3)
            saved = [(m.momentum, m.training) for m in bns]
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average over the calibration batches
            model.train()
            # Only the BatchNorms need the calibration batches: the forward stops once each has run (timm runs each
            # BatchNorm module once per forward). VOLO's are all in its stem, so its calibration costs the stem, not
            # two passes through the whole network (8.9 of 9.8 s of randomizing volo_d4_448 before).
            pending: set[int] = set()

            def seen(module: Any, _args: Any, _out: Any) -> None:
                pending.discard(id(module))
                if not pending:
                    raise _CalibrationDone

            hooks = [m.register_forward_hook(seen) for m in bns]
            try:
                for _ in range(calib_batches):
                    pending.update(id(m) for m in bns)
                    try:
                        model(randn((2, in_chans, *size)))
                    except _CalibrationDone:
                        pass
            finally:
                for h in hooks:
                    h.remove()
            for m, (momentum, _) in zip(bns, saved, strict=True):
                m.momentum = momentum
                std = m.running_var.clamp_min(1e-6).sqrt()
                m.running_mean.add_(0.1 * std * randn(m.running_mean.shape))
                m.running_var.mul_(0.8 + 0.45 * rand(m.running_var.shape))
                m.num_batches_tracked.fill_(1000)
    return model.eval()


def timm_state_dict_numpy(model: Any) -> dict[str, np.ndarray]:
    """The model's state dict as ``{key: float32/int numpy array}`` (what our converter takes)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def save_torch_checkpoint(model: Any, path: str | os.PathLike) -> Path:
    """Writes the timm model's weights atomically in the format its extension names.

    ``.safetensors`` (timm's hub format), ``.pth``/``.bin`` (a plain state dict, ``torch.save``) or ``.pth.tar``
    (``{'state_dict': ...}`` as the original sail-sg release files are laid out).
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={"format": "pt"})
        elif path.name.endswith(".pth.tar"):
            torch.save({"state_dict": sd, "epoch": 0}, tmp)
        elif path.suffix in (".pth", ".bin", ".pt"):
            torch.save(sd, tmp)
        else:
            raise ValueError(f"{path}: unsupported extension (use .safetensors, .pth, .pth.tar, .bin)")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def make_inputs(batch: int, channels: int, size: tuple[int, int] | int, *, seed: int = 0) -> np.ndarray:
    """A float32 NCHW batch whose images differ globally, not only pixel by pixel.

    Pure white noise averages out over the hundreds of tokens that a class token or a global pool attends to, so
    every image would get almost the same logits and a comparison would test little beyond the head. Each image
    here is a coarse 7x7 random pattern (nearest-upsampled) plus a per-image, per-channel offset plus fine noise.
    """
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((batch, channels, 7, 7))
    rows = (np.arange(h) * 7) // h
    cols = (np.arange(w) * 7) // w
    x = coarse[:, :, rows][:, :, :, cols]  # (B, C, H, W)
    x = x + rng.standard_normal((batch, channels, 1, 1)) + 0.5 * rng.standard_normal((batch, channels, h, w))
    return x.astype(np.float32)


# --------------------------------------------------------------------------- comparison
@dataclass
class Entry:
    """One compared tensor."""

    name: str
    max_abs: float
    max_rel: float
    ref_max: float
    tol: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs <= self.tol * max(1.0, self.ref_max))


@dataclass
class ParityReport:
    """Outputs, stages and per-block results of one parity run."""

    model: str
    outputs: list[Entry] = field(default_factory=list)
    blocks: list[Entry] = field(default_factory=list)
    batch_std: float = 0.0
    top1_equal: bool = True
    # features_only: None when not compared, else whether channels/reductions/modules equal timm's feature_info.
    feature_info_equal: bool | None = None

    @property
    def ok(self) -> bool:
        return (all(e.ok for e in self.outputs) and all(e.ok for e in self.blocks) and self.top1_equal
                and self.feature_info_equal is not False)

    @property
    def first_divergent_block(self) -> str | None:
        return next((e.name for e in self.blocks if not e.ok), None)

    def format(self) -> str:
        lines = [f"parity of volo_jax vs timm: {self.model}",
                 f"{'tensor':<34}{'max|ref|':>12}{'max abs err':>14}{'max rel err':>14}  status"]
        for e in self.outputs:
            lines.append(f"{e.name:<34}{e.ref_max:>12.4g}{e.max_abs:>14.3e}{e.max_rel:>14.3e}  "
                         f"{'ok' if e.ok else 'FAIL'}")
        if self.blocks:
            worst = max(self.blocks, key=lambda e: e.max_abs / (e.tol * max(1.0, e.ref_max)))
            lines.append(f"per-block (each block fed timm's own input): {len(self.blocks)} blocks, "
                         f"{sum(not e.ok for e in self.blocks)} diverge; worst {worst.name} "
                         f"(max abs err {worst.max_abs:.3e})")
            if self.first_divergent_block:
                lines.append(f"FIRST DIVERGENT BLOCK: {self.first_divergent_block}")
        if self.feature_info_equal is not None:
            lines.append(f"features_only feature_info (channels, reductions, modules) equal to timm's: "
                         f"{self.feature_info_equal}")
        lines.append(f"top-1 identical: {self.top1_equal}; logits std across the batch: {self.batch_std:.4g} "
                     "(must be > 0, else the comparison tests only the head)")
        lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)


def _entry(name: str, ours: Any, ref: Any, tol: float) -> Entry:
    ours = np.asarray(ours, np.float64)
    ref = np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return Entry(f"{name} shape {ours.shape}!={ref.shape}", float("inf"), float("inf"), 0.0, tol)
    diff = np.abs(ours - ref)
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return Entry(name, max_abs, max_abs / max(ref_max, 1e-12), ref_max, tol)


def _to_nhwc(t: Any) -> np.ndarray:
    a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


# Per family: which timm submodules take/return NCHW tensors (converted to NHWC for us) and which modules are the
# "blocks" compared one by one.
def _volo_block_names(model: Any) -> list[str]:
    names = ["patch_embed"]
    for i, stage in enumerate(model.network):
        if hasattr(stage, "__len__"):
            names += [f"network.{i}.{j}" for j in range(len(stage))]
        else:
            names.append(f"network.{i}")
    if model.post_network is not None:
        names += [f"post_network.{i}" for i in range(len(model.post_network))]
    names.append("norm")
    return names


def _poolformer_block_names(model: Any) -> list[str]:
    names = ["stem"]
    for i, stage in enumerate(model.stages):
        if type(stage.downsample).__name__ != "Identity":  # stage 0 keeps its width: nn.Identity
            names.append(f"stages.{i}.downsample")
        names += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
    names.append("head.norm")  # applied to the pooled (B, C, 1, 1) map
    return names


def _convit_block_names(model: Any) -> list[str]:
    # GPSA blocks see (B, N, C) patch tokens; the MHSA blocks after local_up_to_layer and the norm (B, 1 + N, C).
    return ["patch_embed", *(f"blocks.{i}" for i in range(len(model.blocks))), "norm"]


def _vovnet_block_names(model: Any) -> list[str]:
    # The stem convs one by one, then every OSA block (the stages' max pools have no parameters).
    names = [f"stem.{i}" for i in range(len(model.stem))]
    for i, stage in enumerate(model.stages):
        names += [f"stages.{i}.blocks.{j}" for j in range(len(stage.blocks))]
    return names


FAMILY_BLOCKS: dict[str, tuple[Callable[[Any], list[str]], Callable[[str], bool]]] = {
    # VOLO is NHWC after its stem; only patch_embed sees NCHW.
    "volo": (_volo_block_names, lambda name: name.startswith("patch_embed")),
    # PoolFormer (timm's MetaFormer with the pooling mixer) is NCHW everywhere.
    "poolformer": (_poolformer_block_names, lambda name: True),
    # ConViT: only patch_embed's input is NCHW; its output is flattened to (B, N, C) (3-D, left as is), like the rest.
    "convit": (_convit_block_names, lambda name: name == "patch_embed"),
    # VoVNet is NCHW everywhere.
    "vovnet": (_vovnet_block_names, lambda name: True),
}


def _get_submodule(model: Any, dotted: str) -> Any:
    obj = model
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def compare_models(timm_model: Any, jax_model: Any, x_nchw: np.ndarray, *, family: str, name: str = "",
                   tol: float = DEFAULT_TOL, per_block: bool = True) -> ParityReport:
    """Runs both models on the same batch and compares logits, pre-logits, stage outputs and each block.

    Args:
        timm_model: timm model in eval mode.
        jax_model: our model, weights converted from ``timm_model``, in eval mode.
        x_nchw: float32 batch ``(B, C, H, W)`` (transposed to NHWC for our model).
        family: registry family (selects the block list and layouts).
        name: model name for the report.
        tol: tolerance factor of ``max|delta| <= tol * max(1, max|ref|)``.
        per_block: also compare every block on timm's own block inputs.
    """
    import torch

    report = ParityReport(name)
    x_t = torch.from_numpy(np.ascontiguousarray(x_nchw, np.float32))
    x_j = np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1))

    block_names, is_nchw = FAMILY_BLOCKS[family]
    records: dict[str, tuple[Any, Any]] = {}
    hooks = []
    if per_block:
        for bname in block_names(timm_model):
            mod = timm_model.get_submodule(bname)

            def hook(_m: Any, args: tuple, out: Any, bname: str = bname) -> None:
                records.setdefault(bname, (args[0].detach().clone(), out.detach().clone()))

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            feats_t = timm_model.forward_features(x_t)
            pre_t = timm_model.forward_head(feats_t, pre_logits=True)
            logits_t = timm_model.forward_head(feats_t)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        inter_t = timm_model.forward_intermediates(x_t, intermediates_only=True)

    feats_j, pre_j, logits_j, inter_j = _nnx_run(jax_model, x_j)
    report.outputs.append(_entry("logits", logits_j, logits_t.numpy(), tol))
    report.outputs.append(_entry("pre_logits", pre_j, pre_t.numpy(), tol))
    report.outputs.append(_entry("features (forward_features)", feats_j, _to_nhwc(feats_t), tol))
    for i, (a, b) in enumerate(zip(inter_j, inter_t, strict=True)):
        report.outputs.append(_entry(f"stage {i} (forward_intermediates)", a, _to_nhwc(b), tol))
    ref_logits = logits_t.numpy()
    report.batch_std = float(ref_logits.std(axis=0).mean()) if ref_logits.ndim == 2 and len(ref_logits) > 1 else 0.0
    if ref_logits.ndim == 2:
        report.top1_equal = bool((np.asarray(logits_j).argmax(-1) == ref_logits.argmax(-1)).all())

    for bname in block_names(timm_model) if per_block else []:
        if bname not in records:
            continue
        inp, out = records[bname]
        layout = _to_nhwc if is_nchw(bname) else (lambda t: t.detach().cpu().numpy())
        ours = _nnx_call(_get_submodule(jax_model, bname), layout(inp))
        report.blocks.append(_entry(bname, ours, layout(out), tol))
    return report


def _forward_all(m: Any, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, list[jax.Array]]:
    feats = m.forward_features(x)
    return (feats, m.forward_head(feats, pre_logits=True), m(x), m.forward_intermediates(x, intermediates_only=True))


def _call(m: Any, x: jax.Array) -> jax.Array:
    return m(x)


_jitted: dict[str, Any] = {}


def _nnx_jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """One ``nnx.jit`` wrapper per function, so blocks of the same structure share one compiled program."""
    from flax import nnx

    if fn.__name__ not in _jitted:
        _jitted[fn.__name__] = nnx.jit(fn)
    return _jitted[fn.__name__]


def _nnx_run(model: Any, x: np.ndarray) -> tuple[Any, Any, Any, list[Any]]:
    return _nnx_jit(_forward_all)(model, x)


def _nnx_call(module: Any, x: np.ndarray) -> np.ndarray:
    return np.asarray(_nnx_jit(_call)(module, x))


# --------------------------------------------------------------------------- end to end
def build_pair(model_name: str, *, checkpoint: str | None = None, flax_params: str | None = None,
               img_size: int | None = None, num_classes: int | None = None, seed: int = 0) -> tuple[Any, Any, str]:
    """timm model (checkpoint weights, or randomized) and our model converted from its state dict.

    ``flax_params`` (a directory written by ``python -m converters``) loads our model from there instead of
    converting ``checkpoint`` again, so the comparison covers the saved conversion.

    Returns:
        ``(timm_model, jax_model, family)``, both in eval mode.
    """
    import timm
    import torch

    import volo_jax
    from converters.torch_to_flax import convert_state_dict
    from volo_jax.registry import get_entry, split_model_name

    entry, _ = get_entry(model_name)
    arch, _ = split_model_name(model_name)
    kw: dict[str, Any] = {}
    if img_size is not None:
        kw["img_size"] = img_size
    if num_classes is not None:
        kw["num_classes"] = num_classes
    torch.manual_seed(seed)
    timm_model = timm.create_model(arch, pretrained=False, **kw)
    if checkpoint is not None:
        jax_model = volo_jax.create_model(model_name, pretrained=flax_params or checkpoint, **kw)
        from converters.readers import read_checkpoint

        sd = {k: torch.from_numpy(np.array(v)) for k, v in read_checkpoint(checkpoint).items()}
        timm_model.load_state_dict(sd, strict=True)
        timm_model.eval()
    else:
        randomize_timm_model(timm_model, seed=seed, calib_input_size=(img_size, img_size) if img_size else None)
        jax_model = volo_jax.create_model(model_name, **kw)
        state = convert_state_dict(timm_state_dict_numpy(timm_model), jax_model)
        from flax import nnx

        nnx.update(jax_model, state)
    jax_model.eval()
    return timm_model, jax_model, entry.family


def compare_features_only(timm_features: Any, ours: Any, x_nchw: np.ndarray, report: ParityReport, *,
                          tol: float = DEFAULT_TOL) -> ParityReport:
    """Adds timm's ``features_only`` maps vs ours (NHWC) and their ``feature_info`` to ``report``.

    Args:
        timm_features: ``timm.create_model(name, features_only=True, ...)`` in eval mode.
        ours: our :class:`volo_jax.features.FeatureGetter` with the same weights and ``out_indices``, in eval mode.
        x_nchw: float32 batch ``(B, C, H, W)``.
        report: the report to extend (``feature_info_equal`` is set).
        tol: tolerance factor.
    """
    import torch

    with torch.no_grad():
        maps_t = timm_features(torch.from_numpy(np.ascontiguousarray(x_nchw, np.float32)))
    maps_j = _nnx_jit(_call)(ours, np.ascontiguousarray(x_nchw.transpose(0, 2, 3, 1)))
    info_t = timm_features.feature_info
    report.feature_info_equal = (
        ours.feature_info.channels() == list(info_t.channels())
        and ours.feature_info.reduction() == list(info_t.reduction())
        and ours.feature_info.module_name() == list(info_t.module_name())
        and len(maps_j) == len(maps_t)
    )
    for i, (a, b, f) in enumerate(zip(maps_j, maps_t, ours.feature_info, strict=False)):
        report.outputs.append(_entry(f"features_only map {i} ({f['module']})", a, _to_nhwc(b), tol))
    return report


def compare_features_from_file(model_name: str, path: str | os.PathLike, model: Any, x_nchw: np.ndarray,
                               report: ParityReport, *, out_indices: int | tuple[int, ...] | None = None,
                               tol: float = DEFAULT_TOL, **kwargs: Any) -> ParityReport:
    """timm's ``features_only`` model loaded from ``path`` vs ``model`` (ours, same weights) wrapped likewise.

    ``model`` is pruned in place (it becomes the inner model of a :class:`volo_jax.features.FeatureGetter`), so call
    this after every other comparison. ``kwargs`` go to ``timm.create_model`` (``img_size``, ``num_classes``).
    """
    import timm

    from volo_jax.features import FeatureGetter
    from volo_jax.registry import get_entry, split_model_name

    entry, _ = get_entry(model_name)
    ours = FeatureGetter(model, entry.default_out_indices if out_indices is None else out_indices)  # checks indices
    feat_kw = dict(kwargs) if out_indices is None else dict(kwargs, out_indices=out_indices)
    timm_features = timm.create_model(split_model_name(model_name)[0], features_only=True, pretrained=True,
                                      pretrained_cfg_overlay=dict(file=str(path)), **feat_kw).eval()
    return compare_features_only(timm_features, ours, x_nchw, report, tol=tol)


def saved_checkpoint_parity(model_name: str, directory: str | os.PathLike, *, batch: int = 2,
                            formats: tuple[str, ...] = (".safetensors",), seed: int = 1, features: bool = True,
                            out_indices: int | tuple[int, ...] | None = None, per_block: bool = True,
                            **kwargs: Any) -> ParityReport:
    """The acceptance check of a variant: randomized timm -> file(s) -> ``create_model(pretrained=file)`` vs timm.

    Every tensor of timm's model is randomized, saved in each of ``formats`` under ``directory``, loaded through
    ``volo_jax.create_model(name.tag, pretrained=file)`` (the first format) or the ``load_pretrained`` it calls into
    the same model with every variable set to NaN first (the others); all formats must convert to bit-identical
    variables (AssertionError otherwise), then the model is compared with timm on ``make_inputs``. With ``features``,
    timm's ``features_only`` model loaded from the same file is compared with ours (the same model, wrapped as
    ``create_model(features_only=True)`` does) on every map.

    Args:
        model_name: registered architecture name (the default pretrained tag is used for ``create_model``).
        directory: where the checkpoint files are written (each is deleted after loading).
        batch: images in the comparison batch (>= 2, so variation across the batch can be checked).
        formats: file extensions to round-trip (``.safetensors``, ``.pth``, ``.pth.tar``, ``.bin``).
        seed: randomization seed.
        features: also compare the ``features_only`` models.
        out_indices: ``out_indices`` of both ``features_only`` models (None: each library's family default).
        per_block: also compare every block on timm's own block inputs.
        **kwargs: passed to both ``timm.create_model`` and ``volo_jax.create_model`` (``img_size``, ``num_classes``).
    """
    import gc

    import timm
    import torch
    from flax import nnx

    import volo_jax
    from volo_jax.hub import load_pretrained
    from volo_jax.registry import get_entry, get_pretrained_cfg

    entry, _ = get_entry(model_name)
    tag = get_pretrained_cfg(model_name)["tag"]
    full_name = f"{model_name}.{tag}" if tag else model_name
    torch.manual_seed(0)
    ref = timm.create_model(model_name, **kwargs)
    size = kwargs.get("img_size")
    randomize_timm_model(ref, seed=seed, calib_input_size=(size, size) if size else None)
    first: dict[Any, np.ndarray] | None = None
    model = None
    path = None
    for ext in formats:
        if path is not None:
            path.unlink()
        path = save_torch_checkpoint(ref, Path(directory) / f"{model_name}{ext}")
        if model is None:
            model = volo_jax.create_model(full_name, pretrained=str(path), **kwargs)
        else:
            # The other formats load into the same model through what create_model(pretrained=...) calls, after
            # every variable was set to NaN, so a variable the file did not fill fails the comparison below. (A
            # second create_model would initialise it with the same seed, equal to the first model's, and let that
            # pass; it would also redo the random initialisation that loading overwrites.)
            variables = nnx.state(model, (nnx.Param, nnx.BatchStat))
            nnx.update(model, jax.tree.map(lambda v: jax.numpy.full_like(v, np.nan), variables))
            del variables
            load_pretrained(model, str(path), model_name=full_name)
        flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
        state = {k: np.asarray(v.get_value()) for k, v in flat}
        if first is None:
            first = state
            continue
        assert state.keys() == first.keys(), f"{ext}: other variables than {formats[0]}"
        for k in first:  # every file format converts to bit-identical parameters
            np.testing.assert_array_equal(state[k], first[k], err_msg=f"{ext}: {k}")
    del first
    model.eval()
    size = model.pretrained_cfg["input_size"][1:]
    x = make_inputs(batch, getattr(ref, "in_chans", 3), tuple(size), seed=0)
    try:
        report = compare_models(ref, model, x, family=entry.family, name=model_name, per_block=per_block)
        if features:
            ref = None  # one timm copy at a time
            gc.collect()
            compare_features_from_file(model_name, path, model, x, report, out_indices=out_indices, **kwargs)
    finally:
        path.unlink()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m converters.parity",
        description="Compare a volo_jax model with timm on the same weights and the same random inputs. Prints the "
                    "max abs/rel error of logits, pre-logits, features and each stage, compares every block on "
                    "timm's own block inputs and names the first divergent one. Exit status 1 above tolerance.",
    )
    parser.add_argument("--model", required=True, help="timm model name, optionally with tag (volo_d1_224.sail_in1k)")
    parser.add_argument("--checkpoint", default=None,
                        help="PyTorch checkpoint (.safetensors/.pth/.pth.tar/.bin) loaded into both models; "
                             "omitted: every timm parameter and buffer is randomized (scale-preserving)")
    parser.add_argument("--flax-params", default=None, metavar="DIR",
                        help="with --checkpoint: load our model from DIR, written by `python -m converters` from that "
                             "checkpoint, instead of converting the checkpoint again")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    parser.add_argument("--batch-size", "-b", type=int, default=2, help="images in the random test batch (default 2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the randomized weights and of the input batch (default 0)")
    parser.add_argument("--tol", type=float, default=DEFAULT_TOL,
                        help="pass when max|delta| <= tol * max(1, max|ref|) for every compared tensor (default 1e-4)")
    parser.add_argument("--no-per-block", action="store_true", help="skip the block-by-block comparison")
    parser.add_argument("--no-features", action="store_true",
                        help="skip the features_only comparison (timm's features_only model loaded from the same "
                             "weights vs ours, every map and feature_info)")
    parser.add_argument("--out-indices", type=int, nargs="+", default=None, metavar="I",
                        help="feature maps compared with features_only (indices into feature_info; one value n = "
                             "the last n); default: each family's timm default")
    parser.add_argument("--save-random", default=None, metavar="FILE",
                        help="also save the (randomized) timm weights to FILE (.safetensors, .pth, .pth.tar, .bin)")
    parser.add_argument("--no-compare", action="store_true",
                        help="only build (and with --save-random save) the timm weights; no JAX model, no report")
    args = parser.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        import timm  # noqa: F401
        import torch
    except ImportError:
        print("converters.parity needs torch and timm: pip install 'volo-jax[torch]'", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)

    t0 = time.perf_counter()
    if args.no_compare:
        import timm

        from volo_jax.registry import split_model_name

        kw = {k: v for k, v in dict(img_size=args.img_size, num_classes=args.num_classes).items() if v is not None}
        torch.manual_seed(args.seed)
        timm_model = timm.create_model(split_model_name(args.model)[0], pretrained=False, **kw)
        size = (args.img_size, args.img_size) if args.img_size else None
        randomize_timm_model(timm_model, seed=args.seed, calib_input_size=size)
        if args.save_random:
            path = save_torch_checkpoint(timm_model, args.save_random)
            n = sum(v.numel() for v in timm_model.state_dict().values())
            print(f"saved randomized timm {args.model} ({n / 1e6:.1f}M values) to {path}")
        return 0

    try:
        if args.flax_params and not args.checkpoint:
            parser.error("--flax-params needs --checkpoint (the PyTorch file timm loads)")
        timm_model, jax_model, family = build_pair(args.model, checkpoint=args.checkpoint,
                                                   flax_params=args.flax_params, img_size=args.img_size,
                                                   num_classes=args.num_classes, seed=args.seed)
    except Exception as e:  # conversion errors are the most common user-facing failure: show them plainly
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if args.save_random:
        print(f"saved timm weights to {save_torch_checkpoint(timm_model, args.save_random)}")
    size = args.img_size or timm_model.pretrained_cfg["input_size"][1]
    x = make_inputs(args.batch_size, getattr(timm_model, "in_chans", 3), size, seed=args.seed)
    report = compare_models(timm_model, jax_model, x, family=family, name=args.model, tol=args.tol,
                            per_block=not args.no_per_block)
    if not args.no_features:
        out_indices = None if args.out_indices is None else \
            (args.out_indices[0] if len(args.out_indices) == 1 else tuple(args.out_indices))
        kw = {k: v for k, v in dict(img_size=args.img_size, num_classes=args.num_classes).items() if v is not None}
        with tempfile.TemporaryDirectory() as tmp:
            weights = args.checkpoint or save_torch_checkpoint(timm_model, Path(tmp) / "weights.safetensors")
            timm_model = None  # one timm copy at a time
            try:
                compare_features_from_file(args.model, weights, jax_model, x, report, out_indices=out_indices,
                                           tol=args.tol, **kw)
            except ValueError as e:  # a bad --out-indices
                print(f"error: {e}", file=sys.stderr)
                return 2
    print(report.format())
    print(f"({time.perf_counter() - t0:.1f}s, input {tuple(x.shape)} NCHW for timm / NHWC for JAX)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
