"""Modules shared by two or more model families.

Each mirrors the timm layer of the same name (attribute names included), so that the NNX path of every parameter reads
like the timm state-dict key and conversion is renaming plus transposes (see ``converters/torch_to_flax.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from volo_jax.ops import dot_general, in_memory

Dtype = jnp.dtype | type | None


def Linear(in_features: int, out_features: int, **kwargs) -> nnx.Linear:  # noqa: N802 (a drop-in for the class)
    """``nnx.Linear`` whose matmul flattens the leading axes (:func:`volo_jax.ops.dot_general`: the same result, a
    faster backward on XLA:CPU); parameters, names and every other argument as ``nnx.Linear``."""
    return nnx.Linear(in_features, out_features, dot_general=dot_general, **kwargs)



def timm_trunc_normal(std: float = 0.02) -> nnx.Initializer:
    """timm's ``trunc_normal_(w, std=std)`` as a Flax initializer.

    timm's bounds ``a=-2., b=2.`` are *absolute* values, i.e. +-100 std for std=.02, so in practice it draws from an
    untruncated N(0, std^2). ``jax.nn.initializers.truncated_normal(std)`` instead truncates at +-2 *std* (its
    bounds apply before scaling) and does not correct the variance (actual std ~0.88 * std). Passing the bounds in
    units of std reproduces timm's distribution.
    """
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


trunc_normal_02 = timm_trunc_normal(0.02)
# torch's default Conv2d/Linear init (kaiming_uniform with a=sqrt(5)) is uniform(+-1/sqrt(fan_in)).
torch_default_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


_SQRT_HALF = 0.7071067811865476  # a Python float: weakly typed, so bf16 inputs stay bf16


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form, not the tanh approximation jax.nn.gelu defaults to.

    Written as torch's own formula, ``0.5 * x * (1 + erf(x / sqrt(2)))``, rather than ``jax.nn.gelu(x,
    approximate=False)``, which uses ``erfc``: XLA:CPU's f32 erfc costs ~4x its erf (3.9 vs 1.0 ns per element on
    (8, 196, 1536), 2 cores; torch 0.9) and its fusion keeps more temporaries. Same values to ~1e-6 absolute;
    measured on the jitted training step in one process: poolformer_m36 1.11x faster (temp buffers 2536 -> 2086 MiB),
    volo_d1 and convit_base within noise (temp 1610 -> 1464, 1739 -> 1541 MiB).

    ``jax.checkpoint``: the backward recomputes ``erf`` from ``x`` instead of keeping it. Plain autodiff saved
    three MLP-hidden-sized buffers per MLP for the backward (``x``, ``erf(...)`` and the output that fc2's kernel
    gradient reads); torch saves two (``x`` and the output). A custom VJP that recomputes the ``erf`` is not
    enough: XLA's CSE merges the recomputation with the forward's ``erf`` and keeps it alive again, which the
    checkpoint's ``prevent_cse`` stops. It also keeps forward-mode differentiation (``jax.jvp``) working, which a
    ``custom_vjp`` would not. The recomputed ``erf`` fuses into the backward's elementwise loop; measured on the
    jitted training step at batch 8 (same loss bit for bit, the two programs called in turn 7 times):
    poolformer_m36 1.10x faster (7 of 7, temp 2067 -> 1956 MiB), volo_d1_224 1.04x (7 of 7, 1331 -> 1278 MiB),
    convit_base 1.00x (1507 -> 1425 MiB); inference unchanged.
    """
    return x * 0.5 * (1.0 + lax.erf(x * _SQRT_HALF))


