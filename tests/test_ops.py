"""`volo_jax.ops` one-to-one against `torch.nn.functional` (values and gradients), NHWC vs NCHW at the boundary."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from volo_jax import ops

torch = pytest.importorskip("torch")
F = torch.nn.functional

SIZES = [(7, 7), (15, 15), (28, 28), (9, 13)]
TOL = dict(rtol=1e-5, atol=1e-5)


def _x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nchw(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _nhwc(t: "torch.Tensor") -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def _patches_to_torch(p: np.ndarray) -> np.ndarray:
    """(B, h, w, k*k, C) -> torch's unfold layout (B, C * k*k, h*w)."""
    B, h, w, kk, C = p.shape
    return p.transpose(0, 4, 3, 1, 2).reshape(B, C * kk, h * w)


# (kernel, stride, padding, ceil_mode, count_include_pad): PoolFormer, VOLO's outlook pool, plus the awkward corners
# of torch's divisor rules (ceil-mode windows running past the padding, stride > kernel, non-square windows).
AVG_CASES = [
    (3, 1, 1, False, False),  # PoolFormer
    (2, 2, 0, True, True),  # VOLO OutlookAttention(stride=2)
    (3, 3, 0, True, True),
    (3, 2, 1, True, True),
    (3, 2, 1, True, False),
    (3, 2, 1, False, True),
    (4, 3, 2, True, False),
    (4, 3, 2, True, True),
    (2, 3, 1, True, True),
    ((3, 2), (2, 1), (1, 0), True, True),
    (2, 1, 0, False, True),  # stride 1 (the box-sum path on CPU): even kernel, no padding
    (5, 1, 2, True, False),
    ((3, 5), 1, (1, 2), False, True),
]
AVG_IMPLS = ["auto", "reduce_window"]  # 'auto' is the slices box sum for the stride-1 cases on CPU


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode,count_include_pad", AVG_CASES)
@pytest.mark.parametrize("impl", AVG_IMPLS)
def test_avg_pool2d(size, kernel, stride, padding, ceil_mode, count_include_pad, impl):
    x = _x((2, *size, 3))
    ref = F.avg_pool2d(_nchw(x), kernel, stride, padding, ceil_mode, count_include_pad)
    out = ops.avg_pool2d(jnp.asarray(x), kernel, stride, padding, ceil_mode, count_include_pad, impl=impl)
    assert out.shape == _nhwc(ref).shape
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), **TOL)


def test_avg_pool2d_default_stride_is_kernel():
    x = _x((1, 9, 13, 2))
    ref = F.avg_pool2d(_nchw(x), 2, ceil_mode=True)
    np.testing.assert_allclose(np.asarray(ops.avg_pool2d(jnp.asarray(x), 2, ceil_mode=True)), _nhwc(ref), **TOL)


MAX_CASES = [
    (3, 2, 0, True),  # VoVNet
    (3, 2, 0, False),
    (3, 2, 1, True),
    (2, 2, 0, True),
    (3, 1, 1, False),
    (4, 3, 2, True),
]


MAX_IMPLS = ["slices", "reduce_window"]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", MAX_CASES)
@pytest.mark.parametrize("impl", MAX_IMPLS)
def test_max_pool2d(size, kernel, stride, padding, ceil_mode, impl):
    x = _x((2, *size, 3))
    ref = F.max_pool2d(_nchw(x), kernel, stride, padding, ceil_mode=ceil_mode)
    out = ops.max_pool2d(jnp.asarray(x), kernel, stride, padding, ceil_mode, impl=impl)
    assert out.shape == _nhwc(ref).shape
    np.testing.assert_array_equal(np.asarray(out), _nhwc(ref))  # a max is exact


