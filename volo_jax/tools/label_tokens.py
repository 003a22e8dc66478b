"""Makes token labels (VOLO's dense top-k teacher maps) with one of our models as teacher, into a token-label store
(:mod:`volo_jax.token_label_store`) that training reads like the converted tlt release::

    python -m volo_jax.tools.label_tokens --teacher volo_d5_224 --checkpoint d5_224_86.10.pth.tar \\
        /data/imagenet /data/imagenet_labels_volo_d5 --split train --topk 5 -b 128

Every image of the split (``DATA/train``, found like timm: :func:`volo_jax.data.search_split`) is resized WHOLE to
the teacher's input size (squashed, no crop: training crops are fractions of the full image and later cut their
label out of this map, so the map must cover the whole image), with the teacher's interpolation, mean and std (its
pretrained data config, the same transform code as ``eval.py``'s). The teacher's class logits at every output
position are reduced to the top ``k`` (scores = logits, as in tlt's release; indices) and stored under the image's
key ``<class>/<stem>``.

Dense logits per family (dispatched on the model class; the layers of ``forward_head`` that act per position):

* VOLO: ``aux_head`` on the normalised patch tokens of ``forward_features`` (the class token, token 0, dropped) --
  the token-labeling head itself; its grid is the token grid (input / 16 for every variant).
* PoolFormer (v1/v2): ``head.norm`` (LayerNorm2d over channels, per position) then ``head.fc`` on the final feature
  map (the pooled path pools first; norm and fc are applied per position here).
* VoVNet: ``head.fc`` on the final feature map (input / 32); the mean of these maps is exactly the pooled logits.
* ConViT: ``head`` on the patch tokens of ``forward_features`` (after the final norm, class token dropped).

The teacher is loaded by ``volo_jax.hub.load_model``, as ``eval.py`` loads models (``--checkpoint``: a PyTorch
file, a ``python -m converters`` directory, a timm/HF directory, or a ``train.py`` run directory; or
``--pretrained``). Batches are
jitted over every local device; the store is committed every few thousand images, so a rerun of the same command
resumes after a kill, and a rerun with another teacher, checkpoint, size or data is refused. Exit status: 0 done,
2 bad arguments/data/checkpoint, 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import volo_jax
from volo_jax import data
from volo_jax.models.convit import ConVit
from volo_jax.models.poolformer import MetaFormer
from volo_jax.models.volo import VOLO
from volo_jax.models.vovnet import VovNet
from volo_jax.token_label_store import TokenLabelError, TokenLabelWriter
from volo_jax.xla import compiler_options, reexec_with_hugepage_malloc

_logger = logging.getLogger("label_tokens")

# What each family's map is, recorded in meta.json (and part of the store's identity).
DENSE_HEADS = {
    VOLO: "aux_head(forward_features(x)[:, 1:])",
    MetaFormer: "head.fc(head.norm(forward_features(x)))",
    VovNet: "head.fc(forward_features(x))",
    ConVit: "head(forward_features(x)[:, num_prefix_tokens:])",
}


# --------------------------------------------------------------------------- dense logits
def _token_grid(model: nnx.Module, x_hw: tuple[int, int], num_tokens: int, reduction: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``num_tokens`` row-major tokens of an ``x_hw`` input at stride ``reduction``."""
    h, w = x_hw[0] // reduction, x_hw[1] // reduction
    if h * w != num_tokens:
        raise ValueError(f"{type(model).__name__}: {num_tokens} tokens for a {x_hw} input do not form a "
                         f"{h}x{w} grid (stride {reduction})")
    return h, w


