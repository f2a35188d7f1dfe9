"""SLIViT: a 2D ConvNeXt applied to each slice, then a ViT integrating one token per slice.

The reference tiled the slices into one tall image and reshaped the ConvNeXt feature map without a
permute, so each of its "tokens" mixed channels across slices. Here each slice's feature map is
pooled to one vector, projected to the integrator width: token i is slice i. Integrator defaults
follow the reference: depth 5, width 256, 20 heads of 64, MLP 512, learned positions, class token.
Input: (N, C, S, H, W), S slices of H x W; grey inputs are repeated to the backbone's 3 channels,
and slices smaller than 32 pixels (ConvNeXt divides by 32) are upsampled to 32.
"""
from functools import partial

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block

from ..util.checkpoint import load_torch_file
from .contract import ClassifierBase
from .registry import register_model

MIN_SLICE = 32


def attention_with_head_width(dim_head: int) -> type:
    """timm's Attention with a head width of its own (the reference: 20 heads of 64 on a width of 256)."""
    class HeadWidthAttention(Attention):
        def __init__(self, dim: int, num_heads: int = 8, **kwargs):
            super().__init__(dim, num_heads=num_heads, attn_head_dim=dim_head, **kwargs)

    return HeadWidthAttention


@register_model("slivit")
class SLIViT(ClassifierBase):
    cam_layer = "backbone.stages"  # one 2D map per slice
    weight_source_args = ("pretrained", "fe_path")

    def __init__(self, img_size=(28, 256, 256), in_chans: int = 1, num_classes: int = 2,
                 backbone: str = "convnext_tiny", pretrained: bool = False, fe_path: str | None = None,
                 depth: int = 5, dim: int = 256, heads: int = 20, dim_head: int = 64, mlp_dim: int = 512,
                 drop_path_rate: float = 0.0):
        super().__init__()
        self.num_slices = int(img_size[0])
        self.spatial_dims = 3
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, in_chans=3)
        if fe_path:
            self.backbone.load_state_dict(load_torch_file(fe_path)["backbone"])
        self.to_token = nn.Linear(self.backbone.num_features, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_slices + 1, dim) * 0.02)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(dim, heads, mlp_ratio=mlp_dim / dim, qkv_bias=True, norm_layer=norm, drop_path=rate,
                  attn_layer=attention_with_head_width(dim_head)) for rate in rates])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, num_classes)

    def slice_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, H, W) -> (N, S, F): each slice through the ConvNeXt on its own."""
        n, c, s, h, w = x.shape
        slices = x.transpose(1, 2).reshape(n * s, c, h, w)
        if min(h, w) < MIN_SLICE:
            slices = F.interpolate(slices, size=(max(h, MIN_SLICE), max(w, MIN_SLICE)), mode="bilinear",
                                   align_corners=False)
        if c == 1:
            slices = slices.expand(-1, 3, -1, -1)
        return self.backbone(slices).reshape(n, s, -1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1 + S, dim) after the final norm: the class token, then one token per slice."""
        tokens = self.to_token(self.slice_features(x))
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x[:, 0] if pre_logits else self.head(x[:, 0])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}


@register_model("slivit_backbone")
class SliceBackboneClassifier(ClassifierBase):
    """SLIViT's 2D backbone pretraining model: the timm ConvNeXt and a linear head. Its `backbone`
    weights are what `--fe_path` loads into SLIViT."""
    cam_layer = "backbone.stages"
    weight_source_args = ("pretrained",)

    def __init__(self, img_size=(256, 256), in_chans: int = 3, num_classes: int = 4, backbone: str = "convnext_tiny",
                 pretrained: bool = False, drop_path_rate: float = 0.0):
        super().__init__()
        self.spatial_dims = 2
        self.num_classes = num_classes
        self.backbone = timm.create_model(backbone, pretrained=pretrained, num_classes=0, in_chans=in_chans,
                                          drop_path_rate=drop_path_rate)
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.backbone.forward_head(x, pre_logits=True)
        return x if pre_logits else self.head(x)
