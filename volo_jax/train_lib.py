"""The pure, testable pieces of training: schedule, optimizer, mixup/cutmix, loss, train and eval steps, sharding.

Data parallelism is the pmap design written on the current API: parameters replicated on every device of a
``('data',)`` mesh that spans all processes, the global batch split along ``data``, one ``jax.jit`` program per step
(XLA's SPMD partitioner inserts the gradient all-reduce). ``jax.pmap`` is documented as legacy (it is implemented on
``shard_map`` now); ``jit`` over sharded arrays is the same per-device program with global-batch semantics, which
also gives synchronised BatchNorm for free: batch statistics are reductions over the global batch.

Semantics follow timm's ``train.py`` where a choice exists:

- schedule: ``CosineLRScheduler`` stepped on updates (``--sched-on-updates``): linear warmup from ``warmup_lr`` over
  ``warmup_steps``, then ``min_lr + (lr - min_lr) * (1 + cos(pi * t / total_steps)) / 2`` evaluated at the global
  step ``t`` (timm's default ``warmup_prefix=False``: the cosine does not restart after warmup);
- optimizer: AdamW (torch's update, decoupled decay scaled by the learning rate), no weight decay on 1-D parameters
  (norms, biases, scales) and on ``pos_embed`` / ``cls_token`` (timm's ``param_groups_weight_decay`` with the models'
  ``no_weight_decay()``), optional global-norm clipping and gradient accumulation (``optax.MultiSteps``);
- mixup/cutmix: ``timm.data.Mixup`` in ``mode='batch'`` (one ``lam`` per batch, mixed with the flipped batch, cutmix
  box with ``correct_lam``), label smoothing folded into the targets, ``SoftTargetCrossEntropy``;
- EMA of the weights as ``timm.utils.ModelEmaV3`` without warmup: ``ema = decay * ema + (1 - decay) * params``;
- token labeling (VOLO's objective, the VOLO repo's ``--token-label``): dense per-token targets from the token-label
  maps and the crop box (:mod:`volo_jax.token_label`), mixup/cutmix of the images with the label maps mixed like
  ``tlt``'s ``TokenLabelMixup``, MixToken inside the model (``VOLO.forward_train``), ``TokenLabelCrossEntropy``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from volo_jax.xla import compiler_options

# Parameter names timm's models list in ``no_weight_decay()`` (VOLO, ConViT); 1-D parameters are excluded anyway.
NO_WEIGHT_DECAY_NAMES = frozenset({"pos_embed", "cls_token"})


# --------------------------------------------------------------------------- schedule and optimizer
def cosine_lr_schedule(lr: float, total_steps: int, *, warmup_steps: int = 0, warmup_lr: float = 0.0,
                       min_lr: float = 0.0) -> Callable[[jax.Array | int], jax.Array]:
    """timm's ``CosineLRScheduler(t_initial=total_steps, warmup_t=warmup_steps, ...)`` on updates, as a jnp function.

    Args:
        lr: peak learning rate.
        total_steps: number of optimizer updates of the run (``t_initial``); after it the rate stays at ``min_lr``.
        warmup_steps: updates of linear warmup from ``warmup_lr`` to ``lr``.
        warmup_lr: learning rate at step 0 (timm's ``warmup_lr_init``).
        min_lr: floor of the cosine (timm's ``lr_min``).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")

    def schedule(step: jax.Array | int) -> jax.Array:
        t = jnp.asarray(step, jnp.float32)
        warm = warmup_lr + t * ((lr - warmup_lr) / max(warmup_steps, 1))
        cos = min_lr + 0.5 * (lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / total_steps))
        cos = jnp.where(t < total_steps, cos, min_lr)  # timm: cycle_limit=1, then lr_min
        return jnp.where(t < warmup_steps, warm, cos)

    return schedule


def weight_decay_mask(params: Any) -> Any:
    """Same-structure pytree of bools: True where weight decay applies (timm's ``param_groups_weight_decay``).

    No decay for 1-D (and 0-D) parameters, i.e. norm scales/biases, biases, layer scales, gates, and for
    ``pos_embed`` / ``cls_token``.
    """

    def decays(path: tuple[Any, ...], x: Any) -> bool:
        names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
        return bool(np.ndim(x) > 1 and not (names & NO_WEIGHT_DECAY_NAMES))

    return jax.tree_util.tree_map_with_path(decays, params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with timm's defaults for the VOLO recipes (``--opt adamw --weight-decay 0.05``)."""

    lr: float = 1.6e-3
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_grad: float | None = None  # global-norm clipping (timm --clip-grad with --clip-mode norm)
    accum_steps: int = 1  # gradient accumulation: one optimizer update every accum_steps micro-batches


def make_optimizer(cfg: OptimizerConfig, params: Any) -> tuple[optax.GradientTransformation, Callable]:
    """The optax transformation and its learning-rate schedule (in optimizer updates)."""
    schedule = cosine_lr_schedule(cfg.lr, cfg.total_steps, warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr,
                                  min_lr=cfg.min_lr)
    parts = []
    if cfg.clip_grad:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=weight_decay_mask(params)))
    tx = optax.chain(*parts)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx, schedule


