"""Token-label maps on disk: one memory-mapped array pair for a whole split, random access by image, no torch.

VOLO's token labeling (Jiang et al., "All Tokens Matter", NeurIPS 2021; the ``tlt`` package) trains every patch
token against a dense label map made once by a teacher: for each training image, the teacher's top-``k`` class
scores on an ``H x W`` grid covering the WHOLE image (training crops are later cut out of it with RoIAlign, in
fractions of the full image). tlt ships them as one torch pickle per image; reading 1.28M pickles through torch in
every input worker is slow and needs torch, so they are converted once (:mod:`volo_jax.tools.convert_token_labels`)
or generated with one of our models (:mod:`volo_jax.tools.label_tokens`) into this format.

A store is a directory::

    meta.json     {"format": "volo-jax-token-labels", "version": 1, "num_examples": N, "topk": k, "height": H,
                   "width": W, "num_classes": C or null, "score_dtype": "float16"|"float32",
                   "index_dtype": "int16"|"int32", "complete": true, "source": "...", "undecodable": [...],
                   ...provenance of the tool that wrote it (teacher, checkpoint, ...)}
    scores.npy    (N, k, H, W) score_dtype   the teacher's top-k class scores (LOGITS, not probabilities: tlt
                                             takes a softmax over all classes later, with 0 for the other classes)
    indices.npy   (N, k, H, W) index_dtype   their class indices (int16 when every class fits, else int32)
    names.txt     N lines: row i's key, the image path relative to the split root, '/'-separated, without its
                  extension (``n01440764/n01440764_10026``: the key tlt derives from an image path, :func:`image_key`)
    progress.json only while incomplete: {"rows": rows written and flushed, "undecodable": [...]}

``scores[i, j]`` and ``indices[i, j]`` are the ``j``-th best class of image ``names[i]`` at every grid position
(tlt's ``(2, k, H, W)`` tensor split in two, so each half keeps its own dtype). Scores keep the source's precision;
the writer refuses values its dtype cannot hold exactly. ``undecodable`` names images the labelling tool could not
decode: their rows are zeros and :meth:`TokenLabelStore.lookup` refuses them (the training reader skips such images
anyway, so :meth:`TokenLabelStore.check_covers` accepts them).

Writes are resumable: rows are written in order into arrays pre-allocated with ``np.lib.format.open_memmap``, and
every ``commit_every`` rows the arrays are flushed and the row count is recorded in ``progress.json`` (temp file +
``os.replace``), so a killed run restarts from the last commit. ``meta.json`` says ``"complete": true`` only once
every row is written; readers refuse anything else.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MissingTokenLabelError",
    "TokenLabelError",
    "TokenLabelStore",
    "TokenLabelWriter",
    "image_key",
    "index_dtype_for",
]

FORMAT = "volo-jax-token-labels"
FORMAT_VERSION = 1
META_NAME = "meta.json"
SCORES_NAME = "scores.npy"
INDICES_NAME = "indices.npy"
NAMES_NAME = "names.txt"
PROGRESS_NAME = "progress.json"
_OWN_FILES = frozenset({META_NAME, SCORES_NAME, INDICES_NAME, NAMES_NAME, PROGRESS_NAME})
SCORE_DTYPES = ("float16", "float32")
INDEX_DTYPES = ("int16", "int32")
# Keys the writer owns; a tool's provenance (``extra``) must not shadow them.
_RESERVED = frozenset({"format", "version", "num_examples", "topk", "height", "width", "num_classes", "score_dtype",
                       "index_dtype", "complete", "source", "undecodable"})
_MAKE_ONE = ("make one with `python -m volo_jax.tools.convert_token_labels` (tlt's .pt files) or "
             "`python -m volo_jax.tools.label_tokens` (one of our models as teacher)")


class TokenLabelError(ValueError):
    """A token-label store or label map cannot be used: not a store, incomplete, corrupted, or bad values."""


class MissingTokenLabelError(TokenLabelError, KeyError):
    """An image has no label map in the store (a ``KeyError`` too, so ``name in store``-style code works)."""

    def __str__(self) -> str:  # KeyError's own __str__ would print the message's repr, quotes and all
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------- helpers
def image_key(relpath: str | os.PathLike) -> str:
    """The store key of an image path: tlt's ``'/'.join(path.split('/')[-2:]).split('.')[0]``.

    That is ``<class folder>/<file name up to its first dot>``: ``image_key('train/n01440764/n01440764_10026.JPEG')
    == 'n01440764/n01440764_10026'``, the path relative to the split root without extension for ImageNet's names
    (:func:`volo_jax.data.token_label_key` gives the same key for a source's example). tlt's rule is kept to the
    letter, first dot included, so its released ``.pt`` files and our stores use the same keys.
    """
    parts = os.fspath(relpath).replace(os.sep, "/").split("/")
    return "/".join(parts[-2:]).split(".")[0]


def index_dtype_for(num_classes: int | None) -> np.dtype:
    """int16 when every class index fits (``num_classes <= 32768``), else int32 (also when the count is unknown)."""
    if num_classes is not None and 0 < num_classes <= np.iinfo(np.int16).max + 1:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _write_atomic(path: Path, text: str) -> None:
    """Temp file in the same directory, fsync, ``os.replace``: readers see the old or the new file, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data (a crash, not just a kill)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenLabelError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict):
        raise TokenLabelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _check_names(names: Sequence[str]) -> None:
    if not names:
        raise TokenLabelError("no images: a token-label store needs at least one name")
    bad = next((n for n in names if not isinstance(n, str) or not n or "\n" in n or "\r" in n), None)
    if bad is not None:
        raise TokenLabelError(f"invalid image key {bad!r}: keys must be non-empty strings without line breaks")
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise TokenLabelError(f"image key {n!r} appears twice: every image needs exactly one label map")
            seen.add(n)


