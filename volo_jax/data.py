"""Input pipelines: timm's eval transform in numpy, image-folder and tfds readers, a sharded grain eval loader, and
the training stream (timm's random-resized crop, flip, RandAugment, random erasing; deterministic, resumable, sharded
per process).

The eval transform reproduces ``timm.data.create_transform(**resolve_data_config({}, model=m), is_training=False)``
(``timm/data/transforms_factory.py: transforms_imagenet_eval``) operation by operation, without torch:

1. decode with PIL and ``convert('RGB')``, as timm's ``ImageDataset`` does (grayscale is replicated, alpha dropped,
   palette/CMYK converted by PIL);
2. resize with PIL (torchvision's PIL backend *is* ``Image.resize``, always antialiased) to the scale size
   ``floor(img_size / crop_pct)``: ``crop_mode='center'`` resizes the shorter side (torchvision ``Resize(int)``,
   long side ``int(size * long / short)``) for square targets and uses timm's ``ResizeKeepRatio`` (each side
   ``round(side / min ratio)``) for non-square ones; ``'squash'`` resizes both sides; ``'border'`` resizes the longer
   side (``ResizeKeepRatio(longest=1)``) and pads with the mean colour;
3. center crop with torchvision's rounding (``int(round((h - ch) / 2))``, zero padding when the image is smaller);
4. ``uint8 -> float32 / 255`` then ``(x - mean) / std`` in float32, the same IEEE operations as ``ToTensor`` +
   ``Normalize``, so the result is bit-identical to timm's tensor (NHWC instead of CHW).

The folder reader is timm's ``ReaderImageFolder`` (``find_images_and_targets``): ``.png/.jpg/.jpeg`` files found
recursively, labelled by their leaf folder, classes and files in natural-sort order (for ImageNet's synset folders
the same order as torchvision's ``ImageFolder``). ``split`` picks ``root/val`` (or another synonym) when present,
like timm's ``create_dataset``.

The loader gives every process its own slots of each global batch; the last batch is padded with ``mask=False``
slots, and an image that cannot be decoded becomes a ``mask=False`` slot with ``error`` set, so every image is
counted exactly once or reported as skipped.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from volo_jax import auto_augment as _aa  # imported where used: it takes its filter table from here

__all__ = [
    "IMG_EXTENSIONS",
    "DataError",
    "EvalConfig",
    "ImageFolderSource",
    "TfdsSource",
    "TrainConfig",
    "crop_resize_flip",
    "crop_resize_flip_normalize",
    "normalize",
    "eval_batches",
    "eval_transform",
    "random_erasing",
    "random_resized_crop_params",
    "token_label_key",
    "token_label_train_transform",
    "train_batches",
    "train_transform",
    "find_images",
    "resolve_eval_config",
    "search_split",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg")  # timm's reader default (timm/data/readers/img_extensions.py)
_EVAL_SYNONYMS = ("val", "valid", "validation", "eval", "evaluation")  # timm's _EVAL_SYNONYM
_TRAIN_SYNONYMS = ("train", "training")
_PIL_INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# What a broken image file raises somewhere between open, decode and convert.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


class DataError(ValueError):
    """The data cannot be used: empty folder, no class subfolders, unknown tfds dataset, ..."""


# --------------------------------------------------------------------------- data config
@dataclass(frozen=True)
class EvalConfig:
    """timm's eval data config: ``input_size`` (C, H, W), interpolation, mean, std, crop_pct, crop_mode."""

    input_size: tuple[int, int, int]
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"

    @property
    def img_size(self) -> tuple[int, int]:
        return int(self.input_size[1]), int(self.input_size[2])

    def as_dict(self) -> dict[str, Any]:
        return {"input_size": tuple(self.input_size), "interpolation": self.interpolation, "mean": tuple(self.mean),
                "std": tuple(self.std), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}


