"""timm's RandAugment (``--aa rand-m9-mstd0.5-inc1``) on PIL images, torch-free and driven by a numpy Generator.

A port of the RandAugment half of ``timm/data/auto_augment.py`` (timm 1.0): the same op tables
(``_RAND_TRANSFORMS``, ``_RAND_INCREASING_TRANSFORMS``, the ``t``-selectable sets ``weights``/``3a``/``3aw``), the
same level-to-argument arithmetic, and the same PIL calls, so one op at one magnitude, sign and resampling filter is
bit-identical to timm's ``AugmentOp``. What differs is only where the randomness comes from: timm draws from
Python's global ``random`` and ``np.random``; here every draw comes from the ``np.random.Generator`` passed to
``__call__``, so a grain ``random_map`` stream stays deterministic and resumable.

Per image (timm's ``RandAugment.__call__`` then ``AugmentOp.__call__``):

1. pick ``n`` ops (with replacement, or without and weighted for the ``tweights``/``t3aw`` sets);
2. for each op: skip it with probability ``1 - p`` (no draw when ``p >= 1``);
3. magnitude ``m``, or ``N(m, mstd)`` when ``mstd > 0``, or ``U(0, m)`` when ``mstd > 100`` (timm's "infinite"
   std), clipped to ``[0, mmax or 10]``;
4. the level becomes the op's argument (``Rotate``: ``m/10 * 30`` degrees, ...), negated with probability 1/2 for
   the signed ops (timm's ``_randomly_negate``);
5. geometric ops resample with the configured filter, or bilinear/bicubic at random when none is set (timm's
   ``transforms_imagenet_train`` sets none for ``--train-interpolation random``), filling with the mean colour.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from volo_jax.data import _PIL_INTERPOLATION  # the filters by name, shared with the crop/resize transforms

__all__ = [
    "LEVEL_DENOM",
    "RAND_INCREASING_TRANSFORMS",
    "RAND_TRANSFORMS",
    "AugmentConfigError",
    "AugmentOp",
    "LabelMaps",
    "RandAugment",
    "rand_augment_transform",
    "label_op",
    "train_hparams",
]

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to level M / 10 of each op's range
_FILL = (128, 128, 128)  # timm's _FILL, used when hparams has no img_mean
_RANDOM_INTERPOLATION = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)  # timm's _RANDOM_INTERPOLATION


class AugmentConfigError(ValueError):
    """An augmentation config string or hparams that this port cannot honour."""


# --------------------------------------------------------------------------- ops (timm's PIL calls, verbatim)
def _affine(img: Image.Image, matrix: tuple[float, ...], fill: tuple[int, ...], resample: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _shear_x(img: Image.Image, factor: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img: Image.Image, factor: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x_rel(img: Image.Image, pct: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def _translate_y_rel(img: Image.Image, pct: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def _translate_x_abs(img: Image.Image, pixels: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, 0, pixels, 0, 1, 0), fill, resample)


def _translate_y_abs(img: Image.Image, pixels: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return _affine(img, (1, 0, 0, 0, 1, pixels), fill, resample)


def _rotate(img: Image.Image, degrees: float, fill: tuple[int, ...], resample: int) -> Image.Image:
    return img.rotate(degrees, resample=resample, fillcolor=fill)  # timm's path for PIL >= 5.2


def _auto_contrast(img: Image.Image) -> Image.Image:
    return ImageOps.autocontrast(img)


def _invert(img: Image.Image) -> Image.Image:
    return ImageOps.invert(img)


def _equalize(img: Image.Image) -> Image.Image:
    return ImageOps.equalize(img)


def _solarize(img: Image.Image, thresh: int) -> Image.Image:
    return ImageOps.solarize(img, thresh)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    if img.mode in ("L", "RGB"):
        return img.point(lut * 3 if img.mode == "RGB" else lut)
    return img  # timm leaves other modes untouched


def _posterize(img: Image.Image, bits_to_keep: int) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):
        # Keeping 0 bits is black: what ImageOps.posterize's LUT (i & ~255) gave when timm was written (rwightman,
        # tensorflow/tpu#495: "the PIL impl ... just zeros the image"). Pillow 13 raises instead, which would crash
        # timm at Posterize M < 2.5 and PosterizeIncreasing M = 10 (reached by rand-m9-mstd0.5-inc1's clipped tail).
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits_to_keep)


def _contrast(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Contrast(img).enhance(factor)


def _color(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Color(img).enhance(factor)


def _brightness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(factor)


def _sharpness(img: Image.Image, factor: float) -> Image.Image:
    return ImageEnhance.Sharpness(img).enhance(factor)


def _gaussian_blur(img: Image.Image, radius: float) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(radius=radius))


def _desaturate(img: Image.Image, factor: float) -> Image.Image:
    factor = min(1.0, max(0.0, 1.0 - factor))  # enhance factor 0 = grayscale, 1 = unchanged
    return ImageEnhance.Color(img).enhance(factor)


# --------------------------------------------------------------------------- level -> argument (timm's arithmetic)
# Each takes (level, hparams, negate) and returns the op's argument. The float expressions are timm's, in timm's
# order, so the arguments (and therefore the pixels) are identical; ``negate`` is timm's ``_randomly_negate`` draw.
def _signed(v: float, negate: bool) -> float:
    return -v if negate else v


def _rotate_level(level: float, _h: Mapping[str, Any], negate: bool) -> float:
    return _signed((level / LEVEL_DENOM) * 30.0, negate)  # [-30, 30] degrees


def _enhance_level(level: float, _h: Mapping[str, Any], _n: bool) -> float:
    return (level / LEVEL_DENOM) * 1.8 + 0.1  # [0.1, 1.9], 1.0 = unchanged at M=5


def _enhance_increasing_level(level: float, _h: Mapping[str, Any], negate: bool) -> float:
    # away from 1.0 (unchanged) towards 0.1 or 1.9 as M grows
    return max(0.1, 1.0 + _signed((level / LEVEL_DENOM) * 0.9, negate))


def _minmax_level(level: float, _h: Mapping[str, Any], _n: bool, min_val: float = 0.0, max_val: float = 1.0
                  ) -> float:
    level = min_val + (max_val - min_val) * (level / LEVEL_DENOM)
    return max(min_val, min(max_val, level))


def _desaturate_level(level: float, h: Mapping[str, Any], n: bool) -> float:
    return _minmax_level(level, h, n, min_val=0.5, max_val=1.0)


def _gaussian_blur_level(level: float, h: Mapping[str, Any], n: bool) -> float:
    return _minmax_level(level, h, n, min_val=0.1, max_val=2.0)


def _shear_level(level: float, _h: Mapping[str, Any], negate: bool) -> float:
    return _signed((level / LEVEL_DENOM) * 0.3, negate)  # [-0.3, 0.3]


def _translate_abs_level(level: float, h: Mapping[str, Any], negate: bool) -> float:
    return _signed((level / LEVEL_DENOM) * float(h["translate_const"]), negate)


def _translate_rel_level(level: float, h: Mapping[str, Any], negate: bool) -> float:
    return _signed((level / LEVEL_DENOM) * h.get("translate_pct", 0.45), negate)  # [-0.45, 0.45] of the side


def _posterize_level(level: float, _h: Mapping[str, Any], _n: bool) -> int:
    return int((level / LEVEL_DENOM) * 4)  # keep 0..4 bits: milder as M grows (TF TPU EfficientNet)


def _posterize_increasing_level(level: float, h: Mapping[str, Any], n: bool) -> int:
    return 4 - _posterize_level(level, h, n)  # keep 4..0 bits: harsher as M grows


def _solarize_level(level: float, _h: Mapping[str, Any], _n: bool) -> int:
    return min(256, int((level / LEVEL_DENOM) * 256))  # threshold 0..256: milder as M grows


def _solarize_increasing_level(level: float, h: Mapping[str, Any], n: bool) -> int:
    return 256 - _solarize_level(level, h, n)


def _solarize_add_level(level: float, _h: Mapping[str, Any], _n: bool) -> int:
    return min(128, int((level / LEVEL_DENOM) * 110))


@dataclass(frozen=True)
class _OpSpec:
    fn: Callable[..., Image.Image]
    level: Callable[[float, Mapping[str, Any], bool], float] | None = None
    signed: bool = False  # the level takes timm's random sign
    geometric: bool = False  # resamples: takes the fill colour and a filter


_E, _EI = _enhance_level, _enhance_increasing_level
# timm's NAME_TO_OP + LEVEL_TO_ARG for every op a RandAugment set can name.
_OPS: dict[str, _OpSpec] = {
    "AutoContrast": _OpSpec(_auto_contrast),
    "Equalize": _OpSpec(_equalize),
    "Invert": _OpSpec(_invert),
    "Rotate": _OpSpec(_rotate, _rotate_level, signed=True, geometric=True),
    "Posterize": _OpSpec(_posterize, _posterize_level),
    "PosterizeIncreasing": _OpSpec(_posterize, _posterize_increasing_level),
    "Solarize": _OpSpec(_solarize, _solarize_level),
    "SolarizeIncreasing": _OpSpec(_solarize, _solarize_increasing_level),
    "SolarizeAdd": _OpSpec(_solarize_add, _solarize_add_level),
    "Color": _OpSpec(_color, _E),
    "ColorIncreasing": _OpSpec(_color, _EI, signed=True),
    "Contrast": _OpSpec(_contrast, _E),
    "ContrastIncreasing": _OpSpec(_contrast, _EI, signed=True),
    "Brightness": _OpSpec(_brightness, _E),
    "BrightnessIncreasing": _OpSpec(_brightness, _EI, signed=True),
    "Sharpness": _OpSpec(_sharpness, _E),
    "SharpnessIncreasing": _OpSpec(_sharpness, _EI, signed=True),
    "ShearX": _OpSpec(_shear_x, _shear_level, signed=True, geometric=True),
    "ShearY": _OpSpec(_shear_y, _shear_level, signed=True, geometric=True),
    "TranslateX": _OpSpec(_translate_x_abs, _translate_abs_level, signed=True, geometric=True),
    "TranslateY": _OpSpec(_translate_y_abs, _translate_abs_level, signed=True, geometric=True),
    "TranslateXRel": _OpSpec(_translate_x_rel, _translate_rel_level, signed=True, geometric=True),
    "TranslateYRel": _OpSpec(_translate_y_rel, _translate_rel_level, signed=True, geometric=True),
    "Desaturate": _OpSpec(_desaturate, _desaturate_level),
    "GaussianBlur": _OpSpec(_gaussian_blur, _gaussian_blur_level),
}

# timm's op sets ('Cutout' is left to random erasing, as in timm).
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
_RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
_RAND_WEIGHTED_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
                     "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
                     "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1,
                     "Invert": 1}
_RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                    "ColorIncreasing": 0.25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
                    "SolarizeIncreasing": 0.05, "SolarizeAdd": 0.05, "ContrastIncreasing": 0.05,
                    "BrightnessIncreasing": 0.05, "Equalize": 0.05, "PosterizeIncreasing": 0.05, "Invert": 0.05}
_TRANSFORM_SETS: dict[str, Sequence[str] | Mapping[str, float]] = {
    "weights": _RAND_WEIGHTED_0, "3aw": _RAND_WEIGHTED_3A, "3a": _RAND_3A}


def _resample(value: Any) -> int | None:
    """An hparams ``interpolation`` (a name, a PIL filter, or None/'random' for timm's random choice)."""
    if value is None or value == "random":
        return None
    if isinstance(value, str):
        if value not in _PIL_INTERPOLATION:
            raise AugmentConfigError(f"unknown interpolation {value!r}; choose from random, "
                                     f"{', '.join(_PIL_INTERPOLATION)}")
        return _PIL_INTERPOLATION[value]
    return int(value)


# --------------------------------------------------------------------------- token-label maps
# Token labeling (TokenLabeling's ``tlt/data/random_augment_label.py``) moves the dense label maps with the image for
# the spatial ops, nearest-neighbour on the small (H, W) grid: ``scipy.ndimage.affine_transform`` of the scores
# (outside: 0) and of the class indices (outside: the nearest edge index). The matrices below are tlt's, in array
# (row, col) coordinates: ``(a, b, c, d, e, f)`` maps an output position to ``row = a*r + b*c' + c``,
# ``col = d*r + e*c' + f``; e.g. tlt's ShearX moves columns by ``factor * row``, as PIL's ShearX does to x.
LabelMaps = tuple[np.ndarray, np.ndarray]  # (scores (k, H, W) float32, class indices (k, H, W) int32)


def _affine_label(label: LabelMaps, matrix: Sequence[float]) -> LabelMaps:
    from scipy import ndimage  # a jax dependency; imported where used

    a, b, c, d, e, f = matrix
    m = np.asarray([[1, 0, 0, 0], [0, a, b, c], [0, d, e, f]], np.float64)  # k axis untouched; homogeneous form
    scores, indices = label
    return (ndimage.affine_transform(scores, m, order=0, mode="constant"),
            ndimage.affine_transform(indices, m, order=0, mode="nearest"))


def _rotate_label(label: LabelMaps, degrees: float) -> LabelMaps:
    # tlt's rotate_label: ``_, _, w, h = label.size()`` names the row count w; the centre is (rows/2, cols/2) and the
    # angle is +degrees in (row, col) space, which turns the map the way PIL's rotate(degrees) turns the image.
    rows, cols = label[0].shape[1:]
    angle = math.radians(degrees)
    a, b, d, e = (round(math.cos(angle), 15), round(math.sin(angle), 15), round(-math.sin(angle), 15),
                  round(math.cos(angle), 15))
    cr, cc = rows / 2.0, cols / 2.0
    c = a * -cr + b * -cc + cr
    f = d * -cr + e * -cc + cc
    return _affine_label(label, (a, b, c, d, e, f))


_LABEL_OPS: dict[str, Callable[[LabelMaps, float], LabelMaps]] = {
    "Rotate": _rotate_label,
    "ShearX": lambda label, factor: _affine_label(label, (1, 0, 0, factor, 1, 0)),
    "ShearY": lambda label, factor: _affine_label(label, (1, factor, 0, 0, 1, 0)),
    "TranslateXRel": lambda label, pct: _affine_label(label, (1, 0, 0, 0, 1, pct * label[0].shape[2])),
    "TranslateYRel": lambda label, pct: _affine_label(label, (1, 0, pct * label[0].shape[1], 0, 1, 0)),
}


def label_op(name: str, label: LabelMaps, arg: float | None) -> LabelMaps:
    """The token-label side of op ``name`` at argument ``arg`` (tlt's ``NAME_TO_LABELOP``): rotate, shear and the
    relative translations move the maps; every other op (colour ops, and the absolute translations, which tlt leaves
    alone too) returns them unchanged."""
    fn = _LABEL_OPS.get(name)
    return label if fn is None or arg is None else fn(label, arg)


# --------------------------------------------------------------------------- AugmentOp / RandAugment
@dataclass(frozen=True)
class AugmentOp:
    """timm's ``AugmentOp``: one named op applied with probability ``prob`` at a (noisy) ``magnitude``.

    ``hparams`` holds timm's keys: ``img_mean`` (fill colour of geometric ops, default 128 grey),
    ``interpolation`` (None = bilinear or bicubic at random per call), ``translate_const``, ``translate_pct``.
    """

    name: str
    prob: float = 0.5
    magnitude: float = 10
    magnitude_std: float = 0.0  # > 0: N(magnitude, std); inf: U(0, magnitude) (timm's mstd > 100)
    magnitude_max: float | None = None  # clip bound; None (or 0, as timm's ``or``) = LEVEL_DENOM
    hparams: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in _OPS:
            raise AugmentConfigError(f"unknown augmentation op {self.name!r}; known: {', '.join(_OPS)}")
        if self.name in ("TranslateX", "TranslateY") and "translate_const" not in self.hparams:
            raise AugmentConfigError(f"{self.name} needs hparams['translate_const'] (pixels at magnitude 10)")
        _resample(self.hparams.get("interpolation"))  # fail here, not per image

    @property
    def fill(self) -> tuple[int, ...]:
        return tuple(self.hparams.get("img_mean", _FILL))

    def sample_magnitude(self, rng: np.random.Generator) -> float:
        """The magnitude of one application: timm's noise (``random.gauss`` / ``random.uniform``) then clip."""
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        return max(0.0, min(float(m), self.magnitude_max or LEVEL_DENOM))

    def level_arg(self, magnitude: float, negate: bool = False) -> float | None:
        """The op's argument at ``magnitude`` (None for argument-free ops); ``negate`` flips signed ops."""
        level = _OPS[self.name].level
        return None if level is None else level(magnitude, self.hparams, negate)

    def apply(self, img: Image.Image, magnitude: float, *, negate: bool = False, resample: int | None = None
              ) -> Image.Image:
        """The op at a given magnitude, sign and filter, with no randomness: timm's ``aug_fn(img, *level_args)``.

        ``resample`` defaults to ``hparams['interpolation']``; it must be given when that is random.
        """
        spec = _OPS[self.name]
        args = () if spec.level is None else (self.level_arg(magnitude, negate),)
        if not spec.geometric:
            return spec.fn(img, *args)
        if resample is None:
            resample = _resample(self.hparams.get("interpolation"))
        if resample is None:
            raise ValueError(f"{self.name}: interpolation is random; pass resample=")
        return spec.fn(img, *args, self.fill, resample)

    def _draw(self, rng: np.random.Generator) -> tuple[float, bool, int | None] | None:
        """One application's random choices, in timm's draw order: apply?, magnitude noise, sign, filter.
        None when the op is skipped."""
        if self.prob < 1.0 and rng.random() > self.prob:
            return None
        magnitude = self.sample_magnitude(rng)
        spec = _OPS[self.name]
        negate = bool(rng.random() > 0.5) if spec.signed else False
        resample = None
        if spec.geometric:
            resample = _resample(self.hparams.get("interpolation"))
            if resample is None:
                resample = _RANDOM_INTERPOLATION[int(rng.integers(len(_RANDOM_INTERPOLATION)))]
        return magnitude, negate, resample

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        draw = self._draw(rng)
        if draw is None:
            return img
        magnitude, negate, resample = draw
        return self.apply(img, magnitude, negate=negate, resample=resample)

    def apply_with_label(self, img: Image.Image, label: LabelMaps, rng: np.random.Generator
                         ) -> tuple[Image.Image, LabelMaps]:
        """TokenLabeling's ``AugmentOp.__call__(img, label)``: the image op as :meth:`__call__` (same draws), and
        the spatial ops (rotate, shear, relative translate) applied to the token-label maps with the same argument,
        nearest-neighbour (:func:`label_op`); the other ops leave the maps as they are."""
        draw = self._draw(rng)
        if draw is None:
            return img, label
        magnitude, negate, resample = draw
        return (self.apply(img, magnitude, negate=negate, resample=resample),
                label_op(self.name, label, self.level_arg(magnitude, negate)))


@dataclass(frozen=True)
class RandAugment:
    """timm's ``RandAugment``: ``num_layers`` ops drawn per image, uniformly with replacement, or without
    replacement with ``choice_weights`` (timm's weighted sets)."""

    ops: tuple[AugmentOp, ...]
    num_layers: int = 2
    choice_weights: tuple[float, ...] | None = None

    def _choose(self, rng: np.random.Generator) -> list[AugmentOp]:
        if self.num_layers <= 0:
            return []
        p = None if self.choice_weights is None else np.asarray(self.choice_weights)
        return [self.ops[int(i)] for i in rng.choice(len(self.ops), self.num_layers, replace=p is None, p=p)]

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for op in self._choose(rng):
            img = op(img, rng)
        return img

    def apply_with_label(self, img: Image.Image, label: LabelMaps, rng: np.random.Generator
                         ) -> tuple[Image.Image, LabelMaps]:
        """TokenLabeling's label-aware ``RandAugment``: the same ops and draws as :meth:`__call__`, each spatial op
        also moving the token-label maps (see :meth:`AugmentOp.apply_with_label`)."""
        for op in self._choose(rng):
            img, label = op.apply_with_label(img, label, rng)
        return img, label


def train_hparams(img_size: int | Sequence[int], mean: Sequence[float], interpolation: str | None = "random"
                  ) -> dict[str, Any]:
    """The hparams timm's ``transforms_imagenet_train`` gives its auto-augment: ``translate_const`` 45% of the
    smaller side, the mean colour as fill, and the train interpolation unless it is 'random'."""
    size_min = min(img_size) if isinstance(img_size, Sequence) else img_size
    hparams: dict[str, Any] = {"translate_const": int(size_min * 0.45),
                               "img_mean": tuple(min(255, round(255 * x)) for x in mean)}
    if interpolation and interpolation != "random":
        hparams["interpolation"] = interpolation
    return hparams


_SECTION = re.compile(r"(\D*)(\d.*)")  # timm's re.split(r'(\d.*)', c): key = what precedes the first digit


def rand_augment_transform(config_str: str, hparams: Mapping[str, Any] | None = None) -> RandAugment:
    """A RandAugment from timm's config string, parsed as timm's ``rand_augment_transform``.

    ``rand`` then dash-separated sections in any order: ``m{int}`` magnitude (10), ``n{int}`` ops per image (2),
    ``p{float}`` probability of each op (0.5), ``mstd{float}`` magnitude noise (> 100: uniform in [0, m]),
    ``mmax{int}`` clip bound (10), ``inc{0|1}`` the increasing-severity op set, ``t{weights|3a|3aw}`` another op
    set. E.g. ``rand-m9-mstd0.5-inc1`` (VOLO's, DeiT's). ``hparams`` as :func:`train_hparams`; its
    ``magnitude_std`` / ``magnitude_max`` win over the string's, as in timm.

    Raises:
        AugmentConfigError: not a ``rand`` string (AutoAugment policies and AugMix are not ported), an unknown or
            malformed section, or timm's removed ``w`` key.
    """
    if not isinstance(config_str, str) or not config_str.strip():
        raise AugmentConfigError(f"empty auto-augment config {config_str!r}: use None for no auto-augment, or a "
                                 "RandAugment string such as 'rand-m9-mstd0.5-inc1'")
    hparams = dict(hparams or {})
    sections = config_str.split("-")
    if sections[0] != "rand":
        kind = ("AugMix" if sections[0] == "augmix" else
                "AutoAugment" if sections[0] in ("v0", "v0r", "original", "originalr", "3a") else "an unknown policy")
        raise AugmentConfigError(f"auto-augment {config_str!r} is {kind}; only RandAugment ('rand-m9-mstd0.5-inc1', "
                                 "timm's rand-m{M}-n{N}-p{P}-mstd{S}-mmax{X}-inc{0|1}-t{SET}) is supported")
    magnitude, num_layers, prob, increasing, set_name = 10, 2, 0.5, False, None
    for c in sections[1:]:
        where = f"section {c!r} of auto-augment {config_str!r}"
        if c.startswith("t"):
            set_name = c[1:]
            if set_name not in _TRANSFORM_SETS:
                raise AugmentConfigError(f"unknown op set in {where}; choose t{', t'.join(_TRANSFORM_SETS)}")
            continue
        match = _SECTION.fullmatch(c)
        if match is None:  # timm skips sections without a number; a typo should not pass silently
            raise AugmentConfigError(f"{where} has no value; expected e.g. m9, n2, p0.5, mstd0.5, mmax10, inc1")
        key, val = match.groups()
        try:
            if key == "mstd":
                mstd = float(val)
                hparams.setdefault("magnitude_std", float("inf") if mstd > 100 else mstd)
            elif key == "mmax":
                hparams.setdefault("magnitude_max", int(val))
            elif key == "inc":
                increasing = bool(int(val))
            elif key == "m":
                magnitude = int(val)
            elif key == "n":
                num_layers = int(val)
            elif key == "p":
                prob = float(val)
            elif key == "w":
                raise AugmentConfigError(f"{where}: timm removed the 'w' (weighted choice) key; use 'tweights'")
            else:
                raise AugmentConfigError(f"unknown key {key!r} in {where}; known: m, n, p, mstd, mmax, inc, t")
        except ValueError as e:
            if isinstance(e, AugmentConfigError):
                raise
            raise AugmentConfigError(f"bad value in {where}: {e}") from None
    if not 0.0 <= prob <= 1.0:
        raise AugmentConfigError(f"op probability p={prob} in {config_str!r} is not in [0, 1]")
    if hparams.get("magnitude_std", 0) < 0:
        raise AugmentConfigError(f"negative magnitude std in {config_str!r}")

    names: Sequence[str] | Mapping[str, float]
    if set_name is None:
        names = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    else:
        names = _TRANSFORM_SETS[set_name]
    weights = None
    if isinstance(names, Mapping):  # timm's _get_weighted_transforms: normalised weights, drawn without replacement
        w = np.asarray(list(names.values()), np.float64)
        weights, names = tuple((w / w.sum()).tolist()), tuple(names)
        if num_layers > len(names):
            raise AugmentConfigError(f"{config_str!r} draws n={num_layers} ops without replacement from a set of "
                                     f"{len(names)}")
    ops = tuple(AugmentOp(name, prob=prob, magnitude=magnitude, magnitude_std=hparams.get("magnitude_std", 0.0),
                          magnitude_max=hparams.get("magnitude_max"), hparams=hparams) for name in names)
    return RandAugment(ops, num_layers, weights)
