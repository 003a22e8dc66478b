"""`volo_jax.token_label` against its references: torchvision's roi_align and the tlt 0.2.0 package (TokenLabeling).

tlt's pieces are loaded without ``tlt.data.__init__``, which imports timm internals that timm 1.0 no longer has:
``tlt/data/mixup.py`` by file location (it needs only numpy, torch and torchvision) and ``tlt.loss`` normally.
tlt's targets are ``(B, C, T)``; ours are ``(B, T, C)``, so the comparisons transpose.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tlt_reference import tlt_data_module, tlt_input

from volo_jax.token_label import mix_token_label_targets, roi_align, token_label_loss, token_label_targets

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
tlt_loss = pytest.importorskip("tlt.loss")


@pytest.fixture(scope="module")
def tlt_mixup():
    """``tlt/data/mixup.py`` as a module, bypassing ``tlt/data/__init__.py``."""
    return tlt_data_module("mixup")


# ------------------------------------------------------------------------------------------------------ roi_align


def _random_boxes(rng: np.random.Generator, n: int, h: int, w: int, out: int = 1) -> np.ndarray:
    """(n + 7, 4) boxes (x1, y1, x2, y2): random ones of every scale around the map, then the special cases."""
    corner = rng.uniform([-0.5 * w, -0.5 * h], [1.2 * w, 1.2 * h], (n, 2))
    # Sides from sub-pixel (clamped to 1 by aligned=False) to 3x the map (more samples than a box inside the map has).
    side = rng.uniform(0.0, 1.0, (n, 2)) * rng.choice([0.3, 3.0, 0.5 * max(h, w), 3.0 * max(h, w)], (n, 1))
    special = [
        [-0.5, -0.5, w - 0.5, h - 0.5],  # the whole map, as tlt's full crop
        [0.0, 0.0, w - 1.0, h - 1.0],
        [3.2, 2.1, 3.4, 2.5],  # < 1 px
        [5.0, 4.0, 2.0, 1.0],  # inverted: torchvision clamps the size to 1
        [-40.0, -30.0, 2.0 * w + 40, 3.0 * h + 30],  # far bigger than the map
        # Sides that are exact multiples of the output size: under jit XLA turns `x / out` into `x * (1 / out)`
        # (105 / 7 -> 15.000001), and a plain ceil of that would take one sample per bin too many.
        [-1.5, -2.0, -1.5 + 3 * out, -2.0 + 2 * out],
        [w + 2.0, h + 2.0, w + 9.0, h + 9.0],  # entirely outside: zeros
    ]
    return np.concatenate([np.concatenate([corner, corner + side], 1), special]).astype(np.float32)


@pytest.mark.parametrize("hw", [(15, 15), (9, 13)])
@pytest.mark.parametrize("out", [1, 7, 14, 24])
def test_roi_align_matches_torchvision(hw: tuple[int, int], out: int):
    H, W = hw
    rng = np.random.default_rng(out * 100 + H)
    boxes = _random_boxes(rng, 42, H, W, out)
    B = len(boxes)
    maps = rng.standard_normal((B, 5, H, W)).astype(np.float32)  # NCHW for torchvision
    rois = torch.cat([torch.arange(B, dtype=torch.float32)[:, None], torch.from_numpy(boxes)], 1)
    ref = torchvision.ops.roi_align(torch.from_numpy(maps), rois, (out, out), spatial_scale=1.0, sampling_ratio=-1,
                                    aligned=False).numpy().transpose(0, 2, 3, 1)  # (B, out, out, C)
    got = np.asarray(jax.jit(roi_align, static_argnums=2)(maps.transpose(0, 2, 3, 1), boxes, out))
    assert got.shape == (B, out, out, 5)
    # Both are fp32; each is ~5e-6 from a float64 roi_align on these O(1) inputs (rounding of the sample positions).
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # The comparison covers real pooling (not two arrays of zeros), the outside box gives zeros, and some boxes need
    # more samples per bin than any box inside the map.
    assert np.abs(ref[:-1]).max() > 0.5 and np.all(ref[-1] == 0)
    assert np.ceil((boxes[:, 2:] - boxes[:, :2]).max() / out) > np.ceil(max(H, W) / out)


def test_roi_align_output_size_pair_and_gradient():
    """(out_h, out_w) differs from a square output, and the map gradient equals torchvision's."""
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((3, 2, 11, 8)).astype(np.float32)
    boxes = np.array([[-0.5, -0.5, 7.5, 10.5], [1.3, 2.2, 5.1, 9.7], [-3.0, -2.0, 4.0, 3.0]], np.float32)
    cot = rng.standard_normal((3, 2, 5, 3)).astype(np.float32)
    t = torch.from_numpy(maps).requires_grad_()
    rois = torch.cat([torch.arange(3, dtype=torch.float32)[:, None], torch.from_numpy(boxes)], 1)
    ref = torchvision.ops.roi_align(t, rois, (5, 3), 1.0, -1, False)
    (ref * torch.from_numpy(cot)).sum().backward()

    def f(m):
        return jnp.sum(roi_align(m, boxes, (5, 3)) * cot.transpose(0, 2, 3, 1))

    grad = jax.grad(f)(maps.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(roi_align(maps.transpose(0, 2, 3, 1), boxes, (5, 3))),
                               ref.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), t.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
    assert np.abs(t.grad.numpy()).max() > 0.1


