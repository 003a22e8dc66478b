"""Pure jnp ops with exact PyTorch semantics, in NHWC layout.

Every function here is a drop-in for its `torch.nn.functional` namesake (with the layout moved to NHWC) and is tested
one-to-one against it in `tests/test_ops.py`:

- `avg_pool2d`: incl. `ceil_mode` (VOLO's outlook-attention pool) and `count_include_pad=False` (PoolFormer).
- `max_pool2d`: incl. `ceil_mode` (VoVNet); on XLA:CPU as a max over strided slices with an int8-argmax gradient
  (see `_max_pool_slices`).
- `unfold` / `fold`: torch's `F.unfold` / `F.fold` (overlapping sum), with the k*k kernel-offset axis kept explicit.
- `depthwise_conv2d`: `F.conv2d(groups=C)` without bias, as k*k shifted multiply-adds on XLA:CPU (see there).
- `conv_general_dilated`: `lax.conv_general_dilated` routing 1x1 and depthwise convolutions as above (see there).
- `dot_general`: `lax.dot_general` that flattens a dense layer's leading axes into one (see there).
- `broadcast_batch`: a broadcast over the batch whose gradient sums the batch with slice adds on XLA:CPU.
- `softmax`: `jax.nn.softmax` whose derivative keeps only its output (see there).

Shapes are static, so window counts and pooling divisors are computed with numpy at trace time and enter the graph
as constants. Everything is written as a handful of XLA-friendly ops (`reduce_window`, strided slices, `pad`), with
Python loops only over the k*k kernel offsets, never over output positions.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

IntPair = int | tuple[int, int]

__all__ = ["avg_pool2d", "max_pool2d", "unfold", "fold", "depthwise_conv2d", "conv_general_dilated", "dot_general",
           "broadcast_batch", "softmax", "attend", "pool_out_size", "unfold_out_size", "ceil_div"]


def _pair(v: IntPair) -> tuple[int, int]:
    """Return `v` as an (h, w) pair, like torch's `_pair`."""
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def pool_out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of a torch pooling op along one axis (torch's `pooling_output_shape`).

    With `ceil_mode` the last window may run past the padded input, but torch drops it if it would *start* in the
    right padding: `if (out - 1) * stride >= size + padding: out -= 1`.
    """
    if padding > kernel // 2:
        raise ValueError(f"padding ({padding}) should be at most half of kernel size ({kernel}), as in torch")
    span = size + 2 * padding - kernel
    # Python's // floors like torch's div_rtn, so in ceil mode an input smaller than the kernel still gets one window
    # (torch: a 2x2 map, kernel 3, stride 2 -> 1x1), and without it the output is empty -> the error below.
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out < 1:
        raise ValueError(f"kernel {kernel} larger than padded input {size} + 2*{padding}")
    return out


def unfold_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Number of sliding-window positions along one axis, as torch's `F.unfold`: floor((L + 2p - k) / s) + 1."""
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(f"kernel {kernel} larger than padded input {size} + 2*{padding}")
    return span // stride + 1


def _pool_pads(size: int, kernel: int, stride: int, padding: int, out: int) -> tuple[int, int]:
    """(low, high) padding so that `out` windows fit; the high side may exceed `padding` in ceil mode."""
    return padding, max(0, (out - 1) * stride + kernel - size - padding)


def _avg_divisor_1d(size: int, kernel: int, stride: int, padding: int, out: int, count_include_pad: bool) -> np.ndarray:
    """Per-position window size along one axis, following torch's `avg_pool2d` CPU/CUDA kernels.

    torch: `start = o*s - p; end = min(start + k, L + p); pool = end - start` (the count_include_pad divisor: padding
    counts, the ceil-mode overhang past the padding does not); then `start, end` are clipped to `[0, L]` for the
    count_include_pad=False divisor (valid elements only). The 2-D divisor is the outer product of the two axes.
    """
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if count_include_pad:
        return (end - start).astype(np.float64)
    return (np.minimum(end, size) - np.maximum(start, 0)).astype(np.float64)


def _reduce_pool(
    x: jax.Array, init: np.ndarray, op: Callable, kernel_size: IntPair, stride: IntPair | None, padding: IntPair,
    ceil_mode: bool,
) -> tuple[jax.Array, tuple[int, ...]]:
    """Torch-geometry window reduction shared by the pools: output sizes and ceil-mode pads as torch computes them.

    Returns:
        The (B, oh, ow, C) reduction and ``(H, W, kh, kw, sh, sw, ph, pw, oh, ow)`` for divisors.
    """
    geometry = _pool_geometry(x.shape, kernel_size, stride, padding, ceil_mode)
    H, W, kh, kw, sh, sw, ph, pw, oh, ow = geometry
    reduced = lax.reduce_window(
        x, init, op,
        window_dimensions=(1, kh, kw, 1),
        window_strides=(1, sh, sw, 1),
        padding=((0, 0), _pool_pads(H, kh, sh, ph, oh), _pool_pads(W, kw, sw, pw, ow), (0, 0)),
    )
    return reduced, geometry


def _pool_geometry(shape: tuple[int, ...], kernel_size: IntPair, stride: IntPair | None, padding: IntPair,
                   ceil_mode: bool) -> tuple[int, ...]:
    """``(H, W, kh, kw, sh, sw, ph, pw, oh, ow)`` of a torch pool over an NHWC ``shape`` (stride defaults to the
    kernel, output sizes by torch's rule, which also validates the arguments)."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(kernel_size if stride is None else stride)
    ph, pw = _pair(padding)
    _, H, W, _ = shape
    oh = pool_out_size(H, kh, sh, ph, ceil_mode)
    ow = pool_out_size(W, kw, sw, pw, ceil_mode)
    return H, W, kh, kw, sh, sw, ph, pw, oh, ow


def avg_pool2d(
    x: jax.Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    *,
    impl: str = "auto",
) -> jax.Array:
    """`torch.nn.functional.avg_pool2d` on an NHWC tensor.

    Args:
        x: (B, H, W, C) input.
        kernel_size: Window size, int or (kh, kw).
        stride: Window stride; defaults to `kernel_size` like torch.
        padding: Implicit zero padding on both sides, at most half the kernel.
        ceil_mode: Use ceil instead of floor for the output size; windows that start inside input+padding but run
            past it are averaged only over the part inside input+padding (torch's rule).
        count_include_pad: If False, divide each window by the number of valid (non-padding) elements.
        impl: ``'auto'`` (``'slices'`` for a stride-1 pool on CPU, else ``'reduce_window'``), ``'slices'`` (stride 1
            only) or ``'reduce_window'``. Same values up to the order of the sums; see :func:`_box_sum` for why.

    Returns:
        (B, h, w, C) pooled tensor, h and w as in torch.
    """
    if impl not in ("auto", "slices", "reduce_window"):
        raise ValueError(f"impl={impl!r}: 'auto', 'slices' or 'reduce_window'")
    geometry = _pool_geometry(x.shape, kernel_size, stride, padding, ceil_mode)
    H, W, kh, kw, sh, sw, ph, pw, oh, ow = geometry
    if impl == "auto":
        impl = "slices" if jax.default_backend() == "cpu" and (sh, sw) == (1, 1) else "reduce_window"
    if impl == "slices":
        if (sh, sw) != (1, 1):
            raise ValueError(f"avg_pool2d(impl='slices') needs stride 1, got {(sh, sw)}")
        summed = _box_sum(x, (kh, kw), (_pool_pads(H, kh, sh, ph, oh), _pool_pads(W, kw, sw, pw, ow)))
    else:  # a concrete numpy init lets jax pick its differentiable monoid reducer under jit
        summed, _ = _reduce_pool(x, np.array(0, x.dtype), lax.add, kernel_size, stride, padding, ceil_mode)
    # summed: (B, oh, ow, C)
    div_h = _avg_divisor_1d(H, kh, sh, ph, oh, count_include_pad)
    div_w = _avg_divisor_1d(W, kw, sw, pw, ow, count_include_pad)
    inv = (1.0 / np.outer(div_h, div_w))[None, :, :, None]  # (1, oh, ow, 1), a trace-time constant
    return summed * jnp.asarray(inv, dtype=x.dtype)


def max_pool2d(
    x: jax.Array,
    kernel_size: IntPair,
    stride: IntPair | None = None,
    padding: IntPair = 0,
    ceil_mode: bool = False,
    *,
    impl: str = "auto",
) -> jax.Array:
    """`torch.nn.functional.max_pool2d` on an NHWC tensor (padding acts as -inf, as in torch).

    Args:
        x: (B, H, W, C) floating-point input.
        kernel_size: Window size, int or (kh, kw).
        stride: Window stride; defaults to `kernel_size` like torch.
        padding: Implicit -inf padding on both sides, at most half the kernel.
        ceil_mode: Use ceil instead of floor for the output size (torch's rule on the last window).
        impl: ``'auto'`` (``'slices'`` on CPU, ``'reduce_window'`` elsewhere), ``'slices'`` or ``'reduce_window'``.
            Same values and gradients; see :func:`_max_pool_slices` for why XLA:CPU wants the slices.

    Returns:
        (B, h, w, C) pooled tensor, h and w as in torch.
    """
    if impl == "auto":
        impl = "slices" if jax.default_backend() == "cpu" else "reduce_window"
    if impl == "slices":
        H, W, kh, kw, sh, sw, ph, pw, oh, ow = _pool_geometry(x.shape, kernel_size, stride, padding, ceil_mode)
        pads = (_pool_pads(H, kh, sh, ph, oh), _pool_pads(W, kw, sw, pw, ow))
        return _max_pool_slices(x, (kh, kw), (sh, sw), pads)
    if impl != "reduce_window":
        raise ValueError(f"impl={impl!r}: 'auto', 'slices' or 'reduce_window'")
    # concrete init: differentiable under jit (see avg_pool2d)
    pooled, _ = _reduce_pool(x, np.array(-np.inf, x.dtype), lax.max, kernel_size, stride, padding, ceil_mode)
    return pooled  # (B, oh, ow, C)


Pads2 = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _box_sum(x: jax.Array, kernel: tuple[int, int], pads: Pads2) -> jax.Array:
    """Stride-1 window sum of the zero-padded input as a sum of its kh*kw shifted slices, with the gradient as the same
    box sum of the output gradient (the transpose of a stride-1 box sum padded ``(lo, hi)`` is the box sum padded
    ``(k - 1 - lo, k - 1 - hi)``; the function differentiates itself, so higher orders work).

    Why: XLA:CPU runs ``reduce_window(add)`` and its transpose (a pad plus another reduce-window) at ~6 ns per
    element; the slices fuse into one loop. PoolFormer's 3x3 pool on (8, 56, 56, 96): forward 5.5 -> 2.7 ms, gradient
    7.5 -> 2.1 ms (2 cores).
    """
    taps = _window_taps(x, kernel, (1, 1), pads, 0.0)
    return functools.reduce(jnp.add, taps)  # (B, oh, ow, C)


def _box_sum_fwd(x: jax.Array, kernel: tuple[int, int], pads: Pads2) -> tuple[jax.Array, None]:
    return _box_sum(x, kernel, pads), None


def _box_sum_bwd(kernel: tuple[int, int], pads: Pads2, _: None, g: jax.Array) -> tuple[jax.Array]:
    transposed = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel, pads, strict=True))
    return (_box_sum(g, kernel, transposed),)


_box_sum.defvjp(_box_sum_fwd, _box_sum_bwd)


def _window_taps(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int], pads: Pads2,
                 fill: float) -> list[jax.Array]:
    """The kh*kw strided slices of ``x`` padded with ``fill``, row-major over the kernel offsets: tap ``i * kw + j``
    is ``(B, oh, ow, C)`` with ``tap[b, r, c] = x_padded[b, r * sh + i, c * sw + j]``."""
    (kh, kw), (sh, sw) = kernel, stride
    B, H, W, C = x.shape
    oh = (H + sum(pads[0]) - kh) // sh + 1
    ow = (W + sum(pads[1]) - kw) // sw + 1
    xp = lax.pad(x, jnp.asarray(fill, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
    return [lax.slice(xp, (0, i, j, 0), (B, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, C), (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _max_pool_argmax(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int],
                     pads: Pads2) -> tuple[jax.Array, jax.Array]:
    """Window maximum and the int8 tap index (row-major over the kernel offsets) of each window's FIRST maximum, or
    of its LAST NaN: what torch's CPU kernel keeps (a later element replaces the running max only if strictly greater,
    or NaN).

    One variadic ``reduce`` over the stacked taps with an order-independent comparator (a total order on
    (value, index) pairs), not a running ``where`` chain: XLA:CPU fuses an elementwise chain into each of its
    consumers, and the backward reads the argmax at up to kh*kw shifted positions, so the whole chain (kh*kw slices of
    the padded input and kh*kw - 1 compare-selects) was recomputed per read inside the backward's fusion. That fusion
    took ~15 % of ese_vovnet19b_dw's training step (profiled); a reduce is never fused into a consumer, so the argmax is
    computed once and stored as int8. Step 1.19x (same-run A/B, batch 8).
    """
    if kernel[0] * kernel[1] > 127:
        raise ValueError(f"max_pool2d(impl='slices'): kernel {kernel} has more than 127 offsets (int8 argmax)")
    taps = jnp.stack(_window_taps(x, kernel, stride, pads, -np.inf))  # (kh*kw, B, oh, ow, C)
    index = lax.broadcasted_iota(jnp.int8, taps.shape, 0)

    def pick(a: tuple[jax.Array, jax.Array], b: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        (va, ia), (vb, ib) = a, b
        nan_a, nan_b = jnp.isnan(va), jnp.isnan(vb)
        # NaN beats any number and the later NaN beats an earlier one; else the larger value, on a tie the earlier tap
        take_b = jnp.where(nan_a | nan_b, nan_b & (~nan_a | (ib > ia)), (vb > va) | ((vb == va) & (ib < ia)))
        return jnp.where(take_b, vb, va), jnp.where(take_b, ib, ia)

    init = (jnp.array(-np.inf, x.dtype), jnp.array(127, jnp.int8))  # loses every tie: the lowest tap index wins
    out, arg = lax.reduce((taps, index), init, pick, (0,))
    return out, arg  # (B, oh, ow, C) each


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slices(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int], pads: Pads2) -> jax.Array:
    """Max pooling as a running maximum over the kh*kw strided slices of the -inf-padded input, with a hand-written
    gradient (reverse mode only; ``impl='reduce_window'`` also has forward mode).

    Why: JAX differentiates ``reduce_window(max)`` through ``select_and_scatter``/``_select_and_gather_add``, which
    XLA:CPU runs as a variadic reduce-window carrying four int32 index maps per window plus a scatter: about 14 % of
    ese_vovnet19b_dw's training step for its three stage pools (profiled, 2 cores). Here the forward saves only the
    int8 argmax, and the gradient routes each output gradient to its window's first maximum (what torch and XLA's
    ``select_and_scatter`` do) as a few fused elementwise loops: see :func:`_max_pool_slices_bwd`.
    """
    taps = _window_taps(x, kernel, stride, pads, -np.inf)
    out = taps[0]
    for tap in taps[1:]:
        out = jnp.maximum(out, tap)  # NaN-propagating like torch; the value does not depend on the order
    return out  # (B, oh, ow, C)


def _max_pool_slices_fwd(x: jax.Array, kernel: tuple[int, int], stride: tuple[int, int],
                         pads: Pads2) -> tuple[jax.Array, tuple[jax.Array, tuple[int, int]]]:
    out, arg = _max_pool_argmax(x, kernel, stride, pads)
    return out, (arg, x.shape[1:3])


def _max_pool_slices_bwd(kernel: tuple[int, int], stride: tuple[int, int], pads: Pads2,
                         res: tuple[jax.Array, tuple[int, int]], g: jax.Array) -> tuple[jax.Array]:
    """Gradient in gather form, one stride phase at a time.

    Padded input row ``r = q * sh + a`` (phase ``a``) receives from output row ``o`` through kernel row ``i`` iff
    ``r = o * sh + i``, i.e. ``i = a (mod sh)`` and ``o = q - (i - a) // sh``. So each phase's gradient is a sum of
    the masked output gradients of its own taps, each shifted by a few rows/columns (a small pad at output
    resolution); every tap belongs to exactly one phase, so XLA fuses each phase into one loop. Interleaving the
    phases and cropping the padding gives the input gradient. (Transposing the slices instead gives one full-size pad
    per tap that XLA:CPU neither fuses nor shares: no faster than ``select_and_scatter``.)
    """
    arg, (H, W) = res
    (kh, kw), (sh, sw) = kernel, stride
    B, oh, ow, C = g.shape
    hp, wp = H + sum(pads[0]), W + sum(pads[1])
    hq, wq = ceil_div(hp, sh), ceil_div(wp, sw)  # rows/cols per phase
    zero = jnp.zeros((), g.dtype)
    phases = []
    for a in range(sh):
        row = []
        for b in range(sw):
            acc = jnp.zeros((B, hq, wq, C), g.dtype)
            for i in range(a, kh, sh):
                for j in range(b, kw, sw):
                    di, dj = (i - a) // sh, (j - b) // sw
                    masked = jnp.where(arg == i * kw + j, g, zero)  # (B, oh, ow, C)
                    acc = acc + lax.pad(masked, zero, ((0, 0, 0), (di, hq - oh - di, 0), (dj, wq - ow - dj, 0),
                                                       (0, 0, 0)))  # (B, hq, wq, C)
            row.append(acc)
        phases.append(jnp.stack(row, axis=3))  # (B, hq, wq, sw, C)
    full = jnp.stack(phases, axis=2).reshape(B, hq * sh, wq * sw, C)  # (B, hq, sh, wq, sw, C) interleaved
    return (full[:, pads[0][0]:pads[0][0] + H, pads[1][0]:pads[1][0] + W],)


_max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def unfold(x: jax.Array, kernel_size: IntPair, padding: IntPair = 0, stride: IntPair = 1) -> jax.Array:
    """`torch.nn.functional.unfold` (im2col) on an NHWC tensor, with the kernel-offset axis explicit.

    `out[b, i, j, ki * kw + kj, c] == x_padded[b, i * sh + ki, j * sw + kj, c]`, i.e. the k*k axis is row-major over
    (ki, kj) exactly like torch's, whose (B, C * kh * kw, L) output holds the same value at
    `[b, c * kh * kw + ki * kw + kj, i * w + j]`.
    Built as kh*kw strided slices of the zero-padded input stacked on a new axis (no gather).

    Args:
        x: (B, H, W, C) input.
        kernel_size: Window size, int or (kh, kw).
        padding: Zero padding on both sides.
        stride: Window stride.

    Returns:
        (B, h, w, kh*kw, C) patches with h = floor((H + 2p - kh) / s) + 1 (and likewise w), as torch.
    """
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    sh, sw = _pair(stride)
    _, H, W, _ = x.shape
    unfold_out_size(H, kh, sh, ph)  # torch's size checks with torch's messages; _window_taps derives the same sizes
    unfold_out_size(W, kw, sw, pw)
    patches = _window_taps(x, (kh, kw), (sh, sw), ((ph, ph), (pw, pw)), 0.0)  # kh*kw x (B, oh, ow, C)
    return jnp.stack(patches, axis=3)  # (B, oh, ow, kh*kw, C)


def fold(
    patches: jax.Array,
    output_size: IntPair,
    kernel_size: IntPair,
    padding: IntPair = 0,
    stride: IntPair = 1,
) -> jax.Array:
    """`torch.nn.functional.fold` (col2im, overlapping sum) on NHWC patches; the adjoint of `unfold`.

    `out[b, y, x, c] = sum over (i, j, ki, kj) with i*sh + ki - ph == y and j*sw + kj - pw == x of
    patches[b, i, j, ki * kw + kj, c]` (row-major k*k axis, as `unfold`). Written as a sum of kh*kw `lax.pad` calls,
    one per kernel offset: interior padding `s - 1` spreads the (h, w) grid to stride s, edge padding places it at
    offset (ki - ph, kj - pw) (negative = crop of the padding), so XLA fuses the whole thing into one elementwise
    loop instead of a much slower scatter-add.

    Args:
        patches: (B, h, w, kh*kw, C) blocks, h and w equal to `unfold`'s window counts for `output_size`.
        output_size: (H, W) of the result, int or pair.
        kernel_size: Window size, int or (kh, kw).
        padding: Padding that `unfold` would have added (cropped here).
        stride: Window stride.

    Returns:
        (B, H, W, C) tensor.

    Raises:
        ValueError: If the patch grid or the k*k axis does not match `output_size`/`kernel_size` (torch raises too).
    """
    kh, kw = _pair(kernel_size)
    ph, pw = _pair(padding)
    sh, sw = _pair(stride)
    H, W = _pair(output_size)
    B, oh, ow, kk, C = patches.shape
    if kk != kh * kw:
        raise ValueError(f"fold: patches have {kk} kernel offsets, expected kh*kw = {kh * kw}")
    if (oh, ow) != (unfold_out_size(H, kh, sh, ph), unfold_out_size(W, kw, sw, pw)):
        raise ValueError(
            f"fold: patch grid {(oh, ow)} does not match output_size {(H, W)} with kernel {(kh, kw)}, "
            f"padding {(ph, pw)}, stride {(sh, sw)}: expected "
            f"{(unfold_out_size(H, kh, sh, ph), unfold_out_size(W, kw, sw, pw))}"
        )
    span_h, span_w = (oh - 1) * sh + 1, (ow - 1) * sw + 1  # extent of the dilated grid
    zero = jnp.array(0, patches.dtype)
    out = None
    for ki in range(kh):
        for kj in range(kw):
            lo_h, lo_w = ki - ph, kj - pw
            placed = lax.pad(
                patches[:, :, :, ki * kw + kj, :],  # (B, oh, ow, C)
                zero,
                ((0, 0, 0), (lo_h, H - lo_h - span_h, sh - 1), (lo_w, W - lo_w - span_w, sw - 1), (0, 0, 0)),
            )  # (B, H, W, C)
            out = placed if out is None else out + placed
    return out


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for ints, as `math.ceil(a / b)` in timm without the float round trip."""
    return -(-a // b)


def depthwise_conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: int = 0, *,
                     impl: str = "auto", precision: lax.PrecisionLike = None) -> jax.Array:
    """`torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, groups=C)` (no bias) on NHWC.

    XLA:CPU lowers a ``feature_group_count=C`` convolution to a slow generic loop: one to two orders of magnitude
    below a dense convolution per FLOP, forward and backward (measured in benchmarks/). Written as ``k*k``
    shifted, strided slices of the zero-padded input, each times its per-channel tap, it is a few fused
    elementwise loops, and its gradient is pads and elementwise products (at stride 1, the input gradient is
    itself such a sum of slices: :func:`_depthwise_s1`). The sum runs over the taps in row-major
    order, so the result equals the convolution up to float rounding. GPU and TPU have fast depthwise kernels:
    ``impl='auto'`` uses the slices on CPU only.

    Args:
        x: (B, H, W, C) input.
        kernel: (kh, kw, 1, C) depthwise kernel (Flax's HWIO layout with one input channel per group).
        stride: spatial stride.
        padding: zero padding on every side.
        impl: ``'auto'`` (slices on CPU, the grouped convolution elsewhere), ``'slices'`` or ``'conv'``.
        precision: passed to the convolution (``'conv'``); the slices are exact fp32 multiply-adds.

    Returns:
        (B, (H + 2p - kh) // s + 1, (W + 2p - kw) // s + 1, C).
    """
    kh, kw, _, C = kernel.shape
    if impl == "auto":
        impl = "slices" if jax.default_backend() == "cpu" else "conv"
    if impl == "conv":
        return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=C,
                                        precision=precision)
    if impl != "slices":
        raise ValueError(f"impl={impl!r}: 'auto', 'slices' or 'conv'")
    if stride == 1 and kh == kw and padding < kh:
        return _depthwise_s1(x, kernel, padding)
    return _depthwise_slices(x, kernel, stride, padding)