def dense_logits(model: nnx.Module, x: jax.Array) -> jax.Array:
    """Class logits at every output position: images ``(B, H, W, C)`` -> ``(B, h, w, num_classes)``.

    Raises:
        ValueError: an unsupported model, or one without a classifier (``num_classes=0``; VOLO without aux head).
    """
    if isinstance(model, VOLO):
        if model.aux_head is None:
            raise ValueError("the VOLO teacher has no aux_head (num_classes=0 or use_aux_head=False)")
        tokens = model.forward_features(x)  # (B, 1 + N, C), normalised, class token first
        tokens = tokens[:, 1:] if model.post_network is not None else tokens  # no class token without post layers
        logits = model.aux_head(tokens)  # (B, N, K)
        # the token stride: patch_size, doubled by each downsample (the last stage's feature reduction)
        h, w = _token_grid(model, x.shape[1:3], logits.shape[1], model.feature_info[-1]["reduction"])
        return logits.reshape(logits.shape[0], h, w, -1)  # row-major, as forward_tokens flattened it
    if isinstance(model, ConVit):
        if model.head is None:
            raise ValueError("the ConViT teacher has no classifier (num_classes=0)")
        tokens = model.forward_features(x)[:, model.num_prefix_tokens:]  # (B, N, C) after the final norm
        logits = model.head(tokens)  # (B, N, K); head_drop is the identity in eval mode
        h, w = _token_grid(model, x.shape[1:3], logits.shape[1], model.patch_size)
        return logits.reshape(logits.shape[0], h, w, -1)
    if isinstance(model, MetaFormer):
        if model.head is None or model.head.fc is None:
            raise ValueError("the PoolFormer teacher has no classifier (num_classes=0)")
        fmap = model.forward_features(x)  # (B, h, w, C)
        return model.head.fc(model.head.norm(fmap))  # LayerNorm2d normalises channels per position
    if isinstance(model, VovNet):
        if model.head is None or model.head.fc is None:
            raise ValueError("the VoVNet teacher has no classifier (num_classes=0)")
        return model.head.fc(model.forward_features(x))  # (B, h, w, K)
    raise ValueError(f"no dense head known for {type(model).__name__}; supported: "
                     f"{', '.join(c.__name__ for c in DENSE_HEADS)}")


