"""Command line: convert a timm / PyTorch checkpoint once into volo-jax's own format.

    python -m converters d1_224_84.2.pth.tar --model volo_d1_224 --output weights/volo_d1_224

Exit status: 0 on success; 2 on a bad command line or when the checkpoint can't be read or doesn't fit the model
(the message, listing every problem, goes to stderr and no output directory is left behind).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

EXIT_ERROR = 2

_DESCRIPTION = """\
Convert a timm / PyTorch checkpoint into a volo-jax parameter directory (model.safetensors in Flax layout +
config.json) that `volo_jax.create_model(NAME, pretrained=DIR)` loads without torch.

Reads .safetensors (no torch needed) and .pth / .pth.tar / .pt / .bin (torch.load(weights_only=True), needs the
volo-jax[torch] extra; pickles that would run code are refused). Keys of the original repos are renamed to timm's,
`module.` prefixes are stripped, and the conversion is strict: every missing, unexpected or mis-shaped tensor is
listed in one error. The output directory appears atomically, only when everything succeeded."""

_EPILOG = """\
examples:
  # the original sail-sg release (training checkpoint: its 'state_dict' is used)
  python -m converters d1_224_84.2.pth.tar --model volo_d1_224 --output weights/volo_d1_224

  # timm's hub weights, fine-tuning at 384 px with 10 classes: pos_embed is resampled, the head left out
  python -m converters model.safetensors --model volo_d1_224 --img-size 384 --num-classes 10 --output ft_init

exit status: 0 success, 2 bad arguments or a checkpoint that can't be read or doesn't fit (see stderr)."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m converters",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", type=Path,
                        help="checkpoint file: .safetensors, .pth, .pth.tar, .pt or .bin")
    parser.add_argument("--model", "-m", required=True, metavar="NAME",
                        help="timm model name, optionally with its tag, e.g. volo_d1_224 or volo_d1_224.sail_in1k "
                             "(see volo_jax.list_models())")
    parser.add_argument("--output", "-o", required=True, type=Path, metavar="DIR",
                        help="output directory to create; it must not exist unless --overwrite")
    parser.add_argument("--use-ema", action="store_true",
                        help="take the EMA weights ('state_dict_ema' or 'model_ema') of a training checkpoint "
                             "instead of 'state_dict'/'model'")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="classifier size of the converted model (default: the model's, 1000 for ImageNet "
                             "weights); if it differs from the checkpoint's, the classifier is left out of the "
                             "conversion and saved randomly initialised (absent for 0)")
    parser.add_argument("--img-size", type=int, default=None, metavar="N",
                        help="input resolution of the converted model (default: the model's); position "
                             "embeddings are resampled like timm (bicubic, antialiased) when it differs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR if it is an existing volo-jax directory (atomically)")
    parser.add_argument("--seed", type=int, default=0,
                        help="initialisation seed of tensors not taken from the checkpoint (a new classifier)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--verbose", "-v", action="store_true", help="log what happens (INFO level)")
    return parser


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"


def convert(args: argparse.Namespace) -> dict[str, Any]:
    """Reads, converts and saves; returns the numbers of the summary. Raises on any problem."""
    from flax import nnx

    import volo_jax
    from converters.readers import read_checkpoint
    from converters.rules import apply_rules, family_of
    from converters.torch_to_flax import convert_with_report
    from volo_jax.checkpoint import save_params, sha256_file
    from volo_jax.hub import classifier_prefixes, infer_num_classes

    start = time.perf_counter()
    model_kwargs: dict[str, Any] = {}
    if args.num_classes is not None:
        model_kwargs["num_classes"] = args.num_classes
    if args.img_size is not None:
        model_kwargs["img_size"] = args.img_size

    def make() -> nnx.Module:
        return volo_jax.create_model(args.model, rngs=args.seed, **model_kwargs)

    # Shapes, dtypes and module types are all conversion needs: an abstract model costs no initialisation.
    model = nnx.eval_shape(make)
    state_dict = apply_rules(read_checkpoint(args.checkpoint, use_ema=args.use_ema), family_of(args.model))
    ignore = classifier_prefixes(model, infer_num_classes(state_dict, model))
    if ignore:
        # The left-out head needs real initial values to be saved; only then is the model initialised for real.
        model = make()
    state, report = convert_with_report(state_dict, model, ignore_prefixes=ignore, progress=not args.no_progress)
    nnx.update(model, state)
    meta = {
        "source_checkpoint": {"path": str(args.checkpoint.resolve()), "name": args.checkpoint.name,
                              "sha256": sha256_file(args.checkpoint)},
        "use_ema": args.use_ema,
        "left_out_of_conversion": list(ignore),
        "resized": {k: [list(a), list(b)] for k, (a, b) in report.resized.items()},
        "seed": args.seed,
    }
    save_params(args.output, model, model_name=args.model, extra_meta=meta, overwrite=args.overwrite)
    return {
        "tensors": len(report.converted),
        "params": report.num_params,
        "bytes": report.num_bytes,
        "resized": report.resized,
        "left_out": ignore,
        "skipped": len(report.skipped),
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from converters.torch_to_flax import ConversionError  # also the base of CheckpointError

    try:
        summary = convert(args)
    except (ConversionError, FileExistsError, FileNotFoundError, ValueError) as e:
        # ValueError: e.g. an unknown model name from create_model (with close matches in the message).
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    resized = ", ".join(f"{k} {tuple(a)} -> {tuple(b)}" for k, (a, b) in summary["resized"].items()) or "none"
    print(textwrap.dedent(f"""\
        Converted {args.checkpoint} -> {args.output}
          model:             {args.model}
          tensors converted: {summary['tensors']}
          parameters:        {summary['params']:,}
          bytes:             {_human_bytes(summary['bytes'])}
          resized pos_embed: {resized}
          left out:          {', '.join(summary['left_out']) or 'nothing'}
          time:              {summary['seconds']:.1f} s"""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
