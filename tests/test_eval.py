"""eval.py and volo_jax.data against timm: the eval transform to the bit, the folder reader, predictions, sharding.

* The transform equals ``timm.data.create_transform(**resolve_data_config(...), is_training=False)`` on every
  sample photograph scikit-image ships (RGB, grayscale, RGBA, odd sizes) for the four seed models' data configs
  and for overrides (non-square size, crop_pct, bilinear/nearest, squash/border crop modes, crop_pct > 1).
* The folder reader gives timm's samples and labels (and torchvision ImageFolder's, order aside: timm sorts file
  names naturally, ``img2`` before ``img10``).
* ``eval.py`` in a subprocess on a folder of real images plus two broken files, with a randomized timm model saved
  to disk, predicts what timm's own dataset + transform + model predict for every image, and reports the same
  top-1/top-5; the broken files are counted as skipped.
* On 8 simulated devices, with a dataset size not divisible by the batch, every image is counted exactly once and
  the results equal the 1-device run.
* Bad input (empty folder, no class subfolders, another model's checkpoint, unknown model, a directory that is no
  checkpoint, a class-count mismatch) exits with status 2 and a plain message.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

import volo_jax  # noqa: E402
from converters.parity import randomize_timm_model, save_torch_checkpoint  # noqa: E402
from volo_jax import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SEED_MODELS = ["volo_d1_224.sail_in1k", "poolformer_m36.sail_in1k", "ese_vovnet19b_dw.ra_in1k", "convit_base.fb_in1k"]
SAMPLES_DIR = Path(skimage_data.__file__).parent
# Every photograph/picture in scikit-image's data folder that PIL reads (its multipage TIFFs are left out).
SAMPLES = sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix in (".png", ".jpg", ".gif"))
CLASSES = ["n01440764", "n01443537", "n01484850"]


def _load_eval_module():
    spec = importlib.util.spec_from_file_location("eval_cli", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_eval(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "eval.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=full_env, timeout=timeout)


# --------------------------------------------------------------------------- transform
def _timm_transform(cfg):
    return timm.data.create_transform(**cfg, is_training=False)


OVERRIDES = [
    pytest.param(dict(input_size=(3, 200, 260)), id="non-square"),
    pytest.param(dict(crop_pct=0.9, interpolation="bilinear"), id="crop0.9-bilinear"),
    pytest.param(dict(img_size=256, crop_pct=1.0, interpolation="bicubic"), id="256-crop1.0-bicubic"),
    pytest.param(dict(img_size=448, crop_pct=1.15), id="crop1.15"),
    pytest.param(dict(interpolation="nearest"), id="nearest"),
    pytest.param(dict(crop_mode="squash", input_size=(3, 224, 192)), id="squash"),
    pytest.param(dict(crop_mode="border", input_size=(3, 224, 192)), id="border"),
]


def _assert_same_tensors(name, overrides):
    """Our config and tensors from our registry's cfg == timm's config and tensors from timm's own cfg."""
    ours_cfg = data.resolve_eval_config(volo_jax.get_pretrained_cfg(name), **overrides)
    timm_cfg = timm.data.resolve_data_config(overrides, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict(),
                                             use_test_size=True)
    assert ours_cfg.as_dict() == {**timm_cfg, "input_size": tuple(timm_cfg["input_size"])}
    transform = _timm_transform(timm_cfg)
    modes = set()
    for path in SAMPLES:
        with Image.open(path) as raw:
            modes.add(raw.mode)
        img = data.load_image(path)  # == timm's ImageDataset: Image.open(path).convert('RGB')
        ref = transform(img).numpy().transpose(1, 2, 0)  # CHW -> HWC
        ours = data.eval_transform(img, ours_cfg)
        assert ours.dtype == np.float32 and ours.shape == ref.shape, (path.name, ours.shape, ref.shape)
        # Same IEEE float32 operations as ToTensor + Normalize on the same PIL resize: bit-identical.
        np.testing.assert_array_equal(ours, ref, err_msg=path.name)
    assert {"RGB", "L", "RGBA"} <= modes  # grayscale and alpha sources are covered


