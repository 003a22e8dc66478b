"""Outlook attention against `timm.models.volo.OutlookAttention`: forward and gradients, every weight randomized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from volo_jax.outlook import OutlookAttention, outlook_attention, outlook_attention_reference

torch = pytest.importorskip("torch")
timm_volo = pytest.importorskip("timm.models.volo")

LINEARS = ("v", "attn", "proj")


def _close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """max|diff| <= 1e-4 * max(1, max|ref|), the fp32 parity tolerance."""
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    err, bound = float(np.max(np.abs(ours - ref))), 1e-4 * max(1.0, float(np.max(np.abs(ref))))
    assert err <= bound, f"{what}: max|diff| {err:.3g} > {bound:.3g}"


def _pair(dim, heads, k, p, s, seed=0):
    """timm's module with every weight and bias randomized, and ours with the same weights."""
    torch.manual_seed(seed)
    ref = timm_volo.OutlookAttention(dim, heads, kernel_size=k, padding=p, stride=s, qkv_bias=True).eval()
    with torch.no_grad():
        for name in LINEARS:
            lin = getattr(ref, name)
            std = 1.0 / dim**0.5
            if name == "attn":  # scaled logits with std ~3: a peaked softmax, so a wrong (i, j) order shows
                std *= 3.0 / ref.scale
            torch.nn.init.normal_(lin.weight, std=std)
            torch.nn.init.normal_(lin.bias, std=0.5)
    ours = OutlookAttention(dim, heads, kernel_size=k, padding=p, stride=s, qkv_bias=True, rngs=nnx.Rngs(0))
    ours.eval()
    for name in LINEARS:
        lin_t, lin_j = getattr(ref, name), getattr(ours, name)
        lin_j.kernel[...] = jnp.asarray(lin_t.weight.detach().numpy().T)  # torch (out, in) -> nnx (in, out)
        lin_j.bias[...] = jnp.asarray(lin_t.bias.detach().numpy())
    return ref, ours


def _attention_weights(ref, xt):
    """timm's softmaxed attention (B, heads, N, k*k, k*k), recomputed from its submodules."""
    kk = ref.kernel_size**2
    a = ref.attn(ref.pool(xt.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    B, h, w, _ = a.shape
    return (a.reshape(B, h * w, ref.num_heads, kk, kk) * ref.scale).softmax(-1)


CASES = [
    # (B, H, W, C, heads, k, p, s)
    *[(2, H, W, 48, 2, 3, 1, s) for (H, W) in [(7, 7), (15, 15), (28, 28), (9, 13)] for s in (1, 2)],
    (2, 15, 11, 48, 2, 5, 2, 2),
    (1, 28, 28, 192, 6, 3, 1, 2),  # VOLO-D1 stage 1
]


@pytest.mark.parametrize("B,H,W,C,heads,k,p,s", CASES)
def test_outlook_attention_matches_timm(B, H, W, C, heads, k, p, s):
    ref, ours = _pair(C, heads, k, p, s)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, H, W, C)).astype(np.float32)
    g = rng.standard_normal((B, H, W, C)).astype(np.float32)  # random cotangent

    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = ref(xt)
    (out_t * torch.from_numpy(g)).sum().backward()
    out_t = out_t.detach().numpy()

    # The comparison must be able to fail: a peaked softmax and outputs that depend on the input.
    with torch.no_grad():
        attn = _attention_weights(ref, torch.from_numpy(x)).numpy()
    assert attn.max(-1).mean() > 0.3, "attention is near uniform (1/k^2); the test would miss index-order bugs"
    if B > 1:
        assert np.abs(out_t[0] - out_t[1]).max() > 1e-2 * np.abs(out_t).max()

    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)

    @jax.jit
    def fwd_bwd(params, x):
        def loss(params, x):
            y = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(y * g), y

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    (gp, gx), out_j = fwd_bwd(params, jnp.asarray(x))
    _close(np.asarray(out_j), out_t, "forward")
    _close(np.asarray(gx), xt.grad.numpy(), "grad x")
    for name in LINEARS:
        lin_t, lin_g = getattr(ref, name), getattr(gp, name)
        _close(np.asarray(lin_g.kernel[...]), lin_t.weight.grad.numpy().T, f"grad {name}.weight")
        _close(np.asarray(lin_g.bias[...]), lin_t.bias.grad.numpy(), f"grad {name}.bias")


def test_attribute_names_mirror_timm():
    ref = timm_volo.OutlookAttention(48, 2, qkv_bias=False)
    ours = OutlookAttention(48, 2, rngs=nnx.Rngs(0))
    ours_keys = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    rename = {"weight": "kernel"}
    ref_keys = {".".join(rename.get(part, part) for part in key.split(".")) for key in ref.state_dict()}
    assert ours_keys == ref_keys
    for name in LINEARS:  # shapes transpose (out, in) -> (in, out)
        assert getattr(ours, name).kernel[...].shape == tuple(getattr(ref, name).weight.shape[::-1])


