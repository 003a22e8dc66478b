"""ConViT parity with timm: every timm tensor randomized -> file -> create_model(pretrained=file) == timm.

Like ``test_parity.py`` for VOLO: logits, pre-logits, features, every block's intermediate map and every block on
timm's own input agree within ``max|delta| <= 1e-4 * max(1, max|ref|)`` in fp32, and the reference logits vary across
the batch. GPSA's relative positions are computed at run time (timm's ``get_rel_indices``), so a model at another
``img_size`` is checked too.
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
    save_torch_checkpoint,
    saved_checkpoint_parity,
)
from volo_jax.models import convit  # noqa: E402

NAMES = ["convit_tiny", "convit_small", "convit_base"]


def _assert_report(report):
    assert report.batch_std > 0.05, "reference logits do not vary across the batch: the test would only check the head"
    assert report.ok, "\n" + report.format()


def _run_variant(name: str, tmp_path, batch: int, formats=(".safetensors",), **kw):
    report = saved_checkpoint_parity(name, tmp_path, batch=batch, formats=formats, **kw)
    _assert_report(report)
    return report


def test_convit_tiny_parity_all_formats(tmp_path):
    report = _run_variant("convit_tiny", tmp_path, batch=3, formats=(".safetensors", ".pth"))
    # per-block coverage: patch_embed, 10 GPSA + 2 MHSA blocks, the final norm; one intermediate per block
    assert [e.name for e in report.blocks] == ["patch_embed", *(f"blocks.{i}" for i in range(12)), "norm"]
    assert sum(e.name.startswith("stage ") for e in report.outputs) == 12


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convit_small", "convit_base"])
def test_convit_parity_large_variants(name, tmp_path):
    _run_variant(name, tmp_path, batch=2)


def test_convit_parity_embeddings_and_other_img_size(tmp_path):
    """The embedding model (num_classes=0) and a model built at 160px (10x10 grid: rel_indices and pos_embed)."""
    report = _run_variant("convit_tiny", tmp_path, batch=2, num_classes=0)
    assert report.outputs[0].name == "logits"
    _run_variant("convit_tiny", tmp_path, batch=2, img_size=160)


def test_convit_pos_embed_resampled_from_224_checkpoint(tmp_path):
    """A 224 checkpoint into a 160 model: our converter resamples the (1, N, C) pos_embed.

    timm's convit.py has no checkpoint_filter_fn, so timm itself would refuse this checkpoint (size mismatch); the
    reference is timm's ``resample_abs_pos_embed`` (bicubic, antialias, no prefix tokens) applied by hand.
    """
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    ref224 = randomize_timm_model(timm.create_model("convit_tiny"), seed=3)
    path = save_torch_checkpoint(ref224, tmp_path / "w.safetensors")
    model = volo_jax.create_model("convit_tiny", pretrained=str(path), img_size=160)
    sd = dict(ref224.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [10, 10], num_prefix_tokens=0)
    ref160 = timm.create_model("convit_tiny", img_size=160)
    ref160.load_state_dict(sd, strict=True)
    ref160.eval()
    model.eval()
    x = make_inputs(2, 3, 160, seed=2)
    _assert_report(compare_models(ref160, model, x, family="convit", name="convit_tiny@160", per_block=False))


def test_original_release_layout_converts(tmp_path):
    """facebookresearch/convit's own training checkpoints: DeiT's ``main.py`` layout.

    ``{'model': state_dict, 'optimizer': ..., 'lr_scheduler': ..., 'epoch': ..., 'model_ema': ..., 'scaler': ...,
    'args': argparse.Namespace}`` with timm's key names (the repo was built on timm; timm's convit.py needs no
    ``checkpoint_filter_fn``). The weights in ``model`` (default) and in ``model_ema`` (``use_ema``) must give the
    same outputs as their timm twins; optimizer state and args are ignored, never unpickled as arbitrary objects.
    """
    import argparse

    from converters.readers import read_checkpoint
    from volo_jax.hub import load_torch_state_dict

    torch.manual_seed(0)
    ref = randomize_timm_model(timm.create_model("convit_tiny"), seed=5)
    ema = randomize_timm_model(timm.create_model("convit_tiny"), seed=6)
    opt = torch.optim.AdamW(ref.parameters(), lr=5e-4)
    ref(torch.randn(1, 3, 224, 224)).sum().backward()
    opt.step()  # the optimizer state now holds exp_avg/exp_avg_sq tensors for every parameter
    ckpt = {"model": ref.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": {"t_initial": 300,
            "base_values": [5e-4]}, "epoch": 299, "model_ema": ema.state_dict(), "scaler": {"scale": 65536.0},
            "args": argparse.Namespace(model="convit_tiny", lr=5e-4, epochs=300)}
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    x = make_inputs(2, 3, 224, seed=4)
    model = volo_jax.create_model("convit_tiny", pretrained=str(path))
    model.eval()
    _assert_report(compare_models(ref.eval(), model, x, family="convit", name="convit original", per_block=False))
    load_torch_state_dict(model, read_checkpoint(path, use_ema=True), model_name="convit_tiny")
    _assert_report(compare_models(ema, model, x, family="convit", name="convit original ema", per_block=False))


@pytest.mark.parametrize("name", NAMES)
def test_convit_builds_with_timm_parameter_count(name):
    """Abstract build: parameter count, width and feature_info equal timm's; rel_indices is in no checkpoint."""
    model = nnx.eval_shape(lambda: volo_jax.create_model(name))
    ours = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    with torch.device("meta"):
        ref = timm.create_model(name)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert not any("rel_indices" in k for k in ref.state_dict())  # non-persistent buffer
    assert model.num_features == ref.num_features and model.img_size == (224, 224)
    assert model.feature_info == ref.feature_info


