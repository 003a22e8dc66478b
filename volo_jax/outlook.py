"""VOLO's outlook attention (Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", 2021), NHWC.

Mirrors `timm.models.volo.OutlookAttention` (timm/models/volo.py) attribute for attribute, so a checkpoint converts
by renaming and transposing Linear kernels only. The data flow, per position n of the stride-`s` h x w grid:

    v      = Linear(x)                                   # (B, H, W, C)
    a      = Linear(avg_pool_ceil(x, s))                 # (B, h, w, heads * k^4)   h = ceil(H / s)
    a      = softmax(scale * a.reshape(heads, k*k, k*k)) # over the last axis j (the v window offsets)
    y[n,i] = sum_j a[n, head, i, j] * unfold(v)[n, j]    # per head, (k*k, k*k) @ (k*k, C/heads)
    out    = Linear(fold(y))                             # overlapping sum back to (B, H, W, C)

Two implementations of the middle part (everything between the Linears) are provided:

- `outlook_attention_reference`: the line-by-line transcription above with `ops.unfold` / `einsum` / `ops.fold`.
- `outlook_attention` (used by the module): the same numbers, written for XLA:CPU. Unfold + attention + fold run on a
  *phase* layout, `(B, h, s, w, s, heads, d)` with `xph[b, q, rh, r, rw] = x[b, q*s + rh, r*s + rw]`: a reshape of
  NHWC, so getting there and back copies nothing. Fixing the phase (rh, rw) gives a phase plane, and every kernel
  offset of the stride-s window is a unit-stride shift of one phase plane (by -1, 0 or +1 for VOLO's k=3, p=1), so
  unfold, the k^4 multiply-adds and fold fuse into one loop over contiguous channels, with no stride-s slices, no
  interior padding, no (B, h, w, k*k, C) patch tensor and no batched 9x9 @ 9x32 matmuls (all slow on XLA:CPU).
  (The planes used to be transposed to the front, `(s, s, B, h, w, heads, d)`. Each of those transposes took about
  as long as a fused loop, and dropping them made the module 1.04-1.09x faster in forward+backward.) The attention
  logits are produced and softmaxed channel-major, (heads * k^4, B, h, w), so that the softmax reduces over a major
  axis, vectorized over positions.
  Its VJP is written by hand: fold is the adjoint of unfold, so d(v) is the same kernel with the attention
  transposed. d(attn) is a per-head dot product over d: one batched (k*k, d) @ (d, k*k) matmul per position and
  head, on windows gathered from the planes (see `_attention_grad`; XLA:CPU's matmul library runs it about twice as
  fast as the unrolled multiply-adds it replaced).

`python -m benchmarks outlook` times both against timm eager; the README's outlook table holds the latest run. On 2
CPU cores (fp32, VOLO-D1/D5 stage-1 shapes, batch 1 and 8) the module measured 1.7-3.1x faster than timm in the
forward pass and 1.2-1.7x in forward+backward in the runs of 2026-12-06 (batch 1 varies most from run to run); with
the reference kernel swapped in, forward+backward is 0.7-1.2x timm (XLA:CPU's autodiff of strided slices, interior
padding and batched 9x9 @ 9x32 matmuls).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from volo_jax.layers import Linear, dropout, timm_trunc_normal
from volo_jax.ops import avg_pool2d, ceil_div, fold, softmax, unfold, unfold_out_size

__all__ = ["outlook_attention", "outlook_attention_reference", "OutlookAttention"]


def _check_shapes(v_shape: tuple, logits_shape: tuple, num_heads: int, k: int, padding: int, stride: int):
    """Validate NHWC shapes of v and the logits; return the attention grid (h, w).

    timm silently assumes that the unfold grid equals the ceil-mode pooled grid; we check it.
    """
    B, H, W, C = v_shape
    h, w = ceil_div(H, stride), ceil_div(W, stride)
    grid = (unfold_out_size(H, k, stride, padding), unfold_out_size(W, k, stride, padding))
    if grid != (h, w):
        raise ValueError(
            f"outlook attention needs the unfold grid {grid} (kernel {k}, padding {padding}, stride {stride}) to equal "
            f"the ceil-mode pooled grid {(h, w)} of the {H}x{W} input"
        )
    if C % num_heads:
        raise ValueError(f"channels {C} not divisible by num_heads {num_heads}")
    if tuple(logits_shape) != (B, h, w, num_heads * k**4):
        raise ValueError(f"attn_logits shape {tuple(logits_shape)}, expected {(B, h, w, num_heads * k**4)}")
    return h, w


def outlook_attention_reference(
    v: jax.Array,
    attn_logits: jax.Array,
    *,
    num_heads: int,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float,
    attn_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Outlook attention as timm writes it: unfold, one einsum, fold. Same contract as `outlook_attention`."""
    B, H, W, C = v.shape
    k, kk = kernel_size, kernel_size * kernel_size
    h, w = _check_shapes(v.shape, attn_logits.shape, num_heads, k, padding, stride)
    # timm: attn(pooled).reshape(B, h*w, heads, k*k, k*k); * scale; softmax(-1); attn_drop.
    attn = jax.nn.softmax(attn_logits.reshape(B, h, w, num_heads, kk, kk) * scale, axis=-1)  # (B, h, w, heads, i, j)
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    # torch's unfold is channel-major (C, k*k) and timm splits C as (heads, C // heads): head-major channels.
    vu = unfold(v, k, padding, stride).reshape(B, h, w, kk, num_heads, C // num_heads)  # (B, h, w, j, heads, d)
    y = jnp.einsum("bxyhij,bxyjhd->bxyihd", attn, vu)  # (B, h, w, i, heads, d)
    return fold(y.reshape(B, h, w, kk, C), (H, W), k, padding, stride)  # (B, H, W, C)


# ----------------------------------------------------------------------------------------------------------------
# Phase-layout kernel, on (B, h, s, w, s, heads, d) arrays (a reshape of NHWC, see the module docstring).
# Coordinates: full-resolution row y = q * s + r (phase r, phase row q < h). Kernel row ki of
# the window at grid row n reads/writes y = n * s + ki - p, i.e. phase (ki - p) % s at phase row n + (ki - p) // s.
# ----------------------------------------------------------------------------------------------------------------


def _offsets(k: int, p: int, s: int) -> list[tuple[int, int, int, int]]:
    """Per kernel offset (row-major ki * k + kj, as torch's unfold): (phase_h, phase_w, shift_h, shift_w)."""
    return [((ki - p) % s, (kj - p) % s, (ki - p) // s, (kj - p) // s) for ki in range(k) for kj in range(k)]


def _halo(k: int, p: int, s: int) -> tuple[int, int]:
    """Zero rows needed before/after each phase plane so that every shift is an in-bounds slice."""
    return -((-p) // s), max(0, (k - 1 - p) // s)


def _halo_pad(xph: jax.Array, k: int, p: int, s: int) -> jax.Array:
    """(B, h, s, w, s, ...) -> (B, lo + h + hi, s, lo + w + hi, s, ...) with zeros (torch's unfold padding)."""
    lo, hi = _halo(k, p, s)
    return jnp.pad(xph, ((0, 0), (lo, hi), (0, 0), (lo, hi)) + ((0, 0),) * (xph.ndim - 4))


def _windows(xp: jax.Array, k: int, p: int, s: int, h: int, w: int) -> list[jax.Array]:
    """unfold in phase layout: k*k unit-stride (B, h, w, ...) slices of the haloed phase planes."""
    lo, _ = _halo(k, p, s)
    return [xp[:, lo + oh : lo + oh + h, rh, lo + ow : lo + ow + w, rw] for rh, rw, oh, ow in _offsets(k, p, s)]


def _window_index(k: int, p: int, s: int, h: int, w: int) -> np.ndarray:
    """`_windows` as one gather: (h, w, k*k) indices into the haloed planes flattened over (h+, s, w+, s)."""
    lo, hi = _halo(k, p, s)
    row_len = (lo + w + hi) * s  # elements per haloed full-resolution row
    idx = np.empty((h, w, k * k), np.int32)
    for j, (rh, rw, oh, ow) in enumerate(_offsets(k, p, s)):
        rows = (lo + oh + np.arange(h)) * s + rh  # haloed full-resolution row of window j at grid row n
        cols = (lo + ow + np.arange(w)) * s + rw
        idx[:, :, j] = rows[:, None] * row_len + cols[None, :]
    return idx


def _mix_and_fold(xp: jax.Array, a: jax.Array, k: int, p: int, s: int) -> jax.Array:
    """fold_i(sum_j a[i, j] * unfold_j(x)) in phase layout, one fused elementwise loop for XLA.

    Args:
        xp: (B, h + halo, s, w + halo, s, heads, d) haloed phase planes.
        a: (k*k [i], k*k [j], B, h, w, heads) mixing weights.

    Returns:
        (B, h, s, w, s, heads, d) phase planes of the folded result.
    """
    h, w = a.shape[3:5]
    acc_dtype = jnp.promote_types(xp.dtype, jnp.float32)  # accumulate the k^4 products in >= fp32 (bf16 inputs)
    wins = [x.astype(acc_dtype) for x in _windows(xp, k, p, s, h, w)]  # k*k x (B, h, w, heads, d)
    a = a.astype(acc_dtype)
    rows = []
    for ph in range(s):
        planes = []
        for pw in range(s):
            plane = None
            for i, (rh, rw, oh, ow) in enumerate(_offsets(k, p, s)):
                if (rh, rw) != (ph, pw):
                    continue
                y_i = sum(a[i, j][..., None] * wins[j] for j in range(k * k))  # (B, h, w, heads, d)
                # fold: window row n lands on phase row n + oh; what falls off the grid is torch's cropped padding.
                zero = jnp.zeros((), acc_dtype)
                y_i = lax.pad(y_i, zero, ((0, 0, 0), (oh, -oh, 0), (ow, -ow, 0), (0, 0, 0), (0, 0, 0)))
                plane = y_i if plane is None else plane + y_i
            planes.append(jnp.zeros(wins[0].shape, acc_dtype) if plane is None else plane)  # k < s leaves gaps
        rows.append(jnp.stack(planes, 3))  # (B, h, w, s, heads, d)
    return jnp.stack(rows, 2).astype(xp.dtype)  # (B, h, s, w, s, heads, d)


def _attention_grad(gp: jax.Array, vp: jax.Array, k: int, p: int, s: int, h: int, w: int) -> jax.Array:
    """d(loss)/d(a)[i, j] = <unfold_i(g), unfold_j(v)> summed over d within each head.

    One batched matmul: per position and head, the (k*k, d) windows of g times the (k*k, d) windows of v transposed.
    XLA:CPU hands it to its matmul library. (The earlier form, channel-major planes and an unrolled chain of d
    multiply-adds over nine stacked windows, took 18.1 ms against 8.6-9.0 ms at VOLO-D1's stage-1 shape, batch 8, and
    64.3 ms against 24.7 ms at VOLO-D5's.) Each operand's windows come from one gather: XLA:CPU wrote the k*k slices
    of `_windows` and their stack as k*k + 1 loops, which made the module's forward+backward 1.03-1.15x slower.

    Returns:
        (k*k [i], k*k [j], B, h, w, heads).
    """
    acc_dtype = jnp.promote_types(gp.dtype, jnp.float32)
    B, hp, _, wp, _, nh, d = gp.shape  # (B, h+, s, w+, s, heads, d) haloed planes
    idx = _window_index(k, p, s, h, w)  # (h, w, k*k), static
    gw = gp.reshape(B, hp * s * wp * s, nh, d)[:, idx]  # (B, h, w, k*k, heads, d)
    vw = vp.reshape(B, hp * s * wp * s, nh, d)[:, idx]
    return jnp.einsum("bxyihd,bxyjhd->ijbxyh", gw.astype(acc_dtype), vw.astype(acc_dtype),
                      precision=lax.Precision.HIGHEST)  # (i, j, B, h, w, heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _outlook_phases(vph: jax.Array, a: jax.Array, k: int, p: int, s: int) -> jax.Array:
    """fold(a @ unfold(v)) on phase planes: (B, h, s, w, s, heads, d), (k*k, k*k, B, h, w, heads) -> like vph."""
    return _mix_and_fold(_halo_pad(vph, k, p, s), a, k, p, s)


def _outlook_phases_fwd(vph, a, k, p, s):
    return _outlook_phases(vph, a, k, p, s), (vph, a)


def _outlook_phases_bwd(k, p, s, res, g):
    vph, a = res
    h, w = a.shape[3:5]
    gp = _halo_pad(g, k, p, s)
    # The op is linear in v: out = fold . A . unfold, and fold = unfold^T, so d(v) = fold . A^T . unfold (g).
    dv = _mix_and_fold(gp, jnp.swapaxes(a, 0, 1), k, p, s)
    da = _attention_grad(gp, _halo_pad(vph, k, p, s), k, p, s, h, w).astype(a.dtype)
    return dv, da


_outlook_phases.defvjp(_outlook_phases_fwd, _outlook_phases_bwd)


def _to_phases(x: jax.Array, s: int, h: int, w: int, num_heads: int) -> jax.Array:
    """(B, H, W, C) -> (B, h, s, w, s, heads, d), zero-extending H, W to h*s, w*s (a reshape when they divide)."""
    B, H, W, C = x.shape
    if (H, W) != (h * s, w * s):
        x = jnp.pad(x, ((0, 0), (0, h * s - H), (0, w * s - W), (0, 0)))
    return x.reshape(B, h, s, w, s, num_heads, C // num_heads)


def _from_phases(xph: jax.Array, H: int, W: int) -> jax.Array:
    """Inverse of `_to_phases`: (B, h, s, w, s, heads, d) -> (B, H, W, C)."""
    B, h, s, w, _, nh, d = xph.shape
    x = xph.reshape(B, h * s, w * s, nh * d)
    return x if (H, W) == (h * s, w * s) else x[:, :H, :W]


def _outlook_attention_cm(
    v: jax.Array,
    logits_cm: jax.Array,
    num_heads: int,
    k: int,
    padding: int,
    stride: int,
    scale: float,
    attn_dropout: Callable[[jax.Array], jax.Array] | None,
) -> jax.Array:
    """`outlook_attention` with channel-major logits (heads * k^4, B, h, w); shapes already checked."""
    _, H, W, _ = v.shape
    _, B, h, w = logits_cm.shape
    # Softmax over j in the channel-major layout: a reduction over a major axis, vectorized over positions. (On the
    # (B, h, w, heads, i, j) layout XLA:CPU fuses the 9-wide minor-axis reductions into the attn matmul, slowly.)
    attn = softmax(logits_cm.reshape(num_heads, k * k, k * k, B, h, w) * scale, axis=2)  # (heads, i, j, ...)
    if attn_dropout is not None:
        attn = attn_dropout(attn)
    a = attn.transpose(1, 2, 3, 4, 5, 0)  # (i, j, B, h, w, heads): a[i, j] broadcasts over d
    vph = _to_phases(v, stride, h, w, num_heads)  # (B, h, s, w, s, heads, d)
    return _from_phases(_outlook_phases(vph, a, k, padding, stride), H, W)  # (B, H, W, C)


def outlook_attention(
    v: jax.Array,
    attn_logits: jax.Array,
    *,
    num_heads: int,
    kernel_size: int,
    padding: int,
    stride: int,
    scale: float,
    attn_dropout: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Outlook attention between the `v` / `attn` projections and the output projection (timm's forward, middle).

    The `attn_logits` channel index is `head * k^4 + i * k*k + j` (timm reshapes the attn Linear's output to
    (B, h*w, heads, k*k, k*k)): `i` is the kernel offset the result is folded back to, `j` the offset of the unfolded
    value it reads; both are row-major (ki * k + kj) like torch's unfold. The channels of `v` split as
    (heads, C // heads), head-major, like timm's reshape of torch's channel-major unfold.

    Computed on the phase layout with a hand-written VJP (see the module docstring); numerically the same as
    `outlook_attention_reference` (fp32 round-off). Supports reverse-mode autodiff (also nested) but not `jax.jvp`.

    Args:
        v: (B, H, W, C) values (output of the `v` Linear).
        attn_logits: (B, h, w, num_heads * k^4) logits (the `attn` Linear applied to the ceil-mode average-pooled
            input), with h = ceil(H / stride), w = ceil(W / stride).
        num_heads: Number of heads; must divide C.
        kernel_size: Outlook window size k.
        padding: Zero padding of the unfold / crop of the fold.
        stride: Stride of the unfold / fold grid.
        scale: Logit multiplier before the softmax (timm: head_dim ** -0.5).
        attn_dropout: Optional elementwise function (e.g. an `nnx.Dropout`) applied to the softmaxed attention
            weights; it receives them channel-major, (heads, k*k [i], k*k [j], B, h, w).

    Returns:
        (B, H, W, C) folded result, before the output projection.

    Raises:
        ValueError: If the shapes do not match, or the unfold grid floor((H + 2p - k) / s) + 1 is not ceil(H / s)
            (timm silently assumes it; it holds e.g. whenever 2 * padding == kernel_size - 1).
    """
    _check_shapes(v.shape, attn_logits.shape, num_heads, kernel_size, padding, stride)
    logits_cm = attn_logits.transpose(3, 0, 1, 2)  # (heads * k^4, B, h, w)
    return _outlook_attention_cm(v, logits_cm, num_heads, kernel_size, padding, stride, scale, attn_dropout)


class OutlookAttention(nnx.Module):
    """Outlook attention, `timm.models.volo.OutlookAttention` in NHWC with the same attribute names.

    Attributes mirror timm: `v` (Linear dim->dim, bias = qkv_bias), `attn` (Linear dim->k^4 * heads), `proj`
    (Linear dim->dim), `attn_drop`, `proj_drop` (Dropout; `model.eval()` makes them deterministic). timm's
    `unfold` and `pool` submodules hold no parameters and are plain function calls here. `attn`'s parameters are
    applied by `_attn_channel_major` (same matmul, transposed output layout), not by calling the Linear.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int = 3,
        padding: int = 1,
        stride: int = 1,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        dtype: jnp.dtype | None = None,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = dim // num_heads
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.padding = padding
        self.stride = stride
        self.scale = head_dim**-0.5

        # timm's VOLO._init_weights: trunc_normal_(std=.02) Linear weights, zero biases.
        linear = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=timm_trunc_normal(0.02), rngs=rngs)
        self.v = Linear(dim, dim, use_bias=qkv_bias, **linear)
        self.attn = Linear(dim, kernel_size**4 * num_heads, **linear)
        self.attn_drop = dropout(attn_drop, rngs)
        self.proj = Linear(dim, dim, **linear)
        self.proj_drop = dropout(proj_drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        v = self.v(x)  # (B, H, W, C)
        # timm: nn.AvgPool2d(kernel_size=stride, stride=stride, ceil_mode=True); the identity for stride 1.
        pooled = x if self.stride == 1 else avg_pool2d(x, self.stride, self.stride, ceil_mode=True)  # (B, h, w, C)
        logits_cm = self._attn_channel_major(pooled)  # (heads * k^4, B, h, w)
        nhwc_shape = (*logits_cm.shape[1:], logits_cm.shape[0])
        _check_shapes(v.shape, nhwc_shape, self.num_heads, self.kernel_size, self.padding, self.stride)
        y = _outlook_attention_cm(
            v, logits_cm, self.num_heads, self.kernel_size, self.padding, self.stride, self.scale, self.attn_drop
        )  # (B, H, W, C)
        return self.proj_drop(self.proj(y))

    def _attn_channel_major(self, pooled: jax.Array) -> jax.Array:
        """`self.attn(pooled)` emitted as (out, B, h, w): the same matmul, with the output layout the softmax wants."""
        lin = self.attn
        x, kernel, bias = lin.promote_dtype((pooled, lin.kernel[...], lin.bias[...]), dtype=lin.dtype)
        return jnp.einsum("byxk,ke->ebyx", x, kernel, precision=lin.precision) + bias[:, None, None, None]
