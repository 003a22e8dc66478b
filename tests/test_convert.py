"""Checkpoint conversion, file readers, our parameter format, pretrained resolution and the conversion CLI.

Most tests use a small toy model defined twice, in torch and in Flax NNX, with the same attribute names (Linear, Conv
incl. grouped/depthwise and bias-less, LayerNorm, GroupNorm, BatchNorm with running stats, plain Params, nested
lists), so they exercise every conversion rule in a second. Tests against the real registry skip while
``volo_jax.create_model`` is not importable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters import (
    CheckpointError,
    ConversionError,
    convert_state_dict,
    convert_with_report,
    model_key_map,
    read_checkpoint,
)
from converters.rules import RENAME_RULES, apply_rules, family_of
from converters.torch_to_flax import resample_abs_pos_embed_nhwc
from volo_jax import checkpoint as ckpt
from volo_jax.hub import load_pretrained

torch = pytest.importorskip("torch")
nn = torch.nn

REPO = Path(__file__).resolve().parents[1]
C, GRID = 8, 4

try:
    from volo_jax import create_model

    HAVE_CREATE_MODEL = True
except ImportError:  # the registry is being written
    create_model = None
    HAVE_CREATE_MODEL = False
needs_registry = pytest.mark.skipif(not HAVE_CREATE_MODEL, reason="volo_jax.create_model is not importable yet")


# ----------------------------------------------------------------------------------------------- toy models
class TorchBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x + self.gamma * self.fc(self.norm(x))


class TorchToy(nn.Module):
    """Mirrors every naming rule: Sequential/ModuleList indices, grouped convs, norms, plain Parameters."""

    def __init__(self, num_classes: int = 5, grid: int = GRID, pos_3d: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
        self.dw = nn.Conv2d(C, C, 3, padding=1, groups=C)  # depthwise: weight (C, 1, 3, 3)
        self.gconv = nn.Conv2d(C, C, 1, groups=2, bias=False)  # grouped, no bias: weight (C, C/2, 1, 1)
        self.gn = nn.GroupNorm(2, C)
        self.blocks = nn.ModuleList([nn.ModuleList([TorchBlock(C)]), nn.ModuleList([TorchBlock(C), TorchBlock(C)])])
        shape = (1, grid * grid, C) if pos_3d else (1, grid, grid, C)
        self.pos_embed = nn.Parameter(torch.zeros(shape))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.head = nn.Linear(C, num_classes)

    def forward(self, x):  # NCHW
        x = self.gn(self.gconv(self.dw(self.stem(x))))
        b, c, h, w = x.shape
        x = x.permute(0, 2, 3, 1) + self.pos_embed.reshape(1, h, w, c)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, c)], dim=1)
        for stage in self.blocks:
            for blk in stage:
                x = blk(x)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


class Block(nnx.Module):
    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(c, epsilon=1e-5, rngs=rngs)  # torch's default eps
        self.fc = nnx.Linear(c, c, rngs=rngs)
        self.gamma = nnx.Param(jnp.ones((c,)))

    def __call__(self, x):
        return x + self.gamma[...] * self.fc(self.norm(x))


class Toy(nnx.Module):
    def __init__(self, num_classes: int = 5, grid: int = GRID, pos_3d: bool = False, param_dtype=jnp.float32, *,
                 rngs: nnx.Rngs):
        dd = dict(param_dtype=param_dtype, rngs=rngs)
        # The ReLU (index 2 in torch) has no parameters, so the list stops at the BatchNorm.
        self.stem = nnx.List([nnx.Conv(3, C, (3, 3), padding=1, **dd),
                              nnx.BatchNorm(C, use_running_average=True, momentum=0.9, **dd)])
        self.dw = nnx.Conv(C, C, (3, 3), padding=1, feature_group_count=C, **dd)
        self.gconv = nnx.Conv(C, C, (1, 1), padding=0, feature_group_count=2, use_bias=False, **dd)
        self.gn = nnx.GroupNorm(C, num_groups=2, epsilon=1e-5, **dd)
        self.blocks = nnx.List([nnx.List([Block(C, rngs=rngs)]), nnx.List([Block(C, rngs=rngs), Block(C, rngs=rngs)])])
        shape = (1, grid * grid, C) if pos_3d else (1, grid, grid, C)
        self.pos_embed = nnx.Param(jnp.zeros(shape, param_dtype))
        self.cls_token = nnx.Param(jnp.zeros((1, 1, C), param_dtype))
        self.num_classes = num_classes
        self.head = nnx.Linear(C, num_classes, **dd) if num_classes else None
        self.pretrained_cfg = dict(architecture="toy", tag="t", hf_hub_id="timm/toy.t", num_classes=5,
                                   input_size=(3, grid, grid), classifier=("head",), first_conv="stem.0")

    def __call__(self, x):  # NHWC
        x = self.gn(self.gconv(self.dw(jax.nn.relu(self.stem[1](self.stem[0](x))))))
        b, h, w, c = x.shape
        x = x + self.pos_embed[...].reshape(1, h, w, c)
        x = jnp.concatenate([jnp.broadcast_to(self.cls_token[...], (b, 1, c)), x.reshape(b, h * w, c)], axis=1)
        for stage in self.blocks:
            for blk in stage:
                x = blk(x)
        return self.head(x[:, 0] + x[:, 1:].mean(1))


def random_torch_toy(seed: int = 0, **kwargs) -> TorchToy:
    """A TorchToy with every tensor random (running_var positive) so a wrong mapping can't hide."""
    torch.manual_seed(seed)
    model = TorchToy(**kwargs).eval()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if name.endswith("running_var") else torch.randn_like(t) * 0.5)
    return model