@pytest.mark.parametrize("name", SEED_MODELS)
def test_transform_equals_timm_for_seed_models(name):
    _assert_same_tensors(name, {})


@pytest.mark.parametrize("overrides", OVERRIDES)
def test_transform_equals_timm_with_overrides(overrides):
    _assert_same_tensors("convit_base.fb_in1k", overrides)


def test_test_size_is_used_like_timm_validate():
    cfg = volo_jax.get_pretrained_cfg("ese_vovnet19b_dw.ra_in1k")
    assert data.resolve_eval_config(cfg).input_size == (3, 288, 288)  # timm validate.py default: test size
    assert data.resolve_eval_config(cfg).crop_pct == 0.95
    assert data.resolve_eval_config(cfg, use_test_size=False).input_size == (3, 224, 224)
    assert data.resolve_eval_config(cfg, mean=[0.5], std=[0.25]).mean == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- folder fixture
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """``root/val/<synset>/<image>``: scikit-image's samples spread over 3 classes, plus two broken files."""
    root = tmp_path_factory.mktemp("imagenet")
    for i, path in enumerate(SAMPLES):
        cls_dir = root / "val" / CLASSES[i % 3]
        cls_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, cls_dir / path.name)
    jpeg = (SAMPLES_DIR / "rocket.jpg").read_bytes()
    (root / "val" / CLASSES[1] / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "val" / CLASSES[2] / "garbage.png").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def timm_model_file(tmp_path_factory):
    """A randomized timm poolformer_s12 with a 3-class head (so top-1 is not trivially 0) and its file."""
    model = randomize_timm_model(timm.create_model("poolformer_s12", num_classes=len(CLASSES)))
    return model, save_torch_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "poolformer_s12.safetensors")


def test_folder_reader_matches_timm_and_torchvision(image_folder, tmp_path):
    from timm.data.readers.reader_image_folder import find_images_and_targets
    from torchvision.datasets import ImageFolder

    source = data.ImageFolderSource(image_folder)  # finds val/
    assert source.root == image_folder / "val"
    ref, ref_classes = find_images_and_targets(str(image_folder / "val"))
    assert source.samples == ref and source.classes == list(ref_classes)
    tv = ImageFolder(str(image_folder / "val"), loader=lambda p: p)
    assert source.classes == tv.classes and source.samples == tv.samples  # synset names: the same order as well

    # Digit runs: the same (path, label) pairs as torchvision, in timm's natural order.
    for cls in ("class2", "class10"):
        for f in ("img2.png", "img10.png", "IMG3.JPG"):
            (tmp_path / cls).mkdir(exist_ok=True)
            shutil.copy(SAMPLES[0], tmp_path / cls / f)
    ours = data.ImageFolderSource(tmp_path)
    tv = ImageFolder(str(tmp_path), loader=lambda p: p)
    ref, _ = find_images_and_targets(str(tmp_path))
    assert ours.samples == ref
    assert ours.classes == ["class2", "class10"] and tv.classes == ["class10", "class2"]
    as_names = {(p, ours.classes[y]) for p, y in ours.samples}
    assert as_names == {(p, tv.classes[y]) for p, y in tv.samples}