def check_indices(indices: np.ndarray, num_classes: int | None, index_dtype: np.dtype | str) -> np.ndarray:
    """``indices`` as ``index_dtype``, after checking they are integral class ids in range.

    tlt stores the class ids as floats next to the scores, so integrality is checked on the values; a float16 copy
    is exact for ids below 2048.

    Raises:
        TokenLabelError: a non-integral, negative or out-of-range id (``>= num_classes``, or beyond the dtype).
    """
    index_dtype = np.dtype(index_dtype)
    x = np.asarray(indices)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)):
            raise TokenLabelError("class indices contain NaN or inf")
        if not np.array_equal(x, np.round(x)):
            bad = x[x != np.round(x)].ravel()[0]
            raise TokenLabelError(f"class indices must be integers, found {bad!r}")
    elif x.dtype.kind not in "iu":
        raise TokenLabelError(f"class indices must be numbers, got dtype {x.dtype}")
    if x.size == 0:
        return x.astype(index_dtype)
    lo, hi = float(x.min()), float(x.max())  # Python floats: comparing a float16 with 32768 would overflow
    limit = num_classes if num_classes is not None else int(np.iinfo(index_dtype).max) + 1
    if lo < 0 or hi >= limit:
        bad = lo if lo < 0 else hi
        what = f"{num_classes} classes" if num_classes is not None else f"the {index_dtype} range"
        raise TokenLabelError(f"class index {int(bad)} is out of range for {what}")
    return x.astype(index_dtype)


