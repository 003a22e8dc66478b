"""Outlook attention: our jitted JAX module vs timm's `OutlookAttention` (PyTorch eager), in the same process.

    python -m benchmarks outlook                       # VOLO-D1 and -D5 stage-1 shapes, batch 1 and 8, fp32, CPU
    python -m benchmarks outlook --batch 8 --repeats 50 --dtype bfloat16

Both sides get the same weights and input. Every repeat times timm forward, ours forward, timm forward+backward and
ours forward+backward back to back, so a noisy machine slows both sides alike, each right after an untimed call of
its own; the table shows medians.
Forward: torch under `no_grad`, ours `jax.jit` + `block_until_ready`. Forward+backward: gradient of `sum(output)` with
respect to the input and every parameter (torch: `.backward()`; ours: `jax.grad` of a pure function of
(params, x), jitted). `ours` is `OutlookAttention.__call__` itself. `ratio` = timm time / our time (> 1: we are
faster). `compile` is the wall time of the first jitted call (trace + compile + run). `ref` columns time the same
module with `outlook_attention_reference` (unfold / einsum / fold, the textbook formulation) in place of the
phase-layout kernel, to show what the kernel buys.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from collections.abc import Callable

# Must precede the first use of a JAX backend; `--device` below sets it again for library use of `run`.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from timm.models.volo import OutlookAttention as TimmOutlookAttention  # noqa: E402

from benchmarks.report import Recorder  # noqa: E402
from volo_jax.ops import avg_pool2d  # noqa: E402
from volo_jax.outlook import OutlookAttention, outlook_attention_reference  # noqa: E402
from volo_jax.xla import compiler_options  # noqa: E402

# (name, dim, heads, kernel, padding, stride, tokens): stage 1 of VOLO at 224px input (patch 8 -> 28x28 tokens).
SHAPES = [
    ("volo_d1 stage1", 192, 6, 3, 1, 2, 28),
    ("volo_d5 stage1", 384, 12, 3, 1, 2, 28),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--device", default="cpu", help="JAX platform (cpu, gpu, tpu); torch uses CUDA for gpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-reference", action="store_true", help="skip the unfold/einsum/fold JAX formulation")
    parser.add_argument(
        "--settle-ms",
        type=float,
        default=10.0,
        help="idle time before each timed call, so one runtime's spinning worker threads do not slow the other",
    )


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _case(args: argparse.Namespace, dim: int, heads: int, k: int, p: int, s: int, n: int, batch: int):
    """Time one shape; return {(impl, pass): [seconds]} and {(impl, pass): first-call seconds}."""
    jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    torch_device = _torch_device(args)

    def sync() -> None:
        if torch_device == "cuda":
            torch.cuda.synchronize()

    ref = TimmOutlookAttention(dim, heads, kernel_size=k, padding=p, stride=s).eval().to(torch_device, tdtype)
    model = OutlookAttention(dim, heads, kernel_size=k, padding=p, stride=s, dtype=jdtype, rngs=nnx.Rngs(0))
    model.eval()
    for lname in ("v", "attn", "proj"):  # same weights on both sides
        lt, lj = getattr(ref, lname), getattr(model, lname)
        lj.kernel[...] = jnp.asarray(lt.weight.detach().float().cpu().numpy().T)
        if lt.bias is not None:
            lj.bias[...] = jnp.asarray(lt.bias.detach().float().cpu().numpy())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x_np = np.random.default_rng(0).standard_normal((batch, n, n, dim)).astype(np.float32)
    xt = torch.from_numpy(x_np).to(torch_device, tdtype)
    xt_grad = xt.clone().requires_grad_(True)
    xj = jax.device_put(jnp.asarray(x_np, jdtype))

    def timm_fwd() -> None:
        with torch.no_grad():
            ref(xt)
        sync()

    def timm_fwd_bwd() -> None:
        ref.zero_grad(set_to_none=True)
        xt_grad.grad = None
        ref(xt_grad).float().sum().backward()
        sync()

    def apply_module(params, x):
        return nnx.merge(graphdef, params, rest)(x)  # what users run: OutlookAttention.__call__

    def apply_reference(params, x):
        m = nnx.merge(graphdef, params, rest)  # OutlookAttention.__call__ with the textbook kernel swapped in
        pooled = x if s == 1 else avg_pool2d(x, s, s, ceil_mode=True)
        kw = dict(num_heads=heads, kernel_size=k, padding=p, stride=s, scale=m.scale)
        return m.proj(outlook_attention_reference(m.v(x), m.attn(pooled), **kw))

    impls = {"ours": apply_module}
    if not args.no_reference:
        impls["ref"] = apply_reference
    fns = {("timm", "fwd"): timm_fwd, ("timm", "fwd+bwd"): timm_fwd_bwd}
    compile_s = {}
    for impl_name, apply in impls.items():

        def loss(params, x, apply=apply):
            return jnp.sum(apply(params, x).astype(jnp.float32))

        # compiled as train.py and the model benchmark compile (XLA:CPU's memory-optimized scheduler on CPU)
        opts = compiler_options()
        for pass_name, fn in (("fwd", jax.jit(apply, compiler_options=opts)),
                              ("fwd+bwd", jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=opts))):
            call = functools.partial(_call_jax, fn, params, xj)
            compile_s[impl_name, pass_name] = _timed(call)
            fns[impl_name, pass_name] = call

    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times = {key: [] for key in fns}
    for _ in range(args.repeats):  # interleaved, so load changes hit every column alike
        for key, fn in fns.items():
            # An untimed call right before each timed one, as `benchmarks models` does: each call is then timed in
            # the state a user running only that implementation has (its own data and code in the caches), not in
            # what the other framework left behind. At batch 1 these ops take a few ms, so that state weighs most.
            fn()
            time.sleep(args.settle_ms / 1e3)
            times[key].append(_timed(fn))
    return times, compile_s


def _call_jax(fn, *args) -> None:
    jax.block_until_ready(fn(*args))


def _torch_device(args: argparse.Namespace) -> str:
    return "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"


def run(args: argparse.Namespace) -> Recorder:
    rec = Recorder()
    jax.config.update("jax_platforms", args.device)
    torch.set_num_threads(args.threads)
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), torch {torch.__version__} on "
        f"{_torch_device(args)} with {torch.get_num_threads()} threads, {args.dtype}, median of {args.repeats}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}"
    )
    cols = ["shape", "B", "pass", "timm ms", "ours ms", "ratio", "compile s"]
    if not args.no_reference:
        cols += ["ref ms", "ref ratio", "ref compile s"]
    rows = []
    for name, dim, heads, k, p, s, n in SHAPES:
        for batch in args.batch:
            times, compile_s = _case(args, dim, heads, k, p, s, n, batch)
            for pass_name in ("fwd", "fwd+bwd"):
                t_timm, t_ours = _median_ms(times["timm", pass_name]), _median_ms(times["ours", pass_name])
                row = [
                    name,
                    str(batch),
                    pass_name,
                    f"{t_timm:.2f}",
                    f"{t_ours:.2f}",
                    f"{t_timm / t_ours:.2f}x",
                    f"{compile_s['ours', pass_name]:.2f}",
                ]
                if not args.no_reference:
                    t_ref = _median_ms(times["ref", pass_name])
                    row += [f"{t_ref:.2f}", f"{t_timm / t_ref:.2f}x", f"{compile_s['ref', pass_name]:.2f}"]
                rows.append(row)
                print("  " + " | ".join(row), flush=True)
    rec.note(f"{args.dtype}, medians of {args.repeats}; timm's `OutlookAttention` eager against ours jitted; ratio = "
             f"timm time / ours (> 1: we are faster); \"ref\": the unfold / einsum / fold formulation.")
    rec.table(cols, rows)
    return rec
