"""The training input pipeline: timm/torchvision's train transform pieces, and a deterministic, resumable, sharded
grain stream that visits every image once per epoch and skips broken files without stopping."""

import numpy as np
import pytest
from PIL import Image

from volo_jax import data

torch = pytest.importorskip("torch")
F = pytest.importorskip("torchvision.transforms.functional")
T = pytest.importorskip("torchvision.transforms")
skimage_data = pytest.importorskip("skimage.data")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _photo() -> Image.Image:
    return Image.fromarray(skimage_data.astronaut())  # 512x512 RGB photograph


@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
@pytest.mark.parametrize("flip", [False, True])
def test_crop_resize_flip_normalize_matches_torchvision(interp, flip):
    img = _photo().resize((300, 200))
    box = (17, 40, 150, 111)  # top, left, h, w
    ours = data.crop_resize_flip_normalize(img, box, (64, 48), interp, flip, MEAN, STD)
    mode = T.InterpolationMode.BILINEAR if interp == "bilinear" else T.InterpolationMode.BICUBIC
    ref = F.resized_crop(img, *box, [64, 48], mode)
    if flip:
        ref = F.hflip(ref)
    ref = F.normalize(F.to_tensor(ref), MEAN, STD).numpy().transpose(1, 2, 0)
    np.testing.assert_array_equal(ours, ref)


def test_random_resized_crop_params_follow_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = data.random_resized_crop_params(rng, 300, 200, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        assert 0.08 * 0.9 <= h * w / 60000 <= 1.0 + 1e-9
    # the fallback (no try fits) is deterministic: torchvision's own result
    for size, scale in (((1000, 10), (0.9, 1.0)), ((10, 1000), (0.9, 1.0)), ((300, 200), (2.0, 3.0))):
        ours = data.random_resized_crop_params(rng, *size, scale, (3 / 4, 4 / 3))
        theirs = T.RandomResizedCrop.get_params(Image.new("RGB", size), list(scale), [3 / 4, 4 / 3])
        assert ours == tuple(theirs)


def test_random_erasing_pixel_mode():
    x = np.ones((40, 50, 3), np.float32)
    assert np.array_equal(data.random_erasing(x.copy(), np.random.default_rng(0), 0.0), x)
    areas = []
    for seed in range(50):
        y = data.random_erasing(x.copy(), np.random.default_rng(seed), 1.0)
        changed = (y != 1).any(axis=-1)
        rows, cols = np.nonzero(changed)
        assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one box
        areas.append(changed.sum() / (40 * 50))
    assert 0.02 * 0.8 <= min(areas) and max(areas) <= 1 / 3 * 1.2


class _Source:
    """In-memory images; label = index; index 7 is a broken file."""

    def __init__(self, n: int, broken: tuple[int, ...] = ()):
        self.n, self.broken = n, broken

    def __len__(self):
        return self.n

    def load(self, index):
        if index in self.broken:
            raise OSError("image file is truncated")
        value = (index * 37) % 256
        return Image.new("RGB", (20 + index % 5, 18), (value, 255 - value, 128)), index

    def name(self, index):
        return f"img{index}.png"


CFG = data.TrainConfig(img_size=(16, 16), mean=MEAN, std=STD)


def _labels(it, steps):
    return [next(it)["label"].tolist() for _ in range(steps)]


def test_stream_is_deterministic_covers_each_epoch_and_resumes():
    n, batch = 24, 6
    it, _ = data.train_batches(_Source(n), CFG, batch, seed=3, workers=2)
    first = [next(it) for _ in range(8)]
    epoch0 = sorted(sum((b["label"].tolist() for b in first[:4]), []))
    epoch1 = sorted(sum((b["label"].tolist() for b in first[4:]), []))
    assert epoch0 == epoch1 == list(range(n))  # every image once per epoch
    assert [b["label"].tolist() for b in first[:4]] != [b["label"].tolist() for b in first[4:]]  # reshuffled
    again, _ = data.train_batches(_Source(n), CFG, batch, seed=3, workers=1)  # other thread count, same stream
    for a in first:
        b = next(again)
        np.testing.assert_array_equal(a["label"], b["label"])
        np.testing.assert_array_equal(a["image"], b["image"])
    # resume: a fresh iterator set to the saved state continues exactly
    it, _ = data.train_batches(_Source(n), CFG, batch, seed=3)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    resumed, _ = data.train_batches(_Source(n), CFG, batch, seed=3)
    resumed.set_state(state)
    for a in want:
        b = next(resumed)
        np.testing.assert_array_equal(a["image"], b["image"])
    other, _ = data.train_batches(_Source(n), CFG, batch, seed=4)
    assert _labels(other, 4) != [b["label"].tolist() for b in first[:4]]


def test_processes_take_disjoint_shares():
    n, batch = 24, 8
    seen = []
    for p in range(2):
        it, _ = data.train_batches(_Source(n), CFG, batch, seed=0, process_index=p, process_count=2)
        labels = sum(_labels(it, 3), [])  # 3 steps x 4 local = 12 = half an epoch... per process
        assert len(labels) == 12
        seen.append(set(labels))
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == n


def test_broken_images_are_skipped_and_named():
    it, loader = data.train_batches(_Source(12, broken=(7,)), CFG, 4, seed=0)
    batches = [next(it) for _ in range(6)]
    assert all(b["image"].shape == (4, 16, 16, 3) for b in batches)
    assert 7 not in sum((b["label"].tolist() for b in batches), [])
    assert list(loader.skipped) == ["img7.png"] and "truncated" in loader.skipped["img7.png"]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(data.DataError, match="fewer than one global batch"):
        data.train_batches(_Source(3), CFG, 8, seed=0)
    with pytest.raises(data.DataError, match="not divisible"):
        data.train_batches(_Source(30), CFG, 9, seed=0, process_count=2)
