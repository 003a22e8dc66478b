"""set_grad_checkpointing (timm's API): per-block nnx.remat gives the same gradients and state, with less memory;
and run_block's param_grads_first, which that saving on XLA:CPU rests on, lowers the training memory by itself."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax

# one small variant per family, at the smallest input each one takes
CASES = [("volo_d1_224", 32), ("poolformer_s12", 32), ("ese_vovnet19b_dw", 64), ("convit_tiny", 32)]


def _loss(model: nnx.Module, x: jax.Array) -> jax.Array:
    return jnp.sum(model(x) ** 2)


def _leaves(tree: nnx.State) -> list[tuple[str, np.ndarray]]:
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append((jax.tree_util.keystr(path), np.asarray(leaf)))
    return out


@pytest.mark.parametrize("name,size", CASES)
def test_same_gradients_and_state_with_checkpointing(name, size):
    # drop-path on, so the recomputed forward must draw the same keys as the first one
    model = volo_jax.create_model(name, img_size=size, num_classes=10, drop_path_rate=0.1, rngs=nnx.Rngs(0))
    model.train()
    ckpt = nnx.clone(model)
    ckpt.set_grad_checkpointing(True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, size, size, 3)), jnp.float32)

    grad_fn = nnx.jit(nnx.value_and_grad(_loss))
    (l0, g0), (l1, g1) = grad_fn(model, x), grad_fn(ckpt, x)
    assert float(l0) > 0
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    # atol on the scale of the largest gradient: some are exactly zero in exact arithmetic (PoolFormer's norm1 bias
    # cancels in pool(x) - x) and hold only rounding noise, which remat's refused fusions may change
    scale = max(float(np.abs(a).max()) for _, a in _leaves(g0))
    for (path, a), (_, b) in zip(_leaves(g0), _leaves(g1), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=str(path))
    # BatchNorm running stats and the RNG counters move the same way with and without remat
    stats = nnx.Any(nnx.BatchStat, nnx.RngState)
    for (path, a), (_, b) in zip(_leaves(nnx.state(model, stats)), _leaves(nnx.state(ckpt, stats)), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=str(path))
    # the remat really is in the program (what it saves: the next test)
    graphdef, params, rest = nnx.split(ckpt, nnx.Param, ...)
    jaxpr = jax.make_jaxpr(lambda p, r: nnx.grad(_loss)(nnx.merge(graphdef, p, r), x))(params, rest)
    assert "remat" in str(jaxpr)


_ON_CPU = jax.default_backend() == "cpu"
# (model, size, largest temp-buffer ratio with/without remat). On XLA:CPU remat saves memory only together with
# run_block's param_grads_first (layers.run_block): VoVNet runs without it, so its case is the accelerators'. VOLO's
# stem and patch embedding run outside the blocks at the highest resolution and are not rematerialised: on CPU
# 0.79-0.85 at 64-128 px (0.78 at 224), so its CPU bound is 0.9.
MEMORY_CASES = [
    pytest.param("volo_d1_224", 64, 0.9 if _ON_CPU else 0.8, id="volo_d1_224"),
    pytest.param("poolformer_s12", 64, 0.8, id="poolformer_s12"),
    pytest.param("convit_tiny", 64, 0.8, id="convit_tiny"),
    pytest.param("ese_vovnet19b_dw", 64, 0.8, id="ese_vovnet19b_dw", marks=pytest.mark.skipif(
        _ON_CPU, reason="VoVNet's blocks run without param_grads_first, and XLA:CPU then gains nothing from remat")),
]


def _training_temp_bytes(name: str, size: int, checkpointing: bool = False) -> int:
    """XLA's temp buffers of a batch-8 forward+backward of ``name`` at ``size`` px, compiled as the training step is
    (with ``volo_jax.xla.compiler_options``)."""
    from volo_jax.xla import compiler_options

    model = volo_jax.create_model(name, img_size=size, num_classes=10)
    model.train()
    model.set_grad_checkpointing(checkpointing)
    graphdef, state = nnx.split(model)

    def loss(s: nnx.State, x: jax.Array) -> jax.Array:
        return jnp.sum(nnx.merge(graphdef, s, copy=True)(x) ** 2)

    x = jax.ShapeDtypeStruct((8, size, size, 3), jnp.float32)
    compiled = jax.jit(jax.grad(loss), compiler_options=compiler_options()).lower(state, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("name,size,max_ratio", MEMORY_CASES)
def test_checkpointing_lowers_training_memory(name, size, max_ratio):
    """The point of it: XLA's temp buffers for forward+backward shrink, compiled as the training step is."""
    temps = {enable: _training_temp_bytes(name, size, checkpointing=enable) for enable in (False, True)}
    assert temps[True] < max_ratio * temps[False], temps


@pytest.mark.skipif(not _ON_CPU, reason="run_block applies param_grads_first on CPU only")
@pytest.mark.parametrize("name", ["volo_d1_224", "poolformer_s12", "convit_tiny"])
def test_param_grads_first_shrinks_the_models_training_temp_buffers(name, monkeypatch):
    """The models that ask for run_block's param_grads_first (batch 8, 64 px, no remat): without it XLA:CPU's
    memory-optimized scheduler keeps every block's output gradients and saved inputs alive for the weight-gradient
    dots and reductions it runs at the end (measured: with it, 0.56-0.71 of the temp buffers)."""
    from volo_jax import layers
    from volo_jax.models import convit, poolformer, volo

    family = {"volo_d1_224": volo, "poolformer_s12": poolformer, "convit_tiny": convit}[name]

    def without(block, x, checkpoint=False, *, grad_barrier=False, param_grads_first=False):
        assert param_grads_first  # the model asks for it
        return layers.run_block(block, x, checkpoint, grad_barrier=grad_barrier)

    first = _training_temp_bytes(name, 64)
    monkeypatch.setattr(family, "run_block", without)
    plain = _training_temp_bytes(name, 64)
    assert first < 0.8 * plain, (first, plain)


def test_train_step_and_flag():
    """train.py's jitted step with --grad-checkpointing: the same losses and BatchNorm statistics over two steps."""
    import importlib.util
    from pathlib import Path

    from volo_jax import train_lib

    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    assert train_cli.parse_args(["data", "--grad-checkpointing"]).grad_checkpointing is True
    assert train_cli.parse_args(["data"]).grad_checkpointing is None  # the config file's value (default: off)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64, 64, 3)), jnp.float32)
    y = jnp.asarray([0, 3, 5, 9], jnp.int32)
    runs = {}
    for enable in (False, True):
        model = volo_jax.create_model("ese_vovnet19b_dw", img_size=64, num_classes=10, drop_path_rate=0.1)
        model.set_grad_checkpointing(enable)
        tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(lr=1e-3, total_steps=10),
                                         nnx.state(model, nnx.Param))
        graphdef, state = train_lib.create_train_state(model, tx, seed=0)
        mix = train_lib.MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=10)
        step = jax.jit(lambda s, x, y, g=graphdef, tx=tx, mix=mix: train_lib.train_step(g, tx, mix, 0.0, s, x, y))
        losses = []
        for _ in range(2):
            state, metrics = step(state, x, y)
            losses.append(float(metrics["loss"]))
        runs[enable] = losses, _leaves(nnx.state(state.model_state, nnx.BatchStat))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)
    for (path, a), (_, b) in zip(runs[False][1], runs[True][1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6, err_msg=path)
