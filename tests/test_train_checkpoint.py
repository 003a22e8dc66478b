"""Training checkpoints (orbax): exact resume, keep-last-K, a killed save is never picked up, weights-only restore."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax
from converters.torch_to_flax import ConversionError
from volo_jax import train_lib
from volo_jax.checkpoint import TrainCheckpoints

MIX = train_lib.MixConfig(num_classes=10)


def _setup(ema: bool = True):
    model = volo_jax.create_model("ese_vovnet19b_slim_dw", num_classes=10, drop_path_rate=0.1, rngs=0)
    tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=20),
                                     nnx.state(model, nnx.Param))
    graphdef, state = train_lib.create_train_state(model, tx, seed=0, ema=ema)
    step = jax.jit(lambda s, x, y: train_lib.train_step(graphdef, tx, MIX, 0.9, s, x, y))
    return model, graphdef, state, step


def _batch(i: int):
    rng = np.random.default_rng(i)
    return jnp.asarray(rng.standard_normal((4, 32, 32, 3)), jnp.float32), jnp.asarray(rng.integers(0, 10, 4))


def _leaves(tree):
    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(tree)]


def test_resume_is_exact(tmp_path):
    """3 steps in one go == 2 steps, save, restore into a fresh state, 1 step: every leaf bit-identical (params,
    optimizer moments, EMA, BatchNorm statistics, dropout RNG state, step, key)."""
    _, _, state, step = _setup()
    for i in range(3):
        state, _ = step(state, *_batch(i))
    straight = _leaves(state)

    _, _, state, step = _setup()
    for i in range(2):
        state, _ = step(state, *_batch(i))
    ckpts = TrainCheckpoints(tmp_path / "ckpt")
    ckpts.save(state, {"model_name": "ese_vovnet19b_slim_dw", "data_position": 2})
    ckpts.wait()

    _, _, fresh, step = _setup()
    restored, meta = TrainCheckpoints(tmp_path / "ckpt").restore(fresh)
    assert meta == {"model_name": "ese_vovnet19b_slim_dw", "data_position": 2}
    assert int(restored.step) == 2
    restored, _ = step(restored, *_batch(2))
    for a, b in zip(_leaves(restored), straight, strict=True):
        np.testing.assert_array_equal(a, b)


def test_keeps_last_k_and_ignores_a_killed_save(tmp_path):
    _, _, state, step = _setup(ema=False)
    ckpts = TrainCheckpoints(tmp_path, keep=2)
    for i in range(4):
        state, _ = step(state, *_batch(i))
        ckpts.save(state, {"i": i})
    ckpts.wait()
    assert ckpts.all_steps() == [3, 4]
    # a run killed while writing step 5 leaves orbax's temporary directory behind
    (tmp_path / "5.orbax-checkpoint-tmp-1700000000").mkdir()
    (tmp_path / "5.orbax-checkpoint-tmp-1700000000" / "params").mkdir()
    reopened = TrainCheckpoints(tmp_path, read_only=True)
    assert reopened.latest_step() == 4
    assert reopened.meta() == {"i": 3}


def test_restore_weights_params_and_ema(tmp_path):
    model, graphdef, state, step = _setup()
    for i in range(2):
        state, _ = step(state, *_batch(i))
    ckpts = TrainCheckpoints(tmp_path)
    ckpts.save(state, {"model_name": "ese_vovnet19b_slim_dw"})
    ckpts.wait()
    for use_ema, want in ((False, state.params), (True, state.ema_params)):
        target = volo_jax.create_model("ese_vovnet19b_slim_dw", num_classes=10, rngs=1)
        meta = TrainCheckpoints(tmp_path, read_only=True).restore_weights(target, use_ema=use_ema)
        assert meta["model_name"] == "ese_vovnet19b_slim_dw"
        for a, b in zip(_leaves(nnx.state(target, nnx.Param)), _leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
        # BatchNorm statistics come from the run
        for a, b in zip(_leaves(nnx.state(target, nnx.BatchStat)),
                        _leaves(nnx.state(nnx.merge(graphdef, state.params, state.model_state), nnx.BatchStat)),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_restore_weights_without_ema_is_a_clear_error(tmp_path):
    _, _, state, _ = _setup(ema=False)
    ckpts = TrainCheckpoints(tmp_path)
    ckpts.save(state, {})
    ckpts.wait()
    target = volo_jax.create_model("ese_vovnet19b_slim_dw", num_classes=10)
    with pytest.raises(ConversionError, match="no EMA weights"):
        TrainCheckpoints(tmp_path, read_only=True).restore_weights(target, use_ema=True)
    with pytest.raises(FileNotFoundError, match="no complete training checkpoint"):
        TrainCheckpoints(tmp_path / "empty").restore_weights(target)


def test_finetune_weights_at_another_size_and_class_count(tmp_path):
    """A training run of VOLO at 32 px / 10 classes loads into a 64 px / 5 class model (``train.py --finetune``):
    pos_embed resampled exactly as timm does it, every other tensor copied, the head of another size left as
    initialised; the same run loads bit-exactly into its own shapes."""
    from converters.torch_to_flax import maybe_resample_pos_embed
    from volo_jax.checkpoint import load_flat_tensors
    from volo_jax.hub import classifier_prefixes

    model = volo_jax.create_model("volo_d1_224", num_classes=10, img_size=32, rngs=0)
    tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(lr=1e-3, warmup_steps=2, total_steps=20),
                                     nnx.state(model, nnx.Param))
    _, state = train_lib.create_train_state(model, tx, seed=0, ema=False)
    ckpts = TrainCheckpoints(tmp_path / "ckpt")
    ckpts.save(state, {"model_name": "volo_d1_224", "num_classes": 10, "img_size": [32, 32]})
    ckpts.close()

    tensors, meta = TrainCheckpoints(tmp_path / "ckpt", read_only=True).weights_as_numpy()
    assert meta["num_classes"] == 10 and tensors["pos_embed"].shape == (1, 2, 2, 384)
    same = volo_jax.create_model("volo_d1_224", num_classes=10, img_size=32, rngs=1)
    load_flat_tensors(same, tensors, source="run")
    for a, b in zip(_leaves(nnx.state(same)), _leaves(nnx.state(model)), strict=True):
        np.testing.assert_array_equal(a, b)

    target = volo_jax.create_model("volo_d1_224", num_classes=5, img_size=64, rngs=1)
    head_before = np.asarray(target.head.kernel.get_value())
    load_flat_tensors(target, tensors, source="run", ignore_prefixes=classifier_prefixes(target, 10))
    pos = np.asarray(target.pos_embed.get_value())
    assert pos.shape == (1, 4, 4, 384)
    np.testing.assert_array_equal(pos, maybe_resample_pos_embed("pos_embed", tensors["pos_embed"], pos.shape))
    np.testing.assert_array_equal(np.asarray(target.head.kernel.get_value()), head_before)
    np.testing.assert_array_equal(np.asarray(target.network[0][0].attn.v.kernel.get_value()),
                                  tensors["network.0.0.attn.v.kernel"])
    with pytest.raises(ConversionError, match="aux_head|head"):  # without leaving the head out: a clear error
        load_flat_tensors(volo_jax.create_model("volo_d1_224", num_classes=5, img_size=64), tensors, source="run")
