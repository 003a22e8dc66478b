"""Token-label store (volo_jax.token_label_store) and its two producers: the tlt .pt converter and the teacher tool.

The oracles are independent of the code under test: the converter's rows are compared with the tensors the test
saved with torch; the teacher tool's top-k with a top-k of the model's own heads on images preprocessed here with
PIL; VoVNet's per-position logits with its pooled logits.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from volo_jax.token_label_store import (
    MissingTokenLabelError,
    TokenLabelError,
    TokenLabelStore,
    TokenLabelWriter,
    image_key,
)

ROOT = Path(__file__).resolve().parents[1]


def _random_maps(rng: np.random.Generator, n: int, k: int = 3, h: int = 4, w: int = 5, classes: int = 10,
                 dtype: type = np.float16) -> tuple[np.ndarray, np.ndarray]:
    scores = rng.standard_normal((n, k, h, w)).astype(dtype)
    indices = rng.integers(0, classes, (n, k, h, w)).astype(np.int64)
    return scores, indices


def _write_store(path: Path, names: list[str], scores: np.ndarray, indices: np.ndarray, **kw) -> None:
    _, k, h, w = scores.shape
    with TokenLabelWriter(path, names, topk=k, height=h, width=w, score_dtype=scores.dtype, **kw) as wr:
        wr.write(scores, indices)
        wr.finish()


# --------------------------------------------------------------------------- store
def test_image_key_is_tlts():
    def tlt(path: str) -> str:  # tlt/data/dataset.py, DatasetTokenLabel.__getitem__
        return "/".join(path.split("/")[-2:]).split(".")[0]

    for path in ("n01440764/n01440764_10026.JPEG", "/data/train/n01/n01_7.png", "a/b.c.png", "./cls/x.jpg"):
        assert image_key(path) == tlt(path)
    assert image_key(os.path.join("train", "n01", "x.JPEG")) == "n01/x"


def test_round_trip_and_pickle(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"c{i % 3}/img_{i}" for i in range(7)]
    scores, indices = _random_maps(rng, 7)
    with TokenLabelWriter(tmp_path / "s", names, topk=3, height=4, width=5, score_dtype="float16", num_classes=10,
                          source="test", extra={"teacher": "x"}, commit_every=2) as w:
        w.write(scores[:3], indices[:3])  # a batch
        for r in range(3, 7):  # and single rows
            w.write(scores[r], indices[r])
        w.finish()
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["complete"] and meta["num_examples"] == 7 and meta["teacher"] == "x"
    assert (meta["score_dtype"], meta["index_dtype"], meta["num_classes"]) == ("float16", "int16", 10)
    assert not (tmp_path / "s" / "progress.json").exists()

    store = TokenLabelStore(tmp_path / "s")
    assert len(store) == 7 and store.names == names and store.grid == (4, 5) and store.topk == 3
    for i, name in enumerate(names):
        s, idx = store.lookup(name)
        assert s.dtype == np.float32 and idx.dtype == np.int32 and s.shape == idx.shape == (3, 4, 5)
        np.testing.assert_array_equal(s, scores[i].astype(np.float32))
        np.testing.assert_array_equal(idx, indices[i])
        assert store.index_of(name) == i and name in store
    with pytest.raises(MissingTokenLabelError, match="c9/none") as e:
        store.lookup("c9/none")
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert "c9/none" not in store

    clone = pickle.loads(pickle.dumps(store))  # what a grain worker process receives: the path only
    assert clone._opened is None
    np.testing.assert_array_equal(clone.lookup(names[5])[0], scores[5].astype(np.float32))


def test_check_covers(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"c/{i}" for i in range(4)]
    _write_store(tmp_path / "s", names, *_random_maps(rng, 4))
    store = TokenLabelStore(tmp_path / "s")
    store.check_covers(names[::-1])
    wanted = names + [f"d/{i}" for i in range(8)]
    with pytest.raises(TokenLabelError, match=r"8 of 12 images have no label map .*d/0, d/1, d/2, d/3, d/4 \.\.\."):
        store.check_covers(wanted)


def test_writer_refuses_bad_values_without_writing(tmp_path):
    rng = np.random.default_rng(2)
    names = ["a/0", "a/1"]
    w = TokenLabelWriter(tmp_path / "s", names, topk=3, height=4, width=5, score_dtype="float16", num_classes=10)
    scores, indices = _random_maps(rng, 2)
    lossy = scores.astype(np.float32)
    lossy[1, 0, 0, 0] = 0.1  # not a float16 value
    with pytest.raises(TokenLabelError, match="a/1: float32 scores cannot be stored as float16"):
        w.write(lossy, indices)
    bad = indices.copy()
    bad[0, 1, 2, 3] = 10
    with pytest.raises(TokenLabelError, match="a/0: class index 10 is out of range for 10 classes"):
        w.write(scores, bad)
    with pytest.raises(TokenLabelError, match="must be integers"):
        w.write(scores, indices + 0.5)
    with pytest.raises(TokenLabelError, match=r"shape \(3, 4, 4\)"):
        w.write(scores[..., :4], indices[..., :4])
    assert w.rows == 0
    w.write(scores.astype(np.float32), indices.astype(np.float32))  # exact float16 values / integral floats: fine
    w.finish()
    np.testing.assert_array_equal(TokenLabelStore(tmp_path / "s").lookup("a/1")[1], indices[1])


def test_writer_resumes_after_a_hard_kill_and_refuses_other_inputs(tmp_path):
    rng = np.random.default_rng(3)
    names = [f"c/{i}" for i in range(9)]
    scores, indices = _random_maps(rng, 9)
    _write_store(tmp_path / "ref", names, scores, indices, num_classes=10)

    kw = dict(topk=3, height=4, width=5, score_dtype="float16", num_classes=10, commit_every=3)
    w = TokenLabelWriter(tmp_path / "s", names, **kw)
    for r in range(5):
        w.write(scores[r], indices[r])
    del w  # a kill: no close, no commit; only the commit after row 3 is on record
    with pytest.raises(TokenLabelError, match=r"3 of 9 rows written\): the conversion was interrupted: rerun the "
                                              "same command to resume"):
        TokenLabelStore(tmp_path / "s")
    with pytest.raises(TokenLabelError, match="different inputs.*num_classes"):
        TokenLabelWriter(tmp_path / "s", names, **{**kw, "num_classes": 11})
    with pytest.raises(TokenLabelError, match="image list differs at row 8"):
        TokenLabelWriter(tmp_path / "s", names[:-1] + ["c/x"], **kw)
    with TokenLabelWriter(tmp_path / "s", names, **kw) as w:
        assert w.rows == 3
        w.write(scores[3:], indices[3:])
        w.finish()
    for f in ("scores.npy", "indices.npy", "names.txt", "meta.json"):
        assert (tmp_path / "s" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f
    with TokenLabelWriter(tmp_path / "s", names, **kw) as w:
        assert w.complete
        with pytest.raises(TokenLabelError, match="complete"):
            w.write(scores[0], indices[0])


def test_writer_never_writes_into_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    with pytest.raises(TokenLabelError, match="not a token-label store.*thesis.tex"):
        TokenLabelWriter(tmp_path / "mine", ["a"], topk=1, height=1, width=1, score_dtype="float32")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_reader_open_errors(tmp_path):
    rng = np.random.default_rng(4)
    names = [f"c/{i}" for i in range(3)]
    scores, indices = _random_maps(rng, 3)
    with pytest.raises(TokenLabelError, match="no such directory"):
        TokenLabelStore(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenLabelError, match=r"not a token-label store \(no meta.json\).*convert_token_labels"):
        TokenLabelStore(tmp_path / "empty")

    def fresh(name: str) -> Path:
        _write_store(tmp_path / name, names, scores, indices, num_classes=10)
        return tmp_path / name

    p = fresh("truncated")
    data = (p / "scores.npy").read_bytes()
    (p / "scores.npy").write_bytes(data[: len(data) - 7])
    with pytest.raises(TokenLabelError, match="scores.npy: corrupted or truncated"):
        TokenLabelStore(p)
    p = fresh("garbage")
    (p / "indices.npy").write_bytes(os.urandom(300))
    with pytest.raises(TokenLabelError, match="indices.npy: corrupted or truncated"):
        TokenLabelStore(p)
    p = fresh("shape")
    np.save(p / "indices.npy", indices[:, :2].astype(np.int16))
    with pytest.raises(TokenLabelError, match=r"indices.npy: int16\(3, 2, 4, 5\), but meta.json says int16\(3, 3, 4, "
                                              r"5\)"):
        TokenLabelStore(p)
    p = fresh("names")
    (p / "names.txt").write_text("c/0\nc/1\n")
    with pytest.raises(TokenLabelError, match="names.txt: 2 names for 3 label maps"):
        TokenLabelStore(p)
    p = fresh("version")
    meta = json.loads((p / "meta.json").read_text())
    (p / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(TokenLabelError, match="version 99"):
        TokenLabelStore(p)


# --------------------------------------------------------------------------- converter (tlt .pt files)
def _make_pt_tree(root: Path, dtype_name: str, n_per_class: int = 4, classes: int = 10, seed: int = 0
                  ) -> dict[str, np.ndarray]:
    """tlt's layout: root/<class>/<stem>.pt, each (2, k, H, W) with float class indices. Returns key -> array."""
    torch = pytest.importorskip("torch")
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c in ("n02", "n01"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in (10, 2, 1, 33)[:n_per_class]:
            scores = torch.randn(5, 3, 4, generator=g).to(dtype)
            idx = torch.randint(0, classes, (5, 3, 4), generator=g).to(dtype)
            t = torch.stack([scores, idx])
            torch.save(t, root / c / f"{c}_{i}.pt")
            out[f"{c}/{c}_{i}"] = t.float().numpy() if dtype_name == "bfloat16" else t.numpy()
    return out


def _convert(*argv: str) -> int:
    from volo_jax.tools import convert_token_labels

    return convert_token_labels.main([*map(str, argv), "--no-progress"])


@pytest.mark.parametrize("dtype_name", ["float16", "float32"])
def test_converter_every_row(tmp_path, capsys, dtype_name):
    maps = _make_pt_tree(tmp_path / "src", dtype_name)
    assert _convert(tmp_path / "src", tmp_path / "out", "--num-classes", "10") == 0
    store = TokenLabelStore(tmp_path / "out")
    # natural order: 1, 2, 10, 33 (a plain string sort would put 10 before 2)
    assert store.names == [f"{c}/{c}_{i}" for c in ("n01", "n02") for i in (1, 2, 10, 33)]
    meta = store.meta
    assert (meta["topk"], meta["height"], meta["width"]) == (5, 3, 4)
    assert meta["score_dtype"] == dtype_name and meta["index_dtype"] == "int16" and meta["num_classes"] == 10
    raw = np.load(tmp_path / "out" / "scores.npy")
    for key, arr in maps.items():
        s, idx = store.lookup(key)
        np.testing.assert_array_equal(raw[store.index_of(key)], arr[0])  # stored exactly, in the source dtype
        np.testing.assert_array_equal(s, arr[0].astype(np.float32))
        np.testing.assert_array_equal(idx, arr[1].astype(np.int32))
    assert _convert(tmp_path / "src", tmp_path / "out", "--num-classes", "10") == 0
    assert "already complete" in capsys.readouterr().out


def test_converter_bfloat16_and_unknown_class_count(tmp_path):
    maps = _make_pt_tree(tmp_path / "src", "bfloat16", n_per_class=2)
    assert _convert(tmp_path / "src", tmp_path / "out") == 0
    store = TokenLabelStore(tmp_path / "out")
    assert store.meta["score_dtype"] == "float32" and store.meta["index_dtype"] == "int32"
    assert store.num_classes is None
    for key, arr in maps.items():
        np.testing.assert_array_equal(store.lookup(key)[0], arr[0])


def test_converter_resumes_after_limit_interrupt_and_kill(tmp_path, monkeypatch, capsys):
    _make_pt_tree(tmp_path / "src", "float16")
    src = tmp_path / "src"
    assert _convert(src, tmp_path / "ref", "--num-classes", "10") == 0

    # 1. --limit, then without
    assert _convert(src, tmp_path / "a", "--num-classes", "10", "--limit", "3") == 0
    assert "stopped after 3 of 8" in capsys.readouterr().out
    with pytest.raises(TokenLabelError, match="incomplete"):
        TokenLabelStore(tmp_path / "a")
    assert _convert(src, tmp_path / "a", "--num-classes", "10") == 0

    # 2. Ctrl-C in the middle (after 5 rows): exit 130, then a rerun finishes
    calls = {"n": 0}
    write = TokenLabelWriter.write

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(TokenLabelWriter, "write", interrupted)
    assert _convert(src, tmp_path / "b", "--num-classes", "10") == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    monkeypatch.setattr(TokenLabelWriter, "write", write)
    assert json.loads((tmp_path / "b" / "progress.json").read_text())["rows"] == 5
    assert _convert(src, tmp_path / "b", "--num-classes", "10") == 0

    # 3. a real kill (os._exit: no cleanup at all) after 7 rows, committing every 3: rows 6..7 are redone
    code = (
        "import os, sys\n"
        "from volo_jax.token_label_store import TokenLabelWriter\n"
        "from volo_jax.tools.convert_token_labels import convert\n"
        "write = TokenLabelWriter.write\n"
        "def dying(self, *a, **k):\n"
        "    write(self, *a, **k)\n"
        "    if self.rows == 7:\n"
        "        os._exit(9)\n"
        "TokenLabelWriter.write = dying\n"
        f"convert({str(src)!r}, {str(tmp_path / 'c')!r}, num_classes=10, commit_every=3, progress=False)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr
    assert json.loads((tmp_path / "c" / "progress.json").read_text())["rows"] == 6
    assert _convert(src, tmp_path / "c", "--num-classes", "10") == 0

    for run in ("a", "b", "c"):
        for f in ("scores.npy", "indices.npy", "names.txt", "meta.json"):
            assert (tmp_path / run / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), (run, f)


def test_converter_refuses_another_source(tmp_path, capsys):
    _make_pt_tree(tmp_path / "src", "float16", n_per_class=2)
    _make_pt_tree(tmp_path / "other", "float16", n_per_class=2, seed=1)
    assert _convert(tmp_path / "src", tmp_path / "out", "--limit", "1") == 0
    assert _convert(tmp_path / "other", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "different inputs" in err and "source" in err and err.count("\n") == 1


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty"])
def test_converter_corrupted_file_named(tmp_path, capsys, damage):
    _make_pt_tree(tmp_path / "src", "float16", n_per_class=2)
    bad = tmp_path / "src" / "n02" / "n02_2.pt"
    data = bad.read_bytes()
    bad.write_bytes({"random_bytes": os.urandom(len(data)), "truncated": data[: len(data) // 2],
                     "empty": b""}[damage])
    assert _convert(tmp_path / "src", tmp_path / "out", "--num-classes", "10") == 2
    assert str(bad) in _one_line_error(capsys)
    assert not json.loads((tmp_path / "out" / "meta.json").read_text())["complete"]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("container", ["torch_save", "raw_pickle"])
def test_converter_malicious_pickle_never_runs(tmp_path, capsys, container):
    torch = pytest.importorskip("torch")
    _make_pt_tree(tmp_path / "src", "float16", n_per_class=1)
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    evil = tmp_path / "src" / "n01" / "n01_0.pt"  # first in natural order
    if container == "torch_save":
        torch.save(Evil(), evil)
    else:
        evil.write_bytes(pickle.dumps(Evil()))
    assert _convert(tmp_path / "src", tmp_path / "out") == 2
    err = _one_line_error(capsys)
    assert str(evil) in err and "Refusing to unpickle" in err
    assert not marker.exists()


def test_converter_inconsistent_files(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    _make_pt_tree(tmp_path / "src", "float16", n_per_class=2)
    odd = tmp_path / "src" / "n02" / "n02_1.pt"
    torch.save(torch.zeros(2, 5, 3, 3, dtype=torch.float16), odd)
    assert _convert(tmp_path / "src", tmp_path / "a") == 2
    assert f"{odd}: label map of shape (2, 5, 3, 3)" in _one_line_error(capsys)

    out_of_range = torch.zeros(2, 5, 3, 4, dtype=torch.float16)
    out_of_range[1, 0, 0, 0] = 12
    torch.save(out_of_range, odd)
    assert _convert(tmp_path / "src", tmp_path / "b", "--num-classes", "10") == 2
    assert f"{odd}: class index 12 is out of range for 10 classes" in _one_line_error(capsys)

    torch.save(torch.zeros(2, 5, 3, 4, dtype=torch.float32).fill_(0.1), odd)  # float32 among float16 files
    assert _convert(tmp_path / "src", tmp_path / "c") == 2
    assert "cannot be stored as float16 without losing precision" in _one_line_error(capsys)

    torch.save({"scores": torch.zeros(3)}, odd)
    assert _convert(tmp_path / "src", tmp_path / "d") == 2
    assert f"{odd}: holds a dict" in _one_line_error(capsys)

    assert _convert(tmp_path / "nowhere", tmp_path / "e") == 2
    assert "no such directory" in _one_line_error(capsys)

    odd.unlink()
    assert _convert(tmp_path, tmp_path / "f") == 2  # SRC one level too high: keys would be src/n01/...
    assert "expected tlt's label tree SRC/<class>/<image stem>.pt" in _one_line_error(capsys)


def test_converter_help():
    from volo_jax.tools import convert_token_labels

    text = convert_token_labels.build_parser().format_help()
    for flag in ("SRC", "OUT", "--num-classes", "--limit", "--workers", "--no-progress"):
        assert flag in text


# --------------------------------------------------------------------------- teacher tool
def _image_folder(root: Path, broken: bool = False) -> list[tuple[str, Path]]:
    """6 PNGs of different shapes in 2 class folders (+ one undecodable file); returns (key, path) in row order."""
    from PIL import Image

    rng = np.random.default_rng(5)
    files = []
    for c, sizes in (("cat", [(40, 56), (64, 64), (30, 90)]), ("dog", [(77, 50), (64, 32), (48, 48)])):
        (root / "train" / c).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            path = root / "train" / c / f"{c}_{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            files.append((f"{c}/{c}_{i}", path))
    if broken:
        (root / "train" / "dog" / "dog_9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(50))
    return files


def _whole_image(path: Path, size: int, model) -> np.ndarray:
    """The teacher's input, made here with PIL: the whole image resized (no crop), then mean/std normalised."""
    from PIL import Image

    cfg = model.pretrained_cfg
    assert cfg["interpolation"] == "bicubic"
    img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    return ((x - np.asarray(cfg["mean"], np.float32)) / np.asarray(cfg["std"], np.float32))[None]


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w, K) -> (k, h, w) scores and indices, best first."""
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
    return np.moveaxis(np.take_along_axis(logits, order, -1), -1, 0), np.moveaxis(order, -1, 0)


def _label(*argv: str) -> int:
    from volo_jax.tools import label_tokens

    return label_tokens.main([*map(str, argv), "--no-progress"])


def _assert_varies(scores: np.ndarray) -> None:
    assert np.ptp(scores[0]) > 1e-3, "top-1 scores are constant over the grid: the check would be vacuous"


def test_label_tokens_volo_aux_head_resume_and_undecodable(tmp_path, monkeypatch, capsys):
    import volo_jax
    from volo_jax.checkpoint import save_params

    files = _image_folder(tmp_path / "data", broken=True)
    model = volo_jax.create_model("volo_d1_224", num_classes=10, img_size=64, rngs=3)
    model.eval()
    save_params(tmp_path / "ckpt", model, model_name="volo_d1_224")
    argv = ["--teacher", "volo_d1_224", "--checkpoint", tmp_path / "ckpt", tmp_path / "data", tmp_path / "out",
            "--img-size", "64", "--topk", "3", "-b", "4", "-j", "2"]

    # interrupted after the first batch, then resumed
    write, calls = TokenLabelWriter.write, {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return write(self, *a, **k)

    monkeypatch.setattr(TokenLabelWriter, "write", interrupted)
    assert _label(*argv) == 130
    monkeypatch.setattr(TokenLabelWriter, "write", write)
    assert json.loads((tmp_path / "out" / "progress.json").read_text())["rows"] == 4
    assert _label(*argv) == 0
    assert "1 could not be decoded: dog/dog_9" in capsys.readouterr().out

    store = TokenLabelStore(tmp_path / "out")
    assert store.names == [k for k, _ in files] + ["dog/dog_9"]  # natural order: dog_9 after dog_2
    from volo_jax import data

    source = data.ImageFolderSource(tmp_path / "data", "train")  # the keys training will look up
    assert store.names == [data.token_label_key(source, i) for i in range(len(source))]
    assert store.grid == (4, 4) and store.topk == 3 and store.num_classes == 10
    assert store.meta["teacher"] == "volo_d1_224" and store.meta["checkpoint"] == str((tmp_path / "ckpt").resolve())
    assert store.meta["score_dtype"] == "float32"
    assert store.undecodable == {"dog/dog_9"}
    with pytest.raises(MissingTokenLabelError, match="could not be decoded"):
        store.lookup("dog/dog_9")
    store.check_covers(store.names)  # the training reader skips the undecodable image itself

    for key, path in files:
        tokens = model.forward_features(_whole_image(path, 64, model))  # (1, 1 + 16, C), class token first
        aux = np.asarray(model.aux_head(tokens[:, 1:]))[0].reshape(4, 4, 10)  # row-major token grid
        want_s, want_i = _topk(aux, 3)
        got_s, got_i = store.lookup(key)
        _assert_varies(got_s)
        np.testing.assert_array_equal(got_i, want_i, err_msg=key)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-4, atol=1e-5, err_msg=key)

    assert _label(*argv) == 0
    assert "already complete" in capsys.readouterr().out


def test_label_tokens_vovnet_dense_head_matches_pooled_logits(tmp_path):
    import jax.numpy as jnp

    import volo_jax
    from volo_jax.checkpoint import save_params
    from volo_jax.tools.label_tokens import dense_logits

    files = _image_folder(tmp_path / "data")
    model = volo_jax.create_model("ese_vovnet19b_slim_dw", num_classes=10, rngs=4)
    model.eval()
    # torch's default fc init gives logits ~1e-4 that barely vary; a unit-scale classifier makes positions differ
    rng = np.random.default_rng(4)
    model.head.fc.kernel[...] = jnp.asarray(rng.standard_normal(model.head.fc.kernel.shape), jnp.float32)
    x = np.concatenate([_whole_image(p, 96, model) for _, p in files[:2]])
    dense = np.asarray(dense_logits(model, jnp.asarray(x)))  # (2, 3, 3, 10)
    assert dense.shape == (2, 3, 3, 10)
    # avg-pool + linear head: the mean of the per-position logits IS the model's pooled output
    np.testing.assert_allclose(dense.mean(axis=(1, 2)), np.asarray(model(jnp.asarray(x))), rtol=1e-4, atol=1e-5)
    assert np.ptp(dense, axis=(1, 2)).max() > 1e-3  # positions differ, so the mean is a real check

    save_params(tmp_path / "ckpt", model, model_name="ese_vovnet19b_slim_dw")
    assert _label("--teacher", "ese_vovnet19b_slim_dw", "--checkpoint", tmp_path / "ckpt", tmp_path / "data",
                  tmp_path / "out", "--img-size", "96", "--topk", "2", "-b", "3", "--score-dtype", "float16") == 0
    store = TokenLabelStore(tmp_path / "out")
    assert store.grid == (3, 3) and store.meta["score_dtype"] == "float16"
    for key, path in files:
        want_s, want_i = _topk(np.asarray(dense_logits(model, jnp.asarray(_whole_image(path, 96, model))))[0], 2)
        got_s, got_i = store.lookup(key)
        _assert_varies(got_s)
        np.testing.assert_array_equal(got_i, want_i, err_msg=key)
        np.testing.assert_allclose(got_s, want_s.astype(np.float16).astype(np.float32), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("name, kwargs, size", [
    ("convit_tiny", {"global_pool": "avg"}, 32),  # linear head on avg-pooled tokens: mean of the map = logits
    ("poolformer_s12", {}, 32),  # a 1x1 final map: its only position IS the pooled one (norm and fc included)
])
def test_dense_head_other_families(name, kwargs, size):
    import jax.numpy as jnp

    import volo_jax
    from volo_jax.tools.label_tokens import dense_logits

    model = volo_jax.create_model(name, num_classes=7, img_size=size if "convit" in name else None, rngs=5, **kwargs)
    model.eval()
    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, size, size, 3)), jnp.float32)
    dense = np.asarray(dense_logits(model, x))
    pooled = np.asarray(model(x))
    assert dense.shape[0] == 2 and dense.shape[-1] == 7
    assert np.ptp(pooled, axis=0).max() > 1e-4  # images differ, so equality below is not trivial
    np.testing.assert_allclose(dense.mean(axis=(1, 2)), pooled, rtol=1e-4, atol=1e-6)


def test_label_tokens_arguments(tmp_path, capsys):
    from volo_jax.tools import label_tokens

    text = label_tokens.build_parser().format_help()
    for flag in ("--teacher", "--checkpoint", "--pretrained", "--split", "--topk", "--img-size", "--batch-size",
                 "--score-dtype", "DATA", "OUT"):
        assert flag in text
    _image_folder(tmp_path / "data")
    assert _label("--teacher", "volo_d1_224", "--checkpoint", tmp_path / "missing", tmp_path / "data",
                  tmp_path / "out") == 2
    assert "no such file" in _one_line_error(capsys)
    assert _label("--teacher", "volo_d1_224", "--checkpoint", tmp_path / "x", tmp_path / "nodata",
                  tmp_path / "out") == 2
    assert "no such directory" in _one_line_error(capsys)
    with pytest.raises(SystemExit):  # weights are required: labels from a random teacher are noise
        label_tokens.main(["--teacher", "volo_d1_224", str(tmp_path / "data"), str(tmp_path / "out")])
