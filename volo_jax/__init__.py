"""volo-jax: timm's VOLO, PoolFormer, VoVNet and ConViT in JAX / Flax NNX, with converted PyTorch weights.

Public API (timm-style)::

    import volo_jax
    model = volo_jax.create_model("volo_d1_224.sail_in1k", pretrained="d1_224_84.2.pth.tar")
    model.eval()
    logits = model(images_nhwc)
"""

from volo_jax.registry import create_model, get_pretrained_cfg, list_models, resolve_data_config

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "get_pretrained_cfg", "resolve_data_config", "__version__"]