def numpy_sd(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def abstract_toy(**kwargs) -> Toy:
    return nnx.eval_shape(lambda: Toy(rngs=nnx.Rngs(0), **kwargs))


def images(n: int = 2, size: int = GRID, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def torch_forward(model: nn.Module, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)).numpy()


# ----------------------------------------------------------------------------------------------- conversion
def test_key_map_mirrors_torch_state_dict_keys():
    key_map = model_key_map(abstract_toy())
    torch_keys = {k for k in TorchToy().state_dict() if not k.endswith("num_batches_tracked")}
    assert set(key_map) == torch_keys
    assert key_map["blocks.1.0.fc.weight"].path == ("blocks", 1, 0, "fc", "kernel")
    assert key_map["blocks.1.0.fc.weight"].transform == "linear"
    assert key_map["dw.weight"].transform == "conv" and key_map["dw.weight"].torch_shape == (C, 1, 3, 3)
    assert key_map["gconv.weight"].torch_shape == (C, C // 2, 1, 1)
    assert key_map["stem.1.running_var"].path == ("stem", 1, "var")
    assert key_map["stem.1.running_var"].variable_type is nnx.BatchStat
    assert key_map["gn.weight"].path == ("gn", "scale")
    assert key_map["pos_embed"].transform == "identity"
    x = np.arange(np.prod((C, 4, 3, 2)), dtype=np.float32).reshape(C, 4, 3, 2)
    info = key_map["stem.0.weight"]
    np.testing.assert_array_equal(info.to_torch(info.to_flax(x)), x)
    assert info.to_flax(x).shape == (3, 2, 4, C)


def test_converted_toy_matches_torch_forward():
    tmodel = random_torch_toy()
    sd = numpy_sd(tmodel)
    state, report = convert_with_report(sd, abstract_toy())
    model = Toy(rngs=nnx.Rngs(1))
    nnx.update(model, state)
    assert isinstance(model.dw.kernel.get_value(), jax.Array), "values are placed on device, not numpy"
    x = images()
    ref = torch_forward(tmodel, x)
    assert np.std(ref, axis=0).mean() > 1e-2, "reference output must vary across the batch"
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)
    assert report.skipped == ["stem.1.num_batches_tracked"]
    assert len(report.converted) == len(sd) - 1
    assert report.num_params == sum(v.size for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    np.testing.assert_array_equal(np.asarray(model.stem[1].mean[...]), sd["stem.1.running_mean"])


def test_values_take_the_target_dtype():
    abstract = abstract_toy(param_dtype=jnp.bfloat16)
    state, report = convert_with_report(numpy_sd(random_torch_toy()), abstract)
    got = {path: v.get_value().dtype for path, v in nnx.to_flat_state(state)}
    want = {path: v.get_value().dtype for path, v in nnx.to_flat_state(nnx.state(abstract, (nnx.Param, nnx.BatchStat)))}
    assert got == want
    assert got[("dw", "kernel")] == jnp.bfloat16 and got[("stem", 1, "mean")] == jnp.float32  # flax keeps stats f32
    assert report.num_bytes == sum(np.dtype(d).itemsize * v.get_value().size
                                   for (_, v), d in zip(nnx.to_flat_state(state), got.values(), strict=True))


def test_every_problem_in_one_error():
    sd = numpy_sd(random_torch_toy())
    del sd["blocks.1.0.fc.bias"]
    sd["blocks.1.0.extra.weight"] = np.zeros((2, 2), np.float32)
    sd["dw.weight"] = np.zeros((C, 2, 3, 3), np.float32)
    sd["gn.weight"] = np.zeros((C + 1,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, abstract_toy())
    err, msg = info.value, str(info.value)
    assert "1 missing, 1 unexpected, 2 shape mismatches" in msg
    assert "blocks.1.0.fc.bias: (8,) -> blocks.1.0.fc.bias" in msg
    assert "blocks.1.0.extra.weight: (2, 2)" in msg
    assert "dw.weight: (8, 2, 3, 3) != (8, 1, 3, 3) -> dw.kernel" in msg
    assert "gn.weight: (9,) != (8,) -> gn.scale" in msg
    assert msg.index("dw.weight") < msg.index("gn.weight"), "each group is sorted"
    assert [m[0] for m in err.missing] == ["blocks.1.0.fc.bias"]
    assert [u[0] for u in err.unexpected] == ["blocks.1.0.extra.weight"]
    assert [m[0] for m in err.mismatched] == ["dw.weight", "gn.weight"]
    assert "another architecture" not in msg


def test_other_architecture_is_diagnosed():
    sd = {f"features.{i}.conv.weight": np.zeros((4, 4, 3, 3), np.float32) for i in range(30)}
    sd["head.weight"] = np.zeros((5, C), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(sd, abstract_toy())
    msg = str(info.value)
    assert "probably for another architecture" in msg
    assert "example checkpoint keys: features.0.conv.weight" in msg
    assert "example expected keys:   blocks.0.0.fc.bias" in msg
    assert "and 10 more" in msg  # 30 unexpected keys, 20 shown
    assert len(info.value.unexpected) == 30


def test_ignore_prefixes_drops_head_from_both_sides():
    sd = numpy_sd(random_torch_toy(num_classes=5))
    with pytest.raises(ConversionError, match="Hint: a classifier of another size"):
        convert_state_dict(sd, abstract_toy(num_classes=3))
    model = Toy(num_classes=3, rngs=nnx.Rngs(0))
    head_before = np.asarray(model.head.kernel[...]).copy()
    state, report = convert_with_report(sd, model, ignore_prefixes=("head.",))
    assert sorted(report.ignored) == ["head.bias", "head.weight"]
    assert "head" not in state
    nnx.update(model, state)
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head_before)
    np.testing.assert_array_equal(np.asarray(model.dw.kernel[...]), sd["dw.weight"].transpose(2, 3, 1, 0))


@pytest.mark.parametrize(("old", "new"), [((14, 14), (24, 24)), ((14, 14), (9, 9)), ((7, 7), (10, 13)),
                                          ((24, 24), (14, 14)), ((5, 3), (2, 17))])
def test_resample_pos_embed_matches_timm(old, new):
    from timm.layers import resample_abs_pos_embed_nhwc as timm_resample

    posemb = np.random.default_rng(0).standard_normal((1, *old, 6)).astype(np.float32)
    expected = timm_resample(torch.from_numpy(posemb), list(new)).numpy()
    out = resample_abs_pos_embed_nhwc(posemb, new)
    assert out.shape == expected.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos_3d", [False, True], ids=["volo_nhwc", "convit_tokens"])
def test_conversion_resamples_pos_embed_like_timm(pos_3d, caplog):
    from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

    tmodel = random_torch_toy(grid=GRID, pos_3d=pos_3d)
    sd = numpy_sd(tmodel)
    with caplog.at_level(logging.INFO, logger="converters.torch_to_flax"):
        state, report = convert_with_report(sd, abstract_toy(grid=6, pos_3d=pos_3d))
    assert "Resampled position embedding pos_embed from grid (4, 4) to (6, 6)" in caplog.text
    if pos_3d:
        expected = resample_abs_pos_embed(tmodel.pos_embed.data, [6, 6], num_prefix_tokens=0)
    else:
        expected = resample_abs_pos_embed_nhwc(tmodel.pos_embed.data, [6, 6])
    np.testing.assert_allclose(np.asarray(state["pos_embed"].get_value()), expected.numpy(), atol=1e-5)
    assert report.resized == {"pos_embed": (tuple(sd["pos_embed"].shape), tuple(expected.shape))}
    with pytest.raises(ConversionError, match="pos_embed"):
        convert_state_dict(sd, abstract_toy(grid=6, pos_3d=pos_3d), resample_pos_embed=False)


# ------------------------------------------------------------------------------------------------------ rules
def test_volo_needs_no_renames():
    import timm.models.volo as timm_volo

    # timm loads sail-sg's release files without a filter, so their keys are already timm's.
    assert not hasattr(timm_volo, "checkpoint_filter_fn")
    assert RENAME_RULES["volo"] == []
    sd = {"module.network.0.0.attn.v.weight": 1, "_orig_mod.module.head.bias": 2, "pos_embed": 3}
    assert apply_rules(sd, "volo") == {"network.0.0.attn.v.weight": 1, "head.bias": 2, "pos_embed": 3}
    assert family_of("volo_d1_224.sail_in1k") == "volo"
    assert family_of("timm/poolformerv2_s12") == "poolformer"
    assert family_of("ese_vovnet19b_dw") == "vovnet"
    assert family_of("resnet50") is None


def _poolformer_original_keys(timm_keys: list[str], v1: bool) -> dict[str, str]:
    """Original-repo key -> timm key, written from the repos' layouts (the inverse of timm's filter)."""
    import re

    out = {}
    for k in timm_keys:
        o = k
        if v1:
            o = re.sub(r"^stem\.conv\.", "patch_embed.proj.", o)
            o = re.sub(r"^stages\.(\d)\.downsample\.conv\.", lambda m: f"network.{2 * int(m[1]) - 1}.proj.", o)
            o = re.sub(r"^stages\.(\d)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", o)
            o = re.sub(r"\.layer_scale(\d)\.scale$", r".layer_scale_\1", o)
        else:
            o = re.sub(r"^stem\.conv\.", "downsample_layers.0.conv.", o)
            o = re.sub(r"^stem\.norm\.", "downsample_layers.0.post_norm.", o)
            o = re.sub(r"^stages\.(\d)\.downsample\.norm\.", r"downsample_layers.\1.pre_norm.", o)
            o = re.sub(r"^stages\.(\d)\.downsample\.conv\.", r"downsample_layers.\1.conv.", o)
            o = re.sub(r"^stages\.(\d)\.blocks\.", r"stages.\1.", o)
        o = re.sub(r"^head\.norm\.", "norm.", o)
        o = re.sub(r"^head\.fc\.", "head.", o)
        out[o] = k
    return out


@pytest.mark.parametrize("name", ["poolformer_s12", "poolformerv2_s12"])
def test_poolformer_rules_match_timm_filter(name):
    import timm
    from timm.models.metaformer import checkpoint_filter_fn

    tmodel = timm.create_model(name)
    timm_sd = tmodel.state_dict()
    original = _poolformer_original_keys(list(timm_sd), v1=name == "poolformer_s12")
    original_sd = {o: timm_sd[k] for o, k in original.items()}
    assert set(checkpoint_filter_fn(original_sd, tmodel)) == set(timm_sd)  # our inverse is what timm expects
    renamed = apply_rules(original_sd, family_of(name))
    assert set(renamed) == set(timm_sd)
    assert all(renamed[k] is timm_sd[k] for k in timm_sd)
    assert apply_rules(timm_sd, "poolformer").keys() == timm_sd.keys(), "rules are a no-op on timm's keys"


# ---------------------------------------------------------------------------------------------------- readers
def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_read_safetensors_without_torch_semantics(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(2, 3), "b": torch.randn(4).to(torch.bfloat16), "c": torch.ones(2).half()},
              tmp_path / "w.safetensors")
    sd = read_checkpoint(tmp_path / "w.safetensors")
    assert sd["a"].dtype == np.float32 and sd["a"].shape == (2, 3)
    assert sd["b"].dtype == np.float32, "bfloat16 is widened to float32"
    assert sd["c"].dtype == np.float16


@pytest.mark.parametrize(
    ("filename", "container", "use_ema", "want"),
    [
        ("plain.pth", None, False, "w"),
        ("train.pth.tar", {"state_dict": "w", "state_dict_ema": "ema", "epoch": 3}, False, "w"),
        ("train_ema.pth.tar", {"state_dict": "w", "state_dict_ema": "ema", "epoch": 3}, True, "ema"),
        ("deit.pth", {"model": "w", "model_ema": "ema"}, True, "ema"),
        ("deit_plain.pt", {"model": "w", "optimizer": {"lr": 0.1}}, False, "w"),
        ("no_ema.bin", {"state_dict": "w"}, True, "w"),
    ],
)
def test_read_torch_containers(tmp_path, filename, container, use_ema, want):
    weights = {"w": {"module.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)},
               "ema": {"module.fc.weight": torch.full((2, 2), 7.0), "module.fc.bias": torch.zeros(2)}}
    obj = weights["w"] if container is None else {k: weights.get(v, v) if isinstance(v, str) else v
                                                  for k, v in container.items()}
    if container is not None:
        obj["args"] = argparse.Namespace(lr=0.1)  # timm training checkpoints carry their args
    sd = read_checkpoint(_save(tmp_path / filename, obj), use_ema=use_ema)
    assert sorted(sd) == ["fc.bias", "fc.weight"], "module. prefixes are stripped"
    assert isinstance(sd["fc.weight"], np.ndarray)
    assert sd["fc.weight"][0, 0] == (7.0 if want == "ema" else 1.0)


def test_read_bfloat16_pth(tmp_path):
    sd = read_checkpoint(_save(tmp_path / "bf16.pth", {"x": torch.randn(3).to(torch.bfloat16)}))
    assert sd["x"].dtype == np.float32


def test_read_refuses_non_tensor_leaves(tmp_path):
    path = _save(tmp_path / "bad.pth", {"fc.weight": torch.ones(1), "note": "hello", "step": 3})
    with pytest.raises(CheckpointError, match=r"2 entries are not tensors: note \(str\), step \(int\)"):
        read_checkpoint(path)
    only_ema = _save(tmp_path / "only_ema.pth", {"state_dict_ema": {"w": torch.ones(1)}})
    with pytest.raises(CheckpointError, match="use_ema=True"):
        read_checkpoint(only_ema)
    assert list(read_checkpoint(only_ema, use_ema=True)) == ["w"]


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_read_truncated_file(tmp_path, ext):
    from safetensors.torch import save_file

    path = tmp_path / f"full{ext}"
    sd = {"w": torch.randn(64, 64)}
    torch.save(sd, path) if ext == ".pth" else save_file(sd, path)
    data = path.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=str(cut).replace(".", r"\.")) as info:
        read_checkpoint(cut)
    assert info.value.__cause__ is not None, "the underlying reason is chained"


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
def test_read_refuses_malicious_pickle(tmp_path, fmt):
    import pickle

    marker = tmp_path / "pwned"
    path, obj = tmp_path / "evil.pth", {"w": torch.ones(1), "payload": _Evil(marker)}
    if fmt == "raw_pickle":
        path.write_bytes(pickle.dumps({"payload": _Evil(marker)}, protocol=2))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    with pytest.raises(CheckpointError, match="Refusing to unpickle arbitrary objects") as info:
        read_checkpoint(path)
    assert "posix.system" in str(info.value) or "os.system" in str(info.value)
    assert not marker.exists(), "the payload must not have run"


def test_read_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"expected one of \.safetensors, \.pth\.tar, \.pth, \.pt, \.bin"):
        read_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "nope.pth")


