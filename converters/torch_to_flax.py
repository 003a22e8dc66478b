"""Pure, torch-free conversion of a timm (PyTorch) state dict into the state of a Flax NNX model.

Our models mirror timm's attribute names and nesting, so the NNX path ``('network', 0, 1, 'attn', 'v', 'kernel')``
is the torch key ``network.0.1.attn.v.weight``. Conversion is therefore a renaming plus a layout change chosen by
the TYPE of the module that owns each variable (never by tensor rank):

=====================================  ================================  ==========================================
owner module                           NNX variable <- torch key          layout
=====================================  ================================  ==========================================
``nnx.Linear``                         kernel <- weight, bias <- bias      (out, in) -> (in, out)
``nnx.Conv`` (grouped/depthwise too)   kernel <- weight, bias <- bias      (O, I/g, *k) -> (*k, I/g, O)
``nnx.Embed``                          embedding <- weight                 unchanged
``nnx.LayerNorm/GroupNorm/RMSNorm``    scale <- weight, bias <- bias       unchanged
``nnx.BatchNorm``                      + mean <- running_mean,             unchanged (``num_batches_tracked`` is
                                       var <- running_var                  accepted and dropped)
anything else (``cls_token``, ...)     same name                           unchanged
=====================================  ================================  ==========================================

Only ``nnx.Param`` and ``nnx.BatchStat`` variables come from a checkpoint; RNG state and other variables keep
whatever the model has. Loading fails loudly: every missing key, unexpected key and shape mismatch is collected and
raised as ONE :class:`ConversionError`.

Position embeddings of a checkpoint trained at another resolution are resampled exactly like timm
(``timm.layers.resample_abs_pos_embed_nhwc``: ``F.interpolate(mode='bicubic', antialias=True)``), by a numpy port
of torch's antialiased bicubic kernel (:func:`resample_abs_pos_embed_nhwc`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "CHECKPOINT_VARIABLE_TYPES",
    "ConversionError",
    "ConversionReport",
    "KeyInfo",
    "convert_state_dict",
    "convert_with_report",
    "maybe_resample_pos_embed",
    "model_key_map",
    "raise_for_problems",
    "resample_abs_pos_embed_nhwc",
]

_logger = logging.getLogger(__name__)

# Variable types that a checkpoint provides. Everything else (RNG keys/counts, caches) stays as the model has it.
CHECKPOINT_VARIABLE_TYPES: tuple[type[nnx.Variable], ...] = (nnx.Param, nnx.BatchStat)

# torch buffers without an NNX counterpart that a checkpoint may legitimately carry (last key component).
_IGNORED_TORCH_NAMES = ("num_batches_tracked",)

# Below this fraction of expected keys found in the checkpoint we say it is probably for another architecture.
_ARCH_OVERLAP_THRESHOLD = 0.5

Transform = Literal["linear", "conv", "identity"]

_NORM_TYPES: tuple[type[nnx.Module], ...] = tuple(
    t for t in (getattr(nnx, n, None) for n in ("LayerNorm", "GroupNorm", "BatchNorm", "RMSNorm")) if t is not None
)
_NORM_NAMES = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


class ConversionError(ValueError):
    """A checkpoint does not fit the target model; the message lists every problem at once.

    Attributes:
        missing: ``(torch_key, expected_torch_shape, nnx_path)`` of expected tensors absent from the checkpoint.
        unexpected: ``(torch_key, shape)`` of checkpoint tensors the model has no place for.
        mismatched: ``(torch_key, checkpoint_shape, expected_torch_shape, nnx_path)``.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[tuple[str, tuple[int, ...], str]] = (),
        unexpected: Sequence[tuple[str, tuple[int, ...]]] = (),
        mismatched: Sequence[tuple[str, tuple[int, ...], tuple[int, ...], str]] = (),
    ):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)


@dataclass(frozen=True)
class KeyInfo:
    """Where one torch tensor goes in the NNX model, and how its layout changes on the way.

    Attributes:
        path: NNX state path, e.g. ``('network', 0, 1, 'attn', 'v', 'kernel')``.
        transform: ``'linear'`` (transpose), ``'conv'`` (OIHW -> HWIO) or ``'identity'``.
        shape: shape of the NNX variable.
        dtype: dtype of the NNX variable (converted values are cast to it).
        variable_type: ``nnx.Param`` or ``nnx.BatchStat``.
    """

    path: tuple[Any, ...]
    transform: Transform
    shape: tuple[int, ...]
    dtype: Any
    variable_type: type[nnx.Variable]

    @property
    def dotted_path(self) -> str:
        """The NNX path as ``a.0.b`` (the key used by :mod:`volo_jax.checkpoint`)."""
        return ".".join(str(p) for p in self.path)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """Shape the torch tensor must have to land in this variable."""
        return _perm_shape(self.shape, _to_torch_perm(self.transform, len(self.shape)))

    def to_flax(self, array: np.ndarray) -> np.ndarray:
        """Torch layout -> NNX layout (no dtype change)."""
        return np.transpose(array, _to_flax_perm(self.transform, array.ndim))

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        """NNX layout -> torch layout (no dtype change); for parity tools."""
        return np.transpose(array, _to_torch_perm(self.transform, array.ndim))


