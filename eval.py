"""ImageNet validation of a volo-jax model with timm's preprocessing, data-parallel over every device.

    python eval.py /path/to/imagenet --model volo_d1_224 --checkpoint d1_224_84.2.pth.tar --img-size 224 -b 128
    python eval.py /path/to/imagenet --model volo_d1_224.sail_in1k --pretrained            # timm's hub weights
    python eval.py --tfds imagenet2012 --tfds-data-dir ~/tensorflow_datasets --model convit_base --pretrained

The same command line as timm's (and the VOLO repo's) ``validate.py``; the numbers are the same too because the
transform is timm's eval transform to the bit (:mod:`volo_jax.data`). ``-b`` is the global batch, as in timm; it is
split over every device of every process (a ``('data',)`` mesh), the last partial batch is padded and masked, and an
image that cannot be decoded is skipped and reported, so every image counts exactly once. Exit status: 0 done,
1 nothing could be evaluated, 2 bad arguments / data / checkpoint (the message says which).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import volo_jax
from volo_jax import data, train_lib
from volo_jax.checkpoint import write_atomic
from volo_jax.hub import load_model
from volo_jax.xla import compiler_options, reexec_with_hugepage_malloc

_logger = logging.getLogger("eval")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="ImageNet validation with timm's preprocessing (flags as timm's validate.py).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="image folder in ImageNet layout (<class>/<image>); its 'val/' (or another --split synonym) "
                        "is used when present. With --tfds: the tfds data dir, unless --tfds-data-dir is given")
    g = p.add_argument_group("data")
    g.add_argument("--tfds", metavar="NAME", default=None,
                   help="read a labelled tfds image dataset (e.g. imagenet2012) through tfds.data_source; it must "
                        "be prepared in array_record format (imagenet2012: from its manual dir)")
    g.add_argument("--split", default="validation", help="dataset split (folder: subfolder name or synonym)")
    g.add_argument("--tfds-data-dir", default=None, help="tfds data_dir (default: tfds's)")
    g.add_argument("--tfds-download", action="store_true", help="let tfds download/prepare the dataset")
    g.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N images")
    g.add_argument("-j", "--workers", type=int, default=4, help="image decoding threads per process")
    g = p.add_argument_group("model")
    g.add_argument("--model", "-m", required=True, help="timm name, optionally with tag (volo_d1_224.sail_in1k)")
    g.add_argument("--checkpoint", default=None,
                   help="weights: a PyTorch file (.safetensors/.pth/.pth.tar/.bin; original and timm layouts), a "
                        "directory from `python -m converters`, or a timm/HF model directory")
    g.add_argument("--pretrained", action="store_true", help="timm's weights from the HF hub (timm/<name.tag>)")
    g.add_argument("--use-ema", action="store_true",
                   help="take the EMA weights of a training checkpoint (state_dict_ema / model_ema)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the checkpoint's); must match the checkpoint")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="computation dtype (parameters stay float32; logits and loss in float32)")
    g = p.add_argument_group("preprocessing (default: the model's pretrained data config, as timm)")
    g.add_argument("--img-size", type=int, default=None, help="input image size (square)")
    g.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None,
                   help="full input size, overrides --img-size (non-square allowed)")
    g.add_argument("--crop-pct", type=float, default=None, help="center crop fraction (resize to size / crop_pct)")
    g.add_argument("--crop-mode", choices=("center", "squash", "border"), default=None, help="timm's crop mode")
    g.add_argument("--interpolation", choices=("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos"),
                   default=None, help="resize interpolation")
    g.add_argument("--mean", type=float, nargs="+", default=None, metavar="MEAN", help="normalisation mean")
    g.add_argument("--std", type=float, nargs="+", default=None, metavar="STD", help="normalisation std")
    g.add_argument("--use-train-size", action="store_true",
                   help="use the train input size/crop even when the model's cfg has a test size (timm's default "
                        "is the test size, which its published results use)")
    g = p.add_argument_group("run and output")
    g.add_argument("-b", "--batch-size", type=int, default=256,
                   help="GLOBAL batch size as in timm's validate.py (split over all devices of all processes; "
                        "must be divisible by the device count)")
    g.add_argument("--results-file", default=None, help="write the summary here (atomically)")
    g.add_argument("--results-format", choices=("csv", "json"), default="csv", help="format of --results-file")
    g.add_argument("--predictions", metavar="FILE", default=None,
                   help="write per-image top-5 classes and probabilities (CSV; skipped images with their error)")
    g.add_argument("--log-freq", type=int, default=10, help="refresh the running accuracy every N batches")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-process; auto-detected on TPU/SLURM)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- weights
def build_model(args: argparse.Namespace, img_size: tuple[int, int] | None, dtype: Any) -> nnx.Module:
    """The model with ``--checkpoint`` / ``--pretrained`` weights (:func:`volo_jax.hub.load_model`); its class count
    is the checkpoint's."""
    return load_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                      num_classes=args.num_classes, img_size=img_size, dtype=dtype, use_ema=args.use_ema)


