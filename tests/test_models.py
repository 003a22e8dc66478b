"""The timm-style API over the registry: names, configs, shapes, modes and the dense training output.

Numerical parity with timm lives in test_parity.py; here every registered model is built abstractly (no FLOPs) and a
small one is run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import volo_jax
from volo_jax.models import volo
from volo_jax.registry import get_entry

VOLO_NAMES = [
    "volo_d1_224", "volo_d1_384", "volo_d2_224", "volo_d2_384", "volo_d3_224", "volo_d3_448",
    "volo_d4_224", "volo_d4_448", "volo_d5_224", "volo_d5_448", "volo_d5_512",
]


def tiny_volo(**kw) -> nnx.Module:
    """A 2-2-1-1 VOLO at 64px with the real block types: fast enough to run in every test."""
    cfg = volo.VoloConfig(layers=(2, 1, 1, 1), embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), img_size=64,
                          num_classes=10, stem_hidden_dim=16)
    cfg = volo.build(cfg, **kw)
    return volo.VOLO(cfg, rngs=nnx.Rngs(0))


def test_registry_lists_every_timm_volo_variant():
    assert volo_jax.list_models("volo*") == sorted(VOLO_NAMES)
    assert len(volo_jax.list_models("volo*", pretrained=True)) == len(VOLO_NAMES)
    assert volo_jax.list_models("VOLO_D5*") == ["volo_d5_224", "volo_d5_448", "volo_d5_512"]


def test_registry_matches_timm_registry():
    timm = pytest.importorskip("timm")
    assert set(timm.list_models("volo*")) == set(VOLO_NAMES)
    assert set(timm.list_models("volo*", pretrained=True)) == set(volo_jax.list_models("volo*", pretrained=True))
    for name in volo_jax.list_models("volo*", pretrained=True):
        ours = volo_jax.get_pretrained_cfg(name)
        theirs = timm.models.get_pretrained_cfg(name).to_dict()
        for key in ("input_size", "mean", "std"):
            assert tuple(ours[key]) == tuple(theirs[key]), (name, key)
        for key in ("crop_pct", "interpolation", "num_classes", "url", "first_conv", "fixed_input_size"):
            assert ours[key] == theirs[key], (name, key)
        assert tuple(ours["classifier"]) == tuple(theirs["classifier"])
        assert ours["hf_hub_id"] == f"timm/{name}"


@pytest.mark.parametrize("bad,expected", [("volo_d1_22", "volo_d1_224"), ("vol_d2_384", "volo_d2_384"),
                                          ("volo_d1_224.sail_in21k", "sail_in1k")])
def test_unknown_names_suggest_close_matches(bad, expected):
    with pytest.raises(ValueError, match=expected):
        volo_jax.create_model(bad)


def test_name_with_tag_and_hub_prefix():
    entry, tag = get_entry("timm/volo_d1_224.sail_in1k")
    assert (entry.name, tag) == ("volo_d1_224", "sail_in1k")
    cfg = volo_jax.get_pretrained_cfg("volo_d1_384")
    assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"


def test_unknown_config_argument_is_named():
    with pytest.raises(TypeError, match="not_a_field"):
        volo_jax.create_model("volo_d1_224", not_a_field=1)


@pytest.mark.parametrize("name", VOLO_NAMES)
def test_every_variant_builds_with_timm_parameter_count(name):
    """Abstract build (no memory, no FLOPs): parameter count equals timm's for every variant."""
    timm = pytest.importorskip("timm")
    import torch

    model = nnx.eval_shape(lambda: volo_jax.create_model(name))
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert model.pretrained_cfg["input_size"][1] == volo.VARIANTS[name].img_size


def test_forward_shapes_embeddings_and_head_combination():
    model = tiny_volo()
    model.eval()
    x = jax.random.normal(jax.random.key(1), (3, 64, 64, 3))
    feats = model.forward_features(x)
    assert feats.shape == (3, 1 + 4 * 4, 64)  # class token + (64/8/2)^2 tokens
    pre = model.forward_head(feats, pre_logits=True)
    np.testing.assert_array_equal(pre, feats[:, 0])
    logits = model(x)
    expected = model.head(feats[:, 0]) + 0.5 * model.aux_head(feats[:, 1:]).max(axis=1)
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)
    assert float(jnp.std(logits, axis=0).mean()) > 0  # the input reaches the logits

    emb = tiny_volo(num_classes=0)
    emb.eval()
    assert emb.head is None and emb.aux_head is None
    assert emb(x).shape == (3, 64)

    avg = tiny_volo(global_pool="avg", num_classes=0)
    avg.eval()
    np.testing.assert_allclose(avg(x), avg.forward_features(x).mean(axis=1), rtol=1e-6, atol=1e-6)