def test_rel_indices_match_timm():
    """Our trace-time relative positions are timm's get_rel_indices, for several grids."""
    gpsa = timm.models.convit.GPSA(16, num_heads=4)
    for n in (4, 100, 196):
        np.testing.assert_array_equal(convit.get_rel_indices(n), gpsa.get_rel_indices(n).numpy())


def test_gpsa_local_init_matches_timm():
    """timm's local_init (v = identity, pos_proj peaked at the kernel offsets) for a 3x3 set of heads."""
    ref = timm.models.convit.GPSA(36, num_heads=9, locality_strength=1.5)
    ref.local_init()
    ours = convit.GPSA(36, num_heads=9, locality_strength=1.5, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(ours.pos_proj.kernel[...]).T, ref.pos_proj.weight.detach().numpy())
    np.testing.assert_array_equal(np.asarray(ours.v.kernel[...]), np.eye(36, dtype=np.float32))


def test_randomized_gates_mix_content_and_position():
    """The randomized gates are not saturated, and the comparison sees them: a flipped gate is named by block.

    randomize_timm_model draws 1-D tensors from U(0.5, 1.5), so sigmoid(gate) is in (0.62, 0.82): every GPSA head
    mixes content and positional attention. Negating one block's gates (sigmoid -> 1 - sigmoid) must fail there.
    """
    from converters.parity import build_pair

    ref, model, family = build_pair("convit_tiny", seed=1)
    gates = torch.cat([b.attn.gating_param.detach() for b in ref.blocks if b.use_gpsa]).sigmoid()
    assert len(gates) == 10 * 4
    assert 0.1 < float(gates.min()) and float(gates.max()) < 0.9
    model.blocks[3].attn.gating_param[...] = -model.blocks[3].attn.gating_param[...]
    report = compare_models(ref, model, make_inputs(2, 3, 224, seed=4), family=family, name="convit_tiny")
    assert not report.ok and report.first_divergent_block == "blocks.3"


def test_convit_registry_and_pretrained_cfgs_match_timm():
    assert volo_jax.list_models("convit*") == sorted(NAMES) == sorted(timm.list_models("convit*"))
    assert volo_jax.list_models("convit*", pretrained=True) == sorted(timm.list_models("convit*", pretrained=True))
    for name in volo_jax.list_models("convit*", pretrained=True):
        ours = volo_jax.get_pretrained_cfg(name)
        theirs = timm.models.get_pretrained_cfg(name).to_dict()
        for key in ("input_size", "mean", "std"):
            assert tuple(ours[key]) == tuple(theirs[key]), (name, key)
        for key in ("url", "crop_pct", "interpolation", "num_classes", "first_conv", "classifier", "fixed_input_size",
                    "license", "pool_size"):
            assert ours[key] == theirs[key], (name, key)
        assert ours["hf_hub_id"] == theirs["hf_hub_id"] == f"timm/{name}"


def test_convit_forward_intermediates_indices_and_norm():
    """``indices`` (int / list with negatives) and ``norm=True`` like timm's; maps are NHWC, timm's NCHW."""
    from converters.parity import DEFAULT_TOL, build_pair

    ref, model, _ = build_pair("convit_tiny", seed=6)
    x = make_inputs(2, 3, 224, seed=6)
    for indices in (2, [0, 9, -1]):
        with torch.no_grad():
            final_t, maps_t = ref.forward_intermediates(torch.from_numpy(x), indices=indices, norm=True)
        final_j, maps_j = model.forward_intermediates(x.transpose(0, 2, 3, 1), indices=indices, norm=True)
        assert len(maps_j) == len(maps_t)
        pairs = [(final_j, final_t.numpy())]
        pairs += [(a, b.numpy().transpose(0, 2, 3, 1)) for a, b in zip(maps_j, maps_t, strict=True)]
        for ours, theirs in pairs:
            assert np.abs(np.asarray(ours) - theirs).max() <= DEFAULT_TOL * max(1.0, np.abs(theirs).max())


def test_convit_trains_with_drop_path():
    """Training mode with stochastic depth and dropout runs under nnx.jit and gives finite logits."""
    model = volo_jax.create_model("convit_tiny", drop_path_rate=0.1, drop_rate=0.1, rngs=1)
    logits = nnx.jit(lambda m, x: m(x))(model, np.asarray(make_inputs(2, 3, 224).transpose(0, 2, 3, 1)))
    assert logits.shape == (2, 1000) and bool(np.isfinite(np.asarray(logits)).all())
