"""Data-parallel training of any registered model on an ImageNet-layout folder or a tfds dataset, with exact resume.

    python train.py /path/to/imagenet --model volo_d1_224 --img-size 224 -b 128 --lr 1.6e-3 --drop-path 0.1 --epochs 310
    python train.py /path/to/imagenet --config configs/volo_d1_224.py --output runs/d1
    python train.py /path/to/digits --model volo_d1_224 --img-size 32 -b 32 --epochs 10 --finetune converted_dir/
    python train.py --tfds imagenet2012 --tfds-data-dir ~/tensorflow_datasets --model volo_d1_224 -b 128 ...

``--tfds NAME`` reads a labelled tfds image dataset through ``tfds.data_source`` (``--train-split`` /
``--val-split``, default ``train`` / ``validation``) instead of a folder; it must be prepared in ``array_record``
format: ``tfds build imagenet2012 --manual_dir DIR --file_format array_record``, or an ImageNet-layout folder once
with ``python -m volo_jax.tools.prepare_tfds FOLDER --name NAME --data-dir DIR``. TensorFlow is not needed.

This is pmap-style data parallelism (parameters replicated on every device, the batch split across devices,
gradients all-reduced, BatchNorm statistics over the global batch) written as one ``jax.jit`` program over a
``('data',)`` mesh of every device of every process, because ``jax.pmap`` is documented as legacy and is itself
implemented on ``shard_map`` now (see :mod:`volo_jax.train_lib`). ``-b`` is per device, as in the VOLO repo; the
global batch is printed. Several processes (TPU pods, multi-GPU hosts): ``jax.distributed.initialize()`` runs
first (auto-detected on TPU/SLURM, or ``--coordinator/--num-processes/--process-id``); each process reads its block
of every global batch (the global batches one process would read) and all of them write their shards of the
checkpoints; only process 0 writes metrics, TensorBoard events and config.json.

A run writes to ``--output``: ``checkpoints/`` (orbax, every ``--save-every`` steps, each epoch end and at the end;
the last ``--keep`` kept; an interrupted run restarts from the latest complete one with the same data position and
drops the metrics rows logged after it), ``metrics.jsonl``, TensorBoard events in ``tb/``, ``curves.png`` at the
end, and ``config.json``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import volo_jax
from volo_jax import data, train_lib
from volo_jax.checkpoint import TrainCheckpoints, load_flat_tensors, write_atomic
from volo_jax.xla import compiler_options, reexec_with_hugepage_malloc

_logger = logging.getLogger("train")


# --------------------------------------------------------------------------- configuration
_DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "default.py")


class ConfigError(ValueError):
    """A config file or flag combination train.py cannot run."""


def load_config(path: str | None) -> Any:
    """``get_config()`` of an ml_collections python file (default: ``configs/default.py``); every field it sets must
    be one of the default config's (the flags below). ``FILE.py:ARG`` calls ``get_config(ARG)`` (ml_collections'
    and big_vision's syntax for one file holding several variants, e.g. ``configs/volo_token_label.py:d2``)."""
    path = path or _DEFAULT_CONFIG
    arg = None
    if ":" in path and not os.path.exists(path):
        path, arg = path.rsplit(":", 1)
    sys.path.insert(0, str(Path(__file__).parent))  # recipes import configs.default
    spec = importlib.util.spec_from_file_location("train_config", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        cfg = module.get_config() if arg is None else module.get_config(arg)
    except ValueError as e:  # e.g. an unknown variant
        raise ConfigError(f"--config {path}:{arg}: {e}") from None
    if path != _DEFAULT_CONFIG:  # a recipe may only set fields train.py knows: a typo must not be ignored silently
        known = set(load_config(_DEFAULT_CONFIG).keys())
        unknown = sorted(set(cfg.keys()) - known)
        if unknown:
            hints = "; ".join(f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1))
                                          else "") for k in unknown)
            raise ConfigError(f"--config {path}: unknown setting(s) {hints}; known: {', '.join(sorted(known))}")
    return cfg


