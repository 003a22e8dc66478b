"""VOLO-D1 at 224 on ImageNet, the VOLO README's recipe without token labeling (with it: volo_token_label.py:d1).

    python train.py /path/to/imagenet --config configs/volo_d1_224.py

Original: ``python train.py /path/to/imagenet --model volo_d1 --img-size 224 -b 128 --lr 1.6e-3 --drop-path 0.1
--epochs 310 --token-label ...`` on 8 GPUs (global batch 1024); the other settings are our defaults (timm's AdamW,
weight decay 0.05, cosine to 1e-5, 5 warmup epochs, mixup 0.8 / cutmix 1.0, smoothing 0.1, random erasing 0.25).
Expected: the README reports 84.2 top-1 WITH token labeling; about 1.6 points less without it (the VOLO paper's
ablation), i.e. ~82.6. Not reproduced here (no ImageNet on the development machine).
"""

from configs import default


def get_config():
    c = default.get_config()
    c.model = "volo_d1_224"
    c.img_size = 224
    c.batch_size = 128
    c.lr = 1.6e-3
    c.drop_path = 0.1
    c.epochs = 310
    return c