def check_scores(scores: np.ndarray, score_dtype: np.dtype | str) -> np.ndarray:
    """``scores`` as ``score_dtype``, refusing a cast that would change a value and non-finite scores.

    Raises:
        TokenLabelError: NaN/inf, or values ``score_dtype`` cannot hold exactly (e.g. float32 logits in a float16
            store): precision is never dropped silently.
    """
    score_dtype = np.dtype(score_dtype)
    x = np.asarray(scores)
    if x.dtype.kind not in "fiub":
        raise TokenLabelError(f"scores must be numbers, got dtype {x.dtype}")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        raise TokenLabelError("scores contain NaN or inf")
    out = x.astype(score_dtype)
    if not np.can_cast(x.dtype, score_dtype, "safe") and not np.array_equal(out.astype(x.dtype), x):
        raise TokenLabelError(f"{x.dtype} scores cannot be stored as {score_dtype} without losing precision")
    return out


# --------------------------------------------------------------------------- writer
class TokenLabelWriter:
    """Writes a store row by row, in ``names`` order; creates it, or resumes an interrupted one.

    ``names`` (every image, in row order) and the layout are fixed when the store is created and checked again on
    resume, so a rerun with other inputs is refused instead of mixing two sources. Use as a context manager (the
    rows written so far are committed on exit, even on an exception), then call :meth:`finish`::

        with TokenLabelWriter(out, names, topk=5, height=15, width=15, score_dtype="float16",
                              num_classes=1000, source="...") as w:
            if not w.complete:
                for scores, indices in rows_from(w.rows):   # resume at row w.rows
                    w.write(scores, indices)
                w.finish()

    Args:
        path: the store directory (created; an existing non-store directory with other files is refused).
        names: row order, one key per image (:func:`image_key`).
        topk, height, width: the label-map shape ``(k, H, W)`` of every row.
        score_dtype: ``float16`` or ``float32``.
        num_classes: class count, checked against every index; None if unknown.
        index_dtype: default :func:`index_dtype_for` ``(num_classes)``.
        source: where the maps come from (free text; part of the store's identity).
        extra: JSON-able provenance merged into ``meta.json`` (teacher, checkpoint, ...); part of the identity.
        commit_every: rows between two commits (flush + progress record); a kill loses at most this many rows.

    Raises:
        TokenLabelError: bad arguments, the directory is something else, or a resume with different inputs.
    """

    def __init__(self, path: str | os.PathLike, names: Sequence[str], *, topk: int, height: int, width: int,
                 score_dtype: str | np.dtype, num_classes: int | None = None, index_dtype: str | np.dtype | None = None,
                 source: str = "", extra: Mapping[str, Any] | None = None, commit_every: int = 4096):
        self.path = Path(path)
        names = list(names)
        _check_names(names)
        score_dtype = np.dtype(score_dtype).name
        index_dtype = np.dtype(index_dtype if index_dtype is not None else index_dtype_for(num_classes)).name
        if score_dtype not in SCORE_DTYPES:
            raise TokenLabelError(f"score_dtype must be one of {', '.join(SCORE_DTYPES)}, got {score_dtype}")
        if index_dtype not in INDEX_DTYPES:
            raise TokenLabelError(f"index_dtype must be one of {', '.join(INDEX_DTYPES)}, got {index_dtype}")
        if min(topk, height, width) <= 0:
            raise TokenLabelError(f"label maps must have a positive shape, got (k, H, W) = {(topk, height, width)}")
        if num_classes is not None:
            if num_classes <= 0:
                raise TokenLabelError(f"num_classes must be positive, got {num_classes}")
            if num_classes > np.iinfo(index_dtype).max + 1:
                raise TokenLabelError(f"{num_classes} classes do not fit {index_dtype} indices")
        clash = sorted(_RESERVED.intersection(extra or {}))
        if clash:
            raise TokenLabelError(f"extra metadata may not set {', '.join(clash)}")
        # JSON round trip: the identity compared on resume is what meta.json holds (tuples become lists, ...).
        self._spec: dict[str, Any] = json.loads(json.dumps({
            "format": FORMAT, "version": FORMAT_VERSION, "num_examples": len(names), "topk": int(topk),
            "height": int(height), "width": int(width),
            "num_classes": None if num_classes is None else int(num_classes),
            "score_dtype": score_dtype, "index_dtype": index_dtype, "source": str(source), **(extra or {})}))
        self.names = names
        self.num_examples = len(names)
        self.score_dtype, self.index_dtype = np.dtype(score_dtype), np.dtype(index_dtype)
        self.num_classes = num_classes
        self.shape = (int(topk), int(height), int(width))
        self.commit_every = max(1, int(commit_every))
        self.rows = 0
        self.undecodable: list[str] = []
        self.complete = False
        self._uncommitted = 0
        self._scores: np.memmap | None = None
        self._indices: np.memmap | None = None
        if (self.path / META_NAME).is_file():
            self._resume()
        else:
            self._create()

    # ---------------------------------------------------------------- open
    def _create(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise TokenLabelError(f"{self.path} exists and is not a directory")
        if self.path.is_dir():
            # Only a store whose creation was killed before meta.json appeared may be overwritten; never user files.
            foreign = sorted(p.name for p in self.path.iterdir()
                             if p.name not in _OWN_FILES and not (p.name.startswith(".") and p.name.endswith(".tmp")))
            if foreign:
                raise TokenLabelError(f"{self.path} exists and is not a token-label store (it holds "
                                      f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); refusing to "
                                      "write into it: choose a new output directory")
        self.path.mkdir(parents=True, exist_ok=True)
        shape = (self.num_examples, *self.shape)
        # open_memmap writes the .npy header and sizes the file (sparse where the filesystem allows), so rows can be
        # written in any order later and the file is a valid .npy from the start.
        for name, dtype in ((SCORES_NAME, self.score_dtype), (INDICES_NAME, self.index_dtype)):
            arr = np.lib.format.open_memmap(self.path / name, mode="w+", dtype=dtype, shape=shape)
            arr.flush()
            del arr
        _write_atomic(self.path / NAMES_NAME, "".join(n + "\n" for n in self.names))
        self._write_progress()
        # meta.json last: its presence marks a store, so a kill before this point is simply redone on the next run.
        _write_atomic(self.path / META_NAME, json.dumps({**self._spec, "complete": False}, indent=2) + "\n")
        self._open_arrays()

    def _resume(self) -> None:
        meta = _read_json(self.path / META_NAME)
        if meta.get("format") != FORMAT:
            raise TokenLabelError(f"{self.path} is not a token-label store (meta.json format {meta.get('format')!r})")
        saved = {k: v for k, v in meta.items() if k not in ("complete", "undecodable")}
        diff = [f"{k}: store has {saved.get(k)!r}, this run {self._spec.get(k)!r}"
                for k in sorted(set(saved) | set(self._spec)) if saved.get(k) != self._spec.get(k)]
        if not diff:
            stored = _read_names(self.path)
            if stored != self.names:
                at = next((i for i, (a, b) in enumerate(zip(stored, self.names, strict=False)) if a != b),
                          min(len(stored), len(self.names)))
                diff.append(f"image list differs at row {at} (store: {stored[at] if at < len(stored) else 'end'!r}, "
                            f"this run: {self.names[at] if at < len(self.names) else 'end'!r})")
        if diff:
            raise TokenLabelError(f"{self.path} was made from different inputs; refusing to mix them ("
                                  + "; ".join(diff) + "). Use another output directory, or delete this one.")
        if meta.get("complete"):
            self.complete, self.rows = True, self.num_examples
            self.undecodable = list(meta.get("undecodable", []))
            return
        progress = _read_json(self.path / PROGRESS_NAME) if (self.path / PROGRESS_NAME).is_file() else {}
        self.rows = int(progress.get("rows", 0))
        self.undecodable = list(progress.get("undecodable", []))
        if not 0 <= self.rows <= self.num_examples:
            raise TokenLabelError(f"{self.path / PROGRESS_NAME}: {self.rows} rows recorded for {self.num_examples}")
        self._open_arrays()

    def _open_arrays(self) -> None:
        shape = (self.num_examples, *self.shape)
        arrays = []
        for name, dtype in ((SCORES_NAME, self.score_dtype), (INDICES_NAME, self.index_dtype)):
            arr = _open_npy(self.path / name, mode="r+")
            if arr.shape != shape or arr.dtype != dtype:
                raise TokenLabelError(f"{self.path / name}: {arr.dtype}{arr.shape}, expected {dtype}{shape}; the "
                                      "store is damaged: delete it and start again")
            arrays.append(arr)
        self._scores, self._indices = arrays

    # ---------------------------------------------------------------- write
    def _check_writable(self) -> None:
        if self.complete:
            raise TokenLabelError(f"{self.path} is complete; nothing more can be written")
        if self._scores is None:
            raise TokenLabelError(f"the writer of {self.path} is closed")

    def _row_names(self, start: int, count: int) -> str:
        names = self.names[start:start + count]
        return names[0] if count == 1 else f"rows {start}..{start + count - 1} ({names[0]}, ...)"

    def write(self, scores: np.ndarray, indices: np.ndarray) -> None:
        """Appends rows: ``(k, H, W)`` for one image or ``(B, k, H, W)`` for ``B`` images, in ``names`` order.

        Nothing is written unless every value passes (:func:`check_scores`, :func:`check_indices`).
        """
        self._check_writable()
        scores, indices = np.asarray(scores), np.asarray(indices)
        if scores.ndim == 3:
            scores, indices = scores[None], indices[None]
        b = scores.shape[0]
        if scores.shape[1:] != self.shape or indices.shape != scores.shape:
            raise TokenLabelError(f"{self._row_names(self.rows, max(b, 1))}: label maps of shape "
                                  f"{tuple(scores.shape[1:])} / {tuple(indices.shape[1:])}, the store holds (k, H, W) "
                                  f"= {self.shape}")
        if self.rows + b > self.num_examples:
            raise TokenLabelError(f"{b} more rows would exceed the store's {self.num_examples} images")
        try:
            s = check_scores(scores, self.score_dtype)
            i = check_indices(indices, self.num_classes, self.index_dtype)
        except TokenLabelError as e:
            raise TokenLabelError(f"{self._first_bad_row(scores, indices)}: {e}") from None
        self._scores[self.rows:self.rows + b] = s
        self._indices[self.rows:self.rows + b] = i
        self._advance(b)

    def _first_bad_row(self, scores: np.ndarray, indices: np.ndarray) -> str:
        for r in range(scores.shape[0]):
            try:
                check_scores(scores[r], self.score_dtype)
                check_indices(indices[r], self.num_classes, self.index_dtype)
            except TokenLabelError:
                return self.names[self.rows + r]
        return self._row_names(self.rows, scores.shape[0])

    def write_undecodable(self) -> None:
        """Records that the next image could not be decoded: its row stays zeros and readers refuse it."""
        self._check_writable()
        if self.rows >= self.num_examples:
            raise TokenLabelError(f"the store's {self.num_examples} rows are all written")
        self._scores[self.rows] = 0
        self._indices[self.rows] = 0
        self.undecodable.append(self.names[self.rows])
        self._advance(1)

    def _advance(self, count: int) -> None:
        self.rows += count
        self._uncommitted += count
        if self._uncommitted >= self.commit_every:
            self.commit()

    def _write_progress(self) -> None:
        _write_atomic(self.path / PROGRESS_NAME,
                      json.dumps({"rows": self.rows, "undecodable": self.undecodable}) + "\n")

    def commit(self) -> None:
        """Flushes the arrays, then records the row count: a later run resumes after the last commit."""
        if self.complete or self._scores is None:
            return
        self._scores.flush()  # data first, count second: a recorded row is always on disk
        self._indices.flush()
        self._write_progress()
        self._uncommitted = 0

    def finish(self) -> None:
        """Commits and marks the store complete (atomically); every row must have been written."""
        if self.complete:
            return
        if self.rows != self.num_examples:
            raise TokenLabelError(f"{self.rows} of {self.num_examples} rows written; cannot mark {self.path} complete")
        self.commit()
        meta = {**self._spec, "complete": True, "undecodable": self.undecodable}
        _write_atomic(self.path / META_NAME, json.dumps(meta, indent=2) + "\n")
        self.complete = True
        self._scores = self._indices = None
        (self.path / PROGRESS_NAME).unlink(missing_ok=True)

    def close(self) -> None:
        """Commits what was written and releases the arrays (the store stays resumable)."""
        self.commit()
        self._scores = self._indices = None

    def __enter__(self) -> TokenLabelWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --------------------------------------------------------------------------- reader
