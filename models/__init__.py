"""Architectures, created by name: `models.create_model('mae_vit_base_patch16', img_size=64)`."""
from models.registry import create_model, list_models, register_model
from models import mae3d, medvit3d, resnet2d, resnet3d, slivit, timm_vit, vit, vitmednet3d  # noqa: F401  (each registers its variants)

__all__ = ["create_model", "list_models", "register_model"]
