"""Converts tlt's released token-label maps (one torch ``.pt`` per training image) into a volo-jax token-label store,
once, so training reads them memory-mapped and without torch (:mod:`volo_jax.token_label_store`)::

    python -m volo_jax.tools.convert_token_labels /data/label_top5_train_nfnet /data/imagenet_token_labels \\
        --num-classes 1000

``SRC`` is the tree tlt's ``DatasetTokenLabel`` reads as ``label_root``: ``SRC/<class>/<stem>.pt``, each a tensor
``(2, k, H, W)`` (the release: k=5 on a 15x15 grid) with the teacher's top-k class scores (logits) in ``[0]`` and
their class indices, stored as floats, in ``[1]``. Every file must have the same ``(k, H, W)``; the indices must be
integers (and below ``--num-classes`` when given). The files are read with ``torch.load(weights_only=True)``, so a
file holding anything but tensors is refused, never unpickled. The store's key of ``SRC/<class>/<stem>.pt`` is
``<class>/<stem>``, the key tlt derives from the image ``<split root>/<class>/<stem>.JPEG``.

Scores keep the files' precision (float16 stays float16: the release's 1.28M maps take ~2.9 GB; bfloat16 becomes
float32, which holds it exactly); indices become int16 when ``--num-classes`` is at most 32768, else int32.

The conversion is resumable: progress is committed every few thousand files, a rerun of the same command after a
kill continues where it stopped, a rerun on a finished store says so and exits 0, and a rerun with another ``SRC``
(other path or other file list) or other options is refused. Exit status: 0 done (or stopped at ``--limit``),
2 bad input (the one-line message names the file), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from volo_jax.token_label_store import (
    TokenLabelError,
    TokenLabelWriter,
    check_indices,
    check_scores,
    index_dtype_for,
)

_CHUNK = 256  # files read ahead by the threads; bounded so memory stays flat over 1.28M files


def _natural_key(s: str) -> list[Any]:
    """timm's ``natural_key`` (also tlt's): digit runs compare as numbers, the rest case-insensitively."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s.lower())]


def find_label_files(src: str | os.PathLike) -> list[tuple[str, Path]]:
    """``[(key, path)]`` of every ``.pt`` file under ``src``, in natural order of the relative path.

    Raises:
        TokenLabelError: ``src`` is not a directory or holds no ``.pt`` file.
    """
    src = Path(src)
    if not src.is_dir():
        raise TokenLabelError(f"{src}: no such directory")
    found = []
    for root, _, files in os.walk(src, followlinks=True):
        for f in files:
            if f.endswith(".pt"):
                rel = os.path.relpath(os.path.join(root, f), src).replace(os.sep, "/")
                if rel.count("/") != 1:
                    # tlt looks a map up at label_root/<class>/<stem>.pt only; a file elsewhere would get a key no
                    # image has (e.g. SRC pointing one level too high): say so now, not when training starts
                    raise TokenLabelError(f"{src / rel}: expected tlt's label tree SRC/<class>/<image stem>.pt; point "
                                          "SRC at the folder holding the class folders")
                found.append((rel[:-len(".pt")], Path(root) / f))
    if not found:
        raise TokenLabelError(f"{src} holds no .pt files; expected tlt's label tree SRC/<class>/<image stem>.pt")
    return sorted(found, key=lambda kp: _natural_key(kp[0]))


def _require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise TokenLabelError("reading tlt's .pt label maps needs PyTorch (only for this one-off conversion): "
                              "pip install 'volo-jax[torch]'") from e


def read_label_map(path: Path) -> np.ndarray:
    """One ``.pt`` file as a numpy ``(2, k, H, W)`` array (bfloat16 widened to float32, exactly).

    Raises:
        TokenLabelError: unreadable, corrupted, truncated, or unsafe (a pickle that asks for anything but tensors
            is blocked by ``torch.load(weights_only=True)`` and nothing in it runs), or not a 4-D tensor with 2 rows.
    """
    import torch

    from converters.readers import CheckpointError, torch_load_safe

    try:
        t = torch_load_safe(path)  # weights_only=True; tells a blocked (malicious) pickle from a damaged file
    except CheckpointError as e:
        raise TokenLabelError(str(e)) from e
    if not isinstance(t, torch.Tensor):
        raise TokenLabelError(f"{path}: holds a {type(t).__name__}, expected a (2, k, H, W) tensor")
    if t.ndim != 4 or t.shape[0] != 2:
        raise TokenLabelError(f"{path}: tensor of shape {tuple(t.shape)}, expected (2, k, H, W): [0] the top-k "
                              "scores, [1] their class indices")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _score_dtype(first: np.ndarray) -> np.dtype:
    """float16 files stay float16; anything else is float32 (a float64 file must then hold float32 values)."""
    return np.dtype(np.float16) if first.dtype == np.float16 else np.dtype(np.float32)


