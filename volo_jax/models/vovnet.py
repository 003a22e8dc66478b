"""VoVNet (V1) and ESE-/ECA-VoVNet (V2), in Flax NNX.

Papers: Lee et al., "An Energy and GPU-Computation Efficient Backbone Network for Real-Time Object Detection",
https://arxiv.org/abs/1904.09730 (V1, one-shot aggregation); Lee & Park, "CenterMask: Real-Time Anchor-Free Instance
Segmentation", https://arxiv.org/abs/1911.06667 (V2: residual OSA blocks and effective squeeze-excitation).
Original code: https://github.com/youngwanLEE/vovnet-detectron2, https://github.com/stigma0617/VoVNet.pytorch
Mirrors: ``timm/models/vovnet.py`` (timm 1.0.x), the ``VovNet`` class. Attribute names and nesting follow timm, so the
NNX path of every variable reads like timm's state-dict key (``stages.1.blocks.0.conv_mid.2.conv_dw.kernel`` <-
``stages.1.blocks.0.conv_mid.2.conv_dw.weight``, ``stem.0.bn.var`` <- ``stem.0.bn.running_var``).

Layout is NHWC throughout (timm's VoVNet is NCHW). Parity traps reproduced here: convs pad symmetrically with timm's
``get_padding`` (``((stride - 1) + (k - 1)) // 2``), never Flax's SAME default; every stage but the first starts with
``nn.MaxPool2d(3, 2, ceil_mode=True)`` (torch's ceil-mode window rule, :func:`volo_jax.ops.max_pool2d`); the OSA
block concatenates the block INPUT (before ``conv_reduction``) with every ``conv_mid`` output; the effective SE gate is
timm's ``hard_sigmoid`` (``relu6(x + 3) / 6``) of a 1x1 conv (with bias) of the global mean; ECA is a bias-free
``Conv1d(1, 1, k)`` over the channel axis of the global mean, ``k`` from the channel count, gated by a sigmoid;
BatchNorm follows torch in training too (:class:`volo_jax.layers.BatchNorm`: unbiased running variance).

Registered: every timm vovnet variant except ``ese_vovnet39b_evos``, which swaps BatchNorm+ReLU for EvoNorm-S0
(an experimental norm-activation layer timm ships no weights for).
"""

from __future__ import annotations

import math
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
    Identity,
    Linear,
    batch_norm,
    dropout,
    run_block,
    torch_default_kernel_init,
)
from volo_jax.ops import conv_general_dilated, max_pool2d


@dataclass(frozen=True)
class VovNetConfig:
    """Architecture of one VoVNet variant (timm's ``model_cfgs`` entry plus ``VovNet.__init__`` arguments)."""

    stem_chs: tuple[int, int, int]
    stage_conv_chs: tuple[int, int, int, int]
    stage_out_chs: tuple[int, int, int, int]
    layer_per_block: int
    block_per_stage: tuple[int, int, int, int]
    residual: bool
    depthwise: bool
    attn: str  # "" (none), "ese" (EffectiveSEModule) or "eca" (EcaModule), on the last block of each stage
    # Informational only: VoVNet is fully convolutional; kept so ``create_model(img_size=...)`` sets the data config's
    # input size as it does for the other families.
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "avg"
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0


# timm's VovNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu') for every conv (Flax's fan_out of an HWIO
# kernel is O * kh * kw, torch's of OIHW the same); Linear weights keep torch's default, Linear biases are zeroed.
_conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def _torch_bias_init(fan_in: int) -> nnx.Initializer:
    """torch's default conv bias init, U(+-1/sqrt(fan_in)) (timm's VovNet init leaves conv biases alone)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _padding(kernel_size: int, stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """timm's symmetric ``get_padding``: ``((stride - 1) + (kernel_size - 1)) // 2`` on every side."""
    p = ((stride - 1) + (kernel_size - 1)) // 2
    return ((p, p), (p, p))


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """timm's ``hard_sigmoid``: ``relu6(x + 3) / 6`` (what ``create_act_layer('hard_sigmoid')`` computes)."""
    return jax.nn.relu6(x + 3.0) / 6.0


