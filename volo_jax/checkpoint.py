"""volo-jax's own parameter format: a directory with ``model.safetensors`` and a ``config.json`` sidecar.

``model.safetensors`` holds every ``nnx.Param`` and ``nnx.BatchStat`` under its dotted NNX path
(``network.0.1.attn.v.kernel``, ``patch_embed.conv.1.mean``), already in Flax layout, so loading is a lookup with no
transposes. ``config.json`` records what the weights are for::

    {"format": "volo-jax-params", "format_version": 1, "model_name": "volo_d1_224", "num_classes": 1000,
     "img_size": [224, 224], "pretrained_cfg": {...}, "volo_jax_version": "0.1.0", "weights_file": "model.safetensors",
     "weights_sha256": "...", "num_tensors": 283, "num_params": 26626424, "meta": {...caller's extra_meta...}}

Writes are atomic: everything goes into a temporary directory next to the target, which is then renamed into place,
so an interrupted save never leaves a half-written directory at the target path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.torch_to_flax import (
    CHECKPOINT_VARIABLE_TYPES,
    ConversionError,
    maybe_resample_pos_embed,
    raise_for_problems,
)

__all__ = ["CONFIG_NAME", "FORMAT", "WEIGHTS_NAME", "is_converted_dir", "load_params", "read_config", "save_params"]

_logger = logging.getLogger(__name__)

FORMAT = "volo-jax-params"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _flat_variables(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], nnx.Variable]]:
    """dotted NNX path -> (path, variable) of every checkpointed variable of the model."""
    state = nnx.state(model, CHECKPOINT_VARIABLE_TYPES)
    return {_dotted(path): (tuple(path), var) for path, var in nnx.to_flat_state(state)}


def _jsonable(obj: Any) -> Any:
    """Tuples -> lists, numpy scalars -> Python, anything else unknown -> str (pretrained_cfg may hold odd values)."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version() -> str | None:
    try:
        from volo_jax import __version__  # local import: volo_jax/__init__ may import this module

        return str(__version__)
    except Exception:  # partially built package; the installed distribution still knows its version
        try:
            from importlib.metadata import version

            return version("volo-jax")
        except Exception:
            return None


