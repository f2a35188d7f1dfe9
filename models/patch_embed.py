"""Patch embedding for 2D images and 3D volumes of any grid: a strided convolution, or a convolutional stem."""
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def to_tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    """An int means the same size on every axis; a sequence must name every axis."""
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name}={value} has {len(value)} axes, the model has {spatial_dims}")
    return value


# A patch of 16 voxels per axis, as the reference models, where the grid leaves at least MIN_TOKENS
# patches; small grids (MedMNIST's 28 and 64) get the patch that leaves about MIN_TOKENS of them.
REFERENCE_PATCH = 16
MIN_TOKENS = 64


def auto_patch_size(img_size: Sequence[int], stem: bool = False) -> tuple[int, ...]:
    """Patch size chosen from the grid. With a convolutional stem, `stem_patch_size`. Without: 16 per axis when
    it divides every axis and leaves at least 64 patches; otherwise, per axis, the divisor leaving the number
    of patches nearest (in ratio) to 64^(1/dims) (4 per axis in 3D: 28 -> 7, 64 -> 16; 8 in 2D: 28 -> 4),
    the finer one on a tie."""
    if stem:
        return stem_patch_size(img_size)
    img_size = tuple(int(s) for s in img_size)
    if all(s % REFERENCE_PATCH == 0 for s in img_size) and \
            math.prod(s // REFERENCE_PATCH for s in img_size) >= MIN_TOKENS:
        return (REFERENCE_PATCH,) * len(img_size)
    per_axis = MIN_TOKENS ** (1 / len(img_size))

    def best(size: int) -> int:
        divisors = [p for p in range(1, size + 1) if size % p == 0]
        return min(divisors, key=lambda p: (abs(math.log(size / p / per_axis)), p))

    return tuple(best(s) for s in img_size)


def stem_patch_size(img_size: Sequence[int], max_patch: int = REFERENCE_PATCH, min_tokens: int = 49) -> tuple[int, ...]:
    """Patch size for a convolutional stem, which halves the grid per stage: the largest power of two up to
    `max_patch` that divides every axis and leaves at least `min_tokens` patches (28^3 -> 4, i.e. 7^3
    tokens; 64^3 -> 16; 28^2 -> 4; 64^2 -> 8)."""
    img_size = tuple(int(s) for s in img_size)
    patch = 1
    while (patch * 2 <= max_patch and all(s % (patch * 2) == 0 for s in img_size)
           and math.prod(s // (patch * 2) for s in img_size) >= min_tokens):
        patch *= 2
    return (patch,) * len(img_size)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of every voxel (ConvNeXt's channels-first LayerNorm): unlike batch norm,
    each voxel's output depends on that voxel alone, so masked regions cannot leak through statistics."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


class ConvStem(nn.Module):
    """Stages of conv 3 - ChannelNorm - GELU - max-pool 2, one per halving of the patch size (so the output
    grid is the patch grid), channels doubling from `channels`. Each stage's input is multiplied by the
    visibility mask at its resolution, as in ConvMAE: no masked voxel reaches a visible token."""

    def __init__(self, patch_size: tuple[int, ...], in_chans: int, channels: int, spatial_dims: int):
        super().__init__()
        stages = max(int(math.log2(p)) for p in patch_size)
        if any(2 ** round(math.log2(p)) != p for p in patch_size):
            raise ValueError(f"a convolutional stem needs power-of-two patch sizes, got {patch_size}")
        conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
        pool = nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d
        layers, width = [], in_chans
        for stage in range(stages):
            kernel = tuple(2 if p > 2 ** stage else 1 for p in patch_size)
            out = channels * 2 ** stage
            layers.append(nn.Sequential(conv(width, out, 3, padding=1), ChannelNorm(out), nn.GELU(), pool(kernel)))
            width = out
        self.stages = nn.ModuleList(layers)
        self.out_channels = width

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        for stage in self.stages:
            if visible is not None:
                x = x * F.interpolate(visible, size=x.shape[2:], mode="nearest")
            x = stage(x)
        return x


class PatchEmbed(nn.Module):
    """[N, C, *img_size] -> [N, L, embed_dim], patches flattened with the first axis slowest.

    Without a stem (`stem_channels=0`, the reference layout) a strided convolution projects each patch;
    with one, a ConvStem reduces each patch to one feature vector, then a 1x1 convolution projects it.
    """

    def __init__(self, img_size: int | Sequence[int], patch_size: int | Sequence[int],
                 in_chans: int, embed_dim: int, spatial_dims: int, stem_channels: int = 0):
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
        if stem_channels:
            self.stem = ConvStem(self.patch_size, in_chans, stem_channels, spatial_dims)
            self.proj = conv(self.stem.out_channels, embed_dim, kernel_size=1)
        else:
            self.stem = None
            self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """`visible` ([N, *grid_size], 1 for kept patches) masks the stem's inputs; patches are independent
        without a stem, so it is not needed there."""
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"input grid {tuple(x.shape[2:])} does not match the model's "
                             f"img_size {self.img_size}")
        if self.stem is not None:
            x = self.stem(x, None if visible is None else visible.unsqueeze(1).to(x.dtype))
        return self.proj(x).flatten(2).transpose(1, 2)


class InputNorm(nn.Module):
    """(x - mean) / std with the training data's statistics, fixed at construction (model configuration, not
    weights: the state dict keeps the reference layout). Small binary masks (1.6% foreground) standardised
    this way give the patch content a scale the positional embedding does not drown (docs/finetuning.md: the MedMNIST recipe)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        if not std > 0:
            raise ValueError(f"input_std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean == 0.0 and self.std == 1.0:
            return x
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean:g}, std={self.std:g}"
