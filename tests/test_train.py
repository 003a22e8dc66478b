"""train.py end to end on real images (scikit-learn's digits as an image folder): a run interrupted and resumed
ends bit-identical to an uninterrupted one (parameters, optimizer, data position); eval.py reads its checkpoint;
bad data is a clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")
# Every test here starts its train.py / eval.py processes one after another (conftest.jax_cache_for_subprocesses).
pytestmark = pytest.mark.usefixtures("jax_cache_for_subprocesses")

import volo_jax  # noqa: E402
from volo_jax.checkpoint import TrainCheckpoints  # noqa: E402
from volo_jax.tools.digits import write_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "ese_vovnet19b_slim_dw", "--img-size", "32", "-b", "8", "--epochs", "2", "--warmup-epochs", "0.5",
        "--lr", "1e-3", "--model-ema-decay", "0.9", "--drop-path", "0.1", "--workers", "2", "--log-every", "1",
        "--eval-every", "100"]


def _train(*args, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("d") / "digits", size=32)


def _weights(run: Path, use_ema: bool = False) -> list[np.ndarray]:
    model = volo_jax.create_model("ese_vovnet19b_slim_dw", num_classes=10, img_size=32)
    TrainCheckpoints(run / "checkpoints", read_only=True).restore_weights(model, use_ema=use_ema)
    from flax import nnx

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat)))]


@pytest.mark.slow
def test_interrupted_run_resumes_exactly(digits, tmp_path):
    straight = _train(digits, *ARGS, "--output", tmp_path / "a", "--max-steps", 6)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "global batch 8" in straight.stdout and "eval top-1" in straight.stdout
    first = _train(digits, *ARGS, "--output", tmp_path / "b", "--max-steps", 3)  # "killed" after step 3
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _train(digits, *ARGS, "--output", tmp_path / "b", "--max-steps", 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr
    for use_ema in (False, True):
        for a, b in zip(_weights(tmp_path / "a", use_ema), _weights(tmp_path / "b", use_ema), strict=True):
            np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    assert list((tmp_path / "a" / "tb").iterdir())  # TensorBoard events
    # eval.py on the run's checkpoint: the same held-out accuracy the trainer reported
    ev = subprocess.run([sys.executable, str(ROOT / "eval.py"), str(digits), "--model", "ese_vovnet19b_slim_dw",
                         "--checkpoint", str(tmp_path / "a" / "checkpoints"), "--img-size", "32", "-b", "8",
                         "--results-file", str(tmp_path / "r.json"), "--results-format", "json"],
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    final = [r for r in rows if r["kind"] == "eval"][-1]
    assert json.loads((tmp_path / "r.json").read_text())["top1"] == pytest.approx(final["top1"], abs=1e-3)


def _clear_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr, proc.stderr[-3000:]
    for n in needles:
        assert n in proc.stderr, proc.stderr[-3000:]


def test_bad_data_is_a_clear_error(tmp_path, digits):
    (tmp_path / "flat" / "a").mkdir(parents=True)
    _clear_error(_train(tmp_path / "flat", "--model", "poolformer_s12", "--output", tmp_path / "o"))
    _clear_error(_train(tmp_path / "missing", "--output", tmp_path / "o"), "no such directory")
    _clear_error(_train(digits, "--model", "volo_d1_22", "--output", tmp_path / "o"), "volo_d1_224")
    # an empty class folder would silently shift every later label (timm drops it): refused, named
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    shutil.rmtree(broken / "train" / "3")
    (broken / "train" / "3").mkdir()
    _clear_error(_train(broken, "--output", tmp_path / "o"), "without images: 3")
    shutil.rmtree(broken / "train" / "3")  # gone altogether: train and val classes differ
    _clear_error(_train(broken, "--output", tmp_path / "o"), "class folders differ", "only in validation: ['3']")
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_bad_settings_are_a_clear_error(tmp_path, digits):
    recipe = tmp_path / "recipe.py"
    recipe.write_text("from configs import default\n\ndef get_config():\n    c = default.get_config()\n"
                      "    c.warmup_epoch = 3\n    return c\n")
    _clear_error(_train(digits, "--config", recipe, "--output", tmp_path / "o"),
                 "'warmup_epoch' (did you mean 'warmup_epochs'?)")
    _clear_error(_train(digits, "--config", tmp_path / "nope.py", "--output", tmp_path / "o"), "nope.py")
    _clear_error(_train(digits, "--global-batch-size", 5, "--output", tmp_path / "o",
                        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}),
                 "global batch 5 does not divide across 2 devices")
    _clear_error(_train(digits, "--aa", "rand-m9-foo3", "--output", tmp_path / "o"), "auto_augment")
    _clear_error(_train(digits, "--scale", 1, 0.5, "--output", tmp_path / "o"), "--scale")
    _clear_error(_train(digits, "--dtype", "float16", "--output", tmp_path / "o"), "float16")


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py"))
def test_every_recipe_loads_and_has_its_command(recipe):
    """Each configs/ file sets only fields train.py knows, passes its checks, and says how to run it."""
    sys.path.insert(0, str(ROOT))
    import train

    cfg = train.load_config(str(ROOT / "configs" / recipe))
    train.check_config(cfg)
    text = (ROOT / "configs" / recipe).read_text()
    assert "train.py" in text.split('"""')[1], f"{recipe}: the docstring gives no command"


