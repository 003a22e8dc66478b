"""Parity is the specification: timm with every tensor randomized -> file -> create_model(pretrained=file) == timm.

For every VOLO variant the randomized timm weights are written as ``.safetensors``, ``.pth`` (plain state dict) and
``.pth.tar`` (``{'state_dict': ...}`` like the sail-sg release files); each loads (``create_model``, then its
``load_pretrained`` into the same model set to NaN) to the same state, and the model's logits, pre-logits, features
and every stage output equal timm's within ``max|delta| <= 1e-4 * max(1, max|ref|)`` in fp32, top-1 identical; every
block is also compared on timm's own input so that a failure names the layer. The reference logits must vary across
the batch, or the check would test only the head.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

import volo_jax  # noqa: E402
from converters.parity import (  # noqa: E402
    DEFAULT_TOL,
    compare_models,
    make_inputs,
    randomize_timm_model,
    save_torch_checkpoint,
    saved_checkpoint_parity,
    timm_state_dict_numpy,
)

SMALL = ["volo_d1_224"]
LARGE = ["volo_d1_384", "volo_d2_224", "volo_d2_384", "volo_d3_224", "volo_d3_448", "volo_d4_224", "volo_d4_448",
         "volo_d5_224", "volo_d5_448", "volo_d5_512"]


def _assert_report(report):
    assert report.batch_std > 0.05, "reference logits do not vary across the batch: the test would only check the head"
    assert report.ok, "\n" + report.format()


def _run_variant(name: str, tmp_path, batch: int, formats=(".safetensors",), **kw):
    report = saved_checkpoint_parity(name, tmp_path, batch=batch, formats=formats, **kw)
    _assert_report(report)
    return report


@pytest.mark.parametrize("name", SMALL)
def test_volo_parity_all_formats(name, tmp_path):
    report = _run_variant(name, tmp_path, batch=3, formats=(".safetensors", ".pth", ".pth.tar"))
    # per-block coverage: stem, every network block, both class-attention blocks and the final norm
    assert len(report.blocks) == 1 + 4 + 1 + 4 + 8 + 2 + 2 + 1


@pytest.mark.slow
@pytest.mark.parametrize("name", LARGE)
def test_volo_parity_large_variants(name, tmp_path):
    # batch 2 even for the largest: with one image the check that logits vary across the batch is impossible
    _run_variant(name, tmp_path, batch=2, formats=(".safetensors", ".pth", ".pth.tar"))


def test_volo_parity_other_img_size_and_embeddings(tmp_path):
    """A model built at a non-default size, and the embedding model (num_classes=0), match timm's."""
    _run_variant("volo_d1_224", tmp_path, batch=2, img_size=160)
    report = _run_variant("volo_d1_224", tmp_path, batch=2, num_classes=0)
    assert report.outputs[0].name == "logits"


@pytest.mark.parametrize("name", ["volo_d1_224", "poolformer_s12", "poolformerv2_s12", "convit_tiny",
                                  "ese_vovnet19b_dw"])
def test_other_num_classes_leaves_head_out(name, tmp_path, caplog):
    """A 1000-class checkpoint into a 10-class model: every tensor but the classifier(s) converts, the user is told,
    and the embeddings equal those of timm's embedding model (``num_classes=0``) with the same weights."""
    from converters.torch_to_flax import model_key_map

    torch.manual_seed(0)
    ref = randomize_timm_model(timm.create_model(name), seed=2)
    path = save_torch_checkpoint(ref, tmp_path / "w.safetensors")
    with caplog.at_level("INFO"):
        model = volo_jax.create_model(name, pretrained=str(path), num_classes=10)
    classifiers = model.pretrained_cfg["classifier"]
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    assert any(c in caplog.text for c in classifiers) and "left out" in caplog.text, caplog.text
    head_keys = [k for k in model_key_map(model) if k.startswith(tuple(c + "." for c in classifiers))]
    assert head_keys and all(model_key_map(model)[k].torch_shape[0] == 10 for k in head_keys)
    model.eval()
    ref_emb = timm.create_model(name, num_classes=0)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(tuple(c + "." for c in classifiers))}
    ref_emb.load_state_dict(sd, strict=True)
    ref_emb.eval()
    size = model.pretrained_cfg["input_size"][1]
    x = make_inputs(2, 3, size, seed=1)
    with torch.no_grad():
        pre_ref = ref_emb(torch.from_numpy(x)).numpy()
    assert pre_ref.std(axis=0).mean() > 0.05
    pre = np.asarray(model.forward_head(model.forward_features(x.transpose(0, 2, 3, 1)), pre_logits=True))
    assert np.abs(pre - pre_ref).max() <= DEFAULT_TOL * max(1.0, np.abs(pre_ref).max())
    assert np.asarray(model(x.transpose(0, 2, 3, 1))).shape == (2, 10)