def test_core_imports_do_not_import_torch(tmp_path):
    import safetensors.numpy

    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    code = ("import sys, converters, volo_jax.hub, volo_jax.checkpoint\n"
            f"converters.read_checkpoint({str(tmp_path / 'a.safetensors')!r})\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


# --------------------------------------------------------------------------------------------- params format
def _converted_toy(seed: int = 0, **kwargs) -> Toy:
    model = Toy(rngs=nnx.Rngs(0), **kwargs)
    state = convert_state_dict(numpy_sd(random_torch_toy(seed)), model)
    nnx.update(model, state)
    return model


def test_save_load_round_trip(tmp_path):
    model = _converted_toy()
    out = ckpt.save_params(tmp_path / "toy", model, model_name="toy.t", extra_meta={"source": "unit test"})
    assert ckpt.is_converted_dir(out) and not ckpt.is_converted_dir(tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["model_name"] == "toy.t" and config["num_classes"] == 5 and config["meta"] == {"source": "unit test"}
    assert config["pretrained_cfg"]["classifier"] == ["head"] and config["img_size"] == [GRID, GRID]
    assert len(config["weights_sha256"]) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"], "no temporary directories left"

    from safetensors.numpy import load_file

    keys = set(load_file(str(out / "model.safetensors")))
    assert {"blocks.1.0.fc.kernel", "stem.1.mean", "stem.1.var", "pos_embed"} <= keys

    fresh = Toy(rngs=nnx.Rngs(42))
    ckpt.load_params(out, fresh, model_name="toy")
    x = jnp.asarray(images())
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))
    assert isinstance(fresh.dw.kernel.get_value(), jax.Array)