def test_token_label_recipes_load_each_variant():
    """configs/volo_token_label.py:VARIANT: every VOLO README recipe loads through train.py's FILE:ARG syntax, names
    a registered model at its resolution, and turns token labeling on; fine-tunes use --ground-truth."""
    sys.path.insert(0, str(ROOT))
    import train
    import volo_jax
    from configs import volo_token_label

    names = set(volo_jax.list_models())
    for variant in volo_token_label.VARIANTS:
        cfg = train.load_config(f"{ROOT / 'configs' / 'volo_token_label.py'}:{variant}")
        train.check_config(cfg)
        assert cfg.model in names and cfg.model.endswith(str(cfg.img_size)), (variant, cfg.model)
        assert cfg.token_label and cfg.ground_truth == ("_" in variant) and cfg.mixup == cfg.cutmix == 0.0
    assert train.load_config(str(ROOT / "configs" / "volo_token_label.py")).model == "volo_d1_224"
    with pytest.raises(train.ConfigError, match="unknown VOLO recipe 'd9'.*d1, d2"):
        train.load_config(f"{ROOT / 'configs' / 'volo_token_label.py'}:d9")


def _random_token_labels(path: Path, digits: Path, skip: int = 0) -> Path:
    """A token-label store of random top-3 maps on a 4x4 grid for the digits' training images (the last ``skip``
    images left out)."""
    from volo_jax import data
    from volo_jax.token_label_store import TokenLabelWriter

    source = data.ImageFolderSource(digits, split="train")
    names = [data.token_label_key(source, i) for i in range(len(source) - skip)]
    rng = np.random.default_rng(0)
    scores = (rng.normal(size=(len(names), 3, 4, 4)) * 2 + 6).astype(np.float32)
    indices = np.argsort(rng.random((len(names), 10, 4, 4)), axis=1)[:, :3]
    with TokenLabelWriter(path, names, topk=3, height=4, width=4, score_dtype="float32", num_classes=10,
                          source="test") as w:
        w.write(scores, indices)
        w.finish()
    return path


VOLO_ARGS = ["--model", "volo_d1_224", "--img-size", "32", "-b", "8", "--epochs", "1", "--workers", "2",
             "--log-every", "1", "--eval-every", "100"]


def test_token_labeling_bad_settings_are_a_clear_error(tmp_path, digits):
    labels = _random_token_labels(tmp_path / "labels", digits)
    _clear_error(_train(digits, *ARGS, "--token-label", "--output", tmp_path / "o"),
                 "needs a model with a class token and an aux head (VOLO), not ese_vovnet19b_slim_dw")
    _clear_error(_train(digits, *VOLO_ARGS, "--token-label", "--token-label-size", 14, "--output", tmp_path / "o"),
                 "--token-label-size 14 does not match volo_d1_224's 2x2 aux token grid")
    _clear_error(_train(digits, *VOLO_ARGS, "--token-label-data", tmp_path / "nope", "--output", tmp_path / "o"),
                 "no such directory")
    partial = _random_token_labels(tmp_path / "partial", digits, skip=2)
    _clear_error(_train(digits, *VOLO_ARGS, "--token-label-data", partial, "--output", tmp_path / "o"),
                 "2 of 1438 images have no label map")
    _clear_error(_train(digits, *VOLO_ARGS, "--token-label-data", labels, "--token-label-crop", "xy",
                        "--output", tmp_path / "o"), "token_label_crop 'xy'")
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.slow
def test_token_labeled_run_trains_and_resumes(tmp_path, digits):
    """train.py with a token-label store (VOLO-D1 at 32 px, MixToken, dense targets) runs, logs the two-term loss,
    and resumes (data position and label maps included) to the same losses and weights as an uninterrupted run."""
    labels = _random_token_labels(tmp_path / "labels", digits)
    args = [*VOLO_ARGS, "--token-label-data", labels, "--token-label-crop", "aligned"]
    straight = _train(digits, *args, "--output", tmp_path / "a", "--max-steps", 4)
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _train(digits, *args, "--output", tmp_path / "b", "--max-steps", 2)
    resumed = _train(digits, *args, "--output", tmp_path / "b", "--max-steps", 4)
    assert first.returncode == 0 and resumed.returncode == 0, (first.stderr + resumed.stderr)[-3000:]

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["kind"] == "train"]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and all(np.isfinite(losses(tmp_path / "a")))
    # cls + 0.5 * dense cross-entropy against soft targets at initialisation: about 1.5 x ln(10) = 3.45, where the
    # class loss alone would be about 2.3
    assert 3.0 < losses(tmp_path / "a")[0] < 4.5

    def weights(run):
        model = volo_jax.create_model("volo_d1_224", num_classes=10, img_size=32)
        TrainCheckpoints(run / "checkpoints", read_only=True).restore_weights(model)
        from flax import nnx

        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    for a, b in zip(weights(tmp_path / "a"), weights(tmp_path / "b"), strict=True):
        np.testing.assert_array_equal(a, b)