def test_loader_pads_masks_and_shards(image_folder):
    """Every index lands in exactly one (process, slot); padding and broken files are masked."""
    source = data.ImageFolderSource(image_folder)
    n, batch, procs = len(source), 8, 2
    cfg = data.resolve_eval_config(volo_jax.get_pretrained_cfg("poolformer_s12"), img_size=32)
    seen, errors = [], []
    for p in range(procs):
        batches, num_batches = data.eval_batches(source, cfg, batch, process_index=p, process_count=procs, workers=2)
        got = list(batches)
        assert len(got) == num_batches == -(-n // batch)
        for b in got:
            assert b["image"].shape == (batch // procs, 32, 32, 3) and b["mask"].dtype == bool
            seen += [int(i) for i in b["index"] if i >= 0]
            errors += [source.name(int(i)) for i, e in zip(b["index"], b["error"], strict=True) if e]
            assert not b["mask"][b["index"] < 0].any()
    assert sorted(seen) == list(range(n))
    assert sorted(errors) == [f"{CLASSES[1]}/truncated.jpg", f"{CLASSES[2]}/garbage.png"]


# --------------------------------------------------------------------------- eval.py end to end
def _timm_predictions(model, root):
    """timm's own pipeline: create_dataset + create_transform + model, top-5 per readable image, keyed by name."""
    timm_cfg = timm.data.resolve_data_config({}, model=model, use_test_size=True)
    ds = timm.data.create_dataset("", root=str(root), split="validation", transform=_timm_transform(timm_cfg))
    out = {}
    with torch.no_grad():
        for i, (path, label) in enumerate(ds.reader.samples):
            name = os.path.relpath(path, ds.reader.root)
            try:
                data.load_image(path)
            except OSError:  # timm's dataset would substitute the next image; we compare readable images only
                continue
            x, y = ds[i]
            assert y == label
            probs = model(x[None]).softmax(-1)[0]
            top_p, top_i = probs.topk(min(5, probs.numel()))
            out[name] = (label, top_i.tolist(), top_p.numpy())
    return out


def _read_predictions(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _accuracy(preds):
    top1 = np.mean([p[1][0] == p[0] for p in preds.values()]) * 100
    top5 = np.mean([p[0] in p[1] for p in preds.values()]) * 100  # top-min(5, classes), like eval.py
    return top1, top5


@pytest.fixture(scope="module")
def single_device_run(image_folder, timm_model_file, tmp_path_factory):
    _, ckpt = timm_model_file
    out = tmp_path_factory.mktemp("run1")
    proc = _run_eval(image_folder, "--model", "poolformer_s12", "--checkpoint", ckpt, "-b", 6, "--workers", 2,
                     "--predictions", out / "pred.csv", "--results-file", out / "results.json",
                     "--results-format", "json")
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads((out / "results.json").read_text()), _read_predictions(out / "pred.csv")


def test_eval_cli_matches_timm_per_image(single_device_run, timm_model_file, image_folder):
    proc, results, rows = single_device_run
    model, _ = timm_model_file
    ref = _timm_predictions(model, image_folder)
    n_ok = len(SAMPLES) - 1  # the .gif is not an ImageNet extension (timm's reader skips it too)
    assert len(ref) == n_ok
    ours = {r["filename"]: r for r in rows}
    assert set(ours) == set(ref) | {f"{CLASSES[1]}/truncated.jpg", f"{CLASSES[2]}/garbage.png"}
    for name, (label, top5, probs) in ref.items():
        row = ours[name]
        assert int(row["label"]) == label, name
        assert [int(c) for c in row["top5_classes"].split()] == top5, name
        np.testing.assert_allclose([float(p) for p in row["top5_probs"].split()], probs, rtol=1e-3, atol=1e-6)
    top1, top5 = _accuracy(ref)
    assert 0 < top1 < 100
    assert results["top1"] == pytest.approx(top1, abs=1e-3) and results["top5"] == pytest.approx(top5, abs=1e-3)
    assert results["num_images"] == n_ok and results["num_skipped"] == 2
    assert results["skipped"] == [f"{CLASSES[1]}/truncated.jpg", f"{CLASSES[2]}/garbage.png"]
    assert "* Acc@1" in proc.stdout and "Skipped 2 image(s)" in proc.stdout
    assert ours[f"{CLASSES[1]}/truncated.jpg"]["error"].startswith("OSError")


def test_eval_cli_eight_devices_counts_every_image_once(single_device_run, image_folder, timm_model_file,
                                                        tmp_path):
    _, results1, rows1 = single_device_run
    _, ckpt = timm_model_file
    n = len(SAMPLES) + 1  # readable images + 2 broken files
    assert n % 8, "the dataset size must not be a multiple of the batch"
    proc = _run_eval(image_folder, "--model", "poolformer_s12", "--checkpoint", ckpt, "-b", 8, "--workers", 2,
                     "--predictions", tmp_path / "pred.csv", "--results-file", tmp_path / "results.json",
                     "--results-format", "json",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr
    assert "8 device(s)" in proc.stdout
    results8 = json.loads((tmp_path / "results.json").read_text())
    assert results8["devices"] == 8
    assert results8["num_images"] + results8["num_skipped"] == n
    for key in ("top1", "top5", "num_images", "num_skipped", "skipped"):
        assert results8[key] == results1[key], key
    assert results8["loss"] == pytest.approx(results1["loss"], rel=1e-5)
    rows8 = _read_predictions(tmp_path / "pred.csv")
    assert sorted(int(r["index"]) for r in rows8) == list(range(n))  # each image exactly once, padding dropped
    assert [(r["filename"], r["top5_classes"]) for r in rows8] == [(r["filename"], r["top5_classes"]) for r in rows1]


# --------------------------------------------------------------------------- checkpoints and bad input
def test_use_ema_takes_the_ema_weights(tmp_path):
    cli = _load_eval_module()
    model = randomize_timm_model(timm.create_model("poolformer_s12"), seed=1)
    raw = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"state_dict": raw, "state_dict_ema": model.state_dict(), "epoch": 3}, tmp_path / "train.pth.tar")
    args = cli.parse_args([str(tmp_path), "--model", "poolformer_s12", "--checkpoint",
                           str(tmp_path / "train.pth.tar"), "--use-ema"])
    ours = cli.build_model(args, None, np.float32)
    np.testing.assert_allclose(np.asarray(ours.head.fc.bias[...]), model.head.fc.bias.detach().numpy())
    args.use_ema = False
    assert not np.asarray(cli.build_model(args, None, np.float32).head.fc.bias[...]).any()


def _expect_exit_2(capsys, argv, *fragments):
    cli = _load_eval_module()
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_empty_folder_and_no_class_folders_exit_2(tmp_path, capsys, timm_model_file):
    _, ckpt = timm_model_file
    (tmp_path / "empty").mkdir()
    _expect_exit_2(capsys, [tmp_path / "empty", "--model", "poolformer_s12", "--checkpoint", ckpt],
                   "holds no image files", "<class>/<image>")
    (tmp_path / "flat").mkdir()
    shutil.copy(SAMPLES[0], tmp_path / "flat" / "a.png")
    _expect_exit_2(capsys, [tmp_path / "flat", "--model", "poolformer_s12", "--checkpoint", ckpt],
                   "outside class subfolders")
    _expect_exit_2(capsys, [tmp_path / "missing", "--model", "poolformer_s12", "--checkpoint", ckpt],
                   "no such directory")


def test_wrong_checkpoint_exits_2(tmp_path, capsys, image_folder, timm_model_file):
    _, ckpt = timm_model_file
    _expect_exit_2(capsys, [image_folder, "--model", "convit_tiny", "--checkpoint", ckpt],
                   "error:", "missing")
    _expect_exit_2(capsys, [image_folder, "--model", "poolformer_s12", "--checkpoint", ckpt, "--num-classes", "10"],
                   "--num-classes 10 but the checkpoint's classifier has 3")
    _expect_exit_2(capsys, [image_folder, "--model", "poolformer_s12", "--checkpoint", tmp_path / "nope.pth"],
                   "no such file")
    (tmp_path / "somedir").mkdir()
    _expect_exit_2(capsys, [image_folder, "--model", "poolformer_s12", "--checkpoint", tmp_path / "somedir"],
                   "expected a directory from `python -m converters`", "orbax training checkpoint")
    (tmp_path / "orbax" / "100").mkdir(parents=True)
    (tmp_path / "orbax" / "100" / "_CHECKPOINT_METADATA").write_text("{}")
    _expect_exit_2(capsys, [image_folder, "--model", "poolformer_s12", "--checkpoint", tmp_path / "orbax"],
                   "not a readable orbax training checkpoint")


def test_orbax_training_checkpoint_evaluates_like_the_same_weights(single_device_run, image_folder,
                                                                    timm_model_file, tmp_path):
    """A training checkpoint (TrainCheckpoints, as train.py writes it) holding the weights of the timm file gives the
    numbers of evaluating that file; --use-ema takes the EMA weights (here: different ones, so the numbers change)."""
    from flax import nnx

    from volo_jax import train_lib
    from volo_jax.checkpoint import TrainCheckpoints

    _, results1, _ = single_device_run
    _, ckpt = timm_model_file
    model = volo_jax.create_model("poolformer_s12", pretrained=ckpt, num_classes=len(CLASSES))
    tx, _ = train_lib.make_optimizer(train_lib.OptimizerConfig(), nnx.state(model, nnx.Param))
    _, state = train_lib.create_train_state(model, tx, ema=True)
    state = state.replace(ema_params=jax.tree.map(lambda p: p * 0.5, state.ema_params))
    run = TrainCheckpoints(tmp_path / "run")
    run.save(state, {"model_name": "poolformer_s12", "num_classes": len(CLASSES)})
    run.close()
    for extra, same in (([], True), (["--use-ema"], False)):
        proc = _run_eval(image_folder, "--model", "poolformer_s12", "--checkpoint", tmp_path / "run" / "0",
                         "--results-file", tmp_path / "r.json", "--results-format", "json", *extra)
        assert proc.returncode == 0, proc.stderr
        results = json.loads((tmp_path / "r.json").read_text())
        assert (results["loss"] == pytest.approx(results1["loss"], rel=1e-5)) == same
        if same:
            assert (results["top1"], results["top5"]) == (results1["top1"], results1["top5"])


def test_unknown_model_exits_2_with_suggestions(image_folder):
    proc = _run_eval(image_folder, "--model", "volo_d1_22")
    assert proc.returncode == 2
    assert "Unknown model 'volo_d1_22'" in proc.stderr and "volo_d1_224" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tfds_source_through_data_source(tmp_path, timm_model_file):
    """``--tfds``: records from ``tfds.data_source`` (mocked: no prepared dataset here) with the image left encoded
    (``SkipDecoding``), decoded by PIL, labels as stored; eval.py runs on them."""
    import io

    tfds = pytest.importorskip("tensorflow_datasets")
    records = []
    for i, path in enumerate(SAMPLES[:5]):
        buf = io.BytesIO()
        data.load_image(path).save(buf, "PNG")
        records.append({"image": buf.getvalue(), "label": i % 3})
    records.append({"image": b"broken", "label": 0})
    calls = []

    def fake_data_source(self, *args, **kwargs):
        calls.append(kwargs)
        return records

    _, ckpt = timm_model_file
    cli = _load_eval_module()
    with tfds.testing.mock_data(as_data_source_fn=fake_data_source, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.TfdsSource("imagenet2012", "validation")
        assert len(source) == 6 and source.name(2) == "imagenet2012/validation[2]"
        img, label = source.load(3)
        assert label == 0 and np.array_equal(np.asarray(img), np.asarray(data.load_image(SAMPLES[3])))
        rc = cli.main(["--tfds", "imagenet2012", "--model", "poolformer_s12", "--checkpoint", str(ckpt), "-b", "4",
                       "--img-size", "64", "--results-file", str(tmp_path / "r.json"), "--results-format", "json"])
    assert isinstance(calls[0]["decoders"]["image"], tfds.decode.SkipDecoding)
    assert rc == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["num_images"] == 5 and results["skipped"] == ["imagenet2012/validation[5]"]
