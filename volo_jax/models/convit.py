"""ConViT: Vision Transformers with Soft Convolutional Inductive Biases, in Flax NNX.

Paper: d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases",
https://arxiv.org/abs/2103.10697
Original code: https://github.com/facebookresearch/convit
Mirrors: ``timm/models/convit.py`` (timm 1.0.x). Attribute names and nesting follow timm, so the NNX path of every
variable reads like timm's state-dict key (``blocks.0.attn.qk.kernel`` <- ``blocks.0.attn.qk.weight``,
``blocks.0.attn.gating_param`` <- ``blocks.0.attn.gating_param``).

Images are NHWC; after the patch embedding the model works on tokens ``(B, N, C)`` like timm. Parity traps reproduced
here: the first ``local_up_to_layer`` blocks are gated positional self-attention (GPSA) with a fused ``qk`` linear, and
their relative positions are computed at run time from the token grid (timm's ``get_rel_indices``, a non-persistent
buffer that is in no checkpoint); the class token is concatenated only after those blocks; LayerNorm eps is 1e-6
(timm's ``LayerNorm``); timm's ``embed_dim`` argument is per head (``embed_dim *= num_heads``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from volo_jax._config import replace_config
from volo_jax.features import feature_take_indices
from volo_jax.layers import (
    DropPath,
    Dtype,
    Identity,
    Linear,
    Mlp,
    dropout,
    layer_norm,
    run_block,
    torch_default_kernel_init,
    trunc_normal_02,
)
from volo_jax.ops import attend, broadcast_batch, conv_general_dilated, softmax

_LN_EPS = 1e-6  # timm.layers.LayerNorm, ConViT's norm_layer


@dataclass(frozen=True)
class ConVitConfig:
    """Architecture of one ConViT variant (timm's ``ConVit.__init__`` arguments).

    ``embed_dim`` is per head as in timm: the model width is ``embed_dim * num_heads``.
    """

    embed_dim: int = 48
    num_heads: int = 12
    depth: int = 12
    local_up_to_layer: int = 3
    locality_strength: float = 1.0
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    use_pos_embed: bool = True
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def get_rel_indices(num_patches: int) -> np.ndarray:
    """timm's ``GPSA.get_rel_indices``: ``(1, N, N, 3)`` float32 of (dx, dy, dx^2 + dy^2) between patches.

    A pure function of the (square) token count, computed at trace time from the static shape, never loaded.
    """
    side = int(num_patches ** 0.5)  # timm: int(num_patches ** .5), assumes a square grid
    ar = np.arange(side, dtype=np.float32)
    ind = ar[None, :] - ar[:, None]  # (side, side), ind[i, j] = j - i
    indx = np.tile(ind, (side, side))  # torch .repeat(side, side)
    indy = np.repeat(np.repeat(ind, side, axis=0), side, axis=1)  # torch .repeat_interleave on both dims
    indd = indx ** 2 + indy ** 2
    rel = np.stack([indx, indy, indd], axis=-1)[None]  # (1, N, N, 3)
    if rel.shape[1] != num_patches:
        raise ValueError(f"GPSA needs a square token grid, got {num_patches} tokens")
    return rel.astype(np.float32)


class GPSA(nnx.Module):
    """Gated positional self-attention: a sigmoid gate per head mixes content (q.k) and positional attention."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, locality_strength: float = 1.0, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.dim = dim
        self.scale = (dim // num_heads) ** -0.5
        self.locality_strength = locality_strength
        kw = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=trunc_normal_02, rngs=rngs)
        self.qk = Linear(dim, dim * 2, use_bias=qkv_bias, **kw)
        self.v = Linear(dim, dim, use_bias=qkv_bias, **kw)
        self.attn_drop = dropout(attn_drop, rngs)
        self.proj = Linear(dim, dim, **kw)
        self.pos_proj = Linear(3, num_heads, **kw)
        self.proj_drop = dropout(proj_drop, rngs)
        self.gating_param = nnx.Param(jnp.ones((num_heads,), param_dtype))  # timm: torch.ones(num_heads)
        self._local_init()

    def _local_init(self) -> None:
        """timm's ``GPSA.local_init``: v = identity, each head's positional attention peaked at one kernel offset."""
        self.v.kernel[...] = jnp.eye(self.dim, dtype=self.v.kernel.dtype)
        kernel_size = int(self.num_heads ** 0.5)
        center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2
        # Rows of timm's (heads, 3) weight that local_init overwrites; the others keep their random init. Built as
        # constants and merged with jnp.where so that this also works under nnx.eval_shape.
        mask = np.zeros((self.num_heads, 3), bool)
        values = np.zeros((self.num_heads, 3), np.float32)
        for h1 in range(kernel_size):
            for h2 in range(kernel_size):
                position = h1 + kernel_size * h2
                mask[position] = True
                values[position] = (2 * (h2 - center), 2 * (h1 - center), -1)
        kernel = self.pos_proj.kernel[...]  # Flax layout (3, heads)
        kernel = jnp.where(mask.T, jnp.asarray(values.T, kernel.dtype), kernel) * self.locality_strength
        self.pos_proj.kernel[...] = kernel.astype(self.pos_proj.kernel.dtype)

    def get_attention(self, x: jax.Array) -> jax.Array:
        """Gated, renormalised attention ``(B, heads, N, N)`` of tokens ``(B, N, C)``."""
        B, N, C = x.shape
        # (B, N, 2, heads, d) -> q, k each (B, heads, N, d)
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        rel = jnp.asarray(get_rel_indices(N))  # (1, N, N, 3), from the static shape like timm's lazy buffer
        pos_score = self.pos_proj(rel).transpose(0, 3, 1, 2)  # (1, heads, N, N)
        patch_score = jnp.einsum("bhqd,bhkd->bhqk", q, k) * self.scale  # timm scales after the matmul
        patch_score = softmax(patch_score, axis=-1)
        # shared by the batch: broadcast explicitly so that its gradient's batch-sum is fast on XLA:CPU (see there)
        pos_score = broadcast_batch(softmax(pos_score, axis=-1), B)  # (B, heads, N, N)
        gate = jax.nn.sigmoid(self.gating_param[...].astype(patch_score.dtype)).reshape(1, -1, 1, 1)
        attn = (1.0 - gate) * patch_score + gate * pos_score
        attn = attn / attn.sum(axis=-1, keepdims=True)
        return self.attn_drop(attn)

    def __call__(self, x: jax.Array) -> jax.Array:
        B, N, C = x.shape
        attn = self.get_attention(x)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads)  # (B, N, heads, d)
        x = attend(attn, v, v_heads_last=True).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class MHSA(nnx.Module):
    """Plain multi-head self-attention on tokens ``(B, N, C)`` (the blocks after the GPSA ones)."""

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
        B, N, C = x.shape
        # (B, N, 3, heads, d) -> q, k, v each (B, heads, N, d)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = jnp.einsum("bhqd,bhkd->bhqk", q, k) * self.scale  # (B, heads, N, N)
        attn = self.attn_drop(softmax(attn, axis=-1))
        x = attend(attn, v).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nnx.Module):
    """Pre-norm transformer block with GPSA or MHSA attention; one ``drop_path`` shared by both residuals (timm)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, use_gpsa: bool = True,
                 locality_strength: float = 1.0, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layer_norm(dim, eps=_LN_EPS, **dd, rngs=rngs)
        self.use_gpsa = use_gpsa
        if use_gpsa:
            self.attn = GPSA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                             locality_strength=locality_strength, **dd, rngs=rngs)
        else:
            self.attn = MHSA(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                             **dd, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)
        self.norm2 = layer_norm(dim, eps=_LN_EPS, **dd, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop, **dd, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nnx.Module):
    """timm ``layers.PatchEmbed``: non-overlapping patch conv, flattened to tokens. NHWC in, ``(B, N, C)`` out."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, *, dtype: Dtype = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.patch_size = patch_size
        # padding="VALID" is torch's padding=0 (Flax defaults to SAME). ops.conv_general_dilated: on CPU the
        # patches times one matmul (XLA:CPU's convolution and its kernel gradient are slower at this shape).
        self.proj = nnx.Conv(in_chans, embed_dim, (patch_size, patch_size), patch_size, padding="VALID",
                             kernel_init=torch_default_kernel_init, conv_general_dilated=conv_general_dilated,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # (B, H/p, W/p, C)
        B, H, W, C = x.shape
        return x.reshape(B, H * W, C)  # row-major like timm's flatten(2).transpose(1, 2)


class ConVit(nnx.Module):
    """ConViT. Input NHWC images ``(B, H, W, in_chans)``; ``model(x)`` returns logits like timm."""

    def __init__(self, cfg: ConVitConfig, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if cfg.global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be '', 'avg' or 'token', got {cfg.global_pool!r}")
        self.cfg = cfg
        dd = dict(dtype=dtype, param_dtype=param_dtype)
        embed_dim = cfg.embed_dim * cfg.num_heads  # timm: embed_dim *= num_heads
        img_size = _pair(cfg.img_size)
        grid = (img_size[0] // cfg.patch_size, img_size[1] // cfg.patch_size)
        if cfg.local_up_to_layer > 0 and grid[0] != grid[1]:
            raise ValueError(f"ConViT's GPSA needs a square token grid (timm's get_rel_indices), got {grid}")
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.global_pool = cfg.global_pool
        self.local_up_to_layer = cfg.local_up_to_layer
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.img_size = img_size
        self.patch_size = cfg.patch_size
        self.grid_size = grid
        self.num_prefix_tokens = 1

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, embed_dim, **dd, rngs=rngs)
        self.cls_token = nnx.Param(trunc_normal_02(rngs.params(), (1, 1, embed_dim), param_dtype))
        self.pos_drop = dropout(cfg.pos_drop_rate, rngs)
        # (1, N, C) like timm's, so the converter copies it (and resamples square grids).
        self.pos_embed = nnx.Param(trunc_normal_02(rngs.params(), (1, grid[0] * grid[1], embed_dim), param_dtype)) \
            if cfg.use_pos_embed else None

        # timm's calculate_drop_path_rates: linspace(0, rate, depth)
        dpr = [cfg.drop_path_rate * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.grad_checkpointing = False  # set_grad_checkpointing()
        self.blocks = nnx.List([
            Block(embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                  proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=dpr[i],
                  use_gpsa=i < cfg.local_up_to_layer, locality_strength=cfg.locality_strength, **dd, rngs=rngs)
            for i in range(cfg.depth)
        ])
        self.norm = layer_norm(embed_dim, eps=_LN_EPS, **dd, rngs=rngs)
        self.feature_info: list[dict[str, Any]] = [
            dict(num_chs=embed_dim, reduction=cfg.patch_size, module=f"blocks.{i}") for i in range(cfg.depth)]
        self.head_drop = dropout(cfg.drop_rate, rngs)
        self.head = Linear(embed_dim, cfg.num_classes, kernel_init=trunc_normal_02, **dd, rngs=rngs) \
            if cfg.num_classes > 0 else None

    # ---------------------------------------------------------------- trunk
    def _embed(self, x: jax.Array) -> jax.Array:
        """Images ``(B, H, W, C_in)`` -> patch tokens ``(B, N, C)`` with position embeddings."""
        if tuple(x.shape[1:3]) != self.img_size:
            # timm's PatchEmbed asserts the input size (strict_img_size, fixed_input_size=True).
            raise ValueError(f"input size {tuple(x.shape[1:3])} != model img_size {self.img_size}")
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed[...].astype(x.dtype)
        return self.pos_drop(x)

    def _run_blocks(self, x: jax.Array, take: set[int] | None = None) -> tuple[jax.Array, list[jax.Array]]:
        """Runs the blocks, inserting the class token before block ``local_up_to_layer`` (timm's forward order)."""
        taken = []
        for i, block in enumerate(self.blocks):
            if i == self.local_up_to_layer:
                B, _, C = x.shape
                cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (B, 1, C))
                x = jnp.concatenate([cls, x], axis=1)  # (B, 1 + N, C)
            x = run_block(block, x, self.grad_checkpointing, grad_barrier=True, param_grads_first=True)
            if take is not None and i in take:
                taken.append(x)
        return x, taken

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's ``set_grad_checkpointing``: run every block under ``nnx.remat`` (see ``layers.run_block``), trading
        about one extra forward per step for activation memory. Set before ``nnx.split``/``jit``: the flag is static."""
        self.grad_checkpointing = enable

    def forward_features(self, x: jax.Array) -> jax.Array:
        """Images ``(B, H, W, in_chans)`` -> normalised tokens ``(B, 1 + N, C)`` (class token first)."""
        x, _ = self._run_blocks(self._embed(x))
        return self.norm(x)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Tokens -> logits (or pooled embeddings with ``pre_logits=True``)."""
        if self.global_pool:
            x = x[:, self.num_prefix_tokens:].mean(axis=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits or self.head is None else self.head(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: jax.Array, indices: int | list[int] | None = None, norm: bool = False,
                              intermediates_only: bool = False) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """timm's ``forward_intermediates``: NHWC patch-token maps ``(B, H/p, W/p, C)`` of the selected blocks.

        Args:
            x: images ``(B, H, W, in_chans)``.
            indices: ``None`` for every block, an int ``n`` for the last ``n`` blocks, or a list of block indices.
            norm: apply the final norm to the intermediates (before the class token is stripped, as timm does).
            intermediates_only: return only the list of feature maps.
        """
        take_idx, _ = feature_take_indices(len(self.blocks), indices)
        take = set(take_idx)
        B = x.shape[0]
        gh, gw = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        x, taken = self._run_blocks(self._embed(x), take)
        out = []
        for i, y in zip(sorted(take), taken, strict=True):
            y = self.norm(y) if norm else y
            y = y[:, 1:] if i >= self.local_up_to_layer else y  # strip the class token once it is there
            out.append(y.reshape(B, gh, gw, -1))  # (B, H/p, W/p, C); timm returns NCHW
        if intermediates_only:
            return out
        return self.norm(x), out

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drops the blocks after the last selected one, and the norm/head (timm's ``prune_intermediate_layers``).

        When only GPSA blocks remain the class token is never inserted, so it goes too (with a token-pooled head).
        Returns the absolute indices taken.
        """
        take_idx, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = nnx.List(list(self.blocks)[:max_index + 1])
        if max_index < self.local_up_to_layer:
            self.cls_token = None
            self.num_prefix_tokens = 0
            prune_head = prune_head or self.global_pool == "token"
        if prune_norm:
            self.norm = Identity()
        if prune_head:
            self.head = None
            self.num_classes = 0
            self.global_pool = ""
        return take_idx


def _cfg() -> dict[str, Any]:
    """timm's ``_cfg`` for ConViT's fb_in1k weights (hub-only, hf_hub_id ``timm/<name.tag>``)."""
    return dict(
        url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.875, interpolation="bicubic",
        fixed_input_size=True, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj",
        classifier="head", license="apache-2.0",
    )


# timm name -> architecture (timm's model_args; embed_dim is per head).
VARIANTS: dict[str, ConVitConfig] = {
    "convit_tiny": ConVitConfig(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=4),
    "convit_small": ConVitConfig(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=9),
    "convit_base": ConVitConfig(local_up_to_layer=10, locality_strength=1.0, embed_dim=48, num_heads=16),
}

# "name.tag" -> timm's pretrained cfg. hf_hub_id is timm's "timm/<name.tag>" (set by the registry).
PRETRAINED: dict[str, dict[str, Any]] = {
    "convit_tiny.fb_in1k": _cfg(),
    "convit_small.fb_in1k": _cfg(),
    "convit_base.fb_in1k": _cfg(),
}


# features_only=True without out_indices: the last 3 feature maps, as timm's _create_convit.
DEFAULT_OUT_INDICES = 3

# create_model overrides -> config (the registry calls each family's ``build``).
build = replace_config
