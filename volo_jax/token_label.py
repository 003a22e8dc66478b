"""Token labeling: dense per-token targets from a teacher's label maps, and VOLO's token-labeling loss.

Pure-JAX, torch-free rewrite of the math in the TokenLabeling project's ``tlt`` package 0.2.0 (Jiang et al., "All
Tokens Matter: Token Labeling for Training Better Vision Transformers", https://github.com/zihangJiang/TokenLabeling),
which VOLO trains with (https://github.com/sail-sg/volo). ``tests/test_token_label.py`` checks every function
against the original:

- `roi_align`: ``torchvision.ops.roi_align(..., spatial_scale=1, sampling_ratio=-1, aligned=False)``, channels-last.
- `token_label_targets`: ``tlt.data.mixup.get_labelmaps_with_coords`` (teacher top-k maps -> crop -> per-token
  soft labels), in a tokens-before-classes layout.
- `mix_token_label_targets`: the label-map branch of ``tlt.data.mixup.mixup_target``.
- `token_label_loss`: ``tlt.loss.TokenLabelCrossEntropy``, MixToken and ``ground_truth`` correction included.

Target layout, ``(B, T, C)`` float32 with T = 2 + S*S (or 2 when ``label_size == 1``): token 0 is the (smoothed)
one-hot ground truth, token 1 the class token's target, tokens 2: the patch tokens in row-major order of the S x S
grid. tlt stores the same numbers as ``(B, C, T)``; ours is that array transposed, so a token's target is one
contiguous row that lines up with the model's ``(B, N, C)`` aux logits.

Everything is jit-able with static shapes; ``num_classes`` and ``label_size`` must be static.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["roi_align", "token_label_targets", "mix_token_label_targets", "token_label_loss"]


def _bin_weights(start: jax.Array, length: jax.Array, out: int, size: int) -> jax.Array:
    """Per-box RoIAlign weights along one axis: ``(B, out, size)``; row p averages bin p's bilinear samples.

    torchvision (sampling_ratio=-1, aligned=False) clamps the RoI length to >= 1, splits it into ``out`` bins of
    ``bin = length / out`` and takes ``g = ceil(length / out)`` evenly spaced samples per bin. A sample y outside
    [-1, size] weighs nothing; otherwise y is clamped to [0, size - 1] and linearly interpolated, which is the tent
    ``max(0, 1 - |y - i|)`` over pixel centres i. The 2-D bilinear weight is the product of the row and column weights
    and the out-of-range test is per axis, so the 2-D RoIAlign average is this matrix along y times the one along x.

    g depends on the box, so it cannot be a static loop length. Only samples inside [-1, size] count, and few can be:
    with g >= 2 the spacing ``bin / g`` exceeds 1/2 (g - 1 < bin <= g), so a closed interval of length size + 1 holds
    at most 2 * (size + 1) of them (g == 1 is a single sample). We therefore walk a window of ``2 * size + 4``
    consecutive sample indices, starting one or two before the first sample at y >= -1 (a margin for rounding), and
    mask indices >= g. That is exact for every box, inside the map or not, of any size, at a cost independent of it.
    """
    length = jnp.maximum(length, 1.0)  # torchvision: "Force malformed ROIs to be 1x1" (aligned=False)
    # Under jit XLA compiles `x / 7` as `x * (1 / 7)`: 105 / 7 becomes 15.000001 and its ceil one sample too many.
    # Hiding the constant behind a barrier keeps a true, correctly rounded division, as in torchvision's C++.
    out_f = jax.lax.optimization_barrier(jnp.float32(out))
    bin_size = length / out_f  # (B,)
    grid = jnp.ceil(length / out_f)  # (B,) samples per bin, kept as float (exact integers)
    # torchvision's order of operations: roi_start + p * bin_size + (i + 0.5) * bin_size / grid.
    base = start[:, None] + jnp.arange(out, dtype=jnp.float32) * bin_size[:, None]  # (B, out)
    step = (bin_size / grid)[:, None]  # (B, 1)
    first = jnp.maximum(jnp.floor((-1.0 - base) / step - 0.5) - 1.0, 0.0)  # (B, out) window start
    idx = first[..., None] + jnp.arange(2 * size + 4, dtype=jnp.float32)  # (B, out, K) sample indices
    y = base[..., None] + (idx + 0.5) * bin_size[:, None, None] / grid[:, None, None]  # (B, out, K)
    valid = (idx < grid[:, None, None]) & (y >= -1.0) & (y <= size)
    y = jnp.clip(y, 0.0, size - 1)
    w = jnp.maximum(0.0, 1.0 - jnp.abs(y[..., None] - jnp.arange(size, dtype=jnp.float32)))  # (B, out, K, size)
    return jnp.where(valid[..., None], w, 0.0).sum(axis=2) / grid[:, None, None]  # (B, out, size)


def roi_align(maps: jax.Array, boxes: jax.Array, output_size: int | tuple[int, int]) -> jax.Array:
    """``torchvision.ops.roi_align(spatial_scale=1, sampling_ratio=-1, aligned=False)`` with one box per map.

    Channels-last, like the rest of volo_jax and like the ``(tokens, classes)`` targets built from it. RoIAlign is
    separable, so the pooled map is ``Ay @ map @ Ax^T`` with per-box weight matrices (see `_bin_weights`): one einsum,
    no gathers, exact for boxes partly or wholly outside the map and for boxes smaller than a pixel.

    Args:
        maps: ``(B, H, W, C)``.
        boxes: ``(B, 4)`` as ``(x1, y1, x2, y2)`` in the map's pixel coordinates (pixel centres at integers);
            box b pools map b (torchvision's batch-index column is ``arange(B)``).
        output_size: ``out`` or ``(out_h, out_w)``.

    Returns:
        float32 ``(B, out_h, out_w, C)``.
    """
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    _, H, W, _ = maps.shape
    x1, y1, x2, y2 = jnp.moveaxis(jnp.asarray(boxes, jnp.float32), -1, 0)  # each (B,)
    ay = _bin_weights(y1, y2 - y1, out_h, H)  # (B, out_h, H)
    ax = _bin_weights(x1, x2 - x1, out_w, W)  # (B, out_w, W)
    # Labels, not activations: keep full fp32 even where the default matmul precision is reduced (TPU, TF32).
    return jnp.einsum("bph,bhwc,bqw->bpqc", ay, maps.astype(jnp.float32), ax, precision=jax.lax.Precision.HIGHEST)


def _dense_label_maps(scores: jax.Array, indices: jax.Array, num_classes: int) -> jax.Array:
    """tlt's ``get_featuremaps``: scatter the top-k scores into zeros, ``(B, k, H, W)`` -> ``(B, H, W, C)``.

    Classes outside a pixel's top k get 0, not -inf, which the later softmax sees as a real logit (tlt does the same).
    Top-k indices are distinct per pixel, so `.set` order does not matter (tlt uses ``scatter_``, also a set).
    """
    B, _, H, W = scores.shape
    b = jnp.arange(B)[:, None, None, None]
    h = jnp.arange(H)[None, None, :, None]
    w = jnp.arange(W)[None, None, None, :]
    dense = jnp.zeros((B, H, W, num_classes), jnp.float32)
    return dense.at[b, h, w, indices.astype(jnp.int32)].set(scores.astype(jnp.float32))


def _tlt_roi_boxes(coords: jax.Array, map_w: int) -> jax.Array:
    """tlt's RoI boxes for its crop coordinates, quirk included: ``(B, 4)`` fractions -> ``(B, 4)`` pixels.

    ``RandomResizedCropAndInterpolationWithCoords`` stores ``(i/img_h, j/img_w, h/img_h, w/img_w)`` = (top, left,
    height, width). ``get_labelmaps_with_coords`` adds the first two to the last two, giving (y1, x1, y2, x2), and
    ``get_label`` scales all four by the map's *width* and subtracts 0.5, then hands them to roi_align, which reads
    ``(x1, y1, x2, y2)``. So the crop's vertical extent is pooled along the map's W axis and its horizontal extent
    along H: the crop is transposed on the label map (harmless only for crops symmetric about the diagonal). We
    reproduce this exactly, because it is what VOLO's published models were trained with.
    """
    c = jnp.asarray(coords, jnp.float32)
    corners = jnp.concatenate([c[:, :2], c[:, 2:] + c[:, :2]], axis=1)  # (B, 4) = (y1, x1, y2, x2) fractions
    return corners * map_w - 0.5  # read by roi_align as (x1, y1, x2, y2)


def _aligned_roi_boxes(coords: jax.Array, map_h: int, map_w: int) -> jax.Array:
    """The crop on the label map the way the image was cropped (``crop='aligned'``): x from the crop's left and
    width, y from its top and height, each scaled by its own map side; the same -0.5 pixel-centre shift as tlt."""
    c = jnp.asarray(coords, jnp.float32)
    top, left, h, w = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    return jnp.stack([left * map_w, top * map_h, (left + w) * map_w, (top + h) * map_h], axis=1) - 0.5


def token_label_targets(scores: jax.Array, indices: jax.Array, boxes: jax.Array, labels: jax.Array, *,
                        num_classes: int, label_size: int, smoothing: float = 0.0, crop: str = "tlt") -> jax.Array:
    """Per-token soft targets from a teacher's top-k label maps, tlt's ``get_labelmaps_with_coords``.

    The crop's RoI on the dense score map is RoIAligned to ``label_size x label_size`` (patch tokens) and to 1 x 1
    (class token), each softmaxed over classes, scaled by ``on_value`` and shifted by ``off_value`` (so a token's
    target sums to ``1 + smoothing / num_classes``, as in tlt); the ground truth is a smoothed one-hot. on/off values
    are ``mixup_target``'s: ``off = smoothing / C``, ``on = 1 - smoothing + off``.

    Args:
        scores: ``(B, k, H, W)`` the teacher's top-k class scores (logits) per location (token-label file ``[0]``).
        indices: ``(B, k, H, W)`` their class indices (file ``[1]``), distinct per location.
        boxes: ``(B, 4)`` the crop as tlt stores it, ``(i/img_h, j/img_w, h/img_h, w/img_w)``; see `_tlt_roi_boxes`
            for how tlt (and so this function) maps it onto the label map.
        labels: ``(B,)`` integer ground-truth classes.
        num_classes: C (static).
        label_size: S, the side of the patch-token grid (static); 1 gives the class token only.
        smoothing: label smoothing.
        crop: ``'tlt'`` (default) pools the crop's region as tlt does, transposed on the map (see `_tlt_roi_boxes`:
            what VOLO's released models were trained with, and what the parity tests pin); ``'aligned'`` pools the
            region the image crop actually covers (for label maps stored in image orientation, e.g. ours from
            ``volo_jax.tools.label_tokens``, when the exact tlt behaviour is not the point).

    Returns:
        float32 ``(B, 2 + S*S, C)``, or ``(B, 2, C)`` when S == 1: [ground truth, class token, patch tokens
        row-major]. tlt's ``(B, C, T)`` output is this transposed.
    """
    B = scores.shape[0]
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    dense = _dense_label_maps(scores, indices, num_classes)  # (B, H, W, C)
    if crop == "tlt":
        rois = _tlt_roi_boxes(boxes, dense.shape[2])  # (B, 4)
    elif crop == "aligned":
        rois = _aligned_roi_boxes(boxes, dense.shape[1], dense.shape[2])
    else:
        raise ValueError(f"crop={crop!r}: 'tlt' or 'aligned'")
    tokens = roi_align(dense, rois, 1).reshape(B, 1, num_classes)  # class token
    if label_size > 1:
        patches = roi_align(dense, rois, label_size).reshape(B, label_size * label_size, num_classes)
        tokens = jnp.concatenate([tokens, patches], axis=1)  # (B, 1 + S*S, C)
    tokens = jax.nn.softmax(tokens, axis=-1) * on_value + off_value
    # tlt's one_hot fills off_value and writes on_value (not on + off) at the label.
    gt = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on_value, off_value).astype(jnp.float32)
    return jnp.concatenate([gt[:, None], tokens], axis=1)


def mix_token_label_targets(targets: jax.Array, lam: float | jax.Array) -> jax.Array:
    """Mixup/CutMix target mix of tlt's ``mixup_target``: each sample with the batch-flipped one, ``(B, ...)``.

    ``lam`` is the scalar batch-mode lambda (the weight of the sample's own target).
    """
    return targets * lam + targets[::-1] * (1.0 - lam)


def _mix_token_lam(bbox: jax.Array, num_tokens: int) -> jax.Array:
    """MixToken's kept fraction ``1 - box area / N`` for the ``(bbx1, bby1, bbx2, bby2)`` box of ``forward_train``."""
    bbox = jnp.asarray(bbox)
    area = (bbox[2] - bbox[0]) * (bbox[3] - bbox[1])
    return 1.0 - area.astype(jnp.float32) / num_tokens


def _correct_with_ground_truth(ground_truth: jax.Array, target_cls: jax.Array) -> jax.Array:
    """tlt's ``ground_truth=True`` blend of the class-token target with the ground truth, ``(B, C)``.

    tlt's comment says "rely more on ground truth if target_cls is incorrect", but its code does the opposite and we
    follow the code: ratio = 0.9 (teacher weight) when the argmaxes differ, 0.5 when they agree.
    """
    agree = jnp.argmax(ground_truth, axis=-1) == jnp.argmax(target_cls, axis=-1)  # (B,)
    ratio = (0.9 - 0.4 * agree.astype(jnp.float32))[:, None]
    return target_cls * ratio + ground_truth * (1.0 - ratio)


def _soft_cross_entropy(logits: jax.Array, target: jax.Array) -> jax.Array:
    """timm/tlt ``SoftTargetCrossEntropy``: mean over rows of ``-sum(target * log_softmax)``, in fp32."""
    return jnp.mean(jnp.sum(-target * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1))


def token_label_loss(cls_logits: jax.Array, aux_logits: jax.Array, bbox: jax.Array, targets: jax.Array, *,
                     dense_weight: float = 1.0, cls_weight: float = 1.0, ground_truth: bool = False) -> jax.Array:
    """tlt's ``TokenLabelCrossEntropy(dense_weight, cls_weight, ground_truth=...)((cls, aux, bbox), targets)``.

    ``cls_weight * CE(cls_logits, class target) + dense_weight * CE(aux_logits, token targets)``, each CE averaged
    over its rows (B for the class term, B*N for the dense term). With MixToken (a non-empty ``bbox``) the model has
    already flipped the aux logits inside the box back to their own images, so only the class target is mixed:
    ``lam * t + (1 - lam) * t[::-1]`` with ``lam = 1 - box area / N``; an all-zero box leaves it alone.

    Args:
        cls_logits: ``(B, C)`` class-head logits.
        aux_logits: ``(B, N, C)`` aux-head logits of the N patch tokens.
        bbox: int ``(4,)`` MixToken box ``(bbx1, bby1, bbx2, bby2)`` on the token grid, as
            `volo_jax.models.volo.VOLO.forward_train` returns it (zeros without MixToken). May be traced.
        targets: ``(B, 2 + N, C)`` from `token_label_targets` (optionally mixed), or plain ``(B, C)`` soft targets,
            which then serve the class token and every patch token alike.
        dense_weight: weight of the patch-token term (VOLO uses 0.5).
        cls_weight: weight of the class-token term.
        ground_truth: blend the class target with the ground-truth column (`_correct_with_ground_truth`); 3-D
            targets only, as in tlt.

    Returns:
        scalar float32 loss.
    """
    if dense_weight + cls_weight <= 0:
        raise ValueError(f"dense_weight + cls_weight must be > 0 (tlt asserts it), got {dense_weight} + {cls_weight}")
    B, N, C = aux_logits.shape
    if targets.ndim == 2:
        target_cls = targets
        target_aux = jnp.broadcast_to(targets[:, None], (B, N, C))
    elif targets.ndim == 3 and targets.shape[1] == N + 2:
        target_cls = targets[:, 1]
        if ground_truth:
            target_cls = _correct_with_ground_truth(targets[:, 0], target_cls)
        target_aux = targets[:, 2:]  # (B, N, C)
    else:
        raise ValueError(f"targets must be (B, C) or (B, 2 + N, C) with N = {N} tokens, got {targets.shape}")
    lam = _mix_token_lam(bbox, N)
    # tlt: `if lam < 1: mix`, as a select so that a traced box works under jit.
    target_cls = jnp.where(lam < 1.0, lam * target_cls + (1.0 - lam) * target_cls[::-1], target_cls)
    return cls_weight * _soft_cross_entropy(cls_logits, target_cls) + dense_weight * _soft_cross_entropy(
        aux_logits, target_aux)
