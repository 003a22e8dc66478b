"""Whole models against timm in the same run: inference, a training step, first-call compile, peak memory, conversion.

    python -m benchmarks models                                    # the four seed models, batch 1/8/32, fp32, CPU
    python -m benchmarks models --models volo_d1_224 --batch 8 --no-compile --repeats 3
    python -m benchmarks models --device gpu --dtype bfloat16      # unchanged on an accelerator host

Per model, every measurement runs against timm on the same weights and inputs:

- **inference** images/s at each ``--batch``: ours (``jax.jit`` of the model's ``__call__``, eval mode), timm eager
  (``torch.inference_mode``) and timm ``torch.compile`` (``--no-compile`` skips it; its cold compile is reported). The
  three are called in turn inside every repeat, so load changes on a noisy machine hit all columns alike; medians.
- **training step** images/s at ``--train-batch``: forward, cross-entropy, backward, AdamW update; ours is
  ``volo_jax.train_lib.train_step`` jitted with the state donated (what ``train.py`` runs, mixup off), timm's is
  ``model.train()``, ``F.cross_entropy``, ``.backward()``, ``torch.optim.AdamW.step()``.
- **compile**: wall time of our first jitted call (trace + lower + XLA compile + run) for the inference batch and
  for the step; timm's ``torch.compile`` cold first call likewise.
- **peak memory** of a steady-state training step, each framework alone in a fresh subprocess (``--no-memory``
  skips it): on CPU, after one step, the peak resident size during two more above the resident size before them
  (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``, minus ``VmRSS``: activations, gradients, workspace; the
  weights, optimizer state and runtime are already resident); on GPU the allocator's peak
  (``memory_stats()['peak_bytes_in_use']`` / ``torch.cuda.max_memory_allocated``). On glibc the free memory malloc
  keeps from the first step is handed back (``malloc_trim(0)``) before the base is read: left resident, it counts
  in the base and hides the step's own peak (timm's volo_d1_224 step measured 294 MiB that way, fewer bytes than
  the 889 MiB of activations its autograd graph saves; 1107 MiB after the trim).
- **conversion**: seconds for ``volo_jax.create_model(name, pretrained=<timm's weights as .safetensors>)`` (read,
  convert, load), the path a user takes with a released checkpoint.
- **fraction of the machine**: model FLOPs (XLA's cost analysis of our jitted forward) per second divided by the
  rate of a 2048x2048 matmul measured in the same run (``--matmul``).

With several ``--models`` each model runs in a fresh process of its own (this command with ``--models NAME``; the
parent prints the combined tables): measured in one process, ese_vovnet19b_dw's JAX training step ran at 7.8-8.8
img/s after other models had run there and at 11.3 img/s alone (timm's at 14.0-14.6 either way), and a user runs
one model per process.

Ratios are ours / timm (> 1: we are faster). One machine's absolute numbers are noise; same-run ratios are the result.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before the first JAX backend use; --device sets it again

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.report import Recorder  # noqa: E402
from volo_jax.xla import compiler_options  # noqa: E402

SEED_MODELS = ["volo_d1_224", "poolformer_m36", "ese_vovnet19b_dw", "convit_base"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=SEED_MODELS, help="registered model names")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32], help="inference batch sizes")
    parser.add_argument("--train-batch", type=int, default=8, help="training-step batch (0: skip the step)")
    parser.add_argument("--img-size", type=int, default=0, help="input size (0: each model's default)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (compiling) one")
    parser.add_argument("--device", default="cpu", help="JAX platform (cpu, gpu, tpu); torch uses CUDA for gpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="skip timm + torch.compile (cold compiles are slow)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-convert", action="store_true", help="skip the conversion timing")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the reference matmul (0: skip)")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--settle-ms", type=float, default=20.0,
                        help="idle time before each timed call, so one runtime's spinning threads do not slow the "
                             "other")
    # internal: one peak-memory probe in a fresh process
    parser.add_argument("--_probe", choices=["jax", "timm"], default=None, help=argparse.SUPPRESS)


# --------------------------------------------------------------------------- helpers
def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _interleaved_img_s(fns: dict[str, Callable[[], None]], batch: int, args: argparse.Namespace
                       ) -> dict[str, float]:
    """Images/s of each call: ``--warmup`` untimed rounds, then ``--repeats`` rounds calling every one in turn (so
    load changes hit all alike), medians.

    In each round every function gets an untimed call right before its timed one. Switching between the frameworks
    costs the first call after the switch: measured on the 2-core machine, our PoolFormer-M36 training step ran at
    2.6 img/s alone and 1.7 img/s when every call followed a timm step (timm: 2.0 alone, 2.3 interleaved), with
    1 s of idle time between them as well, so it is the memory and caches the other runtime leaves behind, not
    spinning threads. A user runs one framework at a time; the re-warm call gives each that state."""
    for _ in range(args.warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            if len(fns) > 1:
                fn()  # re-warm after the other framework ran (see above)
            time.sleep(args.settle_ms / 1e3)
            times[k].append(_timed(fn))
    return {k: batch / statistics.median(ts) for k, ts in times.items()}


def _torch_device(args: argparse.Namespace) -> str:
    import torch

    return "cuda" if args.device == "gpu" and torch.cuda.is_available() else "cpu"


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _size_kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``img_size`` for the constructors when ``--img-size`` is set and the model takes it: the fixed-input-size ones
    (VOLO, ConViT: position embeddings), as timm's ``fixed_input_size``; the CNNs take any input as they are (timm's
    PoolFormer and VoVNet constructors reject ``img_size``)."""
    from volo_jax.registry import get_pretrained_cfg

    return {"img_size": args.img_size} if args.img_size and get_pretrained_cfg(name).get("fixed_input_size") else {}