# flag -> (config field, type, help). Flags default to None so that only those given override the config file.
FLAGS: dict[str, tuple[str, type, str]] = {
    "--model": ("model", str, "timm model name (volo_d1_224; the VOLO repo's volo_d1 also works with --img-size)"),
    "--num-classes": ("num_classes", int, "classes (0: the dataset's, i.e. the class folders or the tfds ClassLabel)"),
    "--img-size": ("img_size", int, "input resolution (0: the model's default)"),
    "--drop-path": ("drop_path", float, "stochastic depth rate"),
    "--dtype": ("dtype", str, "compute dtype: float32 or bfloat16 (parameters stay float32)"),
    "--epochs": ("epochs", int, "epochs to train"),
    "-b": ("batch_size", int, "batch size PER DEVICE (VOLO repo semantics); the global batch is printed"),
    "--global-batch-size": ("global_batch_size", int, "global batch instead of -b (big_vision semantics, keeps "
                                                      "the recipe when the device count changes); must divide "
                                                      "across the devices (0: -b x devices)"),
    "--lr": ("lr", float, "peak learning rate (AdamW)"),
    "--min-lr": ("min_lr", float, "cosine floor"),
    "--warmup-lr": ("warmup_lr", float, "learning rate at step 0 of the warmup"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warmup length in epochs (stepped per update)"),
    "--weight-decay": ("weight_decay", float, "decoupled weight decay (not on norms, biases, pos_embed, cls_token)"),
    "--clip-grad": ("clip_grad", float, "global-norm gradient clipping (0: off)"),
    "--accum-steps": ("accum_steps", int, "gradient accumulation: micro-batches per optimizer update"),
    "--model-ema-decay": ("model_ema_decay", float, "EMA of the weights, evaluated alongside (0: off)"),
    "--smoothing": ("smoothing", float, "label smoothing"),
    "--mixup": ("mixup", float, "mixup alpha (0: off)"),
    "--cutmix": ("cutmix", float, "cutmix alpha (0: off)"),
    "--mixup-prob": ("mixup_prob", float, "probability of mixing a batch"),
    "--mixup-switch-prob": ("mixup_switch_prob", float, "probability of cutmix instead of mixup when both are on"),
    "--reprob": ("reprob", float, "random erasing probability"),
    "--aa": ("auto_augment", str, "RandAugment policy as timm writes it (rand-m9-mstd0.5-inc1); none: off"),
    "--hflip": ("hflip", float, "horizontal flip probability"),
    "--scale": ("scale", float, "random-resized-crop area fraction range: two numbers, MIN MAX"),
    "--ratio": ("ratio", float, "random-resized-crop aspect ratio range: two numbers, MIN MAX"),
    "--train-interpolation": ("train_interpolation", str, "random-resized-crop interpolation (random, bicubic, "
                                                          "bilinear)"),
    "--seed": ("seed", int, "seed of initialisation, data order, augmentation and mixing"),
    "--workers": ("workers", int, "image decoding threads per process (-j)"),
    "--output": ("output", str, "run directory (checkpoints, metrics, TensorBoard, curves.png)"),
    "--save-every": ("save_every", int, "checkpoint every N steps (and at each epoch end)"),
    "--keep": ("keep", int, "checkpoints to keep"),
    "--eval-every": ("eval_every", int, "evaluate every N epochs (and at the end)"),
    "--log-every": ("log_every", int, "log metrics every N steps"),
    "--finetune": ("finetune", str, "start from this checkpoint (PyTorch file, converted dir or training run), "
                                    "resampling pos_embed / dropping a head of another size"),
    "--token-label-data": ("token_label_data", str, "token-label store (python -m volo_jax.tools."
                                                    "convert_token_labels or label_tokens) with a map per training "
                                                    "image; implies --token-label"),
    "--token-label-size": ("token_label_size", int, "side of the dense target grid (0: the model's aux token grid, "
                                                    "14 at 224)"),
    "--dense-weight": ("dense_weight", float, "token labeling: weight of the per-token (aux head) loss"),
    "--cls-weight": ("cls_weight", float, "token labeling: weight of the class-token loss"),
    "--token-label-crop": ("token_label_crop", str, "token labeling: 'tlt' cuts the crop out of the label maps as "
                                                    "tlt does (transposed on the map; VOLO's released models were "
                                                    "trained so), 'aligned' cuts the region the image crop covers"),
}
# on/off flags (--x / --no-x); None when not given, so the config file's value stays.
BOOL_FLAGS: dict[str, tuple[str, str]] = {
    "--grad-checkpointing": ("grad_checkpointing", "recompute each block's forward in the backward pass (timm's "
                                                   "flag, nnx.remat per block): activation memory for ~1 extra "
                                                   "forward (on CPU: VOLO, PoolFormer, ConViT 22-45 %% less, "
                                                   "VoVNet nothing)"),
    "--token-label": ("token_label", "VOLO's token labeling objective: class-token loss + per-token loss of the aux "
                                     "head, MixToken (VOLO models only)"),
    "--ground-truth": ("ground_truth", "token labeling: mix the ground-truth label into the class target (the VOLO "
                                       "fine-tuning recipes)"),
    "--mix-token": ("mix_token", "token labeling: MixToken (cutmix on the token grid inside the model)"),
}


def check_config(cfg: Any) -> None:
    """Settings that cannot work, reported before any data is read or model built."""
    if cfg.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype {cfg.dtype!r}: float32 or bfloat16")
    if cfg.batch_size <= 0 and cfg.global_batch_size <= 0:
        raise ConfigError(f"batch size {cfg.batch_size}: must be positive")
    for name in ("scale", "ratio"):
        lo, hi = getattr(cfg, name)
        if not 0 < lo <= hi:
            raise ConfigError(f"--{name} {lo} {hi}: needs 0 < MIN <= MAX")
    if cfg.accum_steps < 1:
        raise ConfigError(f"accum_steps {cfg.accum_steps}: must be >= 1")
    if cfg.token_label_data:
        cfg.token_label = True  # the VOLO repo needs both flags; the data alone says what is meant
    if cfg.token_label_crop not in ("tlt", "aligned"):
        raise ConfigError(f"token_label_crop {cfg.token_label_crop!r}: 'tlt' or 'aligned'")
    if cfg.token_label and cfg.dense_weight + cfg.cls_weight <= 0:
        raise ConfigError(f"dense_weight {cfg.dense_weight} + cls_weight {cfg.cls_weight} must be > 0 (tlt asserts)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Data-parallel (pmap-style, on jit + a device mesh) training with exact resume. Settings come "
                    "from --config (default configs/default.py); any flag below overrides its field.")
    p.add_argument("data", nargs="?", default=None,
                   help="ImageNet-layout folder: train/<class>/* and val/<class>/* (or validation/). With --tfds: "
                        "the tfds data dir, unless --tfds-data-dir is given")
    g = p.add_argument_group("tfds (instead of a folder)")
    g.add_argument("--tfds", metavar="NAME", default=None,
                   help="train on a labelled tfds image dataset read through tfds.data_source; it must be prepared "
                        "in array_record format (imagenet2012: tfds build from its manual dir; an ImageNet-layout "
                        "folder: python -m volo_jax.tools.prepare_tfds FOLDER --name NAME)")
    g.add_argument("--tfds-data-dir", default=None, help="tfds data_dir (default: the positional data, else tfds's)")
    g.add_argument("--train-split", default="train", help="training split (folder: subfolder name or synonym)")
    g.add_argument("--val-split", default="validation", help="validation split (folder: subfolder or synonym)")
    p.add_argument("--config", default=None, help="ml_collections python file with get_config()")
    for flag, (field, typ, help_) in FLAGS.items():
        names = [flag, "--batch-size"] if flag == "-b" else ([flag, "-j"] if flag == "--workers" else [flag])
        nargs = 2 if flag in ("--scale", "--ratio") else None
        p.add_argument(*names, dest=field, type=typ, default=None, help=help_, nargs=nargs)
    for flag, (field, help_) in BOOL_FLAGS.items():
        p.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_)
    p.add_argument("--no-resume", action="store_true", help="start over even if --output has checkpoints")
    p.add_argument("--coordinator", default=None, help="multi-process: coordinator address host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's id")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- helpers