def resolve_eval_config(
    pretrained_cfg: dict[str, Any],
    *,
    img_size: int | None = None,
    input_size: Sequence[int] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_mode: str | None = None,
    use_test_size: bool = True,
) -> EvalConfig:
    """Eval data config from a model's pretrained cfg and overrides, as timm's ``resolve_data_config``.

    ``use_test_size`` (timm's ``validate.py`` default, ``--use-train-size`` turns it off) prefers
    ``test_input_size`` / ``test_crop_pct`` when the cfg has them: timm's published numbers are measured that way.
    A one-element ``mean``/``std`` is repeated over the channels.
    """
    in_chans = 3
    if input_size is not None:
        if len(input_size) != 3:
            raise DataError(f"input_size must be (C, H, W), got {tuple(input_size)}")
        size = tuple(int(v) for v in input_size)
        in_chans = size[0]
    elif img_size is not None:
        size = (in_chans, int(img_size), int(img_size))
    elif use_test_size and pretrained_cfg.get("test_input_size"):
        size = tuple(pretrained_cfg["test_input_size"])
    else:
        size = tuple(pretrained_cfg.get("input_size", (3, 224, 224)))
    if crop_pct:
        pct = float(crop_pct)
    elif use_test_size and pretrained_cfg.get("test_crop_pct"):
        pct = float(pretrained_cfg["test_crop_pct"])
    else:
        pct = float(pretrained_cfg.get("crop_pct") or 0.875)

    def channels(v: Sequence[float] | None, default: Sequence[float], name: str) -> tuple[float, ...]:
        v = tuple(float(x) for x in (v if v is not None else default))
        if len(v) == 1:
            v = v * in_chans
        if len(v) != in_chans:
            raise DataError(f"{name} has {len(v)} values for {in_chans} channels")
        return v

    interp = interpolation or pretrained_cfg.get("interpolation") or "bicubic"
    if interp not in _PIL_INTERPOLATION:
        raise DataError(f"unknown interpolation {interp!r}; choose from {', '.join(_PIL_INTERPOLATION)}")
    mode = crop_mode or pretrained_cfg.get("crop_mode") or "center"
    if mode not in ("center", "squash", "border"):
        raise DataError(f"unknown crop_mode {mode!r}; choose from center, squash, border")
    return EvalConfig(input_size=size, interpolation=interp,
                      mean=channels(mean, pretrained_cfg.get("mean", EvalConfig.mean), "mean"),
                      std=channels(std, pretrained_cfg.get("std", EvalConfig.std), "std"),
                      crop_pct=pct, crop_mode=mode)


# --------------------------------------------------------------------------- transform
def _resize(img: Image.Image, size_hw: tuple[int, int], interpolation: str) -> Image.Image:
    """torchvision ``F.resize`` on a PIL image: a no-op at the same size, else ``Image.resize`` (antialiased)."""
    if (img.height, img.width) == tuple(size_hw):
        return img
    return img.resize((size_hw[1], size_hw[0]), _PIL_INTERPOLATION[interpolation])


def _resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """torchvision ``Resize(int)``: shorter side to ``size``, longer side ``int(size * long / short)``."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return _resize(img, (new_h, new_w), interpolation)


def _resize_keep_ratio(img: Image.Image, size_hw: tuple[int, int], interpolation: str,
                       longest: float) -> Image.Image:
    """timm's ``ResizeKeepRatio`` without the random parts (``round`` is Python's, half to even, as timm's)."""
    ratio_h, ratio_w = img.height / size_hw[0], img.width / size_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return _resize(img, (round(img.height / ratio), round(img.width / ratio)), interpolation)


def _center_crop(x: np.ndarray, size_hw: tuple[int, int], fill: Sequence[int] | int = 0) -> np.ndarray:
    """torchvision ``center_crop`` / timm ``center_crop_or_pad`` on an HWC uint8 array (pad first if too small)."""
    ch, cw = size_hw
    h, w = x.shape[:2]
    if ch > h or cw > w:
        top, left = max(ch - h, 0) // 2, max(cw - w, 0) // 2
        bottom, right = max(ch - h + 1, 0) // 2, max(cw - w + 1, 0) // 2
        padded = np.empty((h + top + bottom, w + left + right, x.shape[2]), x.dtype)
        padded[...] = np.asarray(fill, dtype=x.dtype)
        padded[top:top + h, left:left + w] = x
        x, (h, w) = padded, padded.shape[:2]
        if (h, w) == (ch, cw):
            return x
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[top:top + ch, left:left + cw]


