"""Fixed sin-cos positional embeddings for 2D and 3D patch grids of any shape.

Each spatial axis gets its own block of channels, encoded with its own coordinate, so the
embedding is right on non-cubic grids (the 3D reference reused one axis' size for all three).
"""
from collections.abc import Sequence

import numpy as np
import torch


def split_embed_dim(embed_dim: int, num_axes: int) -> list[int]:
    """Split `embed_dim` into `num_axes` even parts, as equal as possible (earlier axes larger)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embeddings need an even embed_dim, got {embed_dim}")
    pairs, extra = divmod(embed_dim // 2, num_axes)
    return [2 * (pairs + (axis < extra)) for axis in range(num_axes)]


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: sines in the first half, cosines in the second."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed(embed_dim: int, grid_size: Sequence[int], cls_token: bool = False) -> torch.Tensor:
    """[prod(grid_size) (+1), embed_dim] float32; tokens in row-major order (first axis slowest).

    With `cls_token` the first row is zeros, as in MAE.
    """
    coords = np.meshgrid(*[np.arange(n) for n in grid_size], indexing="ij")
    parts = [sincos_1d(dim, axis_coords.reshape(-1))
             for dim, axis_coords in zip(split_embed_dim(embed_dim, len(grid_size)), coords)]
    table = np.concatenate(parts, axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return torch.from_numpy(table).float()
