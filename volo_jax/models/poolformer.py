"""PoolFormer (v1) and PoolFormerV2, in Flax NNX.

Papers: Yu et al., "MetaFormer Is Actually What You Need for Vision", https://arxiv.org/abs/2111.11418 (v1);
Yu et al., "MetaFormer Baselines for Vision", https://arxiv.org/abs/2210.13452 (v2).
Original code: https://github.com/sail-sg/poolformer, https://github.com/sail-sg/metaformer (Apache-2.0)
Mirrors: ``timm/models/metaformer.py`` (timm 1.0.x), the ``MetaFormer`` class with the ``Pooling`` token mixer.
Attribute names and nesting follow timm, so the NNX path of every variable reads like timm's state-dict key
(``stages.2.blocks.3.mlp.fc1.kernel`` <- ``stages.2.blocks.3.mlp.fc1.weight``).

Layout is NHWC throughout (timm's PoolFormer is NCHW). Parity traps reproduced here: the pooling token mixer averages
over valid pixels only (``count_include_pad=False``) and returns ``pool(x) - x``; timm's MLP is a pair of 1x1 convs
(``Mlp(use_conv=True)``), so ours uses ``nnx.Conv`` with 1x1 kernels (the converter then transposes OIHW -> HWIO);
norms: v1 ``GroupNorm1`` (one group, torch eps 1e-5, with bias), v2 ``GroupNorm1NoBias`` (eps 1e-6, no bias) and
``LayerNorm2dNoBias`` (eps 1e-6) in the stem and downsamples; the head norm is ``LayerNorm2d`` (eps 1e-6, bias) applied
*after* global pooling; v1 has layer scales on both branches, v2 has res scales on the residual of stages 3-4 and
StarReLU (``s * relu(x)**2 + b``, learnable scalar ``s`` and ``b``) in the MLP.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from volo_jax._config import replace_config
from volo_jax.features import feature_take_indices
from volo_jax.layers import (
    DropPath,
    Dtype,
    LayerNorm,
    Linear,
    dropout,
    gelu,
    run_block,
    trunc_normal_02,
)
from volo_jax.ops import avg_pool2d, conv_general_dilated


@dataclass(frozen=True)
class PoolFormerConfig:
    """Architecture of one PoolFormer variant (timm's ``MetaFormer.__init__`` arguments for the pooling mixer)."""

    depths: tuple[int, ...]
    dims: tuple[int, ...]
    # v1: no stem/downsample norm, GELU + biased MLP, GroupNorm1 (eps 1e-5) blocks, layer scale on both branches.
    # v2: LayerNorm2dNoBias stem/downsample norm, StarReLU + bias-free MLP, GroupNorm1NoBias (eps 1e-6), res scales.
    downsample_norm: bool = False
    mlp_act: str = "gelu"  # "gelu" (torch nn.GELU, exact erf) or "star_relu"
    mlp_bias: bool = True
    norm_bias: bool = True
    norm_eps: float = 1e-5
    layer_scale_init_values: float | None = 1e-5
    res_scale_init_values: tuple[float | None, ...] | None = None
    pool_size: int = 3
    # Informational only: PoolFormer is fully convolutional; kept so ``create_model(img_size=...)`` sets the data
    # config's input size as it does for the other families.
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0


def _to_tuple(v: Any, n: int) -> tuple[Any, ...]:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def layer_norm_2d(dim: int, *, eps: float = 1e-6, use_bias: bool = True, dtype: Dtype = None,
                  param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> LayerNorm:
    """timm ``LayerNorm2d`` (channel LayerNorm of an NCHW map, eps 1e-6) = LayerNorm over the last axis in NHWC."""
    return LayerNorm(dim, epsilon=eps, use_bias=use_bias, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


def group_norm_1(dim: int, *, eps: float = 1e-5, use_bias: bool = True, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """timm ``GroupNorm1``: GroupNorm with ONE group (statistics over H, W and C per sample), per-channel affine.

    ``eps``: torch's GroupNorm default 1e-5 (v1); timm's ``GroupNorm1NoBias`` (v2) uses 1e-6 and no bias.
    """
    return nnx.GroupNorm(dim, num_groups=1, epsilon=eps, use_bias=use_bias, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)


class Scale(nnx.Module):
    """timm metaformer ``Scale``: ``x * scale`` per channel; ``scale`` has torch's shape ``(dim,)``."""

    def __init__(self, dim: int, init_value: float = 1.0, *, param_dtype: Dtype = jnp.float32):
        self.scale = nnx.Param(jnp.full((dim,), init_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...].astype(x.dtype)  # (..., C) * (C,)


class StarReLU(nnx.Module):
    """timm ``StarReLU``: ``scale * relu(x)**2 + bias`` with learnable scalars of torch shape ``(1,)``."""

    def __init__(self, scale_value: float = 1.0, bias_value: float = 0.0, *, param_dtype: Dtype = jnp.float32):
        self.scale = nnx.Param(jnp.full((1,), scale_value, param_dtype))
        self.bias = nnx.Param(jnp.full((1,), bias_value, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.scale[...].astype(x.dtype) * jnp.square(jax.nn.relu(x)) + self.bias[...].astype(x.dtype)


class GELU(nnx.Module):
    """Parameter-free placeholder for torch ``nn.GELU()`` (exact erf form)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


class Stem(nnx.Module):
    """7x7 stride-4 conv (padding 2), then an optional channel LayerNorm (v2)."""

    def __init__(self, in_chans: int, out_chans: int, norm: bool, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        # Explicit padding: Flax convs default to SAME, timm's stem pads 2 on each side.
        self.conv = nnx.Conv(in_chans, out_chans, (7, 7), 4, padding=((2, 2), (2, 2)), kernel_init=trunc_normal_02,
                             conv_general_dilated=conv_general_dilated, **dd, rngs=rngs)  # CPU: matmul kernel grads
        # timm: LayerNorm2dNoBias (eps 1e-6) for v2, nn.Identity for v1 (downsample_norm=None).
        self.norm = layer_norm_2d(out_chans, use_bias=False, **dd, rngs=rngs) if norm else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)  # (B, H/4, W/4, C)
        return self.norm(x) if self.norm is not None else x


class Downsampling(nnx.Module):
    """Optional channel LayerNorm (v2), then a 3x3 stride-2 conv (padding 1) between stages."""

    def __init__(self, in_chans: int, out_chans: int, norm: bool, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm = layer_norm_2d(in_chans, use_bias=False, **dd, rngs=rngs) if norm else None
        self.conv = nnx.Conv(in_chans, out_chans, (3, 3), 2, padding=((1, 1), (1, 1)), kernel_init=trunc_normal_02,
                             conv_general_dilated=conv_general_dilated, **dd, rngs=rngs)  # CPU: matmul kernel grads

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm is not None:
            x = self.norm(x)
        return self.conv(x)  # (B, H/2, W/2, out_chans)


class Pooling(nnx.Module):
    """PoolFormer token mixer: ``avg_pool(x) - x`` with a stride-1 pool that excludes padding from the average."""

    def __init__(self, pool_size: int = 3):
        self.pool_size = pool_size

    def __call__(self, x: jax.Array) -> jax.Array:
        # timm: nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)
        y = avg_pool2d(x, self.pool_size, 1, self.pool_size // 2, count_include_pad=False)
        return y - x


class ConvMlp(nnx.Module):
    """timm ``Mlp(use_conv=True)``: 1x1 conv fc1 -> act -> drop1 -> 1x1 conv fc2 -> drop2 (timm's norm is Identity).

    1x1 ``nnx.Conv`` rather than ``nnx.Linear`` so the converter maps timm's ``(out, in, 1, 1)`` conv weights.
    """

    def __init__(self, in_features: int, hidden_features: int, *, act: str = "gelu", bias: bool = True,
                 drop: float = 0.0, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        # ops.conv_general_dilated: the 1x1 convs as matmuls (XLA:CPU's 1x1 convolution is much slower)
        kw = dict(use_bias=bias, padding="VALID", kernel_init=trunc_normal_02, dtype=dtype, param_dtype=param_dtype,
                  conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.fc1 = nnx.Conv(in_features, hidden_features, (1, 1), **kw)
        if act == "gelu":
            self.act: nnx.Module = GELU()
        elif act == "star_relu":
            self.act = StarReLU(param_dtype=param_dtype)
        else:
            raise ValueError(f"unknown PoolFormer mlp_act {act!r} (use 'gelu' or 'star_relu')")
        self.drop1 = dropout(drop, rngs)
        self.fc2 = nnx.Conv(hidden_features, in_features, (1, 1), **kw)
        self.drop2 = dropout(drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.drop1(self.act(self.fc1(x)))  # (B, H, W, hidden)
        return self.drop2(self.fc2(x))


class MetaFormerBlock(nnx.Module):
    """``res_scale1(x) + layer_scale1(drop_path(pool(norm1(x))))``, then the same with the MLP (timm forward order).

    timm's ``nn.Identity`` entries (layer/res scales when disabled) are ``None`` here: they hold no state-dict keys.
    """

    def __init__(self, dim: int, cfg: PoolFormerConfig, drop_path: float = 0.0, layer_scale: float | None = None,
                 res_scale: float | None = None, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        norm = dict(eps=cfg.norm_eps, use_bias=cfg.norm_bias, **dd, rngs=rngs)

        def scale(value: float | None) -> Scale | None:
            return Scale(dim, value, param_dtype=param_dtype) if value is not None else None

        self.norm1 = group_norm_1(dim, **norm)
        self.token_mixer = Pooling(cfg.pool_size)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.layer_scale1 = scale(layer_scale)
        self.res_scale1 = scale(res_scale)
        self.norm2 = group_norm_1(dim, **norm)
        self.mlp = ConvMlp(dim, 4 * dim, act=cfg.mlp_act, bias=cfg.mlp_bias, drop=cfg.proj_drop_rate, **dd, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)
        self.layer_scale2 = scale(layer_scale)
        self.res_scale2 = scale(res_scale)

    @staticmethod
    def _apply(mod: Callable[[jax.Array], jax.Array] | None, x: jax.Array) -> jax.Array:
        return mod(x) if mod is not None else x

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.drop_path1(self.token_mixer(self.norm1(x)))
        x = self._apply(self.res_scale1, x) + self._apply(self.layer_scale1, y)
        y = self.drop_path2(self.mlp(self.norm2(x)))
        return self._apply(self.res_scale2, x) + self._apply(self.layer_scale2, y)


class MetaFormerStage(nnx.Module):
    """Optional downsample (timm: ``nn.Identity`` when the width does not change, i.e. stage 1), then the blocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, cfg: PoolFormerConfig, dp_rates: list[float],
                 layer_scale: float | None, res_scale: float | None, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.downsample = None if in_chs == out_chs else \
            Downsampling(in_chs, out_chs, cfg.downsample_norm, **dd, rngs=rngs)
        self.grad_checkpointing = False  # MetaFormer.set_grad_checkpointing()
        self.blocks = nnx.List([
            MetaFormerBlock(out_chs, cfg, dp_rates[i], layer_scale, res_scale, **dd, rngs=rngs) for i in range(depth)
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing, param_grads_first=True)
        return x


class ClassifierHead(nnx.Module):
    """timm's ``head`` Sequential: global_pool -> norm (LayerNorm2d, eps 1e-6, with bias) -> flatten -> drop -> fc."""

    def __init__(self, dim: int, num_classes: int, global_pool: str, drop_rate: float, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.global_pool = global_pool
        self.norm = layer_norm_2d(dim, **dd, rngs=rngs)
        self.drop = dropout(drop_rate, rngs)
        self.fc = Linear(dim, num_classes, kernel_init=trunc_normal_02, **dd, rngs=rngs) if num_classes > 0 \
            else None

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        if self.global_pool == "avg":
            x = x.mean(axis=(1, 2))  # (B, C)
        elif self.global_pool == "max":
            x = x.max(axis=(1, 2))
        x = self.drop(self.norm(x))
        return x if pre_logits or self.fc is None else self.fc(x)


class MetaFormer(nnx.Module):
    """PoolFormer v1/v2. Input NHWC images ``(B, H, W, in_chans)``; ``model(x)`` returns logits like timm."""

    def __init__(self, cfg: PoolFormerConfig, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        if cfg.global_pool not in ("", "avg", "max"):
            raise ValueError(f"global_pool must be '', 'avg' or 'max', got {cfg.global_pool!r}")
        num_stages = len(cfg.depths)
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.num_features = self.head_hidden_size = cfg.dims[-1]
        layer_scales = _to_tuple(cfg.layer_scale_init_values, num_stages)
        res_scales = _to_tuple(cfg.res_scale_init_values, num_stages)

        self.stem = Stem(cfg.in_chans, cfg.dims[0], cfg.downsample_norm, **dd, rngs=rngs)
        # timm's calculate_drop_path_rates(stagewise=True): linspace(0, rate, sum(depths)) split per stage.
        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages = []
        self.feature_info: list[dict[str, Any]] = []
        prev = cfg.dims[0]
        for i in range(num_stages):
            start = sum(cfg.depths[:i])
            stages.append(MetaFormerStage(prev, cfg.dims[i], cfg.depths[i], cfg, dpr[start:start + cfg.depths[i]],
                                          layer_scales[i], res_scales[i], **dd, rngs=rngs))
            prev = cfg.dims[i]
            self.feature_info.append(dict(num_chs=cfg.dims[i], reduction=2 ** (i + 2), module=f"stages.{i}"))
        self.stages = nnx.List(stages)
        self.stage_ends = list(range(num_stages))
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.global_pool, cfg.drop_rate, **dd,
                                   rngs=rngs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``set_grad_checkpointing``: run every block under ``nnx.remat`` (see ``layers.run_block``), trading
        about one extra forward per step for activation memory. Set before ``nnx.split``/``jit``: the flag is static."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images ``(B, H, W, in_chans)`` -> final feature map ``(B, H/32, W/32, C)`` (not normalised, like timm)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Feature map -> logits (or the pooled, normalised embeddings with ``pre_logits=True``)."""
        if self.head is None:  # pruned for feature extraction: the feature map itself
            return x
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: jax.Array, indices: int | list[int] | None = None, norm: bool = False,
                              intermediates_only: bool = False) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's ``forward_intermediates``: NHWC outputs of the selected stages.

        Args:
            x: images ``(B, H, W, in_chans)``.
            indices: ``None`` for every stage, an int ``n`` for the last ``n`` stages, or a list of stage indices.
            norm: accepted for API compatibility; timm's MetaFormer applies no norm to intermediates (its head norm
                acts on pooled features).
            intermediates_only: return only the list of feature maps.
        """
        del norm
        take = set(feature_take_indices(len(self.stages), indices)[0])
        taken = []
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in take:
                taken.append(x)
        if intermediates_only:
            return taken
        return x, taken

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the stages after the last selected one and the head (timm's ``prune_intermediate_layers``).

        ``prune_norm`` is accepted for API compatibility (the only norm outside the stages is the head's). Returns the
        absolute indices taken.
        """
        del prune_norm
        take_idx, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = nnx.List(list(self.stages)[:max_index + 1])
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = None
            self.num_classes = 0
            self.global_pool = ""
        return take_idx


def _cfg(crop_pct: float = 1.0) -> dict[str, Any]:
    """timm's metaformer ``_cfg`` (the sail_in1k weights live only on the HF hub, ``url`` is empty in timm)."""
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=crop_pct,
        interpolation="bicubic", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier="head.fc",
        first_conv="stem.conv", license="apache-2.0",
    )


_S12 = dict(depths=(2, 2, 6, 2), dims=(64, 128, 320, 512))
_S24 = dict(depths=(4, 4, 12, 4), dims=(64, 128, 320, 512))
_S36 = dict(depths=(6, 6, 18, 6), dims=(64, 128, 320, 512))
_M36 = dict(depths=(6, 6, 18, 6), dims=(96, 192, 384, 768))
_M48 = dict(depths=(8, 8, 24, 8), dims=(96, 192, 384, 768))
# timm poolformer_*: downsample_norm=None, GELU, mlp_bias=True, GroupNorm1 (eps 1e-5), layer scale 1e-5 (s12, s24)
# or 1e-6 (s36, m36, m48), no res scale, linear head.
_V1 = dict(downsample_norm=False, mlp_act="gelu", mlp_bias=True, norm_bias=True, norm_eps=1e-5,
           res_scale_init_values=None)
# timm poolformerv2_*: MetaFormer defaults (LayerNorm2dNoBias stem/downsample norm, StarReLU, bias-free MLP, res scale
# (None, None, 1.0, 1.0), no layer scale) with GroupNorm1NoBias (eps 1e-6) blocks and a linear head.
_V2 = dict(downsample_norm=True, mlp_act="star_relu", mlp_bias=False, norm_bias=False, norm_eps=1e-6,
           layer_scale_init_values=None, res_scale_init_values=(None, None, 1.0, 1.0))

# timm name -> architecture.
VARIANTS: dict[str, PoolFormerConfig] = {
    "poolformer_s12": PoolFormerConfig(**_S12, **_V1, layer_scale_init_values=1e-5),
    "poolformer_s24": PoolFormerConfig(**_S24, **_V1, layer_scale_init_values=1e-5),
    "poolformer_s36": PoolFormerConfig(**_S36, **_V1, layer_scale_init_values=1e-6),
    "poolformer_m36": PoolFormerConfig(**_M36, **_V1, layer_scale_init_values=1e-6),
    "poolformer_m48": PoolFormerConfig(**_M48, **_V1, layer_scale_init_values=1e-6),
    "poolformerv2_s12": PoolFormerConfig(**_S12, **_V2),
    "poolformerv2_s24": PoolFormerConfig(**_S24, **_V2),
    "poolformerv2_s36": PoolFormerConfig(**_S36, **_V2),
    "poolformerv2_m36": PoolFormerConfig(**_M36, **_V2),
    "poolformerv2_m48": PoolFormerConfig(**_M48, **_V2),
}

# "name.tag" -> timm's pretrained cfg. hf_hub_id is timm's "timm/<name.tag>".
PRETRAINED: dict[str, dict[str, Any]] = {
    "poolformer_s12.sail_in1k": _cfg(0.9),
    "poolformer_s24.sail_in1k": _cfg(0.9),
    "poolformer_s36.sail_in1k": _cfg(0.9),
    "poolformer_m36.sail_in1k": _cfg(0.95),
    "poolformer_m48.sail_in1k": _cfg(0.95),
    "poolformerv2_s12.sail_in1k": _cfg(),
    "poolformerv2_s24.sail_in1k": _cfg(),
    "poolformerv2_s36.sail_in1k": _cfg(),
    "poolformerv2_m36.sail_in1k": _cfg(),
    "poolformerv2_m48.sail_in1k": _cfg(),
}


# create_model overrides -> config (the registry calls each family's ``build``).
build = replace_config
