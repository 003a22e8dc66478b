"""volo_jax.xla: the per-backend compiler options are accepted here, change nothing numerically, and degrade to none."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax
from volo_jax import xla


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