def eval_transform(img: Image.Image, cfg: EvalConfig) -> np.ndarray:
    """timm's eval transform of one PIL image: float32 ``(H, W, C)`` normalised with ``cfg.mean``/``cfg.std``.

    The image is converted to RGB first (what timm's dataset does before its transform).
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    img_size = cfg.img_size
    scale = tuple(math.floor(s / cfg.crop_pct) for s in img_size)
    fill: Sequence[int] | int = 0
    if cfg.crop_mode == "squash":
        img = _resize(img, scale, cfg.interpolation)
    elif cfg.crop_mode == "border":
        img = _resize_keep_ratio(img, scale, cfg.interpolation, longest=1.0)
        fill = [round(255 * v) for v in cfg.mean]
    elif scale[0] == scale[1]:
        img = _resize_shorter(img, scale[0], cfg.interpolation)
    else:
        img = _resize_keep_ratio(img, scale, cfg.interpolation, longest=0.0)
    x = _center_crop(np.asarray(img, dtype=np.uint8), img_size, fill)
    # ToTensor then Normalize, in float32 like torch: x / 255, then (x - mean) / std.
    x = x.astype(np.float32) / np.float32(255)
    return (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


def load_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Opens and fully decodes an image as timm's ``ImageDataset`` does (``Image.open(...).convert('RGB')``)."""
    f = io.BytesIO(source) if isinstance(source, bytes) else source
    with Image.open(f) as img:
        return img.convert("RGB")  # decodes every pixel: a truncated file fails here, not later


# --------------------------------------------------------------------------- sources
class Source(Protocol):
    """Random access to labelled images."""

    def __len__(self) -> int: ...
    def load(self, index: int) -> tuple[Image.Image, int]: ...
    def name(self, index: int) -> str: ...