def _input_size(model: Any, args: argparse.Namespace) -> int:
    """The side of the benchmark's input: ``--img-size``, else the model's default."""
    return args.img_size or model.pretrained_cfg["input_size"][-1]


def _models(name: str, args: argparse.Namespace, num_classes: int | None = None) -> tuple[Any, Any, int]:
    """timm's model and ours with the same weights (timm's own init, converted), and the input size."""
    import timm
    import torch

    import volo_jax
    from converters.parity import timm_state_dict_numpy
    from converters.torch_to_flax import convert_state_dict

    kw = _size_kwargs(name, args)
    torch.manual_seed(0)
    ref = timm.create_model(name, **kw)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    ours = volo_jax.create_model(name, dtype=dtype, **kw)
    from flax import nnx

    nnx.update(ours, convert_state_dict(timm_state_dict_numpy(ref), ours))
    return ref, ours, _input_size(ours, args)


def matmul_gflops(n: int, repeats: int = 5) -> float:
    """GFLOP/s of an ``n x n`` float32 matmul under ``jax.jit`` (the machine's dense-compute ceiling)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    t = statistics.median(_timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeats))
    return 2 * n**3 / t / 1e9


# --------------------------------------------------------------------------- inference
def bench_inference(name: str, ref: Any, ours: Any, size: int, batch: int, args: argparse.Namespace
                    ) -> dict[str, float]:
    import torch
    from flax import nnx

    device = _torch_device(args)
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    ref = ref.eval().to(device, tdtype)
    ours.eval()
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
    xt = torch.from_numpy(x).to(device, tdtype)
    xj = jax.device_put(jnp.asarray(x.transpose(0, 2, 3, 1)))  # NHWC
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=compiler_options())
    out: dict[str, float] = {}

    t0 = time.perf_counter()  # first call = trace + lower + XLA compile + run
    compiled = fwd.lower(state, xj).compile()
    jax.block_until_ready(compiled(state, xj))
    out["compile_s"] = time.perf_counter() - t0 + 0.0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["gflop"] = float((cost or {}).get("flops", float("nan"))) / 1e9

    def ours_call() -> None:
        jax.block_until_ready(compiled(state, xj))

    def eager_call() -> None:
        with torch.inference_mode():
            ref(xt)
        _sync(device)

    fns = {"ours": ours_call, "timm": eager_call}
    if not args.no_compile:
        compiled_ref = torch.compile(ref)

        def compiled_call() -> None:
            with torch.inference_mode():
                compiled_ref(xt)
            _sync(device)

        out["torch_compile_s"] = _timed(compiled_call)
        fns["timm_compile"] = compiled_call
    out.update({f"{k}_img_s": v for k, v in _interleaved_img_s(fns, batch, args).items()})
    return out


# --------------------------------------------------------------------------- training step
def _ours_step(ours: Any, batch: int, size: int) -> Callable[[], None]:
    """Our jitted training step (state donated) on a fixed batch; the first call compiles."""
    from flax import nnx

    from volo_jax import train_lib

    ours.train()
    tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(lr=1e-4, total_steps=1000),
                                     nnx.state(ours, nnx.Param))
    graphdef, state = train_lib.create_train_state(ours, tx, seed=0)
    mix = train_lib.MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0,
                              num_classes=ours.num_classes)
    step = jax.jit(lambda s, x, y: train_lib.train_step(graphdef, tx, mix, 0.0, s, x, y), donate_argnums=0,
                   compiler_options=compiler_options())
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32))
    y = jax.device_put(jnp.asarray(rng.integers(0, ours.num_classes, batch), jnp.int32))
    holder = {"state": state}

    def call() -> None:
        holder["state"], metrics = step(holder["state"], x, y)
        jax.block_until_ready(metrics)

    return call


def _timm_step(ref: Any, batch: int, size: int, args: argparse.Namespace) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    device = _torch_device(args)
    ref = ref.train().to(device)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.05)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, ref.num_classes, batch)).to(device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else None

    def call() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        _sync(device)

    return call


def bench_train(ref: Any, ours: Any, size: int, args: argparse.Namespace) -> dict[str, float]:
    batch = args.train_batch
    ours_call = _ours_step(ours, batch, size)
    out = {"train_compile_s": _timed(ours_call)}
    fns = {"ours": ours_call, "timm": _timm_step(ref, batch, size, args)}
    out.update({f"train_{k}_img_s": v for k, v in _interleaved_img_s(fns, batch, args).items()})
    return out


# --------------------------------------------------------------------------- peak memory (fresh processes)
def _proc_status_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _malloc_trim() -> None:
    """Return the free memory glibc's malloc holds to the OS, so the resident size counts live data only.

    Both frameworks free a step's activations into malloc (torch on CPU directly, XLA:CPU its temp buffer); what
    malloc keeps resident is reused by the next step, so without this the base already holds most of a step's
    peak and ``VmHWM - VmRSS`` measures only what the next step allocates beyond it. No-op off glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back this way
        pass