def test_forward_intermediates_reductions():
    model = tiny_volo()
    model.eval()
    x = jnp.ones((1, 64, 64, 3))
    maps = model.forward_intermediates(x, intermediates_only=True)
    assert [m.shape for m in maps] == [(1, 8, 8, 32), (1, 4, 4, 64), (1, 4, 4, 64), (1, 4, 4, 64)]
    assert [f["reduction"] for f in model.feature_info] == [8, 16, 16, 16]
    assert [m.shape for m in model.forward_intermediates(x, indices=2, intermediates_only=True)] == \
        [(1, 4, 4, 64), (1, 4, 4, 64)]


def test_img_size_changes_pos_embed_grid():
    model = nnx.eval_shape(lambda: volo_jax.create_model("volo_d1_224", img_size=288))
    assert model.pos_embed.shape == (1, 18, 18, 384)
    assert model.pretrained_cfg["input_size"] == (3, 288, 288)


def test_dtype_bfloat16_compute_keeps_fp32_params():
    model = tiny_volo()
    bf = volo.VOLO(model.cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    bf.eval()
    out = bf(jnp.ones((1, 64, 64, 3)))
    assert out.dtype == jnp.bfloat16
    assert bf.head.kernel.dtype == jnp.float32


def test_train_mode_drop_path_is_stochastic_and_eval_is_not():
    model = tiny_volo(drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(0), (4, 64, 64, 3))
    model.train()
    a, b = model(x), model(x)
    assert not np.allclose(a, b)
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    # timm gives the outlooker stage no drop path; only transformer blocks drop
    assert all(blk.drop_path1.rate == 0.0 for blk in model.network[0])
    assert model.network[-1][0].drop_path1.rate > 0.0


def test_forward_train_dense_output_and_mix_token():
    model = tiny_volo(use_mix_token=True)
    model.eval()  # deterministic blocks; MixToken is applied by forward_train itself
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    cls, aux, box = model.forward_train(x, mix_token=False)
    assert cls.shape == (2, 10) and aux.shape == (2, 16, 10) and box.tolist() == [0, 0, 0, 0]
    feats = model.forward_features(x)
    np.testing.assert_allclose(cls, model.head(feats[:, 0]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux, model.aux_head(feats[:, 1:]), rtol=1e-5, atol=1e-5)

    cls_m, aux_m, box_m = model.forward_train(x, mix_token=True, key=jax.random.key(3))
    b = np.asarray(box_m)
    assert (0 <= b).all() and (b[[2, 3]] <= 4).all() and (b[:2] <= b[2:]).all()
    # A full-grid box swaps the two images' tokens everywhere, and the aux output is flipped back: each image's
    # aux logits come from the other image's tokens after the flip, i.e. they equal the flipped batch's aux output.
    _, aux_full, _ = model.forward_train(x, mix_token=True, bbox=jnp.array([0, 0, 4, 4]))
    _, aux_flip, _ = model.forward_train(x[::-1], mix_token=False)
    np.testing.assert_allclose(aux_full, aux_flip[::-1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="key"):
        model.forward_train(x, mix_token=True)


def test_rand_bbox_matches_timm_formula():
    lam = jnp.float32(0.75)
    boxes = np.stack([np.asarray(volo.rand_bbox(jax.random.key(i), (14, 14), lam)) for i in range(50)])
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    # cut = int(14 * sqrt(0.25)) = 7; clipping at the border can only shrink the box
    assert (w <= 7).all() and (h <= 7).all() and (w == 7).any() and (h == 7).any()
    assert (boxes >= 0).all() and (boxes <= 14).all()


def test_jit_of_split_model():
    """The hot-loop pattern of the style guide: split once, jit a pure function of (graphdef, state, batch)."""
    model = tiny_volo()
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jnp.ones((2, 64, 64, 3))
    np.testing.assert_allclose(fwd(state, x), model(x), rtol=1e-6, atol=1e-6)
