"""PoolFormer v1/v2 parity with timm: every timm tensor randomized -> file -> create_model(pretrained=file) == timm.

For every variant the randomized timm weights (1-D scales such as layer scales, res scales and norm weights drawn
U(0.5, 1.5), so no block is near identity) are written as ``.safetensors`` (and ``.pth`` for one variant), loaded
through ``create_model`` and compared with ``compare_models``: logits, pre-logits, features, every stage output and
every block fed timm's own input, within ``max|delta| <= 1e-4 * max(1, max|ref|)`` in fp32, top-1 identical. The
reference logits must vary across the batch, or the check would test only the head.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import volo_jax  # noqa: E402
from converters.parity import (  # noqa: E402
    compare_models,
    make_inputs,
    randomize_timm_model,
    saved_checkpoint_parity,
)
from volo_jax.models import poolformer  # noqa: E402

SMALL = ["poolformer_s12", "poolformerv2_s12"]
LARGE = ["poolformer_s24", "poolformer_s36", "poolformer_m36", "poolformer_m48",
         "poolformerv2_s24", "poolformerv2_s36", "poolformerv2_m36", "poolformerv2_m48"]
ALL = SMALL + LARGE


def _assert_report(report):
    assert report.batch_std > 0.05, "reference logits do not vary across the batch: the test would only check the head"
    assert report.ok, "\n" + report.format()


def _run_variant(name: str, tmp_path, batch: int, formats=(".safetensors",), **kw):
    report = saved_checkpoint_parity(name, tmp_path, batch=batch, formats=formats, **kw)
    _assert_report(report)
    return report


def test_registry_lists_every_timm_poolformer():
    assert volo_jax.list_models("poolformer*") == sorted(timm.list_models("poolformer*"))
    assert volo_jax.list_models("poolformer*", pretrained=True) == \
        sorted(timm.list_models("poolformer*", pretrained=True))


@pytest.mark.parametrize("name", ALL)
def test_pretrained_cfg_matches_timm(name):
    ours = volo_jax.registry.get_pretrained_cfg(name)
    theirs = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "crop_pct", "interpolation", "mean", "std", "classifier", "first_conv", "num_classes",
                "pool_size", "license"):
        assert tuple(np.ravel(ours[key])) == tuple(np.ravel(theirs[key])) if isinstance(theirs[key], tuple) \
            else ours[key] == theirs[key], key


@pytest.mark.parametrize("name", ALL)
def test_parameter_count_matches_timm(name):
    model = nnx.eval_shape(lambda: volo_jax.create_model(name))
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert [f["reduction"] for f in model.feature_info] == [4, 8, 16, 32]


@pytest.mark.parametrize("name", SMALL)
def test_poolformer_parity_small(name, tmp_path):
    formats = (".safetensors", ".pth") if name == "poolformer_s12" else (".safetensors",)
    report = _run_variant(name, tmp_path, batch=3, formats=formats)
    # per-block coverage: stem, 3 downsamples, every block, head norm
    assert len(report.blocks) == 1 + 3 + sum(poolformer.VARIANTS[name].depths) + 1


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_poolformer_parity_large(name, tmp_path):
    # batch 2: with one image the check that logits vary across the batch is impossible
    _run_variant(name, tmp_path, batch=2)


def test_poolformer_embeddings_num_classes_0(tmp_path):
    """The embedding model (num_classes=0): ``model(x)`` is the pooled, normalised features, equal to timm's."""
    report = _run_variant("poolformerv2_s12", tmp_path, batch=2, num_classes=0)
    assert report.outputs[0].name == "logits"
    model = nnx.eval_shape(lambda: volo_jax.create_model("poolformerv2_s12", num_classes=0))
    assert model.head.fc is None


def test_forward_intermediates_shapes():
    model = volo_jax.create_model("poolformer_s12")
    model.eval()
    x = np.zeros((1, 64, 64, 3), np.float32)
    final, feats = model.forward_intermediates(x, indices=[1, 3])
    assert [f.shape for f in feats] == [(1, 8, 8, 128), (1, 2, 2, 512)]
    assert final.shape == (1, 2, 2, 512)
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def _to_original_layout(sd: dict, v1: bool) -> dict:
    """timm keys -> the original repos' keys (sail-sg/poolformer for v1, sail-sg/metaformer for v2)."""
    import re

    rules = [(r"^stem\.conv\.", "patch_embed.proj."),
             (r"^stages\.(\d)\.downsample\.conv\.", lambda m: f"network.{2 * int(m[1]) - 1}.proj."),
             (r"^stages\.(\d)\.blocks\.", lambda m: f"network.{2 * int(m[1])}."),
             (r"\.layer_scale(\d)\.scale$", r".layer_scale_\1")] if v1 else \
        [(r"^stem\.conv\.", "downsample_layers.0.conv."), (r"^stem\.norm\.", "downsample_layers.0.post_norm."),
         (r"^stages\.(\d)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm."),
         (r"^stages\.(\d)\.downsample\.conv\.", r"downsample_layers.\1.conv."),
         (r"^stages\.(\d)\.blocks\.", r"stages.\1.")]
    rules += [(r"^head\.norm\.", "norm."), (r"^head\.fc\.", "head.")]
    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v.contiguous()
    return out


@pytest.mark.parametrize("name", SMALL)
def test_original_repo_checkpoint_layout(name, tmp_path):
    """A checkpoint in the original sail-sg key layout loads (converters.rules) and matches timm end to end."""
    from timm.models.metaformer import checkpoint_filter_fn

    torch.manual_seed(0)
    ref = randomize_timm_model(timm.create_model(name), seed=2)
    original = _to_original_layout(ref.state_dict(), v1=name == "poolformer_s12")
    assert set(checkpoint_filter_fn(original, ref)) == set(ref.state_dict())  # the layout timm's filter expects
    path = tmp_path / "original.pth"
    torch.save(original, path)
    model = volo_jax.create_model(name, pretrained=str(path))
    model.eval()
    _assert_report(compare_models(ref, model, make_inputs(2, 3, 224, seed=2), family="poolformer", name=name,
                                  per_block=False))