def _probe(args: argparse.Namespace) -> None:
    """Child process: build one framework's model alone, take one training step (compiling, creating the optimizer
    state), then print the peak resident memory of two more steps above the resident size before them (weights,
    optimizer state, runtime and data already in): activations, gradients and workspace. On an accelerator, the
    device allocator's peak instead."""
    import gc

    name = args.models[0]
    kw = _size_kwargs(name, args)
    if args._probe == "jax":
        import volo_jax

        dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
        model = volo_jax.create_model(name, dtype=dtype, **kw)
        call = _ours_step(model, args.train_batch, _input_size(model, args))
    else:
        import timm
        import torch

        model = timm.create_model(name, **kw)
        call = _timm_step(model, args.train_batch, _input_size(model, args), args)
    call()  # first step: our compile, timm's lazily created AdamW moments; both then hold the optimizer state
    gc.collect()
    _malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    base = _proc_status_mib("VmRSS")
    call()
    call()
    peak = _proc_status_mib("VmHWM") - base
    if args._probe == "jax" and jax.devices()[0].platform != "cpu":
        peak = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / 2**20
    elif args._probe == "timm" and _torch_device(args) == "cuda":
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps({"peak_mib": peak}))


def bench_memory(name: str, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for which in ("jax", "timm"):
        cmd = [sys.executable, "-m", "benchmarks", "models", "--models", name, "--train-batch", str(args.train_batch),
               "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads), "--_probe", which]
        if args.img_size:
            cmd += ["--img-size", str(args.img_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        try:
            out[f"train_{which}_peak_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
        except (IndexError, ValueError, KeyError):
            print(f"  memory probe {which} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- conversion
def bench_convert(name: str, ref: Any, args: argparse.Namespace) -> float:
    """Seconds for create_model(name, pretrained=file) from timm's weights saved as .safetensors."""
    from safetensors.torch import save_file

    import volo_jax

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
        return _timed(lambda: volo_jax.create_model(name, pretrained=str(path), **_size_kwargs(name, args)))


# --------------------------------------------------------------------------- main
def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None or v != v else format(v, spec)


def run(args: argparse.Namespace) -> Recorder | None:
    """Run the benchmark; returns the markdown it printed (None for an internal memory probe)."""
    import torch

    jax.config.update("jax_platforms", args.device)
    torch.set_num_threads(args.threads)
    # torch.compile's first call is reported as a COLD compile: inductor's on-disk caches (which would make a second
    # run of this command look nearly free) go to a fresh directory, removed at exit. JAX has no persistent cache on.
    cache = tempfile.TemporaryDirectory(prefix="inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    if args._probe:
        _probe(args)
        return None
    rec = Recorder()  # starts the clock for the README block's "when"
    if len(args.models) > 1:
        return _run_per_process(args, rec)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__} on {dev.platform} ({dev.device_kind}), torch {torch.__version__} on "
          f"{_torch_device(args)} with {torch.get_num_threads()} threads, {args.dtype}, median of {args.repeats}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '(unset)')}", flush=True)
    results: dict[str, Any] = {"device": f"{dev.platform} ({dev.device_kind})", "dtype": args.dtype, "models": {},
                               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}
    if args.matmul:
        results["matmul_gflops"] = matmul_gflops(args.matmul)
        print(f"{args.matmul}x{args.matmul} fp32 matmul: {results['matmul_gflops']:.1f} GFLOP/s", flush=True)
    for name in args.models:
        ref, ours, size = _models(name, args)
        r: dict[str, Any] = {"img_size": size, "inference": {}, "matmul_gflops": results.get("matmul_gflops")}
        for batch in args.batch:
            r["inference"][batch] = bench_inference(name, ref, ours, size, batch, args)
            print("  " + " | ".join(_inference_row(name, batch, r)), flush=True)
        if args.train_batch:
            r["train"] = bench_train(ref, ours, size, args)
            if not args.no_memory:
                r["train"].update(bench_memory(name, args))
            print("  " + " | ".join(_train_row(name, args.train_batch, r)), flush=True)
        if not args.no_convert:
            r["convert_s"] = bench_convert(name, ref, args)
            print(f"  {name}: conversion {r['convert_s']:.1f} s", flush=True)
        results["models"][name] = r
        del ref, ours
    return _finish(results, args, rec)


def _inference_row(name: str, batch: int | str, r: dict[str, Any]) -> list[str]:
    b = r["inference"][batch]  # keys are ints, or strings after a JSON round trip
    frac = b["gflop"] * b["ours_img_s"] / int(batch) / r["matmul_gflops"] if r.get("matmul_gflops") else None
    comp = b.get("timm_compile_img_s")
    return [name, str(batch), _fmt(b["ours_img_s"]), _fmt(b["timm_img_s"]), _fmt(comp),
            f"{b['ours_img_s'] / b['timm_img_s']:.2f}x", f"{b['ours_img_s'] / comp:.2f}x" if comp else "-",
            f"{frac * 100:.0f} %" if frac else "-", _fmt(b["compile_s"]), _fmt(b.get("torch_compile_s"))]


def _train_row(name: str, batch: int, r: dict[str, Any]) -> list[str]:
    t = r["train"]
    return [name, str(batch), _fmt(t["train_ours_img_s"], ".2f"), _fmt(t["train_timm_img_s"], ".2f"),
            f"{t['train_ours_img_s'] / t['train_timm_img_s']:.2f}x", _fmt(t["train_compile_s"]),
            _fmt(t.get("train_jax_peak_mib"), ".0f"), _fmt(t.get("train_timm_peak_mib"), ".0f")]


def _finish(results: dict[str, Any], args: argparse.Namespace, rec: Recorder) -> Recorder:
    """The tables of every model in ``results`` (printed, and recorded in ``rec``) and the JSON file."""
    models = results["models"]
    rec.note(f"{results['dtype']} on {results['device']}; inference at batch {', '.join(map(str, args.batch))}, "
             f"training step at batch {args.train_batch or '-'}; medians of {args.repeats}. Ratios are ours / timm "
             f"(> 1: we are faster). \"of matmul rate\": our model FLOPs per second over a "
             f"{args.matmul}x{args.matmul} fp32 matmul's rate in the same process"
             + (" (GFLOP/s: " + ", ".join(f"{n} {r['matmul_gflops']:.0f}" for n, r in models.items()
                                            if r.get("matmul_gflops")) + ")." if args.matmul else ", not measured."))
    rec.table(["model", "B", "ours img/s", "timm eager img/s", "timm compile img/s", "ours / eager",
               "ours / compile", "of matmul rate", "our compile s", "torch.compile s"],
              [_inference_row(n, b, r) for n, r in models.items() for b in r["inference"]], title="**Inference**")
    if args.train_batch:
        rec.table(["model", "B", "ours img/s", "timm img/s", "ratio", "our compile s", "ours peak MiB",
                   "timm peak MiB"], [_train_row(n, args.train_batch, r) for n, r in models.items() if "train" in r],
                  title="**Training step** (forward, cross-entropy, backward, AdamW)")
    if not args.no_convert:
        rec.table(["model", "conversion s"], [[n, f"{r['convert_s']:.1f}"] for n, r in models.items()],
                  title="**Conversion** (`create_model(name, pretrained=<file>.safetensors)`)")
    if args.json:
        from volo_jax.checkpoint import write_atomic

        write_atomic(args.json, json.dumps(results, indent=1))
    return rec


def _run_per_process(args: argparse.Namespace, rec: Recorder) -> Recorder:
    """Each model in a fresh process (this command with ``--models NAME``, its output streamed), then the combined
    tables; see the module docstring for why."""
    values = ("batch", "train_batch", "img_size", "repeats", "warmup", "device", "dtype", "threads", "matmul",
              "settle_ms")
    switches = ("no_compile", "no_memory", "no_convert")
    # every flag of add_arguments must reach the children; a new one that is not listed above fails here, loudly
    # (--readme is the parent's: it writes the combined tables)
    unforwarded = set(vars(args)) - set(values) - set(switches) - {"name", "models", "json", "_probe", "readme"}
    if unforwarded:
        raise RuntimeError(f"_run_per_process does not forward {sorted(unforwarded)}")
    flags: list[str] = []
    for dest in values:
        value = getattr(args, dest)
        flags += [f"--{dest.replace('_', '-')}", *map(str, value if isinstance(value, list) else [value])]
    flags += [f"--{dest.replace('_', '-')}" for dest in switches if getattr(args, dest)]
    results: dict[str, Any] = {"models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            out = Path(tmp) / "one.json"
            cmd = [sys.executable, "-m", "benchmarks", "models", "--models", name, "--json", str(out), *flags]
            print(f"== {name} (fresh process)", flush=True)
            proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise SystemExit(f"benchmark of {name} failed (exit {proc.returncode}): {' '.join(cmd)}")
            one = json.loads(out.read_text())
            results.update({k: v for k, v in one.items() if k != "models"})
            results["models"].update(one["models"])
    print(f"\n== all models ({len(args.models)} processes)")
    return _finish(results, args, rec)

