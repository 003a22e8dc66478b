"""RandAugment (timm's ``--aa rand-m9-mstd0.5-inc1``): every op bit-identical to timm's ``AugmentOp`` at the same
magnitude, sign and filter; config strings parsed as timm parses them; the randomness all from the passed rng; and
the full train transform with it on."""

import random

import numpy as np
import pytest
from PIL import Image

from volo_jax import auto_augment as aa
from volo_jax import data

timm_aa = pytest.importorskip("timm.data.auto_augment")
skimage_data = pytest.importorskip("skimage.data")

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HPARAMS = aa.train_hparams((60, 72), MEAN)  # what timm's transforms_imagenet_train passes for a 60x72 crop
ALL_OPS = sorted(set(aa.RAND_TRANSFORMS) | set(aa.RAND_INCREASING_TRANSFORMS)
                 | {"Desaturate", "GaussianBlur", "TranslateX", "TranslateY"})


def _photo(size=(72, 60)) -> Image.Image:
    """The astronaut, resized non-square (x/y mix-ups show) and contrast-reduced (AutoContrast has work to do)."""
    x = np.asarray(Image.fromarray(skimage_data.astronaut()).resize(size, Image.Resampling.BILINEAR), np.float32)
    return Image.fromarray((x * 0.7 + 30).astype(np.uint8))


@pytest.mark.parametrize("name", ALL_OPS)
def test_each_op_is_bit_identical_to_timm(name, monkeypatch):
    img = _photo()
    spec = aa._OPS[name]
    signs = (False, True) if spec.signed else (False,)
    filters = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC) if spec.geometric else (None,)
    outputs = []  # every output, as bytes
    for magnitude in (0, 3.7, 5, 9, 10):
        for negate in signs:
            # timm draws the sign from the global `random`; pin it to compare one sign at a time
            monkeypatch.setattr(timm_aa, "_randomly_negate", lambda v, n=negate: -v if n else v)
            for resample in filters:
                hp = dict(HPARAMS, interpolation=resample) if resample is not None else dict(HPARAMS)
                ours = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=HPARAMS)
                try:
                    ref = timm_aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)(img)
                except ValueError:  # Pillow >= 13 refuses posterize(img, 0); older Pillow (timm's intent) gave black
                    assert name.startswith("Posterize") and ours.level_arg(magnitude) == 0
                    ref = Image.new("RGB", img.size)
                out = ours.apply(img, magnitude, negate=negate, resample=resample)
                assert out.mode == ref.mode and out.size == ref.size
                np.testing.assert_array_equal(np.asarray(out), np.asarray(ref), err_msg=f"{name} m={magnitude} "
                                              f"negate={negate} resample={resample}")
                # and through __call__ with a fixed filter (no draws but the sign)
                fixed = aa.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)
                for seed in range(4):
                    rng = np.random.default_rng(seed)
                    want_negate = spec.signed and np.random.default_rng(seed).random() > 0.5
                    if want_negate == negate:
                        np.testing.assert_array_equal(np.asarray(fixed(img, rng)), np.asarray(ref))
                outputs.append(np.asarray(out).tobytes())
    # not vacuous: the op changes the photo, and its magnitude (or sign) matters when it takes one
    assert any(c != np.asarray(img).tobytes() for c in outputs), f"{name} never changed the photo"
    assert spec.level is None or len(set(outputs)) >= 3, f"{name}: the magnitude barely matters on this photo"


def test_random_sign_and_filter_come_from_the_rng():
    """Signed ops negate with probability 1/2 (timm's ``random.random() > 0.5``); with 'random' interpolation each
    geometric op picks bilinear or bicubic, both often."""
    img = _photo()
    op = aa.AugmentOp("Rotate", prob=1.0, magnitude=9, hparams=aa.train_hparams((60, 72), MEAN))  # random filter
    seen = {}
    for seed in range(200):
        out = np.asarray(op(img, np.random.default_rng(seed)))
        for negate in (False, True):
            for resample in (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC):
                if np.array_equal(out, np.asarray(op.apply(img, 9, negate=negate, resample=resample))):
                    seen[negate, resample] = seen.get((negate, resample), 0) + 1
                    break
    assert sum(seen.values()) == 200 and len(seen) == 4 and min(seen.values()) > 25
    assert op.level_arg(9, negate=False) == 27.0 and op.level_arg(9, negate=True) == -27.0


