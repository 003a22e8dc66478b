"""Token labeling on the input side: the label maps move with the image exactly as TokenLabeling's ``tlt`` moves
them (flip, RandAugment's spatial ops), the crop box is tlt's, and the grain stream carries maps and boxes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tlt_reference import tlt_data_module

from volo_jax import auto_augment as aa
from volo_jax import data

torch = pytest.importorskip("torch")
pytest.importorskip("scipy")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SPATIAL = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _maps(rng: np.random.Generator, k: int = 5, h: int = 15, w: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """Random top-k maps on a non-square grid (an x/y mix-up shows) with distinct indices per position."""
    scores = rng.normal(size=(k, h, w)).astype(np.float32) * 5 + 10
    indices = np.argsort(rng.random((40, h, w)), axis=0)[:k].astype(np.int32)
    return scores, indices


@pytest.mark.parametrize("name", SPATIAL)
def test_spatial_label_ops_equal_tlt(name):
    tlt_aug = tlt_data_module("random_augment_label")
    rng = np.random.default_rng(0)
    scores, indices = _maps(rng)
    moved = 0
    for arg in (-0.45, -0.3, 0.1, 0.3) if name != "Rotate" else (-30.0, -12.5, 7.0, 30.0):
        ours = aa.label_op(name, (scores, indices), arg)
        label = torch.from_numpy(np.stack([scores, indices.astype(np.float32)]))  # tlt's (2, k, H, W) float tensor
        ref = tlt_aug.NAME_TO_LABELOP[name](label, arg).numpy()
        np.testing.assert_array_equal(ours[0], ref[0])
        np.testing.assert_array_equal(ours[1], ref[1].astype(np.int32))
        moved += not np.array_equal(ours[0], scores)
    assert moved == 4, "the op left the maps where they were"


def test_colour_ops_and_absolute_translations_leave_the_maps():
    rng = np.random.default_rng(1)
    maps = _maps(rng)
    for name in ("Color", "Solarize", "Equalize", "TranslateX", "TranslateY", "GaussianBlur"):
        out = aa.label_op(name, maps, 0.3)
        assert out[0] is maps[0] and out[1] is maps[1]


def test_label_aware_randaugment_draws_like_the_plain_one():
    """The same seed gives the same image with or without maps (the op choices and magnitudes do not shift), and
    the maps move exactly by the spatial ops that were applied."""
    ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", aa.train_hparams((64, 64), MEAN))
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    maps = _maps(np.random.default_rng(3))
    changed = 0
    for seed in range(12):
        plain = ra(img, np.random.default_rng(seed))
        with_label, moved = ra.apply_with_label(img, maps, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(plain), np.asarray(with_label))
        changed += not np.array_equal(moved[0], maps[0])
    assert 0 < changed < 12  # some draws picked a spatial op, some did not


def test_token_label_transform_flips_and_records_the_crop_box():
    cfg = data.TrainConfig(img_size=(32, 32), mean=MEAN, std=STD, scale=(0.3, 0.6), hflip=1.0, reprob=0.0,
                           interpolation="bilinear")
    x_img = np.random.default_rng(4).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    img = Image.fromarray(x_img)
    scores, indices = _maps(np.random.default_rng(5))
    rng_a, rng_b = np.random.default_rng(6), np.random.default_rng(6)
    x, (s, i), box = data.token_label_train_transform(img, (scores, indices), cfg, rng_a)
    np.testing.assert_array_equal(s, scores[..., ::-1])  # hflip 1.0 and no RandAugment: the maps mirrored only
    np.testing.assert_array_equal(i, indices[..., ::-1])
    # The box is tlt's (top/H, left/W, h/H, w/W) of the crop taken from the flipped image: redo it by hand.
    rng_b.random()  # the flip draw
    top, left, h, w = data.random_resized_crop_params(rng_b, 60, 40, cfg.scale, cfg.ratio)
    np.testing.assert_allclose(box, [top / 40, left / 60, h / 40, w / 60], rtol=1e-6)
    flipped = Image.fromarray(x_img[:, ::-1])
    expect = data.crop_resize_flip_normalize(flipped, (top, left, h, w), (32, 32), "bilinear", False, MEAN, STD)
    np.testing.assert_array_equal(x, expect)
    assert x.shape == (32, 32, 3) and box.dtype == np.float32


class _Store:
    """A minimal stand-in for TokenLabelStore: maps keyed by tlt's key."""

    def __init__(self, keys, missing=()):
        rng = np.random.default_rng(7)
        self.maps = {k: _maps(rng, k=3, h=6, w=6) for k in keys if k not in missing}

    def lookup(self, key):
        return self.maps[key]

    def check_covers(self, keys):
        lost = [k for k in keys if k not in self.maps]
        if lost:
            raise ValueError(f"no token-label maps for {len(lost)} image(s): {', '.join(lost[:5])}")


def _folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(8)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for j in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{cls}_{j}.v1.png")
    return tmp_path


def test_keys_are_tlts_and_the_stream_carries_maps_and_boxes(tmp_path):
    source = data.ImageFolderSource(_folder(tmp_path), split="train")
    keys = [data.token_label_key(source, i) for i in range(len(source))]
    assert keys[:2] == ["a/a_0", "a/a_1"]  # class folder / file name up to its FIRST dot, as tlt cuts it
    cfg = data.TrainConfig(img_size=(16, 16), mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1")
    it, _ = data.train_batches(source, cfg, 4, seed=0, workers=1, token_labels=_Store(keys))
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["tl_scores"].shape == (4, 3, 6, 6) and batch["tl_scores"].dtype == np.float32
    assert batch["tl_indices"].shape == (4, 3, 6, 6) and batch["tl_indices"].dtype == np.int32
    assert batch["tl_box"].shape == (4, 4) and (batch["tl_box"] > 0).any() and (batch["tl_box"] <= 1).all()
    with pytest.raises(ValueError, match="no token-label maps for 1 image.*b/b_2"):
        data.train_batches(source, cfg, 4, seed=0, workers=1, token_labels=_Store(keys, missing=("b/b_2",)))
