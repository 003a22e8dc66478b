"""VOLO: Vision Outlooker for Visual Recognition, in Flax NNX.

Paper: Yuan et al., "VOLO: Vision Outlooker for Visual Recognition", https://arxiv.org/abs/2106.13112
Original code: https://github.com/sail-sg/volo (Apache-2.0)
Mirrors: ``timm/models/volo.py`` (timm 1.0.x). Attribute names and nesting follow timm, so the NNX path of every
variable reads like timm's state-dict key (``network.0.1.attn.v.kernel`` <- ``network.0.1.attn.v.weight``).

Layout is NHWC throughout (timm's VOLO is NHWC internally too, after its NCHW stem). Parity traps reproduced here:
outlook attention uses ceil-mode average pooling and an overlapping-sum fold (``volo_jax/outlook.py``); the eval logits
are ``head(cls) + 0.5 * max_tokens(aux_head(tokens))``; position embeddings are added after the outlooker stage
(``network`` index 2); only the transformer stages receive drop path (timm passes no ``drop_path_rate`` to the
outlooker blocks).
"""

from __future__ import annotations

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
    Mlp,
    ReLU,
    batch_norm,
    dropout,
    layer_norm,
    run_block,
    torch_default_kernel_init,
    trunc_normal_02,
)
from volo_jax.ops import attend, conv_general_dilated, softmax
from volo_jax.outlook import OutlookAttention


