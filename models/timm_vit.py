"""The 2D ViT of seed 002 (ViT-B/16 at 224, ImageNet-pretrained, fine-tuned on MedMNIST2D) via timm.

Inputs of another size (MedMNIST's 28, 64, 128) are resized to the model's 224 with bilinear
interpolation inside the model. `pretrained=True` takes timm's weights from the local Hugging
Face cache; `pretrained_file` from a local .safetensors/.bin/.pth file; nothing is downloaded at
run time unless the user allows it.
"""
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import register_model


class TimmViT2D(nn.Module):
    def __init__(self, timm_name: str, num_classes: int = 2, in_chans: int = 3, pretrained: bool = False,
                 pretrained_file: str | None = None, drop_path_rate: float = 0.0, **_ignored):
        super().__init__()
        overlay = {"file": pretrained_file} if pretrained_file else None
        self.model = timm.create_model(timm_name, pretrained=pretrained or bool(pretrained_file),
                                       pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                       in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.img_size = tuple(self.model.patch_embed.img_size)
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.config = {"num_classes": num_classes, "in_chans": in_chans, "spatial_dims": 2,
                       "drop_path_rate": drop_path_rate}

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.img_size:
            return x
        return F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(self._resize(x)), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._resize(x))


@register_model
def timm_vit_base_patch16_224(**overrides) -> TimmViT2D:
    return TimmViT2D("vit_base_patch16_224", **overrides)