# ------------------------------------------------------------------------------------------------------ targets


def _label_maps(rng: np.random.Generator, B: int, k: int, H: int, W: int, C: int):
    """A fake teacher file per image: top-k logits (distinct classes per location), a crop box, a ground truth.

    Each image's locations draw their top k from the same 2k classes, as a real teacher's do (an object's classes
    recur across the map); k classes drawn anew per location from C=1000 would pool to a near-uniform target.
    """
    pool = np.argsort(rng.random((B, 1, 1, C)), axis=-1)[..., : 2 * k]  # (B, 1, 1, 2k) the image's classes
    pick = np.argsort(rng.random((B, H, W, 2 * k)), axis=-1)[..., :k]  # (B, H, W, k) distinct per location
    indices = np.take_along_axis(np.broadcast_to(pool, (B, H, W, 2 * k)), pick, -1).transpose(0, 3, 1, 2)
    scores = np.sort(rng.normal(8.0, 4.0, (B, k, H, W)), axis=1)[:, ::-1].astype(np.float32)  # logit-sized, top first
    img_h, img_w = 375, 500  # non-square image: (i/img_h, j/img_w, ...) are fractions of different lengths
    h = rng.integers(30, img_h + 1, B)
    w = rng.integers(30, img_w + 1, B)
    i = (rng.random(B) * (img_h - h + 1)).astype(int)
    j = (rng.random(B) * (img_w - w + 1)).astype(int)
    boxes = np.stack([i / img_h, j / img_w, h / img_h, w / img_w], 1).astype(np.float32)
    boxes[0] = [0.0, 0.0, 1.0, 1.0]  # a full crop
    labels = rng.integers(0, C, B)
    return scores, indices, boxes, labels


_jit_targets = jax.jit(token_label_targets, static_argnames=("num_classes", "label_size"))

# (C, k, H, W, S): small; non-square maps (tlt scales all four box coordinates by W); ImageNet's NFNet label files.
TARGET_CASES = [(24, 5, 9, 9, 7), (16, 3, 7, 10, 4), (1000, 5, 15, 15, 14)]


