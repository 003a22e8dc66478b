"""VoVNet (V1, ESE/ECA V2) parity with timm, and torch-semantics BatchNorm in training.

For every variant the randomized timm weights (BatchNorm running statistics calibrated on random data, then
perturbed) are written as ``.safetensors`` (and ``.pth`` for one variant), loaded through ``create_model`` and compared
with ``compare_models``: logits, pre-logits, features, all five ``forward_intermediates`` maps, the ``features_only``
maps and every stem conv and OSA block fed timm's own input, within ``max|delta| <= 1e-4 * max(1, max|ref|)`` in
fp32, top-1 identical. The reference logits must vary across the batch, or the check would test only the head.

Training mode: :class:`volo_jax.layers.BatchNorm` matches ``torch.nn.BatchNorm2d`` step by step (outputs and the
running statistics, whose variance torch updates with the UNBIASED batch variance), alone, synchronised over a mapped
axis, and inside a whole ``ese_vovnet19b_dw`` against timm's ``model.train()`` forward.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import jax  # noqa: E402

import volo_jax  # noqa: E402
import volo_jax.registry  # noqa: E402
from converters.parity import (  # noqa: E402
    DEFAULT_TOL,
    make_inputs,
    randomize_timm_model,
    saved_checkpoint_parity,
    timm_state_dict_numpy,
)
from converters.torch_to_flax import convert_state_dict, model_key_map  # noqa: E402
from volo_jax.layers import BatchNorm, batch_norm  # noqa: E402
from volo_jax.models import vovnet  # noqa: E402

SMALL = ["ese_vovnet19b_dw", "ese_vovnet19b_slim_dw", "ese_vovnet19b_slim", "eca_vovnet39b"]
LARGE = ["vovnet39a", "vovnet57a", "ese_vovnet39b", "ese_vovnet57b", "ese_vovnet99b"]
ALL = SMALL + LARGE
# timm registers ese_vovnet39b_evos too: EvoNorm-S0 instead of BatchNorm+ReLU, experimental, no weights; left out.
LEFT_OUT = {"ese_vovnet39b_evos"}


def _assert_report(report):
    assert report.batch_std > 0.05, "reference logits do not vary across the batch: the test would only check the head"
    assert report.ok, "\n" + report.format()


def _run_variant(name: str, tmp_path, batch: int, formats=(".safetensors",), **kw):
    report = saved_checkpoint_parity(name, tmp_path, batch=batch, formats=formats, **kw)
    _assert_report(report)
    return report


# --------------------------------------------------------------------------- registry, configs, shapes
def test_registry_lists_every_timm_vovnet():
    assert volo_jax.list_models("*vovnet*") == sorted(set(timm.list_models("*vovnet*")) - LEFT_OUT) == sorted(ALL)
    assert volo_jax.list_models("*vovnet*", pretrained=True) == sorted(timm.list_models("*vovnet*", pretrained=True))


_CFG_KEYS = ("input_size", "crop_pct", "interpolation", "mean", "std", "classifier", "first_conv", "num_classes",
             "pool_size", "license", "test_input_size", "test_crop_pct")


def _assert_cfg_equal(ours: dict, theirs: dict):
    for key in _CFG_KEYS:
        assert (key in ours) == (key in theirs), key
        if key in theirs:
            assert ours[key] == theirs[key], key


@pytest.mark.parametrize("name", sorted(vovnet.PRETRAINED))
def test_pretrained_cfg_matches_timm(name):
    ours = volo_jax.registry.get_pretrained_cfg(name)
    _assert_cfg_equal(ours, timm.models.get_pretrained_cfg(name).to_dict())
    assert ours["hf_hub_id"] == f"timm/{name}"
    # the default tag of the architecture is the released one, as in timm
    assert volo_jax.registry.get_pretrained_cfg(name.split(".")[0])["tag"] == name.split(".")[1]


def test_untrained_cfgs_match_timm():
    """timm's ``.untrained`` tags: not listed as pretrained (as in timm), their data config kept in UNTRAINED."""
    default_tags = {n: timm.models.get_pretrained_cfg(n).tag for n in timm.list_models("*vovnet*")}
    untrained = sorted(f"{n}.{t}" for n, t in default_tags.items() if t == "untrained" and n not in LEFT_OUT)
    assert len(untrained) == 6
    assert sorted(vovnet.UNTRAINED) == untrained
    for name in untrained:
        _assert_cfg_equal(vovnet.UNTRAINED[name], timm.models.get_pretrained_cfg(name.split(".")[0]).to_dict())


def test_untrained_variant_builds_with_data_config():
    model = nnx.eval_shape(lambda: volo_jax.create_model("vovnet39a"))
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["crop_pct"] == 0.875
    assert volo_jax.resolve_data_config(model)["interpolation"] == "bicubic"


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_and_feature_info_match_timm(name):
    model = nnx.eval_shape(lambda: volo_jax.create_model(name))
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert model.feature_info == ref.feature_info  # num_chs, reduction, module of the stem.1 map and the 4 stages
    assert model.num_features == model.head_hidden_size == ref.num_features == ref.head_hidden_size
    # every torch key has a place in our model, with the shape the converter expects (buffers included)
    expected = {k: info.torch_shape for k, info in model_key_map(model).items()}
    assert expected == {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}


