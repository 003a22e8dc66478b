"""volo_jax.xla: the per-backend compiler options are accepted here, change nothing numerically, and degrade to none."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax
from volo_jax import xla
from volo_jax.layers import Linear, run_block


def test_options_per_backend():
    assert xla.compiler_options("cpu") == xla.CPU_OPTIONS  # this jaxlib's XLA knows the field
    assert xla.compiler_options("gpu") == {} and xla.compiler_options("tpu") == {}
    xla.compiler_options("cpu")["x"] = 1  # a fresh dict each call: a caller's edit cannot leak
    assert xla.compiler_options("cpu") == xla.CPU_OPTIONS


def test_unknown_option_falls_back_to_none(monkeypatch):
    """An XLA without the field (older jaxlib) gets no options instead of a compile error on every jit."""
    monkeypatch.setattr(xla, "CPU_OPTIONS", {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_NOT_A_SCHEDULER"})
    xla._cpu_options_supported.cache_clear()
    try:
        assert xla.compiler_options("cpu") == {}
    finally:
        xla._cpu_options_supported.cache_clear()  # the next caller probes the real options again


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the options are XLA:CPU's")
def test_training_gradients_identical_with_and_without_options():
    """A scheduler only reorders independent ops: the forward and the gradients of a whole model are bit-identical.
    The two executables must also be different programs, or this would compare a compile with itself."""
    model = volo_jax.create_model("volo_d1_224", img_size=32, num_classes=10)
    model.train()
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)

    def loss(s: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, s)(x) ** 2)

    lowered = jax.jit(jax.value_and_grad(loss)).lower(state, x)
    plain, ours = lowered.compile(), lowered.compile(compiler_options=xla.compiler_options("cpu"))
    assert plain.as_text() != ours.as_text()
    (l0, g0), (l1, g1) = plain(state, x), ours(state, x)
    assert float(l0) == float(l1) and float(l0) > 0
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _max_loop_fusion_operands(hlo: str) -> int:
    """The largest operand count of any elementwise (kLoop) fusion in a compiled HLO module's text."""
    counts = [len(re.findall(r"%[\w.\-]+", line.split(" fusion(", 1)[1].split("), kind=", 1)[0]))
              for line in hlo.splitlines() if " fusion(" in line and "kind=kLoop" in line]
    return max(counts)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fusion trap is XLA:CPU's")
def test_materialize_grad_breaks_the_quadratic_residual_gradient_fusion():
    """A 12-block pre-norm residual stack: without ``materialize_grad`` XLA:CPU fuses the residual gradient's whole
    running sum into each block's fusion (operand count growing with depth: quadratic work); with it, every
    block's gradient is read from memory. Same values and gradients to the bit; run_block applies it on CPU
    when asked (VOLO and ConViT ask)."""
    from volo_jax.layers import materialize_grad, run_block

    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((32, 32)) * 0.2, jnp.float32) for _ in range(12)]
    x = jnp.asarray(rng.standard_normal((4, 9, 32)), jnp.float32)

    def loss(ws: list[jax.Array], x: jax.Array, barrier: bool) -> jax.Array:
        for w in ws:
            if barrier:
                x = materialize_grad(x)
            mean = x.mean(-1, keepdims=True)
            normed = (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
            x = x + jnp.tanh(normed @ w)
        return jnp.sum(x ** 2)

    grads = {}
    for barrier in (False, True):
        fn = jax.jit(jax.value_and_grad(lambda ws, x, b=barrier: loss(ws, x, b), argnums=(0, 1)))
        compiled = fn.lower(ws, x).compile(compiler_options=xla.compiler_options("cpu"))
        grads[barrier] = (compiled(ws, x), _max_loop_fusion_operands(compiled.as_text()))
    (plain, plain_operands), (ours, our_operands) = grads[False], grads[True]
    assert plain_operands > 60 and our_operands < 20, (plain_operands, our_operands)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(ours), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.asarray(ours[1][1]).std()) > 0.1  # a real gradient, varying over the input
    for barrier in (False, True):
        prims = {e.primitive.name for e in jax.make_jaxpr(lambda x, b=barrier: run_block(jnp.tanh, x, grad_barrier=b))(
            x).jaxpr.eqns}
        assert any(p.startswith("custom_vjp") for p in prims) == barrier, prims