@pytest.mark.parametrize("case", TARGET_CASES, ids=lambda c: "C{}-k{}-{}x{}-S{}".format(*c))
@pytest.mark.parametrize("label_size", ["S", 1])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_label_targets_match_tlt(tlt_mixup, case, label_size, smoothing):
    C, k, H, W, S = case
    S = S if label_size == "S" else 1
    rng = np.random.default_rng(C + H + W + S)
    scores, indices, boxes, labels = _label_maps(rng, 4, k, H, W, C)
    off = smoothing / C
    ref = tlt_mixup.get_labelmaps_with_coords(tlt_input(scores, indices, boxes, labels), C,
                                              on_value=1 - smoothing + off, off_value=off, label_size=S,
                                              device="cpu").numpy().transpose(0, 2, 1)
    got = np.asarray(_jit_targets(scores, indices, boxes, labels, num_classes=C, label_size=S, smoothing=smoothing))
    assert got.shape == (4, 2 + S * S if S > 1 else 2, C) and got.dtype == np.float32
    # Both sides RoIAlign logits of up to ~25 in fp32, each ~1.5e-5 from float64 before the softmax; after it the
    # probabilities differ by up to ~5e-5 at C=1000. A transposed or shifted box moves them by O(0.01-1).
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=1e-6, atol=0)  # the ground truth (off: f32 vs f64 /C)
    # Images (and, with S > 1, tokens) get different targets: the comparison sees the maps and the crop.
    assert np.abs(ref[:, 1:] - ref[::-1, 1:]).max() > 1e-2
    assert S == 1 or ref[:, 2:].std(axis=1).max() > 1e-3
    assert np.abs(ref[:, 1:].sum(-1) - (1 + off)).max() < 1e-4  # tlt's smoothed tokens sum to 1 + smoothing / C


def test_tlt_crop_is_read_transposed_on_the_label_map(tlt_mixup):
    """tlt's quirk, pinned: a crop of the image's top half pools the map's *left* half (columns), not its top rows."""
    C = H = W = 8
    classes = np.broadcast_to(np.arange(W), (1, 1, H, W))  # class = column index everywhere
    indices = np.concatenate([classes, classes]).astype(np.int64)  # (B=2, k=1, H, W)
    scores = np.full((2, 1, H, W), 20.0, np.float32)
    boxes = np.array([[0.0, 0.0, 0.5, 1.0]] * 2, np.float32)  # (i/img_h, j/img_w, h/img_h, w/img_w): top half
    labels = np.zeros(2, np.int64)
    ref = tlt_mixup.get_labelmaps_with_coords(tlt_input(scores, indices, boxes, labels), C, label_size=1,
                                              device="cpu").numpy().transpose(0, 2, 1)
    got = np.asarray(token_label_targets(scores, indices, boxes, labels, num_classes=C, label_size=1))
    np.testing.assert_allclose(got, ref, atol=1e-6)
    cls = got[:, 1]  # (B, C) class-token target
    assert cls[:, : W // 2].sum(-1).min() > 0.99  # the left columns' classes; an untransposed crop would give 0.5


def test_aligned_crop_pools_the_region_the_image_crop_covers():
    """crop='aligned': the left half of the image pools the map's left columns, the top half all columns equally, and
    patch token (r, c) of a full crop lies over column block c (class = column index here)."""
    C = H = W = 8
    classes = np.broadcast_to(np.arange(W), (1, 1, H, W))
    indices = np.concatenate([classes, classes]).astype(np.int32)
    scores = np.full((2, 1, H, W), 20.0, np.float32)
    labels = np.zeros(2, np.int32)
    left = np.array([[0.0, 0.0, 1.0, 0.5]] * 2, np.float32)  # (top, left, h, w) fractions: left half
    top = np.array([[0.0, 0.0, 0.5, 1.0]] * 2, np.float32)  # top half
    cls_left = np.asarray(token_label_targets(scores, indices, left, labels, num_classes=C, label_size=1,
                                              crop="aligned"))[:, 1]
    cls_top = np.asarray(token_label_targets(scores, indices, top, labels, num_classes=C, label_size=1,
                                             crop="aligned"))[:, 1]
    assert cls_left[:, : W // 2].sum(-1).min() > 0.99
    np.testing.assert_allclose(cls_top, 1.0 / C, atol=0.02)  # every column equally
    full = np.array([[0.0, 0.0, 1.0, 1.0]] * 2, np.float32)
    patches = np.asarray(token_label_targets(scores, indices, full, labels, num_classes=C, label_size=4,
                                             crop="aligned"))[:, 2:].reshape(2, 4, 4, C)
    assert (patches.argmax(-1) // 2 == np.arange(4)[None, None, :]).all()
    with pytest.raises(ValueError, match="crop='xy'"):
        token_label_targets(scores, indices, full, labels, num_classes=C, label_size=1, crop="xy")


def test_token_label_targets_rows_are_independent():
    """Row b depends on image b only, also for B=1 (where tlt's ``squeeze()`` would drop the batch axis)."""
    scores, indices, boxes, labels = _label_maps(np.random.default_rng(3), 3, 4, 9, 9, 12)
    kw = dict(num_classes=12, label_size=6, smoothing=0.1)
    full = np.asarray(_jit_targets(scores, indices, boxes, labels, **kw))
    for b in range(3):
        one = np.asarray(_jit_targets(scores[b:b + 1], indices[b:b + 1], boxes[b:b + 1], labels[b:b + 1], **kw))
        np.testing.assert_allclose(one[0], full[b], rtol=0, atol=1e-6)
    assert np.abs(full[0] - full[1]).max() > 1e-2


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.25])
def test_mix_matches_tlt_mixup_target(tlt_mixup, lam):
    C, S, smoothing = 20, 5, 0.1
    scores, indices, boxes, labels = _label_maps(np.random.default_rng(4), 4, 3, 9, 9, C)
    targets = token_label_targets(scores, indices, boxes, labels, num_classes=C, label_size=S, smoothing=smoothing)
    got = np.asarray(mix_token_label_targets(targets, lam))
    ref = tlt_mixup.mixup_target(tlt_input(scores, indices, boxes, labels), C, lam, smoothing, device="cpu",
                                 label_size=S).numpy().transpose(0, 2, 1)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-5)
    # tlt's plain-label branch: smoothed one-hots mixed with the flipped batch; our ground-truth column, mixed.
    ref_1d = tlt_mixup.mixup_target(torch.from_numpy(labels), C, lam, smoothing, device="cpu").numpy()
    np.testing.assert_allclose(np.asarray(mix_token_label_targets(targets[:, 0], lam)), ref_1d, rtol=0, atol=1e-7)
    if lam < 1:
        assert np.abs(got - np.asarray(targets)).max() > 1e-2