# --------------------------------------------------------------------------- mixup / cutmix and loss
@dataclasses.dataclass(frozen=True)
class MixConfig:
    """``timm.data.Mixup`` arguments (mode ``batch``, ``correct_lam=True``); alphas 0 disable mixing."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    num_classes: int = 1000

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0.0 or self.cutmix_alpha > 0.0


@dataclasses.dataclass(frozen=True)
class TokenLabelConfig:
    """VOLO's token-labeling objective (the VOLO repo's flags, its defaults).

    Attributes:
        label_size: ``--token-label-size``, the side of the dense target grid; it must be the model's aux token grid
            (14 for VOLO at 224, 24 at 384, 28 at 448, 32 at 512).
        dense_weight: ``--dense-weight``, weight of the per-token (aux head) loss.
        cls_weight: ``--cls-weight``, weight of the class-token loss.
        ground_truth: ``--ground-truth``, mix the ground-truth label into the class target (fine-tuning).
        mix_token: MixToken in the forward pass (the original VOLO trains with it on).
        label_maps: the batch carries token-label maps (``--token-label-data``); False: tlt's fallback that uses
            the (smoothed, mixed) class target for every token.
        crop: how the crop box cuts the maps: ``'tlt'`` exactly as tlt (transposed on the map, what VOLO's released
            models were trained with) or ``'aligned'`` (the region the image crop covers); see
            :func:`volo_jax.token_label.token_label_targets`.
    """

    label_size: int = 14
    dense_weight: float = 0.5
    cls_weight: float = 1.0
    ground_truth: bool = False
    mix_token: bool = True
    label_maps: bool = True
    crop: str = "tlt"


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """timm's one-hot with label smoothing: ``1 - s + s / C`` on the label, ``s / C`` elsewhere."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def sample_mix_params(key: jax.Array, cfg: MixConfig, hw: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One batch's mixing parameters as timm's ``Mixup._params_per_batch`` + ``cutmix_bbox_and_lam`` draws them.

    Returns:
        ``lam`` (float32; 1 = no mixing; for cutmix already corrected to the clipped box area), ``use_cutmix`` (bool)
        and the box ``(yl, yh, xl, xh)`` (int32, empty when not cutmix).
    """
    h, w = hw
    k_apply, k_switch, k_mix, k_cut, k_y, k_x = jax.random.split(key, 6)
    apply = jax.random.uniform(k_apply) < cfg.prob
    if cfg.mixup_alpha > 0.0 and cfg.cutmix_alpha > 0.0:
        use_cutmix = jax.random.uniform(k_switch) < cfg.switch_prob
    else:
        use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0.0)
    lam_mix = jax.random.beta(k_mix, max(cfg.mixup_alpha, 1e-12), max(cfg.mixup_alpha, 1e-12))
    lam_cut = jax.random.beta(k_cut, max(cfg.cutmix_alpha, 1e-12), max(cfg.cutmix_alpha, 1e-12))
    use_cutmix = apply & use_cutmix
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
    # timm's rand_bbox: a box of side ratio sqrt(1 - lam) around a uniform centre, clipped to the image.
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(w * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, h)
    cx = jax.random.randint(k_x, (), 0, w)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + (cut_h + 1) // 2, 0, h)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + (cut_w + 1) // 2, 0, w)
    box = jnp.where(use_cutmix, jnp.stack([yl, yh, xl, xh]), jnp.zeros(4, jnp.int32)).astype(jnp.int32)
    lam_corrected = 1.0 - ((box[1] - box[0]) * (box[3] - box[2])).astype(jnp.float32) / (h * w)
    lam = jnp.where(use_cutmix, lam_corrected, lam).astype(jnp.float32)
    return lam, use_cutmix, box


def apply_mix(images: jax.Array, labels: jax.Array, lam: jax.Array, use_cutmix: jax.Array, box: jax.Array,
              num_classes: int, smoothing: float) -> tuple[jax.Array, jax.Array]:
    """Mixes a batch with its reverse (timm ``Mixup._mix_batch`` + ``mixup_target``), jit-friendly.

    Args:
        images: ``(B, H, W, C)``.
        labels: ``(B,)`` int class indices.
        lam, use_cutmix, box: from :func:`sample_mix_params`.
        num_classes, smoothing: target size and label smoothing.

    Returns:
        Mixed images and soft targets ``(B, num_classes)``.
    """
    flipped = images[::-1]
    h, w = images.shape[1:3]
    rows = jnp.arange(h)[:, None]
    cols = jnp.arange(w)[None, :]
    in_box = (rows >= box[0]) & (rows < box[1]) & (cols >= box[2]) & (cols < box[3])  # (H, W)
    cut = jnp.where(in_box[None, :, :, None], flipped, images)
    blend = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    mixed = jnp.where(use_cutmix, cut, blend)
    y = smooth_one_hot(labels, num_classes, smoothing)
    return mixed, y * lam + y[::-1] * (1.0 - lam)


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example ``sum(-targets * log_softmax(logits))`` (timm ``SoftTargetCrossEntropy`` before its mean)."""
    return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


