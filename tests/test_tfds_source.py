"""tfds as a training source: an ImageNet-layout folder (scikit-learn's digits, plus broken files) prepared once into
tfds ``array_record`` by ``python -m volo_jax.tools.prepare_tfds`` reads back through ``tfds.data_source`` and
``TfdsSource`` exactly as the folder reader reads the folder (same files byte for byte, labels, classes); a killed
preparation leaves nothing tfds reads; ``train_batches`` and ``train.py --tfds`` run on it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
pytest.importorskip("grain")
pytest.importorskip("sklearn")

from volo_jax import data  # noqa: E402
from volo_jax.tools import prepare_tfds  # noqa: E402
from volo_jax.tools.digits import write_digits  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "volo_jax_test_digits"
BROKEN = {"train": "3/broken.png", "validation": "7/truncated.png"}  # the folder reader's names


def _prepare(*args: object, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "volo_jax.tools.prepare_tfds", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    folder = write_digits(tmp_path_factory.mktemp("folder") / "digits", size=32)
    (folder / "train" / BROKEN["train"]).write_bytes(b"not an image")
    good = (folder / "val" / "7").iterdir().__next__().read_bytes()
    (folder / "val" / BROKEN["validation"]).write_bytes(good[: len(good) // 2])  # a truncated PNG
    return folder


@pytest.fixture(scope="module")
def prepared(digits, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    data_dir = tmp_path_factory.mktemp("tfds")
    proc = _prepare(digits, "--name", NAME, "--data-dir", data_dir, "--workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data_dir, proc


def test_prepare_skips_and_names_unreadable_images(prepared):
    data_dir, proc = prepared
    assert "Skipped 2 unreadable image(s)" in proc.stdout
    assert f"train/{BROKEN['train']}" in proc.stdout and f"validation/{BROKEN['validation']}" in proc.stdout
    assert "1438 train, 359 validation images" in proc.stdout
    version_dir = data_dir / NAME / prepare_tfds.DATASET_VERSION
    assert sorted(p.name for p in (data_dir / NAME).iterdir()) == [prepare_tfds.DATASET_VERSION]  # no leftovers
    assert any(p.name.startswith(f"{NAME}-train.array_record") for p in version_dir.iterdir())
    assert not (data_dir / "downloads").exists()
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["moduleName"] == "volo_jax.tools.prepare_tfds" and info["fileFormat"] == "array_record"  # under -m


@pytest.mark.parametrize("split", ["train", "validation"])
def test_reads_back_as_the_folder_reader(digits, prepared, split):
    data_dir, _ = prepared
    folder = data.ImageFolderSource(digits, split)
    source = data.TfdsSource(NAME, split, str(data_dir))
    assert source.classes == folder.classes == [str(i) for i in range(10)]
    by_name = {folder.name(i): i for i in range(len(folder))}
    assert len(source) == len(folder) - 1
    seen = set()
    for i in range(len(source)):
        record = source.ds[i]
        file_name = record["file_name"].decode()
        j = by_name[file_name]
        seen.add(file_name)
        path, label = folder.samples[j]
        assert bytes(record["image"]) == Path(path).read_bytes()  # the original file, not re-encoded
        img, tfds_label = source.load(i)
        assert tfds_label == label
        np.testing.assert_array_equal(np.asarray(img), np.asarray(folder.load(j)[0]))
        assert source.name(i) == f"{NAME}/{split}[{i}] {file_name}"
        assert data.token_label_key(source, i) == data.token_label_key(folder, j)  # token-label maps match too
    assert set(by_name) - seen == {BROKEN[split]}
    # plain tfds, its own decoder (no SkipDecoding): the same examples
    plain = tfds.data_source(NAME, split=split, data_dir=str(data_dir))
    assert len(plain) == len(source)
    for i in (0, len(plain) // 2, len(plain) - 1):
        record = plain[i]
        j = by_name[record["file_name"].decode()]
        assert int(record["label"]) == folder.samples[j][1]
        np.testing.assert_array_equal(record["image"], np.asarray(folder.load(j)[0]))


def test_jpegs_stay_byte_identical(tmp_path):
    """ImageNet's kinds of JPEG (RGB, grayscale, CMYK) are stored as their files' bytes and decode as from the
    folder (``prepare`` called in-process, twice: a second builder class of another name in the same process)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, mode in enumerate(("RGB", "L", "CMYK")):
            (tmp_path / "f" / split / f"n0{c}").mkdir(parents=True)
            for i in range(2):
                channels = len(mode)
                pixels = rng.integers(0, 256, (20 + i, 30, channels), np.uint8).squeeze()
                Image.fromarray(pixels, mode).save(tmp_path / "f" / split / f"n0{c}" / f"{split}_{i}.JPEG",
                                                   quality=90)
    for name in ("jpeg_a", "jpeg_b"):
        result = prepare_tfds.prepare(tmp_path / "f", name, tmp_path / "tfds", workers=2, progress=False)
        assert result.counts == {"train": 6, "validation": 6} and not result.skipped
        for split in ("train", "validation"):
            folder = data.ImageFolderSource(tmp_path / "f", split)
            source = data.TfdsSource(name, split, str(tmp_path / "tfds"))
            by_name = {folder.name(i): i for i in range(len(folder))}
            assert len(source) == len(folder) == 6
            for i in range(len(source)):
                j = by_name[source.ds[i]["file_name"].decode()]
                assert bytes(source.ds[i]["image"]) == Path(folder.samples[j][0]).read_bytes()
                img, label = source.load(i)
                assert label == folder.samples[j][1]
                np.testing.assert_array_equal(np.asarray(img), np.asarray(folder.load(j)[0]))