def _is_main() -> bool:
    return jax.process_index() == 0


def _global_batch(local: dict[str, np.ndarray], sharding: Any) -> tuple[Any, ...]:
    """Process-local rows -> the train step's batch arguments, one global array per field split along the mesh's
    data axis: ``(images, labels)``, and with token-label maps also ``{tl_scores, tl_indices, tl_box}``."""
    make = jax.make_array_from_process_local_data
    batch: tuple[Any, ...] = (make(sharding, local["image"]), make(sharding, local["label"]))
    maps = {k: make(sharding, v) for k, v in local.items() if k.startswith("tl_")}
    return batch + (maps,) if maps else batch


def _token_labeling(cfg: Any, model: Any, num_classes: int) -> tuple[train_lib.TokenLabelConfig, Any]:
    """The token-labeling settings for ``model`` and the opened token-label store (None without
    ``token_label_data``). Raises ValueError with the reason when they cannot work."""
    if not hasattr(model, "forward_train") or getattr(model, "aux_head", None) is None:
        raise ValueError(f"--token-label needs a model with a class token and an aux head (VOLO), not {cfg.model}")
    grid = tuple(model.pos_embed.get_value().shape[1:3])  # the aux head's token grid: one dense target per token
    if grid[0] != grid[1]:
        raise ValueError(f"token labeling needs a square token grid, {cfg.model} has {grid}")
    size = cfg.token_label_size or grid[0]
    if size != grid[0]:
        raise ValueError(f"--token-label-size {size} does not match {cfg.model}'s {grid[0]}x{grid[1]} aux token grid "
                         f"at this image size (use {grid[0]} or 0)")
    store = None
    if cfg.token_label_data:
        from volo_jax.token_label_store import TokenLabelStore

        store = TokenLabelStore(cfg.token_label_data)
        if store.num_classes is not None and store.num_classes > num_classes:
            raise ValueError(f"{cfg.token_label_data} labels {store.num_classes} classes, the model {num_classes}")
    return train_lib.TokenLabelConfig(label_size=size, dense_weight=cfg.dense_weight, cls_weight=cfg.cls_weight,
                                      ground_truth=cfg.ground_truth, mix_token=cfg.mix_token,
                                      label_maps=store is not None, crop=cfg.token_label_crop), store