@pytest.mark.parametrize("size", [(15, 15), (9, 13), (28, 28)])
@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", MAX_CASES)
@pytest.mark.parametrize("impl", MAX_IMPLS)
def test_max_pool2d_grad_with_ties_goes_to_first_max(size, kernel, stride, padding, ceil_mode, impl):
    """Post-ReLU maps (VoVNet's stage pools) are full of tied zeros: each window's gradient must go to its FIRST
    maximum in row-major order, as torch's kernel and XLA's select_and_scatter do, and nowhere else."""
    x = np.maximum(np.round(_x((2, *size, 4), seed=7) * 2) / 2, 0).astype(np.float32)  # ties at 0, 0.5, 1, ...
    xt = _nchw(x).requires_grad_(True)
    ref = F.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
    g = _x(_nhwc(ref).shape, seed=8)
    (ref * _nchw(g)).sum().backward()

    def f(a):
        return jnp.sum(ops.max_pool2d(a, kernel, stride, padding, ceil_mode, impl=impl) * g)

    grad = jax.jit(jax.grad(f))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), _nhwc(xt.grad), **TOL)  # sums of g: only the order differs


@pytest.mark.parametrize("kernel,stride,padding,ceil_mode", MAX_CASES)
def test_max_pool2d_nan_values_and_grad_follow_torch(kernel, stride, padding, ceil_mode):
    """A NaN wins its window and, of two NaNs, the LATER one takes the gradient (torch's ``val > max || isnan(val)``
    running rule); ``impl='slices'`` keeps that rule with its order-free reduce comparator."""
    x = _x((2, 13, 11, 3), seed=9)
    x[np.random.default_rng(10).random(x.shape) < 0.15] = np.nan  # many windows hold one NaN, some two or more
    xt = _nchw(x).requires_grad_(True)
    ref = F.max_pool2d(xt, kernel, stride, padding, ceil_mode=ceil_mode)
    g = _x(_nhwc(ref).shape, seed=11)
    (ref * _nchw(g)).sum().backward()
    out, vjp = jax.vjp(lambda a: ops.max_pool2d(a, kernel, stride, padding, ceil_mode, impl="slices"), jnp.asarray(x))
    assert np.isnan(np.asarray(out)).mean() > 0.2
    np.testing.assert_array_equal(np.asarray(out), _nhwc(ref))
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), _nhwc(xt.grad), **TOL)


def test_max_pool2d_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl='cudnn'"):
        ops.max_pool2d(jnp.zeros((1, 4, 4, 2)), 2, impl="cudnn")


def test_avg_pool2d_impl_errors_and_auto_choice():
    with pytest.raises(ValueError, match="impl='cudnn'"):
        ops.avg_pool2d(jnp.zeros((1, 4, 4, 2)), 2, impl="cudnn")
    with pytest.raises(ValueError, match="needs stride 1"):
        ops.avg_pool2d(jnp.zeros((1, 4, 4, 2)), 2, 2, impl="slices")
    # on CPU 'auto' takes the box sum for stride 1: no reduce_window in the program (forward or gradient)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a: ops.avg_pool2d(a, 3, 1, 1).sum()))(jnp.ones((1, 5, 5, 2))))
    assert "reduce_window" not in jaxpr and "custom_vjp_call" in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda a: ops.avg_pool2d(a, 2, 2))(jnp.ones((1, 4, 4, 2))))
    assert "reduce_window_sum" in jaxpr


@pytest.mark.parametrize("size", [(15, 15), (9, 13)])
@pytest.mark.parametrize(
    "pool,args",
    [
        ("avg", (3, 1, 1, False, False)),
        ("avg", (2, 2, 0, True, True)),
        ("avg", (3, 2, 1, True, False)),
        ("avg", (5, 1, 2, True, False)),
        ("avg", ((3, 5), 1, (1, 2), False, True)),
        ("avg_reduce_window", (3, 1, 1, False, False)),
        ("max", (3, 2, 0, True)),
        ("max", (3, 2, 1, False)),
        ("max_reduce_window", (3, 2, 0, True)),
        ("max_reduce_window", (3, 2, 1, False)),
    ],
)
def test_pool_grads(size, pool, args):
    x = _x((2, *size, 3))
    avg = pool.startswith("avg")
    fn_t, fn_j = (F.avg_pool2d, ops.avg_pool2d) if avg else (F.max_pool2d, ops.max_pool2d)
    if pool.endswith("reduce_window"):  # the default ('auto') is 'slices' on CPU: the other formulation too
        fn_j = functools.partial(fn_j, impl="reduce_window")
    xt = _nchw(x).requires_grad_(True)
    ref = fn_t(xt, *args) if avg else fn_t(xt, *args[:3], ceil_mode=args[3])
    g = _x(_nhwc(ref).shape, seed=1)
    (ref * _nchw(g)).sum().backward()
    grad = jax.jit(jax.grad(lambda a: jnp.sum(fn_j(a, *args) * g)))(jnp.asarray(x))  # jit: as in real use
    np.testing.assert_allclose(np.asarray(grad), _nhwc(xt.grad), **TOL)