def test_load_params_is_strict(tmp_path):
    out = ckpt.save_params(tmp_path / "toy", _converted_toy(), model_name="toy")
    with pytest.raises(ConversionError) as info:
        ckpt.load_params(out, Toy(num_classes=3, rngs=nnx.Rngs(0)), model_name="other")
    msg = str(info.value)
    assert "head.kernel: (8, 5) != (8, 3)" in msg and "head.bias: (5,) != (3,)" in msg
    assert "converted for 'toy', not 'other'" in msg
    ckpt.load_params(out, Toy(num_classes=3, rngs=nnx.Rngs(0)), ignore_prefixes=("head.",))
    headless = Toy(num_classes=0, rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"2 unexpected"):
        ckpt.load_params(out, headless)
    bigger = Toy(grid=6, rngs=nnx.Rngs(0))
    ckpt.load_params(out, bigger)  # pos_embed resampled
    assert bigger.pos_embed.shape == (1, 6, 6, C)


def test_load_params_detects_corruption(tmp_path):
    out = ckpt.save_params(tmp_path / "toy", _converted_toy(), model_name="toy")
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ConversionError, match="sha256"):
        ckpt.load_params(out, Toy(rngs=nnx.Rngs(0)))


def test_save_refuses_existing_target_and_overwrites_atomically(tmp_path):
    target = tmp_path / "toy"
    ckpt.save_params(target, _converted_toy(seed=0), model_name="toy")
    with pytest.raises(FileExistsError, match="overwrite"):
        ckpt.save_params(target, _converted_toy(seed=1), model_name="toy")
    ckpt.save_params(target, _converted_toy(seed=1), model_name="toy", overwrite=True)
    loaded = Toy(rngs=nnx.Rngs(0))
    ckpt.load_params(target, loaded)
    np.testing.assert_array_equal(np.asarray(loaded.cls_token[...]), numpy_sd(random_torch_toy(1))["cls_token"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]

    foreign = tmp_path / "my_stuff"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a volo-jax converted directory"):
        ckpt.save_params(foreign, _converted_toy(), model_name="toy", overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_save_crash_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(safetensors.numpy, "save_file", crash)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_params(tmp_path / "toy", _converted_toy(), model_name="toy")
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temporary directory is left"


def test_overwrite_crash_keeps_previous_version(tmp_path, monkeypatch):
    target = tmp_path / "toy"
    ckpt.save_params(target, _converted_toy(seed=0), model_name="toy")
    before = (target / "model.safetensors").read_bytes()
    real_rename = os.rename
    calls = []

    def flaky_rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst) == target and ".tmp-" in Path(src).name:  # renaming the new version in fails
            raise OSError("crash (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_params(target, _converted_toy(seed=1), model_name="toy", overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    assert len(calls) == 3  # old aside, new in (fails), old back


def test_save_refuses_abstract_model(tmp_path):
    with pytest.raises(ValueError, match="abstract model"):
        ckpt.save_params(tmp_path / "toy", abstract_toy(), model_name="toy")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------------- hub
def _fake_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The on-disk layout huggingface_hub resolves offline: refs/main -> snapshots/<commit>/<file>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def _safetensors_bytes(sd: dict[str, np.ndarray], tmp_path: Path) -> bytes:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "tmp.safetensors"))
    return (tmp_path / "tmp.safetensors").read_bytes()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache in offline mode (huggingface_hub reads these constants at call time)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_load_pretrained_from_offline_hf_cache(offline_hub, tmp_path, filename):
    tmodel = random_torch_toy(3)
    sd = numpy_sd(tmodel)
    if filename == "model.safetensors":
        data = _safetensors_bytes(sd, tmp_path)
    else:  # a repo without safetensors: the fallback
        torch.save(tmodel.state_dict(), tmp_path / "w.bin")
        data = (tmp_path / "w.bin").read_bytes()
    _fake_hf_cache(offline_hub, "timm/toy.t", {filename: data})
    model = Toy(rngs=nnx.Rngs(0))
    load_pretrained(model, True, model_name="toy.t")
    x = images()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), torch_forward(tmodel, x), rtol=1e-5, atol=1e-5)


