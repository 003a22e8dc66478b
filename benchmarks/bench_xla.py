"""XLA compiler options A/B: our programs compiled with XLA's defaults and with ``volo_jax.xla.compiler_options()``.

    python -m benchmarks xla                                   # the four seed models, batch 8, CPU
    python -m benchmarks xla --models volo_d1_224 --repeats 5

The same lowered program (jitted forward in eval mode; train.py's training step: forward, cross-entropy, backward,
AdamW) is compiled twice, once per option set, and the two executables are called in turn inside every repeat, so
load changes on a noisy machine hit both alike; medians. Reported per model: images/s of each and their ratio, XLA's
temp-buffer size (``compiled.memory_analysis()``: activations, gradients, workspace; arguments and outputs excluded)
and the training loss of each, which must be identical (a scheduler only reorders independent ops).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from benchmarks.bench_models import SEED_MODELS
from benchmarks.report import Recorder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=SEED_MODELS, help="registered model names")
    parser.add_argument("--batch", type=int, default=8, help="batch of the forward and of the training step")
    parser.add_argument("--repeats", type=int, default=4, help="timed repeats per measurement (median reported)")
    parser.add_argument("--device", default="cpu", help="JAX platform (cpu, gpu, tpu)")


def _interleaved_s(fns: dict[str, Any], repeats: int) -> dict[str, float]:
    import jax

    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            time.sleep(0.05)
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _bench_model(name: str, options: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """One table row: forward and training step of ``name``, compiled once per option set, timed in turn."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import volo_jax
    from volo_jax import train_lib

    model = volo_jax.create_model(name)
    size = model.pretrained_cfg["input_size"][-1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch, size, size, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, model.num_classes, args.batch), jnp.int32)

    model.eval()
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x)
    fwd_c = {k: fwd.compile(compiler_options=o) for k, o in options.items()}
    fwd_s = _interleaved_s({k: (lambda c=c: c(state, x)) for k, c in fwd_c.items()}, args.repeats)

    model.train()
    tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(lr=1e-4, total_steps=1000),
                                     nnx.state(model, nnx.Param))
    tgraph, tstate = train_lib.create_train_state(model, tx, seed=0)
    mix = train_lib.MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=model.num_classes)
    # not donated: both executables step from the same state, so their losses must agree exactly
    step = jax.jit(lambda s, x, y: train_lib.train_step(tgraph, tx, mix, 0.0, s, x, y)).lower(tstate, x, y)
    step_c = {k: step.compile(compiler_options=o) for k, o in options.items()}
    loss = {k: float(c(tstate, x, y)[1]["loss"]) for k, c in step_c.items()}
    step_s = _interleaved_s({k: (lambda c=c: c(tstate, x, y)) for k, c in step_c.items()}, args.repeats)
    temp = {k: c.memory_analysis().temp_size_in_bytes / 2**20 for k, c in step_c.items()}

    d, o = "xla defaults", "ours"
    return [name, f"{args.batch / fwd_s[d]:.2f}", f"{args.batch / fwd_s[o]:.2f}", f"{fwd_s[d] / fwd_s[o]:.2f}x",
            f"{args.batch / step_s[d]:.2f}", f"{args.batch / step_s[o]:.2f}", f"{step_s[d] / step_s[o]:.2f}x",
            f"{temp[d]:.0f}", f"{temp[o]:.0f}", "same" if loss[d] == loss[o] else f"{loss[d]!r} vs {loss[o]!r}"]


def run(args: argparse.Namespace) -> Recorder:
    import jax

    from volo_jax.xla import compiler_options

    rec = Recorder()
    jax.config.update("jax_platforms", args.device)
    options = {"xla defaults": {}, "ours": compiler_options()}
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, batch {args.batch}, median of {args.repeats}; "
          f"ours = {options['ours'] or 'no options on this backend'}; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    rows = []
    for name in args.models:
        rows.append(_bench_model(name, options, args))
        print("  " + " | ".join(rows[-1]), flush=True)
    cols = ["model", "fwd img/s, xla defaults", "fwd img/s, ours", "ratio", "train img/s, xla defaults",
            "train img/s, ours", "ratio", "step temp MiB, xla defaults", "step temp MiB, ours", "loss"]
    rec.note(f"Batch {args.batch}, medians of {args.repeats}; ours = `{options['ours'] or 'no options'}`.")
    rec.table(cols, rows)
    return rec