@pytest.mark.parametrize("size", [(2, 2), (2, 3)])
@pytest.mark.parametrize("pool", ["max", "avg"])
def test_ceil_mode_pool_of_input_smaller_than_kernel(size, pool):
    """torch's ceil mode gives one window over a map smaller than the kernel (VoVNet's stage pools at small inputs);
    without ceil mode the output would be empty and both libraries refuse."""
    x = _x((2, *size, 3))
    fn_t, fn_j = (F.avg_pool2d, ops.avg_pool2d) if pool == "avg" else (F.max_pool2d, ops.max_pool2d)
    ref = fn_t(_nchw(x), 3, 2, 0, ceil_mode=True)
    out = fn_j(jnp.asarray(x), 3, 2, 0, ceil_mode=True)
    assert out.shape == _nhwc(ref).shape == (2, 1, 1, 3)
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), **TOL)
    with pytest.raises(RuntimeError):
        fn_t(_nchw(x), 3, 2, 0, ceil_mode=False)
    with pytest.raises(ValueError, match="larger than padded input"):
        fn_j(jnp.asarray(x), 3, 2, 0, ceil_mode=False)
    tiny = _x((1, 1, 2, 3))  # one row: not even ceil mode gives a window
    with pytest.raises(RuntimeError):
        fn_t(_nchw(tiny), 3, 2, 0, ceil_mode=True)
    with pytest.raises(ValueError, match="larger than padded input"):
        fn_j(jnp.asarray(tiny), 3, 2, 0, ceil_mode=True)


def test_pool_padding_too_large_raises():
    with pytest.raises(ValueError, match="at most half"):
        ops.avg_pool2d(jnp.zeros((1, 7, 7, 1)), 3, 1, 2)


# (kernel, padding, stride): VOLO's outlook windows plus padding-free / stride > kernel corners.
UNFOLD_CASES = [(3, 1, 1), (3, 1, 2), (5, 2, 2), (3, 0, 2), (2, 0, 3), (4, 1, 3), ((3, 2), (1, 0), (2, 1))]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel,padding,stride", UNFOLD_CASES)
def test_unfold(size, kernel, padding, stride):
    x = _x((2, *size, 3))
    ref = F.unfold(_nchw(x), kernel, padding=padding, stride=stride).numpy()  # (B, C*k*k, L)
    out = np.asarray(ops.unfold(jnp.asarray(x), kernel, padding, stride))  # (B, h, w, k*k, C)
    np.testing.assert_array_equal(_patches_to_torch(out), ref)  # pure data movement: bit-exact


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel,padding,stride", UNFOLD_CASES)
def test_fold(size, kernel, padding, stride):
    kh, kw = ops._pair(kernel)
    ph, pw = ops._pair(padding)
    sh, sw = ops._pair(stride)
    h = ops.unfold_out_size(size[0], kh, sh, ph)
    w = ops.unfold_out_size(size[1], kw, sw, pw)
    p = _x((2, h, w, kh * kw, 3))
    ref = F.fold(torch.from_numpy(_patches_to_torch(p)), size, kernel, padding=padding, stride=stride)
    out = ops.fold(jnp.asarray(p), size, kernel, padding, stride)
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), **TOL)


