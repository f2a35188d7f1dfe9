"""ViT classifiers (2D and 3D) on the MAE's encoder (models.vit_encoder), so pretrained encoders load as is.

Pooling (`global_pool`):
  avg        mean of the patch tokens -> `fc_norm` (the MAE fine-tuning default)
  token      the class token after the encoder's final `norm`
  concat     [class token, mean of patch tokens] -> `fc_norm` of width 2E (TANGERINE's classifier)
  attention  a learned query attending to the patch tokens (timm's AttentionPoolLatent, as SigLIP's `map` head):
             a pooling that keeps where a feature is, unlike the mean -> `fc_norm`
then `head_norm` (a batch norm without affine, MAE's linear-probe trick) and `head`. `stem_channels` puts a
convolutional stem before the patch projection (models.patch_embed.ConvStem).
"""
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.layers import AttentionPoolLatent

from .contract import ROLLOUT
from .registry import register_model
from .vit_encoder import ViTEncoder

POOLINGS = ("avg", "token", "concat", "attention")


class VisionTransformer(ViTEncoder):
    explain_method = ROLLOUT
    cam_layer = "blocks"

    def __init__(self, img_size: int | Sequence[int] = 28, patch_size: int | Sequence[int] = 4,
                 in_chans: int = 1, spatial_dims: int | None = None, num_classes: int = 2,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, global_pool: str = "avg",
                 input_mean: float = 0.0, input_std: float = 1.0, stem_channels: int = 0, head_norm: bool = False,
                 isolated_class_token: bool = False, layer_norm_eps: float = 1e-6):
        if global_pool not in POOLINGS:
            raise ValueError(f"global_pool must be one of {POOLINGS}, got {global_pool!r}")
        super().__init__(img_size, patch_size, in_chans, spatial_dims, embed_dim, depth, num_heads, mlp_ratio,
                         input_mean, input_std, stem_channels, drop_path_rate, final_norm=global_pool == "token",
                         isolated_class_token=isolated_class_token, layer_norm_eps=layer_norm_eps)
        self.global_pool = global_pool
        self.num_classes = num_classes
        self.feature_dim = 2 * embed_dim if global_pool == "concat" else embed_dim
        self.fc_norm = partial(nn.LayerNorm, eps=1e-6)(self.feature_dim) if global_pool != "token" else nn.Identity()
        self.attn_pool = AttentionPoolLatent(embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                                             norm_layer=partial(nn.LayerNorm, eps=1e-6)) \
            if global_pool == "attention" else None
        self.head_drop = nn.Dropout(drop_rate)
        # batch norm without affine before the head removes what every sample shares (positions, empty
        # patches), so the head sees the part that varies from the first step
        self.head_norm = nn.BatchNorm1d(self.feature_dim, affine=False, eps=1e-6) if head_norm else nn.Identity()
        self.head = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as MAE fine-tuning: start near uniform
        nn.init.zeros_(self.head.bias)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            feature = tokens[:, 0]
        elif self.global_pool == "attention":
            feature = self.fc_norm(self.attn_pool(tokens[:, 1:]))
        else:
            mean = tokens[:, 1:].mean(dim=1)
            feature = self.fc_norm(torch.cat([tokens[:, 0], mean], dim=-1) if self.global_pool == "concat" else mean)
        if pre_logits:
            return feature
        return self.head(self.head_drop(self.head_norm(feature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
PATCHES = (2, 4, 7, 8, 14, 16)
# What `--model auto` builds when no pretrained encoder dictates the architecture: a small hybrid ViT (a
# convolutional stem of 16 channels, 96 wide, 4 deep), its patch from `auto_patch_size` (docs/finetuning.md: the MedMNIST recipe).
AUTO_ARCHITECTURE = {"embed_dim": 96, "depth": 4, "num_heads": 3, "stem_channels": 16}

for _patch in PATCHES:
    for _size, (_dim, _depth, _heads) in SIZES.items():
        _shape = {"patch_size": _patch, "embed_dim": _dim, "depth": _depth, "num_heads": _heads}
        register_model(f"vit3d_{_size}_patch{_patch}", img_size=(28,) * 3, **_shape)(VisionTransformer)
        if _size != "large":
            register_model(f"vit_{_size}_patch{_patch}", img_size=(28,) * 2, **_shape)(VisionTransformer)
# any width, depth, patch and stem (AUTO_ARCHITECTURE, patch 4, unless overridden): `--model auto`
register_model("vit3d", img_size=(28,) * 3, spatial_dims=3, **AUTO_ARCHITECTURE)(VisionTransformer)
register_model("vit2d", img_size=(28,) * 2, spatial_dims=2, **AUTO_ARCHITECTURE)(VisionTransformer)