def evaluate(graphdef: Any, states: tuple[Any, ...], source: Any, cfg: data.EvalConfig, global_batch: int,
             mesh: Any, workers: int) -> dict[str, float]:
    """top-1 / top-5 / loss of a model over the whole eval source (padded last batch masked out)."""
    rep, shard = train_lib.replicated(mesh), train_lib.batch_sharded(mesh)
    step = _eval_fn(graphdef, rep, shard)
    batches, _ = data.eval_batches(source, cfg, global_batch, process_index=jax.process_index(),
                                   process_count=jax.process_count(), workers=workers)
    totals: dict[str, float] = {}
    for b in batches:
        make = jax.make_array_from_process_local_data
        sums, _ = step(states, make(shard, b["image"]), make(shard, b["label"]), make(shard, b["mask"]))
        # Each batch's four sums come to the host (added in float64): one eval step in flight at a time. Queuing
        # them all as small device programs (an add per sum per batch) hung two CPU processes in a gloo all-gather,
        # one device's launch blocked on XLA's cap of in-flight programs per device.
        for k, v in jax.device_get(sums).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    n = max(totals["count"], 1.0)
    return {"top1": 100.0 * float(totals["top1"]) / n, "top5": 100.0 * float(totals["top5"]) / n,
            "loss": float(totals["loss"]) / n, "count": int(totals["count"])}