@pytest.mark.parametrize("size", [(15, 15), (9, 13)])
@pytest.mark.parametrize("kernel,padding,stride", [(3, 1, 1), (3, 1, 2), (5, 2, 2), (2, 0, 3)])
def test_unfold_fold_grads(size, kernel, padding, stride):
    """Gradients of both ops against torch autograd with a random cotangent."""
    x = _x((2, *size, 3))
    xt = _nchw(x).requires_grad_(True)
    ref = F.unfold(xt, kernel, padding=padding, stride=stride)
    g = _x(ref.shape, seed=1)  # torch layout (B, C*k*k, L)
    (ref * torch.from_numpy(g)).sum().backward()
    h = ops.unfold_out_size(size[0], kernel, stride, padding)
    w = ops.unfold_out_size(size[1], kernel, stride, padding)
    g_ours = g.reshape(2, 3, kernel * kernel, h, w).transpose(0, 3, 4, 2, 1)  # (B, h, w, k*k, C)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(ops.unfold(a, kernel, padding, stride) * g_ours)))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), _nhwc(xt.grad), **TOL)

    p = _x((2, h, w, kernel * kernel, 3), seed=2)
    pt = torch.from_numpy(_patches_to_torch(p)).requires_grad_(True)
    ref = F.fold(pt, size, kernel, padding=padding, stride=stride)
    gy = _x((2, *size, 3), seed=3)
    (ref * _nchw(gy)).sum().backward()
    grad = jax.jit(jax.grad(lambda a: jnp.sum(ops.fold(a, size, kernel, padding, stride) * gy)))(jnp.asarray(p))
    np.testing.assert_allclose(_patches_to_torch(np.asarray(grad)), pt.grad.numpy(), **TOL)


def test_fold_is_adjoint_of_unfold():
    """<unfold(x), p> == <x, fold(p)>: fold is exactly the transpose of unfold."""
    x, size = jnp.asarray(_x((1, 9, 13, 4))), (9, 13)
    p = jnp.asarray(_x((1, 5, 7, 9, 4), seed=1))
    lhs = jnp.vdot(ops.unfold(x, 3, 1, 2), p)
    rhs = jnp.vdot(x, ops.fold(p, size, 3, 1, 2))
    np.testing.assert_allclose(float(lhs), float(rhs), rtol=1e-5)


def test_fold_wrong_grid_raises():
    with pytest.raises(ValueError, match="patch grid"):
        ops.fold(jnp.zeros((1, 4, 4, 9, 2)), (9, 9), 3, 1, 2)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (5, 1, 2), (3, 2, 0), (3, 1, 0), (5, 1, 1)])
@pytest.mark.parametrize("impl", ["slices", "conv"])
def test_depthwise_conv2d_and_grads(size, kernel, stride, padding, impl):
    """Both formulations equal torch's grouped conv2d, values and gradients w.r.t. input and kernel."""
    C = 6
    x = _x((2, *size, C), seed=3)
    w = _x((C, 1, kernel, kernel), seed=4)  # torch's (out, in/groups, kh, kw)
    xt, wt = _nchw(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    ref = F.conv2d(xt, wt, stride=stride, padding=padding, groups=C)
    g = _x(tuple(ref.permute(0, 2, 3, 1).shape), seed=5)
    ref.backward(_nchw(g))
    k = jnp.asarray(w.transpose(2, 3, 1, 0))  # (kh, kw, 1, C)

    def f(x, k):
        return ops.depthwise_conv2d(x, k, stride, padding, impl=impl, precision="highest")

    out, vjp = jax.vjp(f, jnp.asarray(x), k)
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), **TOL)
    gx, gk = vjp(jnp.asarray(g))
    np.testing.assert_allclose(np.asarray(gx), _nhwc(xt.grad), **TOL)
    np.testing.assert_allclose(np.asarray(gk), wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)


def test_depthwise_conv2d_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl='fft'"):
        ops.depthwise_conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)), impl="fft")


