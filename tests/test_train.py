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
