"""Input pipeline alone: our grain train/eval streams vs timm's transforms in a torch DataLoader, same images.

    python -m benchmarks input                          # 256 photos written to a temp folder, 224 px, 2 workers
    python -m benchmarks input --data /path/to/imagenet --workers 8 --batches 50

Both sides decode the same files with PIL and apply the same transform: training = random-resized crop, flip,
RandAugment (``--aa``), normalise, random erasing 0.25 (timm: ``create_transform(is_training=True, ...)``); eval =
resize, center crop, normalise (timm: ``create_transform(**resolve_data_config(model=volo_d1_224))``). Our side:
``volo_jax.data.train_batches`` / ``eval_batches`` (grain, ``--workers`` decoding threads); timm's side: its
``ImageDataset`` in a ``torch.utils.data.DataLoader`` with ``--workers`` processes. The first batch (thread / process
start-up) is not timed; the table shows images/s over the next ``--batches`` batches and ratio = ours / timm.

Without ``--data``, a folder of ``--images`` JPEGs (500x375 crops of scikit-image's sample photographs, ImageNet's
typical size) is written to a temporary directory, so the command needs no dataset. Training needs far fewer
images/s than this on any machine where the model step is the bottleneck (VOLO-D1's training step runs at a few
images/s on 2 CPU cores), which is what "the pipeline keeps up" means.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.report import Recorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="ImageNet-layout folder (train/, val/); default: temp photos")
    parser.add_argument("--images", type=int, default=384, help="photos per split to write when --data is not given")
    parser.add_argument("--img-size", type=int, default=224, help="output resolution")
    parser.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="RandAugment policy (none: off)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch")
    parser.add_argument("--batches", type=int, default=8, help="timed batches (after one untimed)")
    parser.add_argument("--workers", type=int, default=2, help="decoding threads (ours) / processes (timm)")
    parser.add_argument("--no-timm", action="store_true", help="time only our pipeline")


def _write_photos(root: Path, n: int) -> Path:
    """``n`` 500x375 JPEG crops of scikit-image's sample photographs in ``train/<k>`` and ``val/<k>``."""
    from skimage import data as samples

    photos = [np.asarray(Image.fromarray(getattr(samples, name)()).convert("RGB").resize((800, 600)))
              for name in ("astronaut", "coffee", "chelsea", "rocket")]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i in range(n):
            img = photos[i % len(photos)]
            top, left = rng.integers(0, img.shape[0] - 375), rng.integers(0, img.shape[1] - 500)
            folder = root / split / str(i % 4)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[top:top + 375, left:left + 500]).save(folder / f"{i}.jpg", quality=90)
    return root


def _timed_batches(num_images: int, args: argparse.Namespace) -> int:
    """``--batches``, or fewer so that one pass over the split holds the untimed batch too (same on both sides)."""
    return max(1, min(args.batches, num_images // args.batch - 1))


def _rate(batches, n: int, batch: int) -> float:
    next(batches)  # start-up, not timed
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    return n * batch / (time.perf_counter() - t0)


def _ours(root: Path, args: argparse.Namespace, aa: str | None) -> dict[str, float]:
    from volo_jax import data

    size = (args.img_size, args.img_size)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    train = data.ImageFolderSource(root, split="train")
    cfg = data.TrainConfig(img_size=size, mean=mean, std=std, auto_augment=aa, reprob=0.25)
    it, _ = data.train_batches(train, cfg, args.batch, seed=0, workers=args.workers)
    rates = {"train": _rate(it, _timed_batches(len(train), args), args.batch)}
    val = data.ImageFolderSource(root, split="validation")
    ecfg = data.resolve_eval_config({"input_size": (3, *size), "crop_pct": 0.96, "interpolation": "bicubic"})
    eit, _ = data.eval_batches(val, ecfg, args.batch, workers=args.workers)
    rates["eval"] = _rate(eit, _timed_batches(len(val), args), args.batch)
    return rates


def _timm(root: Path, args: argparse.Namespace, aa: str | None) -> dict[str, float]:
    import timm.data.auto_augment as taa
    import torch
    from timm.data import ImageDataset, create_transform

    # Pillow >= 11 refuses posterize(img, 0), which timm's PosterizeIncreasing reaches at magnitude 10 (rand-m9-mstd0.5
    # clips there ~2 % of the time): timm would crash mid-benchmark. Same fix as ours: keep 0 bits = black.
    original = taa.posterize

    def posterize(img, bits, **kw):
        return Image.new(img.mode, img.size) if bits <= 0 else original(img, bits, **kw)

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        taa.NAME_TO_OP[name] = posterize
    torch.set_num_threads(1)
    train_tf = create_transform(args.img_size, is_training=True, auto_augment=aa, re_prob=0.25,
                                interpolation="random")
    eval_tf = create_transform(args.img_size, is_training=False, interpolation="bicubic", crop_pct=0.96)
    rates = {}
    for split, tf in (("train", train_tf), ("eval", eval_tf)):
        ds = ImageDataset(str(root / ("train" if split == "train" else "val")), transform=tf)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=split == "train",
                                             num_workers=args.workers, drop_last=True,
                                             persistent_workers=args.workers > 0)
        rates[split] = _rate(iter(loader), _timed_batches(len(ds), args), args.batch)
    return rates


def run(args: argparse.Namespace) -> Recorder:
    rec = Recorder()
    aa = None if args.aa.lower() in ("", "none") else args.aa
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data) if args.data else _write_photos(Path(tmp) / "photos", args.images)
        ours = _ours(root, args, aa)
        theirs = None if args.no_timm else _timm(root, args, aa)
    source = args.data if args.data else f"{args.images}+{args.images} generated JPEG photos"
    rec.note(f"{source}, {args.img_size} px, batch {args.batch}, {args.workers} workers, aa={aa}, "
             f"{args.batches} timed batches")
    rows = []
    for split in ("train", "eval"):
        t = f"{theirs[split]:.1f}" if theirs else "-"
        r = f"{ours[split] / theirs[split]:.2f}x" if theirs else "-"
        rows.append([split, f"{ours[split]:.1f}", t, r])
    rec.table(["pipeline", "ours img/s", "timm img/s", "ratio"], rows)
    return rec
