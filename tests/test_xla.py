"""volo_jax.xla: the per-backend compiler options are accepted here, change nothing numerically, and degrade to none."""

from __future__ import annotations

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