def test_volo_pos_embed_resampled_like_timm(tmp_path):
    """A 224 checkpoint into a 288 model: pos_embed is resampled exactly as timm's resample_abs_pos_embed_nhwc."""
    from timm.layers import resample_abs_pos_embed_nhwc

    torch.manual_seed(0)
    ref224 = randomize_timm_model(timm.create_model("volo_d1_224"), seed=3)
    path = save_torch_checkpoint(ref224, tmp_path / "w.pth.tar")
    model = volo_jax.create_model("volo_d1_224", pretrained=str(path), img_size=288)
    sd = dict(ref224.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed_nhwc(sd["pos_embed"], [18, 18])
    ref288 = timm.create_model("volo_d1_224", img_size=288)
    ref288.load_state_dict(sd, strict=True)
    ref288.eval()
    model.eval()
    x = make_inputs(2, 3, 288, seed=2)
    _assert_report(compare_models(ref288, model, x, family="volo", name="volo_d1_224@288", per_block=False))


def test_volo_forward_train_matches_timm_with_mix_token(monkeypatch):
    """Dense training output (class logits, per-token aux logits, MixToken box) against timm's forward_train.

    Training mode (BatchNorm on batch statistics) with a fixed box: timm draws it with torch's RNG, so the test
    patches timm's rand_bbox and passes the same box to ours. timm 1.0 returns the pooled class token without the
    head (the original sail-sg code applies it); we apply it, so timm's side gets ``head`` applied here.
    """
    import timm.models.volo as tvolo

    torch.manual_seed(0)
    ref = randomize_timm_model(timm.create_model("volo_d1_224", use_mix_token=True), seed=4)
    model = volo_jax.create_model("volo_d1_224", use_mix_token=True)
    from converters.torch_to_flax import convert_state_dict

    nnx.update(model, convert_state_dict(timm_state_dict_numpy(ref), model))
    box = (3, 5, 10, 12)
    monkeypatch.setattr(tvolo, "rand_bbox", lambda size, lam, scale=1: box)
    x = make_inputs(2, 3, 224, seed=3)
    ref.train()
    with torch.no_grad():
        cls_t, aux_t, box_t = ref.forward_train(torch.from_numpy(x))
        cls_t = ref.head(cls_t)
    model.train()
    cls_j, aux_j, box_j = nnx.jit(lambda m, x: m.forward_train(x, mix_token=True, bbox=np.array(box)))(
        model, x.transpose(0, 2, 3, 1))
    assert tuple(np.asarray(box_j)) == tuple(box_t) == box
    for ours, theirs in ((cls_j, cls_t.numpy()), (aux_j, aux_t.numpy())):
        assert np.asarray(theirs).std(axis=0).mean() > 0.05
        assert np.abs(np.asarray(ours) - theirs).max() <= DEFAULT_TOL * max(1.0, np.abs(theirs).max())


def test_parity_report_names_the_first_divergent_block():
    """Check the check: a bug injected into one block is caught, and the report points at that block."""
    from converters.parity import build_pair

    ref, model, family = build_pair("volo_d1_224", seed=5)
    model.network[2][3].mlp.fc1.bias[...] += 1e-2
    report = compare_models(ref, model, make_inputs(2, 3, 224, seed=5), family=family, name="volo_d1_224")
    assert not report.ok
    assert report.first_divergent_block == "network.2.3"
    assert [e.ok for e in report.outputs[:2]] == [False, False]  # logits and pre-logits moved too
    assert "FIRST DIVERGENT BLOCK: network.2.3" in report.format()


@pytest.mark.usefixtures("jax_cache_for_subprocesses")
def test_parity_cli_exit_status(tmp_path):
    """The user-facing tool: exit 0 on parity, 1 above tolerance (here an impossible tolerance of 1e-12)."""
    import subprocess
    import sys

    ckpt = tmp_path / "w.pth.tar"
    cmd = [sys.executable, "-m", "converters.parity", "--model", "volo_d1_224"]
    out = subprocess.run(cmd + ["--save-random", str(ckpt), "--no-compare"], capture_output=True, text=True)
    assert out.returncode == 0 and ckpt.exists(), out.stderr
    ok = subprocess.run(cmd + ["--checkpoint", str(ckpt), "--no-per-block"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "logits" in ok.stdout
    bad = subprocess.run(cmd + ["--checkpoint", str(ckpt), "--no-per-block", "--tol", "1e-12"], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and "FAIL" in bad.stdout