def test_load_pretrained_offline_without_cache_explains(offline_hub):
    with pytest.raises(ConversionError, match="huggingface-cli download timm/toy.t"):
        load_pretrained(Toy(rngs=nnx.Rngs(0)), True, model_name="toy.t")


def test_load_pretrained_new_head_is_left_out(offline_hub, tmp_path, caplog):
    sd = numpy_sd(random_torch_toy(3))
    _fake_hf_cache(offline_hub, "timm/toy.t", {"model.safetensors": _safetensors_bytes(sd, tmp_path)})
    model = Toy(num_classes=3, rngs=nnx.Rngs(0))
    head = np.asarray(model.head.kernel[...]).copy()
    with caplog.at_level(logging.WARNING):
        load_pretrained(model, True, model_name="toy.t")
    assert "Classifier left out" in caplog.text and "randomly initialised" in caplog.text
    np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head)
    np.testing.assert_array_equal(np.asarray(model.cls_token[...]), sd["cls_token"])
    headless = Toy(num_classes=0, rngs=nnx.Rngs(0))
    with caplog.at_level(logging.WARNING):
        load_pretrained(headless, True, model_name="toy.t")
    assert "absent (num_classes=0)" in caplog.text


def test_load_pretrained_from_paths(tmp_path):
    tmodel = random_torch_toy(4)
    sd = numpy_sd(tmodel)
    x = images()
    ref = torch_forward(tmodel, x)

    def check(pretrained) -> None:
        model = Toy(rngs=nnx.Rngs(0))
        load_pretrained(model, pretrained, model_name="toy")
        np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), ref, rtol=1e-5, atol=1e-5)

    # a training checkpoint file with DataParallel prefixes
    check(_save(tmp_path / "train.pth.tar", {"state_dict": {f"module.{k}": v for k, v in tmodel.state_dict().items()}}))
    # a timm / HF model directory
    hf_dir = tmp_path / "hf_dir"
    hf_dir.mkdir()
    (hf_dir / "model.safetensors").write_bytes(_safetensors_bytes(sd, tmp_path))
    (hf_dir / "config.json").write_text(json.dumps({"architecture": "toy", "num_classes": 5}))
    check(str(hf_dir))
    # a directory written by save_params
    check(ckpt.save_params(tmp_path / "converted", _converted_toy(4), model_name="toy"))
    with pytest.raises(FileNotFoundError):
        load_pretrained(Toy(rngs=nnx.Rngs(0)), tmp_path / "missing.pth", model_name="toy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="has no weights"):
        load_pretrained(Toy(rngs=nnx.Rngs(0)), tmp_path / "empty", model_name="toy")


# ---------------------------------------------------------------------------------------------------- CLI
def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "converters", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


def test_cli_help():
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--model", "--output", "--use-ema", "--num-classes", "--img-size", "--overwrite", "examples:"):
        assert flag in result.stdout


def test_cli_usage_error_exits_2():
    result = _cli("x.pth")
    assert result.returncode == 2 and "--model" in result.stderr


@needs_registry
def test_cli_failure_exits_2_and_leaves_no_output(tmp_path):
    bad = _save(tmp_path / "toy.pth", random_torch_toy().state_dict())
    result = _cli(str(bad), "--model", "volo_d1_224", "--output", str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "probably for another architecture" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.pth"]
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    result = _cli(str(tmp_path / "cut.safetensors"), "--model", "volo_d1_224", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "Cannot read safetensors file" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- real registry
@needs_registry
def test_volo_d1_key_map_matches_timm():
    import timm

    key_map = model_key_map(nnx.eval_shape(lambda: create_model("volo_d1_224")))
    timm_sd = timm.create_model("volo_d1_224").state_dict()
    assert set(key_map) == {k for k in timm_sd if not k.endswith("num_batches_tracked")}
    assert all(key_map[k].torch_shape == tuple(v.shape) for k, v in timm_sd.items() if k in key_map)


@needs_registry
@pytest.mark.slow
def test_cli_and_create_model_match_timm_volo_d1(tmp_path):
    """End to end: timm weights -> safetensors -> CLI -> create_model(pretrained=dir), and the HF-cache path."""
    import timm
    from safetensors.torch import save_file

    from converters.parity import randomize_timm_model

    tmodel = randomize_timm_model(timm.create_model("volo_d1_224"), seed=7)
    save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, tmp_path / "volo.safetensors")
    out = tmp_path / "volo_flax"
    result = _cli(str(tmp_path / "volo.safetensors"), "--model", "volo_d1_224", "--output", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "tensors converted: 257" in result.stdout and "26,632,424" in result.stdout
    assert _cli(str(tmp_path / "volo.safetensors"), "--model", "volo_d1_224", "--output", str(out)).returncode == 2

    model = create_model("volo_d1_224", pretrained=out)
    model.eval()
    x = images(2, 224)
    ref = torch_forward(tmodel, x)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(x))), ref, rtol=1e-4, atol=1e-4)

    # The same weights through pretrained=True, offline, from an HF cache built on disk (a fresh process, so the
    # environment variables are read the way users set them).
    cache = tmp_path / "hf_cache"
    _fake_hf_cache(cache, "timm/volo_d1_224.sail_in1k",
                   {"model.safetensors": (tmp_path / "volo.safetensors").read_bytes()})
    np.save(tmp_path / "ref.npy", ref)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import numpy as np, jax, jax.numpy as jnp, volo_jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')\n"
        "m = volo_jax.create_model('volo_d1_224', pretrained=True); m.eval()\n"
        f"y = np.asarray(m(jnp.asarray(np.load({str(tmp_path / 'x.npy')!r}))))\n"
        f"np.testing.assert_allclose(y, np.load({str(tmp_path / 'ref.npy')!r}), rtol=1e-4, atol=1e-4)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=600, env=env)