def _depthwise_slices(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """:func:`depthwise_conv2d`'s CPU formulation: the sum of ``kh*kw`` taps, each times its per-channel weight."""
    kh, kw = kernel.shape[:2]
    # tap i*kw+j (B, oh, ow, C): input rows i, i+s, ... under the output rows
    taps = _window_taps(x, (kh, kw), (stride, stride), ((padding, padding), (padding, padding)), 0.0)
    out = None
    for t, tap in enumerate(taps):
        term = tap * kernel[t // kw, t % kw, 0]
        out = term if out is None else out + term
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_s1(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 square depthwise convolution whose input gradient is itself a depthwise convolution (of the output
    gradient, padded by ``k - 1 - padding``, with the kernel flipped) in the same slices form.

    Why: JAX transposes each of the forward's ``k*k`` slices into a pad of the output gradient, and XLA:CPU fuses the
    ``k*k`` full-size pads, their sum and the crop into one loop that bounds-checks every pad for every element:
    ese_vovnet19b_dw's 112x112 stem depthwise conv took 22.9 ms for that loop (fused with the ReLU and BatchNorm
    backward before it) in a profiled step. The gather form reads one padded gradient ``k*k`` times. Measured on
    ese_vovnet19b_dw's jitted training step at batch 8 (one process, the two steps called in turn): 1.03x (5 of 7
    pairs), 1.04x (9 of 9) and 1.04x (6 of 7), temp buffers 534 -> 548 MiB. The kernel gradient stays JAX's
    differentiation of the slices (reductions of ``x``'s taps times the output gradient). Reverse mode only, like
    the other custom VJPs here.
    """
    return _depthwise_slices(x, kernel, 1, padding)


def _depthwise_s1_fwd(x: jax.Array, kernel: jax.Array,
                      padding: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _depthwise_slices(x, kernel, 1, padding), (x, kernel)


def _depthwise_s1_bwd(padding: int, res: tuple[jax.Array, jax.Array],
                      g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    _, kernel_vjp = jax.vjp(lambda k: _depthwise_slices(x, k, 1, padding), kernel)
    (dkernel,) = kernel_vjp(g)
    # out[y] = sum_i x[y + i - p] * w[i]  =>  dx[r] = sum_i g[r - i + p] * w[i] = sum_i' gpad[r + i'] * w[k-1-i']
    # with g padded by k - 1 - p on each side: the same correlation, kernel flipped; (B, H, W, C)
    dx = _depthwise_slices(g, kernel[::-1, ::-1], 1, kernel.shape[0] - 1 - padding)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)  # mixed dtypes: cotangents in the primals' dtypes


_depthwise_s1.defvjp(_depthwise_s1_fwd, _depthwise_s1_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]], lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: lax.PrecisionLike = None, **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated`` (a drop-in for ``nnx.Conv(conv_general_dilated=...)``) that routes two NHWC
    cases XLA:CPU runs slowly to faster formulations of the same sums (results agree up to float rounding):

    - a 1x1, stride-1, unpadded, ungrouped convolution: a matmul over channels (:func:`dot_general`). XLA:CPU runs
      it well below the same ``dot`` (PoolFormer-M36's 1x1-conv MLPs: its whole forward 1.09 s -> 0.75 s at batch 8
      on 2 cores);
    - a depthwise convolution (one input channel per group) with square stride and symmetric padding:
      :func:`depthwise_conv2d` (shifted multiply-adds on CPU, this convolution elsewhere);
    - on CPU, an unpadded ungrouped convolution whose stride equals its kernel (a patch embedding, VOLO's
      downsampling): a patchify reshape and one matmul (:func:`_patchify_conv`);
    - on CPU, any other ungrouped convolution with at most 49 kernel taps: the same convolution forward, with the
      kernel gradient as one matmul per tap (:func:`_conv_tap_wgrad`).

    Every other convolution goes to ``lax.conv_general_dilated`` unchanged.
    """
    undilated = all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
    nhwc = dimension_numbers is None or dimension_numbers == lax.conv_dimension_numbers(
        lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = undilated and nhwc and lhs.ndim == 4 and not any(v is not None for v in kwargs.values())
    strides = tuple(window_strides)
    # "VALID" is zero padding; "SAME"-style strings stay None and go to lax below
    pads = [(0, 0)] * 2 if padding == "VALID" else None if isinstance(padding, str) else [tuple(p) for p in padding]
    unpadded = pads == [(0, 0), (0, 0)]
    dense = plain and feature_group_count == 1
    cpu = jax.default_backend() == "cpu"
    if dense and rhs.shape[:2] == (1, 1) and strides == (1, 1) and unpadded:
        kernel = rhs.reshape(rhs.shape[-2:])  # (in, out)
        return dot_general(lhs, kernel, (((lhs.ndim - 1,), (0,)), ((), ())), precision=precision)
    depthwise = feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
    if plain and depthwise and strides[0] == strides[1] and pads is not None and len(set(pads)) == 1 and \
            pads[0][0] == pads[0][1]:
        return depthwise_conv2d(lhs, rhs, strides[0], pads[0][0], precision=precision)
    if dense and cpu and unpadded and strides == tuple(rhs.shape[:2]):
        return _patchify_conv(lhs, rhs, precision)
    if dense and cpu and pads is not None and rhs.shape[0] * rhs.shape[1] <= 49:
        return _conv_tap_wgrad(lhs, rhs, strides, tuple(pads), precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                    feature_group_count, precision=precision, **kwargs)


def _patchify_conv(x: jax.Array, kernel: jax.Array, precision: lax.PrecisionLike) -> jax.Array:
    """An unpadded NHWC/HWIO convolution whose stride equals its kernel size, as non-overlapping patches times the
    flattened kernel: ``(B*oh*ow, kh*kw*in) @ (kh*kw*in, out)``. Rows and columns past the last whole patch are
    dropped, as the convolution drops them.

    Why: every output sees its own patch, so this is exactly a matmul, and its gradients are a matmul and a
    transpose. XLA:CPU's convolution and its gradients run these shapes 1.3-1.5x (forward) and 1.5-1.8x
    (forward+backward) slower: VOLO-D4's 4x4/4 patch projection (8, 112, 112, 64) -> 384 took 44 ms forward and
    133 ms forward+backward, 34 and 91 ms as a matmul; ConViT's 16x16/16 patch embedding's kernel gradient 20 ms ->
    13 ms (2 cores, batch 8). In whole models the gain is below the machine's noise (volo_d1_224 and convit_base
    forward 1.01x, 0.99x). The patch order (kh, kw, in) is the HWIO kernel's own row-major order.
    """
    kh, kw, cin, cout = kernel.shape
    B, H, W, _ = x.shape
    oh, ow = H // kh, W // kw
    patches = x[:, :oh * kh, :ow * kw].reshape(B, oh, kh, ow, kw, cin)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(B * oh * ow, kh * kw * cin)  # (B*oh*ow, kh*kw*in)
    y = lax.dot_general(patches, kernel.reshape(kh * kw * cin, cout), (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(B, oh, ow, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tap_wgrad(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads2,
                    precision: lax.PrecisionLike) -> jax.Array:
    """An NHWC/HWIO convolution computed by ``lax.conv_general_dilated``, whose KERNEL gradient is a sum over output
    positions done as matmuls per kernel tap (the tap's strided slice of the padded input against the output
    gradient; :func:`_conv_tap_wgrad_bwd`); the input gradient is the convolution's own transpose.

    Why: XLA:CPU computes a convolution's kernel gradient as a convolution that contracts over the batch and spatial
    positions, at ~8 GFLOP/s against ~100 for a matmul here: VOLO-D1's two 3x3 64->64 stem convs at 112x112 took
    0.98 s and 0.91 s of a 5.9 s training step (profiled, batch 8, 2 cores); as tap matmuls they cost about a tenth.
    The slices are transient: nothing beyond the input is kept for the backward.
    """
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


def _conv_tap_wgrad_fwd(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads2,
                        precision: lax.PrecisionLike) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _conv_tap_wgrad(x, kernel, strides, pads, precision), (x, kernel)


def in_memory(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x`` unchanged, as a buffer XLA must write: its first entry along ``axis`` is rewritten with itself by a
    dynamic-update-slice, which updates its operand in place, so that operand must exist in memory. XLA cannot then
    fuse ``x``'s producer into its consumers or fold a transpose that made ``x`` into a consumer's dimension numbers
    (``lax.optimization_barrier`` does neither on XLA:CPU, which removes barriers before fusion). ``axis`` should be
    one that data parallelism does not shard (a feature axis), so the update needs no communication."""
    axis = axis % x.ndim
    first = lax.slice_in_dim(x, 0, 1, axis=axis)
    return lax.dynamic_update_slice_in_dim(x, first, 0, axis=axis)


# Longest contractions (B * oh * ow) that the tap kernel gradient leaves unchunked, per path; measured on 2 cores
# (forward+backward of the conv alone): with 9 taps of 64 channels, 6272 rows ran 1.9x faster unchunked and 25088
# rows 1.1x faster chunked; the im2col path (3 input channels) still ran 1.7x faster unchunked at 25088 rows.
_TAP_ROWS_UNCHUNKED = 16384
_IM2COL_ROWS_UNCHUNKED = 32768


def _row_chunks(rows: int, target: int = 2048) -> int:
    """The divisor ``n`` of ``rows`` that makes ``rows // n`` closest to ``target``."""
    divisors = {d for i in range(1, math.isqrt(rows) + 1) if rows % i == 0 for d in (i, rows // i)}
    return min(sorted(divisors), key=lambda n: abs(rows // n - target))


def _conv_tap_wgrad_bwd(strides: tuple[int, int], pads: Pads2, precision: lax.PrecisionLike,
                        res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The input gradient as XLA's transposed convolution; the kernel gradient ``sum_rows tap^T @ g`` per tap as
    ``g^T @ tap``, both operands chunked along the rows into a batched matmul.

    Why this form: with ``(B*oh*ow, in)`` and ``(B*oh*ow, out)`` operands the kernel gradient contracts over a
    leading axis of ~10^5 rows into a tiny ``(in, out)``, which XLA:CPU runs as a transposed-operand ``dot`` at
    ~60 GFLOP/s. ``g`` written transposed once, chunk by chunk (:func:`in_memory`, or XLA folds the transpose back
    into the dot) and shared by every tap, then ``(n, out, rows/n) x (n, rows/n, in)`` batched over ``n`` chunks of
    ~2048 rows (within an image) and summed (a short contraction stays one chunk), runs in XLA's fast matmul path:
    VOLO-D1's 3x3 64->64 stem conv (8, 112, 112, 64) forward+backward 260 -> 223 ms (2 cores). With few input
    channels (a 3-channel stem) each tap's matmul is too thin, so the taps are concatenated first (im2col,
    ``kh*kw*in`` columns) for one matmul: the 7x7/2 3->64 stem 177 -> 149 ms.
    """
    x, kernel = res
    kh, kw, cin, cout = kernel.shape
    _, conv_vjp = jax.vjp(lambda a: lax.conv_general_dilated(a, kernel, strides, pads, dimension_numbers=(
        "NHWC", "HWIO", "NHWC"), precision=precision), x)
    (dx,) = conv_vjp(g)  # XLA:CPU's input gradient (a transposed convolution) runs at matmul speed: kept
    B, oh, ow, _ = g.shape
    # g written once as it comes (in a model, the fused BatchNorm/activation backward): left fused, XLA computes it
    # inside the transposing loop in transposed order, slowly (VOLO-D1's two 3x3 stem convs: 48 -> 29 ms each)
    g = in_memory(g)
    rows = B * oh * ow
    # Chunk only long contractions; chunks never span two images, so a batch-sharded g splits along whole chunks.
    # A short one (a downsampling conv on a small map) runs fastest as one matmul: PoolFormer-M36's last 3x3/2
    # 384->768 conv, 392 rows, forward+backward 159 -> 57 ms; its 7x7/4 im2col stem, 25088 rows, 72 -> 42 ms.
    n = B * _row_chunks(oh * ow) if rows > (_IM2COL_ROWS_UNCHUNKED if cin < 16 else _TAP_ROWS_UNCHUNKED) else 1
    # Each chunk transposed on its own: XLA:CPU's transpose of the whole (rows, out) took 14 ms for VOLO-D1's
    # (100352, 64) stem gradient, 3.9 ms chunk by chunk (the same values; volo_d1_224's step 1.02x).
    gt = in_memory(g.reshape(n, rows // n, cout).transpose(0, 2, 1), axis=1)  # (n, out, rows/n)
    taps = [t.reshape(n, rows // n, cin) for t in _window_taps(x, (kh, kw), strides, pads, 0.0)]  # (n, rows/n, in)
    dims = (((2,), (1,)), ((0,), (0,)))  # contract the rows of a chunk, batch over chunks -> (n, out, cols)
    if cin < 16:  # im2col: (n, rows/n, kh*kw*in), taps row-major = HWIO
        dwt = lax.dot_general(gt, jnp.concatenate(taps, axis=-1), dims, precision=precision).sum(0)
        dw = dwt.reshape(cout, kh * kw * cin).T  # (kh*kw*in, out)
    else:
        dwt = jnp.stack([lax.dot_general(gt, tap, dims, precision=precision).sum(0) for tap in taps])  # (taps, out, in)
        dw = dwt.transpose(0, 2, 1)  # (kh*kw, in, out)
    return dx, dw.reshape(kernel.shape).astype(kernel.dtype)


_conv_tap_wgrad.defvjp(_conv_tap_wgrad_fwd, _conv_tap_wgrad_bwd)


def broadcast_batch(x: jax.Array, batch: int) -> jax.Array:
    """``jnp.broadcast_to(x, (batch, *x.shape[1:]))`` for an ``x`` with a leading axis of 1 (a tensor shared by the
    whole batch, e.g. ConViT's positional attention), whose gradient, the sum over the batch, is a chain of
    ``batch - 1`` adds of the gradient's slices on CPU.

    Why: XLA:CPU ran this reduction over the outermost axis at ~8 ns per element: the batch-sum of ConViT-base's
    ``(8, 16, 196, 196)`` positional-attention gradient took 38 ms as a ``reduce_sum`` and 0.7 ms as slice adds
    (one fused loop; the same values), 450 ms of convit_base's training step over its ten GPSA blocks (2 cores).
    Other backends get the plain broadcast.
    """
    if x.shape[0] != 1:
        raise ValueError(f"broadcast_batch: leading axis of {x.shape} must be 1")
    if batch == 1 or jax.default_backend() != "cpu":
        return jnp.broadcast_to(x, (batch, *x.shape[1:]))
    return _broadcast_batch(x, batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_batch(x: jax.Array, batch: int) -> jax.Array:
    return jnp.broadcast_to(x, (batch, *x.shape[1:]))


def _broadcast_batch_fwd(x: jax.Array, batch: int) -> tuple[jax.Array, None]:
    return _broadcast_batch(x, batch), None


def _broadcast_batch_bwd(batch: int, _: None, g: jax.Array) -> tuple[jax.Array]:
    total = g[0]
    for i in range(1, batch):  # batch is static and small on CPU; XLA fuses the chain into one loop
        total = total + g[i]
    return (total[None],)


_broadcast_batch.defvjp(_broadcast_batch_fwd, _broadcast_batch_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: lax.PrecisionLike = None,
                preferred_element_type: Any = None, **kwargs: Any) -> jax.Array:
    """``lax.dot_general`` (a drop-in for ``nnx.Linear(dot_general=...)``) that computes a dense layer on a
    ``(..., in)`` input as one 2-D matmul ``(prod(...), in) @ (in, out)``.

    Same products and sums; what changes is the backward: the weight gradient of the N-D form contracts over every
    leading axis at once, which XLA:CPU runs at about half the speed of the 2-D ``x^T @ g`` (measured on a
    ``(8, 197, 768) @ (768, 3072)`` layer: forward+backward 132 ms as N-D, 83 ms as 2-D, 2 cores). Any other
    contraction goes to ``lax.dot_general`` unchanged.
    """
    (lc, rc), (lb, rb) = dimension_numbers
    dense = (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb
             and not rb and not kwargs.get("out_sharding"))
    if dense:
        y = lax.dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=preferred_element_type)  # (prod(...), out)
        return y.reshape(*lhs.shape[:-1], rhs.shape[-1])
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``jax.nn.softmax(x, axis=axis)`` (same values: it is called), differentiated as ``dy = y * (dx - sum(y * dx))``
    from its output ``y`` alone.

    Why: jax 0.10 still defaults ``jax_softmax_custom_jvp`` to False, so ``jax.nn.softmax`` is differentiated through
    its ``exp`` and division. XLA then keeps the exponentials, the normalised output and a broadcast reciprocal alive
    for the backward: three ``(B, heads, N, N)`` buffers per attention block where one suffices. This is the rule
    that flag switches on, without changing a process-wide setting for users. VOLO-D1's training step at batch 8
    (2 cores, one-process A/B): 1.11x (7 of 7 pairs), step temp buffers 1531 -> 1405 MiB.
    """
    return jax.nn.softmax(x, axis=axis)


@softmax.defjvp
def _softmax_jvp(axis: int, primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (x_dot,) = primals, tangents
    y = softmax(x, axis)
    return y, y * (x_dot - (y * x_dot).sum(axis, keepdims=True))


def attend(attn: jax.Array, v: jax.Array, *, v_heads_last: bool = False) -> jax.Array:
    """Attention-weighted values in token-major order: ``attn (B, heads, Nq, Nk)`` times ``v`` -> ``(B, Nq, heads, d)``,
    i.e. ``einsum("bhqk,bhkd->bqhd")``; ``v`` is ``(B, heads, Nk, d)``, or ``(B, Nk, heads, d)`` with ``v_heads_last``
    (ConViT's GPSA, whose ``v`` comes straight from a linear layer).

    Written as the batched matmul ``bhqk,bhkd->bhqd`` and an explicit transpose: asked for the ``bqhd`` output
    directly, XLA:CPU does not use its fast batched-matmul path (measured, batch 8, 196 tokens, 2 cores: VOLO-D1's
    12x32 heads forward 9.6-11.0 -> 8.3 ms, forward+backward 35.6-38.1 -> 31.3-32.4 ms; with ``v`` as ``bkhd``, as
    ConViT-base's GPSA had it, 16x48 heads: forward 51-55 -> 16-19 ms). Same values up to float rounding.
    """
    if v_heads_last:
        v = v.transpose(0, 2, 1, 3)  # (B, Nk, heads, d) -> (B, heads, Nk, d)
    return jnp.einsum("bhqk,bhkd->bhqd", attn, v).transpose(0, 2, 1, 3)  # (B, heads, Nq, d) -> (B, Nq, heads, d)