@pytest.mark.parametrize("kernel,stride,padding", [(1, 1, "VALID"), (1, 1, ((0, 0), (0, 0))), (1, 2, "VALID"),
                                                   (3, 1, ((1, 1), (1, 1))), (1, 1, ((1, 1), (1, 1))),
                                                   (3, 2, ((1, 0), (2, 1))), (2, 2, "VALID"), (7, 2, ((3, 3), (3, 3))),
                                                   (3, 1, "SAME"), (3, 3, ((0, 0), (0, 0))), (4, 4, "VALID"),
                                                   (2, 2, ((0, 0), (1, 0))), (3, 2, "VALID")])
def test_conv_general_dilated_matmul_path_equals_lax(kernel, stride, padding):
    """The drop-in gives lax.conv_general_dilated's values and gradients: 1x1/stride 1/unpadded as a matmul; on CPU
    unpadded stride == kernel convolutions as patches times a matmul (incl. the rows and columns the convolution
    drops: 9x7 with 2x2, 3x3, 4x4 patches), the other explicitly padded or VALID convolutions (stride 2, 3x3, 7x7,
    padded 1x1, asymmetric pads, padded patchify, overlapping VALID) through the tap-matmul kernel gradient (a
    custom VJP); a 'SAME' string passed through."""
    from jax import lax

    x, w = jnp.asarray(_x((2, 9, 7, 5), seed=6)), jnp.asarray(_x((kernel, kernel, 5, 4), seed=7))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def ours(x, w):
        return ops.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn, precision="highest")

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dn, precision="highest")

    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)), **TOL)
    prims = {e.primitive.name for e in jax.make_jaxpr(ours)(x, w).jaxpr.eqns}
    unpadded = padding in ("VALID", ((0, 0), (0, 0)))
    matmul = kernel == 1 and stride == 1 and unpadded
    patchify = kernel == stride > 1 and unpadded
    taps = not matmul and not patchify and padding != "SAME"
    assert ("dot_general" in prims) == (matmul or patchify), prims
    assert ("transpose" in prims) == patchify, prims
    assert any(p.startswith("custom_vjp") for p in prims) == taps, prims
    assert ("conv_general_dilated" in prims) == (not matmul and not patchify and not taps), prims
    g = jnp.asarray(_x(ref(x, w).shape, seed=8))
    for a, b in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("cin,kernel,stride", [(16, 3, 1), (3, 7, 2), (16, 3, 2)])
def test_conv_tap_kernel_gradient_in_row_chunks(cin, kernel, stride, chunked, monkeypatch):
    """The tap-matmul kernel gradient, with its rows split into chunks (one chunk of 2240 rows per image at stride 1)
    or as one contraction (what short ones get), per tap (16 input channels) and as one im2col matmul (3 channels, a
    7x7/2 stem), equals lax's."""
    from jax import lax

    assert [ops._row_chunks(p) for p in (40 * 56, 112 * 112, 56 * 56, 97)] == [1, 7, 2, 1]
    limit = 0 if chunked else 10**9  # rows above which the kernel gradient is chunked
    monkeypatch.setattr(ops, "_TAP_ROWS_UNCHUNKED", limit)
    monkeypatch.setattr(ops, "_IM2COL_ROWS_UNCHUNKED", limit)
    x = jnp.asarray(_x((2, 40, 56, cin), seed=11))
    w = jnp.asarray(_x((kernel, kernel, cin, 8), seed=12))
    pad = [(kernel // 2, kernel // 2)] * 2

    def ours(x, w):
        return ops.conv_general_dilated(x, w, (stride, stride), pad, precision="highest")

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision="highest")

    g = jnp.asarray(_x(ref(x, w).shape, seed=13))
    (dx, dw), (rx, rw) = jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(rx), **TOL)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(rw), rtol=1e-4, atol=1e-4 * float(jnp.abs(rw).max()))
    assert float(jnp.abs(rw).std()) > 0.1  # a real gradient, not zeros


