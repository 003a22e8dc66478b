"""Writes an ImageNet-layout image folder once as a tfds dataset in ``array_record`` format, which training and
evaluation then read through ``tfds.data_source`` (random access, no TensorFlow):

    python -m volo_jax.tools.prepare_tfds /path/to/imagenet --name my_imagenet --data-dir ~/tensorflow_datasets
    python train.py --tfds my_imagenet --tfds-data-dir ~/tensorflow_datasets --model volo_d1_224 ...

``FOLDER/train/<class>/<image>`` becomes split ``train`` and ``FOLDER/val/<class>/<image>`` (or ``validation/``,
any of timm's synonyms) split ``validation``. Files, class names and labels are the folder reader's
(:func:`volo_jax.data.find_images`: timm's natural order), so a label means the same class as with the folder.

Each record is ``image`` (a tfds ``Image`` feature holding the file's original bytes: nothing is re-encoded, a JPEG
stays byte-identical and is decoded by PIL at read time exactly as from the folder), ``label`` (``ClassLabel`` named
by the class folders) and ``file_name`` (``<class>/<file>``, the folder reader's name of the image). Every image is
decoded once while preparing (``--workers`` threads); those that cannot be (the ones the training reader would skip)
are left out and listed at the end.

tfds writes into ``DATA_DIR/NAME/incomplete.<random>_1.0.0/`` and renames it to ``DATA_DIR/NAME/1.0.0/`` only when
every split is complete, so an interrupted run leaves nothing tfds would read (its ``incomplete.*`` folder can be
deleted). The builder class is made here, named after this module even under ``python -m`` (tfds looks for a
builder's package files from its module, and a class of ``__main__`` sends it to the script's path).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volo_jax import data

DATASET_VERSION = "1.0.0"
_SPLITS = ("train", "validation")  # tfds split names (imagenet2012's), found as timm's synonyms in the folder
_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # tfds dataset names are snake_case (a directory name, no ':' or '/')
# The builder classes' module, also under `python -m` (where __name__ is '__main__'); tfds records it in
# dataset_info.json and locates a builder's package files from it.
_MODULE = __spec__.name if __spec__ is not None else __name__


@dataclass
class PrepareResult:
    """What :func:`prepare` wrote: the dataset's version directory, images per split, and the skipped images
    as ``(split, file_name, error)``."""

    path: Path
    counts: dict[str, int]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)


def folder_splits(folder: str | os.PathLike) -> tuple[dict[str, tuple[Path, list[tuple[str, int]]]], list[str]]:
    """The splits of an ImageNet-layout folder: ``{tfds split: (subfolder, [(path, label)])}`` and the class names.

    Raises:
        DataError: neither a train nor a validation subfolder, a split :func:`volo_jax.data.find_images` refuses,
            or splits with different class folders (their labels would not mean the same classes).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise data.DataError(f"{folder}: no such directory")
    splits: dict[str, tuple[Path, list[tuple[str, int]]]] = {}
    classes: dict[str, list[str]] = {}
    for split in _SPLITS:
        root = data.search_split(folder, split)
        if root == folder:  # no such subfolder (search_split falls back to the folder itself)
            continue
        samples, classes[split] = data.find_images(root)
        splits[split] = (root, samples)
    if not splits:
        raise data.DataError(f"{folder} has neither a train/ nor a val/ (validation/) subfolder; expected the "
                             f"ImageNet layout {folder}/train/<class>/<image> and {folder}/val/<class>/<image>")
    names = list(classes.values())
    if any(c != names[0] for c in names[1:]):
        a, b = (set(c) for c in names[:2])
        raise data.DataError(f"{folder}: the train and validation class folders differ (only in train: "
                             f"{sorted(a - b)[:10]}, only in validation: {sorted(b - a)[:10]}); the labels would "
                             "not mean the same classes")
    return splits, names[0]