def test_op_probability_skips_the_op():
    img = _photo()
    op = aa.AugmentOp("Invert", prob=0.3, magnitude=9)
    applied = [not np.array_equal(np.asarray(op(img, np.random.default_rng(s))), np.asarray(img)) for s in range(400)]
    assert 0.22 < np.mean(applied) < 0.38


@pytest.mark.parametrize("config", ["rand-m9-mstd0.5-inc1", "rand-m7-n3-p0.8-mstd101", "rand-m15-mmax20-n1",
                                    "rand-m9-mstd0.5", "rand-m9-tweights", "rand-m5-t3a", "rand-inc1-t3aw-n4",
                                    "rand-n0"])
def test_parsing_matches_timm(config):
    ref = timm_aa.rand_augment_transform(config, dict(HPARAMS))
    ours = aa.rand_augment_transform(config, HPARAMS)
    assert ours.num_layers == ref.num_layers
    assert [op.name for op in ours.ops] == [op.name for op in ref.ops]
    for o, r in zip(ours.ops, ref.ops, strict=True):
        assert (o.magnitude, o.magnitude_std, o.magnitude_max, o.prob) == (
            r.magnitude, r.magnitude_std, r.magnitude_max, r.prob)
        assert o.fill == r.kwargs["fillcolor"]
    if ref.choice_weights is None:
        assert ours.choice_weights is None
    else:
        np.testing.assert_array_equal(ours.choice_weights, ref.choice_weights)


def test_train_hparams_match_timm_create_transform():
    """The hparams timm's ``transforms_imagenet_train`` builds (translate_const, fill, interpolation)."""
    create_transform = pytest.importorskip("timm.data").create_transform
    for size, interp in (((224, 224), "random"), ((32, 48), "bicubic")):
        tf = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation=interp,
                              mean=MEAN, std=STD)
        ref = next(t for t in tf.transforms if isinstance(t, timm_aa.RandAugment))
        ours = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", aa.train_hparams(size, MEAN, interp))
        r, o = ref.ops[0], ours.ops[0]
        assert o.hparams["translate_const"] == r.hparams["translate_const"]
        assert o.fill == r.kwargs["fillcolor"]
        want = None if isinstance(r.kwargs["resample"], tuple) else r.kwargs["resample"]
        assert aa._resample(o.hparams.get("interpolation")) == want


def test_same_seed_same_output_other_seeds_differ():
    img = _photo()
    ra = aa.rand_augment_transform("rand-m9-mstd0.5-inc1", HPARAMS)
    outs = [np.asarray(ra(img, np.random.default_rng(s))) for s in range(8)]
    again = [np.asarray(ra(img, np.random.default_rng(s))) for s in range(8)]
    for a, b in zip(outs, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len({o.tobytes() for o in outs}) >= 6
    state = random.getstate(), np.random.get_state()[1].copy()  # the global generators are never touched
    ra(img, np.random.default_rng(0))
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])


def test_op_choice_is_uniform_with_replacement_and_weighted_without():
    ra = aa.rand_augment_transform("rand-m9-n2", HPARAMS)
    rng = np.random.default_rng(0)
    counts = np.zeros(len(ra.ops))
    for _ in range(3000):
        np.add.at(counts, rng.choice(len(ra.ops), ra.num_layers, replace=True), 1)
    assert counts.min() > 0.8 * counts.mean()
    weighted = aa.rand_augment_transform("rand-m9-n3-tweights", HPARAMS)
    assert weighted.choice_weights is not None and abs(sum(weighted.choice_weights) - 1) < 1e-12
    img = _photo((16, 12))
    for s in range(20):  # runs: three distinct ops per image, drawn without replacement
        weighted(img, np.random.default_rng(s))