def test_eca_kernel_size_matches_timm():
    from timm.layers import EcaModule

    for c in (64, 112, 256, 512, 768, 1024, 2048):
        assert vovnet.eca_kernel_size(c) == EcaModule(c).conv.kernel_size[0], c


def test_forward_intermediates_indices_and_shapes():
    """Five maps (stem.1, stages 0-3) with timm's index semantics; shapes only (abstract evaluation, no FLOPs)."""
    model = nnx.eval_shape(lambda: volo_jax.create_model("ese_vovnet19b_slim_dw"))
    model.eval()

    def shapes(size: int, **kw) -> list[tuple[int, ...]]:
        x = jax.ShapeDtypeStruct((1, size, size, 3), np.float32)
        out = nnx.eval_shape(lambda m, x: m.forward_intermediates(x, intermediates_only=True, **kw), model, x)
        return [tuple(f.shape) for f in out]

    assert shapes(64) == [(1, 32, 32, 64), (1, 16, 16, 112), (1, 8, 8, 256), (1, 4, 4, 384), (1, 2, 2, 512)]
    assert [s[-1] for s in shapes(64, indices=2)] == [384, 512]
    assert [s[-1] for s in shapes(64, indices=[0, -1])] == [64, 512]
    # ceil-mode max pool: at 52px stage 1's 6x6 map pools to 3x3 (floor mode: 2x2), as in timm
    ref = timm.create_model("ese_vovnet19b_slim_dw").eval()
    with torch.no_grad():
        ref_maps = ref.forward_intermediates(torch.zeros(1, 3, 52, 52), intermediates_only=True)
    assert [s[1] for s in shapes(52)] == [m.shape[2] for m in ref_maps] == [26, 13, 6, 3, 1]


def test_prune_intermediate_layers_like_timm():
    model = nnx.eval_shape(lambda: volo_jax.create_model("ese_vovnet19b_slim_dw"))
    assert model.prune_intermediate_layers([0]) == [0]
    assert len(model.stages) == 0 and model.head is None and model.num_features == 64
    assert type(model.stem[2]).__name__ == "Identity"
    model = nnx.eval_shape(lambda: volo_jax.create_model("ese_vovnet19b_slim_dw"))
    model.prune_intermediate_layers(2, prune_head=False)
    assert len(model.stages) == 4 and model.head is not None


# --------------------------------------------------------------------------- parity on randomized weights
def test_vovnet_parity_ese_vovnet19b_dw(tmp_path):
    report = _run_variant("ese_vovnet19b_dw", tmp_path, batch=3, formats=(".safetensors", ".pth"))
    # per-block coverage: the 3 stem convs and every OSA block
    assert len(report.blocks) == 3 + sum(vovnet.VARIANTS["ese_vovnet19b_dw"].block_per_stage)