# --------------------------------------------------------------------------- state and steps
class TrainState(struct.PyTreeNode):
    """Everything a step changes; a pytree, so orbax saves it as is and ``jit`` donates it.

    Attributes:
        step: optimizer micro-steps taken (int32 scalar).
        params: ``nnx.Param`` state of the model (fp32).
        model_state: every other variable (BatchNorm statistics, dropout RNG keys/counts).
        opt_state: optax state.
        ema_params: EMA of ``params`` (None when disabled).
        key: base PRNG key; step ``t`` uses ``fold_in(key, t)`` for mixup.
    """

    step: jax.Array
    params: Any
    model_state: Any
    opt_state: Any
    ema_params: Any
    key: jax.Array


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, *, seed: int = 0,
                       ema: bool = False) -> tuple[nnx.GraphDef, TrainState]:
    """Splits ``model`` once into its static graph and a :class:`TrainState`."""
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    ema_params = jax.tree.map(jnp.copy, params) if ema else None
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=tx.init(params), ema_params=ema_params, key=jax.random.key(seed))
    return graphdef, state


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, model_state: Any, images: jax.Array,
                   targets: jax.Array, *, token_label: TokenLabelConfig | None = None,
                   key: jax.Array | None = None) -> tuple[jax.Array, Any, Any]:
    """Training-mode forward and backward: the loss, the updated non-parameter state (BatchNorm running statistics,
    dropout RNG counts) and the gradients with respect to ``params``.

    The loss is the mean soft-target cross-entropy of the logits, or with ``token_label`` tlt's
    ``TokenLabelCrossEntropy`` of the model's dense training output (``forward_train``: class logits, aux logits
    per token, MixToken box drawn from ``key``); ``targets`` are then ``(B, 2 + S*S, C)`` or ``(B, C)``.
    """
    from volo_jax import token_label as tl

    def loss_fn(params: Any) -> tuple[jax.Array, Any]:
        # copy=True: fresh Variables at this trace level, so BatchNorm may update its statistics inside the grad.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        model.train()
        if token_label is None:
            loss = soft_target_cross_entropy(model(images), targets).mean()
        else:
            cls_logits, aux_logits, bbox = model.forward_train(images, mix_token=token_label.mix_token, key=key)
            loss = tl.token_label_loss(cls_logits, aux_logits, bbox, targets, dense_weight=token_label.dense_weight,
                                       cls_weight=token_label.cls_weight, ground_truth=token_label.ground_truth)
        return loss, nnx.state(model, nnx.Not(nnx.Param))

    (loss, new_model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, new_model_state, grads


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mix: MixConfig, ema_decay: float,
               state: TrainState, images: jax.Array, labels: jax.Array, maps: dict[str, jax.Array] | None = None,
               *, token_label: TokenLabelConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on a (global) batch: mixup/cutmix, training-mode forward, loss, gradients, AdamW, EMA.

    Pure: jit it with ``graphdef``, ``tx``, ``mix``, ``ema_decay`` and ``token_label`` static (see
    :func:`jit_train_step`). With ``token_label.label_maps``, ``maps`` holds the batch's token-label maps and crop
    boxes (``tl_scores``, ``tl_indices``, ``tl_box``, as :func:`volo_jax.data.train_batches` yields them).

    Returns:
        The new state and metrics (``loss``, ``grad_norm``).
    """
    from volo_jax import token_label as tl

    key = jax.random.fold_in(state.key, state.step)
    if mix.active:
        lam, use_cutmix, box = sample_mix_params(key, mix, images.shape[1:3])
        images, targets = apply_mix(images, labels, lam, use_cutmix, box, mix.num_classes, mix.label_smoothing)
    else:
        targets = smooth_one_hot(labels, mix.num_classes, mix.label_smoothing)
    if token_label is not None and token_label.label_maps:
        if maps is None:
            raise ValueError("token_label.label_maps needs the batch's maps (tl_scores, tl_indices, tl_box)")
        # tlt's mixup_target on label maps: dense targets of each image, mixed with the flipped batch's like images.
        dense = tl.token_label_targets(maps["tl_scores"], maps["tl_indices"], maps["tl_box"], labels,
                                       num_classes=mix.num_classes, label_size=token_label.label_size,
                                       smoothing=mix.label_smoothing, crop=token_label.crop)  # (B, 2+S*S, C)
        targets = tl.mix_token_label_targets(dense, lam) if mix.active else dense

    # MixToken gets its own stream, so runs without token labeling keep their mixup draws.
    loss, model_state, grads = loss_and_grads(graphdef, state.params, state.model_state, images, targets,
                                              token_label=token_label, key=jax.random.fold_in(key, 1))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
        ema_params = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state,
                              ema_params=ema_params)
    return new_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


def eval_step(graphdef: nnx.GraphDef, states: tuple[Any, ...], images: jax.Array, labels: jax.Array,
              mask: jax.Array) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Eval-mode forward of a padded batch.

    Args:
        graphdef: the model's static graph.
        states: the variable states to merge with it (``(state,)`` or ``(params, model_state)``).
        images, labels: the batch; ``mask`` is False on padding rows.

    Returns:
        Sums over the valid rows (``loss``, ``top1`` and ``top5`` hits, ``count``) and per-example outputs
        (``top_idx``, ``top_prob``: the top-5 classes and probabilities, ``loss``).
    """
    model = nnx.merge(graphdef, *states)
    model.eval()
    logits = model(images).astype(jnp.float32)  # (B, num_classes)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    top_logp, top_idx = jax.lax.top_k(logp, min(5, logits.shape[-1]))  # (B, k)
    hit1 = top_idx[:, 0] == labels
    hit5 = (top_idx == labels[:, None]).any(axis=-1)
    sums = {"loss": jnp.where(mask, loss, 0.0).sum(), "top1": (hit1 & mask).sum(), "top5": (hit5 & mask).sum(),
            "count": mask.sum()}
    return sums, {"top_idx": top_idx, "top_prob": jnp.exp(top_logp), "loss": loss}


# --------------------------------------------------------------------------- sharding
def data_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D ``('data',)`` mesh over every device of every process (or over ``devices``).

    Auto axes: ``jax.make_mesh`` defaults to Explicit axes in current JAX, under which a broadcast class token or a
    scatter into fresh zeros does not trace; the models are written for Auto sharding propagation.
    """
    if devices is None:
        return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A pytree of host-local values, the same on every process, as arrays replicated on every device of ``mesh``.

    ``jax.device_put(tree, replicated(mesh))`` refuses committed arrays (a model built on the default device, a
    restored checkpoint) when ``mesh`` spans other processes' devices; here each process fills its own devices.
    """
    from jax.experimental import multihost_utils

    return multihost_utils.host_local_array_to_global_array(tree, mesh, P())


def jit_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, mix: MixConfig, ema_decay: float,
                   mesh: Mesh, token_label: TokenLabelConfig | None = None
                   ) -> Callable[..., tuple[TrainState, dict]]:
    """``train_step`` jitted over ``mesh``: state replicated and donated, batch split along ``data``.

    The step is ``step(state, images, labels)``, or ``step(state, images, labels, maps)`` when
    ``token_label.label_maps``.
    """
    rep, shard = replicated(mesh), batch_sharded(mesh)
    options = compiler_options(mesh.devices.flat[0].platform)  # XLA:CPU: memory-optimized scheduler (volo_jax.xla)
    if token_label is not None and token_label.label_maps:
        def step_maps(state: TrainState, images: jax.Array, labels: jax.Array, maps: dict[str, jax.Array]
                      ) -> tuple[TrainState, dict]:
            return train_step(graphdef, tx, mix, ema_decay, state, images, labels, maps, token_label=token_label)

        return jax.jit(step_maps, in_shardings=(rep, shard, shard, shard), out_shardings=(rep, rep),
                       donate_argnums=(0,), compiler_options=options)

    def step(state: TrainState, images: jax.Array, labels: jax.Array) -> tuple[TrainState, dict]:
        return train_step(graphdef, tx, mix, ema_decay, state, images, labels, token_label=token_label)

    return jax.jit(step, in_shardings=(rep, shard, shard), out_shardings=(rep, rep), donate_argnums=(0,),
                   compiler_options=options)


def global_batch_size(per_device: int, mesh: Mesh) -> int:
    """``-b`` is per device, as in the original VOLO repo: the global batch is ``per_device * devices``."""
    return per_device * math.prod(mesh.devices.shape)