class ReLU(nnx.Module):
    """Parameter-free placeholder, so an ``nnx.List`` keeps timm's ``nn.Sequential`` indices (conv.0, conv.1, ...)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class _RecomputedNorm:
    """Mixin for a Flax norm layer whose backward recomputes the normalisation from its input.

    The forward is the Flax layer's own, run under ``jax.checkpoint``: differentiated, it keeps only ``x`` (and the
    parameters) for the backward and recomputes the mean, variance and ``x - mean`` there, fused into the backward's
    reductions. Plain autodiff kept ``x - mean`` and the normalised output as well, two more input-sized buffers per
    norm; torch's LayerNorm saves ``x`` and two per-row statistics. Measured on the jitted training step at batch 8
    (the two programs compiled in one process and called in turn 7 times, same loss bit for bit): volo_d1_224
    1.05-1.23x faster over three runs (7 of 7 each), temp buffers 1278 -> 1250 MiB; convit_base 1.00-1.04x, 1425 ->
    1369 MiB. Not differentiated (inference), the checkpoint is inlined: the same program, volo_d1_224 eval 1.00x.
    PoolFormer's one-group GroupNorm gained nothing from the same treatment (1.01x, 3 of 7, temp unchanged), so it
    stays ``nnx.GroupNorm``. A ``mask`` argument takes Flax's path unchanged.
    """

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            return super().__call__(x, mask=mask)
        # The closure reads the parameters inside the checkpoint, so they are its inputs, not saved intermediates.
        return jax.checkpoint(lambda x: super(_RecomputedNorm, self).__call__(x))(x)


class LayerNorm(_RecomputedNorm, nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, names and arguments) whose backward recomputes the normalisation."""


def layer_norm(dim: int, *, eps: float = 1e-5, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> LayerNorm:
    """torch.nn.LayerNorm(dim) with torch's eps (1e-5; Flax defaults to 1e-6) and the two-pass variance.

    ``use_fast_variance=False``: Flax's default computes E[x^2] - E[x]^2, which loses precision on activations with a
    large mean; torch computes the centred variance.
    """
    return LayerNorm(dim, epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """Training-mode BatchNorm over every axis but the last (NHWC) in ``x``'s dtype (at least float32 by the caller):
    ``(x - mean) * (rsqrt(var + eps) * scale) + bias`` with the batch mean and biased, centred variance (the forward
    ops of :class:`BatchNorm`'s general path). Its VJP is the closed form (``xhat = (x - mean) * rstd``)::

        dbias = sum(dy);  dscale = sum(dy * xhat);  dx = scale * rstd * (dy - dbias / n - xhat * dscale / n)

    Why: differentiated by JAX, the two-pass statistics give three full-size reductions per BatchNorm (through the
    mean, the variance, and the variance's own dependence on the mean, which is zero in exact arithmetic) and keep
    ``x - mean`` and its products for the backward; the closed form reads ``x`` and ``dy`` for two reductions and one
    elementwise pass. ese_vovnet19b_dw's training step 1.12x and temp buffers 638 -> 474 MiB, volo_d1_224's 1.07x
    and 1405 -> 1331 MiB (batch 8, 2 cores, one-process A/B, 7 of 7 pairs each).
    """
    return _batch_norm_train_fwd(x, scale, bias, eps)[0]


def _batch_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and biased centred (two-pass) variance over every axis but the last."""
    axes = tuple(range(x.ndim - 1))
    mean = x.mean(axes)
    return mean, jnp.square(x - mean).mean(axes)


def _batch_norm_train_fwd(x: jax.Array, scale: jax.Array, bias: jax.Array,
                          eps: float) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    mean, var = _batch_stats(x)
    rstd = lax.rsqrt(var + eps)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _batch_norm_train_bwd(eps: float, res: tuple[jax.Array, ...],
                          dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    x, mean, rstd, scale = res
    axes = tuple(range(x.ndim - 1))
    n = float(np.prod(x.shape[:-1]))
    xhat = (x - mean) * rstd
    dbias = dy.sum(axes)
    dscale = (dy * xhat).sum(axes)
    dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
    return dx, dscale, dbias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's ``BatchNorm2d`` semantics in training as well as in eval.

    Training (``use_running_average=False``, what ``model.train()`` sets): the input is normalised with the batch mean
    and the BIASED batch variance over every axis but the feature axis (N, H, W of an NHWC map), both computed in at
    least float32 with the centred (two-pass) variance; the running statistics are updated with the UNBIASED variance
    ``var * n / (n - 1)``, as torch does (Flax's own BatchNorm uses the biased one):
    ``running = momentum * running + (1 - momentum) * batch`` with Flax's ``momentum`` (torch's 0.1 is 0.9 here).
    Eval (``use_running_average=True``): ``(x - running_mean) / sqrt(running_var + eps) * scale + bias``.

    With ``axis_name`` (under ``jax.shard_map``/``pmap``/``vmap``) the statistics are synchronised across that axis
    like torch's ``SyncBatchNorm``: the global mean is ``pmean`` of the local means, the global variance ``pmean`` of
    the local mean squared deviation from that global mean (equal to the full-batch statistics when every shard holds
    the same number of samples), and ``n`` is the global element count. Masks are not supported.
    """

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            raise NotImplementedError("volo_jax BatchNorm does not support masks")
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra is None:
            raise ValueError("BatchNorm needs use_running_average: call model.train() or model.eval()")
        feature_axis = self.axis % x.ndim
        reduction_axes = tuple(i for i in range(x.ndim) if i != feature_axis)
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        x, mean, var, scale, bias = self.promote_dtype((x, self.mean[...], self.var[...], scale, bias),
                                                       dtype=self.dtype)
        out_dtype = x.dtype
        if not use_ra and self.axis_name is None and feature_axis == x.ndim - 1:
            # the common case (NHWC, the global batch under jit): the closed-form VJP (see _batch_norm_train)
            xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in at least float32
            n = float(np.prod(x.shape[:-1]))
            mean, var = _batch_stats(lax.stop_gradient(xs))  # the same ops as inside: XLA computes them once
            m = self.momentum
            unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1.0 - m) * mean).astype(self.mean.dtype)
            self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1.0 - m) * unbiased).astype(self.var.dtype)
            ones = jnp.ones(x.shape[-1], xs.dtype)
            y = _batch_norm_train(xs, ones if scale is None else scale.astype(xs.dtype),
                                  jnp.zeros_like(ones) if bias is None else bias.astype(xs.dtype), self.epsilon)
            return y.astype(out_dtype)
        if not use_ra:
            xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # statistics in at least float32
            n = float(np.prod([x.shape[i] for i in reduction_axes]))
            mean = xs.mean(reduction_axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name, axis_index_groups=self.axis_index_groups)
                n = n * jax.lax.psum(1.0, self.axis_name, axis_index_groups=self.axis_index_groups)
            stat_shape = [1] * x.ndim
            stat_shape[feature_axis] = x.shape[feature_axis]
            var = jnp.square(xs - mean.reshape(stat_shape)).mean(reduction_axes)  # biased (centred) variance
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name, axis_index_groups=self.axis_index_groups)
            unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))
            m = self.momentum
            self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1.0 - m) * mean).astype(self.mean.dtype)
            self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1.0 - m) * unbiased).astype(self.var.dtype)
        shape = [1] * x.ndim
        shape[feature_axis] = x.shape[feature_axis]
        mul = jax.lax.rsqrt(var + self.epsilon)
        if scale is not None:
            mul = mul * scale
        y = (x - mean.reshape(shape)) * mul.reshape(shape)
        if bias is not None:
            y = y + bias.reshape(shape)
        return y.astype(out_dtype)


