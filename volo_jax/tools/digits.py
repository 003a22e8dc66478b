"""Writes scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with scikit-learn) as an ImageNet-layout
image folder, the built-in data of ``make demo``:

    python -m volo_jax.tools.digits OUT [--size 32] [--val-fraction 0.2] [--seed 0]

``OUT/train/<digit>/<i>.png`` and ``OUT/val/<digit>/<i>.png``, RGB PNGs upscaled to ``--size`` (nearest), split
per class with a fixed seed. The folder is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | os.PathLike, *, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        rng = np.random.default_rng(seed)
        for label in range(10):
            idx = np.flatnonzero(digits.target == label)
            rng.shuffle(idx)
            n_val = int(round(len(idx) * val_fraction))
            for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
                folder = tmp / split / str(label)
                folder.mkdir(parents=True)
                for i in part:
                    img = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 ink -> 0..255
                    Image.fromarray(img).resize((size, size), Image.Resampling.NEAREST).convert("RGB").save(
                        folder / f"{i}.png")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction per class (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    args = p.parse_args(argv)
    try:
        path = write_digits(args.out, size=args.size, val_fraction=args.val_fraction, seed=args.seed)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(1 for _ in path.rglob("*.png"))
    print(f"wrote {n} digit images to {path}/train and {path}/val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
