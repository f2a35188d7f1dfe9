"""Fine-tuning augmentation: batched, on tensors on the training device (2D and 3D). Pretraining's own,
cheaper one is datasets.pretrain_augment.

All samples of a batch are transformed at once: random flips, 90-degree rotations (in planes
whose two axes have the same size), one affine resampling for small rotations, scaling and
translation (affine_grid + grid_sample), Gaussian noise and gamma. Inputs are floats in [0, 1].

Presets (`--augment`): `none`; `flips`; `geometric` (flips, 90-degree turns and the affine with
nearest-neighbour sampling: a mask or label map keeps exactly its values); `full` (the setup's
whole pipeline, with intensity changes). `auto` picks one from the training data itself
(`datasets.data_profile`).
"""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    max_rotation_deg: float = 15.0
    scale: tuple[float, float] = (0.9, 1.1)
    max_translation: float = 0.1  # fraction of the field of view
    noise_std: float = 0.03
    gamma: tuple[float, float] = (0.8, 1.25)
    elastic: float = 0.0  # displacement of a smooth random field, as a fraction of the field of view
    interpolation: str = "bilinear"  # "nearest" keeps the input's set of values

    @property
    def has_affine(self) -> bool:
        return (self.max_rotation_deg > 0 or tuple(self.scale) != (1.0, 1.0) or self.max_translation > 0
                or self.elastic > 0)

    @property
    def changes_intensity(self) -> bool:
        return self.noise_std > 0 or tuple(self.gamma) != (1.0, 1.0)


NO_AUGMENT = AugmentConfig(flip=False, rot90=False, max_rotation_deg=0.0, scale=(1.0, 1.0), max_translation=0.0,
                           noise_std=0.0, gamma=(1.0, 1.0))

# 3DViTMedNet's torchio pipeline: flips, affine +-10 deg, scale 0.95-1.05, small shifts,
# noise and gamma, elastic on request.
VITMEDNET_AUGMENT = AugmentConfig(flip=True, rot90=False, max_rotation_deg=10.0, scale=(0.95, 1.05),
                                  max_translation=0.05, noise_std=0.02, gamma=(0.9, 1.1))

PRESETS = ("none", "flips", "geometric", "full")


def preset(name: str, full: AugmentConfig = AugmentConfig()) -> AugmentConfig:
    """A named preset; `full` is the setup's own pipeline, and `geometric` its geometry alone."""
    if name == "none":
        return NO_AUGMENT
    if name == "flips":
        return replace(NO_AUGMENT, flip=True)
    if name == "geometric":
        return replace(full, noise_std=0.0, gamma=(1.0, 1.0), interpolation="nearest")
    if name == "full":
        return full
    raise ValueError(f"unknown augmentation preset {name!r}; one of {', '.join(PRESETS)}")


def describe(cfg: AugmentConfig) -> str:
    """One line naming what a configuration does, for the run's log."""
    parts = []
    if cfg.flip:
        parts.append("flips")
    if cfg.rot90:
        parts.append("90-degree turns")
    if cfg.has_affine:
        parts.append(f"affine (rotation <= {cfg.max_rotation_deg:g} deg, scale {cfg.scale[0]:g}-{cfg.scale[1]:g}, "
                     f"shift <= {cfg.max_translation:g}{', elastic' if cfg.elastic else ''}; {cfg.interpolation})")
    if cfg.noise_std > 0:
        parts.append(f"noise {cfg.noise_std:g}")
    if tuple(cfg.gamma) != (1.0, 1.0):
        parts.append(f"gamma {cfg.gamma[0]:g}-{cfg.gamma[1]:g}")
    return ", ".join(parts) or "nothing"


def _per_sample(mask: torch.Tensor, dims: int) -> torch.Tensor:
    return mask.view(-1, *[1] * (dims + 1))


def _rotation_3d(angles: torch.Tensor) -> torch.Tensor:
    """[N, 3] radians about x, y, z -> [N, 3, 3]."""
    cos, sin = angles.cos(), angles.sin()
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])
    rx = torch.stack([one, zero, zero, zero, cos[:, 0], -sin[:, 0], zero, sin[:, 0], cos[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([cos[:, 1], zero, sin[:, 1], zero, one, zero, -sin[:, 1], zero, cos[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([cos[:, 2], -sin[:, 2], zero, sin[:, 2], cos[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def _affine(x: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    n, dims = x.shape[0], x.dim() - 2
    max_angle = math.radians(cfg.max_rotation_deg)
    if dims == 3:
        rotation = _rotation_3d((torch.rand(n, 3, device=x.device) * 2 - 1) * max_angle)
    else:
        angle = (torch.rand(n, device=x.device) * 2 - 1) * max_angle
        rotation = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(-1, 2, 2)
    scale = torch.empty(n, 1, 1, device=x.device).uniform_(*cfg.scale)
    shift = (torch.rand(n, dims, 1, device=x.device) * 2 - 1) * cfg.max_translation * 2
    theta = torch.cat([rotation / scale, shift], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    if cfg.elastic > 0:  # a coarse random displacement field, smoothly upsampled
        coarse = (torch.rand(n, dims, *[4] * dims, device=x.device) * 2 - 1) * cfg.elastic * 2
        mode = "trilinear" if dims == 3 else "bilinear"
        field = F.interpolate(coarse, size=x.shape[2:], mode=mode, align_corners=False)
        grid = grid + field.movedim(1, -1)
    return F.grid_sample(x, grid, mode=cfg.interpolation, padding_mode="zeros", align_corners=False)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Randomly transformed copy of a [N, C, *grid] batch in [0, 1]."""
    n, dims = x.shape[0], x.dim() - 2
    if cfg.flip:
        for axis in range(2, x.dim()):
            x = torch.where(_per_sample(torch.rand(n, device=x.device) < 0.5, dims), x.flip(axis), x)
    if cfg.rot90:
        planes = [(a, b) for a in range(2, x.dim()) for b in range(a + 1, x.dim()) if x.shape[a] == x.shape[b]]
        if planes:
            plane = planes[int(torch.randint(len(planes), ()))]
            turns = torch.randint(0, 4, (n,)).tolist()
            x = torch.stack([torch.rot90(sample, k, [plane[0] - 1, plane[1] - 1]) for sample, k in zip(x, turns)])
    if cfg.has_affine:
        x = _affine(x, cfg)
    if cfg.noise_std > 0:
        x = (x + torch.randn_like(x) * cfg.noise_std).clamp(0.0, 1.0)
    if tuple(cfg.gamma) != (1.0, 1.0):
        gamma = torch.empty(n, device=x.device).uniform_(*cfg.gamma)
        x = x.clamp(0.0, 1.0) ** _per_sample(gamma, dims)
    return x