def _open_npy(path: Path, mode: str) -> np.memmap:
    if not path.is_file():
        raise TokenLabelError(f"{path}: missing; the store is damaged: delete it and make it again")
    try:
        return np.load(path, mmap_mode=mode, allow_pickle=False)
    except Exception as e:  # bad header (ValueError), file shorter than its header says ("mmap length ..."), ...
        raise TokenLabelError(f"{path}: corrupted or truncated .npy file ({type(e).__name__}: {e}); delete the "
                              "store and make it again") from e


def _read_names(path: Path) -> list[str]:
    try:
        text = (path / NAMES_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TokenLabelError(f"{path / NAMES_NAME}: unreadable ({type(e).__name__}: {e})") from e
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


class _Opened:
    """The open arrays and names of one store in one process."""

    def __init__(self, path: Path):
        meta_path = path / META_NAME
        if not path.is_dir():
            raise TokenLabelError(f"{path}: no such directory; {_MAKE_ONE}")
        if not meta_path.is_file():
            raise TokenLabelError(f"{path} is not a token-label store (no {META_NAME}); {_MAKE_ONE}")
        meta = _read_json(meta_path)
        if meta.get("format") != FORMAT:
            raise TokenLabelError(f"{path} is not a token-label store ({META_NAME} format {meta.get('format')!r}, "
                                  f"expected {FORMAT!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise TokenLabelError(f"{path}: store version {meta.get('version')!r}, this volo-jax reads version "
                                  f"{FORMAT_VERSION}")
        missing = [k for k in ("num_examples", "topk", "height", "width", "score_dtype", "index_dtype", "complete")
                   if k not in meta]
        if missing:
            raise TokenLabelError(f"{meta_path}: missing {', '.join(missing)}")
        n = int(meta["num_examples"])
        if not meta["complete"]:
            done = ""
            if (path / PROGRESS_NAME).is_file():
                try:
                    done = f" ({int(_read_json(path / PROGRESS_NAME)['rows'])} of {n} rows written)"
                except (TokenLabelError, KeyError, TypeError, ValueError):
                    done = ""
            raise TokenLabelError(f"{path} is an incomplete token-label store{done}: the conversion was interrupted: "
                                  "rerun the same command to resume")
        shape = (n, int(meta["topk"]), int(meta["height"]), int(meta["width"]))
        self.scores = _open_npy(path / SCORES_NAME, "r")
        self.indices = _open_npy(path / INDICES_NAME, "r")
        for name, arr, dtype in ((SCORES_NAME, self.scores, meta["score_dtype"]),
                                 (INDICES_NAME, self.indices, meta["index_dtype"])):
            if arr.shape != shape or arr.dtype != np.dtype(dtype):
                raise TokenLabelError(f"{path / name}: {arr.dtype}{tuple(arr.shape)}, but {META_NAME} says "
                                      f"{dtype}{shape}; the store is damaged: delete it and make it again")
        self.names = _read_names(path)
        if len(self.names) != n:
            raise TokenLabelError(f"{path / NAMES_NAME}: {len(self.names)} names for {n} label maps; the store is "
                                  "damaged: delete it and make it again")
        self.meta = meta
        self.undecodable = frozenset(meta.get("undecodable") or ())
        self._index: dict[str, int] | None = None

    @property
    def index(self) -> dict[str, int]:
        if self._index is None:  # built on first lookup: 1.28M names take ~0.3 s, not needed to open a store
            self._index = {name: i for i, name in enumerate(self.names)}
        return self._index


class TokenLabelStore:
    """Read-only random access to a complete store, memory-mapped.

    Picklable for input-pipeline workers: only the path travels; each process re-opens (and re-validates) the
    files on first use. ``lookup`` copies one row out of the page cache, so many workers can read concurrently.

    Raises (on construction):
        TokenLabelError: not a store, incomplete, unknown version, missing/corrupted/truncated arrays, shapes or
            dtypes that disagree with ``meta.json``, or a ``names.txt`` of the wrong length.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._opened: _Opened | None = _Opened(self.path)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}  # memory maps don't pickle; each worker opens its own

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self._opened = None

    @property
    def _o(self) -> _Opened:
        if self._opened is None:
            self._opened = _Opened(self.path)
        return self._opened

    @property
    def meta(self) -> dict[str, Any]:
        """The parsed ``meta.json``."""
        return self._o.meta

    @property
    def names(self) -> list[str]:
        """Row keys, in row order (undecodable images included)."""
        return self._o.names

    @property
    def num_classes(self) -> int | None:
        return self._o.meta.get("num_classes")

    @property
    def topk(self) -> int:
        return int(self._o.meta["topk"])

    @property
    def grid(self) -> tuple[int, int]:
        """``(H, W)`` of every label map."""
        return int(self._o.meta["height"]), int(self._o.meta["width"])

    @property
    def undecodable(self) -> frozenset[str]:
        """Images the labelling tool could not decode (no label map; the training reader skips them too)."""
        return self._o.undecodable

    def __len__(self) -> int:
        return len(self._o.names)

    def __contains__(self, name: object) -> bool:
        return name in self._o.index and name not in self._o.undecodable

    def index_of(self, name: str) -> int:
        """Row of image ``name`` (an :func:`image_key`).

        Raises:
            MissingTokenLabelError: no label map for ``name``.
        """
        o = self._o
        i = o.index.get(name)
        if i is None or name in o.undecodable:
            why = "could not be decoded when the labels were made" if i is not None else "has no label map"
            raise MissingTokenLabelError(f"image {name!r} {why} in {self.path}")
        return i

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i``: scores float32 ``(k, H, W)`` and class indices int32 ``(k, H, W)`` (fresh copies)."""
        o = self._o
        if o.undecodable and o.names[i] in o.undecodable:
            raise MissingTokenLabelError(f"image {o.names[i]!r} could not be decoded when the labels were made "
                                         f"in {self.path}")
        return np.asarray(o.scores[i], np.float32), np.asarray(o.indices[i], np.int32)

    def lookup(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Image ``name``'s scores float32 ``(k, H, W)`` and class indices int32 ``(k, H, W)``."""
        return self.get(self.index_of(name))

    def check_covers(self, names: Iterable[str]) -> None:
        """Checks that every image in ``names`` (keys, :func:`image_key`) has a label map, before training starts.

        Images recorded as undecodable count as covered: the training reader drops them before any lookup.

        Raises:
            TokenLabelError: naming the first images without a label map and how many there are.
        """
        o = self._o
        names = list(names)
        missing = [n for n in names if n not in o.index]
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise TokenLabelError(
                f"{len(missing)} of {len(names)} images have no label map in {self.path} ({len(o.names)} maps): "
                f"{shown}. The labels were made for another dataset or split (keys are paths relative to the split "
                "root without extension, e.g. n01440764/n01440764_10026).")