@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (4, 6), (2, 9, 6)])
def test_dot_general_dense_layer_path_equals_lax(shape):
    """The drop-in gives lax.dot_general's values and gradients for a dense layer on an N-D input (flattened to one
    2-D matmul when N > 2) and passes other contractions through."""
    from jax import lax

    x, w = jnp.asarray(_x(shape, seed=9)), jnp.asarray(_x((6, 4), seed=10))
    dims = (((x.ndim - 1,), (0,)), ((), ()))

    def ours(x, w):
        return ops.dot_general(x, w, dims, precision="highest")

    def ref(x, w):
        return lax.dot_general(x, w, dims, precision="highest")

    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)), **TOL)
    g = jnp.asarray(_x(ref(x, w).shape, seed=11))
    for a, b in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    eqns = jax.make_jaxpr(ours)(x, w).jaxpr.eqns
    assert any(e.primitive.name == "reshape" for e in eqns) == (x.ndim > 2)
    batched = jnp.asarray(_x((2, 6, 4), seed=12))  # a batched contraction: passed through
    bdims = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(np.asarray(ops.dot_general(jnp.asarray(_x((2, 3, 6))), batched, bdims)),
                               np.asarray(lax.dot_general(jnp.asarray(_x((2, 3, 6))), batched, bdims)), **TOL)


@pytest.mark.parametrize("stride,padding", [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))),
                                            (1, "VALID")])
