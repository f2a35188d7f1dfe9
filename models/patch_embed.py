"""Patch embedding by a strided convolution, for 2D images and 3D volumes of any grid."""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn


def to_tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int means the same size on every axis; a sequence must name every axis."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name}={value} has {len(value)} axes, the model has {spatial_dims}")
    return value


class PatchEmbed(nn.Module):
    """[N, C, *img_size] -> [N, L, embed_dim], patches flattened with the first axis slowest."""

    def __init__(self, img_size: int | Sequence[int], patch_size: int | Sequence[int],
                 in_chans: int, embed_dim: int, spatial_dims: int):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.img_size = to_tuple(img_size, spatial_dims, "img_size")
        self.patch_size = to_tuple(patch_size, spatial_dims, "patch_size")
        for axis, (size, patch) in enumerate(zip(self.img_size, self.patch_size)):
            if size % patch:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size "
                                 f"{self.patch_size} on axis {axis}")
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = math.prod(self.grid_size)
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input grid {tuple(x.shape[2:])} does not match the model's "
                             f"img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
