"""Per-iteration learning rate: linear warmup, then a half-cycle cosine down to `min_lr`."""
import math

import torch


def lr_at_step(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based); warmup reaches `base_lr` at its last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr`, scaled per group by `lr_scale` when a group carries one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def effective_lr(blr: float, lr: float | None, effective_batch: int) -> float:
    """`--lr` when given, else the MAE scaling rule blr * effective_batch / 256."""
    return lr if lr is not None else blr * effective_batch / 256


def multistep_lr(epoch: int, base_lr: float, epochs: int, milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """MedMNIST's official schedule: multiply by `gamma` at each milestone (a fraction of the epochs)."""
    passed = sum(epoch >= int(m * epochs) for m in milestones)
    return base_lr * gamma ** passed
