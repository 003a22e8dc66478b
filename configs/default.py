"""Defaults of every train.py setting (ml_collections); recipes override what they change.

    python train.py /path/to/imagenet --config configs/default.py --model volo_d1_224

Every field is also a train.py flag (``--lr``, ``--drop-path``, ...); a flag given on the command line wins over the
config file.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = "volo_d1_224"
    c.num_classes = 0  # 0: the number of class folders of the training data
    c.img_size = 0  # 0: the model's default input size
    c.drop_path = 0.0
    c.dtype = "float32"  # compute dtype; parameters stay float32
    c.grad_checkpointing = False  # per-block remat (timm's --grad-checkpointing): less activation memory
    # optimisation (timm train.py names)
    c.epochs = 300
    c.batch_size = 128  # PER DEVICE, as in the VOLO repo; the global batch is batch_size * devices
    c.global_batch_size = 0  # >0: the global batch (big_vision semantics) instead of batch_size * devices
    c.lr = 1.6e-3
    c.min_lr = 1e-5
    c.warmup_lr = 1e-6
    c.warmup_epochs = 5.0
    c.weight_decay = 0.05
    c.clip_grad = 0.0  # 0: no clipping
    c.accum_steps = 1
    c.model_ema_decay = 0.0  # 0: no EMA; VOLO's recipes do not use it, timm's often 0.9998
    # regularisation
    c.smoothing = 0.1
    c.mixup = 0.8
    c.cutmix = 1.0
    c.mixup_prob = 1.0
    c.mixup_switch_prob = 0.5
    c.reprob = 0.25
    c.auto_augment = "rand-m9-mstd0.5-inc1"  # timm/VOLO --aa; "none": off
    c.hflip = 0.5
    c.scale = (0.08, 1.0)  # random-resized-crop area fraction
    c.ratio = (3.0 / 4.0, 4.0 / 3.0)  # random-resized-crop aspect ratio
    c.train_interpolation = "random"
    # token labeling (VOLO's objective; the VOLO repo's flags). Needs a VOLO model.
    c.token_label = False  # class-token loss + per-token (aux head) loss, MixToken
    c.token_label_data = ""  # token-label store (python -m volo_jax.tools.convert_token_labels / label_tokens);
    #                          empty with token_label: every token's target is the image's class target
    c.token_label_size = 0  # side of the dense target grid; 0: the model's aux token grid (14 at 224)
    c.dense_weight = 0.5
    c.cls_weight = 1.0
    c.ground_truth = False  # mix the ground truth into the class target (the VOLO fine-tuning recipes)
    c.mix_token = True
    c.token_label_crop = "tlt"  # "tlt": the crop box read as tlt reads it (transposed on the map); "aligned": as the
    #                             image was cropped (see volo_jax.token_label.token_label_targets)
    # run
    c.seed = 42
    c.workers = 4
    c.output = "output/train"
    c.save_every = 1000  # steps; also at every epoch end and at the end
    c.keep = 3
    c.eval_every = 1  # epochs
    c.log_every = 10  # steps
    c.finetune = ""  # a converted/trained checkpoint to start from (new head / resampled pos_embed as needed)
    return c