def test_init_like_timm():
    """Linear kernels ~ N(0, .02^2) (timm's trunc_normal_ bounds of +-2 are +-100 std), zero biases."""
    m = OutlookAttention(384, 12, stride=2, qkv_bias=True, rngs=nnx.Rngs(0))
    w = np.asarray(m.attn.kernel[...])
    assert abs(w.std() - 0.02) < 1e-3 and np.abs(w).max() > 2.5 * 0.02  # not truncated at +-2 std
    for name in LINEARS:
        assert not np.any(np.asarray(getattr(m, name).bias[...]))


def test_dropout_eval_and_train():
    m = OutlookAttention(48, 2, stride=2, attn_drop=0.5, proj_drop=0.1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 7, 7, 48)), jnp.float32)
    call = nnx.jit(lambda m, x: m(x))
    m.eval()
    np.testing.assert_array_equal(np.asarray(call(m, x)), np.asarray(call(m, x)))
    m.train()
    assert not np.allclose(np.asarray(call(m, x)), np.asarray(call(m, x)))


# (H, W, k, p, s): VOLO's windows plus corners of the phase-layout kernel (stride 3, kernel < stride so some phases
# get no contribution, even kernels, large halos); grids chosen so that floor((H + 2p - k) / s) + 1 == ceil(H / s).
KERNEL_CASES = [
    (7, 7, 3, 1, 1),
    (9, 13, 3, 1, 2),
    (15, 11, 5, 2, 2),
    (9, 13, 5, 2, 1),
    (10, 7, 3, 1, 3),
    (9, 6, 1, 0, 2),
    (8, 10, 2, 0, 2),
    (8, 6, 4, 1, 2),
]


@pytest.mark.parametrize("H,W,k,p,s", KERNEL_CASES)
def test_fast_kernel_matches_reference(H, W, k, p, s):
    """The phase-layout kernel and its hand-written VJP against the unfold/einsum/fold transcription of timm."""
    B, C, heads = 2, 12, 3
    h, w = -(-H // s), -(-W // s)
    rng = np.random.default_rng(1)
    v = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    logits = jnp.asarray(3 * rng.standard_normal((B, h, w, heads * k**4)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((B, H, W, C)), jnp.float32)
    kw = dict(num_heads=heads, kernel_size=k, padding=p, stride=s, scale=0.5)

    def vjp(fn):
        out, pullback = jax.vjp(lambda v, lg: fn(v, lg, **kw), v, logits)
        return (out, *pullback(g))

    fast = jax.jit(lambda: vjp(outlook_attention))()
    ref = jax.jit(lambda: vjp(outlook_attention_reference))()
    for what, a, b in zip(("forward", "grad v", "grad logits"), fast, ref, strict=True):
        _close(np.asarray(a), np.asarray(b), what)


def test_second_order_grad_runs():
    """The custom VJP is itself differentiable (e.g. for gradient penalties)."""
    rng = np.random.default_rng(0)
    v = jnp.asarray(rng.standard_normal((1, 7, 9, 8)), jnp.float32)
    lg = jnp.asarray(rng.standard_normal((1, 4, 5, 2 * 81)), jnp.float32)
    kw = dict(num_heads=2, kernel_size=3, padding=1, stride=2, scale=0.5)

    def gnorm(fn):
        def f(v):
            return jnp.sum(jax.grad(lambda v: jnp.sum(jnp.sin(fn(v, lg, **kw))))(v) ** 2)

        return jax.jit(jax.grad(f))(v)

    _close(np.asarray(gnorm(outlook_attention)), np.asarray(gnorm(outlook_attention_reference)), "grad of grad")


def test_grid_mismatch_raises():
    """timm assumes floor((H + 2p - k) / s) + 1 == ceil(H / s); we check it."""
    v = jnp.zeros((1, 8, 8, 4))
    for fn in (outlook_attention, outlook_attention_reference):
        with pytest.raises(ValueError, match="unfold grid"):  # k=3, p=0: 6x6 windows vs an 8x8 attention grid
            fn(v, jnp.zeros((1, 8, 8, 81)), num_heads=1, kernel_size=3, padding=0, stride=1, scale=1.0)


def test_bfloat16_runs():
    m = OutlookAttention(48, 2, stride=2, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(m, jnp.ones((1, 9, 13, 48), jnp.bfloat16))
    assert y.shape == (1, 9, 13, 48) and y.dtype == jnp.bfloat16