def test_conv_general_dilated_depthwise_path_equals_lax(stride, padding):
    """A depthwise convolution through the drop-in (what VoVNet's ``conv_dw`` calls) gives lax's values and
    gradients; with symmetric padding (VALID included) it runs as shifted multiply-adds on CPU, otherwise as lax's
    conv."""
    from jax import lax

    x, w = jnp.asarray(_x((2, 9, 7, 5), seed=13)), jnp.asarray(_x((3, 3, 1, 5), seed=14))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    kw = dict(dimension_numbers=dn, feature_group_count=5, precision="highest")

    def ours(x, w):
        return ops.conv_general_dilated(x, w, (stride, stride), padding, **kw)

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), padding, **kw)

    np.testing.assert_allclose(np.asarray(ours(x, w)), np.asarray(ref(x, w)), **TOL)
    g = jnp.asarray(_x(ref(x, w).shape, seed=15))
    for a, b in zip(jax.vjp(ours, x, w)[1](g), jax.vjp(ref, x, w)[1](g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
    prims = {e.primitive.name for e in jax.make_jaxpr(ours)(x, w).jaxpr.eqns}
    sliced = padding in ("VALID", ((1, 1), (1, 1))) and jax.default_backend() == "cpu"
    assert ("conv_general_dilated" in prims) != sliced, prims


def test_gelu_equals_torch_exact_gelu_values_and_grads():
    """layers.gelu is torch.nn.GELU() (erf form, not tanh), written with erf for XLA:CPU speed; bf16 stays bf16.
    Its VJP keeps only the input (the backward recomputes erf), and forward mode still works."""
    from volo_jax.layers import gelu

    x = _x((4096,), seed=9) * 4
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = F.gelu(xt)
    ref.sum().backward()
    out, vjp = jax.vjp(gelu, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.ones_like(out))[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(out) - np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=True))).max() > 1e-4
    assert gelu(jnp.ones(3, jnp.bfloat16)).dtype == jnp.bfloat16
    residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if getattr(leaf, "ndim", 0)]
    assert [leaf.shape for leaf in residuals] == [x.shape]
    np.testing.assert_array_equal(np.asarray(residuals[0]), x)
    _, tangent = jax.jvp(gelu, (jnp.asarray(x),), (jnp.ones_like(out),))
    np.testing.assert_allclose(np.asarray(tangent), xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_layer_norm_equals_torch_and_recomputes_in_backward():
    """layers.layer_norm is torch.nn.LayerNorm (eps 1e-5, centred variance): values and gradients (input, weight,
    bias) match torch; its VJP keeps only the input and the scale (the backward recomputes the statistics), it is
    still an nnx.LayerNorm for the converter, and forward mode works."""
    from flax import nnx

    from volo_jax.layers import layer_norm

    x = _x((4, 10, 48), seed=31) * 3 + 2  # a large mean: the one-pass variance would lose digits
    w, b, g = _x((48,), seed=32), _x((48,), seed=33), _x((4, 10, 48), seed=34)
    ln = layer_norm(48, rngs=nnx.Rngs(0))
    assert isinstance(ln, nnx.LayerNorm)
    ln.scale[...], ln.bias[...] = jnp.asarray(w), jnp.asarray(b)
    ref = torch.nn.LayerNorm(48)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = ref(xt)
    yt.backward(torch.from_numpy(g))

    graphdef, params = nnx.split(ln)
    out, vjp = jax.vjp(lambda x, params: nnx.merge(graphdef, params)(x), jnp.asarray(x), params)
    np.testing.assert_allclose(np.asarray(out), yt.detach().numpy(), **TOL)
    dx, dparams = vjp(jnp.asarray(g))
    pairs = ((dx, xt.grad), (dparams["scale"][...], ref.weight.grad), (dparams["bias"][...], ref.bias.grad))
    for ours, theirs in pairs:
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-4, atol=1e-4)
    residuals = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if getattr(leaf, "ndim", 0)]
    assert sorted(leaf.shape for leaf in residuals) == sorted([(48,), x.shape]), [leaf.shape for leaf in residuals]
    _, tangent = jax.jvp(lambda x: ln(x), (jnp.asarray(x),), (jnp.asarray(g),))
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(jax.jvp(
        lambda x: nnx.LayerNorm.__call__(ln, x), (jnp.asarray(x),), (jnp.asarray(g),))[1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_broadcast_batch_values_grads_and_path(batch):
    """ops.broadcast_batch is jnp.broadcast_to over a leading axis of 1; its gradient (the batch-sum) equals the
    reduce's, done with slice adds (no reduce_sum) on CPU; a leading axis other than 1 is an error."""
    x = jnp.asarray(_x((1, 3, 5, 4), seed=21))
    g = jnp.asarray(_x((batch, 3, 5, 4), seed=22))
    out, vjp = jax.vjp(lambda x: ops.broadcast_batch(x, batch), x)
    ref, ref_vjp = jax.vjp(lambda x: jnp.broadcast_to(x, (batch, 3, 5, 4)), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(ref_vjp(g)[0]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), _x((batch, 3, 5, 4), seed=22).sum(0, keepdims=True),
                               rtol=1e-6, atol=1e-6)
    grad_prims = str(jax.make_jaxpr(lambda x, g: jax.vjp(lambda x: ops.broadcast_batch(x, batch), x)[1](g))(x, g))
    assert ("reduce_sum" in grad_prims) == (batch > 1 and jax.default_backend() != "cpu"), grad_prims
    with pytest.raises(ValueError, match="leading axis"):
        ops.broadcast_batch(jnp.zeros((2, 3)), 4)


@pytest.mark.parametrize("v_heads_last", [False, True])
def test_attend_matches_einsum(v_heads_last):
    """attend's matmul + transpose gives einsum's bqhd result and gradients, for both layouts of v."""
    rng = np.random.default_rng(0)
    B, H, Nq, Nk, d = 2, 3, 5, 7, 4
    attn = jnp.asarray(rng.standard_normal((B, H, Nq, Nk)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((B, Nk, H, d) if v_heads_last else (B, H, Nk, d)), jnp.float32)
    spec = "bhqk,bkhd->bqhd" if v_heads_last else "bhqk,bhkd->bqhd"

    def ref(a, v):
        return jnp.einsum(spec, a, v, precision="highest")

    def ours(a, v):
        return ops.attend(a, v, v_heads_last=v_heads_last)

    out = ours(attn, v)
    assert out.shape == (B, Nq, H, d)
    np.testing.assert_allclose(out, ref(attn, v), rtol=1e-6, atol=1e-6)
    g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    for got, want in zip(jax.vjp(ours, attn, v)[1](g), jax.vjp(ref, attn, v)[1](g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 2])
def test_softmax_values_grads_and_single_residual(axis):
    """ops.softmax gives jax.nn.softmax's values bit for bit and torch's softmax gradient, and its VJP keeps one
    residual (the output) where jax.nn.softmax's default rule keeps the exponentials and the row sums."""
    x = _x((2, 3, 5, 7), seed=31) * 4
    g = _x((2, 3, 5, 7), seed=32)
    out, vjp = jax.vjp(lambda x: ops.softmax(x, axis=axis), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jax.nn.softmax(jnp.asarray(x), axis=axis)))
    xt = torch.from_numpy(x).requires_grad_()
    ref = torch.softmax(xt, dim=axis)
    ref.backward(torch.from_numpy(g))
    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(g))[0]), xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert [leaf.shape for leaf in jax.tree_util.tree_leaves(vjp)] == [x.shape]
    # second order through the custom JVP (e.g. a Hessian-vector product) still agrees with jax.nn.softmax's
    hvp = jax.jvp(jax.grad(lambda x: jnp.sum(ops.softmax(x, axis) ** 3)), (jnp.asarray(x),), (jnp.asarray(g),))[1]
    hvp_ref = jax.jvp(jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=axis) ** 3)), (jnp.asarray(x),),
                      (jnp.asarray(g),))[1]
    np.testing.assert_allclose(np.asarray(hvp), np.asarray(hvp_ref), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_training_values_stats_and_grads_equal_torch(affine):
    """layers.BatchNorm in training mode (closed-form VJP) against torch's BatchNorm2d.train(): output, updated
    running statistics, and the gradients of the input, weight and bias for a non-trivial output gradient."""
    from flax import nnx

    from volo_jax.layers import batch_norm

    C = 6
    x = _x((4, 5, 7, C), seed=41) * 3 + 1
    g = _x((4, 5, 7, C), seed=42)
    w, b = _x((C,), seed=43), _x((C,), seed=44)
    bn = batch_norm(C, rngs=nnx.Rngs(0))
    tbn = torch.nn.BatchNorm2d(C, affine=affine)
    if affine:
        bn.scale[...], bn.bias[...] = jnp.asarray(w), jnp.asarray(b)
        tbn.weight.data, tbn.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    else:
        bn.scale, bn.bias = None, None
    bn.train()
    tbn.train()
    xt = _nchw(x).requires_grad_(True)
    ref = tbn(xt)
    ref.backward(_nchw(g))

    graphdef, state = nnx.split(bn)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m)

    (out, new_state), vjp = jax.vjp(f, state, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), _nhwc(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_state["mean"][...]), tbn.running_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new_state["var"][...]), tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    zero_state = jax.tree.map(jnp.zeros_like, new_state)
    d_state, dx = vjp((jnp.asarray(g), zero_state))
    assert float(np.abs(_nhwc(xt.grad)).max()) > 1e-2  # a real gradient, not one near zero
    np.testing.assert_allclose(np.asarray(dx), _nhwc(xt.grad), rtol=1e-4, atol=1e-5)
    if affine:
        np.testing.assert_allclose(np.asarray(d_state["scale"][...]), tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(d_state["bias"][...]), tbn.bias.grad.numpy(), rtol=1e-5, atol=1e-5)
    # a bfloat16 BatchNorm keeps bfloat16 activations in both directions (statistics in float32)
    bn16 = batch_norm(C, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    bn16.train()
    graphdef16, state16 = nnx.split(bn16)
    out16, vjp16 = jax.vjp(lambda s, x: nnx.merge(graphdef16, s)(x), state16, jnp.asarray(x, jnp.bfloat16))
    assert out16.dtype == jnp.bfloat16 and vjp16(out16)[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), _nhwc(torch.nn.BatchNorm2d(C).train()(_nchw(x))),
                               rtol=0.02, atol=0.02)