def _natural_key(s: str) -> list[Any]:
    """timm's ``natural_key``: digit runs compare as numbers, the rest case-insensitively."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]


def search_split(root: str | os.PathLike, split: str = "validation") -> Path:
    """``root/<split>`` or ``root/<synonym>`` (val, valid, validation, ...) when it exists, else ``root`` (timm's)."""
    root = Path(root)
    name = split.split("[")[0]
    if name and (root / name).is_dir():
        return root / name
    synonyms = _EVAL_SYNONYMS if name in _EVAL_SYNONYMS else _TRAIN_SYNONYMS if name in _TRAIN_SYNONYMS else ()
    for s in synonyms:
        if (root / s).is_dir():
            return root / s
    return root


def find_images(folder: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS
                ) -> tuple[list[tuple[str, int]], list[str]]:
    """timm's ``find_images_and_targets``: ``[(path, class index)]`` in natural order and the class names.

    Raises:
        DataError: no such folder, no image files, images lying directly in ``folder`` (no class subfolder:
            timm would give them a class named ``''`` and shift every label), or a class folder without images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such directory")
    types = {e.lower() for e in extensions}
    files, labels = [], []
    for root, _, names in os.walk(folder, topdown=False, followlinks=True):
        label = os.path.basename(os.path.relpath(root, folder)) if root != str(folder) else ""
        for f in names:
            if os.path.splitext(f)[1].lower() in types:
                files.append(os.path.join(root, f))
                labels.append(label)
    expected = f"expected the ImageNet layout {folder}/<class>/<image>{{{','.join(sorted(types))}}}"
    if not files:
        raise DataError(f"{folder} holds no image files; {expected}")
    loose = [f for f, label in zip(files, labels, strict=True) if label == ""]
    if loose:
        raise DataError(f"{folder} has {len(loose)} image(s) outside class subfolders (e.g. "
                        f"{os.path.basename(loose[0])}); {expected}")
    classes = sorted(set(labels), key=_natural_key)
    # timm drops a class folder without images silently, which shifts the index of every later class (and then
    # train and val labels disagree): refuse instead, naming the folders
    used = {Path(os.path.relpath(f, folder)).parts[0] for f in files}
    empty = sorted((d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")
                    and d.name not in used), key=_natural_key)
    if empty:
        raise DataError(f"{folder}: class folder(s) without images: {', '.join(empty[:10])}"
                        + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
                        + "; remove them or add their images (an empty class would shift every later label)")
    class_to_idx = {c: i for i, c in enumerate(classes)}
    samples = sorted(((f, class_to_idx[label]) for f, label in zip(files, labels, strict=True)),
                     key=lambda s: _natural_key(s[0]))
    return samples, classes


class ImageFolderSource:
    """An ImageNet-layout folder (``root/val`` found automatically); labels as timm's folder reader."""

    def __init__(self, root: str | os.PathLike, split: str = "validation"):
        self.root = search_split(root, split)
        self.samples, self.classes = find_images(self.root)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        return load_image(path), label

    def name(self, index: int) -> str:
        return os.path.relpath(self.samples[index][0], self.root)


class TfdsSource:
    """A labelled tfds image dataset read through ``tfds.data_source`` (ArrayRecord random access, no TensorFlow).

    Images are kept as encoded bytes (``SkipDecoding``) and decoded with PIL like the folder reader. The dataset
    must be prepared in ``array_record`` format, e.g. ``tfds build imagenet2012 --manual_dir DIR
    --file_format array_record`` (ImageNet cannot be downloaded by tfds; put the tars in the manual dir).
    """

    def __init__(self, name: str, split: str = "validation", data_dir: str | None = None, *,
                 image_key: str = "image", label_key: str = "label", download: bool = False):
        import tensorflow_datasets as tfds

        try:
            self.ds = tfds.data_source(name, split=split, data_dir=data_dir, download=download,
                                       decoders={image_key: tfds.decode.SkipDecoding()})
        except Exception as e:  # DatasetNotFoundError, missing split, tfrecord-only preparation, ...
            why = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
            raise DataError(f"tfds dataset {name!r} split {split!r} (data_dir={data_dir}) cannot be read: "
                            f"{type(e).__name__}: {why}. It must be prepared in array_record format (tfds build "
                            "NAME --file_format array_record [--manual_dir DIR]; an ImageNet-layout folder: python "
                            "-m volo_jax.tools.prepare_tfds FOLDER --name NAME --data-dir DIR).") from e
        self.name_, self.split, self.image_key, self.label_key = name, split, image_key, label_key
        if len(self.ds) == 0:
            raise DataError(f"tfds dataset {name!r} split {split!r} is empty")
        features = getattr(getattr(self.ds, "dataset_info", None), "features", None)
        try:
            self.classes = list(features[label_key].names)
        except Exception:
            self.classes = []

    def __len__(self) -> int:
        return len(self.ds)

    def load(self, index: int) -> tuple[Image.Image, int]:
        record = self.ds[index]
        return load_image(bytes(record[self.image_key])), int(record[self.label_key])

    def name(self, index: int) -> str:
        """``name/split[index]``, followed by the record's ``file_name`` where it has one (imagenet2012, datasets
        written by ``volo_jax.tools.prepare_tfds``)."""
        where = f"{self.name_}/{self.split}[{index}]"
        try:
            file_name = self.ds[index]["file_name"]
        except Exception:  # no such feature, or the record itself is unreadable: naming must not fail
            return where
        return f"{where} {file_name.decode() if isinstance(file_name, bytes) else file_name}"


# --------------------------------------------------------------------------- loader
def process_indices(num_examples: int, global_batch: int, process_index: int, process_count: int) -> np.ndarray:
    """This process's dataset indices, batch after batch, ``-1`` for padding slots.

    Global batch ``k`` holds indices ``k*B .. k*B+B-1``; process ``p`` gets the contiguous block ``p*B/P ..
    (p+1)*B/P - 1`` of each (the rows its devices hold in a ``('data',)``-sharded global array). The number of
    batches is ``ceil(N / B)``, the same on every process.
    """
    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    num_batches = max(1, math.ceil(num_examples / global_batch))
    k = np.arange(num_batches)[:, None] * global_batch + process_index * local + np.arange(local)[None, :]
    return np.where(k < num_examples, k, -1).reshape(-1)


class _LoadExample:
    """``index -> {'image', 'label', 'mask', 'index', 'error'}``: padding and broken images get ``mask=False``."""

    def __init__(self, source: Source, cfg: EvalConfig):
        self.source, self.cfg = source, cfg
        self.blank = np.zeros((*cfg.img_size, cfg.input_size[0]), np.float32)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        out = {"image": self.blank, "label": np.int32(0), "mask": np.bool_(False), "index": np.int64(index),
               "error": np.str_("")}
        if index < 0:
            return out
        try:
            img, label = self.source.load(int(index))
            out.update(image=eval_transform(img, self.cfg), label=np.int32(label), mask=np.bool_(True))
        except DECODE_ERRORS as e:  # a corrupted or truncated file: skipped and reported, never fatal
            out["error"] = np.str_(f"{type(e).__name__}: {e}" or type(e).__name__)
        return out


def eval_batches(source: Source, cfg: EvalConfig, global_batch: int, *, process_index: int = 0,
                 process_count: int = 1, workers: int = 4, limit: int | None = None
                 ) -> tuple[Iterator[dict[str, np.ndarray]], int]:
    """Process-local eval batches of ``source`` (grain, ``workers`` decoding threads), and their number.

    Each batch is a dict of numpy arrays of ``global_batch / process_count`` rows: ``image`` (B, H, W, C) float32,
    ``label`` int32, ``mask`` bool (a real, decoded image), ``index`` int64 (``-1`` = padding), ``error`` str (why
    an image was skipped). ``limit`` evaluates only the first ``limit`` examples.
    """
    import grain

    n = len(source) if limit is None else min(limit, len(source))
    indices = process_indices(n, global_batch, process_index, process_count)
    local = global_batch // process_count
    ds = (grain.MapDataset.source(indices.tolist()).map(_LoadExample(source, cfg))
          .to_iter_dataset(grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=2 * local))
          .batch(local, drop_remainder=False))
    return iter(ds), len(indices) // local


