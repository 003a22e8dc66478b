"""The VOLO README's training recipes, with token labeling: ``--config configs/volo_token_label.py:VARIANT``.

    python -m volo_jax.tools.convert_token_labels /path/to/label_top5_train_nfnet /data/token_labels
    python train.py /path/to/imagenet --config configs/volo_token_label.py:d1 \\
        --token-label-data /data/token_labels --output runs/d1
    python train.py /path/to/imagenet --config configs/volo_token_label.py:d1_384 \\
        --token-label-data /data/token_labels --finetune runs/d1 --output runs/d1_384

VARIANT is ``d1`` .. ``d5`` (224, from scratch) or a fine-tune ``d1_384``, ``d2_384``, ``d3_448``, ``d4_448``,
``d5_448``, ``d5_512`` (``--ground-truth``, give ``--finetune`` the 224 run or its released checkpoint).

Source: the sail-sg/volo README commands (8 GPUs, ``-b`` per GPU, so the global batch is 8x) on top of its
``main.py`` defaults: AdamW, weight decay 0.05, cosine to 1e-5 after 20 warmup epochs from 1e-6, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25, label smoothing 0.1, NO mixup/cutmix (main.py's defaults are 0; the
model's MixToken is the mixing), ``--dense-weight 0.5 --cls-weight 1.0``, token-label grid 14 at 224.
Expected top-1 (README): d1 84.2, d2 85.2, d3 85.4, d4 85.7, d5 86.1; d1_384 85.2, d2_384 86.0, d3_448 86.3,
d4_448 86.8, d5_448 87.0, d5_512 87.1. Not reproduced here (no ImageNet or accelerator on the development machine).

Where we differ from the README, and why:
- the global batch is fixed (``global_batch_size``), so a recipe means the same on any device count;
- timm's scheduler adds 10 cooldown epochs at ``min_lr`` after the cosine (the README's "310 epochs" for d1); our
  schedule has no cooldown phase, so the 224 recipes run the 300 cosine epochs only;
- the README's d3 448 command says ``--token-label-size 24``, which cannot run (448 px gives a 28x28 token grid and
  tlt's loss needs one target per token); we use the grid size (``token_label_size = 0``) everywhere;
- d4 and d5 have no README command: their drop-path rates and learning rates (d4 0.5 / 1e-3, d5 0.75 / 8e-4) are
  the VOLO paper's settings as we read them, and their fine-tunes copy d3's; check them before a long run.
"""

from configs import default

# variant -> (model, img_size, global batch, lr, drop_path); the 224 runs from scratch.
_PRETRAIN = {
    "d1": ("volo_d1_224", 224, 1024, 1.6e-3, 0.1),
    "d2": ("volo_d2_224", 224, 1024, 1.0e-3, 0.2),
    "d3": ("volo_d3_224", 224, 1024, 1.0e-3, 0.5),
    "d4": ("volo_d4_224", 224, 1024, 1.0e-3, 0.5),
    "d5": ("volo_d5_224", 224, 1024, 8.0e-4, 0.75),
}
# fine-tunes at a higher resolution from the 224 run: 30 epochs, lr 8e-6 -> 4e-6, weight decay 1e-8, 5 warmup epochs,
# --ground-truth (README). Global batch = the README's -b x 8 GPUs.
_FINETUNE = {
    "d1_384": ("volo_d1_384", 384, 512, 0.1),
    "d2_384": ("volo_d2_384", 384, 384, 0.2),
    "d3_448": ("volo_d3_448", 448, 240, 0.5),
    "d4_448": ("volo_d4_448", 448, 240, 0.5),
    "d5_448": ("volo_d5_448", 448, 240, 0.75),
    "d5_512": ("volo_d5_512", 512, 240, 0.75),
}
VARIANTS = (*_PRETRAIN, *_FINETUNE)


def get_config(variant: str = "d1"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown VOLO recipe {variant!r}; choose one of {', '.join(VARIANTS)}")
    c = default.get_config()
    c.token_label = True
    c.token_label_size = 0  # the model's token grid: 14 at 224, 24 at 384, 28 at 448, 32 at 512
    c.dense_weight = 0.5
    c.cls_weight = 1.0
    c.mix_token = True
    c.mixup = 0.0
    c.cutmix = 0.0
    c.smoothing = 0.1
    c.auto_augment = "rand-m9-mstd0.5-inc1"
    c.reprob = 0.25
    c.warmup_lr = 1e-6
    c.min_lr = 1e-5
    if variant in _PRETRAIN:
        c.model, c.img_size, c.global_batch_size, c.lr, c.drop_path = _PRETRAIN[variant]
        c.epochs = 300
        c.warmup_epochs = 20.0
        c.weight_decay = 0.05
    else:
        c.model, c.img_size, c.global_batch_size, c.drop_path = _FINETUNE[variant]
        c.epochs = 30
        c.lr, c.min_lr = 8e-6, 4e-6
        c.warmup_epochs = 5.0
        c.weight_decay = 1e-8
        c.ground_truth = True
    return c