# ------------------------------------------------------------------------------------------------------ loss


def _loss_inputs(rng: np.random.Generator, B: int = 4, grid: int = 4, C: int = 10):
    """Logits and (B, 2 + N, C) targets whose ground truth agrees with the class target's argmax on even rows."""
    N = grid * grid
    cls_logits = rng.standard_normal((B, C)).astype(np.float32) * 2
    aux_logits = rng.standard_normal((B, N, C)).astype(np.float32) * 2
    soft = np.asarray(jax.nn.softmax(rng.standard_normal((B, 1 + N, C)) * 2, axis=-1), np.float32)
    labels = (soft[:, 0].argmax(-1) + np.arange(B) % 2) % C  # odd rows disagree
    off = 0.1 / C
    gt = np.where(np.eye(C, dtype=bool)[labels], 1 - 0.1 + off, off).astype(np.float32)
    targets = np.concatenate([gt[:, None], soft * (1 - 0.1 + off) + off], axis=1)
    return cls_logits, aux_logits, targets


def _tlt_loss(cls_logits, aux_logits, bbox, targets, dense_weight, cls_weight, ground_truth) -> float:
    crit = tlt_loss.TokenLabelCrossEntropy(dense_weight=dense_weight, cls_weight=cls_weight, ground_truth=ground_truth)
    t = torch.from_numpy(np.array(targets))  # a writable copy (targets may be a read-only view of a jax array)
    if t.ndim == 3:
        t = t.transpose(1, 2).contiguous()  # tlt's (B, C, T)
    x = (torch.from_numpy(cls_logits), torch.from_numpy(aux_logits), tuple(int(v) for v in bbox))
    return float(crit(x, t))


_jit_loss = jax.jit(token_label_loss, static_argnames=("dense_weight", "cls_weight", "ground_truth"))

BOXES = {"none": (0, 0, 0, 0), "box": (1, 0, 3, 2), "full": (0, 0, 4, 4)}  # lam = 1, 0.75, 0 on a 4x4 grid


