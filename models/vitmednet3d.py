"""3DViTMedNet: shifted copies -> 3D CNN -> every slice along D, H and W through a 2D
ResNet-50 (first convolution widened to the CNN's channels) -> one token per slice, with plane
embeddings and separators -> ViT -> class-token head.

The reference's learned position table fixed it to 28^3; here a slice's position is a sin-cos code
of its index (any length) added to a learned embedding of its plane, so any grid works.
Token layout: [cls, D slices, sep, H slices, sep, W slices, sep].
"""
from functools import partial

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .contract import ClassifierBase
from .pos_embed import sincos_1d
from .registry import register_model


def shifted_copies(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, D, H, W) -> (N, 7, D, H, W): the input and its six copies moved one voxel along +-D, +-H, +-W."""
    copies = [x]
    for axis in (2, 3, 4):
        for shift in (1, -1):
            pad = [0, 0, 0, 0, 0, 0]
            side = 2 * (4 - axis) + (0 if shift > 0 else 1)  # F.pad lists the last axis first
            pad[side] = 1
            padded = F.pad(x, pad)
            index = [slice(None)] * 5
            index[axis] = slice(0, x.shape[axis]) if shift > 0 else slice(1, x.shape[axis] + 1)
            copies.append(padded[tuple(index)])
    return torch.cat(copies, dim=1)


@register_model("vitmednet3d")
class ViTMedNet3D(ClassifierBase):
    cam_layer = "cnn"

    def __init__(self, img_size=(28, 28, 28), in_chans: int = 1, num_classes: int = 2, cnn_channels: int = 32,
                 backbone: str = "resnet50", dim: int = 256, depth: int = 8, heads: int = 8,
                 drop_path_rate: float = 0.0):
        super().__init__()
        if in_chans != 1:
            raise ValueError("3DViTMedNet takes single-channel volumes")
        self.spatial_dims = 3
        self.num_classes = num_classes
        self.cnn = nn.Sequential(
            nn.Conv3d(7, cnn_channels, 5, padding=2), nn.BatchNorm3d(cnn_channels), nn.ReLU(inplace=True),
            nn.Conv3d(cnn_channels, cnn_channels, 5, padding=2), nn.BatchNorm3d(cnn_channels), nn.ReLU(inplace=True))
        self.slice_encoder = timm.create_model(backbone, num_classes=0, in_chans=cnn_channels)
        features = self.slice_encoder.num_features
        self.to_token = nn.Sequential(nn.Linear(features, 512), nn.GELU(), nn.Linear(512, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.sep_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.plane_embed = nn.Parameter(torch.zeros(1, 3, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.sep_token, std=0.02)
        nn.init.normal_(self.plane_embed, std=0.02)
        norm = partial(nn.LayerNorm, eps=1e-6)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([Block(dim, heads, qkv_bias=True, norm_layer=norm, drop_path=r) for r in rates])
        self.norm = norm(dim)
        self.head = nn.Linear(dim, num_classes)

    def slice_features(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """Every slice of the CNN output across D, H and W through the 2D backbone: [(N, length, F)] per plane.
        One backbone call per plane: one call on the three planes' slices together was 10-20% slower on CPU
        (docs/performance.md: evaluation speed)."""
        n, c = volume.shape[:2]
        stacks = [volume.movedim(axis, 1) for axis in (2, 3, 4)]  # (N, length, C, a, b)
        return [self.slice_encoder(stack.reshape(n * stack.shape[1], c, *stack.shape[3:])).reshape(n, stack.shape[1], -1)
                for stack in stacks]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm: [cls, D slices, sep, H slices, sep, W slices, sep]."""
        n = x.shape[0]
        sep = self.sep_token.expand(n, -1, -1)
        parts = [self.cls_token.expand(n, -1, -1)]
        for plane, features in enumerate(self.slice_features(self.cnn(shifted_copies(x)))):
            tokens = self.to_token(features)
            position = torch.from_numpy(sincos_1d(tokens.shape[-1], np.arange(tokens.shape[1]))).to(tokens)
            parts += [tokens + position + self.plane_embed[:, plane], sep]
        tokens = torch.cat(parts, dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x[:, 0] if pre_logits else self.head(x[:, 0])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "sep_token", "plane_embed"}