@dataclass
class ConversionReport:
    """What :func:`convert_state_dict` did, for summaries and logs.

    Attributes:
        converted: torch keys that were converted.
        ignored: checkpoint keys dropped by ``ignore_prefixes``.
        skipped: checkpoint keys dropped because they have no NNX counterpart (``num_batches_tracked``).
        resized: torch key -> (checkpoint shape, new shape) of resampled position embeddings.
        num_params: number of scalars converted.
        num_bytes: bytes of the converted arrays in their target dtypes.
    """

    converted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    num_params: int = 0
    num_bytes: int = 0


# ------------------------------------------------------------------------------------------------ layouts
def _to_flax_perm(transform: Transform, ndim: int) -> tuple[int, ...]:
    if transform == "linear":
        return (1, 0)
    if transform == "conv":
        # torch (O, I/g, *spatial) -> flax (*spatial, I/g, O); also right for grouped and depthwise convs.
        return (*range(2, ndim), 1, 0)
    return tuple(range(ndim))


def _to_torch_perm(transform: Transform, ndim: int) -> tuple[int, ...]:
    if transform == "linear":
        return (1, 0)
    if transform == "conv":
        # flax (*spatial, I/g, O) -> torch (O, I/g, *spatial)
        return (ndim - 1, ndim - 2, *range(ndim - 2))
    return tuple(range(ndim))


def _perm_shape(shape: Sequence[int], perm: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(shape[p]) for p in perm)


def _torch_name_and_transform(owner: Any, name: str) -> tuple[str, Transform]:
    """Torch attribute name and layout change of the variable ``name`` owned by module ``owner``."""
    if isinstance(owner, nnx.Linear):
        return ("weight", "linear") if name == "kernel" else (name, "identity")
    if isinstance(owner, nnx.Conv):
        return ("weight", "conv") if name == "kernel" else (name, "identity")
    if isinstance(owner, nnx.Embed):
        return ("weight", "identity") if name == "embedding" else (name, "identity")
    if isinstance(owner, _NORM_TYPES):
        return _NORM_NAMES.get(name, name), "identity"
    return name, "identity"