def _read_all(files: Sequence[Path], workers: int) -> Iterator[tuple[Path, np.ndarray | TokenLabelError]]:
    """``(path, array or the error reading it)`` in order, read ahead by ``workers`` threads (file I/O overlaps)."""

    def read(path: Path) -> np.ndarray | TokenLabelError:
        try:
            return read_label_map(path)
        except TokenLabelError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for start in range(0, len(files), _CHUNK):
            chunk = files[start:start + _CHUNK]
            yield from zip(chunk, pool.map(read, chunk), strict=True)


def convert(src: str | os.PathLike, out: str | os.PathLike, *, num_classes: int | None = None,
            limit: int | None = None, workers: int = 4, commit_every: int = 4096, progress: bool = True) -> str:
    """Converts (or resumes converting) ``src`` into the store ``out``; returns a one-line summary.

    Args:
        src: tlt's label tree (``<class>/<stem>.pt``).
        out: the store directory.
        num_classes: check every index against it (and pick int16 indices); None skips the check.
        limit: stop once the first ``limit`` files are converted (the store stays incomplete and resumable).
        workers: reading threads.
        commit_every: files between two commits (a kill redoes at most this many).
        progress: show a tqdm bar.

    Raises:
        TokenLabelError: bad input (naming the file) or an ``out`` made from other inputs.
    """
    from tqdm import tqdm

    _require_torch()
    src = Path(src)
    files = find_label_files(src)
    keys, paths = [k for k, _ in files], [p for _, p in files]
    first = read_label_map(paths[0])
    _, k, h, w = first.shape
    score_dtype = _score_dtype(first)
    index_dtype = index_dtype_for(num_classes)
    with TokenLabelWriter(out, keys, topk=k, height=h, width=w, score_dtype=score_dtype, num_classes=num_classes,
                          index_dtype=index_dtype, source=str(src.resolve()), extra={"source_format": "tlt-pt"},
                          commit_every=commit_every) as writer:
        n = writer.num_examples
        if writer.complete:
            return f"{out} is already complete ({n} label maps); nothing to do"
        stop = n if limit is None else min(n, max(limit, writer.rows))
        start = writer.rows
        bar = tqdm(total=n, initial=start, unit="file", dynamic_ncols=True, disable=not progress,
                   desc="converting")
        for path, arr in _read_all(paths[start:stop], workers):
            if isinstance(arr, TokenLabelError):
                raise arr
            if arr.shape != first.shape:
                raise TokenLabelError(f"{path}: label map of shape {tuple(arr.shape)}, but {paths[0]} (the first "
                                      f"file) has {tuple(first.shape)}: every map must have the same (2, k, H, W)")
            try:
                scores = check_scores(arr[0], score_dtype)
                indices = check_indices(arr[1], num_classes, index_dtype)
            except TokenLabelError as e:
                hint = f" (the store keeps {score_dtype} scores, the dtype of {paths[0]})" if "precision" in str(e) \
                    else ""
                raise TokenLabelError(f"{path}: {e}{hint}") from None
            writer.write(scores, indices)
            bar.update(1)
        bar.close()
        if stop < n:
            return (f"stopped after {stop} of {n} files (--limit): {out} is incomplete; rerun without --limit to "
                    "finish")
        writer.finish()
    return (f"converted {n} label maps (k={k}, {h}x{w}, {score_dtype.name} scores, {index_dtype.name} indices) "
            f"into {out}" + (f" in this run: {n - start}" if start else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m volo_jax.tools.convert_token_labels",
        description="Convert tlt's token-label maps (SRC/<class>/<stem>.pt, one (2, k, H, W) tensor per training "
                    "image: top-k scores and class indices) into a volo-jax token-label store OUT (meta.json, "
                    "scores.npy, indices.npy, names.txt), read memory-mapped by training without torch. Resumable: "
                    "rerun the same command after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", metavar="SRC",
                   help="tlt's label root, the folder holding the class folders: SRC/<class>/<image stem>.pt")
    p.add_argument("out", metavar="OUT", help="output store directory (created; an existing store from the same SRC "
                                              "is resumed, one from another SRC is refused)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="class count of the teacher (1000 for ImageNet): every index is checked to be below it and "
                        "indices are stored as int16 (half the size of the int32 used when it is not given)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="stop once the first N files are converted, leaving the store incomplete (try a sample "
                        "first; a rerun without --limit finishes it)")
    p.add_argument("-j", "--workers", type=int, default=4,
                   help="threads reading .pt files ahead (helps on network filesystems)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_classes is not None and args.num_classes <= 0:
            raise TokenLabelError(f"--num-classes must be positive, got {args.num_classes}")
        if args.limit is not None and args.limit <= 0:
            raise TokenLabelError(f"--limit must be positive, got {args.limit}")
        print(convert(args.src, args.out, num_classes=args.num_classes, limit=args.limit, workers=args.workers,
                      progress=not args.no_progress))
    except (TokenLabelError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever torch's message was
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the files converted so far are kept; rerun the same command to resume {args.out}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