class _Block(nnx.Module):
    """A pre-norm residual MLP block with a BatchNorm (state the call changes) and a parameter whose gradient is
    NaN when ``nan_grad`` (``sqrt(0) * 0``: zero in the forward, ``inf * 0`` in the backward)."""

    def __init__(self, dim: int, *, nan_grad: bool = False, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1, self.fc2 = Linear(dim, 4 * dim, rngs=rngs), Linear(4 * dim, dim, rngs=rngs)
        self.bn = nnx.BatchNorm(dim, use_running_average=False, rngs=rngs)
        self.nan_grad = nan_grad
        self.w = nnx.Param(jnp.zeros(()))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn(self.fc2(jax.nn.gelu(self.fc1(self.norm(x)))))
        if self.nan_grad:
            y = y + jnp.sqrt(self.w[...]) * 0.0
        return x + y


class _Stack(nnx.Module):
    def __init__(self, depth: int, dim: int, *, first: bool, nan_grad: bool = False, rngs: nnx.Rngs):
        self.blocks = nnx.List([_Block(dim, nan_grad=nan_grad and i == depth - 1, rngs=rngs) for i in range(depth)])
        self.first = first

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = run_block(block, x, param_grads_first=self.first)
        return x


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="run_block applies param_grads_first on CPU only")
def test_param_grads_first_orders_the_backward_and_keeps_the_values():
    """``run_block(..., param_grads_first=True)``: the same loss and BatchNorm statistics to the bit, the same
    gradients to float rounding, and the input gradient really reads the parameter gradients (a NaN parameter
    gradient reaches it; without the option it does not). What that buys: test_grad_checkpointing.py's
    model memory tests."""
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 256, 64)), jnp.float32)

    def run(first: bool, nan_grad: bool = False) -> tuple:
        model = _Stack(8, 64, first=first, nan_grad=nan_grad, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p: nnx.State, r: nnx.State, x: jax.Array) -> tuple[jax.Array, nnx.State]:
            m = nnx.merge(graphdef, p, r, copy=True)
            return jnp.sum(m(x) ** 2), nnx.state(m, nnx.BatchStat)

        fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))
        compiled = fn.lower(params, rest, x).compile(compiler_options=xla.compiler_options("cpu"))
        (value, stats), (d_params, dx) = compiled(params, rest, x)
        return value, stats, d_params, dx

    plain, first = run(False), run(True)
    # the forward is untouched: loss and BatchNorm statistics to the bit
    for a, b in zip(jax.tree.leaves(plain[:2]), jax.tree.leaves(first[:2]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # gradients to float rounding: the added zero changes XLA's fusions of the backward, and with them the order of
    # some sums (measured: 1e-7 of the largest gradient); atol on that scale, as in test_grad_checkpointing
    scale = max(float(np.abs(np.asarray(a)).max()) for a in jax.tree.leaves(plain[2:]))
    for a, b in zip(jax.tree.leaves(plain[2:]), jax.tree.leaves(first[2:]), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * scale)
    assert float(np.asarray(first[3]).std()) > 0.1  # a real input gradient, varying over the input
    assert np.isfinite(np.asarray(run(False, nan_grad=True)[3])).all()
    assert np.isnan(np.asarray(run(True, nan_grad=True)[3])).all()


def test_param_grads_first_leaves_the_callers_module_alone():
    """The option calls a copy of the block: a module closed over by ``jax.jit`` (whose variables may not take
    traced values) still runs in eval mode, its parameters stay the arrays they were, and in training mode the
    BatchNorm statistics the call changes reach the caller's module as a plain call's do."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16, 32)), jnp.float32)
    models = {first: _Stack(2, 32, first=first, rngs=nnx.Rngs(0)) for first in (False, True)}
    kernel = models[True].blocks[0].fc1.kernel[...]
    for m in models.values():
        m.eval()
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: models[True](x))(x)),
                                  np.asarray(jax.jit(lambda x: models[False](x))(x)))
    assert models[True].blocks[0].fc1.kernel[...] is kernel
    for m in models.values():
        m.train()
        nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(m, x)
    stats = [nnx.state(models[first], nnx.BatchStat) for first in (False, True)]
    for a, b in zip(jax.tree.leaves(stats[0]), jax.tree.leaves(stats[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(np.abs(np.asarray(stats[1]["blocks"][0]["bn"]["mean"][...])).max()) > 0  # they did move


_GLIBC, _THP = ("glibc", "2.36"), "madvise"


@pytest.mark.parametrize("environ, kw, expected", [
    ({}, {}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {}, "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({}, {"thp_mode": "always"}, "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, {}, None),  # the user's own value wins
    ({"VOLO_JAX_HUGEPAGE_MALLOC": "0"}, {}, None),  # opt-out
    ({}, {"thp_mode": "never"}, None),  # the kernel has transparent huge pages off
    ({}, {"thp_mode": ""}, None),  # no /sys/kernel/mm/transparent_hugepage to read: leave it
    ({}, {"libc": ("glibc", "2.31")}, None),  # before glibc.malloc.hugetlb existed
    ({}, {"libc": ("", "")}, None),  # musl or unknown
    ({}, {"system": "Darwin"}, None),
])
def test_hugepage_malloc_environ(environ, kw, expected):
    kw = {"libc": _GLIBC, "thp_mode": _THP, "system": "Linux", **kw}
    env = xla.hugepage_malloc_environ({"PATH": "/bin", **environ}, **kw)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected and env["PATH"] == "/bin"  # the rest of the environment kept


_REEXEC_SCRIPT = """
import os, sys
print("before", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
from volo_jax.xla import reexec_with_hugepage_malloc
reexec_with_hugepage_malloc()
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
"""


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", xla.HUGEPAGE_OPT_OUT)}
    return {**env, **extra}


def test_reexec_keeps_pid_arguments_and_flags(tmp_path):
    """The CLIs' re-exec: same process (PID), same interpreter flags and arguments, the tunable set once (no loop);
    a no-op where it does not apply."""
    script = tmp_path / "reexec.py"
    script.write_text(_REEXEC_SCRIPT)
    env = _child_env()
    out = subprocess.run([sys.executable, "-X", "utf8", str(script), "a", "b c"], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    child = xla.hugepage_malloc_environ(env)
    if child is None:  # this machine does not qualify: nothing happens
        assert [line.split()[0] for line in out] == ["before", "after"]
        return
    pid = out[0].split()[1]
    assert out == [f"before {pid} None ['a', 'b c']",
                   f"before {pid} glibc.malloc.hugetlb=1 ['a', 'b c']",  # the re-executed process, same PID
                   f"after {pid} glibc.malloc.hugetlb=1 ['a', 'b c']"]
    opted_out = subprocess.run([sys.executable, str(script)], env=_child_env(VOLO_JAX_HUGEPAGE_MALLOC="0"),
                               capture_output=True, text=True, check=True).stdout.splitlines()
    assert [line.split()[0] for line in opted_out] == ["before", "after"]


_FAULTS_SCRIPT = """
import resource, jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0 + 1.0)
x = jnp.ones((4096, 4096), jnp.float32)  # a 64 MiB result: above glibc's mmap threshold, as XLA's temp buffers are
jax.block_until_ready(f(x))
faults = []
for _ in range(3):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(min(faults))
"""


@pytest.mark.skipif(xla.hugepage_malloc_environ(_child_env()) is None,
                    reason="no glibc >= 2.35 with transparent huge pages here")
def test_hugepage_tunable_cuts_page_faults(tmp_path):
    """What the re-exec is for: a large XLA:CPU buffer is a fresh mmap on every call, faulted in 4 KiB at a time
    (16384 faults for 64 MiB); with the tunable the kernel maps 2 MiB pages (32 of them)."""
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS_SCRIPT)

    def faults(env: dict[str, str]) -> int:
        return int(subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1])

    without = faults(_child_env(VOLO_JAX_HUGEPAGE_MALLOC="0"))
    with_tunable = faults(_child_env(GLIBC_TUNABLES=xla.HUGEPAGE_TUNABLE))
    assert without > 16000  # the premise: every call faults its 64 MiB result in page by page
    assert with_tunable < without / 8, (without, with_tunable)
