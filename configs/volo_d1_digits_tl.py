"""The demo's digits run (``configs/volo_d1_digits.py``) with VOLO's token labeling, labels from the demo's model.

    make demo                                   # trains the teacher: demo_out/run (98.3 % held-out)
    python -m volo_jax.tools.label_tokens --teacher volo_d1_224 --checkpoint demo_out/run --img-size 32 \\
        demo_out/digits demo_out/token_labels   # its top-5 logits on VOLO-D1's 2x2 token grid of each image
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python train.py demo_out/digits \\
        --config configs/volo_d1_digits_tl.py --token-label-data demo_out/token_labels --output demo_out/run_tl

Everything but the objective is the demo's recipe (same seed, data order, augmentations, schedule, EMA): the class
token learns from the teacher's cropped label map (tlt's targets), every aux token from its own cell of the map
(dense weight 0.5), MixToken on. ``token_label_crop='aligned'``: our label maps are in image orientation, so the crop
box cuts the region the image crop covers (tlt's own reading transposes it; see volo_jax/token_label.py).
Measured results (held-out top-1 against the same run without token labels) are in the README.
"""

from configs import volo_d1_digits


def get_config():
    c = volo_d1_digits.get_config()
    c.token_label = True
    c.token_label_size = 0  # the model's grid: 2x2 at 32 px (patch 8, pooling 2)
    c.dense_weight = 0.5
    c.cls_weight = 1.0
    c.mix_token = True
    c.token_label_crop = "aligned"
    c.output = "demo_out/run_tl"
    return c