def model_key_map(model: nnx.Module) -> dict[str, KeyInfo]:
    """Maps every torch key the model expects to where and how it lands in the model.

    Works on concrete and abstract (``nnx.eval_shape``) models alike. For the reverse direction (NNX path -> torch
    key, e.g. in a parity tool) invert it: ``{info.path: key for key, info in model_key_map(m).items()}``.

    Args:
        model: the target NNX module.

    Returns:
        ``{torch_key: KeyInfo}`` for every ``nnx.Param`` / ``nnx.BatchStat`` of the model, sorted by torch key.
    """
    modules: dict[tuple[Any, ...], Any] = {}
    variables: list[tuple[tuple[Any, ...], nnx.Variable]] = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            modules[tuple(path)] = node
        elif isinstance(node, CHECKPOINT_VARIABLE_TYPES):
            variables.append((tuple(path), node))
    out: dict[str, KeyInfo] = {}
    for path, var in variables:
        # A variable held directly by a module (the normal case) is renamed by that module's type; one inside a
        # plain container has no owner module and keeps its name.
        owner = modules.get(path[:-1])
        torch_name, transform = _torch_name_and_transform(owner, str(path[-1]))
        key = ".".join([*(str(p) for p in path[:-1]), torch_name])
        value = var.get_value()
        shape, dtype = tuple(int(s) for s in value.shape), np.dtype(value.dtype)
        if transform != "identity" and len(shape) < 2:
            transform = "identity"  # e.g. a 1-D kernel can't be a weight matrix; never transpose what isn't one
        if key in out:  # two NNX variables mapping to one torch key would silently drop one of them
            raise ConversionError(f"NNX paths {out[key].path} and {path} both map to torch key {key!r}")
        out[key] = KeyInfo(path=path, transform=transform, shape=shape, dtype=dtype, variable_type=type(var))
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------ pos_embed resampling
def _aa_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) weights of torch's antialiased bicubic interpolation along one axis.

    Port of ATen's ``_compute_indices_min_size_weights_aa`` (UpSampleKernel.cpp) for ``align_corners=False`` and
    no explicit scale factor: PIL's bicubic filter (a = -0.5), its support widened by the downscale factor so
    downsampling averages (antialiasing), the window clipped at the borders and the weights renormalised.
    """
    a = -0.5
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0  # interp_size / 2 = 2 for bicubic
    invscale = 1.0 / scale if scale >= 1.0 else 1.0

    def cubic(x: np.ndarray) -> np.ndarray:
        x = np.abs(x)
        near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0  # |x| < 1
        far = (((x - 5.0) * x + 8.0) * x - 4.0) * a  # 1 <= |x| < 2
        return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))

    weights = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        # int() truncates toward zero like the C++ static_cast; max(.., 0) makes the sign irrelevant.
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        j = np.arange(xmin, xmax)
        w = cubic((j - center + 0.5) * invscale)
        total = w.sum()
        weights[i, xmin:xmax] = w / total if total != 0.0 else w
    return weights


def resample_abs_pos_embed_nhwc(posemb: np.ndarray, new_size: Sequence[int]) -> np.ndarray:
    """Resamples a ``(1, H, W, C)`` position embedding to ``(1, *new_size, C)`` like timm.

    Numerically equal (up to float rounding) to ``timm.layers.resample_abs_pos_embed_nhwc`` with its defaults,
    i.e. ``F.interpolate(..., mode='bicubic', antialias=True, align_corners=False)`` on the NCHW tensor; the
    interpolation is separable, so it is two small matrix products. Computed in float64, returned in the input
    dtype (timm computes in float32 and casts back).

    Args:
        posemb: ``(1, H, W, C)`` (or ``(H, W, C)``) array.
        new_size: target ``(H', W')``.

    Returns:
        The resampled embedding with the same leading shape as ``posemb``.
    """
    new_h, new_w = (int(s) for s in new_size)
    h, w, c = posemb.shape[-3:]
    if (h, w) == (new_h, new_w):
        return posemb
    x = np.asarray(posemb, dtype=np.float64).reshape(h, w, c)
    wh = _aa_bicubic_weights(h, new_h)  # (H', H)
    ww = _aa_bicubic_weights(w, new_w)  # (W', W)
    out = np.einsum("ih,hwc,jw->ijc", wh, x, ww)  # (H', W', C)
    return out.reshape(*posemb.shape[:-3], new_h, new_w, c).astype(posemb.dtype)


def _pos_embed_grid(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """The (H, W) grid of a position embedding shape we know how to resample, else None."""
    if len(shape) == 4 and shape[0] == 1:  # VOLO: (1, H, W, C) NHWC
        return shape[1], shape[2]
    if len(shape) == 3 and shape[0] == 1:  # ConViT: (1, H*W, C) without prefix tokens; only square grids are safe
        side = math.isqrt(shape[1])
        if side * side == shape[1]:
            return side, side
    return None


def maybe_resample_pos_embed(key: str, array: np.ndarray, expected: tuple[int, ...]) -> np.ndarray | None:
    """Resampled ``array`` if ``key`` is a position embedding that only differs from ``expected`` in its grid."""
    if key.rsplit(".", 1)[-1] != "pos_embed" or array.ndim != len(expected) or array.shape[-1] != expected[-1]:
        return None
    old_grid, new_grid = _pos_embed_grid(tuple(array.shape)), _pos_embed_grid(expected)
    if old_grid is None or new_grid is None:
        return None
    grid = array.reshape(1, *old_grid, array.shape[-1])
    out = resample_abs_pos_embed_nhwc(grid, new_grid).reshape(expected)
    _logger.info("Resampled position embedding %s from grid %s to %s (bicubic, antialias, like timm).",
                 key, old_grid, new_grid)
    return out


# ------------------------------------------------------------------------------------------- conversion
def _fmt_shape(shape: Sequence[int]) -> str:
    return str(tuple(int(s) for s in shape))


def _format_problems(
    *,
    target: str,
    num_expected: int,
    num_found: int,
    missing: list[tuple[str, tuple[int, ...], str]],
    unexpected: list[tuple[str, tuple[int, ...]]],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]],
    other_architecture: bool,
    example_expected: list[str],
    example_found: list[str],
    key_noun: str = "key",
    hint: str = "",
) -> str:
    counts = ", ".join(
        f"{n} {what}" for n, what in ((len(missing), "missing"), (len(unexpected), "unexpected"),
                                      (len(mismatched), "shape mismatch" + ("es" if len(mismatched) > 1 else "")))
        if n
    )
    lines = [f"Cannot load checkpoint into {target}: {counts}."]
    # In the other-architecture case every key is a problem; list a few and keep the full lists on the exception.
    limit = 20 if other_architecture else None
    if other_architecture:
        overlap = num_expected - len(missing) - len(mismatched)
        lines.append(
            f"Only {overlap} of the {num_expected} {key_noun}s the model expects are in the checkpoint with the right "
            f"shape ({num_found} {key_noun}s in it): it is probably for another architecture (or its keys need "
            "renaming, see converters.rules)."
        )
        lines.append("  example checkpoint keys: " + ", ".join(example_found))
        lines.append("  example expected keys:   " + ", ".join(example_expected))

    def section(title: str, rows: list[str]) -> None:
        if not rows:
            return
        lines.append(f"{title} ({len(rows)}):")
        shown = rows if limit is None else rows[:limit]
        lines.extend("  " + r for r in shown)
        if len(shown) < len(rows):
            lines.append(f"  ... and {len(rows) - len(shown)} more (all listed in the exception's attributes)")

    section("Shape mismatches: key: checkpoint shape != expected shape -> model path",
            [f"{k}: {_fmt_shape(s)} != {_fmt_shape(e)} -> {p}" for k, s, e, p in mismatched])
    section("Missing from the checkpoint: key: expected shape -> model path",
            [f"{k}: {_fmt_shape(e)} -> {p}" for k, e, p in missing])
    section("Unexpected in the checkpoint: key: shape", [f"{k}: {_fmt_shape(s)}" for k, s in unexpected])
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def raise_for_problems(
    *,
    target: str,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    found: Mapping[str, tuple[int, ...]],
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]],
    key_noun: str = "key",
    hint: str = "",
) -> None:
    """Raises one :class:`ConversionError` listing every missing/unexpected/mismatched key, if there is any.

    Shared by the torch converter and :func:`volo_jax.checkpoint.load_params`.

    Args:
        target: what was being loaded, for the message (e.g. the model class name).
        expected: key -> (expected shape, model path) of everything the model needs.
        found: key -> shape of everything the checkpoint provides.
        mismatched: ``(key, checkpoint_shape, expected_shape, model_path)`` found by the caller.
        key_noun: how to call a key in the message.
        hint: a last line of advice, shown only when something is wrong.
    """
    missing = sorted((k, s, p) for k, (s, p) in expected.items() if k not in found)
    unexpected = sorted((k, s) for k, s in found.items() if k not in expected)
    mismatched = sorted(mismatched)
    if not (missing or unexpected or mismatched):
        return
    # Keys present but all mis-shaped (volo_d2 weights into volo_d1) point at another architecture as much as
    # absent keys do, so only exact matches count as overlap.
    matched = len(expected) - len(missing) - len(mismatched)
    other_arch = bool(expected) and matched / len(expected) < _ARCH_OVERLAP_THRESHOLD
    message = _format_problems(
        target=target, num_expected=len(expected), num_found=len(found), missing=missing, unexpected=unexpected,
        mismatched=mismatched, other_architecture=other_arch,
        example_expected=[k for k, *_ in missing[:5]] or [k for k, *_ in mismatched[:5]],
        example_found=[k for k, _ in unexpected[:5]] or [k for k, *_ in mismatched[:5]], key_noun=key_noun,
        hint=hint,
    )
    raise ConversionError(message, missing=missing, unexpected=unexpected, mismatched=mismatched)


def _has_prefix(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _progress(items: Iterable[Any], total: int, enabled: bool) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm  # imported only when a progress bar is asked for

    return tqdm(items, total=total, desc="converting", unit="tensor")


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model_or_abstract: nnx.Module,
    *,
    ignore_prefixes: Sequence[str] = (),
    resample_pos_embed: bool = True,
    progress: bool = False,
) -> nnx.State:
    """Converts a timm-named PyTorch state dict (numpy arrays) into the NNX state of ``model_or_abstract``.

    The model is only read (its variable paths, owner module types, shapes and dtypes), so an abstract model from
    ``nnx.eval_shape(lambda: create_model(...))`` works and costs no initialisation. Apply the result with
    ``nnx.update(model, state)``. :func:`convert_with_report` does the same and also says what it did.

    Args:
        state_dict: torch key -> numpy array, in timm's key names (see :func:`converters.rules.apply_rules` for
            original repos' checkpoints and ``module.`` prefixes).
        model_or_abstract: the target model, concrete or abstract.
        ignore_prefixes: torch key prefixes dropped from BOTH the checkpoint and the model's expected keys, e.g.
            ``('head.', 'aux_head.')`` to load everything but the classifier when ``num_classes`` changed (end them
            with ``'.'``: ``'head'`` would also match ``head_dist``). Those model variables are absent from the
            returned state, so ``nnx.update`` leaves their initialisation alone.
        resample_pos_embed: resample ``pos_embed`` tensors whose grid differs from the model's, like timm.
        progress: show a tqdm progress bar over the tensors.

    Returns:
        An ``nnx.State`` with every ``nnx.Param`` and ``nnx.BatchStat`` of the model (except ignored ones), values
        as ``jax.Array`` on the default device in each target variable's dtype.

    Raises:
        ConversionError: listing every missing key, unexpected key and shape mismatch at once.
    """
    state, _ = convert_with_report(state_dict, model_or_abstract, ignore_prefixes=ignore_prefixes,
                                   resample_pos_embed=resample_pos_embed, progress=progress)
    return state


def convert_with_report(
    state_dict: Mapping[str, np.ndarray],
    model_or_abstract: nnx.Module,
    *,
    ignore_prefixes: Sequence[str] = (),
    resample_pos_embed: bool = True,
    progress: bool = False,
) -> tuple[nnx.State, ConversionReport]:
    """:func:`convert_state_dict`, also returning a :class:`ConversionReport` (converted/ignored/skipped keys,
    resampled position embeddings, parameter and byte counts) for summaries such as the CLI's."""
    ignore_prefixes = tuple(ignore_prefixes)
    key_map = model_key_map(model_or_abstract)
    expected = {k: info for k, info in key_map.items() if not _has_prefix(k, ignore_prefixes)}
    report = ConversionReport()
    found: dict[str, tuple[int, ...]] = {}
    for key, value in state_dict.items():
        if _has_prefix(key, ignore_prefixes):
            report.ignored.append(key)
        elif key.rsplit(".", 1)[-1] in _IGNORED_TORCH_NAMES and key not in expected:
            report.skipped.append(key)
        else:
            found[key] = tuple(int(s) for s in np.shape(value))

    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]] = []
    converted: list[tuple[tuple[Any, ...], nnx.Variable]] = []
    abstract_vars = dict(nnx.to_flat_state(nnx.state(model_or_abstract, CHECKPOINT_VARIABLE_TYPES)))
    items = [(k, info) for k, info in expected.items() if k in found]
    for key, info in _progress(items, len(items), progress):
        array = np.asarray(state_dict[key])
        if found[key] != info.torch_shape:
            resampled = maybe_resample_pos_embed(key, array, info.torch_shape) if resample_pos_embed else None
            if resampled is None:
                mismatched.append((key, found[key], info.torch_shape, info.dotted_path))
                continue
            report.resized[key] = (found[key], info.torch_shape)
            array = resampled
        # Cast to the variable's dtype (bfloat16 via ml_dtypes) and place on device tensor by tensor, so the
        # transposed host copy is freed right away. replace() keeps the target variable's type and metadata.
        # jnp.array(copy=True): on CPU jnp.asarray may alias a numpy buffer zero-copy, and a state dict from
        # `tensor.numpy()` shares torch's memory, so torch's in-place updates (BatchNorm running stats in a training
        # forward) would silently change our converted variables.
        value = jnp.array(info.to_flax(array), dtype=info.dtype, copy=True)
        converted.append((info.path, abstract_vars[info.path].replace(value)))
        report.converted.append(key)
        report.num_params += int(value.size)
        report.num_bytes += int(value.nbytes)

    hint = ""
    classifier = (getattr(model_or_abstract, "pretrained_cfg", None) or {}).get("classifier") or ("head", "aux_head")
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    if any(_has_prefix(k, tuple(f"{c}." for c in classifier)) for k, *_ in mismatched):
        hint = (f"Hint: a classifier of another size? ignore_prefixes={tuple(f'{c}.' for c in classifier)!r} leaves "
                "it out of the conversion (create_model does this when num_classes differs from the checkpoint's).")
    raise_for_problems(
        target=type(model_or_abstract).__name__,
        expected={k: (info.torch_shape, info.dotted_path) for k, info in expected.items()},
        found=found,
        mismatched=mismatched,
        hint=hint,
    )
    if report.ignored:
        _logger.info("Left out %d checkpoint tensors under %s.", len(report.ignored), ", ".join(ignore_prefixes))
    return nnx.from_flat_state(converted), report