# --------------------------------------------------------------------------- training pipeline
@dataclass(frozen=True)
class TrainConfig:
    """timm's train transform arguments (``transforms_imagenet_train``) for one model.

    ``auto_augment`` is timm's ``--aa`` RandAugment string (e.g. ``'rand-m9-mstd0.5-inc1'``, VOLO's recipe; see
    :func:`volo_jax.auto_augment.rand_augment_transform`), None for none. It is parsed here, so a bad string fails
    when the config is built (``DataError``), not inside a decoding thread. timm's colour jitter (``--color-jitter
    0.4``, which timm switches off when AA is on, except for ``3a`` op sets) is not part of this pipeline.
    """

    img_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "random"  # timm train.py's --train-interpolation default: bilinear or bicubic at random
    hflip: float = 0.5
    reprob: float = 0.25  # random erasing probability (timm --reprob), mode 'pixel', one box
    auto_augment: str | None = None  # timm --aa; only RandAugment ('rand-...') strings

    def __post_init__(self):
        if self.auto_augment is not None:
            _rand_augment(self)

    @property
    def rand_augment(self) -> _aa.RandAugment | None:
        """The parsed ``auto_augment`` with timm's train hparams (built once per config)."""
        return None if self.auto_augment is None else _rand_augment(self)


@functools.lru_cache(maxsize=32)
def _rand_augment_cached(config_str: str, img_size: tuple[int, ...], mean: tuple[float, ...], interpolation: str
                         ) -> _aa.RandAugment:
    from volo_jax import auto_augment as _aa

    return _aa.rand_augment_transform(config_str, _aa.train_hparams(img_size, mean, interpolation))