def topk_maps(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Top-``k`` over classes of ``(B, h, w, K)`` logits: scores float32 and indices int32, both ``(B, k, h, w)``
    (tlt's layout: rank first, then the grid)."""
    scores, indices = jax.lax.top_k(logits.astype(jnp.float32), k)  # (B, h, w, k), best first
    return jnp.moveaxis(scores, -1, 1), jnp.moveaxis(indices.astype(jnp.int32), -1, 1)


# --------------------------------------------------------------------------- teacher and data
def whole_image_config(pretrained_cfg: dict[str, Any], img_size: int | None = None) -> data.EvalConfig:
    """The teacher's data config (its train input size, interpolation, mean, std) resizing the whole image to the
    input size: ``crop_mode='squash'`` with ``crop_pct=1`` is a plain resize of both sides and a no-op crop."""
    return data.resolve_eval_config(pretrained_cfg, img_size=img_size, crop_pct=1.0, crop_mode="squash",
                                    use_test_size=False)


def load_teacher(name: str, *, checkpoint: str | None, pretrained: bool = False, use_ema: bool = False,
                 img_size: tuple[int, int] | None = None) -> nnx.Module:
    """The teacher with its weights (:func:`volo_jax.hub.load_model`, what ``eval.py`` uses), in eval mode.

    Args:
        name: timm name (``volo_d1_224`` or ``volo_d1_224.sail_in1k``).
        checkpoint: weights (any kind ``eval.py --checkpoint`` takes), or None with ``pretrained``.
        pretrained: timm's hub weights.
        use_ema: a training checkpoint's EMA weights.
        img_size: build for this input size (None: the model's default); position embeddings are resampled.
    """
    from volo_jax.hub import load_model

    model = load_model(name, checkpoint, pretrained=pretrained, img_size=img_size, dtype=jnp.float32,
                       use_ema=use_ema)
    model.eval()
    return model


class _From:
    """``source`` from row ``start`` on (a resumed run reads only what is left)."""

    def __init__(self, source: data.Source, start: int):
        self.source, self.start = source, start

    def __len__(self) -> int:
        return len(self.source) - self.start

    def load(self, index: int) -> Any:
        return self.source.load(self.start + index)

    def name(self, index: int) -> str:
        return self.source.name(self.start + index)


def make_step(model: nnx.Module, k: int, batch: int, input_hw: tuple[int, int], in_chans: int
              ) -> tuple[Callable[[np.ndarray], tuple[jax.Array, jax.Array]], tuple[int, int]]:
    """A compiled ``images (B, H, W, C) -> (scores, indices)`` over a ``('data',)`` mesh of every device, and the
    label grid ``(h, w)``."""
    from volo_jax import train_lib

    mesh = train_lib.data_mesh()
    rep, shard = train_lib.replicated(mesh), train_lib.batch_sharded(mesh)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, rep)

    def step(state: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return topk_maps(dense_logits(nnx.merge(graphdef, state), x), k)

    spec = jax.ShapeDtypeStruct((batch, *input_hw, in_chans), jnp.float32, sharding=shard)
    out = jax.eval_shape(step, state, spec)  # raises early for an unsupported model or a k beyond the classes
    compiled = jax.jit(step, in_shardings=(rep, shard), out_shardings=(shard, shard),
                       compiler_options=compiler_options()).lower(state, spec).compile()
    return (lambda x: compiled(state, jax.device_put(x, shard))), tuple(out[0].shape[2:4])


# --------------------------------------------------------------------------- main
def label_tokens(teacher: str, data_root: str, out: str, *, checkpoint: str | None = None, pretrained: bool = False,
                 use_ema: bool = False, split: str = "train", topk: int = 5, img_size: int | None = None,
                 batch_size: int = 64, workers: int = 4, score_dtype: str = "float32", commit_every: int = 4096,
                 progress: bool = True) -> str:
    """Labels every image of ``data_root``'s ``split`` into the store ``out`` (resuming it); a one-line summary.

    Raises:
        TokenLabelError / DataError / ConversionError / FileNotFoundError: bad arguments, data or checkpoint, or an
            ``out`` made from other inputs.
    """
    from tqdm import tqdm

    if checkpoint is None and not pretrained:
        raise TokenLabelError("give the teacher's weights: --checkpoint CKPT or --pretrained (labels from random "
                              "weights are noise)")
    if topk <= 0 or batch_size <= 0:
        raise TokenLabelError(f"--topk and --batch-size must be positive, got {topk} and {batch_size}")
    if batch_size % jax.device_count():
        raise TokenLabelError(f"--batch-size {batch_size} must be a multiple of the {jax.device_count()} devices")
    source = data.ImageFolderSource(data_root, split)
    names = [data.token_label_key(source, i) for i in range(len(source))]  # the keys training looks up
    pretrained_cfg = volo_jax.get_pretrained_cfg(teacher)
    cfg = whole_image_config(pretrained_cfg, img_size)
    built = None if tuple(cfg.input_size) == tuple(pretrained_cfg["input_size"]) else cfg.img_size
    model = load_teacher(teacher, checkpoint=checkpoint, pretrained=pretrained, use_ema=use_ema, img_size=built)
    num_classes = int(model.num_classes)
    if topk > num_classes:
        raise TokenLabelError(f"--topk {topk} exceeds the teacher's {num_classes} classes")
    step, (h, w) = make_step(model, topk, batch_size, cfg.img_size, cfg.input_size[0])
    weights = str(Path(checkpoint).expanduser().resolve()) if checkpoint else f"hub:{pretrained_cfg.get('hf_hub_id')}"
    extra = {"teacher": teacher, "checkpoint": weights, "use_ema": bool(use_ema),
             "dense_head": DENSE_HEADS[type(model)], "preprocess": {**cfg.as_dict(), "note": "whole image resized "
                                                                   "to input_size (squash), no crop"}}
    with TokenLabelWriter(out, names, topk=topk, height=h, width=w, score_dtype=score_dtype, num_classes=num_classes,
                          source=str(Path(source.root).resolve()), extra=extra, commit_every=commit_every) as writer:
        n = writer.num_examples
        if writer.complete:
            return f"{out} is already complete ({n} label maps); nothing to do"
        start = writer.rows
        batches, num_batches = data.eval_batches(_From(source, start), cfg, batch_size, workers=workers)
        bar = tqdm(total=n, initial=start, unit="img", dynamic_ncols=True, disable=not progress, desc="labelling")
        for batch in batches:
            scores, indices = (np.asarray(a) for a in step(batch["image"]))
            if score_dtype == "float16":
                scores = scores.astype(np.float16)  # asked for: rounded here, explicitly (the writer never rounds)
            real = batch["index"] >= 0  # the last batch is padded
            ok = batch["mask"][real]
            if ok.all():
                writer.write(scores[real], indices[real])
            else:
                for r in np.flatnonzero(real):
                    if batch["mask"][r]:
                        writer.write(scores[r], indices[r])
                    else:  # kept in order as an explicit "no label" row; training skips the image too
                        _logger.warning("could not decode %s: %s", names[writer.rows], batch["error"][r])
                        writer.write_undecodable()
            bar.update(int(real.sum()))
        bar.close()
        writer.finish()
        skipped = len(writer.undecodable)
    return (f"labelled {n - skipped} images with {teacher} (top-{topk} on a {h}x{w} grid of {num_classes} classes) "
            f"into {out}" + (f"; {skipped} could not be decoded: {', '.join(writer.undecodable[:5])}" if skipped
                             else ""))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m volo_jax.tools.label_tokens",
        description="Make VOLO token labels with one of our models as teacher: every image of DATA's split is "
                    "resized whole to the teacher's input size, and the teacher's top-k class logits at every "
                    "output position are stored (keyed <class>/<stem>) in the token-label store OUT. Resumable: "
                    "rerun the same command after an interruption.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", metavar="DATA", help="image folder in ImageNet layout; its SPLIT subfolder (or a timm "
                                                "synonym) is used when present")
    p.add_argument("out", metavar="OUT", help="output store directory (created; an interrupted one is resumed)")
    p.add_argument("--teacher", required=True,
                   help="timm name of the teacher: any VOLO, PoolFormer, VoVNet or ConViT in volo_jax.list_models()")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--checkpoint", default=None,
                   help="teacher weights, anything eval.py --checkpoint takes: a PyTorch file (.pth/.pth.tar/"
                        ".safetensors/.bin), a `python -m converters` directory, a timm/HF directory, or a train.py "
                        "checkpoint directory")
    w.add_argument("--pretrained", action="store_true", help="timm's weights for --teacher from the HF hub")
    p.add_argument("--use-ema", action="store_true", help="take the EMA weights of a training checkpoint")
    p.add_argument("--split", default="train", help="dataset split (subfolder name or timm synonym)")
    p.add_argument("--topk", type=int, default=5, help="classes kept per position (tlt's release: 5)")
    p.add_argument("--img-size", type=int, default=None,
                   help="teacher input size (square; default: the teacher's pretrained input size); the label grid "
                        "follows from it (VOLO: size/16, ConViT: size/16, PoolFormer and VoVNet: size/32)")
    p.add_argument("-b", "--batch-size", type=int, default=64, help="images per jitted step (all devices together)")
    p.add_argument("-j", "--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--score-dtype", choices=("float32", "float16"), default="float32",
                   help="stored score precision; float16 halves scores.npy (tlt's release uses it) by rounding the "
                        "logits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        print(label_tokens(args.teacher, args.data, args.out, checkpoint=args.checkpoint, pretrained=args.pretrained,
                           use_ema=args.use_ema, split=args.split, topk=args.topk, img_size=args.img_size,
                           batch_size=args.batch_size, workers=args.workers, score_dtype=args.score_dtype,
                           progress=not args.no_progress))
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        # TokenLabelError, DataError, ConversionError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the images labelled so far are kept; rerun the same command to resume {args.out}",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    reexec_with_hugepage_malloc()  # glibc tunable for XLA:CPU's temp buffers (see volo_jax.xla)
    sys.exit(main())