def batch_norm(dim: int, *, eps: float = 1e-5, momentum: float = 0.1, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, axis_name: str | None = None, rngs: nnx.Rngs) -> BatchNorm:
    """torch.nn.BatchNorm2d(dim) on NHWC (:class:`BatchNorm`): ``momentum`` in torch terms (0.1 in torch is 0.9 in
    Flax), torch's eps; ``axis_name`` synchronises the training statistics across that mapped axis (SyncBatchNorm)."""
    return BatchNorm(dim, epsilon=eps, momentum=1.0 - momentum, use_fast_variance=False, dtype=dtype,
                     param_dtype=param_dtype, axis_name=axis_name, rngs=rngs)


def dropout(rate: float, rngs: nnx.Rngs | None) -> nnx.Dropout:
    """``nnx.Dropout`` that holds an RNG stream only when it can drop (keeps the state free of unused RNG keys)."""
    return nnx.Dropout(rate, rngs=rngs if rate > 0.0 else None)


class DropPath(nnx.Module):
    """Stochastic depth per sample (timm ``DropPath``, ``scale_by_keep=True``).

    Has no parameters, so it may stand where timm has ``nn.Identity`` (rate 0). ``model.eval()`` sets
    ``deterministic=True`` like it does for ``nnx.Dropout``.
    """

    def __init__(self, rate: float = 0.0, *, rngs: nnx.Rngs | None = None):
        self.rate = rate
        self.deterministic = False
        self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0.0) else nnx.data(None)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        if self.rngs is None:
            raise ValueError("DropPath in training mode needs rngs (create the model with rngs=nnx.Rngs(...)).")
        keep = 1.0 - self.rate
        # One Bernoulli draw per sample, broadcast over every other axis: (B, 1, ..., 1).
        mask = jax.random.bernoulli(self.rngs(), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Mlp(nnx.Module):
    """timm ``layers.Mlp``: fc1 -> act -> drop1 -> fc2 -> drop2 (timm's ``norm`` is Identity in these models)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None, *,
                 act: Callable[[jax.Array], jax.Array] = gelu, drop: float = 0.0, bias: bool = True,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, kernel_init=trunc_normal_02, rngs=rngs)
        self.fc1 = Linear(in_features, hidden_features, **kw)
        self.act = act
        self.drop1 = dropout(drop, rngs)
        self.fc2 = Linear(hidden_features, out_features, **kw)
        self.drop2 = dropout(drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))


class Identity(nnx.Module):
    """timm's ``nn.Identity`` where a pruned module (e.g. a final norm of a features-only model) keeps its call."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


@jax.custom_vjp
def materialize_grad(x: jax.Array) -> jax.Array:
    """The identity, whose backward makes XLA write the incoming gradient to memory before using it.

    Why: in a residual network the gradient of the residual stream is a running elementwise sum over the blocks
    (``g_{l-1} = g_l + (block l's contribution)``), and each ``g_l`` also feeds block ``l``'s matmul gradients.
    XLA:CPU's fusion duplicates cheap elementwise producers into every consumer, so the fusion that computes
    ``g_{l-1}`` recomputes ``g_l`` and everything above it instead of reading it: quadratic work in the depth.
    In volo_d1_224's training step that was one fusion per LayerNorm with up to 194 operands, 240 ms of add_any
    (8, 14, 14, 384) fusions, and in convit_base's up to 180 operands (``jax.profiler`` trace, batch 8, 2 cores).
    ``lax.optimization_barrier`` does not stop it (XLA:CPU removes barriers before fusion). A dynamic-update-slice
    updates its operand in place, so that operand must exist in memory: the backward rewrites the gradient's first
    channel with itself (no change to any value) along the last axis, which data parallelism never shards
    (:func:`volo_jax.ops.in_memory`).
    """
    return x


def _materialize_grad_fwd(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None


def _materialize_grad_bwd(_: None, g: jax.Array) -> tuple[jax.Array]:
    return (in_memory(g),)


materialize_grad.defvjp(_materialize_grad_fwd, _materialize_grad_bwd)


@jax.custom_vjp
def _param_grads_first(params: nnx.State, x: jax.Array) -> tuple[nnx.State, jax.Array]:
    """The identity on ``(params, x)``, whose backward makes the gradient of ``x`` depend on every parameter
    gradient, so that a program cannot use ``x``'s gradient before it has computed them (see :func:`run_block`)."""
    return params, x


def _param_grads_first_fwd(params: nnx.State, x: jax.Array) -> tuple[tuple[nnx.State, jax.Array], None]:
    return (params, x), None


def _param_grads_first_bwd(_: None, cotangents: tuple[nnx.State, jax.Array]) -> tuple[nnx.State, jax.Array]:
    d_params, dx = cotangents
    # 0 * (one element of each parameter gradient): zero for finite gradients, but XLA does not fold a float x * 0
    # (it is NaN for an infinite or NaN x), so dx now reads every parameter gradient. A non-finite parameter
    # gradient makes dx NaN too, where the update would already have turned the parameters NaN.
    dep = sum((jnp.ravel(g)[0].astype(dx.dtype) for g in jax.tree.leaves(d_params)), jnp.zeros((), dx.dtype))
    return d_params, dx + dep * 0


_param_grads_first.defvjp(_param_grads_first_fwd, _param_grads_first_bwd)


def _call_param_grads_first(block: nnx.Module, x: jax.Array,
                            call: Callable[[nnx.Module, jax.Array], jax.Array]) -> jax.Array:
    """``call(block, x)`` on a copy of ``block`` whose parameters, and ``x``, went through :func:`_param_grads_first`.

    A copy, so the caller's module never holds traced parameters (it may live outside the trace, e.g. closed over by
    ``jax.jit``, where its variables cannot take traced values). The copy has new parameter variables and shares every
    other variable with ``block`` (``nnx.merge`` reuses the split state's variables), so BatchNorm statistics and RNG
    counters update on ``block`` as in a plain call."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    params, x = _param_grads_first(params, x)
    return call(nnx.merge(graphdef, params, rest), x)


def run_block(block: Callable[[jax.Array], jax.Array], x: jax.Array, checkpoint: bool = False, *,
              grad_barrier: bool = False, param_grads_first: bool = False) -> jax.Array:
    """``block(x)``, or with ``checkpoint`` the same call under ``nnx.remat`` (activation checkpointing, timm's
    ``checkpoint_seq`` one block at a time).

    With ``grad_barrier``, on CPU the block's input goes through :func:`materialize_grad`, which breaks XLA:CPU's
    quadratic recomputation of the residual gradient (values and gradients unchanged). The LayerNorm transformers
    (VOLO, ConViT) need it; PoolFormer's GroupNorm residual stream does not show the trap, and there the barrier
    only added 3 % to the step's temp buffers, so the models choose.

    With ``param_grads_first``, on CPU the backward computes the block's parameter gradients before it hands the
    gradient of ``x`` on to the block below. Without it, XLA:CPU's memory-optimized scheduler (jaxlib 0.10.2) ran the
    whole input-gradient chain first and every block's weight-gradient dots, bias and norm reductions at the end,
    keeping each block's output gradients and saved inputs alive to the end of the step: in volo_d1_224's step
    (batch 8) the 14 transformer blocks' ``(1568, 1152)`` qkv gradients, MLP-hidden products and more were live
    together at the peak (XLA's ``live-range`` dump). With it, temp buffers of the batch-8 training step
    volo_d1_224 1264 -> 1128 MiB, poolformer_m36 2220 -> 1799, convit_base 1793 -> 1689, at the same speed (fresh
    processes in turn, 3 each: 0.99x, 1.01x, 1.02x; the same losses over 8 steps). ese_vovnet19b_dw's step went
    548 -> 474 MiB but about 0.85x as fast (one-process A/Bs both ways round: its few, small blocks lose the
    overlap of weight- and input-gradient work), so the models choose. The dependency is a zero,
    ``0 * (one element of each parameter gradient)``, added to the input gradient: the forward is untouched,
    gradients equal up to float rounding (the zero changes XLA's fusions, and with them the order of some sums).
    ``lax.optimization_barrier`` cannot do this: XLA:CPU removes barriers before scheduling, without ordering
    anything.

    Under remat the backward pass keeps only each block's input and recomputes the block's forward when its gradient
    is needed: activation memory drops from every intermediate of every block to the block inputs plus one block's
    intermediates, for about one extra forward of compute. The result and the gradients are the same; dropout and
    drop-path recompute with the same keys (the RNG state is an input of the rematerialised function).

    On XLA:CPU (jaxlib 0.10.2) remat lowers the peak only together with ``param_grads_first``, which stops the
    scheduler from keeping every block's gradients to the end: temp buffers of the batch-8 training step at 224 px,
    without -> with checkpointing, volo_d1_224 1128 -> 884 MiB, poolformer_m36 1799 -> 1056, convit_base 1689 ->
    927; ese_vovnet19b_dw (no ``param_grads_first``) 548 -> 547. Before ``param_grads_first`` remat raised volo_d1's
    1610 MiB to 1724.
    """
    cpu = jax.default_backend() == "cpu"
    if grad_barrier and cpu:
        x = materialize_grad(x)
    call = nnx.remat(_call_block) if checkpoint else _call_block
    if param_grads_first and cpu and isinstance(block, nnx.Module):
        return _call_param_grads_first(block, x, call)
    return call(block, x)


def _call_block(block: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    return block(x)