def _img_size(model: nnx.Module) -> list[int] | None:
    size = getattr(model, "img_size", None)
    if size is None:
        input_size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
        size = tuple(input_size[-2:]) if input_size else None
    if size is None:
        return None
    return [int(size), int(size)] if isinstance(size, (int, np.integer)) else [int(s) for s in size]


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` is a directory written by :func:`save_params` (not, e.g., a timm/HF model directory)."""
    path = Path(path)
    config = path / CONFIG_NAME
    if not (path.is_dir() and config.is_file() and (path / WEIGHTS_NAME).is_file()):
        return False
    try:
        return json.loads(config.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a converted directory.

    Raises:
        ConversionError: if ``directory`` was not written by :func:`save_params`.
    """
    directory = Path(directory)
    if not is_converted_dir(directory):
        raise ConversionError(f"{directory} is not a volo-jax converted directory (no {CONFIG_NAME} with "
                              f"format={FORMAT!r} next to a {WEIGHTS_NAME})")
    return json.loads((directory / CONFIG_NAME).read_text())


def _write_dir(tmp: Path, model: nnx.Module, model_name: str, extra_meta: Mapping[str, Any] | None) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    abstract: list[str] = []
    for key, (_, var) in _flat_variables(model).items():
        value = var.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):
            abstract.append(key)
            continue
        tensors[key] = np.ascontiguousarray(np.asarray(value))
    if abstract:
        raise ValueError(f"Cannot save an abstract model: {len(abstract)} variables have no values "
                         f"(e.g. {', '.join(abstract[:5])}); update it with converted weights first")
    weights = tmp / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": "flax", "volo_jax_format": FORMAT, "model_name": model_name})
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "architecture": pretrained_cfg.get("architecture", model_name.split(".")[0]),
        "num_classes": int(getattr(model, "num_classes", pretrained_cfg.get("num_classes", -1))),
        "img_size": _img_size(model),
        "pretrained_cfg": _jsonable(pretrained_cfg),
        "volo_jax_version": _version(),
        "weights_file": WEIGHTS_NAME,
        "weights_sha256": sha256_file(weights),
        "num_tensors": len(tensors),
        "num_params": int(sum(v.size for v in tensors.values())),
        "meta": _jsonable(dict(extra_meta or {})),
    }
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # safetensors creates its file 0600; give it the umask-respecting mode config.json just got.
    os.chmod(weights, (tmp / CONFIG_NAME).stat().st_mode & 0o777)
    # Make the bytes durable before the rename publishes them: a crash right after must not expose empty files.
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())


def save_params(
    directory: str | os.PathLike,
    model: nnx.Module,
    *,
    model_name: str,
    extra_meta: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Saves the model's params and batch stats as ``directory/model.safetensors`` + ``directory/config.json``.

    The directory appears atomically: files are written to a temporary sibling directory that is then renamed to
    ``directory``. With ``overwrite=True`` an existing converted directory is replaced the same way (old one
    renamed aside, new one renamed in, old one deleted; on failure the old one is put back).

    Args:
        directory: the target directory (must not exist unless ``overwrite``).
        model: a concrete NNX model (an abstract one must first be updated with real values).
        model_name: the timm name (``volo_d1_224`` or ``volo_d1_224.sail_in1k``), checked again by
            :func:`load_params`.
        extra_meta: JSON-able provenance stored under ``"meta"`` in ``config.json`` (e.g. the source checkpoint
            path and sha256).
        overwrite: replace an existing directory written by this function (or an empty directory). Any other
            existing path is never deleted.

    Returns:
        The target directory.

    Raises:
        FileExistsError: the target exists and ``overwrite`` is False, or it exists and is not ours.
        ValueError: the model is abstract.
    """
    target = Path(directory)
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 mode would survive the rename; os.mkdir applies the user's umask.
    tmp = target.parent / f".{target.name}.tmp-{secrets.token_hex(6)}"
    os.mkdir(tmp)
    try:
        _write_dir(tmp, model, model_name, extra_meta)
        _check_target(target, overwrite)  # again: it may have appeared while we were writing
        if target.exists() or target.is_symlink():
            _swap_in(tmp, target)
        else:
            # os.rename onto an existing non-empty directory fails (ENOTEMPTY), so a racing writer can't be clobbered.
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("Saved %s params to %s.", model_name, target)
    return target


def _check_target(target: Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if target.is_symlink() or not target.is_dir() or not (is_converted_dir(target) or not any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not a volo-jax converted directory; refusing to replace it")


def _swap_in(tmp: Path, target: Path) -> None:
    """Replaces the directory ``target`` by ``tmp``: rename old aside, rename new in, delete old."""
    old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous version back
        raise
    shutil.rmtree(old, ignore_errors=True)


def load_params(
    directory: str | os.PathLike,
    model: nnx.Module,
    *,
    model_name: str | None = None,
    ignore_prefixes: Sequence[str] = (),
    resample_pos_embed: bool = True,
    verify: bool = True,
) -> None:
    """Loads a directory written by :func:`save_params` into ``model`` (in place), strictly.

    Every variable of the model must be in the file with the same shape and every tensor of the file must be used,
    except those under ``ignore_prefixes``; all problems are reported in one :class:`ConversionError`. Position
    embeddings at another grid are resampled like timm when ``resample_pos_embed``.

    Args:
        directory: the converted directory.
        model: a concrete NNX model; its params and batch stats are replaced.
        model_name: the timm name the caller built; a different ``model_name`` in the directory is an error only
            if the weights don't fit (it is logged otherwise). Defaults to ``model.pretrained_cfg['architecture']``.
        ignore_prefixes: dotted NNX path prefixes to leave out, e.g. ``('head.', 'aux_head.')``.
        resample_pos_embed: resample ``pos_embed`` whose grid differs from the model's.
        verify: check the weights file against the sha256 in ``config.json`` (catches silent corruption).

    Raises:
        ConversionError: not a converted directory, checksum mismatch, or missing/unexpected/mismatched tensors.
    """
    from safetensors.numpy import load_file

    directory = Path(directory)
    config = read_config(directory)
    weights = directory / config.get("weights_file", WEIGHTS_NAME)
    if verify and config.get("weights_sha256") and sha256_file(weights) != config["weights_sha256"]:
        raise ConversionError(f"{weights} does not match the sha256 recorded in {directory / CONFIG_NAME}: "
                              "the file is corrupt or was modified")
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise ConversionError(f"Cannot read {weights}: {type(e).__name__}: {e}") from e

    saved_name = str(config.get("model_name", ""))
    wanted = model_name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    same_arch = wanted is None or saved_name.split(".")[0] == str(wanted).split(".")[0]
    hint = "" if same_arch else f"Note: {directory} was converted for {saved_name!r}, not {wanted!r}."
    load_flat_tensors(model, tensors, source=str(directory), ignore_prefixes=ignore_prefixes,
                      resample_pos_embed=resample_pos_embed, hint=hint)
    if not same_arch:
        _logger.warning("%s was converted for %r; loading it into %r (all shapes match).",
                        directory, saved_name, wanted)


def load_flat_tensors(model: nnx.Module, tensors: Mapping[str, np.ndarray], *, source: str,
                      ignore_prefixes: Sequence[str] = (), resample_pos_embed: bool = True, hint: str = "") -> None:
    """Loads ``{dotted NNX path: array}`` into ``model`` in place, strictly (see :func:`load_params`).

    Raises:
        ConversionError: missing, unexpected or mis-shaped tensors, all listed (``source`` names where from).
    """
    ignore_prefixes = tuple(ignore_prefixes)
    variables = {k: v for k, v in _flat_variables(model).items() if not k.startswith(ignore_prefixes)}
    found = {k: tuple(v.shape) for k, v in tensors.items() if not k.startswith(ignore_prefixes)}
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...], str]] = []
    updates: list[tuple[tuple[Any, ...], nnx.Variable]] = []
    for key, (path, var) in variables.items():
        if key not in tensors:
            continue
        value, shape = tensors[key], tuple(var.get_value().shape)
        if tuple(value.shape) != shape:
            resampled = maybe_resample_pos_embed(key, value, shape) if resample_pos_embed else None
            if resampled is None:
                mismatched.append((key, tuple(value.shape), shape, key))
                continue
            value = resampled
        # jnp.asarray places the value on the default device instead of leaving a numpy array in the model.
        updates.append((path, var.replace(jnp.asarray(value, dtype=var.get_value().dtype))))

    raise_for_problems(
        target=f"{type(model).__name__} from {source}",
        expected={k: (tuple(v.get_value().shape), k) for k, (_, v) in variables.items()},
        found=found,
        mismatched=mismatched,
        hint=hint,
    )
    nnx.update(model, nnx.from_flat_state(updates))


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a temp file next to ``path`` and renames it into place (no half-written file on a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        if path.exists():  # keep the replaced file's permissions (mkstemp creates the temp file 0600)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --------------------------------------------------------------------------- training checkpoints (orbax)
def run_checkpoints_dir(path: str | os.PathLike) -> Path:
    """``path/checkpoints`` for a ``train.py --output`` run directory (its checkpoints live one level down), else
    ``path`` itself (a checkpoints directory or one step of it)."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


class TrainCheckpoints:
    """The training run's checkpoints: an orbax ``CheckpointManager`` over one directory, a step per subdirectory.

    Each step holds the items ``params``, ``model_state`` (BatchNorm statistics, dropout RNG state), ``batch_stats``
    (the BatchNorm statistics alone), ``opt_state``, ``ema_params`` (when EMA is on), ``progress`` (step and PRNG
    key) and ``meta`` (JSON: model name, config, data position), so :meth:`restore` resumes exactly and
    :meth:`restore_weights` reads only the weights (``eval.py``, ``--finetune``). Orbax writes each step into a
    temporary directory and renames it when complete: a run killed mid-save leaves no step that
    :meth:`latest_step` would pick up. Saves are asynchronous (the step returns while the arrays are written); every
    process calls :meth:`save` and orbax has each write its own shards.

    Args:
        directory: the run's checkpoint directory (created).
        keep: how many of the newest steps to keep (older ones are deleted).
        async_save: write in a background thread.
        read_only: open existing checkpoints without writing or deleting anything.
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).expanduser().absolute()
        # cleanup_tmp_directories: a save that a kill interrupted left a temporary directory; remove it.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=not read_only, read_only=read_only,
                                               cleanup_tmp_directories=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    @classmethod
    def open_run(cls, path: str | os.PathLike) -> tuple[TrainCheckpoints, int | None]:
        """Read-only checkpoints of a run (``train.py --output``) or its ``checkpoints`` directory (step None: the
        latest), or of one step's subdirectory."""
        path = run_checkpoints_dir(path)
        if path.name.isdigit():
            return cls(path.parent, read_only=True), int(path.name)
        return cls(path, read_only=True), None

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: Any, meta: Mapping[str, Any], *, force: bool = True) -> bool:
        """Starts saving ``state`` (a :class:`volo_jax.train_lib.TrainState`) under its step; returns at once."""
        args = self._ocp.args
        items = {"params": args.StandardSave(state.params), "opt_state": args.StandardSave(state.opt_state),
                 "progress": args.StandardSave({"step": state.step, "key": state.key}),
                 "meta": args.JsonSave(_jsonable(dict(meta)))}
        if jax.tree.leaves(state.model_state):  # orbax refuses empty trees (a model without BatchNorm or dropout)
            items["model_state"] = args.StandardSave(state.model_state)
        batch_stats = nnx.filter_state(state.model_state, nnx.BatchStat)
        if jax.tree.leaves(batch_stats):  # also on their own: weights-only readers have no dropout RNG state
            items["batch_stats"] = args.StandardSave(batch_stats)
        if state.ema_params is not None:
            items["ema_params"] = args.StandardSave(state.ema_params)
        return self._manager.save(int(state.step), args=args.Composite(**items), force=force)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no complete training checkpoint")
        return step

    def meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON ``meta`` item of ``step`` (default: the latest)."""
        args = self._ocp.args
        return dict(self._manager.restore(self._step(step), args=args.Composite(meta=args.JsonRestore())).meta)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The full training state of ``step`` (default: the latest) shaped and sharded like ``abstract_state``."""
        args = self._ocp.args
        target = jax.tree.map(_abstract, abstract_state)
        items = {"params": args.StandardRestore(target.params), "opt_state": args.StandardRestore(target.opt_state),
                 "progress": args.StandardRestore({"step": target.step, "key": target.key}),
                 "meta": args.JsonRestore()}
        if jax.tree.leaves(target.model_state):
            items["model_state"] = args.StandardRestore(target.model_state)
        if target.ema_params is not None:
            items["ema_params"] = args.StandardRestore(target.ema_params)
        r = self._manager.restore(self._step(step), args=args.Composite(**items))
        state = abstract_state.replace(
            step=r.progress["step"], key=r.progress["key"], params=r.params, opt_state=r.opt_state,
            model_state=r.model_state if "model_state" in items else abstract_state.model_state,
            ema_params=r.ema_params if "ema_params" in items else None)
        return state, dict(r.meta)

    def restore_weights(self, model: nnx.Module, step: int | None = None, *, use_ema: bool = False) -> dict[str, Any]:
        """Loads the weights of ``step`` (default: the latest) into ``model`` in place; returns the ``meta`` item.

        ``use_ema`` takes the EMA parameters (an error if the run kept none); BatchNorm statistics are the live ones
        (the EMA averages parameters only).
        """
        args = self._ocp.args
        step = self._step(step)
        which = "ema_params" if use_ema else "params"
        if use_ema and not (self.directory / str(step) / "ema_params").is_dir():  # one subdirectory per item
            raise ConversionError(f"{self.directory} step {step} has no EMA weights (the run trained without EMA)")
        params = jax.tree.map(_abstract, nnx.state(model, nnx.Param))
        items = {which: args.StandardRestore(params), "meta": args.JsonRestore()}
        batch_stats = nnx.state(model, nnx.BatchStat)
        if jax.tree.leaves(batch_stats):
            items["batch_stats"] = args.StandardRestore(jax.tree.map(_abstract, batch_stats))
        r = self._manager.restore(step, args=args.Composite(**items))
        nnx.update(model, r[which])
        if "batch_stats" in items:
            nnx.update(model, r.batch_stats)
        return dict(r.meta)

    def weights_as_numpy(self, step: int | None = None, *, use_ema: bool = False
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The weights of ``step`` as ``{dotted NNX path: array}`` at the run's own shapes, and its ``meta``.

        For loading into a model of another image size or class count (``train.py --finetune``): the run's model is
        rebuilt from ``meta`` (name, classes, image size) as the restore target, then flattened.
        """
        from volo_jax.registry import create_model

        step = self._step(step)
        meta = self.meta(step)
        kw: dict[str, Any] = {"num_classes": int(meta["num_classes"])}
        if meta.get("img_size"):
            kw["img_size"] = tuple(meta["img_size"])
        src = create_model(meta["model_name"], **kw)
        self.restore_weights(src, step, use_ema=use_ema)
        return {k: np.asarray(v.get_value()) for k, (_, v) in _flat_variables(src).items()}, meta

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _abstract(x: Any) -> Any:
    """A restore target leaf: shape, dtype and sharding of ``x`` (typed PRNG keys included)."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