@pytest.mark.parametrize("mstd,mean,std", [(0.5, 9.0, 0.5), (101, 4.5, 9 / 12**0.5)])
def test_magnitude_noise(mstd, mean, std):
    """mstd 0.5: N(9, 0.5) clipped to [0, 10]; mstd > 100: U(0, 9) (timm's 'infinite' std)."""
    op = aa.rand_augment_transform(f"rand-m9-mstd{mstd}", HPARAMS).ops[0]
    rng = np.random.default_rng(0)
    m = np.array([op.sample_magnitude(rng) for _ in range(20000)])
    assert 0 <= m.min() and m.max() <= 10
    assert abs(m.mean() - mean) < 0.03 * std + 0.01 and abs(m.std() - std) < 0.03 * std
    if mstd == 0.5:
        assert (m == 10).mean() < 0.05 and m.max() == 10  # the 2-sigma tail is clipped, not dropped
    assert aa.rand_augment_transform("rand-m9", HPARAMS).ops[0].sample_magnitude(rng) == 9
    assert aa.rand_augment_transform("rand-m15-mmax20", HPARAMS).ops[0].sample_magnitude(rng) == 15
    assert aa.rand_augment_transform("rand-m15", HPARAMS).ops[0].sample_magnitude(rng) == 10


@pytest.mark.parametrize("photo", [False, True])
def test_train_transform_with_rand_augment(photo):
    if photo:
        img, size = Image.fromarray(skimage_data.astronaut()).resize((300, 200)), (48, 40)
    else:  # a digit-like 32x32 image: dark background, one bright stroke, grayscale
        a = np.zeros((32, 32), np.uint8)
        a[6:26, 14:18] = 255
        img, size = Image.fromarray(a, "L"), (32, 32)
    cfg = data.TrainConfig(img_size=size, mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1")
    plain = data.TrainConfig(img_size=size, mean=MEAN, std=STD)
    differs = 0
    for seed in range(12):
        x = data.train_transform(img, cfg, np.random.default_rng(seed))
        assert x.shape == (*size, 3) and x.dtype == np.float32 and np.isfinite(x).all()
        np.testing.assert_array_equal(x, data.train_transform(img, cfg, np.random.default_rng(seed)))
        differs += not np.array_equal(x, data.train_transform(img, plain, np.random.default_rng(seed)))
    assert differs >= 6  # RandAugment does something (each of 2 ops applies with p=0.5)


def test_train_transform_without_aa_is_crop_flip_normalize():
    img = _photo()
    cfg = data.TrainConfig(img_size=(24, 20), mean=MEAN, std=STD, reprob=0.0, interpolation="bicubic")
    x = data.train_transform(img, cfg, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    box = data.random_resized_crop_params(rng, img.width, img.height, cfg.scale, cfg.ratio)
    ref = data.crop_resize_flip_normalize(img, box, cfg.img_size, "bicubic", bool(rng.random() < 0.5), MEAN, STD)
    np.testing.assert_array_equal(x, ref)


@pytest.mark.parametrize("config,match", [
    ("rand-m9-foo3", "unknown key 'foo'"),
    ("augmix-m3", "AugMix"),
    ("original-mstd0.5", "AutoAugment"),
    ("", "use None"),
    ("rand-m9-inc", "has no value"),
    ("rand-m9.5", "bad value"),
    ("rand-w0", "tweights"),
    ("rand-tfoo", "unknown op set"),
    ("rand-p1.5", r"not in \[0, 1\]"),
    ("rand-n20-tweights", "without replacement"),
])
def test_bad_strings_are_clear_errors(config, match):
    with pytest.raises(aa.AugmentConfigError, match=match):
        aa.rand_augment_transform(config, HPARAMS)
    with pytest.raises(data.DataError, match=match):  # at config construction, not in a decoding thread
        data.TrainConfig(img_size=(16, 16), mean=MEAN, std=STD, auto_augment=config)


class _Digits:
    """Eight in-memory 32x32 'digits' (a bright bar at a per-index column)."""

    def __len__(self):
        return 8

    def load(self, index):
        a = np.zeros((32, 32, 3), np.uint8)
        a[6:26, 4 + 3 * index:8 + 3 * index] = 255
        return Image.fromarray(a), index

    def name(self, index):
        return f"digit{index}.png"


def test_stream_with_rand_augment_is_deterministic_across_threads():
    cfg = data.TrainConfig(img_size=(32, 32), mean=MEAN, std=STD, auto_augment="rand-m9-mstd0.5-inc1")
    a, _ = data.train_batches(_Digits(), cfg, 4, seed=1, workers=2)
    b, _ = data.train_batches(_Digits(), cfg, 4, seed=1, workers=1)
    for _ in range(4):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["label"], y["label"])
        np.testing.assert_array_equal(x["image"], y["image"])