@pytest.mark.parametrize("weights", [(0.5, 1.0), (2.0, 0.3)], ids=["volo", "other"])
@pytest.mark.parametrize("ground_truth", [False, True])
@pytest.mark.parametrize("box", list(BOXES))
@pytest.mark.parametrize("kind", ["tokens", "plain"])
def test_loss_matches_tlt(weights, ground_truth, box, kind):
    cls_logits, aux_logits, targets = _loss_inputs(np.random.default_rng(5))
    if kind == "plain":
        targets = np.ascontiguousarray(targets[:, 1])  # (B, C): one soft target for the class and every token
    dense_weight, cls_weight = weights
    bbox = np.asarray(BOXES[box], np.int32)
    got = float(_jit_loss(cls_logits, aux_logits, bbox, targets, dense_weight=dense_weight, cls_weight=cls_weight,
                          ground_truth=ground_truth))  # bbox is traced: the lam < 1 branch is a select
    ref = _tlt_loss(cls_logits, aux_logits, bbox, targets, dense_weight, cls_weight, ground_truth)
    assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref))


def test_loss_imagenet_shape_with_mix_token():
    """C=1000, 14x14 tokens, targets from the label maps (mixed), MixToken box, VOLO's weights and ground_truth."""
    rng = np.random.default_rng(6)
    scores, indices, boxes, labels = _label_maps(rng, 4, 5, 15, 15, 1000)
    targets = mix_token_label_targets(
        _jit_targets(scores, indices, boxes, labels, num_classes=1000, label_size=14, smoothing=0.1), 0.8)
    targets = np.asarray(targets)
    cls_logits = rng.standard_normal((4, 1000)).astype(np.float32) * 3
    aux_logits = rng.standard_normal((4, 196, 1000)).astype(np.float32) * 3
    bbox = np.array([2, 5, 11, 9], np.int32)
    for gt in (False, True):
        got = float(_jit_loss(cls_logits, aux_logits, bbox, targets, dense_weight=0.5, cls_weight=1.0, ground_truth=gt))
        ref = _tlt_loss(cls_logits, aux_logits, bbox, targets, 0.5, 1.0, gt)
        assert abs(got - ref) <= 1e-5 * max(1.0, abs(ref))


def test_loss_gradients_match_tlt_and_every_input_matters():
    cls_logits, aux_logits, targets = _loss_inputs(np.random.default_rng(7))
    zeros, box = np.zeros(4, np.int32), np.asarray(BOXES["box"], np.int32)

    def loss(c, a, bbox=box, gt=True):
        return token_label_loss(c, a, bbox, targets, dense_weight=0.5, cls_weight=1.0, ground_truth=gt)

    g_cls, g_aux = jax.jit(jax.grad(loss, argnums=(0, 1)))(cls_logits, aux_logits)
    c, a = torch.from_numpy(cls_logits).requires_grad_(), torch.from_numpy(aux_logits).requires_grad_()
    crit = tlt_loss.TokenLabelCrossEntropy(dense_weight=0.5, cls_weight=1.0, ground_truth=True)
    crit((c, a, tuple(BOXES["box"])), torch.from_numpy(targets).transpose(1, 2)).backward()
    np.testing.assert_allclose(np.asarray(g_cls), c.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_aux), a.grad.numpy(), rtol=1e-5, atol=1e-8)
    assert np.isfinite(g_cls).all() and np.isfinite(g_aux).all()
    assert np.abs(c.grad.numpy()).max() > 1e-2 and np.abs(a.grad.numpy()).max() > 1e-3
    base = float(loss(cls_logits, aux_logits))
    assert abs(float(loss(cls_logits, aux_logits, bbox=zeros)) - base) > 1e-3  # MixToken mixes the class target
    assert abs(float(loss(cls_logits, aux_logits, gt=False)) - base) > 1e-3  # the ground-truth blend is applied
    bf16 = float(loss(cls_logits.astype(jnp.bfloat16), aux_logits.astype(jnp.bfloat16)))
    assert abs(bf16 - base) < 0.05  # bf16 logits are upcast before log_softmax


def test_loss_rejects_mismatched_targets():
    cls_logits, aux_logits, targets = _loss_inputs(np.random.default_rng(8))
    with pytest.raises(ValueError, match="2 \\+ N"):
        token_label_loss(cls_logits, aux_logits, np.zeros(4, np.int32), targets[:, :2])  # label_size=1 targets
    with pytest.raises(ValueError, match="must be > 0"):
        token_label_loss(cls_logits, aux_logits, np.zeros(4, np.int32), targets, dense_weight=0.0, cls_weight=0.0)