def _rand_augment(cfg: TrainConfig) -> _aa.RandAugment:
    """timm's ``transforms_imagenet_train`` aa hparams: translate_const from the smaller side, the mean as fill,
    the train interpolation unless 'random' (then each geometric op picks bilinear/bicubic itself)."""
    from volo_jax import auto_augment as _aa

    try:
        return _rand_augment_cached(cfg.auto_augment, tuple(int(v) for v in cfg.img_size),
                                    tuple(float(v) for v in cfg.mean), cfg.interpolation)
    except _aa.AugmentConfigError as e:
        raise DataError(f"auto_augment: {e}") from None


def random_resized_crop_params(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
                               ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``: ``(top, left, h, w)`` of the crop box.

    Ten tries at an area fraction in ``scale`` and a log-uniform aspect ratio in ``ratio``; then the whole image
    center-cropped to the nearest allowed ratio.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_erasing(x: np.ndarray, rng: np.random.Generator, prob: float, *, min_area: float = 0.02,
                   max_area: float = 1 / 3, min_aspect: float = 0.3) -> np.ndarray:
    """timm ``RandomErasing(probability=prob, mode='pixel', max_count=1)`` on a normalised HWC image, in place:
    one box of random area and aspect filled with per-pixel N(0, 1) noise."""
    if rng.random() >= prob:
        return x
    h_img, w_img, c = x.shape
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target_area = rng.uniform(min_area, max_area) * h_img * w_img
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < w_img and h < h_img:
            top, left = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
            x[top:top + h, left:left + w] = rng.standard_normal((h, w, c), dtype=np.float32)
            break
    return x


def crop_resize_flip(img: Image.Image, box: tuple[int, int, int, int], size_hw: tuple[int, int], interpolation: str,
                     flip: bool) -> Image.Image:
    """torchvision ``F.resized_crop(img, top, left, h, w, size)`` (crop, THEN resize: the filter sees only the crop),
    then an optional horizontal flip; still a PIL image, for RandAugment."""
    top, left, h, w = box
    img = img.crop((left, top, left + w, top + h)).resize((size_hw[1], size_hw[0]), _PIL_INTERPOLATION[interpolation])
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``ToTensor`` + ``Normalize`` in float32 (``x / 255``, then ``(x - mean) / std``, torch's operations); HWC."""
    x = np.asarray(img, np.uint8).astype(np.float32) / np.float32(255.0)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def crop_resize_flip_normalize(img: Image.Image, box: tuple[int, int, int, int], size_hw: tuple[int, int],
                               interpolation: str, flip: bool, mean: Sequence[float], std: Sequence[float]
                               ) -> np.ndarray:
    """:func:`crop_resize_flip` then :func:`normalize`: float32 HWC."""
    return normalize(crop_resize_flip(img, box, size_hw, interpolation, flip), mean, std)


def train_transform(img: Image.Image, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """timm's train transform of one image: ``(H, W, 3)`` float32, every random draw from ``rng``.

    timm's order (``transforms_imagenet_train``): random-resized crop, horizontal flip, RandAugment on the PIL
    image (``cfg.auto_augment``), ``ToTensor`` + ``Normalize``, random erasing.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")  # what timm's dataset does before the transform
    box = random_resized_crop_params(rng, img.width, img.height, cfg.scale, cfg.ratio)
    interp = cfg.interpolation
    if interp == "random":
        interp = ("bilinear", "bicubic")[int(rng.integers(2))]
    img = crop_resize_flip(img, box, cfg.img_size, interp, bool(rng.random() < cfg.hflip))
    augment = cfg.rand_augment
    if augment is not None:
        img = augment(img, rng)
    x = normalize(img, cfg.mean, cfg.std)
    return random_erasing(x, rng, cfg.reprob) if cfg.reprob > 0 else x


def token_label_train_transform(img: Image.Image, label_maps: tuple[np.ndarray, np.ndarray], cfg: TrainConfig,
                                rng: np.random.Generator) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray],
                                                                   np.ndarray]:
    """TokenLabeling's train transform (``tlt`` ``transforms_imagenet_train``) of an image and its token-label maps.

    Its order differs from timm's: horizontal flip of the image and the maps, RandAugment on the WHOLE image with
    the spatial ops also moving the maps (:meth:`volo_jax.auto_augment.RandAugment.apply_with_label`), and the
    random-resized crop LAST, so that its box, as fractions of the whole image, can later cut the same region out of
    the maps (:func:`volo_jax.token_label.token_label_targets`); then normalize and random erasing (image only).

    Args:
        img: the decoded image.
        label_maps: ``(scores (k, h, w), class indices (k, h, w))`` covering the whole image.
        cfg: the train config (``img_size``, ``scale``, ``ratio``, ``hflip``, ``auto_augment``, ``reprob``, ...).
        rng: every random draw comes from it.

    Returns:
        ``(image (H, W, 3) float32, (scores, indices) as moved, box float32 (4,))``; the box is tlt's crop coordinates
        ``(top / img_h, left / img_w, crop_h / img_h, crop_w / img_w)``.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    scores, indices = np.asarray(label_maps[0], np.float32), np.asarray(label_maps[1], np.int32)
    if rng.random() < cfg.hflip:  # tlt's RandomHorizontalFlipWithLabel: the image and the maps' last axis
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scores, indices = scores[..., ::-1], indices[..., ::-1]
    augment = cfg.rand_augment
    if augment is not None:
        img, (scores, indices) = augment.apply_with_label(img, (scores, indices), rng)
    top, left, h, w = random_resized_crop_params(rng, img.width, img.height, cfg.scale, cfg.ratio)
    box = np.asarray([top / img.height, left / img.width, h / img.height, w / img.width], np.float32)
    interp = cfg.interpolation
    if interp == "random":
        interp = ("bilinear", "bicubic")[int(rng.integers(2))]
    x = crop_resize_flip_normalize(img, (top, left, h, w), cfg.img_size, interp, False, cfg.mean, cfg.std)
    if cfg.reprob > 0:
        x = random_erasing(x, rng, cfg.reprob)
    return x, (np.ascontiguousarray(scores), np.ascontiguousarray(indices)), box


def token_label_key(source: Source, index: int) -> str:
    """The key of example ``index`` in a token-label store: tlt's ``'/'.join(path.split('/')[-2:]).split('.')[0]``,
    i.e. ``<class folder>/<file name up to its first dot>`` (``n01440764/n01440764_10026``). For a tfds source:
    ``<class name>/<file_name up to its first dot>`` (imagenet2012 records carry ``file_name``)."""
    from volo_jax.token_label_store import image_key  # the one place tlt's key rule is written

    if isinstance(source, ImageFolderSource):
        return image_key(os.path.relpath(source.samples[index][0], source.root))
    if isinstance(source, TfdsSource):
        record = source.ds[index]
        file_name = record.get("file_name") if hasattr(record, "get") else None
        if file_name is None:
            raise DataError(f"tfds dataset {source.name_!r} has no file_name feature: its examples cannot be matched "
                            "to token-label maps")
        file_name = file_name.decode() if isinstance(file_name, bytes) else str(file_name)
        label = int(record[source.label_key])
        cls = source.classes[label] if label < len(source.classes) else str(label)
        return image_key(f"{cls}/{file_name}")
    raise DataError(f"token labels need a folder or tfds source, not {type(source).__name__}")


class _TrainExample:
    """``(index, rng) -> {'image', 'label'}`` (with token labels also ``tl_scores``, ``tl_indices``, ``tl_box``),
    or None (dropped by grain) for an image that cannot be decoded; the skipped files are recorded in ``skipped``
    (thread-safe: grain decodes in threads)."""

    def __init__(self, source: Source, cfg: TrainConfig, token_labels: Any = None):
        import threading

        self.source, self.cfg, self.token_labels = source, cfg, token_labels
        # A folder's keys are its paths, cheap to list up front (and check before training); a tfds record must be
        # read for its file_name, so those keys are taken per example.
        self.keys = None
        if token_labels is not None and isinstance(source, ImageFolderSource):
            self.keys = [token_label_key(source, i) for i in range(len(source))]
        self.skipped: dict[str, str] = {}
        self._lock = threading.Lock()

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        try:
            img, label = self.source.load(int(index))
            if self.token_labels is None:
                return {"image": train_transform(img, self.cfg, rng), "label": np.int32(label)}
            key = self.keys[int(index)] if self.keys is not None else token_label_key(self.source, int(index))
            maps = self.token_labels.lookup(key)  # a missing map (tfds) skips the image, named in `skipped`
            x, (scores, indices), box = token_label_train_transform(img, maps, self.cfg, rng)
            return {"image": x, "label": np.int32(label), "tl_scores": scores, "tl_indices": indices, "tl_box": box}
        except DECODE_ERRORS as e:  # a corrupted file must not stop a run: skipped and counted
            with self._lock:
                self.skipped[self.source.name(int(index))] = f"{type(e).__name__}: {e}"
            return None


def _process_blocks(parent: Any, local: int, process_index: int, process_count: int) -> Any:
    """``parent`` (a grain ``MapDataset``) reduced to this process's rows of every global batch."""
    import grain  # optional dependency: imported where used

    class ProcessBlocks(grain.MapDataset):
        """Process ``p``'s rows of each global batch of ``parent``: positions ``k*B + p*L .. k*B + p*L + L - 1`` of
        global batch ``k`` (``L = B / P`` local rows), the rows its devices hold in a ``('data',)``-sharded array."""

        def __init__(self, parent: Any, local: int, process_index: int, process_count: int):
            super().__init__(parent)
            self._local, self._index, self._count = local, process_index, process_count

        def __len__(self) -> int:
            return len(self._parent) // self._count

        def __getitem__(self, index: Any) -> Any:
            if isinstance(index, slice):
                return self.slice(index)
            k, r = divmod(index, self._local)
            return self._parent[(k * self._count + self._index) * self._local + r]

        def __str__(self) -> str:
            return f"ProcessBlocks(local={self._local}, process={self._index}/{self._count})"

    return ProcessBlocks(parent, local, process_index, process_count)


def train_batches(source: Source, cfg: TrainConfig, global_batch: int, *, seed: int, process_index: int = 0,
                  process_count: int = 1, workers: int = 4, token_labels: Any = None) -> tuple[Any, _TrainExample]:
    """An endless, checkpointable iterator of this process's training batches, and its example loader.

    The example order is a permutation of the dataset drawn from ``seed``, a new one every epoch, cut into global
    batches; process ``p`` takes the ``p``-th ``global_batch / process_count`` rows of each (the rows its devices
    hold). Augmentation randomness is derived from ``seed`` and the example's position in the global stream, so the
    global batches do not depend on the number of processes or decoding threads, and ``iterator.get_state()`` /
    ``set_state()`` (grain) resume it exactly. Undecodable images are dropped (``loader.skipped`` names them);
    batches stay full.

    With ``token_labels`` (a :class:`volo_jax.token_label_store.TokenLabelStore`) each example is transformed the
    TokenLabeling way (:func:`token_label_train_transform`) and also carries its moved label maps and crop box.

    Raises:
        DataError: a batch that does not split across processes, fewer images than one batch.
        TokenLabelError: ``token_labels`` has no maps for some images of a folder source (named); a tfds source's
            keys need each record read, so there a missing map is found per example and the image is skipped.
    """
    import grain

    if global_batch % process_count:
        raise DataError(f"global batch {global_batch} is not divisible by {process_count} processes")
    if len(source) < global_batch:
        raise DataError(f"{len(source)} training images, fewer than one global batch of {global_batch}")
    local = global_batch // process_count
    loader = _TrainExample(source, cfg, token_labels)
    if loader.keys is not None:
        token_labels.check_covers(loader.keys)  # every image must have its maps: fail now, not mid-epoch
    # Augmentation is keyed by the position in the global stream (random_map before the split), and each process
    # takes its block of every global batch, so P processes feed exactly the global batches one process would.
    stream = (grain.MapDataset.source(list(range(len(source)))).shuffle(seed=seed).repeat()
              .random_map(loader, seed=seed))
    ds = (_process_blocks(stream, local, process_index, process_count)
          .to_iter_dataset(grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=2 * local))
          .batch(local, drop_remainder=True))
    return iter(ds), loader
