"""``features_only=True`` models vs timm's: maps, ``feature_info``, ``out_indices`` and what pruning keeps.

The maps are compared on randomized weights loaded from one file into both libraries' features-only models
(``saved_checkpoint_parity(features=True)``), for default and explicit ``out_indices``, including selections that
make timm prune the class token or position embedding. The variables our pruned model keeps must be exactly the
ones timm's features-only model keeps.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import volo_jax  # noqa: E402
from converters.parity import randomize_timm_model, save_torch_checkpoint, saved_checkpoint_parity  # noqa: E402
from converters.torch_to_flax import model_key_map  # noqa: E402
from volo_jax.features import FeatureGetter, feature_take_indices  # noqa: E402

CASES = [
    ("volo_d1_224", None),  # timm default: the last 3 stages
    ("volo_d1_224", (0,)),  # outlooker stage only: pos_embed, norm, transformer stages and heads pruned
    ("volo_d1_224", (0, 1, 2, 3)),
    ("convit_tiny", None),
    ("convit_tiny", (2, 5)),  # GPSA blocks only: the class token is never inserted, so it is pruned
    ("poolformer_s12", None),
    ("poolformer_s12", 2),  # last two
    ("poolformerv2_s12", (0, -1)),
]


@pytest.mark.parametrize("name,out_indices", CASES)
def test_features_only_maps_match_timm(name, out_indices, tmp_path):
    report = saved_checkpoint_parity(name, tmp_path, batch=2, out_indices=out_indices, per_block=False)
    maps = [e for e in report.outputs if e.name.startswith("features_only map")]
    expected = len(feature_take_indices(len(volo_jax.create_model(name).feature_info), out_indices or
                                        volo_jax.registry.get_entry(name)[0].default_out_indices)[0])
    assert len(maps) == expected
    assert report.feature_info_equal
    assert report.batch_std > 0.05, "reference logits do not vary across the batch: the check would be empty"
    assert report.ok, "\n" + report.format()


def _timm_feature_keys(m) -> set[str]:
    """timm features-only state-dict keys in the classifier's naming (FeatureListNet flattens ``stages.0``)."""
    keys = set()
    for k in m.state_dict():
        if k.endswith("num_batches_tracked"):
            continue
        k = k.removeprefix("model.")  # FeatureGetterNet
        head, _, rest = k.partition(".")
        keys.add(head.replace("_", ".") + "." + rest if head.rsplit("_", 1)[-1].isdigit() else k)
    return keys


@pytest.mark.parametrize("name,out_indices", CASES)
def test_pruned_variables_match_timm(name, out_indices):
    kw = {} if out_indices is None else dict(out_indices=out_indices)
    with torch.device("meta"):
        ref = timm.create_model(name, features_only=True, **kw)
    ours = nnx.eval_shape(lambda: volo_jax.create_model(name, features_only=True, **kw))
    assert isinstance(ours, FeatureGetter)
    keys = {k.removeprefix("model.") for k in model_key_map(ours)}
    assert keys == _timm_feature_keys(ref)
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction()


def test_create_model_features_only_from_file(tmp_path):
    """The user path: ``create_model(features_only=True, pretrained=file)`` equals timm's features model."""
    ref = randomize_timm_model(timm.create_model("poolformer_s12"), seed=3)
    path = save_torch_checkpoint(ref, tmp_path / "w.safetensors")
    feats_t = timm.create_model("poolformer_s12", features_only=True, out_indices=(1, 2), pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path))).eval()
    ours = volo_jax.create_model("poolformer_s12", features_only=True, out_indices=(1, 2), pretrained=path)
    ours.eval()
    x = np.random.default_rng(0).standard_normal((2, 3, 96, 128)).astype(np.float32)  # non-square, not 224
    with torch.no_grad():
        want = [t.numpy().transpose(0, 2, 3, 1) for t in feats_t(torch.from_numpy(x))]
    got = ours(x.transpose(0, 2, 3, 1))
    assert [g.shape for g in got] == [(2, 12, 16, 128), (2, 6, 8, 320)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, atol=1e-4 * max(1.0, np.abs(w).max()), rtol=0)
    assert ours.feature_info.module_name() == ["stages.1", "stages.2"]
    assert [f["index"] for f in ours.feature_info] == [1, 2]
    assert ours.pretrained_cfg["input_size"] == (3, 224, 224)


@pytest.mark.parametrize("bad", [5, 0, (4,), (-5,), ()])
def test_out_indices_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="out of range|empty"):
        nnx.eval_shape(lambda: volo_jax.create_model("poolformer_s12", features_only=True, out_indices=bad))


def test_out_indices_without_features_only_is_an_error():
    with pytest.raises(ValueError, match="features_only"):
        volo_jax.create_model("poolformer_s12", out_indices=(1,))


def test_forward_intermediates_rejects_out_of_range_index():
    """An index past the last stage used to wrap around silently (i % n); it must name the valid range."""
    model = nnx.eval_shape(lambda: volo_jax.create_model("convit_tiny"))
    with pytest.raises(ValueError, match=r"out of range \(0 to 11"):
        model.forward_intermediates(np.zeros((1, 224, 224, 3), np.float32), indices=[12])
