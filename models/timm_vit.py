"""The 2D ViT of the MedMNIST2D ViT reference ("Implementing vision transformer for classifying 2D biomedical
images": ViT-B/16 at 224, ImageNet-pretrained, fine-tuned on MedMNIST2D) via timm.

Inputs of another size (MedMNIST's 28, 64, 128) are resized to the model's 224 with bilinear
interpolation inside the model. `pretrained=True` takes timm's weights from the local Hugging
Face cache; `pretrained_file` from a local .safetensors/.bin/.pth file; nothing is downloaded at
run time unless the user allows it.
"""
import re

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .contract import ROLLOUT
from .registry import register_model


def _prefixed(matcher: dict, prefix: str) -> dict:
    """A timm group matcher for a model held as a submodule: every pattern anchored at `prefix`."""
    def anchor(pattern: str) -> str:
        return re.sub(r"\^", "^" + re.escape(prefix), pattern)

    return {group: [(anchor(p), suffix) for p, suffix in spec] if isinstance(spec, list | tuple) else anchor(spec)
            for group, spec in matcher.items()}


@register_model("timm_vit_base_patch16_224", timm_name="vit_base_patch16_224")
class TimmViT2D(nn.Module):
    explain_method = ROLLOUT
    cam_layer = "model.blocks"
    weight_source_args = ("pretrained", "pretrained_file")

    def __init__(self, timm_name: str, num_classes: int = 2, in_chans: int = 3, pretrained: bool = False,
                 pretrained_file: str | None = None, drop_path_rate: float = 0.0):
        super().__init__()
        overlay = {"file": pretrained_file} if pretrained_file else None
        self.model = timm.create_model(timm_name, pretrained=pretrained or bool(pretrained_file),
                                       pretrained_cfg_overlay=overlay, num_classes=num_classes,
                                       in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.img_size = tuple(self.model.patch_embed.img_size)
        self.grid_size = tuple(self.model.patch_embed.grid_size)
        self.spatial_dims = 2
        self.num_classes = num_classes

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.img_size:
            return x
        return F.interpolate(x, size=self.img_size, mode="bilinear", align_corners=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(self._resize(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def no_weight_decay(self) -> set[str]:
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        return _prefixed(self.model.group_matcher(coarse), "model.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