def _read_checked(path: str) -> tuple[bytes | None, str]:
    """The file's bytes, decoded once as the training reader does; ``(None, why)`` for an unreadable image."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data.load_image(raw)
        return raw, ""
    except data.DECODE_ERRORS as e:
        return None, f"{type(e).__name__}: {e}"


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, window: int) -> Iterator[Any]:
    """``map(fn, items)`` in order on ``workers`` threads, at most ``window`` results in flight (``Executor.map``
    would submit everything at once and hold every result it gets ahead of the consumer in memory)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _builder_class(name: str, folder: Path, splits: dict[str, tuple[Path, list[tuple[str, int]]]],
                   classes: list[str], workers: int, progress: bool) -> type:
    """A tfds ``GeneratorBasedBuilder`` named ``name`` writing ``splits`` (not registered: tfds reads the result
    from its files, ``dataset_info.json`` and ``features.json``, without this code)."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    suffixes = {os.path.splitext(p)[1].lower() for _, samples in splits.values() for p, _ in samples}
    # metadata only: tfds stores the given bytes as they are, whatever this says
    encoding = "png" if suffixes == {".png"} else "jpeg" if suffixes <= {".jpg", ".jpeg"} else None

    class FolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        __module__ = _MODULE
        VERSION = tfds.core.Version(DATASET_VERSION)
        RELEASE_NOTES = {DATASET_VERSION: "Prepared by volo_jax.tools.prepare_tfds."}
        # tfds derives a checksums path from the builder's package through `importlib_resources`, a backport that
        # is not installed on Python >= 3.9: there is nothing to download, so there are no checksums
        code_path = None
        skipped: list[tuple[str, str, str]] = []  # (split, file_name, error); a new class (and list) per call

        def _info(self) -> Any:
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"The ImageNet-layout folder {folder} (volo_jax.tools.prepare_tfds): original image "
                            "file bytes, labels as timm's folder reader.",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(encoding_format=encoding),
                    "label": tfds.features.ClassLabel(names=classes),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
            root, samples = splits[split]
            bar = tqdm(total=len(samples), desc=f"{name} {split}", unit="img", disable=not progress,
                       dynamic_ncols=True)
            window = 64 * max(1, workers)
            for (path, label), (raw, error) in zip(samples, _ordered_map(_read_checked, [p for p, _ in samples],
                                                                         workers, window), strict=True):
                bar.update()
                file_name = Path(os.path.relpath(path, root)).as_posix()  # the folder reader's name(i)
                if raw is None:
                    self.skipped.append((split, file_name, error))
                    continue
                yield file_name, {"image": raw, "label": label, "file_name": file_name}
            bar.close()
            if progress:
                tqdm.write(f"{name} {split}: writing the shuffled array_record shards")

    FolderBuilder.name = name  # chosen at run time (tfds would name the class's dataset folder_builder)
    return FolderBuilder


def prepare(folder: str | os.PathLike, name: str, data_dir: str | os.PathLike | None = None, *, workers: int = 8,
            progress: bool = True) -> PrepareResult:
    """Writes the ImageNet-layout ``folder`` as tfds dataset ``name`` (``array_record``) under ``data_dir``.

    Args:
        folder: holds ``train/<class>/<image>`` and/or ``val/<class>/<image>`` (or ``validation/``, ...).
        name: the tfds dataset name (snake_case, not one of tfds's own datasets).
        data_dir: tfds data_dir (default: tfds's, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        workers: threads reading and test-decoding the images.
        progress: show a progress bar over the images.

    Returns:
        The dataset's directory (``data_dir/name/1.0.0``), the images per split and the skipped (undecodable) ones.

    Raises:
        DataError: a bad or taken name, an already prepared dataset, or a folder :func:`folder_splits` refuses.
    """
    import tensorflow_datasets as tfds

    if not _NAME_RE.fullmatch(name):
        raise data.DataError(f"--name {name!r}: a tfds dataset name is snake_case (lowercase letters, digits, _)")
    try:
        tfds.builder_cls(name)
    except tfds.core.registered.DatasetNotFoundError:
        pass
    else:  # tfds.data_source(name) would use tfds's own builder (its version, its features), not our files
        raise data.DataError(f"--name {name!r} is one of tfds's own datasets; choose another name (e.g. "
                             f"{name}_folder)")
    root = Path(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
    out = root / name / DATASET_VERSION
    if out.exists():
        raise data.DataError(f"{out} exists: {name!r} is already prepared there (remove that folder to prepare it "
                             "again, or choose another --name)")
    splits, classes = folder_splits(folder)
    had_downloads = (root / "downloads").exists()
    builder = _builder_class(name, Path(folder).expanduser(), splits, classes, workers, progress)(
        data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    if not had_downloads:  # tfds makes an empty download folder even with nothing to download
        for d in (root / "downloads" / "extracted", root / "downloads"):
            try:
                d.rmdir()
            except OSError:
                break
    skipped = list(builder.skipped)
    counts = {s: len(samples) - sum(1 for k, _, _ in skipped if k == s) for s, (_, samples) in splits.items()}
    return PrepareResult(path=out, counts=counts, skipped=skipped)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Write an ImageNet-layout folder (train/<class>/<image>, val/<class>/<image>) once as a tfds "
                    "dataset in array_record format (original image bytes; labels as the folder reader), for "
                    "train.py/eval.py --tfds NAME. No TensorFlow needed.")
    p.add_argument("folder", help="ImageNet-layout folder with train/ and/or val/ (or validation/) subfolders")
    p.add_argument("--name", required=True, help="tfds dataset name to create (snake_case, e.g. my_imagenet)")
    p.add_argument("--data-dir", default=None, help="tfds data_dir to write into (default: tfds's, "
                                                    "$TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--workers", "-j", type=int, default=min(16, os.cpu_count() or 1),
                   help="threads reading and test-decoding images (default: CPUs, at most 16)")
    args = p.parse_args(argv)
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # ours counts the images; tfds's would nest a second bar per split
    t0 = time.perf_counter()
    try:
        result = prepare(args.folder, args.name, args.data_dir, workers=args.workers)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{n} {s}" for s, n in result.counts.items())
    print(f"wrote {args.name}: {counts} images to {result.path} in {time.perf_counter() - t0:.0f}s; read it with "
          f"--tfds {args.name}" + (f" --tfds-data-dir {args.data_dir}" if args.data_dir else ""))
    if result.skipped:
        print(f"Skipped {len(result.skipped)} unreadable image(s):")
        for split, file_name, error in result.skipped:
            print(f"  {split}/{file_name}: {error}")
    for s, n in result.counts.items():
        if n == 0:
            print(f"warning: split {s} has no readable image", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