@needs_registry
def test_cli_refuses_each_bad_checkpoint_and_leaves_no_output(tmp_path):
    """Acceptance: another architecture, a missing key, an extra key, a wrong shape, a truncated file and a pickle
    carrying arbitrary objects are each refused with a message naming the problem (exit 2), and no output is left."""
    import timm
    from safetensors.numpy import save_file

    sd = {k: v.numpy() for k, v in timm.create_model("volo_d1_224").state_dict().items()}
    other = {k: v.numpy() for k, v in timm.create_model("resnet18").state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "network.2.3.mlp.fc1.weight"}
    extra = {**sd, "network.9.0.norm1.weight": np.ones(384, np.float32)}
    shape = {**sd, "head.bias": np.zeros(999, np.float32)}
    cases = {
        "other.safetensors": (other, "probably for another architecture"),
        "missing.safetensors": (missing, "network.2.3.mlp.fc1.weight"),
        "extra.safetensors": (extra, "network.9.0.norm1.weight"),
        "shape.safetensors": (shape, "head.bias"),
    }
    for name, (state, _) in cases.items():
        save_file(state, str(tmp_path / name))
    good = (tmp_path / "missing.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[: len(good) // 3])
    cases["truncated.safetensors"] = (None, "truncated.safetensors")
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _Evil(marker)}, tmp_path / "evil.pth.tar")
    cases["evil.pth.tar"] = (None, "Refusing to unpickle arbitrary objects")

    for name, (_, expected) in cases.items():
        out = tmp_path / f"out_{name}"
        result = _cli(str(tmp_path / name), "--model", "volo_d1_224", "--output", str(out), "--no-progress")
        assert result.returncode == 2, (name, result.stdout, result.stderr)
        assert expected in result.stderr, (name, result.stderr)
        assert not out.exists(), name
    assert not marker.exists(), "the pickle payload must not have run"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    assert leftovers == [], leftovers
