"""The network of a VolMAE bundle, defined here so that the bundle runs without VolMAE: VolMAE's ViT encoder (a
strided patch projection or a convolutional stem, a class token, learned positions, pre-norm blocks) under the
same parameter names, so models/model.pt is VolMAE's own state dict. LayerNorm eps is part of the definition
(`layer_norm_eps`), never a step left to the user.

An encoder (`global_pool` None) returns the mean of its patch tokens, the embedding volmae-predict gives; a
classifier its logits; VolMAEEnsemble, the fold models of a cross-validated run, the log of their mean
probability."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class ChannelNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ConvStem(nn.Module):
    def __init__(self, patch_size: list[int], in_chans: int, channels: int):
        super().__init__()
        stages, width, layers = max(int(math.log2(p)) for p in patch_size), in_chans, []
        for stage in range(stages):
            kernel = tuple(2 if p > 2 ** stage else 1 for p in patch_size)
            out = channels * 2 ** stage
            layers.append(nn.Sequential(nn.Conv3d(width, out, 3, padding=1), ChannelNorm(out), nn.GELU(),
                                        nn.MaxPool3d(kernel)))
            width = out
        self.stages = nn.ModuleList(layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: list[int], in_chans: int, embed_dim: int, stem_channels: int):
        super().__init__()
        if stem_channels:
            self.stem = ConvStem(patch_size, in_chans, stem_channels)
            self.proj = nn.Conv3d(self.stem.out_channels, embed_dim, kernel_size=1)
        else:
            self.stem = None
            self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stem is not None:
            x = self.stem(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class VolMAEViT(nn.Module):
    """One VolMAE ViT: an encoder, or a classifier with its pooling, norms and head."""

    def __init__(self, img_size: list[int], patch_size: list[int], in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, input_mean: float, input_std: float, stem_channels: int,
                 layer_norm_eps: float, isolated_class_token: bool, final_norm: bool, global_pool: str | None,
                 head_norm: bool, num_classes: int):
        super().__init__()
        self.mean, self.std = float(input_mean), float(input_std)
        self.isolated_class_token = isolated_class_token
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, stem_channels)
        tokens = math.prod(s // p for s, p in zip(img_size, patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, layer_norm_eps) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps) if final_norm else nn.Identity()
        if global_pool is None:
            return
        feature = 2 * embed_dim if global_pool == "concat" else embed_dim
        self.fc_norm = nn.LayerNorm(feature, eps=1e-6) if global_pool != "token" else nn.Identity()
        self.head_norm = nn.BatchNorm1d(feature, affine=False, eps=1e-6) if head_norm else nn.Identity()
        self.head = nn.Linear(feature, num_classes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean != 0.0 or self.std != 1.0:
            x = (x - self.mean) / self.std
        patches = self.patch_embed(x) + self.pos_embed[:, 1:]
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1), patches], dim=1)
        mask = None
        if self.isolated_class_token:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
            mask[1:, 0] = False
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        if self.global_pool is None:
            return tokens[:, 1:].mean(dim=1)
        if self.global_pool == "token":
            feature = tokens[:, 0]
        else:
            mean = tokens[:, 1:].mean(dim=1)
            feature = self.fc_norm(torch.cat([tokens[:, 0], mean], dim=-1) if self.global_pool == "concat" else mean)
        return self.head(self.head_norm(feature))


class VolMAEEnsemble(nn.Module):
    """The fold models of a cross-validated run as one classifier: the log of their mean probability, so that the
    softmax of the postprocessing gives that mean. Parameters under `members.<i>.`, as VolMAE keeps them."""

    def __init__(self, members: int, **vit):
        super().__init__()
        self.members = nn.ModuleList([VolMAEViT(**vit) for _ in range(members)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(member(x).float(), dim=-1) for member in self.members]).mean(dim=0)
        return torch.log(mean.clamp(1e-12, 1.0))