# --------------------------------------------------------------------------- helpers
def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in batch order."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def _gather(x: np.ndarray) -> np.ndarray:
    """Concatenates a 1-D non-negative int array over processes (identity with one process)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    n = int(np.max(multihost_utils.process_allgather(np.array([len(x)]))))
    padded = np.concatenate([x, np.full(n - len(x), -1, x.dtype)])
    out = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
    return out[out >= 0]


def _csv(rows: list[dict[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- main
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("eval", "volo_jax", "converters"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.distributed:
        jax.distributed.initialize()
    is_main = jax.process_index() == 0
    try:
        # 1. data config (timm's resolve_data_config, test size by default) and the model with its weights
        pretrained_cfg = volo_jax.get_pretrained_cfg(args.model)
        cfg = data.resolve_eval_config(
            pretrained_cfg, img_size=args.img_size, input_size=args.input_size, crop_pct=args.crop_pct,
            interpolation=args.interpolation, mean=args.mean, std=args.std, crop_mode=args.crop_mode,
            use_test_size=not args.use_train_size)
        built_size = None if tuple(cfg.input_size) == tuple(pretrained_cfg["input_size"]) else cfg.img_size
        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        if args.data is None and args.tfds is None:
            raise data.DataError("give a data folder (positional) or --tfds NAME")
        n_dev = jax.device_count()
        if args.batch_size <= 0 or args.batch_size % n_dev:
            raise data.DataError(f"-b {args.batch_size} must be a positive multiple of the {n_dev} devices")
        model = build_model(args, built_size, dtype)
        # 2. the dataset
        if args.tfds:
            source = data.TfdsSource(args.tfds, args.split, args.tfds_data_dir or args.data,
                                     download=args.tfds_download)
        else:
            source = data.ImageFolderSource(args.data, args.split)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:  # ConversionError, DataError
        print(f"error: {e}", file=sys.stderr)
        return 2
    num_classes = getattr(model, "num_classes", None)
    if is_main:
        print(f"Model {args.model}: {sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6:.2f}M "
              f"params, {num_classes} classes, {args.dtype}; data {cfg.as_dict()}")
        print(f"Dataset: {len(source)} images"
              + (f", {len(source.classes)} classes" if getattr(source, "classes", None) else "")
              + f" ({getattr(source, 'root', args.tfds)}); {n_dev} device(s), {jax.process_count()} process(es), "
              f"global batch {args.batch_size}")
    if num_classes and getattr(source, "classes", None) and len(source.classes) > num_classes:
        print(f"error: the data has {len(source.classes)} classes, the model only {num_classes}", file=sys.stderr)
        return 2

    # 3. one jitted step over a ('data',) mesh of every device: params replicated, batch split
    mesh = train_lib.data_mesh()
    rep, shard = train_lib.replicated(mesh), train_lib.batch_sharded(mesh)
    model.eval()
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, rep)
    step = jax.jit(lambda state, x, y, m: train_lib.eval_step(graphdef, (state,), x, y, m),
                   in_shardings=(rep, shard, shard, shard), out_shardings=(rep, shard),
                   compiler_options=compiler_options())
    h, w = cfg.img_size
    B = args.batch_size
    t0 = time.perf_counter()
    step = step.lower(state, jax.ShapeDtypeStruct((B, h, w, cfg.input_size[0]), jnp.float32, sharding=shard),
                      jax.ShapeDtypeStruct((B,), jnp.int32, sharding=shard),
                      jax.ShapeDtypeStruct((B,), jnp.bool_, sharding=shard)).compile()
    compile_s = time.perf_counter() - t0

    # 4. the loop: sums stay on device; per-image outputs are fetched only for --predictions
    batches, num_batches = data.eval_batches(source, cfg, B, process_index=jax.process_index(),
                                             process_count=jax.process_count(), workers=args.workers,
                                             limit=args.num_samples)
    totals = None
    failed: list[tuple[int, str]] = []
    preds: list[dict[str, np.ndarray]] = []
    from tqdm import tqdm

    bar = tqdm(batches, total=num_batches, disable=not is_main, unit="batch", dynamic_ncols=True)
    t_first = t_start = time.perf_counter()
    for i, batch in enumerate(bar):
        glob = [jax.make_array_from_process_local_data(shard, batch[k]) for k in ("image", "label", "mask")]
        sums, per_example = step(state, *glob)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        failed += [(int(j), str(e)) for j, e in zip(batch["index"], batch["error"], strict=True) if e]
        if args.predictions:
            preds.append({"index": batch["index"], "label": batch["label"], "mask": batch["mask"],
                          **{k: _local_rows(v) for k, v in per_example.items()}})
        if i == 0:  # the first batch pays for the loader's start-up: throughput is measured after it
            jax.block_until_ready(totals)
            t_start = time.perf_counter()
            first_count = int(np.asarray(totals["count"].addressable_data(0)))
        if is_main and (i + 1) % args.log_freq == 0:
            t = {k: float(np.asarray(v.addressable_data(0))) for k, v in totals.items()}
            bar.set_postfix(acc1=f"{100 * t['top1'] / max(t['count'], 1):.3f}")
    bar.close()
    if totals is None:
        print("error: no batches", file=sys.stderr)
        return 1
    jax.block_until_ready(totals)
    elapsed = time.perf_counter() - t_start
    t = {k: float(np.asarray(v.addressable_data(0))) for k, v in totals.items()}
    count = int(t["count"])
    steady = count - first_count
    rate = steady / elapsed if num_batches > 1 and elapsed > 0 else count / (time.perf_counter() - t_first)

    # 5. report: skipped images by name, timm's summary line, results and predictions files
    idx = _gather(np.array([j for j, _ in failed], np.int64))
    skipped = [source.name(int(j)) for j in sorted(idx)]
    if is_main:
        for j, err in failed:
            _logger.warning("skipped %s: %s", source.name(j), err)
    if count == 0:
        print(f"error: none of the images could be evaluated ({len(skipped)} skipped)", file=sys.stderr)
        return 1
    top1, top5 = 100 * t["top1"] / count, 100 * t["top5"] / count
    results = {
        "model": args.model, "top1": round(top1, 4), "top1_err": round(100 - top1, 4), "top5": round(top5, 4),
        "top5_err": round(100 - top5, 4), "loss": round(t["loss"] / count, 6),
        "param_count": round(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) / 1e6, 2),
        "img_size": cfg.input_size[-1], "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
        "num_images": count, "num_skipped": len(skipped), "images_per_sec": round(rate, 2),
        "compile_s": round(compile_s, 2), "batch_size": B, "devices": n_dev, "dtype": args.dtype,
        "checkpoint": args.checkpoint or ("hub" if args.pretrained else ""), "skipped": skipped,
    }
    if args.predictions:
        rows = []
        for p in preds:
            for r in range(len(p["index"])):
                if p["index"][r] < 0:
                    continue
                j = int(p["index"][r])
                ok = bool(p["mask"][r])
                rows.append({"index": j, "filename": source.name(j), "label": int(p["label"][r]) if ok else "",
                             "top5_classes": " ".join(map(str, p["top_idx"][r])) if ok else "",
                             "top5_probs": " ".join(f"{v:.6g}" for v in p["top_prob"][r]) if ok else "",
                             "loss": f"{p['loss'][r]:.6g}" if ok else "",
                             "error": next((e for k, e in failed if k == j), "")})
        if jax.process_count() > 1:
            _logger.warning("--predictions with several processes: process %d writes its own rows to %s.%d",
                            jax.process_index(), args.predictions, jax.process_index())
        if rows and (is_main or jax.process_count() > 1):
            target = args.predictions if jax.process_count() == 1 else f"{args.predictions}.{jax.process_index()}"
            write_atomic(target, _csv(sorted(rows, key=lambda r: r["index"])))
    if is_main:
        if skipped:
            print(f"Skipped {len(skipped)} image(s) that could not be decoded: {', '.join(skipped)}")
        print(f" * Acc@1 {results['top1']:.3f} ({results['top1_err']:.3f}) "
              f"Acc@5 {results['top5']:.3f} ({results['top5_err']:.3f})")
        print(f" * loss {results['loss']:.4f} | {count} images, {len(skipped)} skipped | {rate:.1f} images/s "
              f"(after the first batch) | compile {compile_s:.1f} s")
        if args.results_file:
            if args.results_format == "json":
                write_atomic(args.results_file, json.dumps(results, indent=4) + "\n")
            else:
                write_atomic(args.results_file, _csv([{**results, "skipped": ";".join(skipped)}]))
    return 0


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # glibc tunable for XLA:CPU's temp buffers (see volo_jax.xla)
    sys.exit(main())