@pytest.mark.parametrize("name", SMALL[1:])
def test_vovnet_parity_small(name, tmp_path):
    # the other depthwise variant, a small full-conv one, and the only ECA one (~16 s)
    _run_variant(name, tmp_path, batch=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_vovnet_parity_large(name, tmp_path):
    # batch 2: with one image the check that logits vary across the batch is impossible
    report = _run_variant(name, tmp_path, batch=2)
    assert len(report.blocks) == 3 + sum(vovnet.VARIANTS[name].block_per_stage)


def test_vovnet_embeddings_num_classes_0(tmp_path):
    """The embedding model (num_classes=0): ``model(x)`` is the pooled features, equal to timm's."""
    report = _run_variant("ese_vovnet19b_dw", tmp_path, batch=2, num_classes=0)
    assert report.outputs[0].name == "logits"
    model = nnx.eval_shape(lambda: volo_jax.create_model("ese_vovnet19b_dw", num_classes=0))
    assert model.head.fc is None


# --------------------------------------------------------------------------- BatchNorm in training mode
def _torch_bn(c: int, seed: int) -> "torch.nn.BatchNorm2d":
    gen = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
        bn.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return bn


def _our_bn(ref: "torch.nn.BatchNorm2d", **kw) -> BatchNorm:
    bn = batch_norm(ref.num_features, rngs=nnx.Rngs(0), **kw)
    # a bare BatchNorm's state dict has a top-level `num_batches_tracked`; the converter skips it like nested ones
    nnx.update(bn, convert_state_dict(timm_state_dict_numpy(ref), bn))
    return bn


def test_batch_norm_matches_torch_in_train_and_eval():
    """Three training steps (outputs, running mean and unbiased running var), then eval, against BatchNorm2d."""
    c = 8
    ref = _torch_bn(c, seed=0)
    ours = _our_bn(ref)
    assert isinstance(ours, nnx.BatchNorm)  # the converter and model.train()/eval() rely on it
    rng = np.random.default_rng(0)
    flax_bn = nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, use_fast_variance=False, rngs=nnx.Rngs(0))
    ref.train()
    ours.train()
    for step in range(3):
        # a large per-channel mean: the centred (two-pass) variance matters here
        x = (rng.standard_normal((4, c, 5, 6)) * (1 + step) + 3.0 * rng.standard_normal((1, c, 1, 1))).astype(
            np.float32)
        with torch.no_grad():
            y_ref = ref(torch.from_numpy(x)).numpy()
        y = np.asarray(ours(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
        flax_bn(x.transpose(0, 2, 3, 1))
        np.testing.assert_allclose(y, y_ref, atol=1e-5, rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(np.asarray(ours.mean[...]), ref.running_mean.numpy(), atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(ours.var[...]), ref.running_var.numpy(), atol=1e-5, rtol=1e-5)
    # the unbiased update is what Flax's own BatchNorm (biased running variance) misses
    assert np.abs(np.asarray(flax_bn.var[...]) - ref.running_var.numpy()).max() > 1e-3
    ref.eval()
    ours.eval()
    x = rng.standard_normal((2, c, 5, 6)).astype(np.float32)
    with torch.no_grad():
        y_ref = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(x.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2), y_ref, atol=1e-5,
                               rtol=1e-5)


def test_batch_norm_axis_name_synchronises_statistics():
    """Two batch shards under ``jax.vmap(axis_name=...)``: outputs and running stats equal the full-batch step."""
    c = 6
    ref = _torch_bn(c, seed=1)
    full = _our_bn(ref)
    synced = _our_bn(ref, axis_name="batch")
    x = np.random.default_rng(1).standard_normal((4, 5, 5, c)).astype(np.float32) + 2.0
    full.train()
    synced.train()
    y_full = np.asarray(full(x))
    graphdef, state = nnx.split(synced)

    def step(state, xs):
        bn = nnx.merge(graphdef, state)
        return bn(xs), nnx.state(bn)

    ys, new_state = jax.vmap(step, in_axes=(None, 0), axis_name="batch")(state, x.reshape(2, 2, 5, 5, c))
    np.testing.assert_allclose(np.asarray(ys).reshape(x.shape), y_full, atol=1e-5, rtol=1e-5)
    for name in ("mean", "var"):
        shards = np.asarray(new_state[name][...])  # (2, C): one copy per shard, identical after pmean
        np.testing.assert_allclose(shards[0], shards[1], atol=0, rtol=0)
        np.testing.assert_allclose(shards[0], np.asarray(getattr(full, name)[...]), atol=1e-5, rtol=1e-5)
    # and what torch computes on the whole batch
    ref.train()
    with torch.no_grad():
        ref(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    np.testing.assert_allclose(np.asarray(new_state["var"][...])[0], ref.running_var.numpy(), atol=1e-5, rtol=1e-5)


@nnx.jit
def _train_forward(model, x):
    return model(x)


def test_ese_vovnet19b_dw_training_step_matches_timm():
    """Training-mode forward of the whole network (batch statistics in every BatchNorm, drop path 0): logits and
    every BatchNorm's updated running_mean / running_var equal timm's after one step."""
    torch.manual_seed(0)
    ref = randomize_timm_model(timm.create_model("ese_vovnet19b_dw"), seed=3)
    model = volo_jax.create_model("ese_vovnet19b_dw")
    # timm_state_dict_numpy shares torch's memory: the converter must copy, or timm's in-place running-stat updates
    # in the training forward below would show through in our model (a regression test for that)
    nnx.update(model, convert_state_dict(timm_state_dict_numpy(ref), model))
    x = make_inputs(4, 3, 128, seed=3)
    ref.train()
    with torch.no_grad():
        logits_ref = ref(torch.from_numpy(x)).numpy()
    model.train()
    logits = np.asarray(_train_forward(model, x.transpose(0, 2, 3, 1)))
    assert logits_ref.std(axis=0).mean() > 0.05
    assert np.abs(logits - logits_ref).max() <= DEFAULT_TOL * max(1.0, np.abs(logits_ref).max()), \
        np.abs(logits - logits_ref).max()
    sd = timm_state_dict_numpy(ref)
    flat = {tuple(k): v for k, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}
    checked = 0
    for key, info in model_key_map(model).items():
        if not key.endswith(("running_mean", "running_var")):
            continue
        ours = np.asarray(flat[info.path].get_value())
        tol = 1e-5 * max(1.0, float(np.abs(sd[key]).max()))
        assert np.abs(ours - sd[key]).max() <= tol, (key, np.abs(ours - sd[key]).max())
        checked += 1
    assert checked == 2 * sum(isinstance(m, torch.nn.BatchNorm2d) for m in ref.modules())