def test_train_batches_on_tfds(prepared):
    data_dir, _ = prepared
    source = data.TfdsSource(NAME, "train", str(data_dir))
    cfg = data.TrainConfig(img_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    batches, loader = data.train_batches(source, cfg, 8, seed=0, workers=2)
    for _ in range(2):
        b = next(batches)
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert np.isfinite(b["image"]).all() and b["image"].std() > 0
        assert b["label"].shape == (8,) and ((0 <= b["label"]) & (b["label"] < 10)).all()
    assert not loader.skipped


def test_killed_preparation_leaves_nothing_readable(digits, tmp_path):
    """SIGKILL halfway through the images: tfds's ``incomplete.*`` folder stays behind, nothing is read from it, and
    the next run prepares the dataset."""
    kill = ("import os, signal, sys\n"
            "from volo_jax.tools import prepare_tfds as p\n"
            "read, n = p._read_checked, [0]\n"
            "def killing(path):\n"
            "    n[0] += 1\n"
            "    if n[0] == 600:\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return read(path)\n"
            "p._read_checked = killing\n"
            "sys.exit(p.main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", kill, str(digits), "--name", NAME, "--data-dir", str(tmp_path),
                           "--workers", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name.startswith("incomplete.") for p in (tmp_path / NAME).iterdir()] == [True]
    with pytest.raises(data.DataError, match="cannot be read"):
        data.TfdsSource(NAME, "train", str(tmp_path))
    proc = _prepare(digits, "--name", NAME, "--data-dir", tmp_path, "--workers", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(data.TfdsSource(NAME, "train", str(tmp_path))) == 1438


def test_prepare_refusals(digits, prepared, tmp_path, capsys):
    data_dir, _ = prepared

    def error(*argv: object) -> str:
        assert prepare_tfds.main([str(a) for a in argv]) == 2
        return capsys.readouterr().err

    assert "already prepared" in error(digits, "--name", NAME, "--data-dir", data_dir)
    assert "one of tfds's own datasets" in error(digits, "--name", "mnist", "--data-dir", tmp_path)
    assert "snake_case" in error(digits, "--name", "My-Digits", "--data-dir", tmp_path)
    assert "neither a train/ nor a val/" in error(digits / "train", "--name", "x", "--data-dir", tmp_path)
    assert "no such directory" in error(tmp_path / "missing", "--name", "x", "--data-dir", tmp_path)
    assert not (tmp_path / "x").exists()


def _train(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)


def test_train_unknown_tfds_name_is_a_clear_error(tmp_path):
    proc = _train("--tfds", "no_such_dataset_xyz", "--tfds-data-dir", tmp_path, "--output", tmp_path / "o")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error:" in proc.stderr and "no_such_dataset_xyz" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _train("--output", tmp_path / "o")  # neither a folder nor --tfds
    assert proc.returncode == 2 and "--tfds NAME" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_on_tfds_end_to_end(prepared, tmp_path):
    data_dir, _ = prepared
    proc = _train("--tfds", NAME, "--tfds-data-dir", data_dir, "--model", "ese_vovnet19b_slim_dw", "--img-size", 32,
                  "-b", 8, "--max-steps", 2, "--eval-every", 100, "--workers", 2, "--aa", "none",
                  "--output", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1438 train / 359 val images, 10 classes" in proc.stdout
    assert "eval top-1" in proc.stdout and "done: 2 steps" in proc.stdout