class ConvNormAct(nnx.Module):
    """timm ``ConvNormAct``: bias-free conv -> ``bn`` (timm's ``BatchNormAct2d``: BatchNorm then ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        # ops.conv_general_dilated: a 1x1 conv (the OSA concat conv) as a matmul, faster on XLA:CPU
        self.conv = nnx.Conv(in_chs, out_chs, (kernel_size, kernel_size), stride,
                             padding=_padding(kernel_size, stride), use_bias=False, kernel_init=_conv_init, **dd,
                             conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.bn = batch_norm(out_chs, **dd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))  # (B, H/stride, W/stride, out_chs)


class SeparableConvNormAct(nnx.Module):
    """timm ``SeparableConvNormAct``: depthwise kxk ``conv_dw`` -> 1x1 ``conv_pw`` -> ``bn`` -> ReLU; no conv biases."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        # timm's create_conv2d(depthwise=True) is groups=in_chs with bias=False (its kwargs default).
        # ops.conv_general_dilated runs it as shifted multiply-adds on CPU (XLA:CPU's grouped convolution is slow)
        self.conv_dw = nnx.Conv(in_chs, in_chs, (kernel_size, kernel_size), stride,
                                padding=_padding(kernel_size, stride), feature_group_count=in_chs, use_bias=False,
                                kernel_init=_conv_init, **dd, conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.conv_pw = nnx.Conv(in_chs, out_chs, (1, 1), padding="VALID", use_bias=False, kernel_init=_conv_init,
                                **dd, conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.bn = batch_norm(out_chs, **dd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv_pw(self.conv_dw(x))))


class EffectiveSEModule(nnx.Module):
    """timm ``EffectiveSEModule``: ``x * hard_sigmoid(fc(mean_hw(x)))``, ``fc`` a 1x1 conv with bias."""

    def __init__(self, channels: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.fc = nnx.Conv(channels, channels, (1, 1), padding="VALID", kernel_init=_conv_init,
                           bias_init=_torch_bias_init(channels), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x_se = self.fc(x.mean(axis=(1, 2), keepdims=True))  # (B, 1, 1, C)
        return x * hard_sigmoid(x_se)


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """timm ``EcaModule``'s adaptive kernel size: ``t = int(|log2(C) + beta| / gamma)``, made odd, at least 3."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


class EcaModule(nnx.Module):
    """timm ``EcaModule`` (default, non-MLP form): ``x * sigmoid(conv1d(mean_hw(x)))`` over the channel axis.

    ``conv`` is a 1-D ``nnx.Conv`` with one in/out feature whose spatial axis is the channel axis; its kernel ``(k, 1,
    1)`` is torch's ``Conv1d(1, 1, k, bias=False)`` weight ``(1, 1, k)`` transposed like any conv by the converter.
    """

    def __init__(self, channels: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        k = eca_kernel_size(channels)
        self.conv = nnx.Conv(1, 1, (k,), padding=(((k - 1) // 2, (k - 1) // 2),), use_bias=False,
                             kernel_init=_conv_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x.mean(axis=(1, 2))[:, :, None]  # (B, C, 1): channels as the conv's length axis, one feature
        y = jax.nn.sigmoid(self.conv(y))[:, :, 0]  # (B, C)
        return x * y[:, None, None, :]


class OsaBlock(nnx.Module):
    """One-shot aggregation: ``conv_mid`` chain, concat of [block input, every mid output], 1x1 ``conv_concat``,
    optional attention, drop path, optional residual (timm ``OsaBlock``)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, layer_per_block: int, residual: bool = False,
                 depthwise: bool = False, attn: str = "", drop_path: float = 0.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.residual = residual
        next_in_chs = in_chs
        if depthwise and next_in_chs != mid_chs:
            assert not residual, "timm: a depthwise OSA block that changes width has no residual"
            self.conv_reduction = ConvNormAct(next_in_chs, mid_chs, 1, **dd, rngs=rngs)
        else:
            self.conv_reduction = None
        mid = []
        for _ in range(layer_per_block):
            if depthwise:
                mid.append(SeparableConvNormAct(mid_chs, mid_chs, **dd, rngs=rngs))
            else:
                mid.append(ConvNormAct(next_in_chs, mid_chs, 3, **dd, rngs=rngs))
            next_in_chs = mid_chs
        self.conv_mid = nnx.List(mid)  # timm: SequentialAppendList
        self.conv_concat = ConvNormAct(in_chs + layer_per_block * mid_chs, out_chs, **dd, rngs=rngs)
        if attn == "ese":
            self.attn: nnx.Module | None = EffectiveSEModule(out_chs, **dd, rngs=rngs)
        elif attn == "eca":
            self.attn = EcaModule(out_chs, **dd, rngs=rngs)
        elif attn == "":
            self.attn = None
        else:
            raise ValueError(f"unknown VoVNet attn {attn!r} (use '', 'ese' or 'eca')")
        # timm holds None when the rate is 0; DropPath(0) is the identity and has no state, so the keys are the same.
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        output = [x]  # the block input, BEFORE conv_reduction, is the first concatenated map
        if self.conv_reduction is not None:
            x = self.conv_reduction(x)
        for conv in self.conv_mid:
            x = conv(x)
            output.append(x)
        x = jnp.concatenate(output, axis=-1)  # (B, H, W, in_chs + layer_per_block * mid_chs)
        x = self.conv_concat(x)
        if self.attn is not None:
            x = self.attn(x)
        x = self.drop_path(x)
        if self.residual:
            x = x + output[0]
        return x


class MaxPool2d(nnx.Module):
    """Parameter-free torch ``nn.MaxPool2d(kernel_size, stride, ceil_mode=...)`` on NHWC."""

    def __init__(self, kernel_size: int, stride: int, ceil_mode: bool = False):
        self.kernel_size = kernel_size
        self.stride = stride
        self.ceil_mode = ceil_mode

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool2d(x, self.kernel_size, self.stride, 0, ceil_mode=self.ceil_mode)


class OsaStage(nnx.Module):
    """Optional ceil-mode 3x3/2 max pool, then ``block_per_stage`` OSA blocks; attention only on the last block and
    the residual on every block but the first (timm ``OsaStage``)."""

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, block_per_stage: int, layer_per_block: int,
                 downsample: bool, residual: bool, depthwise: bool, attn: str, drop_path_rates: list[float], *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.pool = MaxPool2d(3, 2, ceil_mode=True) if downsample else None
        blocks = []
        for i in range(block_per_stage):
            last = i == block_per_stage - 1
            blocks.append(OsaBlock(in_chs, mid_chs, out_chs, layer_per_block, residual=residual and i > 0,
                                   depthwise=depthwise, attn=attn if last else "", drop_path=drop_path_rates[i],
                                   dtype=dtype, param_dtype=param_dtype, rngs=rngs))
            in_chs = out_chs
        self.grad_checkpointing = False  # VovNet.set_grad_checkpointing()
        self.blocks = nnx.List(blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool is not None:
            x = self.pool(x)  # (B, ceil((H - 3) / 2) + 1, ..., C)
        for block in self.blocks:
            x = run_block(block, x, self.grad_checkpointing)
        return x


class ClassifierHead(nnx.Module):
    """timm ``ClassifierHead``: global pool -> dropout -> ``fc`` (pre-logits are taken after the dropout)."""

    def __init__(self, dim: int, num_classes: int, global_pool: str, drop_rate: float, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.global_pool = global_pool
        self.drop = dropout(drop_rate, rngs)
        self.fc = Linear(dim, num_classes, kernel_init=torch_default_kernel_init, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs) if num_classes > 0 else None

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        if self.global_pool == "avg":
            x = x.mean(axis=(1, 2))  # (B, C)
        elif self.global_pool == "max":
            x = x.max(axis=(1, 2))
        x = self.drop(x)
        return x if pre_logits or self.fc is None else self.fc(x)


class VovNet(nnx.Module):
    """VoVNet V1/V2. Input NHWC images ``(B, H, W, in_chans)``; ``model(x)`` returns logits like timm."""

    def __init__(self, cfg: VovNetConfig, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        if cfg.global_pool not in ("", "avg", "max"):
            raise ValueError(f"global_pool must be '', 'avg' or 'max', got {cfg.global_pool!r}")
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.drop_rate = cfg.drop_rate
        stem_chs = cfg.stem_chs
        # timm's stem_stride 4: 3x3/2 conv, conv, 3x3/2 conv (separable for the depthwise variants).
        conv_type = SeparableConvNormAct if cfg.depthwise else ConvNormAct
        self.stem = nnx.List([
            ConvNormAct(cfg.in_chans, stem_chs[0], 3, stride=2, **dd, rngs=rngs),
            conv_type(stem_chs[0], stem_chs[1], 3, stride=1, **dd, rngs=rngs),
            conv_type(stem_chs[1], stem_chs[2], 3, stride=2, **dd, rngs=rngs),
        ])
        self.feature_info: list[dict[str, Any]] = [dict(num_chs=stem_chs[1], reduction=2, module="stem.1")]
        # timm's calculate_drop_path_rates(rate, block_per_stage, stagewise=True): linspace(0, rate, sum(depths))
        # split per stage, i.e. one rate per block.
        total = sum(cfg.block_per_stage)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        in_ch_list = (stem_chs[-1], *cfg.stage_out_chs[:-1])
        stages = []
        stride = 4
        for i in range(4):
            downsample = i > 0  # the stride-4 stem replaces stage 0's pool
            start = sum(cfg.block_per_stage[:i])
            stages.append(OsaStage(in_ch_list[i], cfg.stage_conv_chs[i], cfg.stage_out_chs[i], cfg.block_per_stage[i],
                                   cfg.layer_per_block, downsample, cfg.residual, cfg.depthwise, cfg.attn,
                                   dpr[start:start + cfg.block_per_stage[i]], **dd, rngs=rngs))
            stride *= 2 if downsample else 1
            self.feature_info.append(dict(num_chs=cfg.stage_out_chs[i], reduction=stride, module=f"stages.{i}"))
        self.stages = nnx.List(stages)
        self.num_features = self.head_hidden_size = cfg.stage_out_chs[-1]
        # feature index -> stage: index 0 is the stem (after stem.1), 1..4 the stages.
        self.stage_ends = list(range(5))
        self.head = ClassifierHead(self.num_features, cfg.num_classes, cfg.global_pool, cfg.drop_rate, **dd,
                                   rngs=rngs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``set_grad_checkpointing``: run every block under ``nnx.remat`` (see ``layers.run_block``), trading
        about one extra forward per step for activation memory. Set before ``nnx.split``/``jit``: the flag is static."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images ``(B, H, W, in_chans)`` -> final feature map ``(B, H/32, W/32, C)``."""
        for conv in self.stem:
            x = conv(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Feature map -> logits (or the pooled embeddings with ``pre_logits=True``)."""
        if self.head is None:  # pruned for feature extraction: the feature map itself
            return x
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: jax.Array, indices: int | list[int] | None = None, norm: bool = False,
                              intermediates_only: bool = False) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's ``forward_intermediates``: NHWC maps of the selected ones of FIVE features.

        Args:
            x: images ``(B, H, W, in_chans)``.
            indices: ``None`` for all five, an int ``n`` for the last ``n``, or a list of indices: 0 is the stem
                output before its last conv (``stem.1``, stride 2), 1..4 the stage outputs (stride 4..32).
            norm: accepted for API compatibility; VoVNet has no final norm.
            intermediates_only: return only the list of feature maps.
        """
        del norm
        take = set(feature_take_indices(len(self.feature_info), indices)[0])
        taken = []
        for conv in list(self.stem)[:-1]:
            x = conv(x)
        if 0 in take:
            taken.append(x)  # (B, H/2, W/2, stem_chs[1])
        x = self.stem[-1](x)
        for i, stage in enumerate(self.stages, start=1):
            x = stage(x)
            if i in take:
                taken.append(x)
        if intermediates_only:
            return taken
        return x, taken

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the stages after the last selected feature and the head (timm's ``prune_intermediate_layers``).

        Feature 0 is taken before the last stem conv, so selecting only it replaces ``stem.2`` by an identity, like
        timm. ``prune_norm`` is accepted for API compatibility (VoVNet has no final norm). Returns the indices taken.
        """
        del prune_norm
        take_idx, max_index = feature_take_indices(len(self.feature_info), indices)
        prune_end = max_index < len(self.stages)
        self.stages = nnx.List(list(self.stages)[:max_index])  # stem is feature 0, stage i is feature i + 1
        if max_index == 0:
            self.stem[-1] = Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.head = None
            self.num_classes = 0
            self.global_pool = ""
        return take_idx


def _cfg(**kwargs: Any) -> dict[str, Any]:
    """timm's vovnet ``_cfg``."""
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="stem.0.conv", classifier="head.fc",
        license="apache-2.0",
    ) | kwargs


_V39 = dict(stem_chs=(64, 64, 128), stage_conv_chs=(128, 160, 192, 224), stage_out_chs=(256, 512, 768, 1024),
            layer_per_block=5)
_V19_SLIM = dict(stage_conv_chs=(64, 80, 96, 112), stage_out_chs=(112, 256, 384, 512), layer_per_block=3,
                 block_per_stage=(1, 1, 1, 1))
_V19 = dict(stage_conv_chs=(128, 160, 192, 224), stage_out_chs=(256, 512, 768, 1024), layer_per_block=3,
            block_per_stage=(1, 1, 1, 1))
_V2 = dict(residual=True, attn="ese")

# timm name -> architecture (timm's model_cfgs).
VARIANTS: dict[str, VovNetConfig] = {
    "vovnet39a": VovNetConfig(**_V39, block_per_stage=(1, 1, 2, 2), residual=False, depthwise=False, attn=""),
    "vovnet57a": VovNetConfig(**_V39, block_per_stage=(1, 1, 4, 3), residual=False, depthwise=False, attn=""),
    "ese_vovnet19b_slim_dw": VovNetConfig(stem_chs=(64, 64, 64), **_V19_SLIM, depthwise=True, **_V2),
    "ese_vovnet19b_dw": VovNetConfig(stem_chs=(64, 64, 64), **_V19, depthwise=True, **_V2),
    "ese_vovnet19b_slim": VovNetConfig(stem_chs=(64, 64, 128), **_V19_SLIM, depthwise=False, **_V2),
    "ese_vovnet39b": VovNetConfig(**_V39, block_per_stage=(1, 1, 2, 2), depthwise=False, **_V2),
    "ese_vovnet57b": VovNetConfig(**_V39, block_per_stage=(1, 1, 4, 3), depthwise=False, **_V2),
    "ese_vovnet99b": VovNetConfig(**_V39, block_per_stage=(1, 3, 9, 3), depthwise=False, **_V2),
    "eca_vovnet39b": VovNetConfig(**_V39, block_per_stage=(1, 1, 2, 2), depthwise=False, residual=True, attn="eca"),
}

# "name.tag" -> timm's pretrained cfg, for the tags with released weights (hf_hub_id is timm's "timm/<name.tag>").
PRETRAINED: dict[str, dict[str, Any]] = {
    "ese_vovnet19b_dw.ra_in1k": _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    "ese_vovnet39b.ra_in1k": _cfg(test_input_size=(3, 288, 288), test_crop_pct=0.95),
    "ese_vovnet57b.ra4_e3600_r256_in1k": _cfg(
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=0.95, input_size=(3, 256, 256), pool_size=(8, 8),
        test_input_size=(3, 320, 320), test_crop_pct=1.0),
}

# timm's ``.untrained`` cfgs of the variants without weights (timm registers them, but ``list_models(pretrained=True)``
# leaves them out, so they are kept apart from PRETRAINED): the data config those variants default to.
UNTRAINED: dict[str, dict[str, Any]] = {
    f"{name}.untrained": _cfg() for name in VARIANTS if not any(k.split(".")[0] == name for k in PRETRAINED)
}


# create_model overrides -> config (the registry calls each family's ``build``).
build = replace_config