@dataclass(frozen=True)
class VoloConfig:
    """Architecture of one VOLO variant (timm's ``VOLO.__init__`` arguments)."""

    layers: tuple[int, ...]
    embed_dims: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratio: float = 3.0
    stem_hidden_dim: int = 64
    img_size: int | tuple[int, int] = 224
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    patch_size: int = 8
    downsamples: tuple[bool, ...] = (True, False, False, False)
    outlook_attention: tuple[bool, ...] = (True, False, False, False)
    post_layers: tuple[str, ...] | None = ("ca", "ca")
    qkv_bias: bool = False
    use_aux_head: bool = True
    use_mix_token: bool = False
    pooling_scale: int = 2
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Outlooker(nnx.Module):
    """Outlook attention + MLP block (stage 1)."""

    def __init__(self, dim: int, kernel_size: int, padding: int, stride: int = 1, num_heads: int = 1,
                 mlp_ratio: float = 3.0, attn_drop: float = 0.0, drop_path: float = 0.0, qkv_bias: bool = False, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(dim, **dd, rngs=rngs)
        self.attn = OutlookAttention(dim, num_heads, kernel_size=kernel_size, padding=padding, stride=stride,
                                     qkv_bias=qkv_bias, attn_drop=attn_drop, **dd, rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, **dd, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Attention(nnx.Module):
    """Multi-head self-attention over the (H, W) token grid."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=trunc_normal_02, rngs=rngs)
        self.qkv = Linear(dim, dim * 3, use_bias=qkv_bias, **kw)
        self.attn_drop = dropout(attn_drop, rngs)
        self.proj = Linear(dim, dim, **kw)
        self.proj_drop = dropout(proj_drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        # (B, N, 3, heads, d) -> q, k, v each (B, heads, N, d)
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, C // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = jnp.einsum("bhqd,bhkd->bhqk", q * self.scale, k)  # (B, heads, N, N)
        attn = self.attn_drop(softmax(attn, axis=-1))
        x = attend(attn, v).reshape(B, H, W, C)
        return self.proj_drop(self.proj(x))


class Transformer(nnx.Module):
    """Self-attention + MLP block (stages 2-4)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 attn_drop: float = 0.0, drop_path: float = 0.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(dim, **dd, rngs=rngs)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, **dd, rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, **dd, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), **dd, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class ClassAttention(nnx.Module):
    """Attention of the class token (query) over all tokens (keys/values)."""

    def __init__(self, dim: int, num_heads: int = 8, head_dim: int | None = None, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else dim // num_heads
        self.scale = self.head_dim ** -0.5
        inner = self.head_dim * num_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=trunc_normal_02, rngs=rngs)
        self.kv = Linear(dim, inner * 2, use_bias=qkv_bias, **kw)
        self.q = Linear(dim, inner, use_bias=qkv_bias, **kw)
        self.attn_drop = dropout(attn_drop, rngs)
        self.proj = Linear(inner, dim, **kw)
        self.proj_drop = dropout(proj_drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, N, _ = x.shape
        kv = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim)  # (B, N, 2, heads, d)
        k, v = kv[:, :, 0], kv[:, :, 1]  # (B, N, heads, d)
        q = self.q(x[:, :1]).reshape(B, self.num_heads, self.head_dim) * self.scale  # (B, heads, d)
        attn = softmax(jnp.einsum("bhd,bnhd->bhn", q, k), axis=-1)  # (B, heads, N)
        attn = self.attn_drop(attn)
        cls_embed = jnp.einsum("bhn,bnhd->bhd", attn, v).reshape(B, 1, self.head_dim * self.num_heads)
        return self.proj_drop(self.proj(cls_embed))


class ClassBlock(nnx.Module):
    """Class-attention block: updates only the class token (the ``post_network`` of VOLO)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, mlp_ratio: float = 4.0,
                 qkv_bias: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, *,
                 dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(dim, **dd, rngs=rngs)
        self.attn = ClassAttention(dim, num_heads=num_heads, head_dim=head_dim, qkv_bias=qkv_bias,
                                   attn_drop=attn_drop, proj_drop=drop, **dd, rngs=rngs)
        self.drop_path1 = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, **dd, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop, **dd, rngs=rngs)
        self.drop_path2 = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cls_embed = x[:, :1]
        cls_embed = cls_embed + self.drop_path1(self.attn(self.norm1(x)))
        cls_embed = cls_embed + self.drop_path2(self.mlp(self.norm2(cls_embed)))
        return jnp.concatenate([cls_embed, x[:, 1:]], axis=1)


class PatchEmbed(nnx.Module):
    """Three-conv stem (7x7 s2, 3x3, 3x3 with BatchNorm + ReLU), then a patch_size/2 strided projection."""

    def __init__(self, stem_conv: bool = True, stem_stride: int = 2, patch_size: int = 8, in_chans: int = 3,
                 hidden_dim: int = 64, embed_dim: int = 384, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if patch_size not in (4, 8, 16):
            raise ValueError(f"VOLO patch_size must be 4, 8 or 16, got {patch_size}")
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        # Explicit padding everywhere: Flax convs default to SAME, torch to 0.
        # ops.conv_general_dilated: on CPU the kernel gradients as per-tap matmuls (XLA:CPU's are ~10x slower),
        # the stride == kernel proj as patches times one matmul
        conv = dict(use_bias=False, kernel_init=torch_default_kernel_init, conv_general_dilated=conv_general_dilated,
                    **dd, rngs=rngs)
        if stem_conv:
            self.conv = nnx.List([
                nnx.Conv(in_chans, hidden_dim, (7, 7), stem_stride, padding=((3, 3), (3, 3)), **conv),
                batch_norm(hidden_dim, **dd, rngs=rngs),
                ReLU(),
                nnx.Conv(hidden_dim, hidden_dim, (3, 3), 1, padding=((1, 1), (1, 1)), **conv),
                batch_norm(hidden_dim, **dd, rngs=rngs),
                ReLU(),
                nnx.Conv(hidden_dim, hidden_dim, (3, 3), 1, padding=((1, 1), (1, 1)), **conv),
                batch_norm(hidden_dim, **dd, rngs=rngs),
                ReLU(),
            ])
        else:
            self.conv = None
        k = patch_size // stem_stride
        self.proj = nnx.Conv(hidden_dim, embed_dim, (k, k), k, padding="VALID", kernel_init=torch_default_kernel_init,
                             conv_general_dilated=conv_general_dilated, **dd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv is not None:
            for layer in self.conv:
                x = layer(x)
        return self.proj(x)  # (B, H/patch, W/patch, embed_dim)


class Downsample(nnx.Module):
    """Strided conv between stages (NHWC in, NHWC out)."""

    def __init__(self, in_embed_dim: int, out_embed_dim: int, patch_size: int = 2, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.proj = nnx.Conv(in_embed_dim, out_embed_dim, (patch_size, patch_size), patch_size, padding="VALID",
                             kernel_init=torch_default_kernel_init, conv_general_dilated=conv_general_dilated,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def rand_bbox(key: jax.Array, grid_hw: tuple[int, int], lam: jax.Array) -> jax.Array:
    """MixToken box on the token grid, timm's ``rand_bbox`` (from TokenLabeling) written with jax.random.

    timm names the first spatial axis ``W`` and the second ``H``; we keep its convention: ``bbx`` indexes axis 1
    (rows) and ``bby`` axis 2 (columns) of an NHWC tensor.

    Args:
        key: PRNG key.
        grid_hw: (size of axis 1, size of axis 2) of the token grid the box lives on.
        lam: mixing ratio in [0, 1] (the kept fraction; the box covers about 1 - lam of the grid).

    Returns:
        int32 array ``(bbx1, bby1, bbx2, bby2)``.
    """
    W, H = grid_hw
    cut_rat = jnp.sqrt(1.0 - lam)
    cut_w = (W * cut_rat).astype(jnp.int32)
    cut_h = (H * cut_rat).astype(jnp.int32)
    kx, ky = jax.random.split(key)
    cx = jax.random.randint(kx, (), 0, W)
    cy = jax.random.randint(ky, (), 0, H)
    bbx1 = jnp.clip(cx - cut_w // 2, 0, W)
    bby1 = jnp.clip(cy - cut_h // 2, 0, H)
    bbx2 = jnp.clip(cx + (cut_w + 1) // 2, 0, W)
    bby2 = jnp.clip(cy + (cut_h + 1) // 2, 0, H)
    return jnp.stack([bbx1, bby1, bbx2, bby2]).astype(jnp.int32)


def _box_mask(bbox: jax.Array, shape_hw: tuple[int, int], scale: int = 1) -> jax.Array:
    """(H, W, 1) boolean mask of ``[scale*bbx1, scale*bbx2) x [scale*bby1, scale*bby2)``; jit-friendly slicing."""
    rows = jnp.arange(shape_hw[0])[:, None, None]
    cols = jnp.arange(shape_hw[1])[None, :, None]
    return ((rows >= scale * bbox[0]) & (rows < scale * bbox[2])
            & (cols >= scale * bbox[1]) & (cols < scale * bbox[3]))


class VOLO(nnx.Module):
    """Vision Outlooker. Input NHWC images ``(B, H, W, in_chans)``; ``model(x)`` returns logits like timm."""

    def __init__(self, cfg: VoloConfig, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        num_layers = len(cfg.layers)
        mlp_ratio = (cfg.mlp_ratio,) * num_layers
        img_size = _pair(cfg.img_size)
        if cfg.global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be '', 'avg' or 'token', got {cfg.global_pool!r}")
        if cfg.use_mix_token and cfg.global_pool != "token":
            raise ValueError("use_mix_token needs global_pool='token' (timm asserts the same)")
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.mix_token = cfg.use_mix_token
        self.pooling_scale = cfg.pooling_scale
        self.img_size = img_size
        self.num_features = self.head_hidden_size = cfg.embed_dims[-1]

        self.patch_embed = PatchEmbed(stem_conv=True, stem_stride=2, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      hidden_dim=cfg.stem_hidden_dim, embed_dim=cfg.embed_dims[0], **dd, rngs=rngs)
        r = cfg.patch_size
        patch_grid = (img_size[0] // cfg.patch_size // cfg.pooling_scale,
                      img_size[1] // cfg.patch_size // cfg.pooling_scale)
        # (1, gh, gw, C): NHWC like timm's, so the converter copies it as is.
        self.pos_embed = nnx.Param(trunc_normal_02(rngs.params(), (1, *patch_grid, cfg.embed_dims[-1]), param_dtype))
        self.pos_drop = dropout(cfg.pos_drop_rate, rngs)

        total = sum(cfg.layers)
        self.grad_checkpointing = False  # set_grad_checkpointing()
        self.stage_ends: list[int] = []
        self.feature_info: list[dict[str, Any]] = []
        network = []
        for i in range(num_layers):
            blocks = []
            for j in range(cfg.layers[i]):
                if cfg.outlook_attention[i]:
                    # timm's outlooker_blocks() is called without drop_path_rate, so stage 1 never drops paths.
                    blocks.append(Outlooker(cfg.embed_dims[i], kernel_size=3, padding=1, stride=2,
                                            num_heads=cfg.num_heads[i], mlp_ratio=mlp_ratio[i],
                                            attn_drop=cfg.attn_drop_rate, qkv_bias=cfg.qkv_bias, **dd, rngs=rngs))
                else:
                    dpr = cfg.drop_path_rate * (j + sum(cfg.layers[:i])) / (total - 1)
                    blocks.append(Transformer(cfg.embed_dims[i], cfg.num_heads[i], mlp_ratio=mlp_ratio[i],
                                              qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, drop_path=dpr,
                                              **dd, rngs=rngs))
            network.append(nnx.List(blocks))
            self.stage_ends.append(len(network) - 1)
            self.feature_info.append(dict(num_chs=cfg.embed_dims[i], reduction=r, module=f"network.{len(network) - 1}"))
            if cfg.downsamples[i]:
                network.append(Downsample(cfg.embed_dims[i], cfg.embed_dims[i + 1], 2, **dd, rngs=rngs))
                r *= 2
        self.network = nnx.List(network)

        if cfg.post_layers is not None:
            for kind in cfg.post_layers:
                if kind != "ca":
                    raise ValueError(f"unknown VOLO post layer {kind!r} (only 'ca' exists)")
            self.post_network = nnx.List([
                ClassBlock(cfg.embed_dims[-1], num_heads=cfg.num_heads[-1], mlp_ratio=mlp_ratio[-1],
                           qkv_bias=cfg.qkv_bias, attn_drop=cfg.attn_drop_rate, drop_path=0.0, **dd, rngs=rngs)
                for _ in cfg.post_layers
            ])
            self.cls_token = nnx.Param(trunc_normal_02(rngs.params(), (1, 1, cfg.embed_dims[-1]), param_dtype))
        else:
            self.post_network = None
            self.cls_token = None

        head_kw = dict(kernel_init=trunc_normal_02, **dd, rngs=rngs)
        self.use_aux_head = cfg.use_aux_head
        has_head = cfg.num_classes > 0
        self.aux_head = Linear(self.num_features, cfg.num_classes, **head_kw) \
            if cfg.use_aux_head and has_head else None
        self.norm = layer_norm(self.num_features, **dd, rngs=rngs)
        self.head_drop = dropout(cfg.drop_rate, rngs)
        self.head = Linear(self.num_features, cfg.num_classes, **head_kw) if has_head else None

    # ---------------------------------------------------------------- trunk
    def _run_network(self, x: jax.Array, take: set[int] | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Runs ``self.network`` on NHWC tokens; returns the output and the outputs of the blocks in ``take``."""
        taken = []
        for idx, stage in enumerate(self.network):
            if idx == 2 and self.pos_embed is not None:
                # Position embeddings are added after the outlooker stage and its downsample (timm: idx == 2).
                x = self.pos_drop(x + self.pos_embed[...])
            if isinstance(stage, nnx.List):
                for block in stage:
                    x = run_block(block, x, self.grad_checkpointing, grad_barrier=True, param_grads_first=True)
            else:
                x = stage(x)
            if take is not None and idx in take:
                taken.append(x)
        return x, taken

    def forward_tokens(self, x: jax.Array) -> jax.Array:
        """Stem output ``(B, H, W, C)`` -> tokens ``(B, N, C)`` after all stages."""
        x, _ = self._run_network(x)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)

    def forward_cls(self, x: jax.Array) -> jax.Array:
        """Prepends the class token and runs the class-attention blocks: ``(B, N, C)`` -> ``(B, N + 1, C)``."""
        B, _, C = x.shape
        cls_tokens = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (B, 1, C))
        x = jnp.concatenate([cls_tokens, x], axis=1)
        for block in self.post_network:
            x = run_block(block, x, self.grad_checkpointing, grad_barrier=True, param_grads_first=True)
        return x

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``set_grad_checkpointing``: run every block under ``nnx.remat`` (see ``layers.run_block``), trading
        about one extra forward per step for activation memory. Set before ``nnx.split``/``jit``: the flag is static."""
        self.grad_checkpointing = enable

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images ``(B, H, W, in_chans)`` -> normalised tokens ``(B, 1 + N, C)`` (class token first)."""
        x = self.patch_embed(x)
        x = self.forward_tokens(x)
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Tokens -> logits (or pooled embeddings with ``pre_logits=True``), timm's eval head combination."""
        if self.global_pool == "avg":
            out = x.mean(axis=1)
        elif self.global_pool == "token":
            out = x[:, 0]
        else:
            out = x
        out = self.head_drop(out)
        x = self.head_drop(x)
        if pre_logits or self.head is None:
            return out
        out = self.head(out)
        if self.aux_head is not None and self.global_pool:
            # Token-labeling head: the max over tokens of the per-token class scores, weighted 0.5 (timm).
            aux = self.aux_head(x[:, 1:])  # (B, N, num_classes)
            out = out + 0.5 * aux.max(axis=1)
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: jax.Array, indices: int | list[int] | None = None, norm: bool = False,
                              intermediates_only: bool = False) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's ``forward_intermediates``: NHWC outputs of the selected stages (``stage_ends``).

        Args:
            x: images ``(B, H, W, in_chans)``.
            indices: ``None`` for every stage, an int ``n`` for the last ``n`` stages, or a list of stage indices.
            norm: apply the final norm to intermediates from ``network`` index 2 on (as timm does).
            intermediates_only: return only the list of feature maps.
        """
        take_idx, _ = feature_take_indices(len(self.stage_ends), indices)
        take = {self.stage_ends[i] for i in take_idx}
        x, taken = self._run_network(self.patch_embed(x), take)
        if norm:
            blocks = sorted(take)
            taken = [self.norm(t) if idx >= 2 else t for idx, t in zip(blocks, taken, strict=True)]
        if intermediates_only:
            return taken
        B, H, W, C = x.shape
        x = x.reshape(B, H * W, C)
        if self.post_network is not None:
            x = self.forward_cls(x)
        return self.norm(x), taken

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops what the selected intermediates do not need (timm's ``prune_intermediate_layers``).

        Keeps ``network`` up to the last selected stage; without the transformer stages the position embedding and
        final norm go too; with the head go the class token, the class-attention blocks and the aux head (like timm).
        Returns the absolute indices taken.
        """
        take_idx, max_index = feature_take_indices(len(self.stage_ends), indices)
        num_chs = self.feature_info[max_index]["num_chs"]
        last = self.stage_ends[max_index]
        prune_end = last < len(self.network) - 1
        self.network = nnx.List(list(self.network)[:last + 1])
        if last < 2:
            # pos_embed is added, and the final norm (embed_dims[-1] wide) applies, only from network index 2 on.
            self.pos_embed = None
            prune_norm = True
        if prune_norm:
            self.norm = Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = num_chs
        if prune_head or prune_end:
            self.post_network = None
            self.cls_token = None
            self.use_aux_head = False
            self.aux_head = self.head = None
            self.num_classes = 0
            self.global_pool = ""
        return take_idx

    def forward_train(self, x: jax.Array, *, mix_token: bool | None = None, key: jax.Array | None = None,
                      bbox: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Dense training output for token labeling (timm ``VOLO.forward_train`` in training mode).

        MixToken (``mix_token``, default ``cfg.use_mix_token``): a box on the pooled token grid is filled with the
        tokens of the batch-flipped images right after the stem; the aux logits of the box are flipped back, so each
        token's prediction lines up with its own image's dense target.

        Args:
            x: images ``(B, H, W, in_chans)``.
            mix_token: apply MixToken.
            key: PRNG key for lam ~ Beta(1, 1) and the box (ignored when ``bbox`` is given).
            bbox: optional explicit box ``(bbx1, bby1, bbx2, bby2)`` on the pooled grid (tests, custom schedules).

        Returns:
            ``(cls_logits (B, classes), aux_logits (B, N, classes), bbox int32 (4,))``; bbox is zeros without MixToken.
        """
        if self.aux_head is None or self.head is None:
            raise ValueError("forward_train needs the class and aux heads (num_classes > 0, use_aux_head=True)")
        mix_token = self.mix_token if mix_token is None else mix_token
        x = self.patch_embed(x)  # (B, H, W, C)
        B, H, W, C = x.shape
        s = self.pooling_scale
        patch_h, patch_w = H // s, W // s
        if mix_token:
            if bbox is None:
                if key is None:
                    raise ValueError("forward_train(mix_token=True) needs a PRNG key or an explicit bbox")
                k_lam, k_box = jax.random.split(key)
                lam = jax.random.beta(k_lam, 1.0, 1.0)  # timm: Beta(self.beta=1.0, 1.0)
                bbox = rand_bbox(k_box, (H // s, W // s), lam)
            bbox = jnp.asarray(bbox, jnp.int32)
            x = jnp.where(_box_mask(bbox, (H, W), s), x[::-1], x)
        else:
            bbox = jnp.zeros((4,), jnp.int32)

        x = self.forward_tokens(x)
        if self.post_network is not None:
            x = self.forward_cls(x)
        x = self.norm(x)
        # The class head is applied here as in the original sail-sg/volo code; timm 1.0's forward_train returns the
        # pooled features without it (a timm quirk), so tests compare against timm's head applied to them.
        x_cls = self.head(x[:, 0] if self.global_pool == "token" else x.mean(axis=1))
        x_aux = self.aux_head(x[:, 1:])  # (B, N, classes)
        if mix_token:
            x_aux = x_aux.reshape(B, patch_h, patch_w, -1)
            x_aux = jnp.where(_box_mask(bbox, (patch_h, patch_w)), x_aux[::-1], x_aux)
            x_aux = x_aux.reshape(B, patch_h * patch_w, -1)
        return x_cls, x_aux, bbox


def _cfg(tag_url: str, input_size: int = 224, crop_pct: float = 0.96) -> dict[str, Any]:
    """timm's ``_cfg`` for VOLO's sail_in1k weights."""
    return dict(
        url=f"https://github.com/sail-sg/volo/releases/download/volo_1/{tag_url}",
        num_classes=1000, input_size=(3, input_size, input_size), pool_size=None, crop_pct=crop_pct,
        interpolation="bicubic", fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        first_conv="patch_embed.conv.0", classifier=("head", "aux_head"), license="apache-2.0",
    )


_D1 = dict(layers=(4, 4, 8, 2), embed_dims=(192, 384, 384, 384), num_heads=(6, 12, 12, 12))
_D2 = dict(layers=(6, 4, 10, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D3 = dict(layers=(8, 8, 16, 4), embed_dims=(256, 512, 512, 512), num_heads=(8, 16, 16, 16))
_D4 = dict(layers=(8, 8, 16, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16))
# D5: mlp_ratio 4 and a 128-wide stem (timm's docstring: "the dim in patch embedding is 128 for VOLO-D5").
_D5 = dict(layers=(12, 12, 20, 4), embed_dims=(384, 768, 768, 768), num_heads=(12, 16, 16, 16), mlp_ratio=4.0,
           stem_hidden_dim=128)

# timm name -> architecture. img_size is the variant's default (timm's default_cfg input_size).
VARIANTS: dict[str, VoloConfig] = {
    "volo_d1_224": VoloConfig(**_D1, img_size=224),
    "volo_d1_384": VoloConfig(**_D1, img_size=384),
    "volo_d2_224": VoloConfig(**_D2, img_size=224),
    "volo_d2_384": VoloConfig(**_D2, img_size=384),
    "volo_d3_224": VoloConfig(**_D3, img_size=224),
    "volo_d3_448": VoloConfig(**_D3, img_size=448),
    "volo_d4_224": VoloConfig(**_D4, img_size=224),
    "volo_d4_448": VoloConfig(**_D4, img_size=448),
    "volo_d5_224": VoloConfig(**_D5, img_size=224),
    "volo_d5_448": VoloConfig(**_D5, img_size=448),
    "volo_d5_512": VoloConfig(**_D5, img_size=512),
}

# "name.tag" -> timm's pretrained cfg (data config, original release url). hf_hub_id is timm's "timm/<name.tag>".
PRETRAINED: dict[str, dict[str, Any]] = {
    "volo_d1_224.sail_in1k": _cfg("d1_224_84.2.pth.tar", 224, 0.96),
    "volo_d1_384.sail_in1k": _cfg("d1_384_85.2.pth.tar", 384, 1.0),
    "volo_d2_224.sail_in1k": _cfg("d2_224_85.2.pth.tar", 224, 0.96),
    "volo_d2_384.sail_in1k": _cfg("d2_384_86.0.pth.tar", 384, 1.0),
    "volo_d3_224.sail_in1k": _cfg("d3_224_85.4.pth.tar", 224, 0.96),
    "volo_d3_448.sail_in1k": _cfg("d3_448_86.3.pth.tar", 448, 1.0),
    "volo_d4_224.sail_in1k": _cfg("d4_224_85.7.pth.tar", 224, 0.96),
    "volo_d4_448.sail_in1k": _cfg("d4_448_86.79.pth.tar", 448, 1.15),
    "volo_d5_224.sail_in1k": _cfg("d5_224_86.10.pth.tar", 224, 0.96),
    "volo_d5_448.sail_in1k": _cfg("d5_448_87.0.pth.tar", 448, 1.15),
    "volo_d5_512.sail_in1k": _cfg("d5_512_87.07.pth.tar", 512, 1.15),
}


# features_only=True without out_indices: the last 3 feature maps, as timm's _create_volo.
DEFAULT_OUT_INDICES = 3

# create_model overrides -> config (the registry calls each family's ``build``).
build = replace_config