_EVAL_FNS: dict[int, Any] = {}


def _eval_fn(graphdef: Any, rep: Any, shard: Any) -> Any:
    key = id(graphdef)
    if key not in _EVAL_FNS:
        _EVAL_FNS[key] = jax.jit(lambda states, x, y, m: train_lib.eval_step(graphdef, states, x, y, m),
                                 in_shardings=(rep, shard, shard, shard), out_shardings=(rep, shard),
                                 compiler_options=compiler_options())
    return _EVAL_FNS[key]


class Writers:
    """metrics.jsonl (atomic per line), TensorBoard events; only process 0 writes.

    A run that starts at step ``start`` (resumed from that checkpoint) first drops the rows an interrupted run logged
    after it, atomically, and has TensorBoard hide those events: the resumed run logs those steps again, so the
    curves hold each step once.
    """

    def __init__(self, out: Path, enabled: bool, start: int = 0):
        self.enabled, self.out = enabled, out
        self.tb = None
        if enabled:
            path = out / "metrics.jsonl"
            if path.exists():
                rows = [line for line in path.read_text().splitlines() if _step_of(line) <= start]
                write_atomic(path, "".join(f"{line}\n" for line in rows))
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"), purge_step=start + 1)
            except ImportError:  # pragma: no cover - optional
                _logger.warning("tensorboardX not installed: no TensorBoard events (pip install tensorboardX)")

    def write(self, step: int, kind: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _step_of(line: str) -> float:
    """The step of a metrics.jsonl row; inf for a line torn by a kill (dropped)."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def plot_curves(out: Path) -> Path | None:
    """Loss and accuracy curves from metrics.jsonl as curves.png (written atomically)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - optional
        return None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    ax1.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    ax1.set_xlabel("step")
    ax1.legend()
    for key in ("top1", "ema_top1"):
        pts = [(r["step"], r[key]) for r in evals if key in r]
        if pts:
            ax2.plot(*zip(*pts, strict=True), "o-", label=key)
    ax2.set_xlabel("step")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.tight_layout()
    tmp = out / ".curves.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out / "curves.png")
    return out / "curves.png"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    if args.coordinator or args.num_processes:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()  # pod / SLURM auto-detection
    try:
        cfg = load_config(args.config)
        for field, value in vars(args).items():  # flags given on the command line win over the config file
            if field in cfg and value is not None:
                cfg[field] = tuple(value) if isinstance(value, list) else value
        check_config(cfg)
    except (ConfigError, FileNotFoundError, SyntaxError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.output)
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)

    # 1. data and model
    try:
        if args.tfds:
            tfds_dir = args.tfds_data_dir or args.data
            train_source = data.TfdsSource(args.tfds, args.train_split, tfds_dir)
            val_source = data.TfdsSource(args.tfds, args.val_split, tfds_dir)
        elif args.data is None:
            raise data.DataError("give an ImageNet-layout folder (positional) or --tfds NAME")
        else:
            train_source = data.ImageFolderSource(args.data, split=args.train_split)
            val_source = data.ImageFolderSource(args.data, split=args.val_split)
    except (data.DataError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.tfds and args.train_split == args.val_split:
        print(f"error: --train-split and --val-split are both {args.train_split!r}", file=sys.stderr)
        return 2
    if not args.tfds and train_source.root == val_source.root:
        print(f"error: {args.data} needs separate train/ and val/ (or validation/) subfolders", file=sys.stderr)
        return 2
    if not train_source.classes and not cfg.num_classes:  # a tfds label that is not a ClassLabel: no class count
        print(f"error: tfds dataset {args.tfds!r} has no class names (its label is not a ClassLabel); give "
              "--num-classes", file=sys.stderr)
        return 2
    if train_source.classes != val_source.classes:  # labels are class-folder indices: they must mean the same
        only_train = sorted(set(train_source.classes) - set(val_source.classes))
        only_val = sorted(set(val_source.classes) - set(train_source.classes))
        print(f"error: the train and validation class folders differ (only in train: {only_train[:10]}, only in "
              f"validation: {only_val[:10]}): the labels would not match", file=sys.stderr)
        return 2
    num_classes = cfg.num_classes or len(train_source.classes)
    mesh = train_lib.data_mesh()
    n_dev = mesh.devices.size
    if cfg.global_batch_size:
        if cfg.global_batch_size % n_dev:
            print(f"error: global batch {cfg.global_batch_size} does not divide across {n_dev} devices "
                  f"({jax.process_count()} process(es)); use a multiple of {n_dev}, or -b per device",
                  file=sys.stderr)
            return 2
        cfg.batch_size = cfg.global_batch_size // n_dev
    global_batch = train_lib.global_batch_size(cfg.batch_size, mesh)
    steps_per_epoch = len(train_source) // global_batch
    if steps_per_epoch == 0:
        print(f"error: {len(train_source)} training images < one global batch ({global_batch})", file=sys.stderr)
        return 2
    total_steps = int(cfg.epochs * steps_per_epoch)
    dtype = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    kw: dict[str, Any] = dict(num_classes=num_classes, drop_path_rate=cfg.drop_path, dtype=dtype, rngs=cfg.seed)
    if cfg.img_size:
        kw["img_size"] = cfg.img_size
    try:
        model = volo_jax.create_model(cfg.model, **kw)
        if cfg.finetune:
            ft = Path(cfg.finetune)
            if ft.is_dir() and not (ft / "config.json").exists() and not list(ft.glob("*.safetensors")):
                # a training run, possibly at another image size or class count: read at its own shapes, then
                # load like converted weights (pos_embed resampled, a head of another size left out)
                from volo_jax.hub import classifier_prefixes

                run, step = TrainCheckpoints.open_run(ft)
                tensors, ft_meta = run.weights_as_numpy(step)
                load_flat_tensors(model, tensors, source=f"{run.directory} (step {step or run.latest_step()})",
                                  ignore_prefixes=classifier_prefixes(model, int(ft_meta["num_classes"])))
            else:
                from volo_jax.hub import load_pretrained

                load_pretrained(model, ft, model_name=cfg.model)
    except Exception as e:  # unknown model, bad checkpoint: the message is the point
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    size = model.pretrained_cfg["input_size"][1:]
    data_cfg = model.pretrained_cfg
    aa = None if cfg.auto_augment.lower() in ("", "none") else cfg.auto_augment
    try:
        train_cfg = data.TrainConfig(img_size=tuple(size), mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
                                     scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), hflip=cfg.hflip,
                                     interpolation=cfg.train_interpolation, reprob=cfg.reprob, auto_augment=aa)
    except ValueError as e:  # e.g. an --aa policy we cannot parse
        print(f"error: {e}", file=sys.stderr)
        return 2
    eval_cfg = data.resolve_eval_config(data_cfg, input_size=(3, *size))
    token_label, store = None, None
    if cfg.token_label:
        try:
            token_label, store = _token_labeling(cfg, model, num_classes)
        except ValueError as e:  # not a VOLO model, a grid mismatch, a bad or incomplete store
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:  # before any state or checkpoint exists: the stream's checks (e.g. token-label maps for every image)
        train_it, loader = data.train_batches(train_source, train_cfg, global_batch, seed=cfg.seed,
                                              process_index=jax.process_index(), process_count=jax.process_count(),
                                              workers=cfg.workers, token_labels=store)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # 2. optimizer, state, checkpoints
    opt_cfg = train_lib.OptimizerConfig(
        lr=cfg.lr, min_lr=cfg.min_lr, warmup_lr=cfg.warmup_lr,
        warmup_steps=int(cfg.warmup_epochs * steps_per_epoch) // cfg.accum_steps,
        total_steps=max(total_steps // cfg.accum_steps, 1), weight_decay=cfg.weight_decay,
        clip_grad=cfg.clip_grad or None, accum_steps=cfg.accum_steps)
    tx, schedule = train_lib.make_optimizer(opt_cfg, nnx.state(model, nnx.Param))
    graphdef, state = train_lib.create_train_state(model, tx, seed=cfg.seed, ema=cfg.model_ema_decay > 0)
    del model
    state = train_lib.replicate(state, mesh)  # every process built the same state from the seed
    ckpts = TrainCheckpoints(out / "checkpoints", keep=cfg.keep)
    data_state = None
    if not args.no_resume and ckpts.latest_step() is not None:
        state, meta = ckpts.restore(state)  # straight into the replicated layout, each process its own devices
        data_state = meta.get("data_state")
        _logger.info("Resumed from %s step %d.", ckpts.directory, int(state.step))
    mix = train_lib.MixConfig(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                              switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                              num_classes=num_classes)
    step_fn = train_lib.jit_train_step(graphdef, tx, mix, cfg.model_ema_decay, mesh, token_label)
    if data_state is not None:
        train_it.set_state(data_state)
    writers = Writers(out, _is_main(), start=int(state.step))
    if _is_main():
        write_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=1))
        print(f"{cfg.model}: {len(train_source)} train / {len(val_source)} val images, {num_classes} classes; "
              f"{n_dev} device(s) x {cfg.batch_size} = global batch {global_batch}; {steps_per_epoch} steps/epoch, "
              f"{total_steps} steps; output {out}")

    def meta() -> dict[str, Any]:
        return {"model_name": cfg.model, "num_classes": num_classes, "img_size": list(size),
                "data_state": train_it.get_state(), "config": cfg.to_dict()}

    # 3. the loop
    from tqdm import tqdm

    start = int(state.step)
    last = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    bar = tqdm(range(start, last), initial=start, total=last, disable=not _is_main(), dynamic_ncols=True)
    shard = train_lib.batch_sharded(mesh)
    t0, seen = time.perf_counter(), 0
    for step in bar:
        state, metrics = step_fn(state, *_global_batch(next(train_it), shard))
        seen += global_batch
        done = step + 1
        if done % cfg.log_every == 0 or done == last:
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                print(f"error: loss is {loss} at step {done}; stopping (last checkpoint kept)", file=sys.stderr)
                ckpts.close()
                return 1
            rate = seen / (time.perf_counter() - t0)
            lr = float(schedule(done // cfg.accum_steps))
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            writers.write(done, "train", {"loss": loss, "lr": lr, "img_s": rate,
                                          "grad_norm": float(metrics["grad_norm"])})
        epoch_end = done % steps_per_epoch == 0
        if done % cfg.save_every == 0 or epoch_end or done == last:
            ckpts.save(state, meta())
        if (epoch_end and (done // steps_per_epoch) % cfg.eval_every == 0) or done == last:
            results = evaluate(graphdef, (state.params, state.model_state), val_source, eval_cfg, global_batch,
                               mesh, cfg.workers)
            if state.ema_params is not None:
                ema = evaluate(graphdef, (state.ema_params, state.model_state), val_source, eval_cfg, global_batch,
                               mesh, cfg.workers)
                results.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
            writers.write(done, "eval", results)
            if _is_main():
                tqdm.write(f"step {done} (epoch {done / steps_per_epoch:.2f}): eval top-1 {results['top1']:.2f} "
                           f"top-5 {results['top5']:.2f} loss {results['loss']:.4f}"
                           + (f" | EMA top-1 {results['ema_top1']:.2f}" if "ema_top1" in results else ""))
    ckpts.close()
    writers.close()
    if loader.skipped and _is_main():
        print(f"Skipped {len(loader.skipped)} unreadable training image(s): {', '.join(sorted(loader.skipped))}")
    if _is_main() and (out / "metrics.jsonl").exists():
        png = plot_curves(out)
        print(f"done: {last} steps; checkpoints in {ckpts.directory}" + (f"; curves {png}" if png else ""))
    return 0


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # glibc tunable for XLA:CPU's temp buffers (see volo_jax.xla)
    sys.exit(main())
